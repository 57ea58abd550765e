"""The user-facing async client."""

from __future__ import annotations

import math
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Iterable,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any, Literal

import aiohttp
import attrs
import numpy as np

from .._version import __version__
from ..core.batching import normalize_input
from ..core.call import run_call
from ..core.coalesce import Coalescer, expected_wait
from ..core.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    DEFAULT_ENCODING_FORMAT,
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    EncodingFormat,
    RetryPolicy,
    base_url_source,
    check_base_url,
    is_loopback_url,
    resolve_api_key,
    resolve_base_url,
)
from ..core.errors import InvalidModelError, MissingAPIKeyError
from ..core.limiter import Limiter
from ..core.ratelimit import RateLimiter
from ..core.settings import CallOptions, CallSettings, ClientStats
from ..core.sinks import ArraySink, ListSink, Sink
from ..core.stream import EmbeddingChunk, EmbeddingStream, TextBlocks
from ..core.transport import AiohttpTransport, Transport
from ..core.types import EmbeddingResponse
from .arguments import (
    CHECK_CHUNK,
    ENCODINGS,
    call_options,
    check_encoding,
    check_inputs,
    check_inputs_now,
    check_model,
    positive,
    secrets_of,
)
from .models import AsyncModels

__all__ = ["AsyncClient", "AsyncEmbeddings"]


