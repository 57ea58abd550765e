"""A blocking facade for scripts and notebooks: the async client runs on a private loop thread,
so it works even where an event loop is already running (Jupyter)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import AsyncGenerator, Coroutine, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar

import numpy as np

from ..core.config import EncodingFormat
from ..core.stream import EmbeddingChunk
from ..core.types import EmbeddingResponse
from .async_client import AsyncClient
from .models import ModelList

__all__ = ["Client", "Embeddings", "Models"]

# At interpreter exit or garbage collection, how long closing an abandoned client may take.
_CLOSE_TIMEOUT = 5.0

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


def _shutdown(portal: _LoopThread, client: AsyncClient) -> None:
    """Close a ``Client`` nobody closed, quietly: at interpreter exit (the loop thread is a
    daemon and still runs then) or when it is garbage collected. Holds no reference to the
    ``Client`` itself, only to what it owns."""
    loop = portal.loop
    if loop.is_closed():
        return
    if threading.current_thread() is portal._thread:  # collected on the loop thread itself
        task = loop.create_task(client.close())
        task.add_done_callback(lambda _: loop.stop())
        return
    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(client.close(), loop).result(_CLOSE_TIMEOUT)
    with contextlib.suppress(Exception):
        portal.stop()


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
        dimensions: int | None = None,
        user: str | None = None,
        extra_headers: Mapping[str, str | None] | None = None,
        extra_query: Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> EmbeddingResponse:
        """Same as ``AsyncClient.embeddings.create``, blocking."""
        c = self._client
        return c._portal.run(
            c._async.embeddings.create(
                input=input,
                model=model,
                encoding_format=encoding_format,
                dimensions=dimensions,
                user=user,
                extra_headers=extra_headers,
                extra_query=extra_query,
                extra_body=extra_body,
                timeout=timeout,
            )
        )


class Models:
    """``client.models`` of the sync client."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self, *, all: bool = False, timeout: float | None = None) -> ModelList:
        """Same as ``AsyncClient.models.list``, blocking."""
        c = self._client
        return c._portal.run(c._async.models.list(all=all, timeout=timeout))


class Client:
    """Blocking client with the same arguments and methods as ``AsyncClient``. One that is
    never closed is closed quietly when it is garbage collected or at interpreter exit."""

    def __init__(self, **kwargs: Any) -> None:
        self._async = AsyncClient(**kwargs)
        self._portal = _LoopThread()
        self._finalizer = weakref.finalize(self, _shutdown, self._portal, self._async)
        self.embeddings = Embeddings(self)
        self.models = Models(self)

    @property
    def stats(self) -> Any:
        return self._async.stats

    def __repr__(self) -> str:
        return repr(self._async).replace("AsyncClient", "Client")

    def embed(
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
        """Same as ``AsyncClient.embed``, blocking."""
        return self._portal.run(
            self._async.embed(
                texts,
                model=model,
                dimensions=dimensions,
                user=user,
                extra_headers=extra_headers,
                extra_query=extra_query,
                extra_body=extra_body,
                timeout=timeout,
            )
        )

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
        self._finalizer.detach()
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
