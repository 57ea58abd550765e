"""The job store (resume, atomic batches under SIGKILL, meta checks, failures, duplicate ids,
dedup) and the cross-run vector cache."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from togembed.jobs import ids as _ids
from togembed.jobs import vectorfile as _vectorfile
from togembed.jobs import vectors as _vectors
from togembed.jobs.cache import VectorCache, cache_key
from togembed.jobs.ids import DuplicateIdError
from togembed.jobs.jobfile import JobLockedError, JobMismatchError, job_path, vectors_path
from togembed.jobs.reconcile import Reconciled
from togembed.jobs.store import JobCounts, JobStore
from togembed.jobs.textindex import text_hash
from togembed.jobs.writers import write_output


def stored_hashes(store: JobStore) -> dict[bytes, list[int]]:
    """Text hash -> the positions stored with it, sorted."""
    found: dict[bytes, list[int]] = {}
    for hashes, positions in store.iter_hashes():
        for h, p in zip(hashes, positions, strict=True):
            found.setdefault(h, []).append(p)
    return {h: sorted(p) for h, p in found.items()}


META = {"model": "m1", "options": "float", "input": "/data/c.txt", "size": 10, "mtime": 1.5}
DIM = 4


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return job_path(tmp_path / "out.parquet")


@pytest.fixture
def store(path: Path) -> Iterator[JobStore]:
    with JobStore.open(path, meta=META) as s:
        yield s


def vecs_for(positions: list[int]) -> np.ndarray:
    """A vector that says which position it belongs to."""
    return np.repeat(np.asarray(positions, dtype=np.float32)[:, None], DIM, axis=1)


def record(store: JobStore, positions: list[int]) -> None:
    store.record_batch(
        positions,
        [f"id{p}" for p in positions],
        vecs_for(positions),
        hashes=[text_hash(f"text {p}") for p in positions],
    )


def test_job_path_is_next_to_the_output(tmp_path: Path) -> None:
    assert job_path(tmp_path / "out.parquet") == tmp_path / "out.parquet.togembed-job.sqlite"


def test_record_reopen_and_resume_from_the_bitmap(path: Path) -> None:
    with JobStore.open(path, meta=META) as s:
        assert s.dim is None
        assert s.counts() == JobCounts(done=0, failed=0, ids=0)
        assert s.done_bitmap().tolist() == []
        record(s, [0, 1, 2])
        record(s, [5, 6])
        assert s.dim == DIM
    with JobStore.open(path, meta=META) as s:  # a new run of the same command
        assert s.dim == DIM
        assert s.done_bitmap().tolist() == [True, True, True, False, False, True, True]
        assert s.done_bitmap(9).tolist()[7:] == [False, False]
        assert s.counts() == JobCounts(done=5, failed=0, ids=0)
        record(s, [3, 4])
        assert s.done_bitmap().all()


def test_iter_rows_streams_in_position_order(store: JobStore) -> None:
    record(store, [4, 5, 6, 7])
    record(store, [0, 1, 2, 3])
    record(store, [8])
    rows = list(store.iter_rows())
    assert [rid for rid, _ in rows] == [f"id{p}" for p in range(9)]
    for p, (_, vec) in enumerate(rows):
        assert vec.dtype == np.float32
        np.testing.assert_array_equal(vec, np.full(DIM, p, dtype=np.float32))


def test_export_from_the_store(store: JobStore, tmp_path: Path) -> None:
    record(store, [2, 3])
    record(store, [0, 1])
    out = tmp_path / "out.parquet"
    write_output(out, store.iter_rows(), dim=DIM, count=store.counts().done)
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == ["id0", "id1", "id2", "id3"]
    assert table.column("embedding").to_pylist()[3] == [3.0] * DIM


def test_rows_are_stored_alike_by_both_insert_paths(store: JobStore) -> None:
    """Text hashes go in one statement (JSON), other hashes row by row: same rows either way,
    numpy positions and any Unicode id included."""
    ids = ["é", "☃ snow", '"quoted"\n', "x" * 300]
    store.record_batch(
        np.arange(4), ids, vecs_for([0, 1, 2, 3]), hashes=[text_hash(i) for i in ids]
    )
    store.record_batch([4, 5], ["short-a", "short-b"], vecs_for([4, 5]), hashes=[b"a", b"bb"])
    rows = list(store.iter_rows())
    assert [rid for rid, _ in rows] == [*ids, "short-a", "short-b"]
    np.testing.assert_array_equal(np.stack([v for _, v in rows]), vecs_for(list(range(6))))
    hashes = stored_hashes(store)
    assert (hashes[text_hash("☃ snow")], hashes[b"bb"], hashes[b"a"]) == ([1], [5], [4])
    with pytest.raises(DuplicateIdError, match="id 'é' appears twice"):
        store.record_batch([6], ["é"], vecs_for([6]), hashes=[text_hash("other")])


def test_a_batch_may_come_in_parts(store: JobStore, path: Path) -> None:
    """Several answered batches recorded together: their arrays are written one after the
    other, not joined first."""
    parts = [vecs_for([0, 1]), vecs_for([2]).astype(np.float64), vecs_for([3, 4, 5])[::2]]
    store.record_batch(
        [0, 1, 2, 3, 5], [f"id{p}" for p in (0, 1, 2, 3, 5)], parts, hashes=[b"h"] * 5
    )
    rows = dict(store.iter_rows())
    assert {k: v[0] for k, v in rows.items()} == {"id0": 0, "id1": 1, "id2": 2, "id3": 3, "id5": 5}
    assert vectors_path(path).stat().st_size == 5 * DIM * 4
    with pytest.raises(ValueError, match="do not match"):  # rows of two widths
        store.record_batch(
            [6, 7], ["a", "b"], [np.zeros((1, DIM)), np.zeros((1, 3))], hashes=[b"x"] * 2
        )
    with pytest.raises(ValueError, match="do not match"):
        store.record_batch([6], ["a"], [np.zeros((1, DIM)), np.zeros((1, DIM))], hashes=[b"x"])
    store.record_batch([6], ["a"], [[6.0] * DIM], hashes=[b"x"])  # a nested list is one array
    assert store.counts().done == 6


@pytest.mark.parametrize("syscall", ["pwritev", "pwrite"])
def test_short_writes_are_continued(
    store: JobStore, monkeypatch: pytest.MonkeyPatch, syscall: str
) -> None:
    """The kernel may write less than asked: the rest follows, in place, with or without
    pwritev (Windows has neither: seek and write)."""
    real = getattr(os, syscall)

    def at_most_40_bytes(fd: int, data: Any, offset: int) -> int:
        if syscall == "pwritev":
            first = memoryview(data[0])[:40]
            return real(fd, [first], offset)
        return real(fd, memoryview(data)[:40], offset)

    if syscall == "pwrite":
        monkeypatch.delattr(os, "pwritev", raising=False)
    monkeypatch.setattr(os, syscall, at_most_40_bytes)
    store.record_batch(
        [0, 1, 2], ["a", "b", "c"], [vecs_for([0, 1]), vecs_for([2])], hashes=[b"h"] * 3
    )
    monkeypatch.undo()
    assert [v.tolist() for _, v in store.iter_rows()] == [[float(p)] * DIM for p in range(3)]


def test_batch_shape_and_dimension_are_checked(store: JobStore) -> None:
    with pytest.raises(ValueError, match="do not match"):
        store.record_batch([0, 1], ["a"], np.zeros((2, DIM)), hashes=[b"x", b"y"])
    record(store, [0])
    with pytest.raises(ValueError, match=f"dimension 3, the job has {DIM}"):
        store.record_batch([1], ["b"], np.zeros((1, 3)), hashes=[b"x"])


def test_meta_mismatch_names_the_field_and_the_way_out(path: Path) -> None:
    with JobStore.open(path, meta=META) as s:
        record(s, [0])
    with pytest.raises(JobMismatchError, match="model='m1', but this run has model='m2'") as info:
        JobStore.open(path, meta={**META, "model": "m2"})
    assert info.value.field == "model"
    assert "--restart" in str(info.value)
    with pytest.raises(JobMismatchError, match=r"mtime=1\.5, but this run has mtime=2\.0"):
        JobStore.open(path, meta={**META, "mtime": 2.0})
    with pytest.raises(JobMismatchError, match=r"id_field=\(not set\), but this run has"):
        JobStore.open(path, meta={**META, "id_field": "id"})
    # Equal after a JSON round trip is equal: the job resumes.
    with JobStore.open(path, meta={**META, "options": "float"}) as s:
        assert s.counts().done == 1


def test_delete_starts_over(path: Path) -> None:
    with JobStore.open(path, meta=META) as s:
        record(s, [0])
    assert vectors_path(path).exists()
    JobStore.delete(path)
    assert not path.exists()
    assert not vectors_path(path).exists()
    with JobStore.open(path, meta={**META, "model": "m2"}) as s:
        assert s.counts().done == 0


def test_a_job_is_opened_once_at_a_time(path: Path) -> None:
    with (
        JobStore.open(path, meta=META),
        pytest.raises(JobLockedError, match="in use by another togembed process"),
    ):
        JobStore.open(path, meta=META)
    with JobStore.open(path, meta=META):  # released on close
        pass


def test_store_may_be_opened_in_one_thread_and_used_in_another(store: JobStore) -> None:
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            record(store, [0, 1])
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join()
    assert errors == []
    assert store.counts().done == 2


def test_failures_add_replace_clear(store: JobStore) -> None:
    store.record_failures([(7, "id7", "too long"), (2, "id2", "rejected")])
    store.record_failures([(7, "id7", "still too long")])
    assert store.failed_positions() == {2, 7}
    assert list(store.iter_failures()) == [(2, "id2", "rejected"), (7, "id7", "still too long")]
    assert store.counts() == JobCounts(done=0, failed=2, ids=0)
    record(store, [2])  # a retry that succeeds removes the failure
    assert store.failed_positions() == {7}
    store.record_failures([(8, "id8", "x"), (9, "id9", "y")])
    assert store.clear_failures([7, 8, 100]) == 2
    assert store.failed_positions() == {9}
    assert store.clear_failures() == 1
    assert store.failed_positions() == set()


def test_register_ids_detects_duplicates_before_anything_is_paid(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_ids, "_REGISTER_CHUNK", 3)
    ids = ["a", "b", "c", "d", "e", "b", "f"]  # "b" at positions 1 and 5, in other chunks
    with pytest.raises(
        DuplicateIdError, match="id 'b' appears twice in the input, at records 2 and 6"
    ):
        store.register_ids(enumerate(ids))
    assert store.ids_total is None
    assert store.counts().ids == 3  # the chunks before the bad one


def test_register_ids_duplicate_within_one_chunk(store: JobStore) -> None:
    with pytest.raises(DuplicateIdError) as info:
        store.register_ids(enumerate(["x", "y", "x"]))
    assert info.value.id == "x"
    assert info.value.positions == (0, 2)
    assert store.counts().ids == 0  # the chunk is one transaction


def test_register_ids_resumes_and_counts(
    path: Path, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_ids, "_REGISTER_CHUNK", 2)
    ids = [f"r{i}" for i in range(7)]

    def killed_after_four() -> Iterator[tuple[int, str]]:
        yield from list(enumerate(ids))[:4]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.register_ids(killed_after_four())
    assert store.counts().ids == 4
    assert store.ids_total is None
    assert store.register_ids(enumerate(ids)) == 7
    assert store.ids_total == 7
    assert store.counts().ids == 7
    with pytest.raises(ValueError, match="positions 0, 1, 2"):
        store.register_ids([(0, "r0"), (2, "r2")])


def test_ids_that_cannot_repeat_are_only_counted(store: JobStore) -> None:
    assert store.ids_total is None
    store.register_count(5)
    assert store.ids_total == 5
    assert store.counts().ids == 0


def test_record_batch_with_a_duplicate_id_records_nothing(store: JobStore) -> None:
    record(store, [0, 1])
    with pytest.raises(DuplicateIdError, match=r"id 'id1' appears twice.*records 2 and 4"):
        store.record_batch([2, 3], ["id2", "id1"], vecs_for([2, 3]), hashes=[b"h2", b"h3"])
    assert store.done_bitmap().tolist() == [True, True]  # not even position 2
    with pytest.raises(ValueError, match="position 1 is recorded twice"):
        store.record_batch([1], ["other"], vecs_for([1]), hashes=[b"h"])
    with pytest.raises(ValueError, match="position 5 is recorded twice"):
        store.record_batch([5, 5], ["p", "q"], vecs_for([5, 5]), hashes=[b"h", b"i"])
    assert store.counts().done == 2


def test_dedup_hashes_and_copy(store: JobStore) -> None:
    record(store, [0, 1, 2])
    assert stored_hashes(store) == {text_hash(f"text {p}"): [p] for p in range(3)}
    store.record_failures([(10, "dup-a", "old failure")])
    store.record_duplicates([(10, "dup-a", 1), (11, "dup-b", 2)])
    rows = dict(store.iter_rows())
    np.testing.assert_array_equal(rows["dup-a"], rows["id1"])
    np.testing.assert_array_equal(rows["dup-b"], rows["id2"])
    assert store.failed_positions() == set()
    # The copies carry their source's hash.
    hashes = stored_hashes(store)
    assert hashes[text_hash("text 1")] == [1, 10] and hashes[text_hash("text 2")] == [2, 11]


def test_record_duplicates_needs_a_stored_source(store: JobStore) -> None:
    record(store, [0])
    with pytest.raises(ValueError, match=r"source positions not stored: \[7\]"):
        store.record_duplicates([(5, "a", 0), (6, "b", 7)])
    assert store.counts().done == 1  # all or nothing


def test_iter_hashes_in_chunks(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_vectors, "_HASH_CHUNK", 500)
    positions = list(range(1200))
    record(store, positions)
    chunks = list(store.iter_hashes())
    assert [len(h) for h, _ in chunks] == [500, 500, 200]
    found = {h: p for hashes, pos in chunks for h, p in zip(hashes, pos, strict=True)}
    assert found == {text_hash(f"text {p}"): p for p in positions}


def test_text_hash() -> None:
    assert len(text_hash("a")) == 16
    assert text_hash("a") == text_hash("a") != text_hash("b")
    assert len(text_hash("\ud800 lone surrogate")) == 16


# -- a job that stored nothing, a changed input ----------------------------------------------


def test_a_job_that_stored_nothing_starts_afresh_with_new_settings(path: Path) -> None:
    """Only ids registered (the pre-pass stopped on a bad record, say): nothing was paid, so a
    run with other settings simply starts again, instead of being refused."""
    with JobStore.open(path, meta=META) as s:
        s.register_ids(enumerate(["a", "b"]))
        s.register_count(2)
    vectors_path(path).write_bytes(b"\x01" * 40)  # a killed first write, never committed
    new = {**META, "mtime": 9.5, "model": "m2"}
    with JobStore.open(path, meta=new, restart_if_unpaid=True) as s:
        assert s.changed == {}
        assert s.counts() == JobCounts(done=0, failed=0, ids=0)
        assert s.ids_total is None and s.dim is None
        assert vectors_path(path).stat().st_size == 0
        record(s, [0])
    with JobStore.open(path, meta=new) as s:  # the job is now the new settings' job
        assert s.counts().done == 1
    # Once something is stored, the same change is refused, with what the job holds.
    with pytest.raises(JobMismatchError, match=r"model='m2', but this run has model='m1'") as info:
        JobStore.open(path, meta=META, restart_if_unpaid=True)
    assert "the job holds 1 vector)" in str(info.value)


def test_a_failure_alone_counts_as_stored_work(path: Path) -> None:
    with JobStore.open(path, meta=META) as s:
        s.record_failures([(0, "id0", "too long", text_hash("text 0"))])
    with pytest.raises(JobMismatchError, match="1 failed input"):
        JobStore.open(path, meta={**META, "model": "m2"}, restart_if_unpaid=True)


def hashed(ids: list[str], texts: list[str], block: int = 2) -> list[tuple[int, list[str], list]]:
    """``reconcile``'s input: (first position, ids, text hashes) in blocks of ``block``."""
    return [
        (k, ids[k : k + block], [text_hash(t) for t in texts[k : k + block]])
        for k in range(0, len(ids), block)
    ]


