"""Corpus readers and output writers: formats, field rules, errors with line numbers, atomic
writes."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from togembed.core.errors import TogembedError
from togembed.jobs import readers as _readers
from togembed.jobs import writers as _writers
from togembed.jobs.filetypes import CorpusError, MissingDependencyError
from togembed.jobs.readers import (
    Record,
    count_records,
    default_ids,
    detect_id_field,
    read_blocks,
    read_records,
    scan_records,
)
from togembed.jobs.writers import OutputFile, npy_ids_path, write_output


def write(path: Path, data: str | bytes) -> Path:
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def records(path: Path, **kwargs: str | None) -> list[tuple[int, str, str]]:
    return [(r.pos, r.id, r.text) for r in read_records(path, **kwargs)]  # type: ignore[arg-type]


# -- .txt ---------------------------------------------------------------------------------------


def test_txt_every_line_is_a_record_including_empty_ones(tmp_path: Path) -> None:
    path = write(tmp_path / "c.txt", "alpha\n\nbeta\r\n  \ngamma")
    assert records(path) == [
        (0, "1", "alpha"),
        (1, "2", ""),
        (2, "3", "beta"),
        (3, "4", "  "),
        (4, "5", "gamma"),
    ]
    assert count_records(path) == 5


def test_txt_final_newline_ends_the_last_line_and_odd_separators_stay_in_text(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "c.txt", "\ufeffa\rb\u2028c\nd\n")
    assert records(path) == [(0, "1", "a\rb\u2028c"), (1, "2", "d")]
    assert count_records(path) == 2


def test_txt_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.txt", "")
    assert records(path) == []
    assert count_records(path) == 0


def test_txt_bad_utf8_names_the_line_and_is_raised_lazily(tmp_path: Path) -> None:
    path = write(tmp_path / "c.txt", b"one\ntwo\nbad \xff byte\nfour\n")
    it = read_records(path)
    assert next(it) == Record(0, "1", "one")  # streaming: earlier lines come out first
    assert next(it) == Record(1, "2", "two")
    with pytest.raises(CorpusError, match=r"c\.txt, line 3: not valid UTF-8") as info:
        next(it)
    assert info.value.line == 3
    assert info.value.path == str(path)
    assert isinstance(info.value, TogembedError)


@pytest.mark.parametrize("size", [1, 2, 3, 1024])
@pytest.mark.parametrize(
    "data",
    [
        b"\xef\xbb\xbfbom\r\nthen\n",
        b"a\r\n\r\nb\rc\n\nlast\r",  # a lone "\r" stays; so does one ending the file
        "u\u2028v\x85w\nend".encode(),  # Unicode separators are not line ends
        b"\n\n\n",
        b"no newline",
    ],
)
def test_txt_blocks_split_lines_like_the_line_reader(
    tmp_path: Path, data: bytes, size: int
) -> None:
    path = write(tmp_path / "c.txt", data)
    expected = [(n - 1, str(n), line) for n, line in _readers._numbered_lines(path)]
    got = [
        (b.start + k, b.ids[k], text)
        for b in read_blocks(path, size=size)
        for k, text in enumerate(b.texts)
    ]
    assert got == expected
    assert records(path) == expected


def test_txt_blocks_bad_utf8_yield_the_lines_before_it(tmp_path: Path) -> None:
    path = write(tmp_path / "c.txt", b"one\ntwo\nbad \xff\nfour\n")
    blocks = read_blocks(path, size=10)
    assert next(blocks).texts == ["one", "two"]
    with pytest.raises(CorpusError, match="line 3: not valid UTF-8"):
        next(blocks)


def test_blocks_of_other_formats_group_records(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", "".join(f'{{"text": "t{i}"}}\n' for i in range(5)))
    blocks = list(read_blocks(path, size=2))
    assert [(b.start, b.ids, b.texts) for b in blocks] == [
        (0, ["1", "2"], ["t0", "t1"]),
        (2, ["3", "4"], ["t2", "t3"]),
        (4, ["5"], ["t4"]),
    ]


@pytest.mark.parametrize(
    "data", [b"a\nb\n", b"a\nb", b"", b"\xef\xbb\xbfbom\r\n\n", "caf\u00e9\n\u2603".encode()]
)
def test_scan_counts_txt_records_like_the_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: bytes
) -> None:
    monkeypatch.setattr(_readers, "_COUNT_CHUNK", 3)  # multi-byte characters across chunks
    path = write(tmp_path / "c.txt", data)
    assert scan_records(path) == len(records(path))


@pytest.mark.parametrize(
    ("data", "line"), [(b"ok\nfine\nbad \xff\nok\n", 3), (b"ok\ncut \xe2\x98", 2)]
)
def test_scan_names_the_bad_txt_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: bytes, line: int
) -> None:
    monkeypatch.setattr(_readers, "_COUNT_CHUNK", 4)
    path = write(tmp_path / "c.txt", data)
    with pytest.raises(CorpusError, match=f"line {line}: not valid UTF-8"):
        scan_records(path)


def test_scan_reads_other_formats_record_by_record(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", '{"text": "a"}\n\n{"text": "b"}\n')
    assert scan_records(path) == 2
    write(path, '{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(CorpusError, match="line 2"):
        scan_records(path)


def test_txt_has_no_id_field(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="no fields"):
        read_records(write(tmp_path / "c.txt", "a\n"), id_field="id")


# -- .jsonl -------------------------------------------------------------------------------------


def test_jsonl_fields_and_default_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", '{"text": "a"}\n\n{"text": "b", "x": 1}\n')
    # A blank line is not a record: positions stay dense, default ids are line numbers.
    assert records(path) == [(0, "1", "a"), (1, "3", "b")]
    path = write(
        tmp_path / "d.jsonl",
        '{"doc": "x1", "body": "first"}\n{"doc": 42, "body": "second"}\n',
    )
    assert records(path, id_field="doc", text_field="body") == [
        (0, "x1", "first"),
        (1, "42", "second"),  # integer ids are written in decimal
    ]
    assert count_records(path) == 2


@pytest.mark.parametrize(
    ("line", "kwargs", "message"),
    [
        ("{not json", {}, "invalid JSON"),
        ('["a"]', {}, "expected a JSON object, got list"),
        ('{"body": "a"}', {}, "no text field 'text'"),
        ('{"text": 3}', {}, "text field 'text' must be a string, not int"),
        ('{"text": null}', {}, "text field 'text' is null"),
        ('{"text": "a"}', {"id_field": "id"}, "no id field 'id'"),
        ('{"text": "a", "id": 1.5}', {"id_field": "id"}, "must be a string or an integer"),
        ('{"text": "a", "id": true}', {"id_field": "id"}, "not bool"),
        ('{"text": "a", "id": null}', {"id_field": "id"}, "id field 'id' is null"),
    ],
)
def test_jsonl_errors_name_the_line(
    tmp_path: Path, line: str, kwargs: dict[str, str], message: str
) -> None:
    good = '{"text": "ok", "id": "x"}\n'
    path = write(tmp_path / "c.jsonl", good + "\n" + line + "\n" + good)
    with pytest.raises(CorpusError, match=r"c\.jsonl, line 3: ") as info:
        list(read_records(path, **kwargs))
    assert message in str(info.value)
    assert info.value.line == 3


# -- .csv ---------------------------------------------------------------------------------------


def test_csv_header_fields_quoted_newlines_and_default_ids(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.csv",
        '\ufefftext,id\nhello,a\n"multi\nline, with comma",b\n\n"say ""hi""",c\n',
    )
    # Default id: the line a record starts on (the header is line 1).
    assert records(path) == [
        (0, "2", "hello"),
        (1, "3", "multi\nline, with comma"),
        (2, "6", 'say "hi"'),
    ]
    assert records(path, id_field="id") == [
        (0, "a", "hello"),
        (1, "b", "multi\nline, with comma"),
        (2, "c", 'say "hi"'),
    ]
    assert count_records(path) == 5  # an upper bound: lines minus the header


