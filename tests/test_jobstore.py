"""The job store (resume, atomic batches under SIGKILL, meta checks, failures, duplicate ids,
dedup) and the cross-run vector cache."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from togembed import _jobstore
from togembed._corpus import write_output
from togembed._jobstore import (
    DuplicateIdError,
    JobCounts,
    JobLockedError,
    JobMismatchError,
    JobStore,
    VectorCache,
    cache_key,
    job_path,
    text_hash,
)

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
    JobStore.delete(path)
    assert not path.exists()
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
    monkeypatch.setattr(_jobstore, "_REGISTER_CHUNK", 3)
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
    monkeypatch.setattr(_jobstore, "_REGISTER_CHUNK", 2)
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


def test_dedup_lookup_and_copy(store: JobStore) -> None:
    record(store, [0, 1, 2])
    wanted = [
        text_hash("text 1"),
        text_hash("never seen"),
        text_hash("text 1"),
        text_hash("text 2"),
    ]
    assert store.lookup_texts(wanted) == {text_hash("text 1"): 1, text_hash("text 2"): 2}
    store.record_failures([(10, "dup-a", "old failure")])
    store.record_duplicates([(10, "dup-a", 1), (11, "dup-b", 2)])
    rows = dict(store.iter_rows())
    np.testing.assert_array_equal(rows["dup-a"], rows["id1"])
    np.testing.assert_array_equal(rows["dup-b"], rows["id2"])
    assert store.failed_positions() == set()
    # The copies carry the hash too: still one answer per text.
    assert store.lookup_texts([text_hash("text 1")]) == {text_hash("text 1"): 1}


def test_record_duplicates_needs_a_stored_source(store: JobStore) -> None:
    record(store, [0])
    with pytest.raises(ValueError, match=r"source positions not stored: \[7\]"):
        store.record_duplicates([(5, "a", 0), (6, "b", 7)])
    assert store.counts().done == 1  # all or nothing


def test_lookup_many_hashes(store: JobStore) -> None:
    positions = list(range(1200))  # more than one IN (...) chunk
    record(store, positions)
    found = store.lookup_texts([text_hash(f"text {p}") for p in positions])
    assert len(found) == 1200
    assert found[text_hash("text 1199")] == 1199


def test_text_hash() -> None:
    assert len(text_hash("a")) == 16
    assert text_hash("a") == text_hash("a") != text_hash("b")
    assert len(text_hash("\ud800 lone surrogate")) == 16


# -- SIGKILL in the middle of recording ----------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from togembed._jobstore import JobStore, text_hash

    B, D = 64, 16
    store = JobStore.open(sys.argv[1], meta={"model": "m"})
    done = store.done_bitmap()
    started = False
    for start in range(0, 10_000_000, B):
        if start < len(done) and done[start]:
            continue
        pos = list(range(start, start + B))
        vecs = np.repeat(np.asarray(pos, dtype=np.float32)[:, None], D, axis=1)
        store.record_batch(
            pos, [f"id{p}" for p in pos], vecs, hashes=[text_hash(f"t{p}") for p in pos]
        )
        if start % (3 * B) == 0:
            store.record_failures([(10_000_000 + start, f"f{start}", "reason")])
        if not started:
            print("recording", flush=True)
            started = True
    """
)


def test_sigkill_never_leaves_a_partial_batch(tmp_path: Path) -> None:
    path = tmp_path / "job.sqlite"
    batch, dim = 64, 16
    previous = 0
    for delay in (0.05, 0.2, 0.1):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None
        assert child.stdout.readline() == "recording\n"
        with pytest.raises(JobLockedError):  # another process cannot join a running job
            JobStore.open(path, meta={"model": "m"})
        time.sleep(delay)
        child.kill()  # SIGKILL: no cleanup, no rollback, possibly mid-commit
        child.wait()
        child.stdout.close()

        with JobStore.open(path, meta={"model": "m"}) as s:
            done = s.done_bitmap()
            counts = s.counts()
            # Every batch is fully stored or absent, and the count agrees.
            blocks = done[: len(done) // batch * batch].reshape(-1, batch)
            assert len(done) % batch == 0
            assert (blocks.all(axis=1) | ~blocks.any(axis=1)).all()
            assert counts.done == int(done.sum())
            assert counts.done > previous  # each run resumed and made progress
            previous = counts.done
            n = 0
            for rid, vec in s.iter_rows():
                p = int(rid[2:])
                np.testing.assert_array_equal(vec, np.full(dim, p, dtype=np.float32))
                n += 1
            assert n == counts.done
            assert s.lookup_texts([text_hash("t0")]) == {text_hash("t0"): 0}


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