def old_job(path: Path) -> None:
    """Five records id0..id4 with texts "text 0".."text 4": 0, 1, 2 and 4 embedded (vectors
    saying their position), 3 failed; and a copy of text 1 under id "copy" at position 5."""
    with JobStore.open(path, meta=META) as s:
        s.register_ids(enumerate(["id0", "id1", "id2", "id3", "id4", "copy"]))
        record(s, [0, 1, 2, 4])
        s.record_failures([(3, "id3", "rejected", text_hash("text 3"))])
        s.record_duplicates([(5, "copy", 1)])


def test_a_changed_input_is_reconciled_by_id_and_text(path: Path) -> None:
    old_job(path)
    new_meta = {**META, "mtime": 2.5, "size": 12}
    with JobStore.open(path, meta=new_meta, changeable=("mtime", "size")) as s:
        assert s.changed == {"mtime": (1.5, 2.5), "size": (10, 12)}
        # Reordered; id1's text edited; id2 gone; id0's text under a new id too; a new record;
        # id3 still fails (same text); "copy" still a copy.
        ids = ["id4", "id0", "id1", "id3", "renamed", "copy", "new"]
        texts = ["text 4", "text 0", "text 1 edited", "text 3", "text 0", "text 1", "brand new"]
        result = s.reconcile(hashed(ids, texts), keep_ids=True)
        assert result == Reconciled(total=7, kept=4, failed=1, gone=1)
        assert result.to_embed == 2  # the edited text and the new one
        assert s.changed == {}
        assert s.ids_total == 7
        assert s.counts() == JobCounts(done=4, failed=1, ids=7)
        assert s.done_bitmap(7).tolist() == [True, True, False, False, True, True, False]
        assert list(s.iter_failures()) == [(3, "id3", "rejected")]
        # Each kept record points at the vector of its text, paid for once.
        rows = {rid: v[0] for rid, v in s.iter_rows()}
        assert rows == {"id4": 4.0, "id0": 0.0, "renamed": 0.0, "copy": 1.0}
        assert vectors_path(path).stat().st_size == 4 * DIM * 4  # no byte rewritten
        # The rest is embedded as usual, at the new positions.
        s.record_batch([2], ["id1"], vecs_for([9]), hashes=[text_hash("text 1 edited")])
        assert [rid for rid, _ in s.iter_rows()] == ["id4", "id0", "id1", "renamed", "copy"]
    with JobStore.open(path, meta=new_meta) as s:  # the job now belongs to the new input
        assert s.counts().done == 5
    with pytest.raises(JobMismatchError, match="mtime"):
        JobStore.open(path, meta=META)


