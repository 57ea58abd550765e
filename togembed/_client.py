"""The user-facing async client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, Iterable, Sequence
from types import TracebackType
from typing import Literal

import aiohttp
import numpy as np

from ._batching import find_invalid_input, invalid_input_error, normalize_input
from ._config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    DEFAULT_ENCODING_FORMAT,
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    EncodingFormat,
    RetryPolicy,
    is_loopback_url,
    resolve_api_key,
    resolve_base_url,
)
from ._exceptions import MissingAPIKeyError
from ._ratelimit import Limiter, RateLimiter
from ._runner import ArraySink, CallSettings, ClientStats, ListSink, Sink, run_call
from ._stream import EmbeddingChunk, EmbeddingStream, TextBlocks
from ._transport import AiohttpTransport, Transport
from ._types import EmbeddingResponse
from ._version import __version__

__all__ = ["AsyncClient", "AsyncEmbeddings"]

_CHECK_CHUNK = 50_000  # inputs type-checked per event-loop step (~2 ms)
_ENCODINGS = ("base64", "float")


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


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
    ) -> EmbeddingResponse:
        """Embed one string or any number of strings; ``data[i]`` is the vector of input i.

        Batching is invisible. ``encoding_format="base64"`` returns base64 strings (as the
        peers do); otherwise vectors are lists of floats, whatever travelled on the wire.
        """
        client = self._client
        texts = normalize_input(input)
        model = client._model_for(model)
        fmt = client._check_encoding(encoding_format)
        sink = ListSink(len(texts), keep_base64=fmt == "base64")
        await client._run(texts, model, sink, fmt)
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
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if encoding_format not in _ENCODINGS:
            raise ValueError(
                f"encoding_format must be 'base64' or 'float', not {encoding_format!r}"
            )
        if retry is None:
            retry = RetryPolicy(max_retries=max_retries)
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
        self.model = model
        self.timeout = float(timeout)
        self.retry = retry
        self.batch_size = _positive("batch_size", batch_size)
        self.max_batch_tokens = _positive("max_batch_tokens", max_batch_tokens)
        self.concurrency = _positive("concurrency", concurrency)
        self.encoding_format: EncodingFormat = encoding_format
        self.stats = ClientStats()
        self.embeddings = AsyncEmbeddings(self)
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
            transport=self._transport,
            url=f"{self.base_url}/embeddings",
            headers=headers,
            timeout=self.timeout,
            retry=retry,
            max_items=self.batch_size,
            max_tokens=self.max_batch_tokens,
            concurrency=self.concurrency,
            encoding_format=encoding_format,
            stats=self.stats,
            limiter=self.limiter,
        )

    def __repr__(self) -> str:
        key = "set" if self._api_key else "none"
        return f"<togembed.AsyncClient base_url={self.base_url!r} api_key={key}>"

    async def embed(
        self,
        texts: str | Iterable[str],
        *,
        model: str | None = None,
    ) -> np.ndarray:
        """Embed ``texts`` into a float32 array of shape (N, D), row i for ``texts[i]``.

        Rows are written into one preallocated array as batches arrive. ``embed([])`` returns
        an empty (0, 0) array without a request.
        """
        items = normalize_input(texts)
        model = self._model_for(model)
        sink = ArraySink(len(items))
        await self._run(items, model, sink, None)
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
        stream = EmbeddingStream(
            self._settings,
            texts,
            model,
            window=_positive("window", window),
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
        model = model or self.model
        if not model or not isinstance(model, str):
            raise ValueError("no model: pass model=... or AsyncClient(model=...)")
        return model

    def _check_encoding(self, fmt: str | None) -> EncodingFormat | None:
        if fmt is not None and fmt not in _ENCODINGS:
            raise ValueError(f"encoding_format must be 'base64' or 'float', not {fmt!r}")
        return fmt  # type: ignore[return-value]

    def _check_api_key(self) -> None:
        if not self._api_key and not is_loopback_url(self.base_url):
            raise MissingAPIKeyError(
                "no API key: pass AsyncClient(api_key=...) or set TOGETHER_API_KEY"
            )

    async def _run(
        self, texts: Sequence[str], model: str, sink: Sink, fmt: EncodingFormat | None
    ) -> None:
        if not texts:
            return
        self._check_api_key()
        await _check_inputs(texts)
        await run_call(self._settings, texts, model, sink, prefer_float=fmt == "float")


async def _check_inputs(texts: Sequence[object]) -> None:
    """Refuse non-string inputs before anything is sent (and paid for), naming the first one;
    in chunks, so a million inputs never stall the event loop."""
    n = len(texts)
    for start in range(0, n, _CHECK_CHUNK):
        bad = find_invalid_input(texts, start, min(n, start + _CHECK_CHUNK))
        if bad is not None:
            raise invalid_input_error(texts, bad)
        if n > _CHECK_CHUNK:
            await asyncio.sleep(0)
