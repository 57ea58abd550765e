"""The corpus job's read-ahead (blocks read, hashed and looked up before their texts are sent):
duplicates are still sent once, within a block, across blocks and across runs, and a stopped
job leaves no reader task or lookup behind; the output written while the job runs. In process,
against an in-process fake server."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
from helpers import MakeServer

from togembed import AsyncClient
from togembed.jobs import job as _job
from togembed.jobs import output as _joboutput
from togembed.jobs.filetypes import CorpusError
from togembed.jobs.job import JobOptions, JobProgress, run_job
from togembed.jobs.jobfile import job_path
from togembed.jobs.store import JobStore
from togembed.jobs.storewriter import StoreWriter
from togembed.jobs.writers import npy_ids_path
from togembed.testing import fake_embeddings

DIM = 16


def job_tasks() -> list[str]:
    """The job's own tasks still alive (the server's connection handlers live in this loop)."""
    names = (t.get_coro().__qualname__ for t in asyncio.all_tasks())  # type: ignore[union-attr]
    return [n for n in names if n.startswith(("_Job.", "Sender.", "StoreWriter.", "read_ahead"))]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many blocks, for a corpus a test can afford."""
    monkeypatch.setattr(_job, "_READ_BLOCK", 40)


async def test_duplicates_across_blocks_and_runs_are_sent_once(
    tmp_path: Path, make_server: MakeServer
) -> None:
    rng = np.random.default_rng(3)
    unique = [f"text number {k}" for k in range(120)]
    texts = [unique[k] for k in rng.integers(0, len(unique), 1500)]
    src = tmp_path / "in.txt"
    src.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    out = tmp_path / "out.npy"
    server = await make_server()
    async with AsyncClient(base_url=server.base_url, batch_size=8, concurrency=4) as client:
        first = await run_job(client, JobOptions(input=src, output=out, model="m", max_tokens=150))
        assert first.status == "budget"
        assert not job_tasks()  # the reader task is gone
        sent = server.stats.inputs
        assert 0 < sent < len(set(texts))
        # The rerun finds the first run's texts in the store (lookups), the rest as before.
        second = await run_job(client, JobOptions(input=src, output=out, model="m"))
        assert second.status == "complete"
        assert not job_tasks()
    assert server.stats.inputs == len(set(texts))  # every distinct text once, over both runs
    assert first.progress.deduplicated + second.progress.deduplicated > 0
    assert second.progress.done_before == (first.progress.embedded + first.progress.deduplicated)
    np.testing.assert_array_equal(np.load(out), fake_embeddings(texts, DIM))
    ids = npy_ids_path(out).read_text(encoding="utf-8").splitlines()
    assert ids == [str(k) for k in range(1, len(texts) + 1)]


async def test_a_job_stopped_at_once_leaves_nothing_running(
    tmp_path: Path, make_server: MakeServer
) -> None:
    src = tmp_path / "in.txt"
    src.write_text("".join(f"text {k}\n" for k in range(500)), encoding="utf-8")
    out = tmp_path / "out.npy"
    server = await make_server()
    stop = asyncio.Event()
    stop.set()  # Ctrl-C before the first text: the reader has read ahead, nothing is sent
    async with AsyncClient(base_url=server.base_url, batch_size=8) as client:
        result = await run_job(client, JobOptions(input=src, output=out, model="m"), stop=stop)
    assert result.status == "interrupted"
    assert server.stats.inputs == 0
    assert not job_tasks()


def job_threads() -> list[str]:
    """togembed's threads still alive, but the cached local model's pool (it lives with the
    process by design), so that the test does not depend on whether that ran first."""
    return [
        t.name
        for t in threading.enumerate()
        if t.name.startswith("togembed-") and not t.name.startswith("togembed-local-model")
    ]