def test_a_failure_of_a_changed_text_is_forgotten(path: Path) -> None:
    old_job(path)
    with JobStore.open(path, meta={**META, "mtime": 3.0}, changeable=("mtime",)) as s:
        ids = ["id0", "id1", "id2", "id3", "id4", "copy"]
        texts = ["text 0", "text 1", "text 2", "text 3 fixed", "text 4", "text 1"]
        assert s.reconcile(hashed(ids, texts, 4), keep_ids=True) == Reconciled(6, 5, 0, 0)
        assert s.failed_positions() == set()  # sent again: the user fixed it


def test_failures_without_a_text_hash_are_retried_after_a_change(path: Path) -> None:
    with JobStore.open(path, meta=META) as s:
        record(s, [0])
        s.record_failures([(1, "id1", "rejected")])  # no hash: an older job, say
    with JobStore.open(path, meta={**META, "mtime": 3.0}, changeable=("mtime",)) as s:
        result = s.reconcile(hashed(["id0", "id1"], ["text 0", "text 1"]), keep_ids=False)
        assert result == Reconciled(total=2, kept=1, failed=0, gone=0)
        assert s.counts() == JobCounts(done=1, failed=0, ids=0)  # line numbers: no ids kept


@pytest.mark.parametrize("block", [3, 4], ids=["across-blocks", "within-a-block"])
def test_reconcile_with_a_duplicate_id_changes_nothing(path: Path, block: int) -> None:
    old_job(path)
    changed = {**META, "mtime": 2.0}
    with JobStore.open(path, meta=changed, changeable=("mtime",)) as s:
        ids = ["id0", "id1", "x", "id0"]
        with pytest.raises(DuplicateIdError, match=r"id 'id0' appears twice.*records 1 and 4"):
            s.reconcile(hashed(ids, ["text 0", "text 1", "y", "z"], block), keep_ids=True)
        assert s.changed  # still to do
        assert s.counts() == JobCounts(done=5, failed=1, ids=6)
        assert s.ids_total == 6
    with JobStore.open(path, meta=META) as s:  # still the old job
        assert s.counts() == JobCounts(done=5, failed=1, ids=6)


