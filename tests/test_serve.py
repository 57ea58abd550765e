"""togembed serve: the local Together-compatible server, against a deterministic stand-in model.

Raw HTTP for the wire shapes and errors, then togembed, openai-python and the together SDK as
clients. Dynamic batching, fairness, cancellation and event-loop responsiveness are checked
through the stand-in's record of its calls."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers import wait_until
from standin_model import StandInModel

import togembed
import togembed.server.app
from togembed.server import (
    EmbeddingServer,
    ServeStats,
    local_server,
    ready_line,
    serve,
    stopped_line,
)
from togembed.server.app import is_loopback_host
from togembed.server.batcher import Batcher, Job

MODEL = "test/stand-in-mini"
DIM = 8

MakeServe = Callable[..., Awaitable[EmbeddingServer]]


@pytest.fixture
async def make_serve() -> AsyncIterator[MakeServe]:
    """Start EmbeddingServers on 127.0.0.1 (a StandInModel unless ``model=`` is given)."""
    servers: list[EmbeddingServer] = []

    async def make(model: StandInModel | None = None, **options: Any) -> EmbeddingServer:
        options.setdefault("shutdown_timeout", 2.0)
        server = EmbeddingServer(model or StandInModel(), **options)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    http: aiohttp.ClientSession,
    server: EmbeddingServer,
    body: Any,
    *,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, (bytes, str)) else {"json": body}
    async with http.post(f"{server.base_url}/embeddings", headers=headers, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None), resp


def rows_of(doc: dict[str, Any], dim: int = DIM) -> np.ndarray:
    """Decode a response's rows (floats or base64) in index order."""
    data = sorted(doc["data"], key=lambda d: d["index"])
    assert [d["index"] for d in data] == list(range(len(data)))
    out = np.empty((len(data), dim), dtype=np.float32)
    for i, item in enumerate(data):
        assert item["object"] == "embedding"
        emb = item["embedding"]
        if isinstance(emb, str):
            out[i] = np.frombuffer(base64.b64decode(emb), dtype="<f4")
        else:
            assert len(emb) == dim
            out[i] = emb
    return out


