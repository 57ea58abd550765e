"""The output of a corpus job, written while the job runs instead of after it.

The job's answers arrive in input order, mostly as runs of consecutive positions; copies of
stored texts, failures and a resumed job's earlier rows fill the gaps. ``OutputFollower`` keeps
a cursor: whenever the positions from it on are finished, their rows go, in order, to a thread
that encodes and writes them (``OutputFile``). Answers go from memory; the other rows are read
back from the store. Nothing is published before the job is complete; a complete job always
publishes its file, an empty one (the right columns, no rows) when no input has a vector.

May import: the standard library, numpy; ``store``, ``writers``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .store import JobStore
from .writers import OutputFile

__all__ = ["OutputFollower"]

_OUTPUT_STEP = 2048  # rows handed to the output thread at a time
_OUTPUT_QUEUE = 2  # steps waiting for the output thread before the store's thread waits
# Answers kept in memory for the output thread; beyond this (the output is behind), they are
# read back from the store once committed.
_OUTPUT_MEMORY = 16 << 20


class OutputFollower:
    """Writes the output file while the job runs, instead of after it.

    Lives in the store's thread: the rows of the run of finished positions (embedded, copied
    or failed) from ``cursor`` on are handed, in position order, to a second thread that
    encodes and writes them. Answers come as runs of consecutive positions, offered before
    the store commits them (the file is renamed into place only after every commit), and go
    from memory; other rows (copies, a resumed job's earlier rows) are read back from the
    store once committed, a step at a time between the store's other work. ``commit`` when
    every position is finished; ``abort`` otherwise.
    """

    def __init__(
        self,
        store: JobStore,
        output: Path,
        finished: np.ndarray,
        schedule: Callable[[Callable[[], None]], object],
        *,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.store = store
        self.output = output
        self.metadata = metadata  # for the output file (OutputFile.create)
        self.finished = finished  # one bool per position
        self.cursor = 0  # positions before it are handed over
        self._schedule = schedule  # runs a function later in the store's thread
        self._scheduled = False
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="togembed-out")
        self._pending: collections.deque[concurrent.futures.Future[None]] = collections.deque()
        self._file: OutputFile | None = None  # created with the first row (its dim known then)
        # Rows in memory, first position -> (ids, vectors) of consecutive positions.
        self._fresh: dict[int, tuple[list[str], np.ndarray]] = {}
        self._fresh_bytes = 0
        self._error: BaseException | None = None
        self._closed = False  # no more steps
        self._ended = False  # committed or aborted

    def offer(self, positions: list[int], ids: list[str], vectors: np.ndarray) -> None:
        """Rows about to be stored: kept to be written from memory if their positions are
        consecutive (else they are read back once stored)."""
        n = len(positions)
        if self._fresh_bytes + vectors.nbytes > _OUTPUT_MEMORY:  # the output is behind
            return
        consecutive = n > 0 and positions[-1] - positions[0] == n - 1 and n == len(vectors)
        if consecutive and (n == 1 or bool((np.diff(positions) == 1).all())):
            self._fresh[positions[0]] = (ids, vectors)
            self._fresh_bytes += vectors.nbytes
            self.finished[positions[0] : positions[0] + n] = True

    def mark(self, positions: list[int]) -> None:
        """These positions are finished (stored or failed for good)."""
        self.finished[positions] = True
        self.advance()

    def advance(self) -> None:
        """Hand over one step of finished rows, and schedule the next step if it is ready."""
        if self._error is not None:
            raise self._error
        if self._closed:
            return
        self._step()
        if not self._scheduled and self.cursor < len(self.finished) and self.finished[self.cursor]:
            self._scheduled = True
            self._schedule(self._scheduled_step)

    def _scheduled_step(self) -> None:
        self._scheduled = False
        try:
            self.advance()
        except BaseException as exc:  # raised by the next mark() or commit()
            self._error = self._error or exc

    def _output_busy(self) -> bool:
        """True when ``_OUTPUT_QUEUE`` steps wait for the output thread: then the next step is
        scheduled for when the oldest is written (the store's thread does not wait for it:
        commits, which the job waits for before it sends more, go on)."""
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()
        if len(self._pending) < _OUTPUT_QUEUE:
            return False
        if not self._scheduled:
            self._scheduled = True
            self._pending[0].add_done_callback(self._reschedule)
        return True

    def _reschedule(self, _: object) -> None:  # in the output thread
        with contextlib.suppress(RuntimeError):  # the job is over: its thread pool is shut
            self._schedule(self._scheduled_step)

    def _step(self, *, wait: bool = False) -> int:
        """Hand over the finished rows of up to ``_OUTPUT_STEP`` positions; how many passed
        (none while the output thread is busy, unless ``wait``)."""
        if not wait and self._output_busy():
            return 0
        start = self.cursor
        window = self.finished[start : start + _OUTPUT_STEP]
        gaps = np.flatnonzero(~window)
        stop = start + (int(gaps[0]) if len(gaps) else len(window))
        if stop == start:
            return 0
        fresh = self._fresh.pop(start, None)
        if fresh is not None:
            ids, vectors = fresh
            if len(ids) > stop - start:  # the rest is for the next step
                self._fresh[stop] = (ids[stop - start :], vectors[stop - start :])
                ids, vectors = ids[: stop - start], vectors[: stop - start]
            self._fresh_bytes -= vectors.nbytes
            stop = start + len(ids)
        else:  # stored rows, up to the next rows in memory
            stop = min([stop, *(p for p in self._fresh if p > start)])
            ids, vectors = self.store.rows_between(start, stop)
        self.cursor = stop
        if ids:
            while len(self._pending) >= _OUTPUT_QUEUE:
                self._pending.popleft().result()
            self._pending.append(self._pool.submit(self._write, ids, vectors))
        return stop - start

    def _write(self, ids: list[str], vectors: np.ndarray) -> None:  # in the output thread
        if self._file is None:
            self._file = OutputFile.create(
                self.output,
                dim=vectors.shape[1],
                max_rows=len(self.finished),
                metadata=self.metadata,
            )
        self._file.write(ids, vectors)

    def commit(self, count: int) -> Path:
        """Every position is finished: write what is left, check that the file holds the
        ``count`` stored rows, and move it into place. Without rows, an empty file (of the
        job's dimension if known, else 0) so that a complete job always has its output."""
        if self._error is not None:
            raise self._error
        while self.cursor < len(self.finished):
            if not self._step(wait=True):
                raise RuntimeError(f"position {self.cursor} is not finished; output not written")
        self._closed = True
        while self._pending:
            self._pending.popleft().result()
        if self._file is None and count:
            raise RuntimeError(f"{count} rows stored, none written; output not written")
        if self._file is None:
            dim = self.store.dim or 0
            self._file = self._pool.submit(
                OutputFile.create, self.output, dim=dim, max_rows=0, metadata=self.metadata
            ).result()
        self._pool.submit(self._file.commit, count).result()
        self._ended = True
        self._pool.shutdown()
        return self.output

    def abort(self) -> None:
        """Drop the temp output (the job is not complete, or failed); nothing after commit."""
        if self._ended:
            return
        self._ended = self._closed = True
        self._fresh.clear()
        self._fresh_bytes = 0
        for f in self._pending:
            with contextlib.suppress(BaseException):
                f.result()
        self._pending.clear()
        file = self._file
        if file is not None:
            self._pool.submit(file.abort).result()
        self._pool.shutdown()