def test_a_setting_not_changeable_is_still_refused(path: Path) -> None:
    old_job(path)
    with pytest.raises(JobMismatchError, match="model='m1', but this run has model='m2'"):
        JobStore.open(path, meta={**META, "model": "m2", "mtime": 2.0}, changeable=("mtime",))


def test_failures_of_a_format_3_file_get_their_hash_column(path: Path) -> None:
    """Job files of this format made before failures kept a text hash: the column is added in
    place, the failures there are kept, new ones get their hash."""
    with JobStore.open(path, meta=META) as s:
        record(s, [0])
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE old_failures (pos INTEGER PRIMARY KEY, id TEXT NOT NULL, reason TEXT NOT NULL);
        INSERT INTO old_failures VALUES (1, 'id1', 'rejected');
        DROP TABLE failures;
        ALTER TABLE old_failures RENAME TO failures;
        """
    )
    conn.close()
    with JobStore.open(path, meta=META) as s:
        assert list(s.iter_failures()) == [(1, "id1", "rejected")]
        s.record_failures([(2, "id2", "too long", text_hash("text 2"))])
    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT pos, hash FROM failures ORDER BY pos").fetchall()
    conn.close()
    assert rows == [(1, None), (2, text_hash("text 2"))]


RECONCILE_CHILD = textwrap.dedent(
    """
    import sys
    from togembed.jobs.store import JobStore
    from togembed.jobs.textindex import text_hash

    store = JobStore.open(sys.argv[1], meta={"model": "m", "v": 2}, changeable=("v",))
    point = sys.argv[2]
    # A small page cache: the transaction's changes spill into the WAL before its commit, so
    # the kill leaves uncommitted frames on disk for the next open to ignore.
    store._conn.execute("PRAGMA cache_size = 8")

    def wait_for_the_kill():
        print(point, flush=True)
        sys.stdin.readline()

    def trace(statement):
        # After the old rows are deleted and the new ones inserted, before the commit.
        if point == "swap" and statement.startswith("INSERT INTO failures"):
            wait_for_the_kill()

    store._conn.set_trace_callback(trace)

    def record(p):  # 500 new records, then the old job's 3000 (moved), then new ones
        if 500 <= p < 3500:
            return f"id{p - 500}", f"t{p - 500}"
        return f"new{p}", f"new text {p}"

    def blocks():
        for start in range(0, 200_000, 1000):
            if point == "staging" and start == 100_000:
                wait_for_the_kill()
            ids, texts = zip(*map(record, range(start, start + 1000)))
            yield start, list(ids), [text_hash(t) for t in texts]

    store.reconcile(blocks(), keep_ids=True)
    print("done", flush=True)
    """
)


@pytest.mark.parametrize("point", ["staging", "swap"])
def test_sigkill_during_reconcile_leaves_the_job_as_it_was(tmp_path: Path, point: str) -> None:
    """Killed halfway through a reconciliation (reading the new input; or with the job's rows
    already replaced in the WAL, uncommitted): the next run finds the old job intact, and
    reconciles it again."""
    path = tmp_path / "job.sqlite"
    wal = Path(f"{path}-wal")
    with JobStore.open(path, meta={"model": "m", "v": 1}) as s:
        s.register_ids((p, f"id{p}") for p in range(3000))
        for start in range(0, 3000, 500):
            positions = list(range(start, start + 500))
            s.record_batch(
                positions,
                [f"id{p}" for p in positions],
                vecs_for(positions),
                hashes=[text_hash(f"t{p}") for p in positions],
            )
        s.record_failures([(3000, "gone", "x", text_hash("gone"))])
    size = vectors_path(path).stat().st_size
    child = subprocess.Popen(
        [sys.executable, "-c", RECONCILE_CHILD, str(path), point],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdin is not None
    try:
        assert child.stdout.readline() == f"{point}\n"
        if point == "swap":  # the new rows are on disk, in frames no commit covers
            assert wal.stat().st_size > 10 * 4096
        child.kill()
        child.wait()
    finally:
        child.stdout.close()
        child.stdin.close()
    with JobStore.open(path, meta={"model": "m", "v": 1}) as s:  # the old job, intact
        assert s.counts() == JobCounts(done=3000, failed=1, ids=3000)
        assert s.ids_total == 3000
        assert vectors_path(path).stat().st_size == size
        assert s.done_bitmap().tolist() == [True] * 3000  # at their old positions
        rows = list(s.iter_rows())
        assert [rid for rid, _ in rows] == [f"id{p}" for p in range(3000)]
        np.testing.assert_array_equal(np.stack([v for _, v in rows]), vecs_for(list(range(3000))))
    rerun = subprocess.run(
        [sys.executable, "-c", RECONCILE_CHILD, str(path), point],
        input="\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rerun.stdout.splitlines() == [point, "done"], rerun.stderr
    with JobStore.open(path, meta={"model": "m", "v": 2}) as s:
        assert s.counts() == JobCounts(done=3000, failed=0, ids=200_000)
        done = s.done_bitmap(200_000)
        assert done[500:3500].all() and done.sum() == 3000
        rows = list(s.iter_rows())
        assert [rid for rid, _ in rows] == [f"id{p}" for p in range(3000)]
        np.testing.assert_array_equal(np.stack([v for _, v in rows]), vecs_for(list(range(3000))))


# -- the vectors file ---------------------------------------------------------------------------


def committed_rows(s: JobStore) -> int:
    return s._vec_rows()


def test_vectors_live_in_a_file_beside_the_job_file(path: Path) -> None:
    assert vectors_path(path) == path.with_name("out.parquet.togembed-job.vectors")
    assert vectors_path("some/job.db") == Path("some/job.db.vectors")
    with JobStore.open(path, meta=META) as s:
        assert vectors_path(path).stat().st_size == 0
        record(s, [3, 4])
        record(s, [0])
        s.record_duplicates([(7, "copy", 3)])  # no bytes: it points at row 0
        assert committed_rows(s) == 3
    raw = np.fromfile(vectors_path(path), dtype="<f4").reshape(-1, DIM)
    np.testing.assert_array_equal(raw, vecs_for([3, 4, 0]))  # in the order recorded


def test_garbage_past_the_committed_end_is_cut_off_on_reopen(path: Path) -> None:
    with JobStore.open(path, meta=META) as s:
        record(s, [0, 1])
    committed = 2 * DIM * 4
    # What a kill between a batch's write and its commit leaves: bytes nothing refers to
    # (here a row and a half).
    with open(vectors_path(path), "ab") as f:
        f.write(np.full(DIM + DIM // 2, 99.0, dtype="<f4").tobytes())
    assert vectors_path(path).stat().st_size > committed
    with JobStore.open(path, meta=META) as s:
        assert vectors_path(path).stat().st_size == committed
        record(s, [2])  # lands at the committed end, where the garbage was
        assert vectors_path(path).stat().st_size == committed + DIM * 4
        rows = list(s.iter_rows())
    assert [rid for rid, _ in rows] == ["id0", "id1", "id2"]
    np.testing.assert_array_equal(np.stack([v for _, v in rows]), vecs_for([0, 1, 2]))


def test_garbage_before_the_first_commit_is_cut_off(path: Path) -> None:
    with JobStore.open(path, meta=META):
        pass
    vectors_path(path).write_bytes(b"\x07" * 1000)  # dim not even known yet
    with JobStore.open(path, meta=META) as s:
        assert vectors_path(path).stat().st_size == 0
        record(s, [0])
        assert [v.tolist() for _, v in s.iter_rows()] == [[0.0] * DIM]


def test_a_batch_whose_commit_does_not_happen_is_never_referred_to(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bytes are written, then the commit is interrupted (as by Ctrl-C in the fsync):
    the rows are absent, and the next batch goes where the lost one's bytes went."""
    with JobStore.open(path, meta=META) as s:
        record(s, [0])

        def interrupted(fd: int) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(_vectorfile, "datasync", interrupted)
        with pytest.raises(KeyboardInterrupt):
            record(s, [1, 2, 3])
        monkeypatch.undo()
        assert s.done_bitmap().tolist() == [True]
        assert committed_rows(s) == 1
        assert vectors_path(path).stat().st_size == 4 * DIM * 4  # written, not committed
        record(s, [5])
        assert dict((rid, v[0]) for rid, v in s.iter_rows()) == {"id0": 0.0, "id5": 5.0}
    with JobStore.open(path, meta=META) as s:
        assert vectors_path(path).stat().st_size == 2 * DIM * 4
        assert s.counts().done == 2


