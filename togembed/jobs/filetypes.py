"""The file types a corpus job reads and writes: their suffixes, the errors about a file
(``CorpusError``, ``MissingDependencyError``), and pyarrow, imported only for .parquet.

May import: the standard library, pyarrow (on demand); ``togembed.core``.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from ..core.errors import TogembedError

__all__ = [
    "INPUT_SUFFIXES",
    "OUTPUT_SUFFIXES",
    "CorpusError",
    "MissingDependencyError",
    "check_suffix",
    "pyarrow",
]

INPUT_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
OUTPUT_SUFFIXES = (".parquet", ".npy", ".jsonl")


class CorpusError(TogembedError, ValueError):
    """A corpus file we cannot read or write: ``path`` and, where known, ``line`` (the 1-based
    line of a text file, or row of a parquet file)."""

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str],
        line: int | None = None,
        unit: str = "line",
    ) -> None:
        where = f"{os.fspath(path)}, {unit} {line}" if line is not None else os.fspath(path)
        super().__init__(f"{where}: {message}")
        self.path = os.fspath(path)
        self.line = line


class MissingDependencyError(TogembedError, ImportError):
    """An optional dependency is needed for this file type."""


def pyarrow() -> tuple[ModuleType, ModuleType]:
    """Import pyarrow only when a parquet file is used: the SDK itself does not need it."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingDependencyError(
            "reading or writing .parquet needs pyarrow: pip install 'togembed[parquet]'"
        ) from exc
    return pa, pq


def check_suffix(path: Path, allowed: tuple[str, ...], what: str) -> str:
    """The file's lower-case suffix, if it is one of ``allowed``; else a ``CorpusError`` that
    names the ``what`` (input, output) types there are."""
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise CorpusError(
            f"unsupported {what} file type {suffix or '(none)'!r}; use one of {', '.join(allowed)}",
            path=path,
        )
    return suffix
