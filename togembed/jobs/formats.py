"""Streaming corpus files: read records from .txt/.jsonl/.csv/.parquet, write vectors to
.parquet/.npy/.jsonl. Memory is bounded by one line, row or row group, never by the file.

Positions (``Record.pos``) count records from 0 and are where each vector lands in the output.
Default ids are 1-based and point back into the file: the line number for .txt and .jsonl, the
line a record starts on for .csv (the header is line 1), the row number for .parquet.

An input whose records have an ``id`` field (the CSV header, the Parquet schema, the first JSONL
record) has its ids there: ``detect_id_field`` finds it, so that a corpus with ids needs no
``--id-field``.

Nothing here remembers ids across records (that would be O(N) memory): the job store detects an
id used twice, on disk.

Outputs are written to a hidden temp file beside the target and renamed over it at the end, so a
killed export never leaves a half file under the final name.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import itertools
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

import attrs
import numpy as np
import orjson

from ..core.errors import TogembedError

__all__ = [
    "INPUT_SUFFIXES",
    "OUTPUT_SUFFIXES",
    "CorpusError",
    "MissingDependencyError",
    "OutputFile",
    "Record",
    "RecordBlock",
    "count_records",
    "default_ids",
    "detect_id_field",
    "npy_ids_path",
    "read_blocks",
    "read_records",
    "scan_records",
    "write_output",
]

INPUT_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
OUTPUT_SUFFIXES = (".parquet", ".npy", ".jsonl")

PARQUET_ROW_GROUP = 8192
PARQUET_META_KEY = b"togembed"  # schema metadata: how the vectors were made (JSON)
# ...or fewer rows for wide vectors: the writer holds about three copies of a row group.
_PARQUET_ROW_GROUP_BYTES = 16 << 20
_PARQUET_READ_BATCH = 4096
_BLOCK = 1024  # records read at a time
_WRITE_BLOCK = 1024  # rows write_output hands to an OutputFile at a time
_SYNC_BYTES = 16 << 20  # an output is synced to disk each time this much more was written
_COUNT_CHUNK = 1 << 20
# csv refuses fields over 128 KiB by default; a document can be longer than that.
_CSV_FIELD_LIMIT = 2**31 - 1
_BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark
DEFAULT_ID_FIELD = "id"  # the field an input's ids are taken from without --id-field


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


@attrs.frozen
class RecordBlock:
    """Consecutive records: ``texts[k]`` is at position ``start + k`` and has id ``ids[k]``."""

    start: int
    ids: list[str]
    texts: list[str]


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


def detect_id_field(path: str | os.PathLike[str]) -> str | None:
    """``"id"`` if the input's records have an ``id`` field (the CSV header, the Parquet schema,
    the first JSONL record), else None (ids are then line or row numbers). Reads only the
    start of the file; a record it cannot read is left for the reader to report, with its
    line."""
    path = Path(path)
    suffix = _suffix(path, INPUT_SUFFIXES, "input")
    if suffix == ".txt":
        return None
    if suffix == ".parquet":
        _, pq = _pyarrow()
        names = _parquet_file(pq, path).schema_arrow.names
        return DEFAULT_ID_FIELD if DEFAULT_ID_FIELD in names else None
    with open(path, "rb") as f, contextlib.suppress(CorpusError, csv.Error):
        lines = _decoded_lines(f, path)
        if suffix == ".csv":
            header = next(csv.reader(lines), None) or []
            return DEFAULT_ID_FIELD if DEFAULT_ID_FIELD in header else None
        for line in lines:
            if line.strip():
                try:
                    first = orjson.loads(line)
                except orjson.JSONDecodeError:
                    return None
                found = isinstance(first, dict) and DEFAULT_ID_FIELD in first
                return DEFAULT_ID_FIELD if found else None
    return None


def default_ids(path: str | os.PathLike[str]) -> str:
    """What the ids of an input are without an id field: ``"line numbers"`` or, for Parquet,
    ``"row numbers"``."""
    return "row numbers" if Path(path).suffix.lower() == ".parquet" else "line numbers"


def _count_lines(path: Path, *, check_utf8: bool = False) -> int:
    """Lines as ``_read_txt`` sees them: every b"\\n" ends one, and a last unterminated line
    counts too. ``check_utf8``: also decode the file, a MB at a time, and raise the first bad
    line's ``CorpusError``."""
    decode = codecs.getincrementaldecoder("utf-8")().decode if check_utf8 else None
    lines, last = 0, b"\n"
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_COUNT_CHUNK):
                if decode is not None:
                    decode(chunk)
                lines += chunk.count(b"\n")
                last = chunk[-1:]
            if decode is not None:
                decode(b"", final=True)
    except UnicodeDecodeError:
        for _ in _txt_blocks(path, _BLOCK):  # raises the error with its line number
            pass
        raise
    return lines + (last != b"\n")