def test_a_failed_batch_writes_nothing(path: Path) -> None:
    with JobStore.open(path, meta=META) as s:
        record(s, [0])
        with pytest.raises(ValueError, match="recorded twice"):
            record(s, [1, 0])
        assert vectors_path(path).stat().st_size == DIM * 4


def test_vectors_lost_from_the_file_are_forgotten_and_embedded_again(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A power loss under synchronous=NORMAL can keep commits whose bytes never reached the
    disk: those rows (and the duplicates pointing at them) are dropped, the rest is kept."""
    with JobStore.open(path, meta=META, synchronous="NORMAL") as s:
        record(s, [0, 1])
        record(s, [2, 3])
        s.record_duplicates([(4, "copy-of-3", 3), (5, "copy-of-0", 0)])
    with open(vectors_path(path), "r+b") as f:
        f.truncate(3 * DIM * 4 + 5)  # row 3 (position 3) lost, and a part of no row
    with JobStore.open(path, meta=META) as s:
        assert "holds 3 of the 4 vectors" in caplog.text
        assert "2 inputs will be embedded again" in caplog.text
        assert s.done_bitmap().tolist() == [True, True, True, False, False, True]
        assert vectors_path(path).stat().st_size == 3 * DIM * 4
        record(s, [3])
        s.record_duplicates([(4, "copy-of-3", 3)])
        rows = {rid: v[0] for rid, v in s.iter_rows()}
    assert rows == {"id0": 0, "id1": 1, "id2": 2, "id3": 3, "copy-of-3": 3, "copy-of-0": 0}


def test_a_job_of_the_old_format_asks_for_restart(path: Path) -> None:
    """Format 1 kept the vectors in SQLite: refused with the way out, nothing touched."""
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE ids (pos INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE);
        CREATE TABLE vectors (pos INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,
                              hash BLOB NOT NULL, vector BLOB NOT NULL);
        CREATE TABLE failures (pos INTEGER PRIMARY KEY, id TEXT NOT NULL, reason TEXT NOT NULL);
        """
    )
    conn.execute("INSERT INTO meta VALUES ('schema', '1'), ('job', ?)", (json.dumps(META),))
    conn.commit()
    conn.close()
    with pytest.raises(JobMismatchError, match=r"job format 1, this one reads 3.*--restart"):
        JobStore.open(path, meta=META)
    assert not vectors_path(path).exists()
    JobStore.delete(path)  # what --restart does
    with JobStore.open(path, meta=META) as s:
        record(s, [0])
        assert s.counts().done == 1


