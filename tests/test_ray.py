"""togembed.ray on a local Ray (2 CPUs, ``ray_session``) against fake servers running in this
process: rows exact and once, one pace shared by every actor, collect and raise modes, an actor
killed mid-job, and resuming a written output by id. Skips where Ray is not installed."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("ray.data", reason="ray is not installed (pip install 'togembed[ray]')")

import ray
import ray.data
from ray_faults import DyingEmbedder

import togembed.ray
from togembed.ray.limiter_actor import NAMESPACE, limiter_name
from togembed.testing import FakeTogetherServer, fake_embeddings, serve_in_thread

MODEL = "BAAI/bge-base-en-v1.5"
DIM = 16

# Ray warns about its own deprecated settings when it reads its defaults: not ours to fix.
pytestmark = pytest.mark.filterwarnings(r"ignore::DeprecationWarning:ray(\..*)?")


@pytest.fixture
def server(ray_session: Any) -> Iterator[FakeTogetherServer]:
    with serve_in_thread(dim=DIM) as s:
        yield s


def text(i: int) -> str:
    return f"text number {i:04d}"


def items(n: int) -> list[dict[str, Any]]:
    return [{"id": i, "text": text(i), "other": f"keep {i}"} for i in range(n)]


def by_id(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "a row came out twice"
    return sorted(rows, key=lambda r: r["id"])


def assert_exact(rows: list[dict[str, Any]], n: int) -> None:
    rows = by_id(rows)
    assert [r["id"] for r in rows] == list(range(n))
    got = np.array([np.asarray(r["embedding"], dtype=np.float32) for r in rows])
    np.testing.assert_array_equal(got, fake_embeddings([text(i) for i in range(n)], DIM))


def test_every_row_once_exact_with_its_columns(server: FakeTogetherServer) -> None:
    ds = ray.data.from_items(items(300))
    out = togembed.ray.embed_dataset(
        ds, model=MODEL, base_url=server.base_url, concurrency=2, rows_per_batch=40, batch_size=8
    )
    rows = out.take_all()
    assert_exact(rows, 300)
    assert all(r["other"] == f"keep {r['id']}" for r in rows)
    field = out.schema().base_schema.field("embedding")
    assert field.type == pa.list_(pa.float32(), DIM)


def test_every_actor_paces_through_one_limiter(ray_session: Any) -> None:
    """Two actors against a server limited to 3000 requests/min, one text per request: the
    shared limiter keeps the pair at the server's rate (each alone would go at it too, so
    twice over). 429s come only from timing jitter; every row is right regardless."""
    with serve_in_thread(dim=DIM, rpm=3000, burst=1.0) as server:
        ds = ray.data.from_items(items(200))
        out = togembed.ray.embed_dataset(
            ds,
            model=MODEL,
            base_url=server.base_url,
            concurrency=2,
            rows_per_batch=20,
            batch_size=1,
            rpm=3000,
        )
        assert_exact(out.take_all(), 200)
        assert server.stats.status_counts.get(429, 0) <= 20  # <= 10 % of 200 requests
    actor = ray.get_actor(limiter_name(server.base_url, None, MODEL), namespace=NAMESPACE)
    stats = ray.get(actor.stats.remote())
    assert stats["rpm"] == pytest.approx(3000 * 0.99)
    assert stats["holders"] >= 1


def test_collect_marks_rejected_rows_and_goes_on(ray_session: Any) -> None:
    with serve_in_thread(dim=DIM, reject_substring="0007") as server:
        ds = ray.data.from_items(items(60))
        out = togembed.ray.embed_dataset(
            ds,
            model=MODEL,
            base_url=server.base_url,
            concurrency=1,
            rows_per_batch=30,
            batch_size=8,
            errors="collect",
        )
        rows = by_id(out.take_all())
    bad = rows[7]
    assert np.isnan(np.asarray(bad["embedding"], dtype=np.float32)).all()
    assert "0007" in bad["embedding_error"] or "400" in bad["embedding_error"]
    good = [r for r in rows if r["id"] != 7]
    assert all(r["embedding_error"] is None for r in good)
    got = np.array([np.asarray(r["embedding"], dtype=np.float32) for r in good])
    np.testing.assert_array_equal(got, fake_embeddings([text(r["id"]) for r in good], DIM))


def test_raise_names_the_row(ray_session: Any) -> None:
    with serve_in_thread(dim=DIM, reject_substring="0013") as server:
        ds = ray.data.from_items(items(40))
        out = togembed.ray.embed_dataset(
            ds,
            model=MODEL,
            base_url=server.base_url,
            concurrency=1,
            rows_per_batch=20,
            id_column="id",
        )
        with pytest.raises(Exception, match="row id=13"):
            out.take_all()


def test_an_actor_killed_mid_job_loses_and_repeats_nothing(
    server: FakeTogetherServer, tmp_path: Any
) -> None:
    """The public callable class in a pipeline of the user's own; one actor dies after paying
    for its first batch. Ray restarts it and runs the batch again: every row once, exact."""
    ds = ray.data.from_items(items(200)).repartition(target_num_rows_per_block=25)
    out = ds.map_batches(
        DyingEmbedder,
        fn_constructor_kwargs={
            "die_marker": str(tmp_path / "died"),
            "model": MODEL,
            "base_url": server.base_url,
            "batch_size": 5,
        },
        compute=ray.data.ActorPoolStrategy(size=2),
        batch_size=25,
        batch_format="pyarrow",
        num_cpus=0,
    )
    assert_exact(out.take_all(), 200)
    assert (tmp_path / "died").exists()
    assert server.stats.inputs > 200  # the dead actor's batch was paid twice


def _committed_ids(checkpoint: str) -> set[int]:
    files = [
        f
        for f in glob.glob(os.path.join(checkpoint, "**", "*.parquet"), recursive=True)
        if not f.endswith(".pending.parquet")
    ]
    return {i for f in files for i in pq.read_table(f).column("id").to_pylist()}


def test_a_rerun_resumes_from_what_was_written(ray_session: Any, tmp_path: Any) -> None:
    """The first run stops on a row the server rejects; the rerun (the row now accepted)
    embeds only what was not written, and a third run embeds nothing."""
    source = tmp_path / "in"
    source.mkdir()
    n = 200
    pq.write_table(pa.Table.from_pylist(items(n)), source / "part-0.parquet")
    output = str(tmp_path / "out")

    def run(server: FakeTogetherServer) -> ray.data.Dataset:
        return togembed.ray.embed_dataset(
            ray.data.read_parquet(str(source)),
            model=MODEL,
            base_url=server.base_url,
            concurrency=1,
            rows_per_batch=20,
            batch_size=10,
            id_column="id",
            output_path=output,
        )

    with serve_in_thread(dim=DIM, reject_substring=text(150)) as server:
        with pytest.raises(Exception, match="row id=150"):
            run(server)
        committed = _committed_ids(output + ".checkpoint")
        assert 150 not in committed
        server.reject_substring = None
        server.reset_stats()
        written = run(server)
        assert_exact(written.take_all(), n)
        assert server.stats.inputs <= n - len(committed)
        server.reset_stats()
        assert_exact(run(server).take_all(), n)
        assert server.stats.inputs == 0


def test_the_driver_keeps_the_shared_limiter_alive(ray_session: Any) -> None:
    """Ray ends a named actor when no handle is left; the process that made it keeps one, so
    workers find the driver's limiter (with its settings), not a new one."""
    from togembed.ray.limiter_actor import get_or_create

    get_or_create("test-kept-alive", rpm=1234)  # the handle is dropped here
    actor = ray.get_actor("test-kept-alive", namespace=NAMESPACE)
    assert ray.get(actor.stats.remote())["rpm"] == pytest.approx(1234 * 0.99)