def scan_records(
    path: str | os.PathLike[str], *, id_field: str | None = None, text_field: str = "text"
) -> int:
    """Read every record, to raise the first bad one's ``CorpusError`` before a job pays for
    anything, and count them. A .txt file is checked a MB at a time (UTF-8 and line ends
    only: 10x faster than reading its records)."""
    path = Path(path)
    if _suffix(path, INPUT_SUFFIXES, "input") != ".txt" or id_field is not None:
        return sum(1 for _ in read_records(path, id_field=id_field, text_field=text_field))
    return _count_lines(path, check_utf8=True)


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its "\\n" or "\\r\\n"). Splits on "\\n" only, so a
    stray "\\r" or Unicode line separator inside a text stays in that text."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(_decoded_lines(f, path), start=1):
            if line.endswith("\n"):
                line = line[:-2] if line.endswith("\r\n") else line[:-1]
            yield lineno, line


def _read_txt(path: Path) -> Iterator[Record]:
    for block in _txt_blocks(path, _BLOCK):
        for k, text in enumerate(block.texts):
            yield Record(block.start + k, block.ids[k], text)


def _txt_blocks(path: Path, size: int) -> Iterator[RecordBlock]:
    """``_numbered_lines`` a block at a time: one decode and one split per block."""
    start = 0
    with open(path, "rb") as f:
        while raw := list(itertools.islice(f, size)):
            if start == 0 and raw[0].startswith(_BOM):
                raw[0] = raw[0][len(_BOM) :]
            try:
                text = b"".join(raw).decode("utf-8")
            except UnicodeDecodeError:
                for k, line in enumerate(raw):
                    try:
                        line.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        if k:  # the lines before the bad one come out first
                            yield _lines_block(b"".join(raw[:k]).decode("utf-8"), k, start)
                        raise CorpusError(
                            f"not valid UTF-8 ({exc.reason})", path=path, line=start + k + 1
                        ) from None
                raise
            yield _lines_block(text, len(raw), start)
            start += len(raw)


def _lines_block(text: str, lines: int, start: int) -> RecordBlock:
    """The block of ``lines`` lines decoded as ``text``: each ends with its only "\n", except
    perhaps the file's last."""
    texts = text.split("\n")[:lines]
    if "\r" in text:  # "\r\n" endings
        ended = lines if text.endswith("\n") else lines - 1
        texts[:ended] = [t[:-1] if t.endswith("\r") else t for t in texts[:ended]]
    return RecordBlock(start, list(map(str, range(start + 1, start + lines + 1))), texts)


def read_blocks(
    path: str | os.PathLike[str],
    *,
    id_field: str | None = None,
    text_field: str = "text",
    size: int = 1024,
) -> Iterator[RecordBlock]:
    """``read_records`` in blocks of up to ``size`` consecutive records: less work per record
    (a .txt block is decoded and split at once)."""
    path = Path(path)
    if _suffix(path, INPUT_SUFFIXES, "input") == ".txt" and id_field is None:
        return _txt_blocks(path, size)
    return _group_blocks(read_records(path, id_field=id_field, text_field=text_field), size)


