"""Sending a job's texts: what needs the API, and what the answers become.

Identical texts are sent once: a text stored before (this run or an earlier one, looked up in a
``TextIndex``) or answered moments ago is recorded as a copy of that row; a text equal to one in
flight waits for its answer; a cache hit is recorded as it is. Everything else goes to the
stream about a batch at a time, within the token and time budget, and within ``Admission``'s
bound on paid inputs a kill could lose. Answers are queued for the writer's group commit;
inputs the server rejects for good are recorded as failures (with the copies that waited on
them), and the job goes on.

The per-text loops here run for every input: keep them free of extra Python work.

May import: the standard library, numpy; ``togembed.api``, ``togembed.core``; ``admission``,
``cache``, ``readahead``, ``readers``, ``storewriter``, ``textindex``, ``types``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any

import numpy as np

from ..api.async_client import AsyncClient
from ..core.batching import estimate_tokens
from ..core.stream import TextBlocks
from .admission import Admission
from .cache import cache_key
from .readahead import Block, BlockQueue, drop_unread, read_ahead
from .readers import RecordBlock
from .storewriter import StoreWriter
from .textindex import TextIndex
from .types import JobOptions, JobProgress, JobStatus

__all__ = ["Sender"]

_BLOCKS_AHEAD = 2  # blocks read and looked up ahead of the one being sent


class Sender:
    """Sends the texts a job still needs and records what comes back (see the module doc).
    ``blocks`` reads the input; ``index`` knows the texts stored before ``embed``."""

    def __init__(
        self,
        client: AsyncClient,
        opts: JobOptions,
        writer: StoreWriter,
        stop: asyncio.Event,
        progress: JobProgress,
        on_progress: Callable[[JobProgress], None],
        *,
        blocks: Callable[[], Iterable[RecordBlock]],
    ) -> None:
        self.client = client
        self.opts = opts
        self.w = writer
        self.stop = stop
        self.progress = progress
        self.on_progress = on_progress
        self.blocks = blocks
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
        self.admission = Admission(client.concurrency * client.batch_size, writer.drain)
        writer.on_committed = self.admission.confirm

    def _recorded(self, hashes: list[bytes], positions: list[int]) -> None:
        """Rows queued for the store (not yet committed: a copy of them must drain first)."""
        self.index.add(hashes, positions)
        self.recorded_since.update(zip(hashes, positions, strict=True))

    async def embed(self, done: np.ndarray, failed: set[int]) -> None:
        """Send every text not ``done`` nor ``failed`` (bools and positions), record the
        answers; returns when all are recorded or queued, or the budget or a stop ends it."""
        texts = self._texts_to_send(done, failed)
        stream = self.client.embed_stream(
            TextBlocks(texts, admit=self.admission.room_for),
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

        A reader task reads, hashes and looks up blocks ahead of this one (``read_ahead``):
        the stream never waits for a block to be read or for its cache lookup (queued behind
        a commit and its fsyncs) when a request slot frees up."""
        blocks: BlockQueue = asyncio.Queue(_BLOCKS_AHEAD)
        reader = asyncio.ensure_future(
            read_ahead(
                self.blocks,
                done,
                failed,
                blocks,
                cache=self.w.cache,
                cache_key=self._cache_key,
                submit=self.w.submit,
            )
        )
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
            drop_unread(blocks)  # lookups no one will read

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

    def _all_new(self, item: Block, known: list[int]) -> bool:
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
            self.admission.confirm(len(bad))
        self.on_progress(self.progress)