@pytest.mark.parametrize("suffix", [".parquet", ".npy", ".jsonl"])
async def test_output_is_written_during_the_job_and_appears_only_when_complete(
    tmp_path: Path, make_server: MakeServer, suffix: str
) -> None:
    texts = [f"text {k}" for k in range(600)]
    src = tmp_path / "in.txt"
    src.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    out = tmp_path / f"out{suffix}"
    temp = tmp_path / f".out{suffix}.togembed-tmp"
    seen_temp: list[bool] = []

    def progress(p: JobProgress) -> None:
        if 0 < p.embedded < len(texts):
            seen_temp.append(temp.exists())
            assert not out.exists()

    server = await make_server()
    async with AsyncClient(base_url=server.base_url, batch_size=20, concurrency=2) as client:
        first = await run_job(
            client,
            JobOptions(input=src, output=out, model="m", max_tokens=400),
            on_progress=progress,
        )
        assert first.status == "budget" and first.output is None
        assert not out.exists() and not temp.exists()  # the partial output is dropped
        assert not job_threads()
        second = await run_job(
            client, JobOptions(input=src, output=out, model="m"), on_progress=progress
        )
    assert second.status == "complete" and second.output == out
    assert any(seen_temp)  # rows went to the temp file before the job ended
    assert not temp.exists() and not job_threads()
    expected = fake_embeddings(texts, DIM)
    if suffix == ".parquet":
        table = pq.read_table(out)
        assert table.column("id").to_pylist() == [str(k) for k in range(1, 601)]
        got = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, DIM)
    elif suffix == ".npy":
        got = np.load(out)
    else:
        got = np.array(
            [orjson.loads(line)["embedding"] for line in out.read_bytes().splitlines()],
            dtype=np.float32,
        )
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("memory", [0, 32 << 20])
async def test_output_rows_come_from_memory_or_from_the_store(
    tmp_path: Path, make_server: MakeServer, monkeypatch: pytest.MonkeyPatch, memory: int
) -> None:
    """Answers go to the output from memory; when the output is behind (no memory left for
    it), they are read back from the store once committed. Same file either way."""
    monkeypatch.setattr(_joboutput, "_OUTPUT_MEMORY", memory)
    reads: list[tuple[int, int]] = []
    rows_between = JobStore.rows_between

    def spy(self: JobStore, start: int, stop: int) -> tuple[list[str], np.ndarray]:
        reads.append((start, stop))
        return rows_between(self, start, stop)

    monkeypatch.setattr(JobStore, "rows_between", spy)
    texts = [f"text {k}" for k in range(300)] + ["text 7"]  # one copy, read from the store
    src = tmp_path / "in.txt"
    src.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    out = tmp_path / "out.npy"
    server = await make_server()
    async with AsyncClient(base_url=server.base_url, batch_size=16) as client:
        result = await run_job(client, JobOptions(input=src, output=out, model="m"))
    assert result.status == "complete"
    np.testing.assert_array_equal(np.load(out), fake_embeddings(texts, DIM))
    read = sum(stop - start for start, stop in reads)
    if memory:
        assert read <= 1  # only the copy at position 300
    else:
        assert read == len(texts)


