"""End-to-end tests of ``togembed embed`` against a fake Together server in another process.

Every test checks exact rows: the ids of the input, in input order, each once, with exactly the
vector the fake server gives that text (``fake_embeddings``). Fast cases run the command in
process (click's CliRunner); kill and Ctrl-C run it as a real subprocess.
"""

from __future__ import annotations

import asyncio
import csv
import errno
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from togembed import cli as cli_module
from togembed.cli import backends as cli_backends
from togembed.cli.options import seconds as parse_seconds
from togembed.cli.progress import Display
from togembed.jobs import writers as _writers
from togembed.jobs.failures import failures_path
from togembed.jobs.jobfile import job_path
from togembed.jobs.store import JobStore
from togembed.jobs.storewriter import StoreWriter
from togembed.jobs.textindex import text_hash
from togembed.jobs.writers import npy_ids_path
from togembed.testing import fake_embeddings

DIM = 32
MODEL = "BAAI/bge-base-en-v1.5"
# Long enough that a kill halfway through a round trip stays clear of the few ms after each
# answer (when it is not yet committed), even on a loaded machine.
WAVE_LATENCY = 0.1
# The tests never need a real key; make sure one from the environment changes nothing.
_CLEAN_ENV = {"TOGETHER_API_KEY": None, "TOGETHER_BASE_URL": None}


# -- a fake server in another process --------------------------------------------------------------


class Server:
    """``python -m togembed.server.fake`` in a subprocess; ``stats()`` reads its GET /stats."""

    def __init__(self, *args: str, dim: int = DIM, latency: float = 0.0) -> None:
        cmd = [sys.executable, "-m", "togembed.server.fake", "--port", "0", "--dim", str(dim)]
        cmd += ["--latency", str(latency), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if line[:1] != ["READY"]:
            self.close()
            raise RuntimeError(f"fake server did not start: {line}")
        self.url = line[1]
        self.root = self.url.removesuffix("/v1")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.root}/stats", timeout=10) as r:
            return orjson.loads(r.read())

    def inputs(self) -> int:
        return int(self.stats()["inputs"])

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.root}/stats/reset", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass

    def add_faults(self, specs: Sequence[str]) -> None:
        """Script faults for the next requests (``POST /faults``)."""
        req = urllib.request.Request(f"{self.root}/faults", data=orjson.dumps(list(specs)))
        with urllib.request.urlopen(req, timeout=10):
            pass

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def _shared_server() -> Iterator[Server]:
    server = Server(latency=0.002)
    yield server
    server.close()


@pytest.fixture
def server(_shared_server: Server) -> Server:
    """A fast server, shared by the tests of this module, with its counters zeroed."""
    _shared_server.reset()
    return _shared_server


@pytest.fixture(scope="module")
def slow_server() -> Iterator[Server]:
    """50 ms per request: a job of a few thousand texts lasts long enough to be stopped."""
    server = Server(latency=0.05)
    yield server
    server.close()


@pytest.fixture(scope="module")
def wave_server() -> Iterator[Server]:
    """WAVE_LATENCY per request: requests go out in waves, with time to kill between them."""
    server = Server(latency=WAVE_LATENCY)
    yield server
    server.close()


# -- running the command ---------------------------------------------------------------------------


def invoke(*args: object, env: dict[str, str | None] | None = None) -> Result:
    """``togembed embed ARGS`` in this process (stderr is not a terminal, as under CI)."""
    return CliRunner().invoke(
        cli_module.cli,
        ["embed", *(str(a) for a in args)],
        env={**_CLEAN_ENV, **(env or {})},
        catch_exceptions=False,
    )


def subprocess_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _CLEAN_ENV}


def embed_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "togembed", "embed", *(str(a) for a in args)]


