"""Nearest neighbours in a finished output file: ``togembed search`` and ``embed --query``.

An output says how its vectors were made (the model, the input and its fields) in its Parquet
schema metadata; a .npy or .jsonl output has no place for it, and the job file beside it (while
it is kept) says the same. A query must be embedded with the same model.

May import: the standard library, attrs, numpy, orjson, pyarrow (on demand); ``filetypes``,
``jobfile``, ``readers``, ``writers``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import orjson

from .filetypes import OUTPUT_SUFFIXES, CorpusError, MissingDependencyError
from .jobfile import job_path, started_with
from .readers import read_records
from .writers import PARQUET_META_KEY, npy_ids_path

__all__ = ["TextSource", "load_output", "made_with", "nearest", "texts_of"]


@attrs.frozen
class TextSource:
    """Where the texts of an output's ids are: the input file and its fields."""

    input: Path
    id_field: str | None
    text_field: str = "text"


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingDependencyError(
            "reading .parquet needs pip install 'togembed[parquet]'"
        ) from exc
    return pq


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise CorpusError(
            f"not a togembed output: the file type {suffix or '(none)'!r} is none of "
            f"{', '.join(OUTPUT_SUFFIXES)}",
            path=path,
        )
    return suffix


def load_output(path: Path) -> tuple[list[str], np.ndarray]:
    """Ids and the (N, D) float32 matrix of a ``togembed embed`` output file; a
    ``CorpusError`` says what is wrong with a file that is not one."""
    suffix = _check_suffix(path)
    try:
        if suffix == ".npy":
            return _load_npy(path)
        if suffix == ".jsonl":
            return _load_jsonl(path)
        return _load_parquet(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, CorpusError):
            raise
        raise CorpusError(f"cannot read it as a togembed output ({exc})", path=path) from exc


def _load_npy(path: Path) -> tuple[list[str], np.ndarray]:
    ids_file = npy_ids_path(path)
    if not ids_file.exists():
        raise CorpusError(f"its ids file {ids_file} is missing", path=path)
    ids = ids_file.read_text(encoding="utf-8").splitlines()
    matrix = np.load(path, mmap_mode="r")
    if matrix.ndim != 2 or len(matrix) != len(ids):
        raise CorpusError(
            f"an array of shape {matrix.shape} and {len(ids)} ids in {ids_file}: they do not "
            "belong together",
            path=path,
        )
    return ids, matrix


def _load_jsonl(path: Path) -> tuple[list[str], np.ndarray]:
    rows = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    if not rows:
        return [], np.empty((0, 0), np.float32)
    return [r["id"] for r in rows], np.array([r["embedding"] for r in rows], np.float32)


def _load_parquet(path: Path) -> tuple[list[str], np.ndarray]:
    pq = _pyarrow_parquet()
    table = pq.read_table(path, columns=["id", "embedding"])
    kind = table.schema.field("embedding").type
    dim = getattr(kind, "list_size", None)
    column = table.column("embedding").combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    if dim is None:  # a variable-size list column (not ours, but readable)
        dim = len(flat) // len(table) if len(table) else 0
    matrix = flat.reshape(len(table), dim).astype(np.float32, copy=False)
    return table.column("id").to_pylist(), matrix


def made_with(path: Path) -> dict[str, Any]:
    """What is known of how an output was made: ``model``, ``input``, ``id_field``,
    ``text_field``, from the Parquet metadata or else the job file; {} if nothing."""
    if _check_suffix(path) == ".parquet":
        pq = _pyarrow_parquet()
        with contextlib.suppress(OSError, ValueError):
            meta = pq.ParquetFile(path).schema_arrow.metadata or {}
            if PARQUET_META_KEY in meta:
                found = orjson.loads(meta[PARQUET_META_KEY])
                if isinstance(found, dict):
                    return found
    return started_with(job_path(path))


def texts_of(source: TextSource, wanted: set[str]) -> dict[str, str]:
    """id -> text of the records of ``source`` whose id is in ``wanted`` (a pass over it)."""
    return {
        r.id: r.text
        for r in read_records(source.input, id_field=source.id_field, text_field=source.text_field)
        if r.id in wanted
    }


def nearest(matrix: np.ndarray, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Row numbers and cosine similarities of the ``k`` rows closest to ``query``."""
    if len(matrix) == 0:
        return []
    norms = np.linalg.norm(matrix, axis=1) * float(np.linalg.norm(query))
    scores = (matrix @ query) / np.where(norms == 0, 1, norms)
    top = np.argsort(-scores, kind="stable")[:k]
    return [(int(i), float(scores[i])) for i in top]