def test_the_guides_example_runs(ray_session: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/ray.md's runnable example, as written (on this session's Ray: its own ray.init
    and ray.shutdown are skipped)."""
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "ray.md").read_text()
    start = page.index("```python", page.index("### A runnable example")) + len("```python")
    code = page[start : page.index("```", start)]
    assert "embed_dataset" in code and "fake_embeddings" in code
    monkeypatch.setattr(ray, "init", lambda *a, **k: None)
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: None)
    exec(compile(code, "docs/ray.md", "exec"), {})


def test_the_embed_command_runs_its_job_on_ray(
    server: FakeTogetherServer, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``togembed embed --ray``: the same job (ids, output, summary, exit code), its requests
    sent by Ray workers (this session's Ray)."""
    import json

    from click.testing import CliRunner

    from togembed.cli import cli as main

    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    source = tmp_path / "docs.jsonl"
    lines = [json.dumps({"id": f"d{i}", "text": text(i)}) + "\n" for i in range(90)]
    source.write_text("".join(lines))
    out = tmp_path / "vectors.parquet"
    args = ["embed", str(source), "-o", str(out), "-m", MODEL, "--base-url", server.base_url]
    result = CliRunner().invoke(main, [*args, "--ray", "--workers", "2", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == [f"d{i}" for i in range(90)]
    got = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(got, fake_embeddings([text(i) for i in range(90)], DIM))
    assert server.stats.inputs == 90
    again = CliRunner().invoke(main, [*args, "--workers", "2"])
    assert again.exit_code == 2
    assert "--workers needs --ray" in again.output
