"""The fake server itself: deterministic vectors, fault specs, wire forms, and the CLI."""

from __future__ import annotations

import base64
import subprocess
import sys

import aiohttp
import numpy as np
import orjson
import pytest

from togembed.server.fake import POOL_ROWS, FaultQueue
from togembed.testing import FakeTogetherServer, Fault, fake_embedding, fake_embeddings


def test_fake_embeddings_match_fake_embedding_and_differ_per_text() -> None:
    texts = [f"t{i}" for i in range(3 * POOL_ROWS)]  # more texts than pool rows
    arr = fake_embeddings(texts, 16)
    assert arr.dtype == np.float32
    np.testing.assert_array_equal(arr[5], fake_embedding(texts[5], 16))
    assert len({row.tobytes() for row in arr}) == len(texts)


def test_fault_specs_parse_and_typos_fail_early() -> None:
    assert Fault.parse("slow:0.5") == Fault("slow", delay=0.5)
    f = Fault.parse("429:retry-after=1,type=credit_limit")
    assert (f.kind, f.retry_after, f.type) == ("429", 1.0, "credit_limit")
    assert Fault.parse(str(f)) == f
    q = FaultQueue()
    with pytest.raises(ValueError):
        q.append("5OO")
    with pytest.raises(ValueError):
        q.append("429:retry_aftr=1")
    assert len(q) == 0


@pytest.mark.parametrize("fmt", ["float", "base64"])
async def test_both_wire_forms_carry_exactly_fake_embeddings(fmt: str) -> None:
    texts = ["a", "b", "héllo"]
    async with FakeTogetherServer(dim=8) as server, aiohttp.ClientSession() as session:
        body = {"model": "m", "input": texts, "encoding_format": fmt}
        async with session.post(f"{server.base_url}/embeddings", json=body) as r:
            doc = await r.json()
            assert r.headers["x-request-id"] == server.stats.log[0].request_id
    rows = [d["embedding"] for d in doc["data"]]
    if fmt == "base64":
        arr = np.stack([np.frombuffer(base64.b64decode(s), dtype="<f4") for s in rows])
    else:
        arr = np.array(rows, dtype=np.float32)
    np.testing.assert_array_equal(arr, fake_embeddings(texts, 8))
    assert [d["index"] for d in doc["data"]] == [0, 1, 2]


async def test_cli_prints_ready_and_takes_faults_over_http() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "togembed.server.fake", "--port", "0", "--dim", "8"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        word, url = proc.stdout.readline().split()
        assert word == "READY"
        async with aiohttp.ClientSession() as session:
            async with session.post(url.removesuffix("/v1") + "/faults", json=["500"]) as r:
                assert (await r.json()) == {"faults_pending": 1}
            body = {"model": "m", "input": "x"}
            async with session.post(f"{url}/embeddings", json=body) as r:
                assert r.status == 500
            async with session.post(f"{url}/embeddings", json=body) as r:
                assert r.status == 200
            async with session.get(url.removesuffix("/v1") + "/stats") as r:
                stats = orjson.loads(await r.read())
        assert stats["requests"] == 2
        assert stats["status_counts"] == {"200": 1, "500": 1}
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