def test_csv_long_fields_are_read(tmp_path: Path) -> None:
    long_text = "x" * 300_000  # over csv's default 128 KiB field limit
    path = write(tmp_path / "c.csv", f"text\n{long_text}\n")
    assert records(path) == [(0, "2", long_text)]


def test_csv_missing_column_and_short_row(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "body,id\nx,1\n")
    with pytest.raises(
        CorpusError, match=r"line 1: no column 'text' in the header \(columns: body"
    ):
        list(read_records(path))
    path = write(tmp_path / "d.csv", "id,text\n1,a\n2\n")
    with pytest.raises(CorpusError, match=r"d\.csv, line 3: row has 1 fields, the header has 2"):
        list(read_records(path, id_field="id"))


def test_csv_bad_utf8_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", b"text\nok\nok\n\xff\xfe\n")
    with pytest.raises(CorpusError, match=r"line 4: not valid UTF-8"):
        list(read_records(path))


def test_csv_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "")
    assert records(path) == []
    assert count_records(path) == 0


# -- .parquet -----------------------------------------------------------------------------------


def test_parquet_streams_across_row_groups(tmp_path: Path) -> None:
    n = 10_000
    table = pa.table({"text": [f"t{i}" for i in range(n)], "key": list(range(100, 100 + n))})
    path = tmp_path / "c.parquet"
    pq.write_table(table, path, row_group_size=3000)
    got = list(read_records(path, id_field="key"))
    assert [r.pos for r in got] == list(range(n))
    assert got[0] == Record(0, "100", "t0")
    assert got[-1] == Record(n - 1, str(100 + n - 1), f"t{n - 1}")
    assert records(path)[:2] == [(0, "1", "t0"), (1, "2", "t1")]  # default ids: row numbers
    assert count_records(path) == n


