"""The local model's dynamic batcher: concurrent requests merged into model calls.

Owns what the local-model backend needs from a model (:class:`EmbeddingModel`), its counters
(:class:`ServeStats`), and :class:`Batcher`: requests queue their texts; one task cuts
batches of up to ``max_batch`` texts (each queued request an equal share, the leftover first
come, first served), waits at most ``max_wait`` for company, and runs each batch in ONE worker
thread, one model call at a time. A request whose client went away drops the texts the model
has not seen yet.

May import: the standard library, numpy, attrs. No aiohttp, no HTTP: ``local_backend`` turns
the outcomes (rows, :class:`ModelFailed`, :class:`Unavailable`) into answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import attrs
import numpy as np

__all__ = ["Batcher", "EmbeddingModel", "Job", "ModelFailed", "ServeStats", "Unavailable"]

logger = logging.getLogger("togembed")


class EmbeddingModel(Protocol):
    """What the server needs from a model (``togembed.local.LocalModel`` has it).

    ``embed`` and ``count_tokens`` are synchronous and CPU-bound; the server calls them from
    one worker thread, one call at a time. ``embed`` truncates inputs longer than
    ``max_tokens`` (as sentence-transformers does) rather than failing.
    """

    name: str
    dim: int
    max_tokens: int

    def embed(self, texts: list[str]) -> np.ndarray: ...

    def count_tokens(self, texts: list[str]) -> list[int]: ...


@attrs.define
class ServeStats:
    """Counters since start: is batching working, are clients giving up? (The connection
    counters at the end are the server's ``ConnectionGuard``'s.)"""

    requests: int = 0  # valid embeddings requests handed to the batcher
    inputs: int = 0  # texts in those requests
    model_calls: int = 0  # calls to model.embed (including retries of a failed batch alone)
    embedded: int = 0  # texts passed to model.embed
    largest_batch: int = 0  # most texts in one model call
    cancelled: int = 0  # requests whose client went away before the answer
    dropped: int = 0  # texts of cancelled requests never sent to the model
    model_errors: int = 0  # model calls that raised
    header_timeouts: int = 0  # connections closed: request head not received in time
    body_timeouts: int = 0  # requests answered 408: body not received in time
    refused_connections: int = 0  # connections answered 503: max_connections, all busy
    idle_closed: int = 0  # idle keep-alive connections closed to admit a new one at the cap


class Unavailable(Exception):
    """The batcher is closed (server shutting down)."""


class ModelFailed(Exception):
    """The model raised (or returned garbage) for a batch holding this request's texts."""


class Job:
    """One request's texts, results and progress through the queue."""

    __slots__ = ("done", "enqueued", "future", "next", "out", "texts", "tokens")

    def __init__(self, texts: list[str], dim: int, future: asyncio.Future[None], now: float):
        self.texts = texts
        self.out = np.empty((len(texts), dim), dtype=np.float32)
        self.tokens = np.zeros(len(texts), dtype=np.int64)
        self.future = future
        self.enqueued = now
        self.next = 0  # first text not yet handed to the model
        self.done = 0  # texts whose rows are in ``out``

    @property
    def remaining(self) -> int:
        return len(self.texts) - self.next


Slice = tuple[Job, int, int]  # job, start, stop


