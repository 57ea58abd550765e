"""Streaming corpus files: read records from .txt/.jsonl/.csv/.parquet, write vectors to
.parquet/.npy/.jsonl. Memory is bounded by one line, row or row group, never by the file.

Positions (``Record.pos``) count records from 0 and are where each vector lands in the output.
Default ids are 1-based and point back into the file: the line number for .txt and .jsonl, the
line a record starts on for .csv (the header is line 1), the row number for .parquet.

Nothing here remembers ids across records (that would be O(N) memory): the job store detects an
id used twice, on disk.

Outputs are written to a hidden temp file beside the target and renamed over it at the end, so a
killed export never leaves a half file under the final name.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

import attrs
import numpy as np
import orjson

from ._exceptions import TogembedError

__all__ = [
    "INPUT_SUFFIXES",
    "OUTPUT_SUFFIXES",
    "CorpusError",
    "MissingDependencyError",
    "Record",
    "count_records",
    "npy_ids_path",
    "read_records",
    "write_output",
]

INPUT_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
OUTPUT_SUFFIXES = (".parquet", ".npy", ".jsonl")

PARQUET_ROW_GROUP = 8192
# ...or fewer rows for wide vectors: the writer holds about three copies of a row group.
_PARQUET_ROW_GROUP_BYTES = 32 << 20
_PARQUET_READ_BATCH = 4096
_COUNT_CHUNK = 1 << 20
# csv refuses fields over 128 KiB by default; a document can be longer than that.
_CSV_FIELD_LIMIT = 2**31 - 1


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


@attrs.frozen
class Record:
    """One input text: ``pos`` is its 0-based place in the corpus, ``id`` the user's name for it."""

    pos: int
    id: str
    text: str


def _pyarrow() -> tuple[ModuleType, ModuleType]:
    """Import pyarrow only when a parquet file is used: the SDK itself does not need it."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingDependencyError(
            "reading or writing .parquet needs pyarrow: pip install 'togembed[parquet]'"
        ) from exc
    return pa, pq


def _suffix(path: Path, allowed: tuple[str, ...], what: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise CorpusError(
            f"unsupported {what} file type {suffix or '(none)'!r}; use one of {', '.join(allowed)}",
            path=path,
        )
    return suffix


# ---------------------------------------------------------------------------------------------
# Reading


def read_records(
    path: str | os.PathLike[str], *, id_field: str | None = None, text_field: str = "text"
) -> Iterator[Record]:
    """Stream the records of a corpus file, chosen by suffix; raises ``CorpusError`` with the
    line (or row) of the first bad record."""
    path = Path(path)
    suffix = _suffix(path, INPUT_SUFFIXES, "input")
    if suffix == ".txt":
        if id_field is not None:
            raise CorpusError("a .txt corpus has no fields; ids are line numbers", path=path)
        return _read_txt(path)
    if suffix == ".jsonl":
        return _read_jsonl(path, id_field, text_field)
    if suffix == ".csv":
        return _read_csv(path, id_field, text_field)
    return _read_parquet(path, id_field, text_field)


def count_records(
    path: str | os.PathLike[str], *, id_field: str | None = None, text_field: str = "text"
) -> int | None:
    """A cheap record count for a progress bar: lines for text formats (an upper bound for
    .csv with multi-line fields and .jsonl with blank lines), metadata for .parquet."""
    del id_field, text_field  # same signature as read_records; the count does not depend on them
    path = Path(path)
    suffix = _suffix(path, INPUT_SUFFIXES, "input")
    if suffix == ".parquet":
        _, pq = _pyarrow()
        return int(pq.ParquetFile(path).metadata.num_rows)
    lines = _count_lines(path)
    if suffix == ".csv":
        return max(lines - 1, 0)  # the header
    return lines


def _count_lines(path: Path) -> int:
    """Lines as ``_read_txt`` sees them: every b"\\n" ends one, and a last unterminated line
    counts too."""
    lines = 0
    last = b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(_COUNT_CHUNK):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its "\\n" or "\\r\\n"). Splits on "\\n" only, so a
    stray "\\r" or Unicode line separator inside a text stays in that text."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(_decoded_lines(f, path), start=1):
            if line.endswith("\n"):
                line = line[:-2] if line.endswith("\r\n") else line[:-1]
            yield lineno, line


def _read_txt(path: Path) -> Iterator[Record]:
    for lineno, text in _numbered_lines(path):
        yield Record(lineno - 1, str(lineno), text)


def _id_value(value: Any, field: str) -> str:
    """Ids are strings; integer ids (common in datasets) are accepted and written as decimal."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is None:
        raise ValueError(f"id field {field!r} is null")
    raise ValueError(
        f"id field {field!r} must be a string or an integer, not {type(value).__name__}"
    )


