"""The client's edges (issue 10 §1, §4; issue 14 §6, §7): models that are not available, keys
echoed by servers, texts that cannot be sent, large bodies, bad model names and base URLs,
redirect loops, connection failures, closing from another loop or not at all."""

from __future__ import annotations

import asyncio
import gc
import logging
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from apps import App, apps, embeddings, error, json_response
from helpers import MakeServer, wait_until

import togembed
from togembed.testing import FakeTogetherServer, fake_embeddings, serve_in_thread

MODEL = "BAAI/bge-base-en-v1.5"
DIM = 32
make_app = pytest.fixture(name="make_app")(apps)


def texts(n: int) -> list[str]:
    return [f"text number {i}" for i in range(n)]


@pytest.fixture
async def server(make_server: MakeServer) -> FakeTogetherServer:
    return await make_server()


# ---------------------------------------------------------------------------------------------
# A model that is not available: never retried, the whole call stops


TOGETHER_503 = {
    "message": "Model BAAI/bge-base-en-v1.5 is not available",
    "type": "service_unavailable",
    "code": "model_not_available",
}
# Together's wording (400), as quoted in public issue threads (HeyPuter/puter#3168).
TOGETHER_NON_SERVERLESS = {
    "message": "Unable to access non-serverless model BAAI/bge-base-en-v1.5. Please visit "
    "https://api.together.ai/models/BAAI/bge-base-en-v1.5 to create and start a new dedicated "
    "endpoint for the model.",
    "type": "invalid_request_error",
    "param": None,
    "code": "model_not_available",
}


def fixed(status: int, err: dict[str, Any]) -> Any:
    async def handler(request: web.Request) -> web.Response:
        return json_response(status, {"error": err}, headers={"x-request-id": "req-42"})

    return handler


@pytest.mark.parametrize(
    ("status", "err"),
    [
        (503, TOGETHER_503),
        (400, TOGETHER_NON_SERVERLESS),
        (503, {"message": "Unable to access non-serverless model X", "type": "server_error"}),
    ],
)
async def test_model_not_available_is_one_request_then_a_typed_error_saying_what_to_do(
    make_app: Any, status: int, err: dict[str, Any]
) -> None:
    app: App = await make_app({("POST", "/v1/embeddings"): fixed(status, err)})
    async with togembed.AsyncClient(base_url=app.base_url, model=MODEL) as client:
        with pytest.raises(togembed.ModelNotAvailableError) as info:
            await client.embed(["a"])
    exc = info.value
    assert app.requests == 1
    assert client.stats.retries == 0
    assert isinstance(exc, togembed.NotFoundError)
    assert exc.status_code == status
    assert exc.request_id == "req-42"
    assert exc.body == {"error": err}
    assert exc.message == f"HTTP {status}: {err['message']}"  # the server's own words
    text = str(exc)
    assert err["message"] in text
    for advice in ("dedicated endpoint", "https://api-inference.together.ai/v1", "--local"):
        assert advice in text


async def test_unknown_model_404_is_model_not_available(make_server: MakeServer) -> None:
    server = await make_server(models=[MODEL])
    async with togembed.AsyncClient(base_url=server.base_url, model="no/such") as client:
        with pytest.raises(togembed.ModelNotAvailableError) as info:
            await client.embeddings.create(input=texts(3))
    assert info.value.status_code == 404
    assert server.stats.requests == 1


async def test_a_503_that_is_not_about_the_model_is_still_retried(
    server: FakeTogetherServer,
) -> None:
    server.faults.extend(["503", "503"])
    async with togembed.AsyncClient(base_url=server.base_url, model=MODEL) as client:
        arr = await client.embed(texts(4))
    np.testing.assert_array_equal(arr, fake_embeddings(texts(4), DIM))
    assert server.stats.status_counts == {503: 2, 200: 1}