def test_iter_rows_reads_in_bounded_chunks(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows in another order than positions, duplicates pointing back, several chunks: every
    vector right, and no allocation near the size of all vectors."""
    monkeypatch.setattr(_vectors, "_READ_BYTES", 64 * DIM * 4)  # 64 rows per chunk
    n, batch = 6000, 50
    starts = list(range(0, n, batch))
    for start in starts[1::2] + starts[0::2]:  # odd batches first: rows out of position order
        record(store, list(range(start, start + batch)))
    store.record_duplicates([(n + k, f"dup{k}", (k * 7919) % n) for k in range(500)])
    tracemalloc.start()
    try:
        seen = 0
        for rid, vec in store.iter_rows():
            assert not vec.flags.writeable
            want = int(rid[2:]) if rid.startswith("id") else (int(rid[3:]) * 7919) % n
            assert vec.tolist() == [float(want)] * DIM, rid
            seen += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == n + 500
    assert peak < (n + 500) * DIM * 4 / 4  # all vectors: ~104 KB; a chunk: 1 KB


# -- SIGKILL in the middle of recording ----------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from togembed.jobs.store import JobStore
    from togembed.jobs.textindex import text_hash

    B, D, DUP = 1024, 384, 1 << 22
    store = JobStore.open(sys.argv[1], meta={"model": "m"}, synchronous=sys.argv[2])
    done = store.done_bitmap()
    started = False
    for start in range(0, DUP, B):
        if start < len(done) and done[start]:
            continue
        pos = np.arange(start, start + B)
        # Every row different and not all zeros: a row read from the wrong place, torn, or
        # never written shows.
        vecs = (pos[:, None] * D + np.arange(1, D + 1)[None, :]).astype(np.float32)
        store.record_batch(
            pos.tolist(),
            [f"id{p}" for p in pos],
            vecs,
            hashes=[text_hash(f"t{p}") for p in pos],
        )
        if start % (3 * B) == 0:
            store.record_failures([(10_000_000 + start, f"f{start}", "reason")])
        if start % (4 * B) == B:  # copies of every 8th row of this batch
            store.record_duplicates([(DUP + p, f"dup{p}", p) for p in pos[::8].tolist()])
        if not started:
            print("recording", flush=True)
            started = True
    """
)


