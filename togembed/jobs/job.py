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

The store lives in one writer thread (``storewriter``), the output file in another: the event
loop never waits on the disk, except when the writes fall behind (then it stops pulling new
texts: backpressure). The input is read and hashed (and looked up in the cache) a couple of blocks
ahead of the texts being sent (``readahead``), so a request slot that frees up finds its texts
ready. This module runs a job from start to end; the sending is ``sender``'s.

May import: the standard library; ``togembed.api``; the other modules of ``togembed.jobs``
(not ``nearest``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator
from typing import Any

from ..api.async_client import AsyncClient
from .cache import VectorCache
from .failures import failures_path, write_failures
from .jobfile import job_path
from .output import OutputFollower
from .readers import RecordBlock, read_blocks, scan_records
from .sender import Sender
from .store import JobStore
from .storewriter import StoreWriter
from .textindex import TextIndex, text_hash
from .types import JobOptions, JobProgress, JobResult, JobStatus
from .writers import OutputFile

__all__ = ["JobOptions", "JobProgress", "JobResult", "failures_path", "run_job"]

_READ_BLOCK = 1024  # records read, hashed and looked up together

# Settings a job follows by reconciling its stored work (vectors depend on the model and the
# text alone); any other change (the model) is refused once something was paid for.
_RECONCILED = ("input", "input_size", "input_mtime_ns", "id_field", "text_field")


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


def _input_blocks(opts: JobOptions) -> Iterator[RecordBlock]:
    """The job's input, a block of records at a time."""
    return read_blocks(
        opts.input, id_field=opts.id_field, text_field=opts.text_field, size=_READ_BLOCK
    )


async def run_job(
    client: AsyncClient,
    opts: JobOptions,
    *,
    stop: asyncio.Event | None = None,
    on_progress: Callable[[JobProgress], None] | None = None,
) -> JobResult:
    """Run (or resume) the job; ``stop`` set = send nothing new, finish what is in flight."""
    writer = StoreWriter()
    sender = Sender(
        client,
        opts,
        writer,
        stop or asyncio.Event(),
        JobProgress(),
        on_progress or (lambda p: None),
        blocks=functools.partial(_input_blocks, opts),
    )
    discard = False
    try:
        return await _Job(opts, writer, sender).run()
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
    """One run of a job: open (or resume) its store, reconcile a changed input, check every id,
    send what is left (``Sender``), then write the output and the failures."""

    def __init__(self, opts: JobOptions, writer: StoreWriter, sender: Sender) -> None:
        self.opts = opts
        self.w = writer
        self.sender = sender
        self.progress = sender.progress
        self.on_progress = sender.on_progress

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
            self.sender.index = await w.call(_load_index, store)
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
            await self.sender.embed(done, failed)
        await w.drain()
        return await self._finish()

    def _id_pairs(self) -> Iterator[tuple[int, str]]:
        for block in _input_blocks(self.opts):
            yield from enumerate(block.ids, start=block.start)

    def _hashed_blocks(self) -> Iterator[tuple[int, list[str], list[bytes]]]:
        """The input's (first position, ids, text hashes), a block at a time: what
        ``reconcile`` needs (run in the writer thread, off the event loop)."""
        for block in _input_blocks(self.opts):
            yield block.start, block.ids, [text_hash(t) for t in block.texts]

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
            status: JobStatus = self.sender.stopped_by or "interrupted"
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
