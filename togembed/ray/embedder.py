"""``Embedder``: the callable class Ray Data runs in its actors,
``ds.map_batches(Embedder, fn_constructor_kwargs={...}, batch_format="pyarrow", ...)``.

Each actor makes one ``AsyncClient`` on its own event loop at its first batch (``async def
__call__``: Ray Data runs several batches of an actor at once on that loop) and closes it when
Ray retires the actor. Retries live in the client: an exception escaping a batch would stop
the whole dataset. Rows the server rejects for good raise naming the row, or with
``errors="collect"`` get a NaN vector and a message in the error column.

May import ray, core, api and this subpackage.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import numpy as np
import pyarrow as pa

from ..api.async_client import AsyncClient
from ..core.errors import APIStatusError, InvalidInputError, TogembedError
from ..core.limiter import Limiter
from ..core.ratelimit import RateLimiter
from .capped import CappedLimiter
from .settings import EmbedSettings

__all__ = ["Embedder", "RowError", "vector_column"]


class RowError(TogembedError):
    """A row the server rejects for good (``errors="raise"``): which row, and why."""


def vector_column(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float32 as an Arrow fixed-size list column (Parquet and pandas read it)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


class Embedder:
    """Embeds a text column of each batch into a float32 vector column (see ``EmbedSettings``
    for the arguments; pass them as ``fn_constructor_kwargs``)."""

    def __init__(self, **settings: Any) -> None:
        self.settings = EmbedSettings(**settings)
        self._client: AsyncClient | None = None
        self._limiter: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._dim: int | None = settings.get("dimensions")

    async def __call__(self, batch: pa.Table | dict[str, Any]) -> pa.Table:
        if not isinstance(batch, pa.Table):
            batch = pa.table(batch)
        client = await self._open()
        s = self.settings
        texts = batch.column(s.text_column).to_pylist()
        if s.errors == "collect":
            vectors, errors = await self._collect(client, texts)
        else:
            vectors, errors = await self._raise(client, batch, texts), None
        if s.output_column in batch.column_names:
            batch = batch.drop_columns([s.output_column])
        batch = batch.append_column(s.output_column, vector_column(vectors))
        if errors is not None:
            if s.errors_column in batch.column_names:
                batch = batch.drop_columns([s.errors_column])
            batch = batch.append_column(s.errors_column, pa.array(errors, type=pa.string()))
        return batch

    # -- one batch --------------------------------------------------------------------------

    async def _raise(self, client: AsyncClient, batch: pa.Table, texts: list[Any]) -> np.ndarray:
        try:
            vectors = await client.embed(texts)
        except (APIStatusError, InvalidInputError) as exc:
            index = exc.input_index
            if index is None:
                raise
            raise RowError(f"{self._name_row(batch, texts, index)}: {exc}") from exc
        self._dim = vectors.shape[1]
        return vectors

    async def _collect(
        self, client: AsyncClient, texts: list[Any]
    ) -> tuple[np.ndarray, list[str | None]]:
        errors: list[str | None] = [None] * len(texts)
        good = [i for i, t in enumerate(texts) if isinstance(t, str)]
        for i in set(range(len(texts))) - set(good):
            errors[i] = f"not a text: {type(texts[i]).__name__}"
        parts: list[np.ndarray] = []
        async with contextlib.aclosing(
            client.embed_stream([texts[i] for i in good], errors="collect")
        ) as stream:
            async for chunk in stream:
                parts.append(chunk.vectors)
                for pos, error in chunk.errors.items():
                    errors[good[pos]] = str(error)
        done = np.concatenate(parts) if parts else np.empty((0, 0), np.float32)
        if done.shape[1] and not np.isnan(done).all():
            self._dim = done.shape[1]
        dim = self._dim if self._dim is not None else await self._probe_dim(client)
        vectors = np.full((len(texts), dim), np.nan, dtype=np.float32)
        if len(good) and done.shape[1] == dim:
            vectors[good] = done
        return vectors, errors

    async def _probe_dim(self, client: AsyncClient) -> int:
        """Every row of the batch failed before any answer said the vectors' size."""
        self._dim = int((await client.embed(["dimension probe"])).shape[1])
        return self._dim

    def _name_row(self, batch: pa.Table, texts: list[Any], index: int) -> str:
        id_column = self.settings.id_column
        if id_column and id_column in batch.column_names:
            return f"row {id_column}={batch.column(id_column)[index].as_py()!r}"
        text = texts[index]
        shown = repr(text[:60] + "..." if isinstance(text, str) and len(text) > 60 else text)
        return f"row with {self.settings.text_column}={shown}"

    # -- the client, opened on the actor's loop and closed with the actor ------------------

    async def _open(self) -> AsyncClient:
        if self._client is not None:
            return self._client
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._client is None:
                self._loop = asyncio.get_running_loop()
                self._limiter = await self._make_limiter()
                capped = CappedLimiter(self._limiter, self.settings.max_in_flight)
                self._client = AsyncClient(limiter=capped, **self.settings.client_kwargs())
        return self._client

    async def _make_limiter(self) -> Limiter:
        s = self.settings
        if s.pacing == "per-worker":
            return RateLimiter(rpm=s.rpm, tpm=s.tpm)
        if s.pacing == "redis":
            from ..core.redis_limiter import RedisLimiter

            return RedisLimiter(s.redis_url, rpm=s.rpm, tpm=s.tpm, api_key=s.api_key())
        from .limiter import RayLimiter
        from .limiter_actor import get_or_create, limiter_name

        name = s.limiter_name or limiter_name(s.resolved_base_url(), s.api_key(), s.model)
        # Made here only when nobody made it yet (embed_dataset makes it on the driver):
        # detached, so that this worker's death does not take everyone's limiter with it.
        actor = get_or_create(name, detached=True, **s.limiter_settings())
        return await RayLimiter.open(actor)

    async def aclose(self) -> None:
        client, limiter = self._client, self._limiter
        self._client = self._limiter = None
        if client is not None:
            await client.close()
        closer = getattr(limiter, "aclose", None)
        if closer is not None:
            await closer()

    def close(self) -> None:
        """Close the client and limiter from any thread (Ray retires an actor from another
        thread than its event loop's)."""
        loop = self._loop
        if self._client is None or loop is None or loop.is_closed():
            return
        if loop.is_running() and threading.current_thread() is not _loop_thread(loop):
            future = asyncio.run_coroutine_threadsafe(self.aclose(), loop)
            with contextlib.suppress(Exception):
                future.result(10)
        elif not loop.is_running():
            with contextlib.suppress(Exception):
                loop.run_until_complete(self.aclose())

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _loop_thread(loop: asyncio.AbstractEventLoop) -> threading.Thread | None:
    """The thread running ``loop`` (None if unknown)."""
    thread_id = getattr(loop, "_thread_id", None)
    for thread in threading.enumerate():
        if thread.ident == thread_id:
            return thread
    return None