async def test_a_404_about_the_url_is_a_plain_not_found_error(make_app: Any) -> None:
    async def nowhere(request: web.Request) -> web.Response:
        return error(404, "Not found: POST /v2/embeddings")

    app = await make_app({("POST", "/v1/embeddings"): nowhere})
    async with togembed.AsyncClient(base_url=app.base_url, model=MODEL) as client:
        with pytest.raises(togembed.NotFoundError) as info:
            await client.embed(["a"])
    assert not isinstance(info.value, togembed.ModelNotAvailableError)


def holding_503(arrivals: int) -> tuple[Any, list[int]]:
    """A handler that holds requests until ``arrivals`` are in flight, then answers all with
    Together's 503 model_not_available (so exactly that many are in flight at the error)."""
    count = [0]
    all_in = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        count[0] += 1
        if count[0] >= arrivals:
            all_in.set()
        await all_in.wait()
        return json_response(503, {"error": TOGETHER_503})

    return handler, count


@pytest.mark.parametrize("stream", [False, True])
async def test_model_not_available_stops_a_multi_batch_call_after_one_request(
    make_app: Any, stream: bool
) -> None:
    """Concurrency 1: the first answer ends the call; nothing else is sent."""
    handler, _ = holding_503(1)
    app = await make_app({("POST", "/v1/embeddings"): handler})
    items = texts(200)
    async with togembed.AsyncClient(
        base_url=app.base_url, model=MODEL, batch_size=10, concurrency=1
    ) as client:
        with pytest.raises(togembed.ModelNotAvailableError):
            if stream:
                async for _ in client.embed_stream(items):
                    pass
            else:
                await client.embed(items)
    assert app.requests == 1


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("probing", [True, False])
async def test_model_not_available_sends_nothing_after_the_requests_in_flight(
    make_app: Any, stream: bool, probing: bool
) -> None:
    """Concurrency 4: at most the requests already in flight reach the server. A new client's
    limiter sends one request first (probing): then that one is all; with a configured rate,
    all 4 are in flight when the answers come, and no fifth follows."""
    in_flight = 1 if probing else 4
    handler, _ = holding_503(in_flight)
    app = await make_app({("POST", "/v1/embeddings"): handler})
    items = texts(400)
    rate = {} if probing else {"rpm": 1e6}
    async with togembed.AsyncClient(
        base_url=app.base_url, model=MODEL, batch_size=10, concurrency=4, **rate
    ) as client:
        with pytest.raises(togembed.ModelNotAvailableError):
            if stream:
                async for _ in client.embed_stream(items):
                    pass
            else:
                await client.embed(items)
    assert app.requests == in_flight


# ---------------------------------------------------------------------------------------------
# An API key the server echoes back is redacted everywhere

SECRET = "sk-SECRET-echoed-0123456789abcdef"


async def echoing(request: web.Request) -> web.Response:
    auth = request.headers.get("Authorization", "")
    return json_response(
        400,
        {
            "error": {
                "message": f"Invalid header 'Authorization: {auth}' (key {SECRET})",
                "type": "invalid_request_error",
                "param": None,
            },
            "echo": {"headers": {"Authorization": auth}, "keys": [SECRET, {"k": SECRET}]},
        },
    )


async def test_a_key_echoed_in_an_error_is_redacted_from_message_body_repr_and_logs(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="togembed")
    app = await make_app({("POST", "/v1/embeddings"): echoing})
    async with togembed.AsyncClient(base_url=app.base_url, api_key=SECRET, model=MODEL) as c:
        with pytest.raises(togembed.BadRequestError) as info:
            await c.embed(["only one"])
    exc = info.value
    assert app.seen[0].headers["Authorization"] == f"Bearer {SECRET}"  # it was sent
    for text in (str(exc), repr(exc), exc.message, repr(exc.body), repr(exc.__dict__)):
        assert SECRET not in text
    assert "Bearer [REDACTED]" in exc.message
    assert exc.body["echo"]["keys"] == ["[REDACTED]", {"k": "[REDACTED]"}]
    assert SECRET not in caplog.text