async def test_paid_but_unrecorded_inputs_never_exceed_concurrency_x_batch(
    tmp_path: Path, make_server: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a kill at any instant can lose: inputs the server has seen minus rows committed.
    With commits slower than the server, answers would pile up uncommitted; the job sends a
    batch only when that stays within concurrency x batch size."""
    conc, batch = 3, 10
    committed = 0
    write_groups = StoreWriter._write_groups

    def slow_commit(self: StoreWriter, groups: list[Any]) -> None:
        nonlocal committed
        time.sleep(0.03)
        write_groups(self, groups)
        committed += sum(len(g[0]) for g in groups)

    monkeypatch.setattr(StoreWriter, "_write_groups", slow_commit)
    texts = [f"text {k}" for k in range(400)]
    src = tmp_path / "in.txt"
    src.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    server = await make_server()
    gaps: list[int] = []

    async def watch() -> None:
        while True:
            gaps.append(server.stats.inputs - committed)
            await asyncio.sleep(0.001)

    watcher = asyncio.ensure_future(watch())
    try:
        async with AsyncClient(
            base_url=server.base_url, batch_size=batch, concurrency=conc
        ) as client:
            opts = JobOptions(input=src, output=tmp_path / "o.npy", model="m")
            result = await run_job(client, opts)
    finally:
        watcher.cancel()
    assert result.status == "complete"
    assert server.stats.inputs == len(texts)
    assert max(gaps) <= conc * batch
    assert max(gaps) > batch  # the bound was reached: the test can fail


async def test_a_failed_commit_stops_the_job_instead_of_stalling_it(
    tmp_path: Path, make_server: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job waits for commits before it sends more: a commit that fails must end the job
    with its error, not leave it waiting for room that never comes."""
    calls = 0
    record_batch = JobStore.record_batch

    def failing(self: JobStore, *args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(28, "No space left on device")
        record_batch(self, *args, **kwargs)

    monkeypatch.setattr(JobStore, "record_batch", failing)
    src = tmp_path / "in.txt"
    src.write_text("".join(f"text {k}\n" for k in range(500)), encoding="utf-8")
    out = tmp_path / "o.parquet"
    server = await make_server(latency=0.005)
    async with AsyncClient(base_url=server.base_url, batch_size=10, concurrency=2) as client:
        with pytest.raises(OSError, match="No space left") as info:
            await asyncio.wait_for(
                run_job(client, JobOptions(input=src, output=out, model="m")), timeout=20
            )
    assert info.value.errno == 28  # ended by the error, not by wait_for's TimeoutError
    assert not job_tasks() and not job_threads()
    assert not out.exists() and not (tmp_path / ".o.parquet.togembed-tmp").exists()


# -- a changed input, an input that stops the job, an empty one --------------------------------


def write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps({"id": i, "text": t}) + b"\n" for i, t in rows))
    return path


def read_npy(out: Path) -> tuple[list[str], np.ndarray]:
    return npy_ids_path(out).read_text(encoding="utf-8").splitlines(), np.load(out)