def _text_value(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        raise ValueError(f"text field {field!r} is null")
    raise ValueError(f"text field {field!r} must be a string, not {type(value).__name__}")


def _read_jsonl(path: Path, id_field: str | None, text_field: str) -> Iterator[Record]:
    pos = 0
    for lineno, line in _numbered_lines(path):
        if not line.strip():
            continue  # blank lines (a trailing one, typically) are not records
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise CorpusError(f"invalid JSON ({exc})", path=path, line=lineno) from None
        if not isinstance(obj, dict):
            raise CorpusError(
                f"expected a JSON object, got {type(obj).__name__}", path=path, line=lineno
            )
        try:
            if text_field not in obj:
                raise ValueError(f"no text field {text_field!r}")
            text = _text_value(obj[text_field], text_field)
            if id_field is None:
                rid = str(lineno)
            elif id_field not in obj:
                raise ValueError(f"no id field {id_field!r}")
            else:
                rid = _id_value(obj[id_field], id_field)
        except ValueError as exc:
            raise CorpusError(str(exc), path=path, line=lineno) from None
        yield Record(pos, rid, text)
        pos += 1


def _read_csv(path: Path, id_field: str | None, text_field: str) -> Iterator[Record]:
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    with open(path, "rb") as f:
        # We decode line by line ourselves (endings kept, for quoted multi-line fields), so a
        # bad byte is reported on its own line, not where a text-mode read-ahead found it.
        lines = _decoded_lines(f, path)
        reader = csv.reader(lines)
        try:
            header = next(reader, None)
            if header is None:
                return  # an empty file: no header, no records
            columns = [text_field] if id_field is None else [text_field, id_field]
            for name in columns:
                if name not in header:
                    raise CorpusError(
                        f"no column {name!r} in the header (columns: {', '.join(header)})",
                        path=path,
                        line=1,
                    )
            text_col = header.index(text_field)
            id_col = header.index(id_field) if id_field is not None else -1
            end_line = reader.line_num
            pos = 0
            for row in reader:
                start_line, end_line = end_line + 1, reader.line_num
                if not row:
                    continue  # a blank line
                if len(row) <= max(text_col, id_col):
                    raise CorpusError(
                        f"row has {len(row)} fields, the header has {len(header)}",
                        path=path,
                        line=start_line,
                    )
                rid = row[id_col] if id_field is not None else str(start_line)
                yield Record(pos, rid, row[text_col])
                pos += 1
        except csv.Error as exc:
            raise CorpusError(f"bad CSV ({exc})", path=path, line=reader.line_num) from None


def _decoded_lines(f: BinaryIO, path: Path) -> Iterator[str]:
    """Lines of a UTF-8 file, endings kept, a leading byte order mark dropped."""
    for lineno, raw in enumerate(f, start=1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusError(f"not valid UTF-8 ({exc.reason})", path=path, line=lineno) from None


def _read_parquet(path: Path, id_field: str | None, text_field: str) -> Iterator[Record]:
    pa, pq = _pyarrow()
    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    text_checks: list[Callable[[Any], bool]] = [pa.types.is_string, pa.types.is_large_string]
    id_checks = [*text_checks, pa.types.is_integer]
    for name, checks, kind in (
        (text_field, text_checks, "a string"),
        (id_field, id_checks, "a string or integer"),
    ):
        if name is None:
            continue
        if name not in schema.names:
            raise CorpusError(f"no column {name!r} (columns: {', '.join(schema.names)})", path=path)
        dtype = schema.field(name).type
        if not any(check(dtype) for check in checks):
            raise CorpusError(f"column {name!r} must be {kind} column, not {dtype}", path=path)
    columns = [text_field] if id_field is None else [text_field, id_field]
    pos = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_READ_BATCH, columns=columns):
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if id_field is not None else None
        for i, text in enumerate(texts):
            row = pos + 1
            try:
                text = _text_value(text, text_field)
                rid = str(row) if ids is None else _id_value(ids[i], id_field or "")
            except ValueError as exc:
                raise CorpusError(str(exc), path=path, line=row, unit="row") from None
            yield Record(pos, rid, text)
            pos += 1


# ---------------------------------------------------------------------------------------------
# Writing


def npy_ids_path(path: str | os.PathLike[str]) -> Path:
    """The ids sidecar of a .npy output: ``vectors.npy`` -> ``vectors.ids.txt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.ids.txt")


def write_output(
    path: str | os.PathLike[str],
    rows: Iterable[tuple[str, np.ndarray]],
    *,
    dim: int,
    count: int,
) -> int:
    """Write ``count`` (id, vector) rows, in the order given, to a .parquet, .npy or .jsonl file
    chosen by suffix; returns the rows written.

    - .parquet: columns ``id`` (string) and ``embedding`` (fixed_size_list<float32>[dim]),
      row groups of 8192 rows (fewer when vectors are wider than 1024: at most 32 MiB).
    - .npy: a float32 array of shape (count, dim), plus ``<stem>.ids.txt`` beside it with one id
      per line in the same order (so ids must not contain line breaks).
    - .jsonl: one ``{"id": ..., "embedding": [...]}`` per line.

    ``count`` must match the rows given (the .npy header needs it up front; for the others it
    catches a job that would silently drop or repeat rows). Nothing appears under the final
    name unless the whole file was written.
    """
    path = Path(path)
    suffix = _suffix(path, OUTPUT_SUFFIXES, "output")
    if suffix == ".parquet":
        pa, pq = _pyarrow()  # fail before creating anything
        with _replacing(path) as tmp:
            written = _write_parquet(tmp, rows, dim, pa, pq)
            _check_count(path, written, count)
    elif suffix == ".npy":
        # The sidecar is renamed first: once the .npy is in place, its ids are too.
        with _replacing(path) as tmp, _replacing(npy_ids_path(path)) as ids_tmp:
            written = _write_npy(tmp, ids_tmp, rows, dim, count)
    else:
        with _replacing(path) as tmp:
            written = _write_jsonl(tmp, rows, dim)
            _check_count(path, written, count)
    return written


class _replacing:
    """Yield a temp path beside ``path``; rename it over ``path`` on success, delete it on
    error. The temp name is fixed, so a re-run after a kill overwrites the leftover."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.togembed-tmp")

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        _fsync_file(self.tmp)
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)


