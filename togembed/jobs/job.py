"""A corpus job: embed every record of an input file into an output file, durably.

Every answer is recorded in the job store (vectors appended to a file, their rows committed to
SQLite, one transaction per group of batches) as it arrives, so a job killed at any moment and
started again re-sends only what was in flight.
Identical texts are sent once (a ``TextIndex`` in memory knows every stored text; a resumed
job loads it from the store); a vector cache shared between jobs skips what any job already
paid for; inputs the server rejects for good are recorded as failures and the job goes on.
The output file is written while the job runs, in input order (``OutputFollower``), to a temp
file renamed into place only when every input is embedded or failed (an empty file when there
is no row).

An input that changed since the job started (appended to, edited, touched, another id field) is
reconciled with the stored work by id and text before anything is sent (``JobStore.reconcile``):
what was paid for is kept, only new or changed texts are sent. A job that stored nothing (it
stopped on a bad record, found an empty input, or had its first request refused) leaves no job
files behind, and job files that hold nothing are started afresh whatever the settings.

The store lives in one writer thread, the output file in another: the event loop never waits
on the disk, except when the writes fall behind (then it stops pulling new texts:
backpressure). The input is read and hashed (and looked up in the cache) a couple of blocks
ahead of the texts being sent, so a request slot that frees up finds its texts ready.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs
import numpy as np

from ..api.async_client import AsyncClient
from ..core.batching import estimate_tokens
from ..core.stream import TextBlocks
from .cache import VectorCache, cache_key
from .failures import failures_path, write_failures
from .jobfile import job_path
from .output import OutputFollower
from .readers import RecordBlock, read_blocks, scan_records
from .reconcile import Reconciled
from .store import JobStore
from .textindex import TextIndex, text_hash
from .writers import OutputFile

__all__ = ["JobOptions", "JobProgress", "JobResult", "failures_path", "run_job"]

T = TypeVar("T")

_READ_BLOCK = 1024  # records read, hashed and looked up together
_BLOCKS_AHEAD = 2  # blocks read and looked up ahead of the one being sent
_MAX_PENDING_WRITES = 4096  # vectors waiting for the writer thread before we stop pulling

JobStatus = Literal["complete", "failures", "budget", "interrupted"]

# Settings a job follows by reconciling its stored work (vectors depend on the model and the
# text alone); any other change (the model) is refused once something was paid for.
_RECONCILED = ("input", "input_size", "input_mtime_ns", "id_field", "text_field")


@attrs.frozen(kw_only=True)
class JobOptions:
    input: Path
    output: Path
    model: str
    id_field: str | None = None
    text_field: str = "text"
    retry_failed: bool = False
    restart: bool = False
    max_tokens: int | None = None  # stop sending once this many estimated tokens went out
    deadline: float | None = None  # time.monotonic() after which nothing new is sent
    cache: Path | None = None
    window: int | None = None


@attrs.define
class JobProgress:
    """Live counters, handed to the progress display."""

    total: int = 0  # inputs in the file
    done_before: int = 0  # embedded by earlier runs
    failed_before: int = 0
    embedded: int = 0  # this run, from the API
    deduplicated: int = 0  # this run, copied from an identical text
    cached: int = 0  # this run, from the vector cache
    failed: int = 0  # this run, rejected for good
    tokens_sent: int = 0  # estimated
    started: float = attrs.field(factory=time.monotonic)
    # The input changed since the job's last run: what changed (field -> (old, new)) and
    # what the reconciliation made of it.
    changes: dict[str, tuple[Any, Any]] = attrs.field(factory=dict)
    reconciled: Reconciled | None = None

    @property
    def finished(self) -> int:
        return (
            self.done_before
            + self.failed_before
            + self.embedded
            + self.deduplicated
            + self.cached
            + self.failed
        )


@attrs.frozen
class JobResult:
    status: JobStatus
    progress: JobProgress
    output: Path | None  # written, or None when the job is not complete
    failures: Path | None  # the failures file, if any input failed
    message: str = ""
    rows: int = 0  # rows in the output written


@attrs.frozen(eq=False)
class _Block:
    """Records read ahead (``texts[k]`` at ``positions[k]`` with ``ids[k]``), with their text
    hashes, and with ``--cache`` their cache keys and the future of their cache lookup."""

    positions: list[int]
    ids: list[str]
    texts: list[str]
    hashes: list[bytes]
    keys: list[bytes] | None
    cached: asyncio.Future[dict[bytes, np.ndarray]] | None


class _Writer:
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


def output_metadata(opts: JobOptions) -> dict[str, Any]:
    """How the output's vectors were made, kept in a Parquet output (``togembed search`` reads
    it): the model, and where the texts are."""
    return {
        "model": opts.model,
        "input": str(opts.input.resolve()),
        "id_field": opts.id_field,
        "text_field": opts.text_field,
    }


def _meta(opts: JobOptions) -> dict[str, Any]:
    """What the stored vectors depend on: a rerun with other values must not mix them in."""
    stat = opts.input.stat()
    return {
        "model": opts.model,
        "input": str(opts.input.resolve()),
        "input_size": stat.st_size,
        "input_mtime_ns": stat.st_mtime_ns,
        "id_field": opts.id_field,
        "text_field": opts.text_field,
    }


async def run_job(
    client: AsyncClient,
    opts: JobOptions,
    *,
    stop: asyncio.Event | None = None,
    on_progress: Callable[[JobProgress], None] | None = None,
) -> JobResult:
    """Run (or resume) the job; ``stop`` set = send nothing new, finish what is in flight."""
    stop = stop or asyncio.Event()
    writer = _Writer()
    discard = False
    try:
        return await _Job(client, opts, writer, stop, on_progress).run()
    finally:
        try:
            if writer.store is not None:
                await asyncio.shield(writer.drain())  # raises if a commit failed
                # Nothing stored: a bad or empty input, a wrong model or key refused at the
                # first request, a stop before the first answer. No job files stay behind.
                counts = await writer.call(writer.store.counts)
                discard = counts.done == 0 and counts.failed == 0
        finally:
            writer.close()  # whatever happened: threads stopped, temp output dropped, unlocked
        if discard:  # nothing paid for: the corrected command starts afresh, not a "mismatch"
            JobStore.delete(job_path(opts.output))


class _Job:
    def __init__(
        self,
        client: AsyncClient,
        opts: JobOptions,
        writer: _Writer,
        stop: asyncio.Event,
        on_progress: Callable[[JobProgress], None] | None,
    ) -> None:
        self.client = client
        self.opts = opts
        self.w = writer
        self.stop = stop
        self.on_progress = on_progress or (lambda p: None)
        self.progress = JobProgress()
        self.stopped_by: JobStatus | None = None
        # Texts sent and not yet recorded, in the order the stream will answer them:
        # (position, id, text hash, cache key or None).
        self.sent: collections.deque[tuple[int, str, bytes, bytes | None]] = collections.deque()
        # Dedup of texts in flight: hash -> first position sent; that position -> waiting copies.
        self.in_flight_hash: dict[bytes, int] = {}
        self.waiting: dict[int, list[tuple[int, str]]] = {}
        # Dedup of stored texts: every row recorded (this run or before) by text hash; and the
        # rows recorded since the block being sent looked its texts up in it.
        self.index = TextIndex()
        self.recorded_since: dict[bytes, int] = {}
        self.cache_options = f"{client.encoding_format}"
        # Texts handed to the stream whose answer is not yet durable (committed, or recorded as
        # a failure): at most concurrency x batch size, so that a kill at any instant loses at
        # most that many paid inputs (whether in flight or answered and not yet committed).
        self.unconfirmed = 0
        self.max_unconfirmed = client.concurrency * client.batch_size
        self.confirmed = asyncio.Event()
        self.commit_failed = False
        writer.on_committed = self._confirm

    def _confirm(self, answers: int | None) -> None:
        """``answers`` sent texts are recorded for good; None: a commit failed."""
        if answers is None:
            self.commit_failed = True
        else:
            self.unconfirmed -= answers
        self.confirmed.set()

    async def _room_for(self, n: int) -> None:
        """Wait until ``n`` more texts may be sent (the stream asks before each batch), then
        count them as unconfirmed."""
        while self.unconfirmed and self.unconfirmed + n > self.max_unconfirmed:
            if self.commit_failed:  # no room will come: the job stops with the commit's error
                await self.w.drain()
            self.confirmed.clear()
            await self.confirmed.wait()
        self.unconfirmed += n

    def _recorded(self, hashes: list[bytes], positions: list[int]) -> None:
        """Rows queued for the store (not yet committed: a copy of them must drain first)."""
        self.index.add(hashes, positions)
        self.recorded_since.update(zip(hashes, positions, strict=True))

    async def run(self) -> JobResult:
        opts, w, p = self.opts, self.w, self.progress
        path = job_path(opts.output)
        await w.call(OutputFile.prepare, opts.output)
        if opts.restart:
            JobStore.delete(path)
        w.store = store = await w.call(
            JobStore.open,
            path,
            meta=_meta(opts),
            changeable=_RECONCILED,
            restart_if_unpaid=True,
        )
        if opts.cache is not None:
            w.cache = await w.call(VectorCache.open, opts.cache)
        if store.changed:  # the input changed: keep what was paid for, by text
            p.changes = dict(store.changed)
            p.reconciled = await w.call(
                store.reconcile, self._hashed_blocks(), keep_ids=opts.id_field is not None
            )
        if store.ids_total is None:  # first run: every id checked before anything is paid
            if opts.id_field is None:
                # Line and row numbers cannot repeat: the pass only reads every record (a bad
                # one still stops the job before anything is paid for) and counts them.
                total = await w.call(
                    scan_records, opts.input, id_field=None, text_field=opts.text_field
                )
                await w.call(store.register_count, total)
            else:
                await w.call(store.register_ids, self._id_pairs())
        p.total = store.ids_total or 0
        if opts.retry_failed:
            await w.call(store.clear_failures)
        done = await w.call(store.done_bitmap, p.total)
        failed = await w.call(store.failed_positions)
        if done.any():  # a resumed job: the texts embedded before, for dedup
            self.index = await w.call(_load_index, store)
        p.done_before = int(done.sum())
        p.failed_before = len(failed)
        finished = done.copy()
        finished[list(failed)] = True
        w.output = OutputFollower(
            store, opts.output, finished, w.pool.submit, metadata=output_metadata(opts)
        )
        await w.call(w.output.advance)  # a resumed job's earlier rows, step by step
        self.on_progress(p)

        if p.done_before + p.failed_before < p.total:
            await self._embed(done, failed)
        await w.drain()
        return await self._finish()

    def _blocks(self) -> Iterator[RecordBlock]:
        opts = self.opts
        return read_blocks(
            opts.input, id_field=opts.id_field, text_field=opts.text_field, size=_READ_BLOCK
        )

    def _id_pairs(self) -> Iterator[tuple[int, str]]:
        for block in self._blocks():
            yield from enumerate(block.ids, start=block.start)

    def _hashed_blocks(self) -> Iterator[tuple[int, list[str], list[bytes]]]:
        """The input's (first position, ids, text hashes), a block at a time: what
        ``reconcile`` needs (run in the writer thread, off the event loop)."""
        for block in self._blocks():
            yield block.start, block.ids, [text_hash(t) for t in block.texts]

    # -- sending ---------------------------------------------------------------------------

    async def _embed(self, done: np.ndarray, failed: set[int]) -> None:
        texts = self._texts_to_send(done, failed)
        stream = self.client.embed_stream(
            TextBlocks(texts, admit=self._room_for),
            model=self.opts.model,
            window=self.opts.window,
            errors="collect",
        )
        try:
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    await self._record_chunk(chunk.vectors, chunk.errors, chunk.start)
        finally:
            # Stops its reader task now, not whenever the garbage collector gets to it.
            await texts.aclose()

    async def _texts_to_send(
        self, done: np.ndarray, failed: set[int]
    ) -> AsyncGenerator[list[str], None]:
        """Yield the texts that need the API, about a batch at a time; record copies and
        cache hits on the way.

        A reader task reads, hashes and looks up blocks ahead of this one (``_read_ahead``):
        the stream never waits for a block to be read or for its cache lookup (queued behind
        a commit and its fsyncs) when a request slot frees up."""
        blocks: asyncio.Queue[_Block | BaseException | None] = asyncio.Queue(_BLOCKS_AHEAD)
        reader = asyncio.ensure_future(self._read_ahead(done, failed, blocks))
        size = self.client.batch_size
        try:
            while (item := await blocks.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                found = await item.cached if item.cached is not None else {}
                known = self.index.lookup(item.hashes)
                self.recorded_since = recorded = {}
                copies: list[tuple[int, str, int]] = []
                hits: list[tuple[int, str, bytes, np.ndarray]] = []
                in_flight, sent = self.in_flight_hash, self.sent
                positions, ids, texts, keys = item.positions, item.ids, item.texts, item.keys
                hashes = item.hashes
                if self._all_new(item, known):  # the usual block: every text is sent
                    for a in range(0, len(texts), size):
                        if self._out_of_budget():
                            break
                        b = a + size
                        in_flight.update(zip(hashes[a:b], positions[a:b], strict=True))
                        sent.extend(
                            zip(positions[a:b], ids[a:b], hashes[a:b], [None] * size, strict=False)
                        )
                        self.progress.tokens_sent += sum(map(estimate_tokens, texts[a:b]))
                        yield texts[a:b]
                    hashes = []  # nothing left for the loop below
                out: list[str] = []
                for k, h in enumerate(hashes):
                    key = keys[k] if keys is not None else None
                    if known[k] >= 0:
                        copies.append((positions[k], ids[k], known[k]))
                    elif h in recorded:
                        copies.append((positions[k], ids[k], recorded[h]))
                    elif h in in_flight:
                        self.waiting.setdefault(in_flight[h], []).append((positions[k], ids[k]))
                    elif key is not None and key in found:
                        hits.append((positions[k], ids[k], h, found[key]))
                    else:
                        if self._out_of_budget():
                            break
                        in_flight[h] = positions[k]
                        sent.append((positions[k], ids[k], h, key))
                        self.progress.tokens_sent += estimate_tokens(texts[k])
                        out.append(texts[k])
                        if len(out) == size:
                            yield out
                            out = []
                if out:
                    yield out
                await self._record_found(copies, hits)
                if self.stopped_by is not None:
                    return
        finally:
            reader.cancel()
            while not blocks.empty():  # lookups no one will read
                item = blocks.get_nowait()
                if isinstance(item, _Block) and item.cached is not None:
                    if item.cached.done() and not item.cached.cancelled():
                        item.cached.exception()  # retrieved: no "never retrieved" warning
                    item.cached.cancel()

    async def _read_ahead(
        self,
        done: np.ndarray,
        failed: set[int],
        blocks: asyncio.Queue[_Block | BaseException | None],
    ) -> None:
        """Read, hash and (in the cache) look up blocks of the records still to do into
        ``blocks`` (then None, or the error reading raised): the event loop does it while it
        would wait for answers."""
        cache = self.w.cache
        try:
            for block in self._blocks():
                start, stop = block.start, block.start + len(block.ids)
                if done[start:stop].any() or failed:  # a resumed job: keep what is left
                    keep = [
                        k
                        for k in range(stop - start)
                        if not done[start + k] and start + k not in failed
                    ]
                    positions = [start + k for k in keep]
                    ids = [block.ids[k] for k in keep]
                    texts = [block.texts[k] for k in keep]
                else:
                    positions, ids, texts = list(range(start, stop)), block.ids, block.texts
                if not texts:
                    continue
                hashes = [text_hash(t) for t in texts]
                keys = cached = None
                if cache is not None:
                    keys = [self._cache_key(t) for t in texts]
                    cached = self.w.submit(cache.get_many, keys)
                await blocks.put(_Block(positions, ids, texts, hashes, keys, cached))
        except Exception as exc:  # e.g. a bad record: raised where the texts reach it
            await blocks.put(exc)
        else:
            await blocks.put(None)

    async def _record_found(
        self, copies: list[tuple[int, str, int]], hits: list[tuple[int, str, bytes, np.ndarray]]
    ) -> None:
        """Record a block's copies of stored texts and its cache hits."""
        if copies:
            await self.w.drain()  # sources recorded moments ago must be committed first
            await self.w.record_duplicates(copies)
            self.progress.deduplicated += len(copies)
        if hits:
            positions, hashes = [pos for pos, _, _, _ in hits], [h for _, _, h, _ in hits]
            self._recorded(hashes, positions)
            vectors = np.stack([v for *_, v in hits])
            ids = [rid for _, rid, _, _ in hits]
            await self.w.add_batch(positions, ids, vectors, hashes, answers=False)
            self.progress.cached += len(hits)
        self.on_progress(self.progress)

    def _all_new(self, item: _Block, known: list[int]) -> bool:
        """No text of the block is stored, in flight, repeated in it, or (no cache) a cache
        hit, and no token budget needs counting text by text."""
        hashes = item.hashes
        return (
            item.keys is None
            and self.opts.max_tokens is None
            and max(known, default=-1) < 0
            and len(set(hashes)) == len(hashes)
            and self.in_flight_hash.keys().isdisjoint(hashes)
        )

    def _cache_key(self, text: str) -> bytes:
        return cache_key(self.opts.model, self.cache_options, text)

    def _out_of_budget(self) -> bool:
        opts = self.opts
        over_tokens = opts.max_tokens is not None and self.progress.tokens_sent >= opts.max_tokens
        over_time = opts.deadline is not None and time.monotonic() >= opts.deadline
        if self.stop.is_set():
            self.stopped_by = self.stopped_by or "interrupted"
        elif over_tokens or over_time:
            self.stopped_by = "budget"
        return self.stopped_by is not None

    # -- recording -------------------------------------------------------------------------

    async def _record_chunk(self, vectors: np.ndarray, errors: Any, start: int) -> None:
        """Record a chunk of answers (``errors``: stream position -> error) and what waited on
        its texts: copies of them, or failures with them."""
        sent, in_flight, n = self.sent, self.in_flight_hash, len(vectors)
        items = [sent.popleft() for _ in range(n)]
        positions, ids, hashes, keys = (list(column) for column in zip(*items, strict=True))
        for h in hashes:
            in_flight.pop(h, None)
        bad = sorted(p - start for p in errors)
        rows = vectors
        ok_positions, ok_ids, ok_hashes, ok_keys = positions, ids, hashes, keys
        if bad:
            bad_set = set(bad)
            ok = [k for k in range(n) if k not in bad_set]
            rows = vectors[ok]
            ok_positions = [positions[k] for k in ok]
            ok_ids = [ids[k] for k in ok]
            ok_hashes = [hashes[k] for k in ok]
            ok_keys = [keys[k] for k in ok]
        if ok_positions:
            # Before queuing: the commit may land while add_batch waits.
            self._recorded(ok_hashes, ok_positions)
            await self.w.add_batch(ok_positions, ok_ids, rows, ok_hashes)
            self.progress.embedded += len(ok_positions)
            if self.w.cache is not None:
                pairs = [(key, rows[k]) for k, key in enumerate(ok_keys) if key is not None]
                await self.w.call(self.w.cache.put_many, pairs)
        failures = [(positions[k], ids[k], str(errors[start + k]), hashes[k]) for k in bad]
        copies: list[tuple[int, str, int]] = []
        if self.waiting:  # copies of these texts, read while they were in flight
            for k, pos in enumerate(positions):
                for wpos, wid in self.waiting.pop(pos, ()):
                    if start + k in errors:
                        failures.append((wpos, wid, str(errors[start + k]), hashes[k]))
                    else:
                        copies.append((wpos, wid, pos))
        if copies:
            await self.w.drain()  # the source rows must be committed first
            await self.w.record_duplicates(copies)
            self.progress.deduplicated += len(copies)
        if failures:
            await self.w.record_failures(failures)
            self.progress.failed += len(failures)
        if bad:
            self._confirm(len(bad))
        self.on_progress(self.progress)

    # -- the end ---------------------------------------------------------------------------

    async def _finish(self) -> JobResult:
        w, p, opts = self.w, self.progress, self.opts
        store = w.store
        assert store is not None
        counts = await w.call(store.counts)
        fails = failures_path(opts.output)
        if counts.failed:
            await w.call(write_failures, fails, store.iter_failures())
        elif fails.exists():
            fails.unlink()
        output = w.output
        assert output is not None
        if counts.done + counts.failed < p.total:
            await w.call(output.abort)
            status: JobStatus = self.stopped_by or "interrupted"
            return JobResult(status, p, None, fails if counts.failed else None)
        written = await w.call(output.commit, counts.done)
        return JobResult(
            "failures" if counts.failed else "complete",
            p,
            written,
            fails if counts.failed else None,
            rows=counts.done,
        )


def _load_index(store: JobStore) -> TextIndex:
    index = TextIndex()
    for hashes, positions in store.iter_hashes():
        index.add(hashes, positions)
    return index
