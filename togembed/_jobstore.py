"""Durable state of a corpus job, and a persistent vector cache shared by jobs. SQLite (stdlib).

The job store is one file next to the output, ``<OUTPUT>.togembed-job.sqlite``:

- ``meta``      what the job was started with (model, options, input identity): a resume with
                other settings would mix vectors, so ``JobStore.open`` refuses it.
- ``ids``       every input id at its position, filled by a cheap pre-pass over the input
                (``register_ids``) so an id used twice stops the job before anything is paid for.
- ``vectors``   pos (primary key), id (unique), text hash (indexed, for dedup), float32 bytes.
- ``failures``  pos, id, reason: inputs that can never succeed; a later success removes them.

Durability. Every ``record_*`` call is one transaction: after a kill at any instant (SIGKILL,
OOM, Ctrl-C) a batch is either fully stored or absent, never half. The journal is WAL with
``synchronous=FULL`` by default: each commit is fsynced, so a power loss also keeps every batch
that was recorded, and only the batches in flight are paid for again. ``synchronous="NORMAL"``
skips that fsync (WAL is then synced only at checkpoints): still corruption-free and still
kill-safe, but a power loss can roll back the last few MB of commits, paid for again on resume.
FULL costs one fsync per call. Measured (this Linux VM's disk; batches of 128 x 768 float32): ~30k
vectors/s on a fresh job and ~14k/s averaged over 1M vectors as the indexes grow (NORMAL: ~16k/s),
so recording is not the bottleneck. On a disk with slow fsync, pass more rows per call.

Locking. A job is run by one process: the store holds SQLite's exclusive lock from ``open`` to
``close`` (released by the OS if the process dies), and a second process gets ``JobLockedError``
at once instead of paying for the same inputs twice.

Threads. Not async, not for concurrent use: call a store from one thread at a time. It may be
opened in one thread (e.g. to report a ``JobMismatchError`` early) and then used only from a
dedicated writer thread; the connection is made with ``check_same_thread=False`` for that.

Memory. ``done_bitmap`` is one byte per position; ``iter_rows``, ``iter_failures`` and
``register_ids`` stream through cursors in chunks; nothing holds all ids or vectors.

The cache (``VectorCache``) is a separate file the user names; its key is a hash of (model,
options, text), so any job or corpus reuses what was paid for. Many processes may share it
(WAL, busy timeout); it uses ``synchronous=NORMAL``, since losing its last entries to a power
loss only costs re-embedding them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np

from ._exceptions import TogembedError

__all__ = [
    "DuplicateIdError",
    "JobCounts",
    "JobLockedError",
    "JobMismatchError",
    "JobStore",
    "VectorCache",
    "cache_key",
    "job_path",
    "text_hash",
]

SCHEMA_VERSION = 1
_JOB_SUFFIX = ".togembed-job.sqlite"
_IN_CHUNK = 500  # host parameters per IN (...) query, far below SQLite's limit
_READ_CHUNK = 1024
_REGISTER_CHUNK = 50_000
# Big pages hold several 3 KB vectors each (a 4 KB page holds one and wastes a quarter).
_PAGE_SIZE = 16384
_MISSING = object()

_JOB_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE ids (pos INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE);
CREATE TABLE vectors (
    pos INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    hash BLOB NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX vectors_hash ON vectors (hash);
CREATE TABLE failures (pos INTEGER PRIMARY KEY, id TEXT NOT NULL, reason TEXT NOT NULL);
"""