def bump_mtime(path: Path) -> None:
    """What ``touch`` does: same bytes, a later modification time (set, not waited for)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


async def test_a_changed_input_sends_only_its_new_and_changed_texts(
    tmp_path: Path, make_server: MakeServer
) -> None:
    rows = [(f"d{k}", f"text {k}") for k in range(200)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.npy"
    opts = JobOptions(input=src, output=out, model="m", id_field="id")
    server = await make_server()
    async with AsyncClient(base_url=server.base_url, batch_size=16) as client:
        assert (await run_job(client, opts)).status == "complete"
        assert server.stats.inputs == 200
        # Reordered, d7 edited, d3 removed, two records added (one with a known text).
        changed = rows[100:] + rows[:100]
        changed[changed.index(("d7", "text 7"))] = ("d7", "text 7, edited")
        changed.remove(("d3", "text 3"))
        changed += [("n1", "a new text"), ("n2", "text 150")]
        write_jsonl(src, changed)
        again = await run_job(client, opts)
    assert again.status == "complete" and again.rows == len(changed)
    assert server.stats.inputs == 200 + 2  # the edited text and the new one
    assert again.progress.reconciled is not None
    assert again.progress.reconciled.kept == len(changed) - 2
    assert again.progress.reconciled.gone == 1
    assert "input_mtime_ns" in again.progress.changes
    ids, vectors = read_npy(out)
    assert ids == [i for i, _ in changed]
    np.testing.assert_array_equal(vectors, fake_embeddings([t for _, t in changed], DIM))


async def test_a_touched_input_continues_where_it_stopped(
    tmp_path: Path, make_server: MakeServer
) -> None:
    texts = [f"text {k}" for k in range(300)]
    src = tmp_path / "in.txt"
    src.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    out = tmp_path / "out.parquet"
    server = await make_server()
    async with AsyncClient(base_url=server.base_url, batch_size=10, concurrency=2) as client:
        first = await run_job(client, JobOptions(input=src, output=out, model="m", max_tokens=200))
        assert first.status == "budget"
        sent = server.stats.inputs
        bump_mtime(src)
        second = await run_job(client, JobOptions(input=src, output=out, model="m"))
        assert second.status == "complete"
        assert server.stats.inputs == len(texts)  # the rest, nothing twice
        assert second.progress.reconciled is not None
        assert second.progress.reconciled.kept == first.progress.embedded == sent
        bump_mtime(src)  # a finished job, touched: nothing to send
        third = await run_job(client, JobOptions(input=src, output=out, model="m"))
    assert third.status == "complete" and server.stats.inputs == len(texts)
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == [str(k) for k in range(1, 301)]


async def test_another_id_field_keeps_the_vectors(tmp_path: Path, make_server: MakeServer) -> None:
    rows = [(f"d{k}", f"text {k}") for k in range(50)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.npy"
    server = await make_server()
    async with AsyncClient(base_url=server.base_url) as client:
        await run_job(client, JobOptions(input=src, output=out, model="m"))  # line numbers
        assert read_npy(out)[0] == [str(k) for k in range(1, 51)]
        result = await run_job(client, JobOptions(input=src, output=out, model="m", id_field="id"))
    assert result.status == "complete"
    assert result.progress.changes["id_field"] == (None, "id")
    assert server.stats.inputs == 50  # nothing sent again
    assert read_npy(out)[0] == [i for i, _ in rows]


@pytest.mark.parametrize(
    ("name", "bad", "fixed"),
    [
        ("in.jsonl", '{"text": "a"}\n{"text": oops}\n', '{"text": "a"}\n{"text": "b"}\n'),
        ("in.csv", "body\na\nb\n", "text\na\nb\n"),
    ],
)
async def test_a_job_stopped_by_a_bad_record_leaves_no_job_files(
    tmp_path: Path, make_server: MakeServer, name: str, bad: str, fixed: str
) -> None:
    src = tmp_path / name
    src.write_text(bad, encoding="utf-8")
    out = tmp_path / "out.npy"
    server = await make_server()
    async with AsyncClient(base_url=server.base_url) as client:
        with pytest.raises(CorpusError):
            await run_job(client, JobOptions(input=src, output=out, model="m"))
        assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing left behind
        src.write_text(fixed, encoding="utf-8")
        result = await run_job(client, JobOptions(input=src, output=out, model="m"))
    assert result.status == "complete"
    np.testing.assert_array_equal(np.load(out), fake_embeddings(["a", "b"], DIM))


@pytest.mark.parametrize("suffix", [".parquet", ".npy", ".jsonl"])
async def test_an_empty_input_writes_an_empty_output_and_no_job_files(
    tmp_path: Path, make_server: MakeServer, suffix: str
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n")
    out = tmp_path / f"out{suffix}"
    server = await make_server()
    async with AsyncClient(base_url=server.base_url) as client:
        result = await run_job(client, JobOptions(input=src, output=out, model="m"))
    assert (result.status, result.output, result.rows) == ("complete", out, 0)
    assert not job_path(out).exists() and not job_threads()
    if suffix == ".parquet":
        table = pq.read_table(out)
        assert table.column_names == ["id", "embedding"] and len(table) == 0
    elif suffix == ".npy":
        assert np.load(out).shape == (0, 0)
    else:
        assert out.read_bytes() == b""


async def test_an_input_that_failed_whole_writes_an_empty_output_and_keeps_the_job(
    tmp_path: Path, make_server: MakeServer
) -> None:
    src = tmp_path / "in.txt"
    src.write_text("bad one\nbad two\n", encoding="utf-8")
    out = tmp_path / "out.parquet"
    server = await make_server(reject_substring="bad")
    async with AsyncClient(base_url=server.base_url) as client:
        result = await run_job(client, JobOptions(input=src, output=out, model="m"))
    assert (result.status, result.output, result.rows) == ("failures", out, 0)
    assert len(pq.read_table(out)) == 0
    assert result.failures is not None and len(result.failures.read_bytes().splitlines()) == 2
    assert job_path(out).exists()  # for --retry-failed