def expected(positions: np.ndarray, dim: int) -> np.ndarray:
    """The child's vectors of these positions."""
    return (positions[:, None] * dim + np.arange(1, dim + 1)[None, :]).astype(np.float32)


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_sigkill_never_leaves_a_partial_batch(tmp_path: Path, synchronous: str) -> None:
    """Kill a process appending 1.5 MB batches as fast as it can, at a few instants: every
    batch is fully stored or absent, every stored row reads back its own vector, and the
    vectors file is cut back to exactly what the committed rows refer to."""
    path = tmp_path / "job.sqlite"
    batch, dim, dup = 1024, 384, 1 << 22
    row_bytes = 4 * dim
    previous = 0
    for delay in (0.05, 0.3, 0.15, 0.1, 0.2):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), synchronous],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        assert child.stdout.readline() == "recording\n"
        with pytest.raises(JobLockedError):  # another process cannot join a running job
            JobStore.open(path, meta={"model": "m"})
        time.sleep(delay)
        child.kill()  # SIGKILL: no cleanup, no rollback, possibly mid-write or mid-commit
        child.wait()
        child.stdout.close()

        with JobStore.open(path, meta={"model": "m"}) as s:
            done = s.done_bitmap()
            counts = s.counts()
            main, copies = done[:dup], done[dup:]
            # Every batch is fully stored or absent, and the count agrees.
            assert len(main) % batch == 0
            blocks = main.reshape(-1, batch)
            assert (blocks.all(axis=1) | ~blocks.any(axis=1)).all()
            assert counts.done == int(done.sum())
            assert counts.done > previous  # each run resumed and made progress
            previous = counts.done
            # Copies: a whole record_duplicates call or nothing, and only of stored rows.
            for start in range(batch, len(main), 4 * batch):
                group = copies[start : start + batch : 8]
                assert group.all() or not group.any()
                assert not group.any() or main[start]
            # The file holds exactly the stored batches' rows: no garbage left, none missing.
            assert vectors_path(path).stat().st_size == int(main.sum()) * row_bytes
            rows = list(s.iter_rows())
            assert len(rows) == counts.done
            for k in range(0, len(rows), 4096):
                part = rows[k : k + 4096]
                p = np.asarray([int(rid[3:] if rid[0] == "d" else rid[2:]) for rid, _ in part])
                np.testing.assert_array_equal(np.stack([v for _, v in part]), expected(p, dim))
            assert stored_hashes(s)[text_hash("t0")] == [0]