class Batcher:
    """Merges concurrent requests into model calls run in one worker thread.

    Created and used inside one event loop. ``submit`` waits for a request's rows;
    ``_run`` (a task) cuts batches from the queue and runs them one at a time.
    """

    def __init__(
        self,
        model: EmbeddingModel,
        *,
        max_batch: int,
        max_wait: float,
        stats: ServeStats,
        model_lock: threading.Lock,
    ) -> None:
        self.model = model
        self._model_lock = model_lock  # shared by every app of one server: one caller at a time
        self.dim = int(model.dim)
        self.max_tokens = int(model.max_tokens)
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.stats = stats
        self._queue: deque[Job] = deque()
        self._queued = 0  # texts in the queue not yet handed to the model
        self._running: list[Slice] = []  # the batch the model is working on
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="togembed-model")
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="togembed-serve-batcher"
            )

    async def aclose(self) -> None:
        """Stop batching, fail whatever still waits, and wait for a model call in progress."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for job in itertools.chain((s[0] for s in self._running), self._queue):
            if not job.future.done():
                job.future.set_exception(Unavailable())
        self._queue.clear()
        self._queued = 0
        self._running = []
        # The worker may be inside model.embed; wait for it without blocking the loop, so the
        # model is never used after close() returns.
        await asyncio.to_thread(self._executor.shutdown, True)

    async def submit(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Rows (float32, ``(len(texts), dim)``) and token counts for ``texts``, in order."""
        if self._closed:
            raise Unavailable()
        loop = asyncio.get_running_loop()
        job = Job(texts, self.dim, loop.create_future(), loop.time())
        if texts:
            self._queue.append(job)
            self._queued += len(texts)
            self._wake.set()
            try:
                await job.future
            except asyncio.CancelledError:
                self._drop(job)
                raise
        return job.out, job.tokens

    def _drop(self, job: Job) -> None:
        """The client went away: forget the texts the model has not seen yet."""
        self.stats.cancelled += 1
        left = job.remaining
        if left:
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
            self._queued -= left
            self.stats.dropped += left
            job.next = len(job.texts)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._queued < self.max_batch and self.max_wait > 0:
                # Not a full batch yet: wait for company until the oldest request's window
                # closes. Requests that queued while the model was busy are past it already.
                delay = self._queue[0].enqueued + self.max_wait - loop.time()
                if delay > 0:
                    self._wake.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
                    continue
            batch = self._take()
            # Kept on cancellation: aclose() fails these requests, the model call is lost.
            self._running = batch
            try:
                await self._dispatch(batch)
            except Exception as exc:  # a bug here must not leave every request hanging
                logger.exception("togembed serve: batch failed")
                for job, _, _ in batch:
                    self._fail(job, exc)
            self._running = []

    def _take(self) -> list[Slice]:
        """Cut the next batch: each queued request (oldest first) gets an equal share of the
        room, the leftover goes in queue order; requests not finished go to the back."""
        queue = self._queue
        room = self.max_batch
        jobs = list(itertools.islice(queue, room))  # at most max_batch requests fit
        share = max(1, room // len(jobs))
        counts: list[int] = []
        for job in jobs:
            k = min(job.remaining, share, room)
            counts.append(k)
            room -= k
            if not room:
                break
        for i, job in enumerate(jobs[: len(counts)]):
            if not room:
                break
            extra = min(job.remaining - counts[i], room)
            counts[i] += extra
            room -= extra
        batch: list[Slice] = []
        for job, k in zip(jobs[: len(counts)], counts, strict=True):
            queue.popleft()  # the served jobs are exactly the first len(counts) of the queue
            start = job.next
            job.next += k
            batch.append((job, start, job.next))
        self._queued -= sum(counts)
        queue.extend(job for job, _, _ in batch if job.remaining)
        return batch

    async def _dispatch(self, batch: list[Slice]) -> None:
        """Run one model call for ``batch`` and hand each request its rows."""
        texts = [t for job, start, stop in batch for t in job.texts[start:stop]]
        stats = self.stats
        stats.model_calls += 1
        stats.embedded += len(texts)
        stats.largest_batch = max(stats.largest_batch, len(texts))
        loop = asyncio.get_running_loop()
        try:
            vectors, tokens = await loop.run_in_executor(self._executor, self._call, texts)
        except Exception as exc:
            stats.model_errors += 1
            live = [s for s in batch if not s[0].future.done()]
            if len(live) > 1:
                # One request's text may be what broke the model: run each alone, so the others
                # in the batch still get their answer.
                logger.warning(
                    "model call failed (%s); retrying its %d requests alone", exc, len(live)
                )
                for piece in live:
                    await self._dispatch([piece])
                return
            logger.error("model call failed: %r", exc, exc_info=exc)
            for job, _, _ in live:
                self._fail(job, exc)
            return
        pos = 0
        for job, start, stop in batch:
            n = stop - start
            if not job.future.done():
                job.out[start:stop] = vectors[pos : pos + n]
                job.tokens[start:stop] = tokens[pos : pos + n]
                job.done += n
                if job.done == len(job.texts):
                    job.future.set_result(None)
            pos += n

    def _fail(self, job: Job, exc: BaseException) -> None:
        if not job.future.done():
            job.future.set_exception(ModelFailed(str(exc) or type(exc).__name__))
        # Whatever else it had queued is moot now.
        if job.remaining:
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
            self._queued -= job.remaining
            job.next = len(job.texts)

    def _call(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """In the worker thread: embed and count tokens, and check what the model returned."""
        with self._model_lock:
            vectors = np.asarray(self.model.embed(texts), dtype=np.float32)
            counts = np.asarray(self.model.count_tokens(texts), dtype=np.int64)
        if vectors.shape != (len(texts), self.dim):
            raise ValueError(
                f"model returned shape {vectors.shape} for {len(texts)} texts, "
                f"expected ({len(texts)}, {self.dim})"
            )
        if counts.shape != (len(texts),):
            raise ValueError(f"count_tokens returned {counts.size} counts for {len(texts)} texts")
        # Usage counts what the model saw: inputs past max_tokens are truncated.
        return vectors, np.minimum(counts, self.max_tokens)
