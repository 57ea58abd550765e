"""The durable state of a corpus job (``JobStore``): what it recorded, safe against a kill at any
instant, and what a resumed run reads back. SQLite (stdlib) and one plain file.

A job is two files next to the output: the job file ``<OUTPUT>.togembed-job.sqlite``, the small
bookkeeping (its tables: ``jobfile``), and the vectors file ``<OUTPUT>.togembed-job.vectors``
(``vectorfile``). ``JobStore`` is what the job uses. It is built on ``StoredVectors``
(``vectors``: the vectors recorded and read back); the other rooms behind it are ``jobfile``
(tables, format, lock, settings check), ``ids`` (the ids pre-pass), ``failures`` and
``reconcile`` (a changed input).

Durability. Every ``record_*`` call is one SQLite transaction: after a kill at any instant
(SIGKILL, OOM, Ctrl-C) a batch is either fully stored or absent, never half; how the vectors file
and the rows that point into it stay consistent is ``vectors``'s module doc. With
``synchronous=FULL`` (the default) the vectors file is fsynced before the commit, and the commit
(WAL) is fsynced: a power loss also keeps every batch that was recorded, and only the batches in
flight are paid for again. ``synchronous="NORMAL"`` skips both fsyncs (the WAL is then synced
only at checkpoints): still kill-safe, but a power loss can roll back the last few MB of
commits, paid for again on resume. A commit may then also outlive the vector bytes it refers
to: ``open`` forgets (and the job re-embeds) rows past the end of a vectors file found shorter
than ``vec_rows``, but a file system that keeps a file's new length and loses its new data
(ext4's default ``data=ordered`` and XFS do not) would leave zeros there: use FULL if power
losses matter. FULL costs two fsyncs per call. Measured (this Linux VM's disk; batches of
512 x 768 float32, FULL): ~130k vectors/s on a fresh job, so recording is not the bottleneck.
On a disk with slow fsync, pass more rows per call.

Locking. A job is run by one process: the store holds SQLite's exclusive lock from ``open`` to
``close`` (released by the OS if the process dies), and a second process gets ``JobLockedError``
at once instead of paying for the same inputs twice. The vectors file is only touched under that
lock.

Threads. Not async, not for concurrent use: call a store from one thread at a time. It may be
opened in one thread (e.g. to report a ``JobMismatchError`` early) and then used only from a
dedicated writer thread; the connection is made with ``check_same_thread=False`` for that.

Memory. ``done_bitmap`` is one byte per position; ``iter_rows`` reads the vectors file in
chunks of 2 MB and ``rows_between`` the range asked for (``pread``, not a memory map: every
mapped page read would count in RSS), ``iter_failures`` and ``register_ids`` stream through
cursors in chunks; nothing holds all ids or vectors.

May import: the standard library, attrs; ``togembed.core``; ``failures``, ``ids``, ``jobfile``,
``reconcile``, ``vectorfile``, ``vectors``.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

from ..core.errors import TogembedError
from . import failures, jobfile
from . import ids as _ids
from .jobfile import JobLockedError, vectors_path
from .reconcile import Reconciled, reconcile_stored
from .vectorfile import VectorFile
from .vectors import StoredVectors

__all__ = ["JobCounts", "JobStore"]


@attrs.frozen
class JobCounts:
    """Progress of a job: vectors stored, inputs failed for good, ids registered."""

    done: int
    failed: int
    ids: int


def _close_files(
    conn: sqlite3.Connection, vectors: VectorFile | None, *, quietly: bool = True
) -> None:
    """Close the vectors file (while the lock is still held), then the connection."""
    try:
        if vectors is not None:
            vectors.close()
    except OSError:
        if not quietly:
            raise
    finally:
        conn.close()


class JobStore(StoredVectors):
    """The durable state of one corpus job. Open with ``JobStore.open``; see the module doc.
    Its vectors (recorded, read back) are ``StoredVectors``'s; the rest is here."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        meta: dict[str, Any],
        *,
        vectors: VectorFile,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> None:
        super().__init__(conn, path, vectors, sync=synchronous == "FULL")
        self.meta = meta
        # Fields of ``meta`` that differ from the stored job's, (old, new): ``reconcile``.
        self.changed: dict[str, tuple[Any, Any]] = {}

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        meta: dict[str, Any],
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        changeable: Collection[str] = (),
        restart_if_unpaid: bool = False,
    ) -> JobStore:
        """Create the job (its SQLite file and its vectors file), or reopen it to resume.

        ``meta`` holds exactly what makes the vectors (model, request options, input path,
        size and mtime, id/text fields), JSON-serializable. On reopen every field must match,
        else ``JobMismatchError`` says which one differs; so does a job file of another format.
        Except: with ``restart_if_unpaid``, a job that stored nothing yet (no vector, no
        failure) starts afresh with the new meta; and fields in ``changeable`` may differ: the
        store opens with them in ``changed`` (field -> (old, new)), and the caller must
        ``reconcile`` before using it.
        """
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', not {synchronous!r}")
        path = Path(path)
        given = jobfile.json_value(meta)
        conn = jobfile.connect(path)
        vectors = None
        try:
            changed = jobfile.claim(
                conn,
                path,
                given,
                synchronous=synchronous,
                changeable=changeable,
                restart_if_unpaid=restart_if_unpaid,
            )
            # Under the lock from here on: no other process touches the vectors file.
            vectors = VectorFile.open(vectors_path(path), job=path, sync_dir=synchronous == "FULL")
            store = cls(conn, path, given, vectors=vectors, synchronous=synchronous)
            store.changed = changed
            store._cut_to_committed()
        except sqlite3.OperationalError as exc:
            _close_files(conn, vectors)
            if "locked" in str(exc):
                raise JobLockedError(
                    f"{path} is in use by another togembed process; wait for it to finish "
                    "or stop it"
                ) from None
            raise TogembedError(f"cannot open the job file {path}: {exc}") from exc
        except BaseException:
            _close_files(conn, vectors)
            raise
        return store

    @staticmethod
    def delete(path: str | os.PathLike[str]) -> None:
        """Remove a job file, its journal and its vectors file (for ``--restart``); the job
        must not be open."""
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{os.fspath(path)}{suffix}").unlink(missing_ok=True)
        # Last: a vectors file left alone by a kill here is emptied when a new job opens it.
        vectors_path(path).unlink(missing_ok=True)

    def close(self) -> None:
        """Close (checkpoints the WAL into the main file and releases the lock)."""
        _close_files(self._conn, self._file, quietly=False)

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ids_total(self) -> int | None:
        """How many ids the input has, once a ``register_ids`` pass went to the end."""
        return jobfile.meta_int(self._conn, "ids_total")

    # -- the input's ids and changes ----------------------------------------------------------

    def register_ids(self, pairs: Iterable[tuple[int, str]]) -> int:
        """Store every (pos, id) of the input, in position order from 0, and return the count.

        Raises ``DuplicateIdError`` at the first id seen at two positions. Run it over the
        whole input before embedding (it costs a read of the file and ~1 s per million ids):
        then a duplicate stops the job before anything is paid for. Resumable: positions
        already registered are skipped. Ids that cannot repeat (line or row numbers) need no
        pass: ``register_count``.
        """
        return _ids.register_ids(self._conn, pairs)

    def register_count(self, total: int) -> None:
        """How many records the input has, for ids that cannot repeat (line or row numbers):
        nothing to store or check per id."""
        _ids.register_count(self._conn, total)

    def reconcile(
        self,
        blocks: Iterable[tuple[int, Sequence[str], Sequence[bytes]]],
        *,
        keep_ids: bool,
    ) -> Reconciled:
        """Map the job onto a changed input, in one transaction (see ``reconcile``).

        ``blocks`` are the new input's records in order, (first position, ids, text hashes),
        positions from 0. ``keep_ids``: store the ids for the duplicate check (an id field;
        line numbers need none). Raises ``DuplicateIdError`` (nothing changed) for an id at
        two positions; any error or kill during the pass leaves the job as it was. Afterwards
        the job's meta is ``self.meta`` and ``changed`` is empty.

        Cost: a ``TextIndex`` of the stored texts in memory (24 bytes each), and about 15 s
        per million records on this project's 2-core VM (reading the input aside)."""
        stored = self._column_pairs("hash", "row")
        result = reconcile_stored(
            self._conn, blocks, stored=stored, meta=self.meta, keep_ids=keep_ids
        )
        self.changed = {}
        return result

    # -- failures ------------------------------------------------------------------------------

    def record_failures(
        self, items: Iterable[tuple[int, str, str] | tuple[int, str, str, bytes | None]]
    ) -> None:
        """Store (pos, id, reason[, text hash]) of inputs that can never succeed, in one
        transaction; a position failed before gets the new reason. With its text hash, a
        failure survives a ``reconcile`` that finds the same id with the same text."""
        failures.record_failures(self._conn, items)

    def clear_failures(self, positions: Iterable[int] | None = None) -> int:
        """Forget failures (all of them if ``positions`` is None), for ``--retry-failed``;
        returns how many were removed."""
        return failures.clear_failures(self._conn, positions)

    def failed_positions(self) -> set[int]:
        """Positions recorded as failed: skipped by a normal run, the work of --retry-failed."""
        return failures.failed_positions(self._conn)

    def counts(self) -> JobCounts:
        """Counts for progress and the final summary (each a scan of a small index)."""
        conn = self._conn

        def count(table: str) -> int:
            return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

        return JobCounts(done=count("vectors"), failed=count("failures"), ids=count("ids"))

    def iter_failures(self) -> Iterator[tuple[int, str, str]]:
        """(pos, id, reason) of every failed input, in position order, streamed."""
        return failures.iter_failures(self._conn)