async def test_a_key_echoed_in_retried_errors_never_reaches_the_log_or_collected_errors(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="togembed")

    async def flaky(request: web.Request) -> web.Response:
        if len(app.seen) == 1:
            return error(500, f"upstream refused key {SECRET}")
        if len(app.seen) == 2:
            return web.Response(status=200, text=f'{{"data": "oops {SECRET}"}}')
        return error(400, f"Input validation error: input 0 is invalid for key {SECRET}")

    app = await make_app({("POST", "/v1/embeddings"): flaky})
    async with togembed.AsyncClient(base_url=app.base_url, api_key=SECRET, model=MODEL) as c:
        chunks = [chunk async for chunk in c.embed_stream(["x"], errors="collect")]
    (error_,) = chunks[0].errors.values()
    assert "retrying" in caplog.text  # the 500 and the garbled 200 were logged with the key...
    assert SECRET not in caplog.text  # ...redacted
    assert SECRET not in str(error_) and "[REDACTED]" in str(error_)


async def test_a_key_echoed_in_a_garbled_200_is_redacted_from_the_kept_body(
    make_app: Any,
) -> None:
    async def garbled(request: web.Request) -> web.Response:
        return web.Response(status=200, text=f"<html>Bearer {SECRET}</html>")

    app = await make_app({("POST", "/v1/embeddings"): garbled})
    async with togembed.AsyncClient(
        base_url=app.base_url, api_key=SECRET, model=MODEL, max_retries=0
    ) as c:
        with pytest.raises(togembed.APIResponseValidationError) as info:
            await c.embed(["a"])
    assert info.value.body is not None
    assert SECRET.encode() not in info.value.body
    assert b"[REDACTED]" in info.value.body


# ---------------------------------------------------------------------------------------------
# Texts that cannot be sent: lone surrogates


@pytest.mark.parametrize("call", ["embed", "create", "stream"])
async def test_lone_surrogate_is_an_invalid_input_error_naming_it_before_any_request(
    server: FakeTogetherServer, call: str
) -> None:
    items = texts(300)
    items[137] = "caf\udce9 au lait"  # what surrogateescape leaves of a latin-1 byte
    async with togembed.AsyncClient(base_url=server.base_url, model=MODEL) as client:
        with pytest.raises(togembed.InvalidInputError) as info:
            if call == "embed":
                await client.embed(items)
            elif call == "create":
                await client.embeddings.create(input=items)
            else:
                async for _ in client.embed_stream(items, window=100_000):
                    pass
    assert info.value.index == 137
    assert "input 137" in str(info.value) and "surrogate" in str(info.value)
    assert isinstance(info.value, (TypeError, ValueError))
    if call == "stream":  # the batches before it may go; its own batch and later ones never
        assert all(r.n_inputs and r.n_inputs <= 128 for r in server.stats.log)
        assert server.stats.inputs <= 128
    else:
        assert server.stats.requests == 0


async def test_lone_surrogate_in_a_collecting_stream_fails_alone(
    server: FakeTogetherServer,
) -> None:
    items = texts(50)
    bad = {3: "\ud800", 20: "x\udfffy", 21: "\udc80"}
    for i, text in bad.items():
        items[i] = text
    async with togembed.AsyncClient(base_url=server.base_url, model=MODEL) as client:
        chunks = [c async for c in client.embed_stream(items, errors="collect")]
    rows = np.concatenate([c.vectors for c in chunks])
    errors = {pos: err for c in chunks for pos, err in c.errors.items()}
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)
    assert rows.shape == (50, DIM)
    assert sorted(errors) == sorted(bad)
    for pos, err in errors.items():
        assert isinstance(err, togembed.InvalidInputError)
        assert err.index == err.input_index == pos
        assert np.isnan(rows[pos]).all()
    good = [i for i in range(50) if i not in bad]
    np.testing.assert_array_equal(rows[good], fake_embeddings([items[i] for i in good], DIM))
    assert server.stats.inputs == len(good)  # the bad ones were never sent


