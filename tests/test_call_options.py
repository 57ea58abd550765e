"""Per-call options as the peers accept them (issue 14 §3, issue 12): ``dimensions``, ``user``,
``extra_headers``/``extra_query``/``extra_body``, ``timeout`` for the whole call; and the
policy's ``max_retry_after`` bounding every pause (issue 10 §4)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from apps import App, apps, embeddings, error
from helpers import MakeServer

import togembed
from togembed.core.limiter import Feedback, Ticket
from togembed.core.ratelimit import RateLimiter
from togembed.core.transport import AiohttpTransport
from togembed.testing import FakeTogetherServer, fake_embeddings, serve_in_thread

MODEL = "BAAI/bge-base-en-v1.5"
DIM = 32
make_app = pytest.fixture(name="make_app")(apps)


def texts(n: int) -> list[str]:
    return [f"text number {i}" for i in range(n)]


@pytest.fixture
async def server(make_server: MakeServer) -> FakeTogetherServer:
    return await make_server()


def client_for(url: str, **kwargs: Any) -> togembed.AsyncClient:
    kwargs.setdefault("model", MODEL)
    return togembed.AsyncClient(base_url=url, **kwargs)


class RecordingTransport:
    """The real transport, noting the timeout each attempt was given."""

    def __init__(self) -> None:
        self.inner = AiohttpTransport()
        self.timeouts: list[float] = []

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> togembed.Response:
        self.timeouts.append(timeout)
        return await self.inner.post(url, body, headers, timeout)

    async def aclose(self) -> None:
        await self.inner.aclose()


class RecordingLimiter:
    """A RateLimiter that keeps every Feedback it is given."""

    def __init__(self, **kwargs: Any) -> None:
        self.inner = RateLimiter(**kwargs)
        self.feedback: list[Feedback] = []

    async def acquire(self, tokens: int) -> Ticket:
        return await self.inner.acquire(tokens)

    def release(self, ticket: Ticket, feedback: Feedback) -> None:
        self.feedback.append(feedback)
        self.inner.release(ticket, feedback)

    def max_batch_tokens(self) -> int | None:
        return self.inner.max_batch_tokens()


# ---------------------------------------------------------------------------------------------
# The signature


def test_create_accepts_every_keyword_of_openai_pythons_create() -> None:
    # openai-python src/openai/resources/embeddings.py, Embeddings.create
    openai_create = {
        "input",
        "model",
        "dimensions",
        "encoding_format",
        "user",
        "extra_headers",
        "extra_query",
        "extra_body",
        "timeout",
    }
    for create in (togembed.AsyncEmbeddings.create, togembed.Embeddings.create):
        params = inspect.signature(create).parameters
        assert openai_create <= set(params)
        assert all(params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in openai_create)


@pytest.mark.parametrize(
    "bad",
    [
        {"dimensions": 0},
        {"dimensions": "8"},
        {"dimensions": True},
        {"timeout": 0},
        {"timeout": -1},
        {"timeout": float("nan")},
        {"timeout": "5"},
        {"user": 7},
    ],
)
async def test_bad_option_values_are_refused_before_any_request(
    server: FakeTogetherServer, bad: dict[str, Any]
) -> None:
    async with client_for(server.base_url) as client:
        with pytest.raises(ValueError):
            await client.embeddings.create(input="a", **bad)
    assert server.stats.requests == 0


# ---------------------------------------------------------------------------------------------
# dimensions


async def test_dimensions_are_sent_to_a_server_that_honours_them(make_app: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        body = app.seen[-1].body
        return embeddings(body["input"], body.get("dimensions", 32))

    app: App = await make_app({("POST", "/v1/embeddings"): handler})
    async with client_for(app.base_url) as client:
        resp = await client.embeddings.create(input=["a", "b"], dimensions=8)
        arr = await client.embed(texts(3), dimensions=4)
        plain = await client.embed(texts(3))
    assert [len(d.embedding) for d in resp.data] == [8, 8]
    assert arr.shape == (3, 4) and plain.shape == (3, 32)
    assert [s.body.get("dimensions") for s in app.seen] == [8, 4, None]


async def test_dimensions_refused_by_together_are_resent_without_and_remembered(
    server: FakeTogetherServer,
) -> None:
    """Together: 400 "Unrecognized request arguments supplied: dimensions". Asking for the
    model's own size works (resent without the argument); the client stops sending it."""
    items = texts(300)
    async with client_for(server.base_url, batch_size=100, concurrency=1) as client:
        arr = await client.embed(items, dimensions=DIM)
        assert server.stats.status_counts == {400: 1, 200: 3}
        server.reset_stats()
        again = await client.embed(items, dimensions=DIM)
    np.testing.assert_array_equal(arr, fake_embeddings(items, DIM))
    np.testing.assert_array_equal(again, arr)
    assert server.stats.status_counts == {200: 3}


