"""A job's stored vectors: the job file's ``vectors`` table and the vectors file its rows point
into, kept consistent through kills and power losses: ``StoredVectors``, what ``JobStore`` is
built on.

Durability. A batch is recorded in one SQLite transaction: after a kill at any instant
(SIGKILL, OOM, Ctrl-C) it is either fully stored or absent, never half. Its bytes are first
written at the committed end of the vectors file (one ``pwrite``), then its rows and the new
``vec_rows`` (the file's committed length, in the job file's meta) are committed together;
nothing refers to bytes past ``vec_rows``, and ``_cut_to_committed`` (when a job opens)
truncates the file to it: the garbage a kill between the two steps leaves behind. With ``sync``
(the job file's ``synchronous=FULL``) the vectors file is fsynced before the commit, and the
commit (WAL) is fsynced: a power loss also keeps every batch that was recorded. Without it, a
commit may outlive the vector bytes it refers to: ``_cut_to_committed`` forgets (and the job
re-embeds) rows past the end of a vectors file found shorter than ``vec_rows`` (see ``store``).

Copies of a stored text (duplicates) get a row of their own in the table that points at their
source's row of the file: no bytes are copied.

May import: the standard library, numpy, orjson; ``durable``, ``failures``, ``ids``, ``jobfile``,
``textindex``, ``vectorfile``.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .durable import transaction
from .failures import forget_failures
from .ids import explain_conflict
from .jobfile import meta_int
from .textindex import HASH_SIZE
from .vectorfile import VectorFile, float32_parts

__all__ = ["StoredVectors"]

log = logging.getLogger("togembed")

_READ_BYTES = 2 << 20  # vector bytes iter_rows reads at a time
_HASH_CHUNK = 65_536  # rows per chunk of iter_hashes
# A batch's rows in one statement: (pos, id) pairs as a JSON array, the hashes concatenated.
# (executemany releases and retakes the GIL at every row; with the event loop's thread busy,
# each retake waits, and the loop waits for each release: measured, it cost the loop about
# twice the time of this.)
_INSERT_BATCH = (
    "INSERT INTO vectors (pos, id, hash, row) "
    "SELECT value ->> 0, value ->> 1, substr(?2, ?3 * key + 1, ?3), ?4 + key FROM json_each(?1)"
)


class StoredVectors:
    """The vectors of one open job, ``path`` its job file: recorded by batch or by copy, read
    back by position. Used under the job file's lock, from one thread at a time."""

    def __init__(
        self, conn: sqlite3.Connection, path: Path, file: VectorFile, *, sync: bool
    ) -> None:
        self._conn = conn
        self._file = file
        self._sync = sync
        self.path = path
        self.vectors_path = file.path
        self._dim: int | None = meta_int(conn, "dim")

    @property
    def dim(self) -> int | None:
        """Vector dimension, known once a batch was recorded."""
        return self._dim

    def _vec_rows(self) -> int:
        """Rows of the vectors file that committed rows may refer to."""
        return meta_int(self._conn, "vec_rows") or 0

    def _cut_to_committed(self) -> None:
        """Make the vectors file end where the committed rows do. Longer: bytes a kill left
        between a write and its commit, cut off. Shorter (a power loss under NORMAL, or a
        damaged file): the rows whose bytes are gone are forgotten, to be embedded again."""
        conn, file = self._conn, self._file
        row_bytes = 4 * (self._dim or 0)
        committed = self._vec_rows()
        size = file.size()
        if size > committed * row_bytes:
            file.truncate(committed * row_bytes)
        elif size < committed * row_bytes:
            kept = size // row_bytes
            with transaction(conn):
                before = conn.total_changes
                conn.execute("DELETE FROM vectors WHERE row >= ?", (kept,))
                lost = conn.total_changes - before
                conn.execute("UPDATE meta SET value = ? WHERE key = 'vec_rows'", (str(kept),))
            file.truncate(kept * row_bytes)
            log.warning(
                "%s holds %d of the %d vectors %s recorded (a power loss, or a damaged "
                "file): %d inputs will be embedded again",
                self.vectors_path,
                kept,
                committed,
                self.path,
                lost,
            )

    # -- recording ------------------------------------------------------------------------------

    def record_batch(
        self,
        positions: Sequence[int],
        ids: Sequence[str],
        vectors: np.ndarray | Sequence[np.ndarray],
        *,
        hashes: Sequence[bytes],
    ) -> None:
        """Store one batch of vectors: all of it, or (on any error or kill) none of it.
        ``hashes[i] = text_hash(text_i)`` feeds dedup. A failure recorded earlier at one of
        these positions is removed.

        ``vectors`` is an (n, dim) array, or a list of 2-D arrays whose rows, in order, are the
        n rows (several answered batches recorded together, written without joining them).
        They go to the vectors file at its committed end (one write; fsynced under FULL), then
        their rows and the file's new committed end to SQLite in one transaction.
        """
        parts = float32_parts(vectors)
        n = len(positions)
        widths = {p.shape[1] if p.ndim == 2 else -1 for p in parts}
        rows = sum(len(p) for p in parts)
        if len(widths) != 1 or -1 in widths or rows != n or len(ids) != n or len(hashes) != n:
            shape = parts[0].shape if len(parts) == 1 else [p.shape for p in parts]
            raise ValueError(
                f"record_batch: {n} positions, {len(ids)} ids, {len(hashes)} hashes and "
                f"vectors of shape {shape} do not match"
            )
        dim = parts[0].shape[1]
        if self._dim is not None and dim != self._dim:
            raise ValueError(f"record_batch: vectors of dimension {dim}, the job has {self._dim}")
        conn = self._conn
        with transaction(conn):
            # The committed end, read inside the transaction: nothing kept in memory can go
            # stale (e.g. after a commit interrupted by Ctrl-C on its way back).
            start = self._vec_rows()
            if self._dim is None:
                conn.execute("INSERT INTO meta (key, value) VALUES ('dim', ?)", (str(dim),))
            try:
                self._insert_rows(positions, ids, hashes, start)
            except sqlite3.IntegrityError:
                explain_conflict(conn, "vectors", list(zip(map(int, positions), ids, strict=True)))
                raise
            conn.execute("UPDATE meta SET value = ? WHERE key = 'vec_rows'", (str(start + n),))
            forget_failures(conn, positions)
            # Past the committed end: until the commit, nothing refers to these bytes, and a
            # kill before it leaves them to be cut off by the next open. With sync, the bytes
            # are on disk before the rows that point at them.
            self._file.write(parts, start, sync=self._sync)
        self._dim = dim

    def _insert_rows(
        self, positions: Sequence[int], ids: Sequence[str], hashes: Sequence[bytes], start: int
    ) -> None:
        """Insert a batch's rows (row ``start + k`` for the k-th), in one statement when the
        hashes are text hashes and the ids JSON can carry, else one statement per row."""
        packed = None
        if all(len(h) == HASH_SIZE for h in hashes):
            # orjson.JSONEncodeError (a TypeError): e.g. an id with a lone surrogate.
            with contextlib.suppress(TypeError):
                packed = orjson.dumps(list(zip(map(int, positions), ids, strict=True)))
        if packed is not None:
            self._conn.execute(_INSERT_BATCH, (packed, b"".join(hashes), HASH_SIZE, start))
        else:
            self._conn.executemany(
                "INSERT INTO vectors (pos, id, hash, row) VALUES (?, ?, ?, ?)",
                [
                    (int(p), rid, bytes(h), start + k)
                    for k, (p, rid, h) in enumerate(zip(positions, ids, hashes, strict=True))
                ],
            )

    def record_duplicates(self, items: Sequence[tuple[int, str, int]]) -> None:
        """Store (pos, id, source_pos) rows whose text equals that of an already stored
        position, in one transaction: they point at the source's vector (no bytes copied)."""
        conn = self._conn
        with transaction(conn):
            before = conn.total_changes
            try:
                conn.executemany(
                    "INSERT INTO vectors (pos, id, hash, row) "
                    "SELECT ?, ?, hash, row FROM vectors WHERE pos = ?",
                    [(int(p), rid, int(src)) for p, rid, src in items],
                )
            except sqlite3.IntegrityError:
                explain_conflict(conn, "vectors", [(p, rid) for p, rid, _ in items])
                raise
            if conn.total_changes - before != len(items):
                missing = [src for _, _, src in items if not self._has(src)]
                raise ValueError(f"record_duplicates: source positions not stored: {missing}")
            forget_failures(conn, [p for p, _, _ in items])

    def _has(self, pos: int) -> bool:
        row = self._conn.execute("SELECT 1 FROM vectors WHERE pos = ?", (pos,)).fetchone()
        return row is not None

    # -- reading --------------------------------------------------------------------------------

    def iter_hashes(self) -> Iterator[tuple[list[bytes], list[int]]]:
        """(text hashes, positions) of the stored rows, in chunks: what dedup needs to know
        about the work of earlier runs."""
        return self._column_pairs("hash", "pos")

    def _column_pairs(self, a: str, b: str) -> Iterator[tuple[list[Any], list[Any]]]:
        """Two columns of the stored rows, in chunks."""
        cursor = self._conn.execute(f"SELECT {a}, {b} FROM vectors")
        try:
            while rows := cursor.fetchmany(_HASH_CHUNK):
                yield [r[0] for r in rows], [r[1] for r in rows]
        finally:
            cursor.close()

    def done_bitmap(self, size: int = 0) -> np.ndarray:
        """A bool array, True where a vector is stored; its length is ``size`` or one past the
        last stored position, whichever is larger."""
        conn = self._conn
        last = conn.execute("SELECT max(pos) FROM vectors").fetchone()[0]
        bitmap = np.zeros(max(size, 0 if last is None else last + 1), dtype=bool)
        cursor = conn.execute("SELECT pos FROM vectors")
        try:
            while rows := cursor.fetchmany(65536):
                bitmap[np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))] = True
        finally:
            cursor.close()
        return bitmap

    def iter_rows(self) -> Iterator[tuple[str, np.ndarray]]:
        """(id, float32 vector) of every stored position, in position order, streamed: the
        vectors file is read 2 MB at a time. The vectors are read-only views."""
        if self._dim is None:
            return
        dim = self._dim
        chunk = max(1, _READ_BYTES // (4 * dim))
        cursor = self._conn.execute("SELECT id, row FROM vectors ORDER BY pos")
        try:
            while rows := cursor.fetchmany(chunk):
                where = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
                vectors = self._file.read_rows(where, dim)
                for k, row in enumerate(rows):
                    yield row[0], vectors[k]
        finally:
            cursor.close()

    def rows_between(self, start: int, stop: int) -> tuple[list[str], np.ndarray]:
        """Ids and vectors ((n, dim), read-only) of the stored positions in [start, stop), in
        position order: one query and one read per run of consecutive rows of the file."""
        if self._dim is None:
            return [], np.empty((0, 0), dtype="<f4")
        rows = self._conn.execute(
            "SELECT id, row FROM vectors WHERE pos >= ? AND pos < ? ORDER BY pos", (start, stop)
        ).fetchall()
        if not rows:
            return [], np.empty((0, self._dim), dtype="<f4")
        where = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
        return [r[0] for r in rows], self._file.read_rows(where, self._dim)