async def test_non_ascii_text_without_surrogates_is_sent_as_is(
    server: FakeTogetherServer,
) -> None:
    items = ["héllo", "東京", "🚀 emoji", "\U0010ffff"]
    async with togembed.AsyncClient(base_url=server.base_url, model=MODEL) as client:
        arr = await client.embed(items)
    np.testing.assert_array_equal(arr, fake_embeddings(items, DIM))


# ---------------------------------------------------------------------------------------------
# Bodies over 1 MiB: no ResourceWarning from aiohttp


async def test_a_body_over_one_mib_is_sent_without_a_resource_warning(
    server: FakeTogetherServer,
) -> None:
    items = ["x" * 700_000, "y" * 700_000]  # one batch (the budget allows a lone big input...)
    async with togembed.AsyncClient(
        base_url=server.base_url, model=MODEL, max_batch_tokens=10**7
    ) as client:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            arr = await client.embed(items)
    assert [r.n_inputs for r in server.stats.log] == [2]  # ... so both travelled together
    np.testing.assert_array_equal(arr, fake_embeddings(items, DIM))


# ---------------------------------------------------------------------------------------------
# Model names


async def test_missing_empty_or_non_str_model_is_a_typed_value_error_without_request(
    server: FakeTogetherServer,
) -> None:
    async with togembed.AsyncClient(base_url=server.base_url) as no_default:
        with pytest.raises(togembed.InvalidModelError, match="no model"):
            await no_default.embed(["a"])
    async with togembed.AsyncClient(base_url=server.base_url, model=MODEL) as client:
        for bad in ("", "   ", 3, b"m"):
            with pytest.raises(togembed.InvalidModelError) as info:
                await client.embed(["a"], model=bad)  # type: ignore[arg-type]
            assert isinstance(info.value, togembed.TogembedError)
            assert isinstance(info.value, ValueError)
            with pytest.raises(togembed.InvalidModelError):
                await client.embeddings.create(input="a", model=bad)  # type: ignore[arg-type]
            with pytest.raises(togembed.InvalidModelError):
                async for _ in client.embed_stream(["a"], model=bad):  # type: ignore[arg-type]
                    pass
    with pytest.raises(togembed.InvalidModelError):
        togembed.AsyncClient(base_url=server.base_url, model="")
    assert server.stats.requests == 0


async def test_empty_model_does_not_fall_back_to_the_client_default(
    server: FakeTogetherServer,
) -> None:
    async with togembed.AsyncClient(base_url=server.base_url, model=MODEL) as client:
        with pytest.raises(togembed.InvalidModelError, match="empty"):
            await client.embeddings.create(input="a", model="")
    assert server.stats.requests == 0


# ---------------------------------------------------------------------------------------------
# Base URLs


@pytest.mark.parametrize(
    ("url", "suggestion"),
    [
        ("127.0.0.1:8765/v1", "http://127.0.0.1:8765/v1"),
        ("localhost:8000", "http://localhost:8000"),
        ("ftp://example.com/v1", "https://"),
        ("http://", "https://"),
        ("http://host:port/v1", "https://"),
    ],
)
def test_malformed_base_url_is_a_clear_error_at_construction(
    monkeypatch: pytest.MonkeyPatch, url: str, suggestion: str
) -> None:
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)  # no key: not a MissingAPIKeyError
    with pytest.raises(togembed.InvalidBaseURLError) as info:
        togembed.AsyncClient(base_url=url)
    assert isinstance(info.value, togembed.TogembedError)
    assert isinstance(info.value, ValueError)
    assert "malformed" in str(info.value) and url in str(info.value)
    assert suggestion in str(info.value)
    with pytest.raises(togembed.InvalidBaseURLError):
        togembed.Client(base_url=url)