class AsyncEmbeddings:
    """``client.embeddings``: the call Together and OpenAI users already write."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(
        self,
        *,
        input: str | Sequence[str],
        model: str | None = None,
        encoding_format: EncodingFormat | None = None,
        dimensions: int | None = None,
        user: str | None = None,
        extra_headers: Mapping[str, str | None] | None = None,
        extra_query: Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> EmbeddingResponse:
        """Embed one string or any number of strings; ``data[i]`` is the vector of input i.

        Batching is invisible. ``encoding_format="base64"`` returns base64 strings (as the
        peers do); otherwise vectors are lists of floats, whatever travelled on the wire.
        The rest is openai-python's signature: ``dimensions`` and ``user`` go in the body
        (dropped where the server refuses them; a ``dimensions`` the server cannot honour
        raises ``DimensionsNotSupportedError``), ``extra_*`` are merged into the request
        (a None header value removes that header), ``timeout`` is seconds for the whole
        call, retries and waits included (None: the client's limits only).
        """
        client = self._client
        started = time.monotonic()
        texts = normalize_input(input)
        model = client._model_for(model)
        fmt = check_encoding(encoding_format)
        options = call_options(
            started, timeout, dimensions, user, extra_headers, extra_query, extra_body
        )
        sink = ListSink(len(texts), keep_base64=fmt == "base64")
        if texts:
            await client._run(texts, model, sink, fmt, options)
        return sink.result(model)


class AsyncClient:
    """Async client for Together's embeddings API.

    Splits any number of inputs into bounded batches, sends them concurrently with retries and
    backoff, and returns the vectors in input order. Create it anywhere; its HTTP session is
    made inside the event loop of the first call. Use ``async with`` or ``await close()``.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        model: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        retry: RetryPolicy | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        concurrency: int = DEFAULT_CONCURRENCY,
        encoding_format: EncodingFormat = DEFAULT_ENCODING_FORMAT,
        rpm: float | None = None,
        tpm: float | None = None,
        limiter: Limiter | None = None,
        session: aiohttp.ClientSession | None = None,
        transport: Transport | None = None,
        default_headers: dict[str, str] | None = None,
        connect_retries: int | None = None,
        coalesce: bool = True,
        coalesce_window: float = 0.0,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if encoding_format not in ENCODINGS:
            raise ValueError(
                f"encoding_format must be 'base64' or 'float', not {encoding_format!r}"
            )
        if model is not None:
            check_model(model)
        if not (isinstance(coalesce_window, (int, float)) and 0 <= coalesce_window < math.inf):
            raise ValueError(f"coalesce_window must be >= 0 seconds, got {coalesce_window!r}")
        if retry is None:
            retry = RetryPolicy(max_retries=max_retries, connect_retries=connect_retries)
        elif connect_retries is not None:
            retry = attrs.evolve(retry, connect_retries=connect_retries)
        if limiter is not None and (rpm is not None or tpm is not None):
            raise ValueError("pass rpm/tpm or limiter=, not both (set them on the limiter)")
        # Each client paces itself unless given a limiter to share with other clients.
        self.limiter: Limiter = (
            limiter
            if limiter is not None
            else RateLimiter(rpm=rpm, tpm=tpm, max_pause=retry.max_retry_after)
        )
        self._api_key = resolve_api_key(api_key)
        self.base_url = resolve_base_url(base_url)
        check_base_url(self.base_url, source=base_url_source(base_url))
        self.model = model
        self.timeout = float(timeout)
        self.retry = retry
        self.batch_size = positive("batch_size", batch_size)
        self.max_batch_tokens = positive("max_batch_tokens", max_batch_tokens)
        self.concurrency = positive("concurrency", concurrency)
        self.encoding_format: EncodingFormat = encoding_format
        self._stats = ClientStats()
        self.embeddings = AsyncEmbeddings(self)
        self.models = AsyncModels(self)
        self._transport: Transport = transport or AiohttpTransport(
            session, limit=max(100, self.concurrency)
        )
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"togembed/{__version__}",
            **(default_headers or {}),
        }
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        self._settings = CallSettings(
            secrets=secrets_of(self._api_key, headers),
            transport=self._transport,
            url=f"{self.base_url}/embeddings",
            headers=headers,
            timeout=self.timeout,
            retry=retry,
            max_items=self.batch_size,
            max_tokens=self.max_batch_tokens,
            concurrency=self.concurrency,
            encoding_format=encoding_format,
            stats=self._stats,
            limiter=self.limiter,
        )
        # Calls that would wait for the limiter share requests (docs/services.md).
        self._coalescer = (
            Coalescer(self._settings, window=float(coalesce_window)) if coalesce else None
        )
        self._settings.coalescer = self._coalescer

    def __repr__(self) -> str:
        key = "set" if self._api_key else "none"
        return f"<togembed.AsyncClient base_url={self.base_url!r} api_key={key}>"

    @property
    def stats(self) -> ClientStats:
        """Running counters (requests, retries, 429s, merged calls, ...) and the queue at the
        rate limit now: ``waiting`` calls and their ``expected_wait`` in seconds."""
        stats = self._stats
        if self._coalescer is not None:
            stats.expected_wait = self._coalescer.expected_wait()
        else:
            stats.expected_wait = expected_wait(self.limiter)
        return stats

    async def embed(
        self,
        texts: str | Iterable[str],
        *,
        model: str | None = None,
        dimensions: int | None = None,
        user: str | None = None,
        extra_headers: Mapping[str, str | None] | None = None,
        extra_query: Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Embed ``texts`` into a float32 array of shape (N, D), row i for ``texts[i]``.

        Rows are written into one preallocated array as batches arrive. ``embed([])`` returns
        an empty (0, 0) array without a request. ``dimensions``, ``user``, ``extra_*`` and
        ``timeout`` (seconds for the whole call) as in ``embeddings.create``.
        """
        started = time.monotonic()
        items = normalize_input(texts)
        model = self._model_for(model)
        options = call_options(
            started, timeout, dimensions, user, extra_headers, extra_query, extra_body
        )
        sink = ArraySink(len(items))
        if items:
            await self._run(items, model, sink, None, options)
        return sink.result()

    async def embed_stream(
        self,
        texts: Iterable[str] | AsyncIterable[str] | TextBlocks,
        *,
        model: str | None = None,
        window: int | None = None,
        errors: Literal["raise", "collect"] = "raise",
    ) -> AsyncGenerator[EmbeddingChunk, None]:
        """Embed a stream of texts with bounded memory: ``EmbeddingChunk``s in input order, each
        as soon as it and everything before it are done.

        ``texts`` (a list, a generator over a file, an async iterable) is pulled lazily; at most
        ``window`` texts (default 4 x concurrency x batch_size) are pulled and not yet yielded,
        so a consumer that stops consuming stops the input and the sending. With
        ``errors="collect"``, inputs the server rejects become NaN rows and ``chunk.errors``
        instead of an exception. Close the generator (``contextlib.aclosing``) to cancel what
        is in flight. See docs/streaming.md. (``TextBlocks``, internal, wraps a source that
        yields lists of texts.)
        """
        model = self._model_for(model)
        if errors not in ("raise", "collect"):
            raise ValueError(f"errors must be 'raise' or 'collect', not {errors!r}")
        if window is None:
            window = 4 * self.concurrency * self.batch_size
        self._stats.calls += 1
        stream = EmbeddingStream(
            self._settings,
            texts,
            model,
            window=positive("window", window),
            collect=errors == "collect",
            before_send=self._check_api_key,  # at the first request: an empty stream needs none
        )
        try:
            while (chunk := await stream.next()) is not None:
                yield chunk
        finally:
            await stream.aclose()

    async def close(self) -> None:
        """Close the HTTP session if this client created it. Safe to call twice."""
        if self._coalescer is not None:
            await self._coalescer.aclose()
        await self._transport.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- internals -------------------------------------------------------------------------

    def _model_for(self, model: str | None) -> str:
        """The call's model, else the client's. ``""`` is an error, not "use the default"."""
        if model is None:
            model = self.model
            if model is None:
                raise InvalidModelError("no model: pass model=... or AsyncClient(model=...)")
        check_model(model)
        return model

    def _check_api_key(self) -> None:
        if not self._api_key and not is_loopback_url(self.base_url):
            raise MissingAPIKeyError(
                "no API key: pass AsyncClient(api_key=...) or set TOGETHER_API_KEY"
            )

    def _run(
        self,
        texts: Sequence[str],
        model: str,
        sink: Sink,
        fmt: EncodingFormat | None,
        options: CallOptions | None = None,
    ) -> Awaitable[None]:
        """The call's work, for the caller to await: for the usual few inputs, ``run_call``
        itself, checked at once (no coroutine of ours alive in between while it waits)."""
        self._stats.calls += 1
        self._check_api_key()
        if len(texts) > CHECK_CHUNK:
            return self._check_then_run(texts, model, sink, fmt, options)
        check_inputs_now(texts)
        return run_call(
            self._settings, texts, model, sink, prefer_float=fmt == "float", options=options
        )

    async def _check_then_run(
        self,
        texts: Sequence[str],
        model: str,
        sink: Sink,
        fmt: EncodingFormat | None,
        options: CallOptions | None,
    ) -> None:
        await check_inputs(texts)  # a step at a time: a million inputs never stall the loop
        await run_call(
            self._settings, texts, model, sink, prefer_float=fmt == "float", options=options
        )