def test_parquet_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["a", None], "n": [1.0, 2.0]}), path)
    with pytest.raises(CorpusError, match=r"c\.parquet, row 2: text field 'text' is null") as info:
        list(read_records(path))
    assert info.value.line == 2
    with pytest.raises(CorpusError, match="no column 'body'"):
        list(read_records(path, text_field="body"))
    with pytest.raises(CorpusError, match="column 'n' must be a string or integer column"):
        list(read_records(path, id_field="n"))
    with pytest.raises(CorpusError, match="column 'n' must be a string column"):
        list(read_records(path, text_field="n"))


def test_parquet_without_pyarrow_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'togembed\[parquet\]'"):
        list(read_records(tmp_path / "c.parquet"))
    with pytest.raises(MissingDependencyError):
        write_output(tmp_path / "o.parquet", [], dim=2, count=0)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_suffixes(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"unsupported input file type '\.xml'"):
        read_records(tmp_path / "c.xml")
    with pytest.raises(CorpusError, match=r"unsupported output file type '\.csv'"):
        write_output(tmp_path / "o.csv", [], dim=2, count=0)


def test_a_broken_parquet_input_is_a_corpus_error(tmp_path: Path) -> None:
    path = write(tmp_path / "c.parquet", b"not parquet at all")
    with pytest.raises(CorpusError, match=r"c\.parquet: not a readable Parquet file"):
        list(read_records(path))
    with pytest.raises(CorpusError, match="not a readable Parquet file"):
        detect_id_field(path)


# -- the id field, found in the input -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "found"),
    [
        ("c.jsonl", '{"id": "a", "text": "x"}\n{"text": "y"}\n', "id"),
        ("c.jsonl", '\n\n{"text": "x", "id": 3}\n', "id"),  # blank lines are not records
        ("c.jsonl", '{"text": "x"}\n{"id": "b", "text": "y"}\n', None),  # the first decides
        ("c.jsonl", '{"text": "x", "ID": 1}\n', None),  # names are case-sensitive
        ("c.jsonl", "{broken\n", None),  # left for the reader to report, with its line
        ("c.jsonl", '["id"]\n', None),
        ("c.jsonl", "", None),
        ("c.csv", "\ufefftext,id\nx,1\n", "id"),  # after a byte order mark
        ("c.csv", "text,doc_id\nx,1\n", None),
        ("c.csv", "", None),
        ("c.csv", b"text,\xff\n", None),
        ("c.txt", '{"id": 1}\n', None),  # a .txt has no fields
    ],
)
def test_detect_id_field_reads_the_header_or_the_first_record(
    tmp_path: Path, name: str, data: str | bytes, found: str | None
) -> None:
    assert detect_id_field(write(tmp_path / name, data)) == found


def test_detect_id_field_of_parquet_reads_the_schema(tmp_path: Path) -> None:
    with_ids, without = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": ["x"], "id": [7]}), with_ids)
    pq.write_table(pa.table({"text": ["x"], "key": ["k"]}), without)
    assert detect_id_field(with_ids) == "id"
    assert detect_id_field(without) is None
    assert (default_ids(with_ids), default_ids(tmp_path / "c.csv")) == (
        "row numbers",
        "line numbers",
    )