def test_malformed_base_url_from_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOGETHER_BASE_URL", "127.0.0.1:8765/v1")
    with pytest.raises(togembed.InvalidBaseURLError, match="TOGETHER_BASE_URL"):
        togembed.AsyncClient()


# ---------------------------------------------------------------------------------------------
# 200 with an error body, redirect loops


async def test_a_200_carrying_an_error_surfaces_the_servers_message(make_app: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        err = {"message": "upstream embedder exploded", "type": "server_error", "code": 500}
        return json_response(200, {"error": err})

    app = await make_app({("POST", "/v1/embeddings"): handler})
    async with togembed.AsyncClient(base_url=app.base_url, model=MODEL, max_retries=1) as c:
        with pytest.raises(togembed.APIResponseValidationError) as info:
            await c.embed(["a"])
    assert "upstream embedder exploded" in info.value.message
    assert info.value.error_type == "server_error"
    assert info.value.code == "500"
    assert app.requests == 2  # retried like any garbled 200


async def test_a_200_error_then_a_good_answer_succeeds(make_app: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        if len(app.seen) == 1:
            return json_response(200, {"error": "try again"})
        return embeddings(request_texts(app), 3)

    app = await make_app({("POST", "/v1/embeddings"): handler})
    async with togembed.AsyncClient(base_url=app.base_url, model=MODEL) as c:
        arr = await c.embed(["a", "b"])
    assert arr.tolist() == [[0.0] * 3, [1.0] * 3]


def request_texts(app: App) -> list[str]:
    texts_ = app.seen[-1].body["input"]
    return [texts_] if isinstance(texts_, str) else texts_


async def test_a_redirect_loop_is_one_typed_error_not_retried(make_app: Any) -> None:
    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPPermanentRedirect(location=f"{app.base_url}/embeddings")

    app = await make_app({("POST", "/v1/embeddings"): loop})
    async with togembed.AsyncClient(base_url=app.base_url, model=MODEL) as c:
        with pytest.raises(togembed.TooManyRedirectsError) as info:
            await c.embed(["a"])
    assert c.stats.requests == 1 and c.stats.retries == 0
    assert app.requests == 10  # aiohttp's limit of 10 answers in a row, once: no retry
    assert info.value.status_code == 308
    assert info.value.location == f"{app.base_url}/embeddings"
    assert "redirects in a loop" in str(info.value) and f"{app.base_url}/embeddings" in str(
        info.value
    )


# ---------------------------------------------------------------------------------------------
# Connection failures: visible, and optionally fast


async def test_connection_refused_warns_once_per_client_and_logs_each_retry(
    refused_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="togembed")
    async with togembed.AsyncClient(base_url=refused_url, model=MODEL, max_retries=2) as c:
        for _ in range(2):
            with pytest.raises(togembed.APIConnectionError) as info:
                await c.embed(["a"])
            assert info.value.connect_failed
    warnings_ = [r for r in caplog.records if r.levelno == logging.WARNING]
    retries = [r for r in caplog.records if r.levelno == logging.INFO and "retrying" in r.message]
    assert len(warnings_) == 1
    assert "cannot reach" in warnings_[0].message and refused_url in warnings_[0].message
    assert "connect_retries=0" in warnings_[0].message
    assert len(retries) == 4  # 2 retries per call, each logged
    assert c.stats.requests == 6


@pytest.mark.parametrize(
    "kwargs",
    [{"connect_retries": 0}, {"retry": togembed.RetryPolicy(connect_retries=0)}],
)
async def test_connect_retries_zero_fails_fast(refused_url: str, kwargs: dict[str, Any]) -> None:
    async with togembed.AsyncClient(base_url=refused_url, model=MODEL, **kwargs) as c:
        with pytest.raises(togembed.APIConnectionError):
            await c.embed(["a"])
    assert c.stats.requests == 1 and c.stats.retries == 0
    assert c.retry.max_connect_retries == 0 and c.retry.max_retries == 6


async def test_connect_retries_do_not_limit_other_retries(server: FakeTogetherServer) -> None:
    server.faults.extend(["500", "drop_fin", "502"])
    async with togembed.AsyncClient(base_url=server.base_url, model=MODEL, connect_retries=0) as c:
        arr = await c.embed(["a"])
    np.testing.assert_array_equal(arr, fake_embeddings(["a"], DIM))
    assert server.stats.requests == 4


# ---------------------------------------------------------------------------------------------
# Closing from another event loop


def _sockets(client: togembed.AsyncClient) -> list[Any]:
    connector = client._transport._session.connector  # type: ignore[attr-defined]
    protos = [p for conns in connector._conns.values() for p, _ in conns]
    socks = [p.transport.get_extra_info("socket") for p in protos if p.transport is not None]
    assert socks, "the client holds no keep-alive connection to test with"
    return socks


@pytest.fixture
def threaded_server() -> Iterator[FakeTogetherServer]:
    with serve_in_thread(dim=DIM) as s:
        yield s


@pytest.mark.parametrize("owner", ["running", "stopped", "closed"])
async def test_close_from_another_event_loop_closes_the_sockets(
    threaded_server: FakeTogetherServer, owner: str
) -> None:
    client = togembed.AsyncClient(base_url=threaded_server.base_url, model=MODEL)
    loop = asyncio.new_event_loop()
    thread = None
    if owner == "running":
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(client.embed(["a"]), loop).result(10)
    else:  # in another thread: this one runs the test's loop
        await asyncio.to_thread(loop.run_until_complete, client.embed(["a"]))
    socks = _sockets(client)
    if owner == "closed":
        loop.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await client.close()  # from this test's loop
        gc.collect()
    assert [s.fileno() for s in socks] == [-1] * len(socks)
    assert [str(w.message) for w in caught] == []
    await wait_until(lambda: threaded_server.stats.requests == 1)
    if thread is not None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
    if not loop.is_closed():
        loop.close()


# ---------------------------------------------------------------------------------------------
# A sync Client nobody closes


def test_sync_client_never_closed_is_closed_quietly_at_exit(tmp_path: Any) -> None:
    script = tmp_path / "forgot_close.py"
    script.write_text(
        textwrap.dedent(
            """
            import togembed
            from togembed.testing import serve_in_thread

            with serve_in_thread(dim=8) as server:
                client = togembed.Client(base_url=server.base_url, model="m")
                print(client.embed(["a", "b"]).shape)
                client.models.list()
            # the script ends without client.close(); the server is already gone
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-W", "always", "-X", "dev", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 8)"
    assert done.stderr == ""


def test_sync_client_dropped_without_close_is_closed_on_garbage_collection(
    threaded_server: FakeTogetherServer,
) -> None:
    client = togembed.Client(base_url=threaded_server.base_url, model=MODEL)
    client.embed(["a"])
    thread = client._portal._thread
    session = client._async._transport._session  # type: ignore[attr-defined]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del client
        gc.collect()
    assert not thread.is_alive()
    assert session.closed
    assert [str(w.message) for w in caught] == []


def test_sync_client_close_then_garbage_collection_does_nothing_more(
    threaded_server: FakeTogetherServer,
) -> None:
    client = togembed.Client(base_url=threaded_server.base_url, model=MODEL)
    client.embed(["a"])
    client.close()
    assert not client._finalizer.alive
    del client
    gc.collect()


async def test_models_list_against_a_server_that_is_down_says_so_and_counts_retries(
    refused_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``togembed models`` must not retry in silence: the same warning as embeddings."""
    caplog.set_level(logging.INFO, logger="togembed")
    async with togembed.AsyncClient(base_url=refused_url, model=MODEL, max_retries=2) as c:
        with pytest.raises(togembed.APIConnectionError):
            await c.models.list()
    warnings_ = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings_) == 1 and "cannot reach" in warnings_[0].message
    assert c.stats.retries == 2
