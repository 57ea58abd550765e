"""The job store's thread: every write of a job (the store, the cache, the output file that
follows the store) runs there, so the event loop never waits on the disk.

Answers are queued and committed in groups: while one commit (and its fsyncs) runs, what arrives
queues up, and is committed right after it in one transaction. The loop waits only when the
queue grows past ``_MAX_PENDING_WRITES`` vectors (backpressure).

May import: the standard library, numpy; ``cache``, ``output``, ``store``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from .cache import VectorCache
from .output import OutputFollower
from .store import JobStore

__all__ = ["StoreWriter"]

T = TypeVar("T")

_MAX_PENDING_WRITES = 4096  # vectors waiting for the writer thread before we stop pulling


class StoreWriter:
    """The job store and cache, used only from one thread; group commits of queued batches;
    the output file following the store."""

    def __init__(self) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="togembed-store")
        self.store: JobStore | None = None
        self.cache: VectorCache | None = None
        self.output: OutputFollower | None = None
        self._queued: list[tuple[list[int], list[str], np.ndarray, list[bytes]]] = []
        self._queued_rows = 0
        self._queued_answers = 0
        self._flush: asyncio.Future[None] | None = None
        # Told how many of the rows a commit made durable were answers from the API, or (the
        # answers' count then is None) that a commit failed.
        self.on_committed: Callable[[int | None], None] = lambda answers: None

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self.submit(fn, *args, **kwargs)

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """Queue ``fn`` for the writer thread now (it runs after everything queued before)."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self.pool, lambda: fn(*args, **kwargs))

    async def add_batch(
        self,
        positions: list[int],
        ids: list[str],
        vectors: np.ndarray,
        hashes: list[bytes],
        *,
        answers: bool = True,
    ) -> None:
        """Queue rows (``answers``: from the API, else from the cache) for the next group
        commit; waits only when the writer falls behind."""
        self._queued.append((positions, ids, vectors, hashes))
        self._queued_rows += len(positions)
        self._queued_answers += len(positions) if answers else 0
        if self._flush is None or self._flush.done():
            if self._flush is not None:
                self._flush.result()  # a commit that failed stops the job, not just its rows
            self._start_flush()
        elif self._queued_rows > _MAX_PENDING_WRITES:
            await self.drain()

    def _start_flush(self) -> None:
        groups, self._queued, self._queued_rows = self._queued, [], 0
        answers, self._queued_answers = self._queued_answers, 0
        self._flush = flush = asyncio.ensure_future(self.call(self._write_groups, groups))

        def committed(f: asyncio.Future[None]) -> None:
            if f.cancelled() or f.exception() is not None:
                self.on_committed(None)
                return
            self.on_committed(answers)
            # What queued up meanwhile is committed now, not when the next batch arrives.
            if self._queued and self._flush is f:
                self._start_flush()

        flush.add_done_callback(committed)

    def _write_groups(self, groups: list[tuple[list[int], list[str], np.ndarray, list[bytes]]]):
        assert self.store is not None
        positions = [p for g in groups for p in g[0]]
        ids = [i for g in groups for i in g[1]]
        hashes = [h for g in groups for h in g[3]]
        # The groups' arrays as they are: written with one pwritev, not joined (a copy of up to
        # _MAX_PENDING_WRITES vectors).
        vectors = [g[2] for g in groups]
        if self.output is not None:  # kept in memory for the output, handed over below
            for group in groups:
                self.output.offer(group[0], group[1], group[2])
        # Committed first: the job waits for this commit before it sends more (the output,
        # which may wait for its thread, comes after).
        self.store.record_batch(positions, ids, vectors, hashes=hashes)
        self._finished(positions)

    def _finished(self, positions: list[int]) -> None:
        if self.output is not None:
            self.output.mark(positions)

    async def record_duplicates(self, copies: list[tuple[int, str, int]]) -> None:
        """Record (pos, id, source pos) copies of stored rows (the sources must be committed)."""
        await self._record(JobStore.record_duplicates, copies)

    async def record_failures(self, failures: list[tuple[int, str, str, bytes]]) -> None:
        """Record (pos, id, reason, text hash) of inputs that failed for good."""
        await self._record(JobStore.record_failures, failures)

    async def _record(self, method: Callable[[JobStore, Any], None], items: list[Any]) -> None:
        def record() -> None:
            assert self.store is not None
            method(self.store, items)
            self._finished([item[0] for item in items])

        await self.call(record)

    async def drain(self) -> None:
        """Wait until everything queued is committed."""
        while self._flush is not None:
            flush = self._flush
            await flush
            if self._queued:
                self._start_flush()
            elif self._flush is flush:
                self._flush = None

    def close(self) -> None:
        def shut() -> None:
            if self.output is not None:
                self.output.abort()  # nothing, after a commit
            for resource in (self.store, self.cache):
                if resource is not None:
                    resource.close()

        self.pool.submit(shut).result()
        self.pool.shutdown(wait=True)