def run(*args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``togembed embed ARGS`` as a real process, stderr captured (a pipe: not a terminal)."""
    return subprocess.run(
        embed_cmd(*args), capture_output=True, text=True, env=subprocess_env(), timeout=timeout
    )


def wait_for_inputs(server: Server, proc: subprocess.Popen[Any], at_least: int) -> int:
    """Poll the server until it has received ``at_least`` inputs; the job must still run."""
    deadline = time.monotonic() + 30
    while (seen := server.inputs()) < at_least:
        assert proc.poll() is None, "the job ended before it could be stopped"
        assert time.monotonic() < deadline, f"only {seen} inputs after 30 s"
        time.sleep(0.005)
    return seen


def kill_after_inputs(
    args: Sequence[object], server: Server, at_least: int, *, delay: float, log: Path
) -> None:
    """Run ``togembed embed ARGS``, SIGKILL it ``delay`` s after the server has seen
    ``at_least`` inputs, and check that the kill is what ended it."""
    with open(log, "w") as err:
        proc = subprocess.Popen(embed_cmd(*args), stderr=err, env=subprocess_env())
        try:
            wait_for_inputs(server, proc, at_least)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == -signal.SIGKILL


# -- corpora ---------------------------------------------------------------------------------------


def make_texts(n: int, prefix: str = "document") -> list[str]:
    words = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta")
    return [f"{prefix} {i}: " + " ".join(words[: 1 + i % len(words)]) for i in range(n)]


def write_txt(path: Path, texts: Sequence[str]) -> Path:
    path.write_text("".join(f"{t}\n" for t in texts), encoding="utf-8")
    return path


def write_jsonl(path: Path, ids: Sequence[Any], texts: Sequence[str]) -> Path:
    path.write_bytes(
        b"".join(
            orjson.dumps({"id": i, "text": t}) + b"\n" for i, t in zip(ids, texts, strict=True)
        )
    )
    return path


def job_rows(output: Path) -> int:
    """Vectors committed in a job file (its process must have ended)."""
    conn = sqlite3.connect(job_path(output))
    try:
        return int(conn.execute("SELECT count(*) FROM vectors").fetchone()[0])
    finally:
        conn.close()


# -- reading outputs -------------------------------------------------------------------------------


def read_output(path: Path) -> tuple[list[str], np.ndarray]:
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        assert table.column_names == ["id", "embedding"]
        assert table.schema.field("embedding").type == pa.list_(pa.float32(), DIM)
        ids = table.column("id").to_pylist()
        flat = table.column("embedding").combine_chunks().flatten().to_numpy()
        return ids, flat.reshape(len(ids), DIM)
    if path.suffix == ".npy":
        vectors = np.load(path)
        lines = npy_ids_path(path).read_text(encoding="utf-8").split("\n")
        assert lines[-1] == ""  # every id ends with a newline
        return lines[:-1], vectors
    rows = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    return [r["id"] for r in rows], np.array([r["embedding"] for r in rows], dtype=np.float32)


def assert_rows(path: Path, ids: Sequence[str], texts: Sequence[str]) -> None:
    """The output holds exactly ``ids`` in this order, each once, with the vector of its text."""
    got_ids, vectors = read_output(path)
    assert len(got_ids) == len(ids)
    assert len(set(got_ids)) == len(got_ids), "an id appears twice"
    assert got_ids == list(ids)
    assert vectors.dtype == np.float32
    assert vectors.shape == (len(ids), DIM)
    np.testing.assert_array_equal(vectors, fake_embeddings(texts, DIM))


def txt_ids(n: int) -> list[str]:
    return [str(i) for i in range(1, n + 1)]


# -- 1. SIGKILL and resume -------------------------------------------------------------------------


def test_sigkill_halfway_then_rerun_pays_only_for_what_was_in_flight(
    tmp_path: Path, wave_server: Server
) -> None:
    n, batch, conc = 4000, 50, 4
    texts = make_texts(n)
    src = write_txt(tmp_path / "corpus.txt", texts)
    out = tmp_path / "vectors.parquet"
    args = (src, "-o", out, "-m", MODEL, "--base-url", wave_server.url)
    args += ("--batch-size", batch, "--concurrency", conc)
    wave_server.reset()

    # Requests go out in waves: those that cross the half are just sent. Kill halfway through
    # their round trip, when the answers before them have had ample time to be committed and
    # only they are in flight: the rerun then pays exactly for them. (Other moments: the next
    # test.)
    kill_after_inputs(args, wave_server, n // 2, delay=WAVE_LATENCY / 2, log=tmp_path / "1.err")
    assert not out.exists()  # the output appears only when the job is complete
    committed = job_rows(out)
    paid_first = wave_server.inputs()
    assert 0 < committed < n
    # Lost to the kill: what was in flight, at most `concurrency` batches.
    assert paid_first - committed <= conc * batch

    second = run(*args)
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in second.stderr
    assert_rows(out, txt_ids(n), texts)
    paid_total = wave_server.inputs()
    assert paid_total - paid_first == n - committed  # the rerun sent exactly what was missing
    assert paid_total <= n + conc * batch


@pytest.mark.parametrize("delay", [0.0, 0.013, 0.029])
def test_sigkill_at_any_moment_repays_at_most_concurrency_x_batch(
    tmp_path: Path, server: Server, delay: float
) -> None:
    """A fast server: answers arrive all the time, so the kill often lands between an answer
    and its commit. Paid-but-unrecorded inputs still stay within concurrency x batch size."""
    n, batch, conc = 6000, 40, 4
    texts = make_texts(n)
    src = write_txt(tmp_path / "corpus.txt", texts)
    out = tmp_path / "vectors.parquet"
    args = (src, "-o", out, "-m", MODEL, "--base-url", server.url)
    args += ("--batch-size", batch, "--concurrency", conc)
    kill_after_inputs(args, server, n // 3, delay=delay, log=tmp_path / "1.err")
    committed, paid_first = job_rows(out), server.inputs()
    assert 0 < committed < n
    assert paid_first - committed <= conc * batch

    second = run(*args)
    assert second.returncode == 0, second.stderr
    assert_rows(out, txt_ids(n), texts)
    assert server.inputs() <= n + conc * batch


async def test_rows_answered_during_a_commit_are_committed_without_waiting_for_more(
    tmp_path: Path,
) -> None:
    """The group commit behind the bound above: rows queued while a commit runs are committed
    right after it, not when the next answer happens to arrive (a whole round trip later)."""
    writer = StoreWriter()
    writer.store = JobStore.open(tmp_path / "j.sqlite", meta={})
    try:
        vectors = fake_embeddings(["a", "b", "c"], DIM)
        hashes = [text_hash(t) for t in "abc"]
        await writer.add_batch([0], ["a"], vectors[:1], hashes[:1])  # starts a commit
        await writer.add_batch([1, 2], ["b", "c"], vectors[1:], hashes[1:])  # queued behind it
        deadline = asyncio.get_running_loop().time() + 10  # generous: a bug never gets there
        while (await writer.call(writer.store.counts)).done < 3:
            assert asyncio.get_running_loop().time() < deadline, "rows 1-2 never committed"
            await asyncio.sleep(0.01)
        assert (await writer.call(writer.store.counts)).done == 3
    finally:
        await writer.drain()
        writer.close()


# -- 2. Ctrl-C -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_one_ctrl_c_finishes_in_flight_exits_130_and_the_rerun_completes(
    tmp_path: Path, slow_server: Server, sig: signal.Signals
) -> None:
    n = 3000
    texts = make_texts(n, "note")
    src = write_jsonl(tmp_path / "notes.jsonl", [f"n{i}" for i in range(n)], texts)
    out = tmp_path / "notes.npy"
    args = (src, "-o", out, "-m", MODEL, "--base-url", slow_server.url, "--id-field", "id")
    args += ("--batch-size", 50, "--concurrency", 4)
    slow_server.reset()

    proc = subprocess.Popen(
        embed_cmd(*args), stderr=subprocess.PIPE, text=True, env=subprocess_env()
    )
    try:
        wait_for_inputs(slow_server, proc, n // 3)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait(10)
    assert proc.returncode == 130, stderr
    assert "stopping: finishing requests in flight" in stderr
    assert "run the same command again to continue" in stderr
    assert "Traceback" not in stderr
    stats = slow_server.stats()
    assert stats["disconnects"] == 0  # nothing in flight was abandoned ...
    assert stats["in_flight"] == 0
    assert stats["status_counts"] == {"200": stats["requests"]}
    assert job_rows(out) == stats["inputs"] < n  # ... and everything answered was saved
    assert not out.exists()
    assert not npy_ids_path(out).exists()

    second = run(*args)
    assert second.returncode == 0, second.stderr
    assert_rows(out, [f"n{i}" for i in range(n)], texts)
    assert slow_server.inputs() == n  # nothing was paid for twice


def test_a_second_ctrl_c_abandons_what_is_in_flight_and_keeps_what_was_saved(
    tmp_path: Path, wave_server: Server
) -> None:
    n, batch, conc = 3000, 50, 4
    texts = make_texts(n, "abandon")
    src = write_txt(tmp_path / "in.txt", texts)
    out = tmp_path / "out.jsonl"
    args = (src, "-o", out, "-m", MODEL, "--base-url", wave_server.url)
    args += ("--batch-size", batch, "--concurrency", conc)
    wave_server.reset()

    proc = subprocess.Popen(
        embed_cmd(*args), stderr=subprocess.PIPE, text=True, env=subprocess_env()
    )
    try:
        wait_for_inputs(wave_server, proc, n // 3)
        # The next `conc` requests hang for a minute: once the server has them, they are what
        # is in flight, and still are when the second Ctrl-C comes, however slow this machine.
        wave_server.add_faults(["slow:60"] * conc)
        deadline = time.monotonic() + 30
        while wave_server.stats()["faults_pending"]:
            assert proc.poll() is None, "the job ended before it could be stopped"
            assert time.monotonic() < deadline, "the hanging requests never came"
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        assert proc.stderr is not None
        # The start line (printed before the signal), a blank line, then the notice.
        first = [proc.stderr.readline() for _ in range(3)]
        assert first[0].startswith(f"embedding {src} into {out}"), first
        assert first[2].startswith("stopping: finishing requests in flight"), first
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait(10)
    assert proc.returncode == 130, stderr
    assert "interrupted; progress saved in" in stderr
    assert "Traceback" not in stderr
    deadline = time.monotonic() + 30
    while (stats := wave_server.stats())["disconnects"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stats["disconnects"] > 0  # the requests in flight were abandoned, not awaited
    saved = job_rows(out)
    assert 0 < stats["inputs"] - saved <= conc * batch
    assert not out.exists()

    second = run(*args)
    assert second.returncode == 0, second.stderr
    assert_rows(out, txt_ids(n), texts)
    assert wave_server.inputs() <= n + conc * batch


# -- 3. failures file, --retry-failed --------------------------------------------------------------


def test_rejected_inputs_go_to_the_failures_file_and_retry_failed_completes(
    tmp_path: Path, server: Server
) -> None:
    n = 600
    ids = [f"doc-{i}" for i in range(n)]
    bad = {i for i in range(n) if i % 53 == 7}
    texts = [f"{t} POISON" if i in bad else t for i, t in enumerate(make_texts(n))]
    src = write_jsonl(tmp_path / "docs.jsonl", ids, texts)
    out = tmp_path / "docs.parquet"
    args = (src, "-o", out, "-m", MODEL, "--id-field", "id", "--batch-size", 40)
    strict = Server("--reject-substring", "POISON")
    try:
        first = invoke(*args, "--base-url", strict.url)
    finally:
        strict.close()
    assert first.exit_code == 3, first.stderr
    assert "failed inputs and reasons" in first.stderr
    good = [i for i in range(n) if i not in bad]
    assert_rows(out, [ids[i] for i in good], [texts[i] for i in good])
    failures = [orjson.loads(line) for line in failures_path(out).read_bytes().splitlines()]
    assert [f["id"] for f in failures] == [ids[i] for i in sorted(bad)]
    assert [f["position"] for f in failures] == sorted(bad)
    assert all("400" in f["error"] and "invalid" in f["error"] for f in failures)

    # A plain rerun does not pay for the failures again.
    again = invoke(*args, "--base-url", server.url)
    assert again.exit_code == 3
    assert server.inputs() == 0

    retried = invoke(*args, "--base-url", server.url, "--retry-failed")
    assert retried.exit_code == 0, retried.stderr
    assert_rows(out, ids, texts)
    assert not failures_path(out).exists()
    assert server.inputs() == len(bad)  # only the failed inputs were sent again


# -- 4. dedup --------------------------------------------------------------------------------------


def test_repeated_texts_are_sent_once_and_every_id_gets_its_vector(
    tmp_path: Path, server: Server
) -> None:
    rng = np.random.default_rng(7)
    unique = make_texts(150, "faq")
    texts = [unique[k] for k in rng.integers(0, len(unique), 3000)]
    src = write_txt(tmp_path / "dups.txt", texts)
    out = tmp_path / "dups.jsonl"
    result = invoke(src, "-o", out, "-m", MODEL, "--base-url", server.url, "--batch-size", 16)
    assert result.exit_code == 0, result.stderr
    assert server.inputs() == len(set(texts))
    assert_rows(out, txt_ids(len(texts)), texts)


# -- 5. cache --------------------------------------------------------------------------------------


def test_cache_lets_a_second_job_over_the_same_texts_send_nothing(
    tmp_path: Path, server: Server
) -> None:
    texts = make_texts(700, "cached")
    cache = tmp_path / "cache.sqlite"
    first_src = write_txt(tmp_path / "a.txt", texts)
    first = invoke(
        first_src,
        "-o",
        tmp_path / "a.parquet",
        "-m",
        MODEL,
        "--base-url",
        server.url,
        "--cache",
        cache,
    )
    assert first.exit_code == 0, first.stderr
    assert server.inputs() == len(texts)

    # Other job, other format, other order and ids, same texts: all from the cache.
    order = list(reversed(range(len(texts))))
    ids = [f"r{k}" for k in order]
    second_src = write_jsonl(tmp_path / "b.jsonl", ids, [texts[k] for k in order])
    out = tmp_path / "b.npy"
    second = invoke(
        second_src,
        "-o",
        out,
        "-m",
        MODEL,
        "--base-url",
        server.url,
        "--cache",
        cache,
        "--id-field",
        "id",
    )
    assert second.exit_code == 0, second.stderr
    assert server.inputs() == len(texts)  # nothing more
    assert f"{len(texts):,} from cache" in second.stderr
    assert_rows(out, ids, [texts[k] for k in order])

    # Another model is another cache entry.
    server.reset()
    third = invoke(
        first_src,
        "-o",
        tmp_path / "c.parquet",
        "-m",
        "BAAI/bge-large-en-v1.5",
        "--base-url",
        server.url,
        "--cache",
        cache,
    )
    assert third.exit_code == 0, third.stderr
    assert server.inputs() == len(texts)


# -- 6. formats ------------------------------------------------------------------------------------


def _write_input(kind: str, tmp_path: Path, texts: list[str]) -> tuple[Path, list[str], list[str]]:
    """An input of ``kind``, the options it needs, and the ids the output must have."""
    n = len(texts)
    if kind == "txt":
        return write_txt(tmp_path / "in.txt", texts), [], txt_ids(n)
    if kind == "jsonl":  # integer ids come out as decimal strings
        ids = [1000 + 3 * i for i in range(n)]
        path = write_jsonl(tmp_path / "in.jsonl", ids, texts)
        return path, ["--id-field", "id"], [str(i) for i in ids]
    if kind == "csv":  # other column names, quoted commas, quotes and line breaks in texts
        path = tmp_path / "in.csv"
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["doc_id", "lang", "body"])
            w.writerows([f"d{i}", "en", t] for i, t in enumerate(texts))
        return path, ["--id-field", "doc_id", "--text-field", "body"], [f"d{i}" for i in range(n)]
    path = tmp_path / "in.parquet"
    table = pa.table({"key": [f"p{i}" for i in range(n)], "text": texts})
    pq.write_table(table, path, row_group_size=100)
    return path, ["--id-field", "key"], [f"p{i}" for i in range(n)]


@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv", "parquet"])
def test_input_formats(tmp_path: Path, server: Server, kind: str) -> None:
    texts = make_texts(250)
    if kind != "txt":  # one text per line there
        texts[3] = 'a text with "quotes", commas,\nand a line break'
    texts[5] = "unicode: café ☕ 日本語"
    src, opts, ids = _write_input(kind, tmp_path, texts)
    out = tmp_path / "out.parquet"
    result = invoke(src, "-o", out, "-m", MODEL, "--base-url", server.url, *opts)
    assert result.exit_code == 0, result.stderr
    assert_rows(out, ids, texts)


@pytest.mark.parametrize("suffix", [".parquet", ".npy", ".jsonl"])
def test_output_formats(tmp_path: Path, server: Server, suffix: str) -> None:
    texts = make_texts(300)
    ids = [f"id {i} é" for i in range(len(texts))]
    src = write_jsonl(tmp_path / "in.jsonl", ids, texts)
    out = tmp_path / f"out{suffix}"
    result = invoke(src, "-o", out, "-m", MODEL, "--base-url", server.url, "--id-field", "id")
    assert result.exit_code == 0, result.stderr
    assert f"wrote {out}" in result.stderr
    assert_rows(out, ids, texts)
    # Rerunning a finished job pays nothing and writes the same file.
    server.reset()
    again = invoke(src, "-o", out, "-m", MODEL, "--base-url", server.url, "--id-field", "id")
    assert again.exit_code == 0, again.stderr
    assert server.inputs() == 0
    assert_rows(out, ids, texts)


# -- 7. budgets ------------------------------------------------------------------------------------


def test_max_tokens_stops_with_exit_4_and_a_rerun_completes_exactly(
    tmp_path: Path, server: Server
) -> None:
    texts = make_texts(1000)
    src = write_txt(tmp_path / "in.txt", texts)
    out = tmp_path / "out.parquet"
    args = (src, "-o", out, "-m", MODEL, "--base-url", server.url, "--batch-size", 20)
    first = invoke(*args, "--max-tokens", 500)
    assert first.exit_code == 4, first.stderr
    assert "budget reached" in first.stderr
    assert "run the same command again" in first.stderr
    assert not out.exists()
    sent = server.inputs()
    assert 0 < sent < len(texts) // 2
    assert job_rows(out) == sent  # a budget stop saves everything it paid for

    second = invoke(*args)
    assert second.exit_code == 0, second.stderr
    assert_rows(out, txt_ids(len(texts)), texts)
    assert server.inputs() == len(texts)


def test_deadline_zero_sends_nothing_and_a_long_deadline_finishes(
    tmp_path: Path, server: Server
) -> None:
    texts = make_texts(200)
    src = write_txt(tmp_path / "in.txt", texts)
    out = tmp_path / "out.npy"
    args = (src, "-o", out, "-m", MODEL, "--base-url", server.url)
    first = invoke(*args, "--deadline", "0s")
    assert first.exit_code == 4, first.stderr
    assert server.inputs() == 0
    assert "run the same command again to continue (nothing was saved yet)" in first.stderr
    assert not job_path(out).exists()
    second = invoke(*args, "--deadline", "1h30m")
    assert second.exit_code == 0, second.stderr
    assert_rows(out, txt_ids(len(texts)), texts)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("1.5", 1.5),
        ("15m", 900),
        ("2h", 7200),
        ("2h30m", 9000),
        ("1h2m3s", 3723),
        (" 45m ", 2700),
        ("0", 0),
    ],
)
def test_deadline_parsing(text: str, seconds: float) -> None:
    assert parse_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "m", "abc", "10 minutes", "-5", "1d", "5m2h", "1.2.3"])
def test_bad_deadline_is_a_usage_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(click.BadParameter):
        parse_seconds(text)
    src = write_txt(tmp_path / "in.txt", ["x"])
    result = invoke(
        src,
        "-o",
        tmp_path / "o.parquet",
        "-m",
        MODEL,
        "--deadline",
        text,
        "--base-url",
        "http://127.0.0.1:9/v1",
    )
    assert result.exit_code == 2
    assert "Invalid value for '--deadline'" in result.stderr
    assert "is not a duration like" in result.stderr
    assert not job_path(tmp_path / "o.parquet").exists()


# -- 8. errors -------------------------------------------------------------------------------------


def test_unknown_model_is_exit_1_with_a_clear_message(tmp_path: Path) -> None:
    src = write_txt(tmp_path / "in.txt", make_texts(50))
    out = tmp_path / "out.parquet"
    picky = Server("--models", MODEL)
    try:
        result = invoke(src, "-o", out, "-m", "no-such/model", "--base-url", picky.url)
        assert picky.stats()["status_counts"] == {"404": 1}  # gave up at once, no retries
        assert result.exit_code == 1, result.stderr
        assert "error: HTTP 404: Unable to access model no-such/model" in result.stderr
        assert "nothing was embedded; fix the cause and run the command again" in result.stderr
        assert "Traceback" not in result.stderr
        assert not out.exists()
        # Nothing was paid for, so no job is left behind to refuse the corrected command.
        assert not job_path(out).exists()
        fixed = invoke(src, "-o", out, "-m", MODEL, "--base-url", picky.url)
    finally:
        picky.close()
    assert fixed.exit_code == 0, fixed.stderr
    assert_rows(out, txt_ids(50), make_texts(50))


def test_an_api_error_midway_keeps_the_progress(tmp_path: Path, server: Server) -> None:
    texts = make_texts(500)
    src = write_txt(tmp_path / "in.txt", texts)
    out = tmp_path / "out.parquet"
    args = (src, "-o", out, "-m", MODEL, "--base-url", server.url, "--batch-size", 50)
    # Two requests answered as usual, then a 401 (not retried).
    req = urllib.request.Request(
        f"{server.root}/faults", data=b'["slow:0", "slow:0", "401"]', method="POST"
    )
    urllib.request.urlopen(req, timeout=10).close()
    first = invoke(*args, "--concurrency", 1)
    assert first.exit_code == 1, first.stderr
    assert "error: HTTP 401: Invalid API key provided" in first.stderr
    assert f"progress is saved in {job_path(out)}" in first.stderr
    assert job_rows(out) == 100
    paid_first = server.inputs()
    # The two saved batches, the refused one, and at most `concurrency` (1) batch in flight.
    assert paid_first <= 100 + 50 + 50
    second = invoke(*args)
    assert second.exit_code == 0, second.stderr
    assert "500 of 500 inputs done (400 this run" in second.stderr
    assert_rows(out, txt_ids(len(texts)), texts)
    assert server.inputs() - paid_first == 400  # the rerun sent exactly what was missing


def test_missing_api_key_for_a_remote_server_is_exit_2_before_any_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_client(*args: object, **kwargs: object) -> None:
        raise AssertionError("a client was created without an API key")

    monkeypatch.setattr(cli_backends, "AsyncClient", no_client)
    src = write_txt(tmp_path / "in.txt", ["hello"])
    out = tmp_path / "out.parquet"
    result = invoke(src, "-o", out, "-m", MODEL, "--base-url", "https://api.together.xyz/v1")
    assert result.exit_code == 2
    assert "no API key" in result.stderr
    assert "export TOGETHER_API_KEY=" in result.stderr
    assert not job_path(out).exists()
    # The default base URL is Together's: the same without --base-url.
    assert invoke(src, "-o", out, "-m", MODEL).exit_code == 2


def test_missing_api_key_as_a_real_process(tmp_path: Path) -> None:
    src = write_txt(tmp_path / "in.txt", ["hello"])
    result = run(
        src, "-o", tmp_path / "o.npy", "-m", MODEL, "--base-url", "https://api.together.xyz/v1"
    )
    assert result.returncode == 2
    assert "TOGETHER_API_KEY" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("name", "output", "message"),
    [
        ("missing.txt", "o.parquet", "does not exist"),
        ("in.xml", "o.parquet", "must end in .txt"),
        ("in.txt", "o.csv", "must end in .parquet"),
    ],
)
def test_bad_paths_are_usage_errors(
    tmp_path: Path, server: Server, name: str, output: str, message: str
) -> None:
    for existing in ("in.xml", "in.txt"):
        write_txt(tmp_path / existing, ["x"])
    result = invoke(tmp_path / name, "-o", tmp_path / output, "-m", MODEL, "--base-url", server.url)
    assert result.exit_code == 2
    assert message in result.stderr
    assert server.inputs() == 0


def test_bad_input_records_are_usage_errors_before_anything_is_paid(
    tmp_path: Path, server: Server
) -> None:
    out = tmp_path / "o.parquet"
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "a"}\n{"text": oops}\n', encoding="utf-8")
    result = invoke(bad_json, "-o", out, "-m", MODEL, "--base-url", server.url)
    assert result.exit_code == 2
    assert "bad.jsonl, line 2: invalid JSON" in result.stderr

    dup = write_jsonl(tmp_path / "dup.jsonl", ["a", "b", "a"], ["x", "y", "z"])
    result = invoke(
        dup, "-o", tmp_path / "d.parquet", "-m", MODEL, "--base-url", server.url, "--id-field", "id"
    )
    assert result.exit_code == 2
    assert "id 'a' appears twice" in result.stderr

    # The last line of a long text file: found by the scan before the first request.
    bad_txt = tmp_path / "bad.txt"
    bad_txt.write_bytes("".join(f"line {k}\n" for k in range(5000)).encode() + b"bad \xff\n")
    result = invoke(bad_txt, "-o", tmp_path / "t.parquet", "-m", MODEL, "--base-url", server.url)
    assert result.exit_code == 2
    assert "bad.txt, line 5001: not valid UTF-8" in result.stderr
    assert server.inputs() == 0
    assert "Traceback" not in result.stderr


def test_changing_the_model_of_a_started_job_asks_for_restart(
    tmp_path: Path, server: Server
) -> None:
    texts = make_texts(300)
    src = write_txt(tmp_path / "in.txt", texts)
    out = tmp_path / "out.parquet"
    args = (src, "-o", out, "--base-url", server.url, "--batch-size", 10)
    assert invoke(*args, "-m", MODEL, "--max-tokens", 100).exit_code == 4
    sent = server.inputs()

    other = "BAAI/bge-large-en-v1.5"
    result = invoke(*args, "-m", other)
    assert result.exit_code == 2
    assert "--restart" in result.stderr
    assert "model" in result.stderr
    assert server.inputs() == sent
    assert not out.exists()

    restarted = invoke(*args, "-m", other, "--restart")
    assert restarted.exit_code == 0, restarted.stderr
    assert server.inputs() == sent + len(texts)  # started over
    assert_rows(out, txt_ids(len(texts)), texts)


def test_a_job_run_by_another_process_is_refused(tmp_path: Path, slow_server: Server) -> None:
    texts = make_texts(2000)
    src = write_txt(tmp_path / "in.txt", texts)
    out = tmp_path / "out.parquet"
    args = (src, "-o", out, "-m", MODEL, "--base-url", slow_server.url, "--batch-size", 50)
    slow_server.reset()
    proc = subprocess.Popen(embed_cmd(*args), stderr=subprocess.DEVNULL, env=subprocess_env())
    try:
        wait_for_inputs(slow_server, proc, 1)
        result = invoke(*args)
        assert result.exit_code == 2
        assert "in use by another togembed process" in result.stderr
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait(10)
    assert_rows(out, txt_ids(len(texts)), texts)


def test_help_lists_examples_and_exit_codes() -> None:
    result = CliRunner().invoke(cli_module.cli, ["embed", "--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.output
    assert "togembed embed docs.jsonl -o vectors.parquet" in result.output
    assert "130 interrupted" in result.output
    top = CliRunner().invoke(cli_module.cli, ["--help"])
    assert top.exit_code == 0
    assert "embed" in top.output
    # Without arguments, help rather than an error.
    bare = CliRunner().invoke(cli_module.cli, ["embed"])
    assert "Examples:" in bare.output


# -- 9. progress without a terminal ----------------------------------------------------------------


def test_progress_is_plain_lines_and_a_summary_when_stderr_is_not_a_tty(
    tmp_path: Path, server: Server
) -> None:
    n = 1000
    texts = make_texts(n)
    src = write_txt(tmp_path / "in.txt", texts)
    out = tmp_path / "out.parquet"
    result = run(src, "-o", out, "-m", MODEL, "--base-url", server.url, "--batch-size", 100)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "\x1b" not in result.stderr  # no bar, no escapes
    lines = result.stderr.splitlines()
    assert any(line.startswith("1,000/1,000 texts, ") and "ETA 0 s" in line for line in lines)
    assert "1,000 of 1,000 inputs done (1,000 this run in" in result.stderr
    assert "1,000 embedded, 0 duplicates, 0 from cache; 0 failed" in result.stderr
    assert "10 requests, 0 retries, 0 rate-limited" in result.stderr
    assert f"wrote {out}" in result.stderr
    assert_rows(out, txt_ids(n), texts)


def test_progress_lines_come_at_each_interval(
    tmp_path: Path, slow_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Display, "INTERVAL", 0.1)
    texts = make_texts(1500)
    src = write_txt(tmp_path / "in.txt", texts)
    out = tmp_path / "out.parquet"
    result = invoke(
        src,
        "-o",
        out,
        "-m",
        MODEL,
        "--base-url",
        slow_server.url,
        "--batch-size",
        50,
        "--concurrency",
        4,
    )
    assert result.exit_code == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if "texts/s" in line]
    assert len(progress) >= 3
    done = [int(line.split("/")[0].replace(",", "")) for line in progress]
    assert done == sorted(done) and done[-1] == len(texts)


def test_quiet_prints_only_the_summary(tmp_path: Path, server: Server) -> None:
    src = write_txt(tmp_path / "in.txt", make_texts(100))
    result = invoke(src, "-o", tmp_path / "o.parquet", "-m", MODEL, "--base-url", server.url, "-q")
    assert result.exit_code == 0
    assert "texts/s" not in result.stderr
    assert "100 of 100 inputs done" in result.stderr
    assert result.stdout == ""


def test_missing_output_directory_is_a_usage_error(tmp_path: Path, server: Server) -> None:
    src = write_txt(tmp_path / "in.txt", make_texts(5))
    out = tmp_path / "nowhere" / "out.parquet"
    result = invoke(src, "-o", out, "-m", MODEL, "--base-url", server.url)
    assert result.exit_code == 2
    assert f"directory {out.parent} does not exist" in result.stderr
    assert "Traceback" not in result.output
    assert server.stats()["inputs"] == 0


def test_a_failing_disk_stops_the_job_with_exit_1_and_progress_kept(
    tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = make_texts(300)
    src = write_txt(tmp_path / "in.txt", texts)
    out = tmp_path / "out.parquet"
    calls = 0
    write = _writers._ParquetOutput._write

    def full_disk(self: Any, ids: Any, vectors: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, ids, vectors)

    monkeypatch.setattr(_writers._ParquetOutput, "_write", full_disk)
    args = (src, "-o", out, "-m", MODEL, "--base-url", server.url, "--batch-size", "20")
    result = invoke(*args)
    assert result.exit_code == 1
    assert "No space left on device" in result.stderr
    assert "progress is saved" in result.stderr
    assert not out.exists() and not (tmp_path / ".out.parquet.togembed-tmp").exists()
    paid = server.stats()["inputs"]
    monkeypatch.setattr(_writers._ParquetOutput, "_write", write)
    assert invoke(*args).exit_code == 0
    ids, vectors = read_output(out)
    assert ids == [str(k) for k in range(1, 301)]
    np.testing.assert_array_equal(vectors, fake_embeddings(texts, DIM))
    assert server.stats()["inputs"] - paid < 300  # the first run's stored work was kept


@pytest.mark.parametrize("suffix", [".parquet", ".npy", ".jsonl"])
def test_an_empty_input_writes_an_empty_output_and_exits_0(
    tmp_path: Path, server: Server, suffix: str
) -> None:
    src = tmp_path / "empty.txt"
    src.write_bytes(b"")
    out = tmp_path / f"out{suffix}"
    for _ in range(2):  # and again: no job file left to refuse or to resume
        result = invoke(src, "-o", out, "-m", MODEL, "--base-url", server.url)
        assert result.exit_code == 0, result.stderr
        assert "0 of 0 inputs done" in result.stderr
        assert f"wrote {out} (no rows: the input has no records; ids: line numbers)" in (
            result.stderr
        )
        assert not job_path(out).exists()
    if suffix == ".parquet":
        table = pq.read_table(out)
        assert table.column_names == ["id", "embedding"] and len(table) == 0
    elif suffix == ".npy":
        array = np.load(out)
        assert (array.shape, array.dtype) == ((0, 0), np.float32)
        assert npy_ids_path(out).read_bytes() == b""
    else:
        assert out.read_bytes() == b""
    assert server.inputs() == 0


def test_an_input_whose_every_record_fails_writes_an_empty_output_and_exits_3(
    tmp_path: Path, server: Server
) -> None:
    texts = [f"{t} POISON" for t in make_texts(30)]
    src = write_txt(tmp_path / "in.txt", texts)
    out = tmp_path / "out.parquet"
    strict = Server("--reject-substring", "POISON")
    try:
        result = invoke(src, "-o", out, "-m", MODEL, "--base-url", strict.url)
    finally:
        strict.close()
    assert result.exit_code == 3, result.stderr
    assert f"wrote {out} (no rows: every input failed; ids: line numbers)" in result.stderr
    assert len(pq.read_table(out)) == 0
    assert len(failures_path(out).read_bytes().splitlines()) == 30
    retried = invoke(src, "-o", out, "-m", MODEL, "--base-url", server.url, "--retry-failed")
    assert retried.exit_code == 0, retried.stderr
    assert_rows(out, txt_ids(30), texts)


# -- 10. ids from the input's own id field ---------------------------------------------------------


def _input_with_ids(kind: str, tmp_path: Path, ids: list[str], texts: list[str]) -> Path:
    """An input whose records have an ``id`` field (not first), of ``kind``."""
    if kind == "jsonl":
        path = tmp_path / "in.jsonl"
        path.write_bytes(
            b"".join(
                orjson.dumps({"text": t, "lang": "en", "id": i}) + b"\n"
                for i, t in zip(ids, texts, strict=True)
            )
        )
        return path
    if kind == "csv":
        path = tmp_path / "in.csv"
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "id"])
            w.writerows(zip(texts, ids, strict=True))
        return path
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": texts, "id": ids}), path, row_group_size=50)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_an_id_field_in_the_input_is_used_without_id_field(
    tmp_path: Path, server: Server, kind: str
) -> None:
    n = 120
    texts, ids = make_texts(n), [f"key-{3 * i}" for i in range(n)]
    src = _input_with_ids(kind, tmp_path, ids, texts)
    out = tmp_path / "out.parquet"
    args = (src, "-o", out, "-m", MODEL, "--base-url", server.url)
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    assert (
        f"embedding {src} into {out} with {MODEL} (ids: field 'id' (found in the input); "
        "--no-id-field numbers the records instead)"
    ) in result.stderr
    assert f"wrote {out} ({n} rows; ids: field 'id')" in result.stderr
    assert_rows(out, ids, texts)

    # --no-id-field: numbered records, the same texts (kept: nothing is sent again).
    server.reset()
    numbered = invoke(*args, "--no-id-field")
    assert numbered.exit_code == 0, numbered.stderr
    words = "row numbers" if kind == "parquet" else "line numbers"
    assert f"(ids: {words})" in numbered.stderr
    assert f"wrote {out} ({n} rows; ids: {words})" in numbered.stderr
    first = 2 if kind == "csv" else 1  # a CSV record's line, after the header
    assert_rows(out, [str(k) for k in range(first, first + n)], texts)
    assert server.inputs() == 0


def test_an_explicit_id_field_is_said_as_such(tmp_path: Path, server: Server) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", ["a", "b"], ["x", "y"])
    out = tmp_path / "out.jsonl"
    result = invoke(src, "-o", out, "-m", MODEL, "--base-url", server.url, "--id-field", "id")
    assert result.exit_code == 0, result.stderr
    assert "(ids: field 'id')\n" in result.stderr  # not "found in the input"
    assert_rows(out, ["a", "b"], ["x", "y"])


def test_id_field_and_no_id_field_exclude_each_other(tmp_path: Path, server: Server) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", ["a"], ["x"])
    out = tmp_path / "o.npy"
    args = (src, "-o", out, "-m", MODEL, "--base-url", server.url)
    result = invoke(*args, "--id-field", "id", "--no-id-field")
    assert result.exit_code == 2
    assert "--id-field and --no-id-field exclude each other" in result.stderr
    assert server.inputs() == 0 and not job_path(out).exists()


def test_a_later_record_without_the_found_id_field_is_a_clear_error(
    tmp_path: Path, server: Server
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(
        '{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n{"text": "z"}\n', encoding="utf-8"
    )
    out = tmp_path / "out.parquet"
    args = (src, "-o", out, "-m", MODEL, "--base-url", server.url)
    result = invoke(*args)
    assert result.exit_code == 2
    assert "in.jsonl, line 3: no id field 'id'" in result.stderr  # as with --id-field id
    assert "--no-id-field numbers the records instead" in result.stderr
    assert "Traceback" not in result.stderr
    assert server.inputs() == 0
    assert not job_path(out).exists()
    numbered = invoke(*args, "--no-id-field")
    assert numbered.exit_code == 0, numbered.stderr
    assert_rows(out, ["1", "2", "3"], ["x", "y", "z"])


# -- 11. the input changes under a job -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "bad", "fixed", "ids"),
    [
        ("in.jsonl", '{"text": "a"}\n{"text": oops}\n', '{"text": "a"}\n{"text": "b"}\n', "12"),
        ("in.csv", "body\na\nb\n", "text\na\nb\n", "23"),  # no column "text"
        ("in.jsonl", "", '{"text": "a"}\n{"text": "b"}\n', "12"),  # empty, then filled
        (  # an id twice
            "in.jsonl",
            '{"id": "x", "text": "a"}\n{"id": "x", "text": "b"}\n',
            '{"id": "x", "text": "a"}\n{"id": "y", "text": "b"}\n',
            "xy",
        ),
    ],
)
def test_after_a_run_that_paid_nothing_the_fixed_input_just_runs(
    tmp_path: Path, server: Server, name: str, bad: str, fixed: str, ids: str
) -> None:
    src = tmp_path / name
    src.write_text(bad, encoding="utf-8")
    out = tmp_path / "out.parquet"
    args = (src, "-o", out, "-m", MODEL, "--base-url", server.url)
    first = invoke(*args)
    assert first.exit_code == (0 if not bad else 2), first.stderr
    assert not job_path(out).exists()  # nothing was paid: nothing left behind
    src.write_text(fixed, encoding="utf-8")
    second = invoke(*args)
    assert second.exit_code == 0, second.stderr
    assert "belongs to a job" not in second.stderr
    assert_rows(out, list(ids), ["a", "b"])
    assert server.inputs() == 2


def touch(path: Path) -> None:
    """``touch``: the same bytes, a later modification time (set, not waited for)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_a_touched_input_just_continues(tmp_path: Path, server: Server) -> None:
    texts = make_texts(400)
    src = write_txt(tmp_path / "in.txt", texts)
    out = tmp_path / "out.npy"
    args = (src, "-o", out, "-m", MODEL, "--base-url", server.url, "--batch-size", 20)
    assert invoke(*args, "--max-tokens", 300).exit_code == 4
    sent = server.inputs()
    touch(src)
    second = invoke(*args)
    assert second.exit_code == 0, second.stderr
    assert "since the job's last run: the input file was modified" in second.stderr
    assert f"{sent:,} already embedded kept, {400 - sent:,} to embed" in second.stderr
    assert server.inputs() == len(texts)  # only what was left
    assert_rows(out, txt_ids(len(texts)), texts)
    touch(src)
    third = invoke(*args)
    assert third.exit_code == 0, third.stderr
    assert "400 already embedded kept, 0 to embed" in third.stderr
    assert server.inputs() == len(texts)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv", "parquet"])
def test_records_appended_to_a_finished_corpus_are_all_that_is_embedded(
    tmp_path: Path, server: Server, kind: str
) -> None:
    texts = make_texts(300)
    src, opts, ids = _write_input(kind, tmp_path, texts)
    out = tmp_path / "out.parquet"
    args = (src, "-o", out, "-m", MODEL, "--base-url", server.url, *opts)
    assert invoke(*args).exit_code == 0
    assert server.inputs() == 300
    more = make_texts(350)[300:]
    _, _, all_ids = _write_input(kind, tmp_path, texts + more)
    server.reset()
    again = invoke(*args)  # the same command, no --restart
    assert again.exit_code == 0, again.stderr
    assert server.inputs() == 50  # only the new ids
    assert "350 of 350 inputs done (50 this run" in again.stderr
    assert "300 already embedded kept, 50 to embed" in again.stderr
    assert all_ids[:300] == ids
    assert_rows(out, all_ids, texts + more)


def test_edited_removed_and_reordered_records_are_reconciled_by_id_and_text(
    tmp_path: Path, server: Server
) -> None:
    n = 200
    ids, texts = [f"d{i}" for i in range(n)], make_texts(n)
    src = write_jsonl(tmp_path / "in.jsonl", ids, texts)
    out = tmp_path / "out.jsonl"
    args = (src, "-o", out, "-m", MODEL, "--base-url", server.url)
    assert invoke(*args).exit_code == 0
    rows = list(zip(ids, texts, strict=True))[::-1]  # reversed
    rows[10] = (rows[10][0], rows[10][1] + " (edited)")
    del rows[20:25]  # five records gone
    rows.append(("d-new", "a text never seen"))
    write_jsonl(src, [i for i, _ in rows], [t for _, t in rows])
    server.reset()
    again = invoke(*args)
    assert again.exit_code == 0, again.stderr
    assert server.inputs() == 2  # the edited text and the new one
    assert f"{n - 5 - 1:,} already embedded kept, 2 to embed" in again.stderr
    assert "5 no longer in the input" in again.stderr
    assert_rows(out, [i for i, _ in rows], [t for _, t in rows])


def test_a_duplicate_id_appended_is_refused_and_the_paid_work_is_kept(
    tmp_path: Path, server: Server
) -> None:
    ids, texts = [f"d{i}" for i in range(100)], make_texts(100)
    src = write_jsonl(tmp_path / "in.jsonl", ids, texts)
    out = tmp_path / "out.parquet"
    args = (src, "-o", out, "-m", MODEL, "--base-url", server.url)
    assert invoke(*args).exit_code == 0
    write_jsonl(src, [*ids, "d5"], [*texts, "another text"])
    result = invoke(*args)
    assert result.exit_code == 2
    assert "id 'd5' appears twice in the input, at records 6 and 101" in result.stderr
    assert job_rows(out) == 100  # the job is as it was
    assert_rows(out, ids, texts)  # so is the last output
    write_jsonl(src, [*ids, "d100"], [*texts, "another text"])
    server.reset()
    fixed = invoke(*args)
    assert fixed.exit_code == 0, fixed.stderr
    assert server.inputs() == 1
    assert_rows(out, [*ids, "d100"], [*texts, "another text"])


def test_another_model_after_paid_work_is_refused_in_words(tmp_path: Path, server: Server) -> None:
    src = write_txt(tmp_path / "in.txt", make_texts(50))
    out = tmp_path / "out.parquet"
    assert invoke(src, "-o", out, "-m", MODEL, "--base-url", server.url).exit_code == 0
    touch(src)  # an input change alone would be reconciled; the model cannot be
    result = invoke(src, "-o", out, "-m", "other/model", "--base-url", server.url)
    assert result.exit_code == 2
    assert f"started with model={MODEL!r}, but this run has model='other/model'" in result.stderr
    assert "(the job holds 50 vectors)" in result.stderr
    assert "input_mtime_ns" not in result.stderr


def test_sigkill_while_embedding_appended_records_then_rerun_repays_at_most_the_bound(
    tmp_path: Path, wave_server: Server
) -> None:
    n, batch, conc = 2000, 50, 4
    texts = make_texts(2 * n)
    src = write_txt(tmp_path / "corpus.txt", texts[:n])
    out = tmp_path / "vectors.parquet"
    args = (src, "-o", out, "-m", MODEL, "--base-url", wave_server.url)
    args += ("--batch-size", batch, "--concurrency", conc)
    wave_server.reset()
    assert run(*args).returncode == 0
    assert wave_server.inputs() == n
    write_txt(src, texts)  # as many records again, appended

    kill_after_inputs(args, wave_server, n + n // 2, delay=WAVE_LATENCY / 2, log=tmp_path / "e")
    committed, paid = job_rows(out), wave_server.inputs()
    assert n < committed < 2 * n  # the reconciled job, then some of the new records
    assert paid - committed <= conc * batch  # lost to the kill: what was in flight
    assert_rows(out, txt_ids(n), texts[:n])  # the last output stays until the job completes

    third = run(*args)
    assert third.returncode == 0, third.stderr
    assert wave_server.inputs() - paid == 2 * n - committed  # exactly what was missing
    assert_rows(out, txt_ids(2 * n), texts)


def test_a_base_url_without_a_scheme_is_called_malformed_not_a_missing_key(
    tmp_path: Path,
) -> None:
    src = write_txt(tmp_path / "in.txt", ["hello"])
    out = tmp_path / "out.parquet"
    result = invoke(src, "-o", out, "-m", MODEL, "--base-url", "127.0.0.1:8765/v1")
    assert result.exit_code == 2
    assert "no API key" not in result.stderr
    assert "http://127.0.0.1:8765/v1" in result.stderr  # what it should look like
    assert not job_path(out).exists()