# -- the cache ----------------------------------------------------------------------------------


def test_cache_key_separates_model_options_and_text() -> None:
    key = cache_key("m", "float", "hello")
    assert len(key) == 16
    assert key == cache_key("m", "float", "hello")
    assert key != cache_key("m2", "float", "hello")
    assert key != cache_key("m", "base64", "hello")
    assert key != cache_key("m", "float", "hello!")
    assert cache_key("ab", "c", "") != cache_key("a", "bc", "")  # no ambiguous joins


def test_cache_across_two_connections(tmp_path: Path) -> None:
    cache_path = tmp_path / "deep" / "dir" / "cache.sqlite"
    k1, k2, k3 = (cache_key("m", "float", t) for t in ("a", "b", "c"))
    with VectorCache.open(cache_path) as first, VectorCache.open(cache_path) as second:
        first.put_many([(k1, np.ones(3)), (k2, np.arange(3, dtype=np.float64))])
        got = second.get_many([k1, k2, k3, k1])
        assert set(got) == {k1, k2}
        assert got[k2].dtype == np.float32
        np.testing.assert_array_equal(got[k2], [0.0, 1.0, 2.0])
        second.put_many([(k2, np.full(3, 9.0)), (k3, np.zeros(3))])  # k2 kept as it was
        np.testing.assert_array_equal(first.get_many([k2])[k2], [0.0, 1.0, 2.0])
        assert set(first.get_many([k3])) == {k3}
    with VectorCache.open(cache_path) as again:
        assert len(again.get_many([k1, k2, k3])) == 3


def test_cache_concurrent_writers(tmp_path: Path) -> None:
    cache_path = tmp_path / "cache.sqlite"
    VectorCache.open(cache_path).close()
    errors: list[BaseException] = []

    def writer(worker: int) -> None:
        try:
            with VectorCache.open(cache_path) as cache:
                for round_ in range(20):
                    items = [
                        (cache_key("m", "", f"{worker}-{round_}-{i}"), np.full(8, float(i)))
                        for i in range(50)
                    ]
                    cache.put_many(items)
                    assert len(cache.get_many([k for k, _ in items])) == 50
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with VectorCache.open(cache_path) as cache:
        keys = [
            cache_key("m", "", f"{w}-{r}-{i}") for w in range(4) for r in range(20) for i in (0, 49)
        ]
        assert len(cache.get_many(keys)) == len(keys)


def test_invalid_synchronous(path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        JobStore.open(path, meta=META, synchronous="OFF")  # type: ignore[arg-type]