async def test_dimensions_the_server_cannot_give_raise_a_clear_error_and_stop_the_call(
    server: FakeTogetherServer,
) -> None:
    async with client_for(server.base_url, batch_size=100, concurrency=1) as client:
        with pytest.raises(togembed.DimensionsNotSupportedError) as info:
            await client.embed(texts(300), dimensions=16)
    exc = info.value
    assert isinstance(exc, togembed.BadRequestError)
    assert (exc.dimensions, exc.model_dimensions) == (16, DIM)
    assert "does not support dimensions=16" in str(exc) and f"returns {DIM}" in str(exc)
    assert "Unrecognized request arguments supplied: dimensions" in str(exc)
    assert exc.input_index is None  # the request's fault, not an input's: no bisection
    assert server.stats.status_counts == {400: 1, 200: 1}  # refused, resent once, stopped


async def test_dimensions_a_server_silently_ignores_are_caught(make_app: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        return embeddings(app.seen[-1].body["input"], 32)

    app = await make_app({("POST", "/v1/embeddings"): handler})
    async with client_for(app.base_url) as client:
        with pytest.raises(togembed.DimensionsNotSupportedError, match="ignores the argument"):
            await client.embeddings.create(input=["a"], dimensions=8)
        assert (await client.embed(["a"], dimensions=32)).shape == (1, 32)


@pytest.mark.parametrize(
    "refusal",
    [
        "dimensions is currently not supported",  # vLLM
        'Model "BAAI/bge-m3" does not support matryoshka representation, changing output '
        "dimensions will lead to poor results.",  # vLLM, newer
        "This model does not support specifying dimensions.",  # OpenAI, ada-002
    ],
)
async def test_dimensions_refused_in_other_servers_words_fall_back_too(
    make_app: Any, refusal: str
) -> None:
    async def handler(request: web.Request) -> web.Response:
        body = app.seen[-1].body
        if "dimensions" in body:
            return error(400, refusal, type="BadRequestError", param=None, code=400)
        return embeddings(body["input"], 32)

    app = await make_app({("POST", "/v1/embeddings"): handler})
    async with client_for(app.base_url) as client:
        arr = await client.embed(texts(2), dimensions=32)
        with pytest.raises(togembed.DimensionsNotSupportedError, match=refusal[:20]):
            await client.embed(texts(2), dimensions=8)
    assert arr.shape == (2, 32)
    assert [("dimensions" in s.body) for s in app.seen] == [True, False, False]


# ---------------------------------------------------------------------------------------------
# user, extra_*


async def test_user_refused_by_the_server_is_dropped_for_the_client(
    server: FakeTogetherServer,
) -> None:
    async with client_for(server.base_url) as client:
        first = await client.embeddings.create(input=texts(3), user="user-1")
        assert server.stats.status_counts == {400: 1, 200: 1}
        server.reset_stats()
        second = await client.embeddings.create(input=texts(3), user="user-1")
    assert server.stats.status_counts == {200: 1}
    assert first == second


async def test_several_refused_arguments_are_dropped_in_one_resend(
    make_server: MakeServer,
) -> None:
    server = await make_server(encoding="reject")  # also refuses encoding_format
    async with client_for(server.base_url) as client:
        resp = await client.embeddings.create(input=texts(2), user="u", dimensions=DIM)
    assert server.stats.status_counts == {400: 1, 200: 1}
    assert len(resp.data[1].embedding) == DIM


async def test_user_and_extras_reach_a_server_that_takes_them(make_app: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        return embeddings(app.seen[-1].body["input"], 4)

    app = await make_app({("POST", "/v1/embeddings"): handler})
    async with client_for(app.base_url, default_headers={"X-Team": "search"}) as client:
        await client.embeddings.create(
            input=["a"],
            user="user-1",
            extra_headers={"X-Trace": "t-1", "X-Team": None},
            extra_query={"api-version": "2024-10-01"},
            extra_body={"input_type": "query", "truncate": True},
        )
        await client.embeddings.create(input=["b"])  # nothing carried over
    first, second = app.seen
    assert first.body == {
        "model": MODEL,
        "input": ["a"],
        "encoding_format": "base64",
        "user": "user-1",
        "input_type": "query",
        "truncate": True,
    }
    assert first.query == {"api-version": "2024-10-01"}
    assert first.headers["X-Trace"] == "t-1" and "X-Team" not in first.headers
    assert second.body == {"model": MODEL, "input": ["b"], "encoding_format": "base64"}
    assert second.query == {} and "X-Trace" not in second.headers
    assert second.headers["X-Team"] == "search"


@pytest.fixture
def threaded_server() -> Iterator[FakeTogetherServer]:
    with serve_in_thread(dim=DIM) as s:
        yield s


def test_sync_client_takes_the_same_options(threaded_server: FakeTogetherServer) -> None:
    with togembed.Client(base_url=threaded_server.base_url, model=MODEL) as client:
        resp = client.embeddings.create(input=["a"], user="u", dimensions=DIM, timeout=30)
        arr = client.embed(["a"], dimensions=DIM, timeout=30, extra_headers={"X-A": "1"})
    assert len(resp.data[0].embedding) == DIM
    np.testing.assert_array_equal(arr, fake_embeddings(["a"], DIM))


# ---------------------------------------------------------------------------------------------
# timeout: seconds for the whole call


async def test_each_attempt_gets_at_most_the_time_left_in_the_call(
    server: FakeTogetherServer,
) -> None:
    server.faults.append("slow:5")
    transport = RecordingTransport()
    async with client_for(server.base_url, transport=transport, timeout=60) as client:
        with pytest.raises(togembed.APITimeoutError):
            await client.embed(["a"], timeout=0.3)
        await client.embed(["b"])  # a call without its own timeout gets the client's
    assert len(transport.timeouts) == 2  # the slow attempt was not retried past the deadline
    assert 0 < transport.timeouts[0] <= 0.3
    assert transport.timeouts[1] == 60


async def test_a_retry_wait_past_the_deadline_is_not_started(
    server: FakeTogetherServer,
) -> None:
    retry = togembed.RetryPolicy(initial_backoff=10.0, max_backoff=10.0)  # first wait 5-10 s
    async with client_for(server.base_url, retry=retry) as client:
        server.faults.append("503")
        with pytest.raises(togembed.InternalServerError):  # the last error, at once
            await client.embed(["a"], timeout=2)
        assert server.stats.requests == 1
        server.reset_stats()
        server.faults.extend(["503", "503"])  # without a deadline the same call retries
        await client.embed(["a"])
    assert server.stats.requests == 3


async def test_a_hint_longer_than_the_time_left_fails_the_call_at_once(
    server: FakeTogetherServer,
) -> None:
    server.faults.append("429:retry-after=30")
    async with client_for(server.base_url) as client:
        with pytest.raises(togembed.RateLimitError) as info:
            await client.embed(["a"], timeout=5)
    assert info.value.retry_after == 30
    assert server.stats.requests == 1


async def test_a_call_whose_deadline_passes_in_the_limiter_is_never_sent(
    server: FakeTogetherServer,
) -> None:
    limiter = RateLimiter(rpm=1)  # one request now, the next in a minute
    async with client_for(server.base_url, limiter=limiter) as client:
        await client.embed(["first"])
        with pytest.raises(togembed.APITimeoutError, match=r"timeout of 0\.2 s"):
            await client.embeddings.create(input="second", timeout=0.2)
    assert server.stats.requests == 1
    assert limiter.stats.in_flight == 0  # no ticket leaked


# ---------------------------------------------------------------------------------------------
# max_retry_after bounds every pause


async def test_a_hint_beyond_max_retry_after_fails_at_once_and_the_limiter_gets_the_cap(
    server: FakeTogetherServer,
) -> None:
    limiter = RecordingLimiter()
    server.faults.append("429:retry-after=3600")
    async with client_for(server.base_url, limiter=limiter) as client:
        with pytest.raises(togembed.RateLimitError) as info:
            await client.embed(["a"])
        assert info.value.retry_after == 3600  # what the server asked, for the caller
        assert client.stats.retries == 0 and server.stats.requests == 1
        server.faults.append("429:retry-after=3")
        await client.embed(["a"])  # a hint within the cap is waited for and retried
    assert [fb.retry_after for fb in limiter.feedback] == [120.0, 3.0, None]


async def test_a_long_hint_pauses_the_limiter_no_longer_than_max_retry_after(
    server: FakeTogetherServer,
) -> None:
    """Waiting on: the limiter really pauses. One 429 asking for an hour fails its call and
    pauses the client for the policy's cap (here 0.2 s), not for 120 s or an hour."""
    server.faults.append("429:retry-after=3600")
    retry = togembed.RetryPolicy(max_retry_after=0.2)
    togembed.testing.set_backoff_enabled(True)
    try:
        async with client_for(server.base_url, retry=retry) as client:
            with pytest.raises(togembed.RateLimitError):
                await client.embed(["a"])
            assert client.limiter.stats.paused_for <= 0.2  # not 120 s (the old cap), not 1 h
            arr = await client.embed(["b"])  # a later call goes after that short pause
    finally:
        togembed.testing.set_backoff_enabled(False)
    np.testing.assert_array_equal(arr, fake_embeddings(["b"], DIM))


async def test_a_refused_extra_body_key_is_the_callers_error_and_costs_no_fallback(
    server: FakeTogetherServer,
) -> None:
    async with client_for(server.base_url) as client:
        with pytest.raises(togembed.BadRequestError, match="input_type") as info:
            await client.embed(texts(10), extra_body={"input_type": "query"})
        assert info.value.input_index is None  # about the request: not bisected
        assert server.stats.requests == 1
        await client.embed(texts(2))
    assert [r.encoding_format for r in server.stats.log] == ["base64", "base64"]


async def test_an_unknown_field_refusal_in_tei_words_is_not_bisected(make_app: Any) -> None:
    async def tei(request: web.Request) -> web.Response:
        message = "Failed to deserialize the JSON body into the target type: unknown field `x`"
        return error(422, message, error_type="Validation")

    app = await make_app({("POST", "/v1/embeddings"): tei})
    async with client_for(app.base_url) as client:
        with pytest.raises(togembed.UnprocessableEntityError):
            await client.embed(texts(64), extra_body={"x": 1})
    assert app.requests == 1


async def test_a_refused_argument_that_extra_body_keeps_sending_is_not_resent_forever(
    server: FakeTogetherServer,
) -> None:
    async with client_for(server.base_url) as client:
        with pytest.raises(togembed.BadRequestError, match="user"):
            await client.embed(["a"], user="u", extra_body={"user": "u", "dimensions": 8})
    assert server.stats.requests == 1
