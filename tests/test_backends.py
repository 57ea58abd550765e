"""The backends of docs/backends.md, each faked with its real wording, driven end to end.

Every fake is a small aiohttp app on 127.0.0.1 that refuses what the real server refuses, with
its status, its error-body shape and its message text (sources in docs/backends.md), and
otherwise answers with ``fake_embeddings`` rows, so results are compared bit for bit. Servers
count tokens as words (as the stand-in model does); togembed estimates ~bytes/4, so the two
counts differ the way a real tokenizer's and togembed's do.
"""

from __future__ import annotations

import base64
import collections
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import numpy as np
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from standin_model import StandInModel

import togembed
from togembed.core.batching import estimate_tokens
from togembed.core.stated_limits import MAX_REQUEST_TOKENS, StatedLimit, request_token_budget
from togembed.server import EmbeddingServer
from togembed.testing import fake_embeddings

DIM = 16
MODEL = "test/backend-model"

# A refusal: status and JSON body, or None to answer.
Check = Callable[[dict[str, Any], list[str]], "tuple[int, Any] | None"]


def words(text: str) -> int:
    """The fakes' token count: one token a word."""
    return len(text.split())


@attrs.define
class Seen:
    """One request as the fake saw it."""

    n_inputs: int
    keys: frozenset[str]
    status: int
    tokens: int
    base64: bool = False


