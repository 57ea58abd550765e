"""Reading a corpus file: the records of a .txt, .jsonl, .csv or .parquet input, streamed.
Memory is bounded by one line, row or row group, never by the file.

Positions (``Record.pos``) count records from 0 and are where each vector lands in the output.
Default ids are 1-based and point back into the file: the line number for .txt and .jsonl, the
line a record starts on for .csv (the header is line 1), the row number for .parquet.

An input whose records have an ``id`` field (the CSV header, the Parquet schema, the first JSONL
record) has its ids there: ``detect_id_field`` finds it, so that a corpus with ids needs no
``--id-field``.

Nothing here remembers ids across records (that would be O(N) memory): the job store detects an
id used twice, on disk.

May import: the standard library, attrs, orjson, pyarrow (on demand); ``filetypes``.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

import attrs
import orjson

from .filetypes import INPUT_SUFFIXES, CorpusError, check_suffix, pyarrow

__all__ = [
    "DEFAULT_ID_FIELD",
    "Record",
    "RecordBlock",
    "count_records",
    "default_ids",
    "detect_id_field",
    "read_blocks",
    "read_records",
    "scan_records",
]

_PARQUET_READ_BATCH = 4096
_BLOCK = 1024  # records read at a time
_COUNT_CHUNK = 1 << 20
# csv refuses fields over 128 KiB by default; a document can be longer than that.
_CSV_FIELD_LIMIT = 2**31 - 1
_BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark
DEFAULT_ID_FIELD = "id"  # the field an input's ids are taken from without --id-field


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


def read_records(
    path: str | os.PathLike[str], *, id_field: str | None = None, text_field: str = "text"
) -> Iterator[Record]:
    """Stream the records of a corpus file, chosen by suffix; raises ``CorpusError`` with the
    line (or row) of the first bad record."""
    path = Path(path)
    suffix = check_suffix(path, INPUT_SUFFIXES, "input")
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
    suffix = check_suffix(path, INPUT_SUFFIXES, "input")
    if suffix == ".parquet":
        _, pq = pyarrow()
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
    suffix = check_suffix(path, INPUT_SUFFIXES, "input")
    if suffix == ".txt":
        return None
    if suffix == ".parquet":
        _, pq = pyarrow()
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
    if check_suffix(path, INPUT_SUFFIXES, "input") != ".txt" or id_field is not None:
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
    if check_suffix(path, INPUT_SUFFIXES, "input") == ".txt" and id_field is None:
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
    pa, pq = pyarrow()
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