# -- writers ------------------------------------------------------------------------------------


def sample(n: int, dim: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(n)
    return [f"id-{i}" for i in range(n)], rng.standard_normal((n, dim), dtype=np.float32)


def test_parquet_output_round_trip(tmp_path: Path) -> None:
    ids, vecs = sample(20_000, 4)
    path = tmp_path / "out.parquet"
    assert write_output(path, zip(ids, vecs, strict=True), dim=4, count=len(ids)) == len(ids)
    pf = pq.ParquetFile(path)
    assert pf.schema_arrow.field("id").type == pa.string()
    assert pf.schema_arrow.field("embedding").type == pa.list_(pa.float32(), 4)
    assert [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)] == [
        8192,
        8192,
        20_000 - 2 * 8192,
    ]
    id_chunk, vector_chunk = (pf.metadata.row_group(0).column(i) for i in range(2))
    assert (id_chunk.compression, id_chunk.is_stats_set) == ("SNAPPY", True)
    assert (vector_chunk.compression, vector_chunk.is_stats_set) == ("UNCOMPRESSED", False)
    table = pq.read_table(path)
    assert table.column("id").to_pylist() == ids
    flat = table.column("embedding").combine_chunks().flatten().to_numpy()
    np.testing.assert_array_equal(flat.reshape(-1, 4), vecs)
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]  # no temp left behind


def test_parquet_output_wide_vectors_use_smaller_row_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_writers, "_PARQUET_ROW_GROUP_BYTES", 64 * 4 * 100)
    ids, vecs = sample(250, 64)
    path = tmp_path / "out.parquet"
    write_output(path, zip(ids, vecs, strict=True), dim=64, count=250)
    pf = pq.ParquetFile(path)
    assert [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)] == [100, 100, 50]


def test_npy_output_and_ids_sidecar(tmp_path: Path) -> None:
    ids, vecs = sample(1000, 8)
    path = tmp_path / "vectors.npy"
    write_output(path, zip(ids, vecs, strict=True), dim=8, count=1000)
    loaded = np.load(path)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, vecs)
    assert npy_ids_path(path) == tmp_path / "vectors.ids.txt"
    assert npy_ids_path(path).read_text(encoding="utf-8").splitlines() == ids
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectors.ids.txt", "vectors.npy"]


def test_npy_output_refuses_ids_with_line_breaks(tmp_path: Path) -> None:
    rows = [("a", np.zeros(2)), ("b\nc", np.zeros(2))]
    with pytest.raises(CorpusError, match="line break"):
        write_output(tmp_path / "v.npy", rows, dim=2, count=2)
    assert list(tmp_path.iterdir()) == []


def test_jsonl_output_round_trip(tmp_path: Path) -> None:
    ids, vecs = sample(50, 5)
    path = tmp_path / "out.jsonl"
    write_output(path, zip(ids, vecs, strict=True), dim=5, count=50)
    lines = path.read_bytes().splitlines()
    assert len(lines) == 50
    for rid, vec, line in zip(ids, vecs, lines, strict=True):
        obj = orjson.loads(line)
        assert obj["id"] == rid
        np.testing.assert_array_equal(np.array(obj["embedding"], dtype=np.float32), vec)


@pytest.mark.parametrize("suffix", [".parquet", ".npy", ".jsonl"])
def test_output_file_written_in_blocks_with_fewer_rows_than_announced(
    tmp_path: Path, suffix: str
) -> None:
    ids, vecs = sample(1001, 3)
    path = tmp_path / f"out{suffix}"
    out = OutputFile.create(path, dim=3, max_rows=100_000)  # e.g. a job whose inputs failed
    for start in range(0, 1001, 300):
        out.write(ids[start : start + 300], vecs[start : start + 300])
    assert list(tmp_path.iterdir()) != [] and not path.exists()  # only the temp so far
    assert out.commit(1001) == 1001
    if suffix == ".parquet":
        table = pq.read_table(path)
        assert table.column("id").to_pylist() == ids
        got = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, 3)
    elif suffix == ".npy":
        got = np.load(path)  # the header was rewritten for 1001 rows, same length
        assert npy_ids_path(path).read_text(encoding="utf-8").splitlines() == ids
    else:
        lines = path.read_bytes().splitlines()
        assert [orjson.loads(line)["id"] for line in lines] == ids
        got = np.array([orjson.loads(line)["embedding"] for line in lines], dtype=np.float32)
    np.testing.assert_array_equal(got, vecs)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("suffix", [".parquet", ".npy", ".jsonl"])