def _group_blocks(records: Iterator[Record], size: int) -> Iterator[RecordBlock]:
    while block := list(itertools.islice(records, size)):
        yield RecordBlock(block[0].pos, [r.id for r in block], [r.text for r in block])


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
        if lineno == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusError(f"not valid UTF-8 ({exc.reason})", path=path, line=lineno) from None


def _parquet_file(pq: ModuleType, path: Path) -> Any:
    """``pq.ParquetFile``, its errors (not a Parquet file, a damaged one) as ``CorpusError``."""
    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise CorpusError(f"not a readable Parquet file ({exc})", path=path) from None


def _read_parquet(path: Path, id_field: str | None, text_field: str) -> Iterator[Record]:
    pa, pq = _pyarrow()
    pf = _parquet_file(pq, path)
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
    chosen by suffix; returns the rows written. (``OutputFile`` writes one block at a time.)

    - .parquet: columns ``id`` (string) and ``embedding`` (fixed_size_list<float32>[dim]),
      row groups of 8192 rows (fewer when vectors are wider than 512: at most 16 MiB).
    - .npy: a float32 array of shape (count, dim), plus ``<stem>.ids.txt`` beside it with one id
      per line in the same order (so ids must not contain line breaks).
    - .jsonl: one ``{"id": ..., "embedding": [...]}`` per line.

    ``count`` must match the rows given (it catches a job that would silently drop or repeat
    rows). Nothing appears under the final name unless the whole file was written.
    """
    out = OutputFile.create(path, dim=dim, max_rows=count)
    try:
        ids: list[str] = []
        block = np.empty((_WRITE_BLOCK, dim), dtype="<f4")
        for rid, vector in rows:
            block[len(ids)] = _row_vector(out.path, rid, vector, dim)
            ids.append(rid)
            if len(ids) == _WRITE_BLOCK:
                out.write(ids, block)
                ids = []
        if ids:
            out.write(ids, block[: len(ids)])
        return out.commit(count)
    except BaseException:
        out.abort()
        raise


class OutputFile:
    """An output file written a block of rows at a time, in order, to a hidden temp file beside
    the target: ``commit`` renames it over the target, ``abort`` deletes it. The temp name is
    fixed, so a re-run after a kill overwrites the leftover. Used from one thread at a time."""

    def __init__(
        self, path: Path, dim: int, max_rows: int, metadata: dict[str, Any] | None = None
    ) -> None:
        self.path = path
        self.dim = dim
        self.max_rows = max_rows
        self.metadata = metadata
        self.written = 0
        self._temps: list[tuple[Path, Path]] = []  # (temp, target), renamed in this order
        self._done = False
        # Vector bytes written since the last fdatasync: synced as the file grows, so that
        # commit() waits for the last few MB, not for the whole file (a job's last step).
        self._unsynced = 0

    @staticmethod
    def create(
        path: str | os.PathLike[str],
        *,
        dim: int,
        max_rows: int,
        metadata: dict[str, Any] | None = None,
    ) -> OutputFile:
        """Start writing ``path`` (.parquet, .npy or .jsonl) with at most ``max_rows`` rows
        (the .npy header is sized for it). ``metadata`` (JSON-serializable: the model, the
        input, its fields) goes into a Parquet file's schema metadata under ``togembed``, so
        that ``togembed search`` knows how the vectors were made; the other formats have no
        place for it."""
        path = Path(path)
        suffix = _suffix(path, OUTPUT_SUFFIXES, "output")
        if suffix == ".parquet":
            return _ParquetOutput(path, dim, max_rows, metadata)
        if suffix == ".npy":
            return _NpyOutput(path, dim, max_rows, metadata)
        return _JsonlOutput(path, dim, max_rows, metadata)

    @staticmethod
    def prepare(path: str | os.PathLike[str]) -> None:
        """Check the output type and import what writing it needs (pyarrow: ~0.1 s), before a
        job pays for anything and while nothing else competes for the interpreter."""
        if _suffix(Path(path), OUTPUT_SUFFIXES, "output") == ".parquet":
            _pyarrow()

    def _temp(self, target: Path) -> Path:
        tmp = target.with_name(f".{target.name}.togembed-tmp")
        self._temps.append((tmp, target))
        return tmp

    def write(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Append rows: ``vectors`` is (len(ids), dim)."""
        if vectors.shape != (len(ids), self.dim):
            raise CorpusError(
                f"{len(ids)} ids and vectors of shape {vectors.shape}: expected "
                f"({len(ids)}, {self.dim})",
                path=self.path,
            )
        if self.written + len(ids) > self.max_rows:
            raise CorpusError(f"more than the {self.max_rows} rows announced", path=self.path)
        self._write(ids, vectors)
        self.written += len(ids)
        self._unsynced += vectors.nbytes
        if self._unsynced >= _SYNC_BYTES:
            self._unsynced = 0
            for tmp, _ in self._temps:
                _fsync_file(tmp, data_only=True)

    def commit(self, count: int) -> int:
        """Check that ``count`` rows were written, finish the file, make it durable and move it
        to its name; returns the rows written."""
        try:
            if self.written != count:
                raise CorpusError(
                    f"expected {count} rows, got {self.written}; output not written",
                    path=self.path,
                )
            self._close()
            for tmp, _ in self._temps:
                _fsync_file(tmp)
            # A .npy's sidecar first: once the .npy is in place, its ids are too.
            for tmp, target in reversed(self._temps):
                os.replace(tmp, target)
            _fsync_dir(self.path.parent)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.written

    def abort(self) -> None:
        """Drop the temp files (nothing under the final name changes)."""
        if self._done:
            return
        self._done = True
        with contextlib.suppress(Exception):
            self._close()
        for tmp, _ in self._temps:
            tmp.unlink(missing_ok=True)

    def _write(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class _ParquetOutput(OutputFile):
    """Rows gathered into row groups of ``PARQUET_ROW_GROUP`` (fewer for wide vectors)."""

    def __init__(
        self, path: Path, dim: int, max_rows: int, metadata: dict[str, Any] | None = None
    ) -> None:
        super().__init__(path, dim, max_rows, metadata)
        self._pa, pq = _pyarrow()  # fail before creating anything
        self._schema = self._pa.schema(
            [("id", self._pa.string()), ("embedding", self._pa.list_(self._pa.float32(), dim))],
            metadata=None if metadata is None else {PARQUET_META_KEY: orjson.dumps(metadata)},
        )
        self._group = max(1, min(PARQUET_ROW_GROUP, _PARQUET_ROW_GROUP_BYTES // max(4 * dim, 1)))
        self._ids: list[str] = []
        self._buf = np.empty((self._group, dim), dtype="<f4")
        # No dictionary encoding: unique ids and float vectors gain nothing from it, and it
        # costs time and memory. Vectors are neither compressed nor given min/max statistics:
        # float32 embeddings do not compress (snappy: 0% smaller), and per-element min/max
        # helps no query; both cost CPU (~20% of writing the file).
        self._writer = pq.ParquetWriter(
            self._temp(path),
            self._schema,
            use_dictionary=False,
            compression={"id": "snappy", "embedding": "none"},
            write_statistics=["id"],
        )

    def _write(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        k = 0
        while k < len(ids):
            have = len(self._ids)
            take = min(self._group - have, len(ids) - k)
            self._buf[have : have + take] = vectors[k : k + take]
            self._ids.extend(ids[k : k + take])
            k += take
            if len(self._ids) == self._group:
                self._flush()

    def _flush(self) -> None:
        pa, n = self._pa, len(self._ids)
        flat = pa.array(self._buf[:n].reshape(-1), type=pa.float32())
        table = pa.Table.from_arrays(
            [
                pa.array(self._ids, type=pa.string()),
                pa.FixedSizeListArray.from_arrays(flat, self.dim),
            ],
            schema=self._schema,
        )
        self._writer.write_table(table, row_group_size=self._group)
        self._ids = []

    def _close(self) -> None:
        try:
            if self._ids:
                self._flush()
        finally:
            self._writer.close()


class _NpyOutput(OutputFile):
    """A float32 (rows, dim) array and ``<stem>.ids.txt``. The header is written for
    ``max_rows`` and rewritten, padded to the same length, with the rows actually written.
    (``open_memmap`` would map the whole array into the process, and every page it touches
    counts in RSS: 3 GB for 1M x 768.)"""

    def __init__(
        self, path: Path, dim: int, max_rows: int, metadata: dict[str, Any] | None = None
    ) -> None:
        super().__init__(path, dim, max_rows, metadata)
        self._header_len = len(_npy_header(max_rows, dim))
        self._file = open(self._temp(path), "wb", buffering=1 << 20)  # noqa: SIM115
        self._ids = open(  # noqa: SIM115
            self._temp(npy_ids_path(path)), "w", encoding="utf-8", newline="\n", buffering=1 << 20
        )
        self._file.write(_npy_header(max_rows, dim))

    def _write(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        for rid in ids:
            if "\n" in rid or "\r" in rid:
                raise CorpusError(
                    f"id {rid!r} contains a line break, which the .ids.txt sidecar cannot hold; "
                    "write .parquet or .jsonl instead",
                    path=npy_ids_path(self.path),
                )
        self._file.write(np.ascontiguousarray(vectors, dtype="<f4").data)
        self._ids.write("".join(f"{rid}\n" for rid in ids))

    def _close(self) -> None:
        try:
            if not self._file.closed:
                self._file.seek(0)
                self._file.write(_npy_header(self.written, self.dim, self._header_len))
        finally:
            self._file.close()
            self._ids.close()


def _npy_header(rows: int, dim: int, length: int | None = None) -> bytes:
    """A .npy (format 1.0) header for a float32 (rows, dim) array, padded with spaces to
    ``length`` bytes if given (the format allows any padding before the final newline)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)}
    )
    header = buf.getvalue()
    if length is None or length == len(header):
        return header
    if length < len(header) or length - 10 > 0xFFFF:
        raise ValueError(f"a .npy header of {len(header)} bytes cannot fill {length}")
    body = header[10:-1] + b" " * (length - len(header)) + b"\n"
    return header[:8] + (length - 10).to_bytes(2, "little") + body


class _JsonlOutput(OutputFile):
    """One ``{"id": ..., "embedding": [...]}`` per line."""

    def __init__(
        self, path: Path, dim: int, max_rows: int, metadata: dict[str, Any] | None = None
    ) -> None:
        super().__init__(path, dim, max_rows, metadata)
        self._file = open(self._temp(path), "wb", buffering=1 << 20)  # noqa: SIM115

    def _write(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        option = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._file.write(
            b"".join(
                orjson.dumps({"id": rid, "embedding": vectors[k]}, option=option)
                for k, rid in enumerate(ids)
            )
        )

    def _close(self) -> None:
        self._file.close()


def _fsync_file(path: Path, *, data_only: bool = False) -> None:
    """Data on disk before the rename, so a power loss cannot leave an empty file in place.
    (Any descriptor of a file syncs all of its data the kernel has.)"""
    fd = os.open(path, os.O_RDONLY)
    try:
        if data_only and hasattr(os, "fdatasync"):
            os.fdatasync(fd)
        else:
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


def _row_vector(path: Path, rid: str, vector: np.ndarray, dim: int) -> np.ndarray:
    vec = np.asarray(vector, dtype="<f4")
    if vec.shape != (dim,):
        raise CorpusError(f"id {rid!r}: vector shape {vec.shape}, expected ({dim},)", path=path)
    return vec