_CACHE_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, vector BLOB NOT NULL);
"""


class JobMismatchError(TogembedError, ValueError):
    """The job file was started with settings that would give other vectors than this run."""

    def __init__(self, message: str, *, path: str, field: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.field = field


class JobLockedError(TogembedError):
    """Another process is running this job (it holds the job file's lock)."""


class DuplicateIdError(TogembedError, ValueError):
    """One id at two input positions: the output could not say which vector is which."""

    def __init__(self, id: str, first: int, second: int) -> None:
        super().__init__(
            f"id {id!r} appears twice in the input, at records {first + 1} and {second + 1} "
            "(counting from 1); ids must be unique"
        )
        self.id = id
        self.positions = (first, second)


@attrs.frozen
class JobCounts:
    """Progress of a job: vectors stored, inputs failed for good, ids registered."""

    done: int
    failed: int
    ids: int


def job_path(output: str | os.PathLike[str]) -> Path:
    """The job file of an output: ``out.parquet`` -> ``out.parquet.togembed-job.sqlite``."""
    return Path(f"{os.fspath(output)}{_JOB_SUFFIX}")


def text_hash(text: str) -> bytes:
    """The dedup key of a text within a job: 16 bytes of BLAKE2b over its UTF-8."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def cache_key(model: str, options: str, text: str) -> bytes:
    """The cache key of a text: 16 bytes of BLAKE2b over model, options and text. ``options``
    is a canonical string of every request option that changes the vector."""
    h = hashlib.blake2b(digest_size=16, person=b"togembed-cache1")
    for part in (model, options):
        raw = part.encode("utf-8", "surrogatepass")
        h.update(len(raw).to_bytes(8, "little"))  # length-prefixed: no ambiguous joins
        h.update(raw)
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.digest()


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception (Ctrl-C included)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _create(conn: sqlite3.Connection, schema: str) -> None:
    """Run DDL statements inside the caller's transaction (``executescript`` would commit)."""
    for statement in schema.split(";"):
        if statement.strip():
            conn.execute(statement)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _json_value(value: Any) -> Any:
    """What a value looks like after a JSON round trip (tuples become lists, ...)."""
    return json.loads(json.dumps(value))


class JobStore:
    """The durable state of one corpus job. Open with ``JobStore.open``; see the module doc."""

    def __init__(self, conn: sqlite3.Connection, path: Path, meta: dict[str, Any]) -> None:
        self._conn = conn
        self.path = path
        self.meta = meta
        row = conn.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()
        self._dim: int | None = int(row[0]) if row else None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        meta: dict[str, Any],
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> JobStore:
        """Create the job file, or reopen it to resume.

        ``meta`` holds exactly what makes the vectors (model, request options, input path,
        size and mtime, id/text fields), JSON-serializable. On reopen every field must match,
        else ``JobMismatchError`` says which one differs.
        """
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', not {synchronous!r}")
        path = Path(path)
        given = _json_value(meta)
        conn = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA page_size = {_PAGE_SIZE}")  # only takes effect on a new file
            # Before the first access: the lock is then held until close, and the WAL index
            # lives in process memory (no -shm file).
            conn.execute("PRAGMA locking_mode = EXCLUSIVE")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            with _transaction(conn):  # takes the exclusive lock now, not at the first batch
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
                if "meta" not in tables:
                    _create(conn, _JOB_SCHEMA)
                    conn.executemany(
                        "INSERT INTO meta (key, value) VALUES (?, ?)",
                        [("schema", str(SCHEMA_VERSION)), ("job", json.dumps(given))],
                    )
                else:
                    _check_meta(conn, path, given)
        except sqlite3.OperationalError as exc:
            conn.close()
            if "locked" in str(exc):
                raise JobLockedError(
                    f"{path} is in use by another togembed process; wait for it to finish "
                    "or stop it"
                ) from None
            raise
        except BaseException:
            conn.close()
            raise
        return cls(conn, path, given)

    @staticmethod
    def delete(path: str | os.PathLike[str]) -> None:
        """Remove a job file and its journal (for ``--restart``); the job must not be open."""
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{os.fspath(path)}{suffix}").unlink(missing_ok=True)

    def close(self) -> None:
        """Close (checkpoints the WAL into the main file and releases the lock)."""
        self._conn.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def dim(self) -> int | None:
        """Vector dimension, known once a batch was recorded."""
        return self._dim

    @property
    def ids_total(self) -> int | None:
        """How many ids the input has, once a ``register_ids`` pass went to the end."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'ids_total'").fetchone()
        return int(row[0]) if row else None

    # -- ids pre-pass -----------------------------------------------------------------------

    def register_ids(self, pairs: Iterable[tuple[int, str]]) -> int:
        """Store every (pos, id) of the input, in position order from 0, and return the count.

        Raises ``DuplicateIdError`` at the first id seen at two positions. Run it over the
        whole input before embedding (it costs a read of the file and ~1 s per million ids):
        then a duplicate stops the job before anything is paid for. Resumable: positions
        already registered are skipped.
        """
        conn = self._conn
        row = conn.execute("SELECT max(pos) FROM ids").fetchone()
        registered = 0 if row[0] is None else row[0] + 1
        expected = 0
        chunk: list[tuple[int, str]] = []
        for pos, rid in pairs:
            if pos != expected:
                raise ValueError(
                    f"register_ids wants positions 0, 1, 2, ...; got {pos} after {expected - 1}"
                )
            expected += 1
            if pos < registered:
                continue
            chunk.append((pos, rid))
            if len(chunk) == _REGISTER_CHUNK:
                self._insert_ids(chunk)
                chunk = []
        if chunk:
            self._insert_ids(chunk)
        with _transaction(conn):
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('ids_total', ?)", (expected,)
            )
        return expected

    def _insert_ids(self, chunk: list[tuple[int, str]]) -> None:
        conn = self._conn
        with _transaction(conn):
            try:
                conn.executemany("INSERT INTO ids (pos, id) VALUES (?, ?)", chunk)
            except sqlite3.IntegrityError:
                self._explain_conflict("ids", chunk)
                raise

    def _explain_conflict(self, table: str, pairs: Sequence[tuple[int, str]]) -> None:
        """Raise what an IntegrityError of a (pos, id) insert means: an id at two positions
        (``DuplicateIdError``) or a position stored twice (a bug of the caller). Rolls the
        transaction back first, so only committed rows are compared."""
        conn = self._conn
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        seen: dict[str, int] = {}
        for pos, rid in pairs:
            row = conn.execute(f"SELECT pos FROM {table} WHERE id = ?", (rid,)).fetchone()
            first = row[0] if row else seen.get(rid)
            if first is not None and first != pos:
                raise DuplicateIdError(rid, min(first, pos), max(first, pos))
            seen[rid] = pos
        batch: set[int] = set()
        for pos, _ in pairs:
            stored = conn.execute(f"SELECT 1 FROM {table} WHERE pos = ?", (pos,)).fetchone()
            if stored or pos in batch:
                raise ValueError(f"position {pos} is recorded twice")
            batch.add(pos)

    # -- recording ------------------------------------------------------------------------------

    def record_batch(
        self,
        positions: Sequence[int],
        ids: Sequence[str],
        vectors: np.ndarray,
        *,
        hashes: Sequence[bytes],
    ) -> None:
        """Store one batch of vectors in one transaction: all of it, or (on any error or
        kill) none of it. ``hashes[i] = text_hash(text_i)`` feeds dedup. A failure recorded
        earlier at one of these positions is removed."""
        vecs = np.ascontiguousarray(vectors, dtype="<f4")
        n = len(positions)
        if vecs.ndim != 2 or vecs.shape[0] != n or len(ids) != n or len(hashes) != n:
            raise ValueError(
                f"record_batch: {n} positions, {len(ids)} ids, {len(hashes)} hashes and "
                f"vectors of shape {vecs.shape} do not match"
            )
        dim = vecs.shape[1]
        if self._dim is not None and dim != self._dim:
            raise ValueError(f"record_batch: vectors of dimension {dim}, the job has {self._dim}")
        rows = [(int(positions[k]), ids[k], bytes(hashes[k]), vecs[k].tobytes()) for k in range(n)]
        conn = self._conn
        with _transaction(conn):
            if self._dim is None:
                conn.execute("INSERT INTO meta (key, value) VALUES ('dim', ?)", (str(dim),))
            try:
                conn.executemany(
                    "INSERT INTO vectors (pos, id, hash, vector) VALUES (?, ?, ?, ?)", rows
                )
            except sqlite3.IntegrityError:
                self._explain_conflict("vectors", [(r[0], r[1]) for r in rows])
                raise
            conn.executemany("DELETE FROM failures WHERE pos = ?", [(r[0],) for r in rows])
        self._dim = dim

    def record_duplicates(self, items: Sequence[tuple[int, str, int]]) -> None:
        """Store (pos, id, source_pos) rows whose text equals that of an already stored
        position: the vector is copied inside SQLite, in one transaction."""
        conn = self._conn
        with _transaction(conn):
            before = conn.total_changes
            try:
                conn.executemany(
                    "INSERT INTO vectors (pos, id, hash, vector) "
                    "SELECT ?, ?, hash, vector FROM vectors WHERE pos = ?",
                    [(int(p), rid, int(src)) for p, rid, src in items],
                )
            except sqlite3.IntegrityError:
                self._explain_conflict("vectors", [(p, rid) for p, rid, _ in items])
                raise
            if conn.total_changes - before != len(items):
                missing = [src for _, _, src in items if not self._has(src)]
                raise ValueError(f"record_duplicates: source positions not stored: {missing}")
            conn.executemany("DELETE FROM failures WHERE pos = ?", [(p,) for p, _, _ in items])

    def _has(self, pos: int) -> bool:
        row = self._conn.execute("SELECT 1 FROM vectors WHERE pos = ?", (pos,)).fetchone()
        return row is not None

    def record_failures(self, items: Iterable[tuple[int, str, str]]) -> None:
        """Store (pos, id, reason) of inputs that can never succeed, in one transaction; a
        position failed before gets the new reason."""
        rows = [(int(p), rid, reason) for p, rid, reason in items]
        with _transaction(self._conn):
            self._conn.executemany(
                "INSERT OR REPLACE INTO failures (pos, id, reason) VALUES (?, ?, ?)", rows
            )

    def clear_failures(self, positions: Iterable[int] | None = None) -> int:
        """Forget failures (all of them if ``positions`` is None), for ``--retry-failed``;
        returns how many were removed."""
        conn = self._conn
        with _transaction(conn):
            before = conn.total_changes
            if positions is None:
                conn.execute("DELETE FROM failures")
            else:
                conn.executemany(
                    "DELETE FROM failures WHERE pos = ?", [(int(p),) for p in positions]
                )
            return conn.total_changes - before

    # -- reading --------------------------------------------------------------------------------

    def lookup_texts(self, hashes: Sequence[bytes]) -> dict[bytes, int]:
        """For dedup: text hash -> a position whose vector is stored, for the hashes found."""
        found: dict[bytes, int] = {}
        unique = list(dict.fromkeys(bytes(h) for h in hashes))
        for chunk in _chunks(unique, _IN_CHUNK):
            marks = ",".join("?" * len(chunk))
            found.update(
                self._conn.execute(
                    f"SELECT hash, min(pos) FROM vectors WHERE hash IN ({marks}) GROUP BY hash",
                    chunk,
                )
            )
        return found

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

    def failed_positions(self) -> set[int]:
        """Positions recorded as failed: skipped by a normal run, the work of --retry-failed."""
        return {r[0] for r in self._conn.execute("SELECT pos FROM failures")}

    def counts(self) -> JobCounts:
        """Counts for progress and the final summary (each a scan of a small index)."""
        conn = self._conn

        def count(table: str) -> int:
            return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

        return JobCounts(done=count("vectors"), failed=count("failures"), ids=count("ids"))

    def iter_rows(self) -> Iterator[tuple[str, np.ndarray]]:
        """(id, float32 vector) of every stored position, in position order, streamed. The
        vectors are read-only views."""
        cursor = self._conn.execute("SELECT id, vector FROM vectors ORDER BY pos")
        try:
            while rows := cursor.fetchmany(_READ_CHUNK):
                for rid, blob in rows:
                    yield rid, np.frombuffer(blob, dtype="<f4")
        finally:
            cursor.close()

    def iter_failures(self) -> Iterator[tuple[int, str, str]]:
        """(pos, id, reason) of every failed input, in position order, streamed."""
        cursor = self._conn.execute("SELECT pos, id, reason FROM failures ORDER BY pos")
        try:
            while rows := cursor.fetchmany(_READ_CHUNK):
                yield from rows
        finally:
            cursor.close()


def _check_meta(conn: sqlite3.Connection, path: Path, given: dict[str, Any]) -> None:
    meta = dict(conn.execute("SELECT key, value FROM meta"))
    if meta.get("schema") != str(SCHEMA_VERSION):
        raise JobMismatchError(
            f"{path} was written by another version of togembed (job format "
            f"{meta.get('schema')}, this one reads {SCHEMA_VERSION}); pass --restart to start "
            "over",
            path=str(path),
        )
    stored = json.loads(meta["job"])
    for field in sorted(stored.keys() | given.keys()):
        old, new = stored.get(field, _MISSING), given.get(field, _MISSING)
        if old != new:
            shown_old = "(not set)" if old is _MISSING else repr(old)
            shown_new = "(not set)" if new is _MISSING else repr(new)
            raise JobMismatchError(
                f"{path} belongs to a job started with {field}={shown_old}, but this run has "
                f"{field}={shown_new}; resuming would mix vectors. Run with the original "
                "settings to resume, or pass --restart to discard the stored work and start "
                "over",
                path=str(path),
                field=field,
            )


class VectorCache:
    """Vectors already paid for, across jobs and corpora, keyed by ``cache_key``. Safe to share
    between processes; one object is one connection, for one thread at a time."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, timeout: float = 30.0) -> VectorCache:
        """Open (creating it and its directory if needed) the cache file; ``timeout`` is how
        long to wait for another process's write."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            with _transaction(conn):
                _create(conn, _CACHE_SCHEMA)
                conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                    (str(SCHEMA_VERSION),),
                )
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> VectorCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        """key -> float32 vector (read-only) for the keys in the cache."""
        found: dict[bytes, np.ndarray] = {}
        unique = list(dict.fromkeys(bytes(k) for k in keys))
        for chunk in _chunks(unique, _IN_CHUNK):
            marks = ",".join("?" * len(chunk))
            for key, blob in self._conn.execute(
                f"SELECT key, vector FROM vectors WHERE key IN ({marks})", chunk
            ):
                found[key] = np.frombuffer(blob, dtype="<f4")
        return found

    def put_many(self, items: Iterable[tuple[bytes, np.ndarray]]) -> None:
        """Add (key, vector) pairs in one transaction; keys already present are kept."""
        rows = [
            (bytes(key), np.ascontiguousarray(vec, dtype="<f4").tobytes()) for key, vec in items
        ]
        with _transaction(self._conn):
            self._conn.executemany(
                "INSERT OR IGNORE INTO vectors (key, vector) VALUES (?, ?)", rows
            )