def test_output_file_abort_leaves_the_previous_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"out{suffix}"
    path.write_bytes(b"previous")
    out = OutputFile.create(path, dim=2, max_rows=10)
    out.write(["a"], np.ones((1, 2), dtype=np.float32))
    with pytest.raises(CorpusError, match="more than the 10 rows"):
        out.write([str(i) for i in range(10)], np.ones((10, 2), dtype=np.float32))
    with pytest.raises(CorpusError, match=r"shape \(2, 3\)"):
        out.write(["a", "b"], np.ones((2, 3), dtype=np.float32))
    out.abort()
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("suffix", [".parquet", ".npy", ".jsonl"])
def test_empty_output(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"out{suffix}"
    assert write_output(path, [], dim=3, count=0) == 0
    assert path.exists()
    if suffix == ".npy":
        assert np.load(path).shape == (0, 3)


@pytest.mark.parametrize("suffix", [".parquet", ".npy", ".jsonl"])
def test_empty_output_of_unknown_dimension(tmp_path: Path, suffix: str) -> None:
    """No vector at all (every input failed): dimension 0, the right layout still."""
    path = tmp_path / f"out{suffix}"
    out = OutputFile.create(path, dim=0, max_rows=0)
    assert out.commit(0) == 0
    if suffix == ".parquet":
        table = pq.read_table(path)
        assert table.column_names == ["id", "embedding"]
        assert table.schema.field("embedding").type == pa.list_(pa.float32(), 0)
        assert len(table) == 0
    elif suffix == ".npy":
        array = np.load(path)
        assert (array.shape, array.dtype) == ((0, 0), np.float32)
        assert npy_ids_path(path).read_bytes() == b""
    else:
        assert path.read_bytes() == b""


def test_parquet_output_says_how_it_was_made(tmp_path: Path) -> None:
    path = tmp_path / "out.parquet"
    made = {"model": "m", "input": "/x/in.jsonl", "id_field": None, "text_field": "text"}
    out = OutputFile.create(path, dim=2, max_rows=1, metadata=made)
    out.write(["a"], np.ones((1, 2), np.float32))
    out.commit(1)
    meta = pq.ParquetFile(path).schema_arrow.metadata
    assert orjson.loads(meta[b"togembed"]) == made
    assert pq.read_table(path).column("id").to_pylist() == ["a"]


@pytest.mark.parametrize("suffix", [".parquet", ".npy", ".jsonl"])
def test_failed_export_keeps_the_previous_file_and_leaves_no_temp(
    tmp_path: Path, suffix: str
) -> None:
    path = tmp_path / f"out{suffix}"
    path.write_bytes(b"previous")
    if suffix == ".npy":
        npy_ids_path(path).write_text("previous ids\n")
    before = sorted(p.name for p in tmp_path.iterdir())

    def rows() -> Iterator[tuple[str, np.ndarray]]:
        yield "a", np.ones(3)
        raise KeyboardInterrupt  # Ctrl-C in the middle of the export

    with pytest.raises(KeyboardInterrupt):
        write_output(path, rows(), dim=3, count=2)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("suffix", [".parquet", ".npy", ".jsonl"])
@pytest.mark.parametrize("given", [1, 3])
def test_row_count_must_match(tmp_path: Path, suffix: str, given: int) -> None:
    rows = [(str(i), np.zeros(2)) for i in range(given)]
    with pytest.raises(CorpusError, match="rows"):
        write_output(tmp_path / f"out{suffix}", rows, dim=2, count=2)
    assert list(tmp_path.iterdir()) == []


def test_vector_shape_is_checked(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"id 'a': vector shape \(3,\), expected \(2,\)"):
        write_output(tmp_path / "out.jsonl", [("a", np.zeros(3))], dim=2, count=1)
    assert list(tmp_path.iterdir()) == []


def test_leftover_temp_of_a_killed_export_is_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    leftover = tmp_path / ".out.jsonl.togembed-tmp"
    leftover.write_bytes(b"half a file from a killed export")
    write_output(path, [("a", np.ones(2))], dim=2, count=1)
    assert orjson.loads(path.read_bytes()) == {"id": "a", "embedding": [1.0, 1.0]}
    assert not leftover.exists()