def _fsync_file(path: Path) -> None:
    """Data on disk before the rename, so a power loss cannot leave an empty file in place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    if sys.platform == "win32":
        return  # directories cannot be opened there; NTFS journals the rename
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_count(path: Path, written: int, count: int) -> None:
    if written != count:
        raise CorpusError(f"expected {count} rows, got {written}; output not written", path=path)


def _row_vector(path: Path, rid: str, vector: np.ndarray, dim: int) -> np.ndarray:
    vec = np.asarray(vector, dtype="<f4")
    if vec.shape != (dim,):
        raise CorpusError(f"id {rid!r}: vector shape {vec.shape}, expected ({dim},)", path=path)
    return vec


def _write_parquet(
    tmp: Path, rows: Iterable[tuple[str, np.ndarray]], dim: int, pa: Any, pq: Any
) -> int:
    schema = pa.schema(
        [("id", pa.string()), ("embedding", pa.list_(pa.float32(), dim))]  # fixed size
    )
    group = max(1, min(PARQUET_ROW_GROUP, _PARQUET_ROW_GROUP_BYTES // max(4 * dim, 1)))
    ids: list[str] = []
    buf = np.empty((group, dim), dtype=np.float32)
    written = 0

    def flush(writer: Any) -> None:
        flat = pa.array(buf[: len(ids)].reshape(-1), type=pa.float32())
        table = pa.Table.from_arrays(
            [pa.array(ids, type=pa.string()), pa.FixedSizeListArray.from_arrays(flat, dim)],
            schema=schema,
        )
        writer.write_table(table, row_group_size=group)
        ids.clear()

    # No dictionary encoding: unique ids and float vectors gain nothing from it, and it costs
    # time and memory.
    with pq.ParquetWriter(tmp, schema, use_dictionary=False) as writer:
        for rid, vector in rows:
            buf[len(ids)] = _row_vector(tmp, rid, vector, dim)
            ids.append(rid)
            written += 1
            if len(ids) == group:
                flush(writer)
        if ids:
            flush(writer)
    return written


def _write_npy(
    tmp: Path, ids_tmp: Path, rows: Iterable[tuple[str, np.ndarray]], dim: int, count: int
) -> int:
    """Header, then rows appended with plain writes. (``open_memmap`` would map the whole array
    into the process, and every page it touches counts in RSS: 3 GB for 1M x 768.)"""
    header = {"descr": "<f4", "fortran_order": False, "shape": (count, dim)}
    written = 0
    with (
        open(tmp, "wb", buffering=1 << 20) as f,
        open(ids_tmp, "w", encoding="utf-8", newline="\n", buffering=1 << 20) as ids_file,
    ):
        np.lib.format.write_array_header_1_0(f, header)
        for rid, vector in rows:
            if written == count:
                raise CorpusError(f"more than the {count} rows announced", path=tmp)
            if "\n" in rid or "\r" in rid:
                raise CorpusError(
                    f"id {rid!r} contains a line break, which the .ids.txt sidecar cannot hold; "
                    "write .parquet or .jsonl instead",
                    path=ids_tmp,
                )
            f.write(_row_vector(tmp, rid, vector, dim).tobytes())
            ids_file.write(rid)
            ids_file.write("\n")
            written += 1
    _check_count(tmp, written, count)
    return written


def _write_jsonl(tmp: Path, rows: Iterable[tuple[str, np.ndarray]], dim: int) -> int:
    option = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
    written = 0
    with open(tmp, "wb", buffering=1 << 20) as f:
        for rid, vector in rows:
            vec = np.ascontiguousarray(_row_vector(tmp, rid, vector, dim), dtype=np.float32)
            f.write(orjson.dumps({"id": rid, "embedding": vec}, option=option))
            written += 1
    return written
