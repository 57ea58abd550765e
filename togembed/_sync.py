"""A blocking facade for scripts and notebooks: the async client runs on a private loop thread,
so it works even where an event loop is already running (Jupyter)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, Coroutine, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar

import numpy as np

from ._client import AsyncClient
from ._config import EncodingFormat
from ._stream import EmbeddingChunk
from ._types import EmbeddingResponse

__all__ = ["Client", "Embeddings"]

T = TypeVar("T")


class _LoopThread:
    """An event loop in a daemon thread, fed coroutines from the caller's thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="togembed-loop", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:  # Ctrl-C in the caller: stop the work, do not orphan it
            future.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class Embeddings:
    """``client.embeddings`` of the sync client."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create(
        self,
        *,
        input: str | Sequence[str],
        model: str | None = None,
        encoding_format: EncodingFormat | None = None,
    ) -> EmbeddingResponse:
        """Same as ``AsyncClient.embeddings.create``, blocking."""
        c = self._client
        return c._portal.run(
            c._async.embeddings.create(input=input, model=model, encoding_format=encoding_format)
        )


class Client:
    """Blocking client with the same arguments and methods as ``AsyncClient``."""

    def __init__(self, **kwargs: Any) -> None:
        self._async = AsyncClient(**kwargs)
        self._portal = _LoopThread()
        self.embeddings = Embeddings(self)

    @property
    def stats(self) -> Any:
        return self._async.stats

    def __repr__(self) -> str:
        return repr(self._async).replace("AsyncClient", "Client")

    def embed(self, texts: str | Iterable[str], *, model: str | None = None) -> np.ndarray:
        """Same as ``AsyncClient.embed``, blocking."""
        return self._portal.run(self._async.embed(texts, model=model))

    def embed_stream(
        self,
        texts: Iterable[str],
        *,
        model: str | None = None,
        window: int | None = None,
        errors: Literal["raise", "collect"] = "raise",
    ) -> Iterator[EmbeddingChunk]:
        """Same as ``AsyncClient.embed_stream``, as a blocking iterator. ``texts`` is pulled on
        the client's loop thread; closing the iterator (or dropping it) cancels what is in
        flight."""
        chunks = self._async.embed_stream(texts, model=model, window=window, errors=errors)
        try:
            while (chunk := self._portal.run(_next(chunks))) is not None:
                yield chunk
        finally:
            portal = self._portal
            if not portal.loop.is_closed():
                done = asyncio.run_coroutine_threadsafe(_close(chunks), portal.loop)
                # Wait for the cancellations, unless the garbage collector closes us on the
                # loop thread itself (waiting there would block it for good).
                if threading.current_thread() is not portal._thread:
                    done.result()

    def close(self) -> None:
        """Close the HTTP session and stop the loop thread. Safe to call twice."""
        if self._portal.loop.is_closed():
            return
        try:
            self._portal.run(self._async.close())
        finally:
            self._portal.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def _next(chunks: AsyncGenerator[EmbeddingChunk, None]) -> EmbeddingChunk | None:
    return await anext(chunks, None)


async def _close(chunks: AsyncGenerator[EmbeddingChunk, None]) -> None:
    # "already running": a step cancelled by Ctrl-C is still unwinding, and closes it itself
    with contextlib.suppress(RuntimeError):
        await chunks.aclose()