def words(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


# ---------------------------------------------------------------------------------------------
# Wire shapes


@pytest.mark.parametrize("encoding", [None, "float", "base64"])
async def test_list_input_shape_and_rows(make_serve: MakeServe, http, encoding) -> None:
    model = StandInModel()
    server = await make_serve(model)
    texts = ["alpha", "beta gamma", "delta epsilon zeta", ""]
    body: dict[str, Any] = {"model": MODEL, "input": texts}
    if encoding is not None:
        body["encoding_format"] = encoding
    status, doc, resp = await post(http, server, body)
    assert status == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["x-request-id"]
    assert doc["object"] == "list"
    assert doc["model"] == MODEL
    assert set(doc) == {"object", "data", "model", "usage"}
    assert [d["index"] for d in doc["data"]] == [0, 1, 2, 3]
    kinds = {type(d["embedding"]) for d in doc["data"]}
    assert kinds == ({str} if encoding == "base64" else {list})
    np.testing.assert_array_equal(rows_of(doc), model.expected(texts))
    assert doc["usage"] == {"prompt_tokens": 6, "total_tokens": 6}


@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_string_input(make_serve: MakeServe, http, encoding) -> None:
    model = StandInModel()
    server = await make_serve(model)
    status, doc, _ = await post(
        http, server, {"model": MODEL, "input": "just one text", "encoding_format": encoding}
    )
    assert status == 200
    assert len(doc["data"]) == 1 and doc["data"][0]["index"] == 0
    np.testing.assert_array_equal(rows_of(doc), model.expected(["just one text"]))
    assert doc["usage"]["prompt_tokens"] == 3


async def test_base64_is_float32_little_endian_of_the_float_rows(make_serve, http) -> None:
    server = await make_serve(StandInModel(dim=384))
    texts = [f"text {i}" for i in range(5)]
    _, as_float, _ = await post(http, server, {"model": MODEL, "input": texts})
    _, as_b64, _ = await post(
        http, server, {"model": MODEL, "input": texts, "encoding_format": "base64"}
    )
    floats = np.array([d["embedding"] for d in as_float["data"]], dtype=np.float32)
    raw = b"".join(base64.b64decode(d["embedding"]) for d in as_b64["data"])
    np.testing.assert_array_equal(np.frombuffer(raw, dtype="<f4").reshape(5, 384), floats)


async def test_rows_follow_input_order_across_many_batches(make_serve, http) -> None:
    model = StandInModel()
    server = await make_serve(model, max_batch=7)
    texts = [f"input {i} " + "x " * (i % 5) for i in range(100)]
    status, doc, _ = await post(
        http, server, {"model": MODEL, "input": texts, "encoding_format": "base64"}
    )
    assert status == 200
    assert [d["index"] for d in doc["data"]] == list(range(100))
    np.testing.assert_array_equal(rows_of(doc), model.expected(texts))
    assert all(len(call) <= 7 for call in model.calls)


async def test_long_inputs_are_truncated_and_usage_counts_what_the_model_saw(
    make_serve, http
) -> None:
    model = StandInModel(max_tokens=16)
    server = await make_serve(model)
    long_text = words(100)
    status, doc, _ = await post(http, server, {"model": MODEL, "input": [long_text, "a b c"]})
    assert status == 200  # not Together's 400/403: truncated like sentence-transformers
    np.testing.assert_array_equal(rows_of(doc)[0], model.expected([words(16)])[0])
    assert doc["usage"] == {"prompt_tokens": 16 + 3, "total_tokens": 16 + 3}


# ---------------------------------------------------------------------------------------------
# Errors


def assert_error(doc: Any, fragment: str, *, param: str | None = None) -> None:
    assert set(doc) == {"error"}
    err = doc["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert fragment.lower() in err["message"].lower(), err["message"]
    assert err["param"] == param


@pytest.mark.parametrize(
    ("body", "fragment", "param"),
    [
        (b"{not json", "not valid JSON", None),
        (b'["a list"]', "must be a JSON object", None),
        ({"model": MODEL}, "'input' is required", "input"),
        ({"input": ["a"]}, "'model' is required", "model"),
        ({"model": "", "input": ["a"]}, "'model' is required", "model"),
        ({"model": MODEL, "input": ["a", 3]}, "'input[1]' must be a string, got int", "input"),
        ({"model": MODEL, "input": [[1, 2, 3]]}, "'input[0]' must be a string", "input"),
        ({"model": MODEL, "input": None}, "must be a string or a list", "input"),
        ({"model": MODEL, "input": []}, "must not be an empty list", "input"),
        ({"model": MODEL, "input": ["a"], "user": "u"}, "Unrecognized request arguments", None),
        (
            {"model": MODEL, "input": ["a"], "dimensions": 4, "user": "u"},
            "Unrecognized request arguments supplied: dimensions, user",
            None,
        ),
        (
            {"model": MODEL, "input": ["a"], "encoding_format": "int8"},
            "'encoding_format' must be 'float' or 'base64'",
            "encoding_format",
        ),
    ],
)
async def test_bad_requests_get_400(make_serve, http, body, fragment, param) -> None:
    model = StandInModel()
    server = await make_serve(model)
    status, doc, resp = await post(http, server, body)
    assert status == 400
    assert resp.headers["x-request-id"]
    assert_error(doc, fragment, param=param)
    assert doc["error"]["type"] == "invalid_request_error"
    assert model.calls == []


async def test_unknown_model_404_names_the_served_model_and_the_alias_flag(
    make_serve, http
) -> None:
    model = StandInModel()
    server = await make_serve(model)
    status, doc, resp = await post(http, server, {"model": "BAAI/bge-base-en-v1.5", "input": "a"})
    assert status == 404
    assert resp.headers["x-request-id"]
    assert_error(doc, "Unable to access model BAAI/bge-base-en-v1.5")  # Together's opening
    message = doc["error"]["message"]
    assert f"serves {MODEL} only" in message
    assert "togembed serve --alias BAAI/bge-base-en-v1.5" in message
    assert "--alias '*'" in message
    assert "api.together.ai" not in message  # not Together's catalogue: this server's models
    assert doc["error"]["code"] == "model_not_found"
    assert doc["error"]["type"] == "invalid_request_error"
    assert model.calls == []

    async with http.get(f"{server.base_url}/models/BAAI/bge-base-en-v1.5") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == doc["error"]


async def test_togembeds_client_adds_no_together_advice_to_the_servers_own(make_serve) -> None:
    """The 404 already says what to do (``--alias``): ``str()`` adds only that retrying will
    not help, not Together's advice about its withdrawn models."""
    server = await make_serve()
    async with togembed.AsyncClient(base_url=server.base_url, model="BAAI/bge-base-en-v1.5") as c:
        with pytest.raises(togembed.ModelNotAvailableError) as info:
            await c.embed(["a"])
    text = str(info.value)
    assert info.value.message in text
    assert "togembed serve --alias BAAI/bge-base-en-v1.5" in text
    assert text.endswith(f"-- {togembed.ModelNotAvailableError.NOT_RETRIED}")
    assert "Together withdrew" not in text and "dedicated endpoint" not in text
    assert c.stats.requests == 1


async def test_unknown_model_404_lists_the_aliases_and_quotes_odd_names(make_serve, http) -> None:
    server = await make_serve(aliases=["BAAI/bge-small-en-v1.5"])
    status, doc, _ = await post(http, server, {"model": "my model", "input": "a"})
    assert status == 404
    message = doc["error"]["message"]
    assert f"serves {MODEL} (also answering to BAAI/bge-small-en-v1.5) only" in message
    assert "togembed serve --alias 'my model'" in message  # pastes into a shell as it is


async def test_too_many_inputs_is_413(make_serve, http) -> None:
    model = StandInModel()
    server = await make_serve(model, max_inputs_per_request=10)
    status, doc, _ = await post(http, server, {"model": MODEL, "input": ["a"] * 11})
    assert status == 413
    assert_error(doc, "Too many inputs: got 11, the maximum is 10", param="input")
    status, _, _ = await post(http, server, {"model": MODEL, "input": ["a"] * 10})
    assert status == 200


async def test_body_over_the_size_limit_is_413_json(make_serve, http) -> None:
    server = await make_serve(max_body_size=1000)
    status, doc, _ = await post(http, server, {"model": MODEL, "input": ["x" * 2000]})
    assert status == 413
    assert_error(doc, "Request too large", param="input")


async def test_api_key(make_serve, http) -> None:
    server = await make_serve(api_key="sekret")
    body = {"model": MODEL, "input": "a"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        status, doc, _ = await post(http, server, body, headers=headers)
        assert status == 401
        assert_error(doc, "Invalid API key")
        assert doc["error"]["code"] == "invalid_api_key"
    async with http.get(f"{server.base_url}/models") as resp:
        assert resp.status == 401
    status, _, _ = await post(http, server, body, headers={"Authorization": "Bearer sekret"})
    assert status == 200


async def test_no_api_key_accepts_any_bearer_or_none(make_serve, http) -> None:
    server = await make_serve()
    for headers in ({}, {"Authorization": "Bearer anything"}):
        status, _, _ = await post(http, server, {"model": MODEL, "input": "a"}, headers=headers)
        assert status == 200


async def test_unknown_routes_and_methods_answer_json(make_serve, http) -> None:
    server = await make_serve()
    async with http.get(f"{server.base_url}/nothing-here") as resp:
        assert resp.status == 404
        assert_error(await resp.json(), "Not found")
    async with http.get(f"{server.base_url}/embeddings") as resp:
        assert resp.status == 405
        assert_error(await resp.json(), "not allowed")
        assert "POST" in resp.headers["Allow"]


async def test_model_failure_is_500_and_spares_requests_batched_with_it(make_serve, http) -> None:
    model = StandInModel(fail_on="boom", delay=0.05)
    # The call goes when the three texts are queued (a full batch), not when a window closes.
    server = await make_serve(model, max_batch=3, max_wait=30)
    results = await asyncio.gather(
        post(http, server, {"model": MODEL, "input": ["fine one"]}),
        post(http, server, {"model": MODEL, "input": ["boom"]}),
        post(http, server, {"model": MODEL, "input": ["fine two"]}),
    )
    assert [r[0] for r in results] == [200, 500, 200]
    assert results[1][1]["error"]["type"] == "server_error"
    assert "refuses" in results[1][1]["error"]["message"]
    np.testing.assert_array_equal(rows_of(results[2][1]), model.expected(["fine two"]))
    assert len(model.calls[0]) == 3  # they did share a call, which failed
    assert server.stats.model_errors >= 1


# ---------------------------------------------------------------------------------------------
# Models and aliases


async def test_models_list(make_serve, http) -> None:
    server = await make_serve(aliases=["BAAI/bge-small-en-v1.5", "*"])
    async with http.get(f"{server.base_url}/models") as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["object"] == "list"
    assert [m["id"] for m in doc["data"]] == [MODEL, "BAAI/bge-small-en-v1.5"]
    for entry in doc["data"]:
        assert entry["object"] == "model"
        assert entry["type"] == "embedding"
        assert entry["root"] == MODEL
        assert entry["dimension"] == DIM
        assert entry["context_length"] == 16
        assert isinstance(entry["created"], int) and entry["owned_by"]
    async with http.get(f"{server.base_url}/models/BAAI/bge-small-en-v1.5") as resp:
        assert resp.status == 200
        assert (await resp.json())["id"] == "BAAI/bge-small-en-v1.5"
    async with http.get(f"{server.root_url}/health") as resp:
        assert (await resp.json()) == {"status": "ok", "model": MODEL, "dim": DIM}


async def test_aliases_map_to_the_local_model(make_serve, http) -> None:
    model = StandInModel()
    server = await make_serve(model, aliases=["BAAI/bge-base-en-v1.5"])
    status, doc, _ = await post(http, server, {"model": "BAAI/bge-base-en-v1.5", "input": "a"})
    assert status == 200
    assert doc["model"] == MODEL  # says which model really answered
    np.testing.assert_array_equal(rows_of(doc), model.expected(["a"]))
    status, _, _ = await post(http, server, {"model": "BAAI/bge-large-en-v1.5", "input": "a"})
    assert status == 404
    async with http.get(f"{server.base_url}/models/BAAI/bge-large-en-v1.5") as resp:
        assert resp.status == 404

    anything = await make_serve(model, aliases="*")
    status, _, _ = await post(http, anything, {"model": "whatever/model", "input": "a"})
    assert status == 200


# ---------------------------------------------------------------------------------------------
# Dynamic batching


async def test_concurrent_requests_share_model_calls(make_serve, http) -> None:
    gate = threading.Semaphore(0)
    model = StandInModel(gate=gate)
    server = await make_serve(model, max_batch=16, max_wait=0.02)
    requests = [[f"req {r} text {i}" for i in range(3)] for r in range(20)]
    sending = asyncio.gather(
        *(
            post(http, server, {"model": MODEL, "input": texts, "encoding_format": fmt})
            for texts, fmt in zip(requests, ["float", "base64"] * 10, strict=True)
        )
    )
    # The first call holds whatever came within max_wait; it answers once all 20 are queued.
    await wait_until(lambda: server.stats.requests == 20)
    gate.release(100)
    results = await sending
    for (status, doc, _), texts in zip(results, requests, strict=True):
        assert status == 200
        np.testing.assert_array_equal(rows_of(doc), model.expected(texts))
        assert doc["usage"]["prompt_tokens"] == 12
    assert sum(len(c) for c in model.calls) == 60
    assert all(len(c) <= 16 for c in model.calls)
    # The queued rest goes in full calls: at most 1 + ceil((60 - 3) / 16).
    assert all(len(c) == 16 for c in model.calls[1:-1]), [len(c) for c in model.calls]
    assert len(model.calls) <= 5
    assert server.stats.model_calls == len(model.calls)
    assert server.stats.largest_batch == 16
    assert server.stats.requests == 20 and server.stats.inputs == 60


async def test_a_lone_request_waits_at_most_max_wait(make_serve, http) -> None:
    model = StandInModel()
    server = await make_serve(model, max_wait=0.2)
    start = time.perf_counter()
    status, _, _ = await asyncio.wait_for(post(http, server, {"model": MODEL, "input": "a"}), 30)
    assert status == 200  # answered with no company coming...
    assert time.perf_counter() - start >= 0.15  # ...after waiting for some (a lower bound)
    assert model.calls == [["a"]]
    # A request that fills a batch does not wait at all: with a window of an hour, only that
    # can answer it in time.
    patient = await make_serve(model, max_wait=3600)
    body = {"model": MODEL, "input": ["a"] * 32}
    status, _, _ = await asyncio.wait_for(post(http, patient, body), 30)
    assert status == 200
    assert model.calls[1:] == [["a"] * 32]


async def test_model_runs_in_one_worker_thread_one_call_at_a_time(make_serve, http) -> None:
    model = StandInModel(delay=0.005)
    server = await make_serve(model, max_batch=4, max_wait=0)
    await asyncio.gather(
        *(post(http, server, {"model": MODEL, "input": [f"t{i}"] * 5}) for i in range(10))
    )
    assert len(model.calls) >= 13
    assert model.overlaps == 0
    assert len(model.threads) == 1
    assert threading.get_ident() not in model.threads


async def test_a_huge_request_does_not_starve_a_small_one(make_serve, http) -> None:
    gate = threading.Semaphore(0)
    model = StandInModel(gate=gate)
    server = await make_serve(model, max_batch=8, max_wait=0)
    huge = [f"huge {i}" for i in range(40)]  # 5 model calls
    done: list[str] = []

    async def send(name: str, texts: list[str]) -> None:
        status, doc, _ = await post(http, server, {"model": MODEL, "input": texts})
        assert status == 200
        np.testing.assert_array_equal(rows_of(doc), model.expected(texts))
        done.append(name)

    big = asyncio.ensure_future(send("huge", huge))
    await wait_until(lambda: len(model.calls) >= 1)  # the first call is running
    small = asyncio.ensure_future(send("small", ["small one", "small two"]))
    await wait_until(lambda: server.stats.requests == 2)  # queued behind it
    gate.release(2)  # the running call and the next one may answer
    await small
    assert done == ["small"] and not big.done()
    gate.release(100)
    await big
    assert done == ["small", "huge"]
    # Served by the call right after the one running when it arrived, sharing it with the
    # huge request's next slice.
    assert "small one" in model.calls[1] and "small two" in model.calls[1]
    assert any(t.startswith("huge") for t in model.calls[1])


async def test_each_batch_is_shared_between_queued_requests() -> None:
    batcher = Batcher(
        StandInModel(),
        max_batch=8,
        max_wait=0,
        stats=ServeStats(),
        model_lock=threading.Lock(),
    )
    loop = asyncio.get_running_loop()
    jobs = [
        Job([f"{name}{i}" for i in range(n)], DIM, loop.create_future(), 0.0)
        for name, n in (("a", 100), ("b", 3), ("c", 1))
    ]
    for job in jobs:
        batcher._queue.append(job)
        batcher._queued += len(job.texts)

    def take() -> list[tuple[str, int, int]]:
        return [(job.texts[0][0], start, stop) for job, start, stop in batcher._take()]

    # share = 8 // 3 = 2 each (c has only 1), the 3 left over go to the oldest request.
    assert take() == [("a", 0, 5), ("b", 0, 2), ("c", 0, 1)]
    # c is done; b (1 left) is now behind a, and still gets its share.
    assert take() == [("a", 5, 12), ("b", 2, 3)]
    assert take() == [("a", 12, 20)]
    assert batcher._queued == 100 - 20
    await batcher.aclose()


async def test_make_app_runs_under_aiohttps_own_runner() -> None:
    model = StandInModel()
    server = EmbeddingServer(model, max_wait=0)
    async with TestServer(server.make_app()) as test_server, TestClient(test_server) as client:
        resp = await client.post("/v1/embeddings", json={"model": MODEL, "input": ["a", "b"]})
        assert resp.status == 200
        np.testing.assert_array_equal(rows_of(await resp.json()), model.expected(["a", "b"]))
    assert server.stats.model_calls == 1


async def test_cancelled_request_drops_its_pending_work(make_serve, http) -> None:
    gate = threading.Semaphore(0)
    model = StandInModel(gate=gate)
    server = await make_serve(model, max_batch=4, max_wait=0)
    texts = [f"text {i}" for i in range(40)]  # 10 calls
    leaving = asyncio.ensure_future(post(http, server, {"model": MODEL, "input": texts}))
    await wait_until(lambda: len(model.calls) == 1)  # its first call is running
    leaving.cancel()  # the client goes away
    with pytest.raises(asyncio.CancelledError):
        await leaving
    await wait_until(lambda: server.stats.cancelled == 1)
    assert server.stats.embedded == 4  # the call already running
    assert server.stats.dropped == 36
    gate.release(100)
    # A request queued after it is answered by the very next call: nothing else ran between.
    status, doc, _ = await post(http, server, {"model": MODEL, "input": ["after"]})
    assert status == 200
    np.testing.assert_array_equal(rows_of(doc), model.expected(["after"]))
    assert model.calls == [texts[:4], ["after"]]


async def test_client_leaving_mid_answer_does_no_harm(make_serve, http, caplog) -> None:
    model = StandInModel(dim=1024)
    server = await make_serve(model, max_wait=0)
    texts = [f"text {i}" for i in range(2048)]  # ~23 MB of float JSON, written piece by piece
    for _ in range(3):
        resp = await http.post(
            f"{server.base_url}/embeddings", json={"model": MODEL, "input": texts}
        )
        assert resp.status == 200
        await resp.content.read(1000)
        resp.close()  # drop the connection with most of the body unsent
    status, doc, _ = await post(http, server, {"model": MODEL, "input": ["still fine"]})
    assert status == 200
    np.testing.assert_array_equal(rows_of(doc, 1024), model.expected(["still fine"]))
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def test_event_loop_stays_responsive_while_the_model_works(make_serve, http) -> None:
    """A ticker on the server's loop measures the loop thread's CPU time between two 2 ms ticks
    (robust on a busy machine) while the model works 0.2 s per call (0.1 s asleep, 0.1 s of
    CPU) and a 2048 x 1024 float answer (~160 ms of rendering) is written: on the loop, either
    would show as one 100+ ms tick. And each model call may only answer once the loop has
    ticked 3 times since it began: a loop blocked by the call would never let it (the
    wall-clock lag is only reported: a busy machine delays any thread)."""
    gate = threading.Semaphore(0)
    model = StandInModel(dim=1024, delay=0.1, burn=0.1, gate=gate)
    server = await make_serve(model, max_batch=1024, max_wait=0)
    loop = asyncio.get_running_loop()
    work: list[float] = []
    lags: list[float] = []
    permits = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal permits
        ticks_in_call = 0
        while not stop.is_set():
            t0, cpu0 = loop.time(), time.thread_time()
            await asyncio.sleep(0.002)
            work.append(time.thread_time() - cpu0)
            lags.append(loop.time() - t0 - 0.002)
            if model.started.is_set():  # a call began and waits for its permit
                ticks_in_call += 1
                if ticks_in_call == 3:
                    ticks_in_call = 0
                    model.started.clear()  # before the permit: the next call sets it again
                    permits += 1
                    gate.release()

    async def raw(body: dict[str, Any]) -> bytes:
        async with http.post(f"{server.base_url}/embeddings", json=body) as resp:
            assert resp.status == 200
            return await resp.read()  # parsed after the ticker: the client is not under test

    tick = asyncio.ensure_future(ticker())
    texts = [f"text {i}" for i in range(2048)]
    small = [[f"small {r} {i}" for i in range(64)] for r in range(16)]
    bodies = await asyncio.gather(
        raw({"model": MODEL, "input": texts}),
        *(raw({"model": MODEL, "input": s, "encoding_format": "base64"}) for s in small),
    )
    stop.set()
    await tick
    assert len(model.calls) >= 3
    assert permits == len(model.calls)  # every call answered after the loop ticked during it
    assert model.threads and threading.get_ident() not in model.threads
    report = f"loop work up to {max(work) * 1000:.0f} ms, lag up to {max(lags) * 1000:.0f} ms"
    assert max(work) < 0.05, report
    np.testing.assert_array_equal(rows_of(orjson.loads(bodies[0]), 1024), model.expected(texts))
    for body, chunk in zip(bodies[1:], small, strict=True):
        np.testing.assert_array_equal(rows_of(orjson.loads(body), 1024), model.expected(chunk))


# ---------------------------------------------------------------------------------------------
# Lifecycle


async def test_graceful_shutdown_finishes_requests_in_flight(http) -> None:
    model = StandInModel(delay=0.3)
    server = EmbeddingServer(model, max_wait=0)
    await server.start()
    url = server.base_url
    pending = asyncio.ensure_future(post(http, server, {"model": MODEL, "input": ["a", "b"]}))
    await wait_until(lambda: len(model.calls) == 1)
    await server.close()
    status, doc, _ = await pending
    assert status == 200
    np.testing.assert_array_equal(rows_of(doc), model.expected(["a", "b"]))
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as fresh:
            await fresh.post(f"{url}/embeddings", json={"model": MODEL, "input": "a"})
    await server.close()  # idempotent


async def test_server_options_are_checked() -> None:
    for bad in ({"max_batch": 0}, {"max_wait": -1}, {"max_inputs_per_request": 0}):
        with pytest.raises(ValueError):
            EmbeddingServer(StandInModel(), **bad)
    server = EmbeddingServer(StandInModel())
    with pytest.raises(RuntimeError):
        server.base_url  # noqa: B018
    async with server:
        assert server.base_url.startswith("http://127.0.0.1:")
        assert server.base_url.endswith("/v1")
        assert MODEL in repr(server)
        with pytest.raises(RuntimeError):
            await server.start()


async def test_serve_prints_the_ready_line_and_stops_on_request() -> None:
    out = io.StringIO()
    stop = asyncio.Event()
    task = asyncio.ensure_future(
        serve("127.0.0.1", 0, model=StandInModel(), stop=stop, out=out, max_wait=0)
    )
    await wait_until(lambda: "listening" in out.getvalue())
    line = out.getvalue().strip()
    assert line.startswith("togembed serve: listening on http://127.0.0.1:")
    assert line.endswith(f"/v1 (model {MODEL}, dim {DIM})")
    base_url = line.split(" on ")[1].split(" ")[0]
    async with togembed.AsyncClient(base_url=base_url, model=MODEL) as client:
        vectors = await client.embed(["a", "b"])
    np.testing.assert_array_equal(vectors, StandInModel().expected(["a", "b"]))
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_serve_prints_a_stopped_line_once_closed() -> None:
    out = io.StringIO()
    stop = asyncio.Event()
    task = asyncio.ensure_future(
        serve("127.0.0.1", 0, model=StandInModel(), stop=stop, out=out, max_wait=0)
    )
    await wait_until(lambda: "listening" in out.getvalue())
    base_url = out.getvalue().split(" on ")[1].split(" ")[0]
    async with togembed.AsyncClient(base_url=base_url, model=MODEL) as client:
        await client.embed(["a", "b", "c"])
    assert "stopped" not in out.getvalue()
    stop.set()
    await asyncio.wait_for(task, 5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("togembed serve: listening on ")
    assert lines[1] == "togembed serve: stopped (1 request, 3 inputs embedded)"


def test_stopped_line_format() -> None:
    server = EmbeddingServer(StandInModel())
    assert stopped_line(server) == "togembed serve: stopped (0 requests, 0 inputs embedded)"
    server.stats.requests, server.stats.inputs = 1234, 1
    assert stopped_line(server) == "togembed serve: stopped (1,234 requests, 1 input embedded)"


# A server whose model says "embedding" when a call starts and answers only once a line comes
# on stdin, and which says "stopping" once a signal has asked it to stop.
_SERVE_CODE = """
import asyncio
import sys

from standin_model import StandInModel
from togembed.server import serve


class Held(StandInModel):
    def embed(self, texts):
        print("embedding", flush=True)
        sys.stdin.readline()
        return super().embed(texts)


async def main():
    stop = asyncio.Event()

    async def announce():
        await stop.wait()
        print("stopping", flush=True)

    watcher = asyncio.ensure_future(announce())
    await serve("127.0.0.1", 0, api_key="k", model=Held(), stop=stop)
    await watcher


asyncio.run(main())
print("exited cleanly", flush=True)
"""


def _serve_in_subprocess() -> subprocess.Popen[str]:
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    return subprocess.Popen(
        [sys.executable, "-c", _SERVE_CODE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_serve_process_stops_gracefully_on_signal(sig: signal.Signals) -> None:
    proc = _serve_in_subprocess()
    try:
        assert proc.stdout is not None and proc.stdin is not None
        stdin, stdout = proc.stdin, proc.stdout

        async def next_line() -> str:
            return await asyncio.wait_for(asyncio.to_thread(stdout.readline), 30)

        line = await next_line()
        assert line.startswith("togembed serve: listening on http://127.0.0.1:"), line
        base_url = line.split(" on ")[1].split(" ")[0]
        async with togembed.AsyncClient(base_url=base_url, model=MODEL, api_key="k") as client:
            pending = asyncio.ensure_future(client.embed(["in flight"]))
            assert await next_line() == "embedding\n"  # the model is working on it
            proc.send_signal(sig)
            assert await next_line() == "stopping\n"  # the server is shutting down...
            stdin.write("answer now\n")
            stdin.flush()
            vectors = await pending  # ...and still finishes the request, not cut off
        np.testing.assert_array_equal(vectors, StandInModel().expected(["in flight"]))
        rest, err = await asyncio.wait_for(asyncio.to_thread(proc.communicate), 15)
        assert proc.returncode == 0, err
        assert "exited cleanly" in rest
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_local_server_runs_in_this_loop_and_loads_by_name(monkeypatch) -> None:
    loaded: list[str | None] = []

    def load_model(name: str | None = None) -> StandInModel:
        loaded.append(name)
        return StandInModel(name=name or MODEL)

    fake = types.ModuleType("togembed.local.model")
    fake.load_model = load_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "togembed.local.model", fake)

    async with local_server("BAAI/bge-small-en-v1.5", max_wait=0) as base_url:
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        async with togembed.AsyncClient(base_url=base_url) as client:
            resp = await client.embeddings.create(model="BAAI/bge-small-en-v1.5", input=["x"])
    assert loaded == ["BAAI/bge-small-en-v1.5"]
    assert resp.model == "BAAI/bge-small-en-v1.5"
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session:
            await session.get(f"{base_url}/models")


async def test_local_server_reports_a_failed_load(monkeypatch) -> None:
    def load_model(name: str | None = None) -> StandInModel:
        raise OSError(f"no such model {name}")

    fake = types.ModuleType("togembed.local.model")
    fake.load_model = load_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "togembed.local.model", fake)
    with pytest.raises(OSError, match="no such model nope"):
        async with local_server("nope"):
            pass


async def test_serve_can_be_stopped_while_the_model_is_still_loading(monkeypatch) -> None:
    loading, release = threading.Event(), threading.Event()

    def load_model(name: str | None = None) -> StandInModel:
        loading.set()
        release.wait(60)  # a long download
        return StandInModel()

    fake = types.ModuleType("togembed.local.model")
    fake.load_model = load_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "togembed.local.model", fake)
    out = io.StringIO()
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve("127.0.0.1", 0, "big/model", stop=stop, out=out))
    await wait_until(loading.is_set)
    stop.set()
    await asyncio.wait_for(task, 30)  # did not wait for the load (60 s)
    assert out.getvalue() == ""
    release.set()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


async def test_serve_warns_when_reachable_from_other_machines_without_a_key(
    monkeypatch, capsys
) -> None:
    monkeypatch.setattr(togembed.server.app, "is_loopback_host", lambda host: False)
    for api_key, warned in ((None, True), ("k", False)):
        out = io.StringIO()
        stop = asyncio.Event()
        task = asyncio.ensure_future(
            serve("127.0.0.1", 0, api_key=api_key, model=StandInModel(), stop=stop, out=out)
        )
        await wait_until(lambda out=out: "listening" in out.getvalue())
        stop.set()
        await task
        err = capsys.readouterr().err
        assert ("no API key is set" in err) is warned


def test_ready_line_format() -> None:
    server = EmbeddingServer(StandInModel(dim=384))
    server._base_url = "http://127.0.0.1:8000/v1"
    assert ready_line(server) == (
        f"togembed serve: listening on http://127.0.0.1:8000/v1 (model {MODEL}, dim 384)"
    )


# ---------------------------------------------------------------------------------------------
# Clients: togembed, openai-python, together


async def test_togembed_async_client(make_serve) -> None:
    model = StandInModel()
    server = await make_serve(model, max_batch=16, max_inputs_per_request=20)
    texts = [f"text {i}" for i in range(150)]
    # batch_size 32 > the server's 20: the client splits on the 413 and carries on.
    async with togembed.AsyncClient(base_url=server.base_url, model=MODEL, batch_size=32) as c:
        vectors = await c.embed(texts)
        np.testing.assert_array_equal(vectors, model.expected(texts))
        for fmt in (None, "float", "base64"):
            resp = await c.embeddings.create(input=texts[:30], encoding_format=fmt)
            assert resp.model == MODEL
            assert [d.index for d in resp.data] == list(range(30))
            got = np.array(
                [
                    np.frombuffer(base64.b64decode(d.embedding), "<f4")
                    if fmt == "base64"
                    else d.embedding
                    for d in resp.data
                ],
                dtype=np.float32,
            )
            np.testing.assert_array_equal(got, model.expected(texts[:30]))
            assert resp.usage is not None and resp.usage.total_tokens == 60
        one = await c.embeddings.create(input="one string")
        assert len(one.data) == 1
    assert c.stats.batches_split >= 1


async def test_togembed_sees_togethers_errors(make_serve) -> None:
    server = await make_serve(api_key="right")
    async with togembed.AsyncClient(base_url=server.base_url, api_key="wrong", model=MODEL) as c:
        with pytest.raises(togembed.AuthenticationError):
            await c.embed(["a"])
    async with togembed.AsyncClient(base_url=server.base_url, api_key="right") as c:
        with pytest.raises(togembed.NotFoundError):
            await c.embed(["a"], model="no/such-model")


async def test_openai_async_client(make_serve) -> None:
    openai = pytest.importorskip("openai")
    model = StandInModel(dim=64)
    server = await make_serve(model, api_key="sk-local")
    texts = ["first text", "second text here", "third"]
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-local") as client:
        default = await client.embeddings.create(model=MODEL, input=texts)  # base64 on the wire
        floats = await client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
        single = await client.embeddings.create(model=MODEL, input="third")
        listed = await client.models.list()
        raw = await client.embeddings.with_raw_response.create(model=MODEL, input=texts)
        assert isinstance(raw.http_response.json()["data"][0]["embedding"], str)  # base64
        with pytest.raises(openai.NotFoundError):
            await client.embeddings.create(model="text-embedding-3-small", input="a")
        with pytest.raises(openai.BadRequestError, match="Unrecognized request arguments"):
            await client.embeddings.create(model=MODEL, input="a", dimensions=32)
    expected = model.expected(texts)
    for resp in (default, floats):
        assert resp.model == MODEL
        assert [d.index for d in resp.data] == [0, 1, 2]
        np.testing.assert_array_equal(
            np.array([d.embedding for d in resp.data], dtype=np.float32), expected
        )
        assert resp.usage.prompt_tokens == 6 and resp.usage.total_tokens == 6
    np.testing.assert_array_equal(np.array(single.data[0].embedding, np.float32), expected[2])
    assert [m.id for m in listed.data] == [MODEL]
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="nope") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.embeddings.create(model=MODEL, input="a")


async def test_together_async_client(make_serve) -> None:
    together = pytest.importorskip("together")
    model = StandInModel(dim=64)
    server = await make_serve(model, api_key="tg-local", aliases=["BAAI/bge-base-en-v1.5"])
    texts = ["first text", "second text here", "third"]
    client = together.AsyncTogether(base_url=server.root_url, api_key="tg-local")
    try:
        resp = await client.embeddings.create(model="BAAI/bge-base-en-v1.5", input=texts)
        single = await client.embeddings.create(model=MODEL, input="third")
        # The SDK sends no encoding_format (float is the default); asking for it explicitly
        # must work too.
        explicit = await client.embeddings.create(
            model=MODEL, input=texts, extra_body={"encoding_format": "float"}
        )
        with pytest.raises(together.NotFoundError):
            await client.embeddings.create(model="BAAI/bge-large-en-v1.5", input="a")
    finally:
        close = getattr(client, "close", None)
        if close is not None:
            await close()
    assert resp.model == MODEL
    assert [d.index for d in resp.data] == [0, 1, 2]
    np.testing.assert_array_equal(
        np.array([d.embedding for d in resp.data], dtype=np.float32), model.expected(texts)
    )
    np.testing.assert_array_equal(
        np.array([d.embedding for d in explicit.data], dtype=np.float32), model.expected(texts)
    )
    np.testing.assert_array_equal(
        np.array(single.data[0].embedding, np.float32), model.expected(["third"])[0]
    )