class FakeBackend:
    """``POST /v1/embeddings`` answering as one backend does.

    ``check`` returns the backend's refusal for a request, if any. ``encoding``: "honour"
    (base64 when asked), "ignore" (always floats), "reject" (Together before ~2025-09: 400 on
    the argument). ``usage``: whether answers carry it. ``headers``: sent on every answer.
    """

    def __init__(
        self,
        check: Check | None = None,
        *,
        encoding: str = "honour",
        usage: bool = True,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.check = check
        self.encoding = encoding
        self.usage = usage
        self.headers = headers or {}
        self.log: list[Seen] = []
        self._server: TestServer | None = None
        self.base_url = ""

    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/embeddings", self._embeddings)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()
        self.base_url = str(self._server.make_url("/v1"))
        return self.base_url

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()

    def statuses(self) -> collections.Counter[int]:
        return collections.Counter(seen.status for seen in self.log)

    def ok(self) -> list[Seen]:
        return [seen for seen in self.log if seen.status == 200]

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        seen = Seen(len(texts), frozenset(body), 200, sum(map(words, texts)))
        self.log.append(seen)
        refusal = self.check(body, texts) if self.check else None
        if refusal is None and self.encoding == "reject" and "encoding_format" in body:
            refusal = (
                400,
                together_error("Unrecognized request arguments supplied: encoding_format"),
            )
        if refusal is not None:
            seen.status, payload = refusal
            return web.Response(
                status=seen.status, body=orjson.dumps(payload), content_type="application/json"
            )
        rows = fake_embeddings(texts, DIM)
        seen.base64 = self.encoding == "honour" and body.get("encoding_format") == "base64"
        if seen.base64:
            values: list[Any] = [base64.b64encode(r.astype("<f4").tobytes()).decode() for r in rows]
        else:
            values = rows.tolist()
        answer: dict[str, Any] = {
            "object": "list",
            "model": body.get("model"),
            "data": [
                {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(values)
            ],
        }
        if self.usage:
            answer["usage"] = {"prompt_tokens": seen.tokens, "total_tokens": seen.tokens}
        return web.Response(
            body=orjson.dumps(answer), content_type="application/json", headers=self.headers
        )


MakeBackend = Callable[..., Awaitable[FakeBackend]]


@pytest.fixture
async def make_backend() -> AsyncIterator[MakeBackend]:
    backends: list[FakeBackend] = []

    async def make(check: Check | None = None, **options: Any) -> FakeBackend:
        backend = FakeBackend(check, **options)
        await backend.start()
        backends.append(backend)
        return backend

    yield make
    for backend in backends:
        await backend.close()


def client_for(backend: FakeBackend | EmbeddingServer, **options: Any) -> togembed.AsyncClient:
    options.setdefault("model", MODEL)
    return togembed.AsyncClient(base_url=backend.base_url, api_key="test-key", **options)


def texts(n: int, words_each: int = 3) -> list[str]:
    return [" ".join([f"t{i}"] * words_each) for i in range(n)]


def dense_texts(n: int, words_each: int) -> list[str]:
    """One-letter words: the server counts ~2 tokens for each one togembed estimates, as real
    tokenizers do on dense text (digits, code)."""
    return [f"t{i} " + " ".join(["a"] * (words_each - 1)) for i in range(n)]


def assert_rows(arr: np.ndarray, items: list[str]) -> None:
    np.testing.assert_array_equal(arr, fake_embeddings(items, DIM))


# ---------------------------------------------------------------------------------------------
# Each server's refusals, with its wording and body shape


def together_error(message: str, *, type_: str = "invalid_request_error", **fields: Any) -> Any:
    """Together's and OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": None, "code": None, **fields}}


def tei(
    *,
    max_client_batch_size: int = 32,
    max_input_length: int = 512,
    status: int = 422,
    shape: str = "openai",
) -> Check:
    """text-embeddings-inference with ``--auto-truncate false``. ``status`` 422 since 1.9.0,
    413 before. ``shape``: "openai" is what /v1/embeddings sends (``{"message","code","type"}``),
    "native" what /embed sends (``{"error","error_type"}``)."""

    def body(message: str) -> Any:
        if shape == "native":
            return {"error": message, "error_type": "Validation"}
        return {"message": message, "code": status, "type": "Validation"}

    def check(request: dict[str, Any], items: list[str]) -> tuple[int, Any] | None:
        if len(items) > max_client_batch_size:
            return status, body(
                f"batch size {len(items)} > maximum allowed batch size {max_client_batch_size}"
            )
        for text in items:
            if words(text) > max_input_length:
                return status, body(
                    "Input validation error: `inputs` must have less than "
                    f"{max_input_length} tokens. Given: {words(text)}"
                )
        return None

    return check


def openai(
    *,
    max_inputs: int = 2048,
    max_request_tokens: int = 300_000,
    max_input_tokens: int = 8192,
) -> Check:
    """api.openai.com/v1/embeddings: 2048 inputs (no number in the refusal), 300k tokens per
    request, 8192 tokens per input."""

    def check(request: dict[str, Any], items: list[str]) -> tuple[int, Any] | None:
        if len(items) > max_inputs:
            return 400, together_error(
                "'$.input' is invalid. Please check the API reference: "
                "https://platform.openai.com/docs/api-reference."
            )
        for text in items:
            if words(text) > max_input_tokens:
                n = words(text)
                return 400, together_error(
                    f"This model's maximum context length is {max_input_tokens} tokens, however "
                    f"you requested {n} tokens ({n} in your prompt; 0 for the completion). "
                    "Please reduce your prompt; or completion length."
                )
        total = sum(map(words, items))
        if total > max_request_tokens:
            return 400, together_error(
                f"Requested {total} tokens, max {max_request_tokens} tokens per request",
                type_="max_tokens_per_request",
                code="max_tokens_per_request",
            )
        return None

    return check


OPENAI_HEADERS = {  # generous: these tests are not about pacing
    "x-ratelimit-limit-requests": "1000000",
    "x-ratelimit-remaining-requests": "999999",
    "x-ratelimit-limit-tokens": "1000000000",
    "x-ratelimit-remaining-tokens": "999999999",
    "x-ratelimit-reset-requests": "1ms",
    "x-ratelimit-reset-tokens": "1ms",
}


def vllm(*, max_model_len: int = 512, shape: str = "new") -> Check:
    """vLLM's OpenAI-compatible server. "new": ``{"error": {...}}`` with ``param
    "input_tokens"``; "old" (to ~0.9): the flat ``{"object": "error", ...}``."""

    def check(request: dict[str, Any], items: list[str]) -> tuple[int, Any] | None:
        for text in items:
            n = words(text)
            if n > max_model_len:
                message = (
                    f"This model's maximum context length is {max_model_len} tokens. However, "
                    f"you requested {n} tokens in the input for embedding generation. Please "
                    "reduce the length of the input."
                )
                info = {"message": message, "type": "BadRequestError", "code": 400}
                if shape == "old":
                    return 400, {"object": "error", "param": None, **info}
                return 400, {"error": {**info, "param": "input_tokens"}}
        return None

    return check


def infinity(*, max_client_batch_size: int = 2048, max_chars: int = 8192 * 15) -> Check:
    """Infinity: pydantic limits on the request, FastAPI's 422 ``{"detail": [...]}``."""

    def detail(type_: str, loc: list[Any], msg: str, ctx: dict[str, Any]) -> Any:
        return {"detail": [{"type": type_, "loc": loc, "msg": msg, "input": None, "ctx": ctx}]}

    def check(request: dict[str, Any], items: list[str]) -> tuple[int, Any] | None:
        n = len(items)
        loc = ["body", "input", "list[constrained-str]"]
        if n > max_client_batch_size:
            msg = (
                f"List should have at most {max_client_batch_size} items after validation, not {n}"
            )
            ctx = {"field_type": "List", "max_length": max_client_batch_size, "actual_length": n}
            return 422, detail("too_long", loc, msg, ctx)
        for i, text in enumerate(items):
            if len(text) > max_chars:
                msg = f"String should have at most {max_chars} characters"
                return 422, detail("string_too_long", [*loc, i], msg, {"max_length": max_chars})
        return None

    return check


def together_withdrawn(request: dict[str, Any], items: list[str]) -> tuple[int, Any] | None:
    """A serverless embedding id Together withdrew in 2026."""
    model = request["model"]
    return 400, together_error(
        f"Unable to access non-serverless model {model}. Please visit "
        f"https://api.together.ai/models/{model} to create and start a new dedicated endpoint "
        "for the model.",
        code="model_not_available",
    )


TOGETHER_HEADERS = {  # per second, Together's documented unit; generous
    "x-ratelimit-limit": "1000",
    "x-ratelimit-remaining": "999",
    "x-tokenlimit-limit": "10000000",
    "x-tokenlimit-remaining": "9999999",
}


# ---------------------------------------------------------------------------------------------
# Batch size stated in the refusal: learned in one step


@pytest.mark.parametrize("shape", ["openai", "native"])
async def test_tei_batch_limit_is_learned_from_one_refusal(
    make_backend: MakeBackend, shape: str
) -> None:
    backend = await make_backend(tei(max_client_batch_size=32, shape=shape))
    items = texts(1000)
    async with client_for(backend, batch_size=128, concurrency=1) as client:
        arr = await client.embed(items)
        assert_rows(arr, items)
        assert backend.statuses()[422] == 1  # ONE refusal, not 128 -> 64 -> 32
        assert [seen.n_inputs for seen in backend.log[:5]] == [128, 32, 32, 32, 32]
        assert all(seen.n_inputs <= 32 for seen in backend.ok())
        assert not any(seen.n_inputs == 64 for seen in backend.log)  # never halved
        assert client.stats.server_max_inputs == 32
        # the client remembers: the next call is not refused at all
        backend.log.clear()
        assert_rows(await client.embed(items), items)
        assert backend.statuses() == {200: len(backend.log)}


async def test_tei_batch_limit_concurrent_senders_are_refused_once_each(
    make_backend: MakeBackend,
) -> None:
    backend = await make_backend(tei(max_client_batch_size=32))
    items = texts(2000)
    async with client_for(backend, batch_size=128, concurrency=4) as client:
        assert_rows(await client.embed(items), items)
    assert 1 <= backend.statuses()[422] <= 4  # at most one per sender in flight
    assert not any(seen.n_inputs == 64 for seen in backend.log)
    assert all(seen.n_inputs <= 32 for seen in backend.ok())


async def test_tei_before_1_9_sends_413_and_is_read_the_same(make_backend: MakeBackend) -> None:
    backend = await make_backend(tei(max_client_batch_size=32, status=413))
    items = texts(300)
    async with client_for(backend, batch_size=128, concurrency=1) as client:
        assert_rows(await client.embed(items), items)
    assert backend.statuses()[413] == 1


async def test_infinity_batch_limit_is_learned_from_fastapis_detail_body(
    make_backend: MakeBackend,
) -> None:
    """Infinity with INFINITY_MAX_CLIENT_BATCH_SIZE=64: its 422 is FastAPI's, the message in
    ``detail``; the client reads it there."""
    backend = await make_backend(infinity(max_client_batch_size=64))
    items = texts(500)
    async with client_for(backend, batch_size=128, concurrency=1) as client:
        assert_rows(await client.embed(items), items)
        assert client.stats.server_max_inputs == 64
    assert backend.statuses()[422] == 1
    assert all(seen.n_inputs <= 64 for seen in backend.ok())


async def test_togembed_serve_limit_is_learned_from_one_413() -> None:
    model = StandInModel(MODEL, dim=DIM)
    async with EmbeddingServer(model, max_inputs_per_request=50) as server:
        items = texts(400)
        async with client_for(server, batch_size=128, concurrency=1) as client:
            np.testing.assert_array_equal(await client.embed(items), model.expected(items))
            assert client.stats.server_max_inputs == 50
            refused = client.stats.requests - server.stats.requests
    assert refused == 1
    # each planned 128 is cut 50 + 50 + 28 when its turn comes; the last 16 go as they are
    assert server.stats.requests == 3 * 3 + 1


# ---------------------------------------------------------------------------------------------
# OpenAI: inputs per request (no number stated) and tokens per request (number stated)


async def test_openai_too_many_inputs_states_no_number_and_is_halved(
    make_backend: MakeBackend,
) -> None:
    """OpenAI's refusal above 2048 inputs names no limit: the fallback halves the batch."""
    backend = await make_backend(openai(), headers=OPENAI_HEADERS)
    items = texts(5000)
    async with client_for(backend, batch_size=3000, concurrency=1) as client:
        assert_rows(await client.embed(items), items)
    assert backend.statuses()[400] == 1  # the 3000; its halves and the last 2000 pass
    assert [seen.n_inputs for seen in backend.log] == [3000, 1500, 1500, 2000]


async def test_openai_tokens_per_request_budget_is_learned_from_one_refusal(
    make_backend: MakeBackend,
) -> None:
    """Raised client limits (2048 inputs, 1M estimated tokens) send a batch OpenAI counts at
    409,600 tokens: refused once with "Requested 409600 tokens, max 300000 tokens per
    request". The budget is scaled by the server's count over our estimate (~2 here), and
    every later request stays under 300k."""
    backend = await make_backend(openai(), headers=OPENAI_HEADERS)
    items = dense_texts(3000, words_each=200)
    first = sum(map(estimate_tokens, items[:2048]))
    async with client_for(
        backend, batch_size=2048, max_batch_tokens=1_000_000, concurrency=1
    ) as client:
        assert_rows(await client.embed(items), items)
        assert client.stats.server_max_request_tokens == 300_000
        stated = StatedLimit(MAX_REQUEST_TOKENS, 300_000, requested=2048 * 200)
        assert client._settings.max_tokens == request_token_budget(stated, first)
    assert backend.statuses()[400] == 1
    assert backend.log[0].tokens == 409_600
    assert all(seen.tokens <= 300_000 for seen in backend.ok())
    assert len(backend.ok()) == 3  # ~1350 inputs a request, not halving 2048 -> 1024 -> 512


async def test_openai_input_over_8192_tokens_is_pinned_with_the_limit(
    make_backend: MakeBackend,
) -> None:
    backend = await make_backend(openai(), headers=OPENAI_HEADERS)
    items = texts(300)
    items[217] = "long " * 9000
    async with client_for(backend) as client:
        with pytest.raises(togembed.BadRequestError) as info:
            await client.embed(items)
        assert client.stats.server_max_input_tokens == 8192
        assert client._settings.max_items == 128  # a per-input limit is not a batch size
    err = info.value
    assert err.input_index == 217
    assert str(err).startswith("input 217: too long for this server (limit 8192 tokens)")


# ---------------------------------------------------------------------------------------------
# One input over the server's length: found by bisection, named with the stated limit


@pytest.mark.parametrize("status", [422, 413])
async def test_tei_input_over_max_length_is_pinned_with_the_limit(
    make_backend: MakeBackend, status: int
) -> None:
    """TEI with --auto-truncate false. Before 1.9 the refusal was a 413, which the client used
    to take for "too many inputs" and halve its batch size for."""
    backend = await make_backend(tei(max_client_batch_size=10_000, status=status))
    items = texts(200)
    items[17] = "word " * 600
    async with client_for(backend, concurrency=1) as client:
        with pytest.raises(togembed.APIStatusError) as info:
            await client.embed(items)
        assert client._settings.max_items == 128
        assert client.stats.server_max_input_tokens == 512
    err = info.value
    assert err.status_code == status and err.input_index == 17
    assert str(err).startswith("input 17: too long for this server (limit 512 tokens)")
    assert "must have less than 512 tokens. Given: 600" in str(err)  # the server's own words
    assert backend.statuses()[status] == 1 + 7  # the batch of 128, then one half per level


@pytest.mark.parametrize("shape", ["new", "old"])
async def test_vllm_input_over_max_model_len_is_pinned(
    make_backend: MakeBackend, shape: str
) -> None:
    """vLLM's message says "This model's ..." and was taken for a request-level (model)
    error: raised at once, without the input's index."""
    backend = await make_backend(vllm(max_model_len=512, shape=shape))
    items = texts(200)
    items[150] = "word " * 513
    async with client_for(backend, concurrency=1) as client:
        with pytest.raises(togembed.BadRequestError) as info:
            await client.embed(items)
    assert info.value.input_index == 150
    assert str(info.value).startswith("input 150: too long for this server (limit 512 tokens)")


async def test_infinity_input_over_its_character_limit_is_pinned(
    make_backend: MakeBackend,
) -> None:
    backend = await make_backend(infinity(max_chars=1000))
    items = texts(100)
    items[42] = "x" * 1001
    async with client_for(backend) as client:
        with pytest.raises(togembed.UnprocessableEntityError) as info:
            await client.embed(items)
        assert client.stats.server_max_input_chars == 1000
    assert info.value.input_index == 42
    assert "limit 1000 characters" in str(info.value)


async def test_stream_collects_too_long_inputs_with_the_limit(make_backend: MakeBackend) -> None:
    backend = await make_backend(tei())
    items = texts(100)
    for bad in (5, 60):
        items[bad] = "word " * 700
    errors: dict[int, togembed.APIError] = {}
    async with client_for(backend, batch_size=32) as client:
        async for chunk in client.embed_stream(items, errors="collect"):
            errors.update(chunk.errors)
    assert sorted(errors) == [5, 60]
    assert all("limit 512 tokens" in str(e) for e in errors.values())


# ---------------------------------------------------------------------------------------------
# Together: withdrawn serverless ids, dedicated endpoints, encoding_format, usage


async def test_withdrawn_serverless_model_fails_with_one_request(make_backend: MakeBackend) -> None:
    backend = await make_backend(together_withdrawn)
    async with client_for(backend, model="BAAI/bge-base-en-v1.5", concurrency=1) as client:
        with pytest.raises(togembed.ModelNotAvailableError) as info:
            await client.embed(texts(1000))
    assert len(backend.log) == 1  # neither retried nor bisected
    assert isinstance(info.value, togembed.NotFoundError)
    assert info.value.status_code == 400
    assert info.value.code == "model_not_available"
    assert info.value.input_index is None
    assert "dedicated endpoint" in info.value.message


@pytest.mark.parametrize("encoding", ["honour", "ignore", "reject"])
async def test_dedicated_endpoint_whatever_it_does_with_base64(
    make_backend: MakeBackend, encoding: str
) -> None:
    """A dedicated endpoint, the model being the endpoint's name. Together honours base64
    since ~2025-09; before, it ignored the argument (floats) or refused it."""
    backend = await make_backend(encoding=encoding, headers=TOGETHER_HEADERS, usage=False)
    items = texts(300)
    async with client_for(backend, model="my-org/my-bge-endpoint", concurrency=1) as client:
        assert_rows(await client.embed(items), items)
        resp = await client.embeddings.create(input=items[:3])
        assert resp.usage is None  # Together: not every model reports usage
        np.testing.assert_array_equal(
            np.array([d.embedding for d in resp.data], dtype=np.float32),
            fake_embeddings(items[:3], DIM),
        )
    assert {seen.n_inputs for seen in backend.ok()} <= {128, 44, 3}
    sent_base64 = [seen.base64 for seen in backend.ok()]
    if encoding == "honour":
        assert all(sent_base64)
    else:
        assert not any(sent_base64)
    if encoding == "reject":  # refused once, then never asked for again
        assert backend.statuses()[400] == 1
        assert all("encoding_format" not in seen.keys for seen in backend.ok())


@pytest.mark.parametrize(
    "check", [tei(), vllm(), infinity(), openai()], ids=["tei", "vllm", "infinity", "openai"]
)
async def test_servers_that_honour_base64_get_it_and_report_usage(
    make_backend: MakeBackend, check: Check
) -> None:
    backend = await make_backend(check)
    items = texts(20)
    async with client_for(backend) as client:
        assert_rows(await client.embed(items), items)
        resp = await client.embeddings.create(input=items)
    assert backend.ok() and all(seen.base64 for seen in backend.ok())
    assert resp.usage is not None and resp.usage.prompt_tokens == sum(map(words, items))
