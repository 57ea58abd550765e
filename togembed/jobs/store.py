"""Durable state of a corpus job, and a persistent vector cache shared by jobs. SQLite (stdlib).

A job is two files next to the output:

- ``<OUTPUT>.togembed-job.sqlite`` (SQLite), the small bookkeeping:

  - ``meta``      what the job was started with (model, options, input identity): a resume with
                  other settings would mix vectors, so ``JobStore.open`` refuses it (unless
                  nothing was stored yet, or the caller reconciles the change: below). Also
                  ``dim`` and ``vec_rows``, the committed length of the vectors file in rows.
  - ``ids``       every input id at its position, filled by a cheap pre-pass over the input
                  (``register_ids``) so an id used twice stops the job before anything is paid
                  for.
  - ``vectors``   pos (primary key), id (unique), text hash (not indexed: a job loads them
                  into a ``TextIndex`` when it resumes), and ``row``: where the vector is in
                  the vectors file. Duplicates share their source's row.
  - ``failures``  pos, id, reason, text hash: inputs that can never succeed; a later success
                  removes them. (The hash column was added to format 3 in place; older rows
                  have none.)

- ``<OUTPUT>.togembed-job.vectors``, the vectors: raw little-endian float32 rows of ``dim``,
  append-only. Kept out of SQLite because pushing 3 KB blobs through it costs more CPU than the
  rest of the job's bookkeeping together (~0.7 s per 20k x 768 vectors, vs ~0.05 s to write
  them to a file).

Durability. Every ``record_*`` call is one SQLite transaction: after a kill at any instant
(SIGKILL, OOM, Ctrl-C) a batch is either fully stored or absent, never half. ``record_batch``
first writes the rows' bytes at the committed end of the vectors file (one ``pwrite``), then
commits their rows and the new ``vec_rows`` in one transaction; nothing refers to bytes past
``vec_rows``, and ``open`` truncates the file to it (the garbage a kill between the two steps
leaves behind). With ``synchronous=FULL`` (the default) the vectors file is fsynced before the
commit, and the commit (WAL) is fsynced: a power loss also keeps every batch that was recorded,
and only the batches in flight are paid for again. ``synchronous="NORMAL"`` skips both fsyncs
(the WAL is then synced only at checkpoints): still kill-safe, but a power loss can roll back the
last few MB of commits, paid for again on resume. A commit may then also outlive the vector
bytes it refers to: ``open`` forgets (and the job re-embeds) rows past the end of a vectors file
found shorter than ``vec_rows``, but a file system that keeps a file's new length and loses its
new data (ext4's default ``data=ordered`` and XFS do not) would leave zeros there: use FULL if
power losses matter. FULL costs two fsyncs per call. Measured (this Linux VM's disk; batches of
512 x 768 float32, FULL): ~130k vectors/s on a fresh job, so recording is not the bottleneck.
On a disk with slow fsync, pass more rows per call.

A changed input. Vectors depend only on (model, text), and the rows above are keyed by input
position. When the input changes under a job (records appended, edited, removed, reordered;
another id field), ``reconcile`` maps the job onto the new input in one transaction: every new
record whose text has a stored vector points at that vector (nothing is re-embedded, whatever its
id or position was), failures of records whose id and text are unchanged are kept, the rest is
forgotten, and the meta becomes the new input's. The vectors file is not touched: vectors no
record refers to any more stay in it, unreferenced. A kill during the pass rolls it back (the
job is as before, and the next run reconciles again); after its commit the job is the new
input's, resumed as usual.

Locking. A job is run by one process: the store holds SQLite's exclusive lock from ``open`` to
``close`` (released by the OS if the process dies), and a second process gets ``JobLockedError``
at once instead of paying for the same inputs twice. The vectors file is only touched under that
lock.

Threads. Not async, not for concurrent use: call a store from one thread at a time. It may be
opened in one thread (e.g. to report a ``JobMismatchError`` early) and then used only from a
dedicated writer thread; the connection is made with ``check_same_thread=False`` for that.

Memory. ``done_bitmap`` is one byte per position; ``iter_rows`` reads the vectors file in
chunks of 2 MB and ``rows_between`` the range asked for (``pread``, not a memory map: every
mapped page read would count in RSS),
``iter_failures`` and ``register_ids`` stream through cursors in chunks; nothing holds all ids or
vectors.

The cache (``VectorCache``) is a separate SQLite file the user names; its key is a hash of
(model, options, text), so any job or corpus reuses what was paid for. Many processes may share
it (WAL, busy timeout); it uses ``synchronous=NORMAL``, since losing its last entries to a power
loss only costs re-embedding them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
import orjson

from ..core.errors import TogembedError

__all__ = [
    "DuplicateIdError",
    "JobCounts",
    "Reconciled",
    "JobLockedError",
    "JobMismatchError",
    "JobStore",
    "VectorCache",
    "cache_key",
    "job_path",
    "text_hash",
    "vectors_path",
]

log = logging.getLogger("togembed")

# The job format. 1: vectors as BLOBs in SQLite; 2: vectors in a file beside it; 3: text
# hashes not indexed.
SCHEMA_VERSION = 3
_CACHE_SCHEMA_VERSION = 1
_JOB_SUFFIX = ".togembed-job.sqlite"
_VECTORS_SUFFIX = ".vectors"
_IN_CHUNK = 500  # host parameters per IN (...) query, far below SQLite's limit
_READ_CHUNK = 1024
_READ_BYTES = 2 << 20  # vector bytes iter_rows reads at a time
_REGISTER_CHUNK = 50_000
_HASH_CHUNK = 65_536  # rows per chunk of iter_hashes
_HASH_SIZE = 16  # bytes of a text hash
# A batch's rows in one statement: (pos, id) pairs as a JSON array, the hashes concatenated.
# (executemany releases and retakes the GIL at every row; with the event loop's thread busy,
# each retake waits, and the loop waits for each release: measured, it cost the loop about
# twice the time of this.)
_INSERT_BATCH = (
    "INSERT INTO vectors (pos, id, hash, row) "
    "SELECT value ->> 0, value ->> 1, substr(?2, ?3 * key + 1, ?3), ?4 + key FROM json_each(?1)"
)
# Big pages hold several of the cache's 3 KB vectors each (a 4 KB page holds one and wastes a
# quarter). The job file's rows are small, and its id index takes inserts at random places:
# a commit rewrites every page it touched, and smaller pages write less (measured over 1M rows
# in batches of 512, when hashes were indexed too: 14% less CPU with 4 KB pages than 16 KB).
_PAGE_SIZE = 16384
_JOB_PAGE_SIZE = 4096
_MISSING = object()
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation
_IOV_MAX = 1024  # buffers per pwritev (Linux's limit; a group commit has far fewer)

_JOB_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE ids (pos INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE);
CREATE TABLE vectors (
    pos INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    hash BLOB NOT NULL,
    row INTEGER NOT NULL
);
CREATE TABLE failures (
    pos INTEGER PRIMARY KEY, id TEXT NOT NULL, reason TEXT NOT NULL, hash BLOB
);
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
class Reconciled:
    """What ``reconcile`` made of a changed input: ``total`` records, ``kept`` of them with a
    stored vector, ``failed`` with a failure kept (same id, same text); ``gone``: stored
    records (vectors or failures) whose id is not in the input any more."""

    total: int
    kept: int
    failed: int
    gone: int

    @property
    def to_embed(self) -> int:
        """Records new or changed: what the job still has to send."""
        return self.total - self.kept - self.failed


@attrs.frozen
class JobCounts:
    """Progress of a job: vectors stored, inputs failed for good, ids registered."""

    done: int
    failed: int
    ids: int


def job_path(output: str | os.PathLike[str]) -> Path:
    """The job file of an output: ``out.parquet`` -> ``out.parquet.togembed-job.sqlite``."""
    return Path(f"{os.fspath(output)}{_JOB_SUFFIX}")


def vectors_path(job_file: str | os.PathLike[str]) -> Path:
    """The vectors file of a job file: ``X.togembed-job.sqlite`` -> ``X.togembed-job.vectors``
    (any other name gets ``.vectors`` appended)."""
    name = os.fspath(job_file)
    return Path(f"{name.removesuffix('.sqlite')}{_VECTORS_SUFFIX}")


def text_hash(text: str) -> bytes:
    """The dedup key of a text within a job: 16 bytes of BLAKE2b over its UTF-8."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=_HASH_SIZE).digest()


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


# -- the vectors file: positional reads and writes on one descriptor --------------------------


def _open_vectors(path: Path) -> tuple[int, bool]:
    """Open (creating it if needed) a vectors file for reading and writing; (fd, created)."""
    flags = os.O_RDWR | _O_BINARY | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags), False
    except FileNotFoundError:
        return os.open(path, flags | os.O_CREAT, 0o666), True


def _float32_parts(vectors: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """``record_batch``'s vectors as C-contiguous little-endian float32 arrays: the arrays of
    a list of 2-D arrays, else the one array (any nested sequence of numbers converts)."""
    if (
        isinstance(vectors, (list, tuple))
        and vectors
        and all(isinstance(v, np.ndarray) and v.ndim == 2 for v in vectors)
    ):
        return [np.ascontiguousarray(v, dtype="<f4") for v in vectors]
    return [np.ascontiguousarray(vectors, dtype="<f4")]


def _write_at(fd: int, parts: list[memoryview], offset: int) -> None:
    """Write ``parts`` one after the other at ``offset``: one ``pwritev`` (unless the kernel
    writes less at once), or, without it (Windows), a write per part."""
    parts = [p for p in parts if len(p)]
    while parts:
        if hasattr(os, "pwritev"):
            written = os.pwritev(fd, parts[:_IOV_MAX], offset)
        elif hasattr(os, "pwrite"):
            written = os.pwrite(fd, parts[0], offset)
        else:  # the descriptor is used by one thread, so seek + write is the same
            os.lseek(fd, offset, os.SEEK_SET)
            written = os.write(fd, parts[0])
        if written <= 0:
            raise OSError(f"writing the vectors file: {written} bytes written")
        offset += written
        while parts and written >= len(parts[0]):
            written -= len(parts.pop(0))
        if written:
            parts[0] = parts[0][written:]


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes at ``offset``, or fewer only at the end of the file."""
    parts: list[bytes] = []
    while size > 0:
        if hasattr(os, "pread"):
            part = os.pread(fd, size, offset)
        else:
            os.lseek(fd, offset, os.SEEK_SET)
            part = os.read(fd, size)
        if not part:
            break
        parts.append(part)
        size -= len(part)
        offset += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _datasync(fd: int) -> None:
    """The file's data (and its length) on disk: ``fdatasync`` where there is one."""
    getattr(os, "fdatasync", os.fsync)(fd)


def _fsync_dir(directory: Path) -> None:
    """A new file's directory entry on disk (not possible, nor needed, on Windows)."""
    if sys.platform == "win32":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _close_files(conn: sqlite3.Connection, fd: int, *, quietly: bool = True) -> None:
    """Close the vectors file (while the lock is still held), then the connection."""
    try:
        if fd >= 0:
            os.close(fd)
    except OSError:
        if not quietly:
            raise
    finally:
        conn.close()


class JobStore:
    """The durable state of one corpus job. Open with ``JobStore.open``; see the module doc."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        meta: dict[str, Any],
        *,
        fd: int,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> None:
        self._conn = conn
        self._fd = fd
        self._sync = synchronous == "FULL"
        self.path = path
        self.vectors_path = vectors_path(path)
        self.meta = meta
        # Fields of ``meta`` that differ from the stored job's, (old, new): ``reconcile``.
        self.changed: dict[str, tuple[Any, Any]] = {}
        row = conn.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()
        self._dim: int | None = int(row[0]) if row else None

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
        given = _json_value(meta)
        changed: dict[str, tuple[Any, Any]] = {}
        if not path.parent.is_dir():
            raise TogembedError(f"cannot create {path}: directory {path.parent} does not exist")
        try:
            conn = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise TogembedError(f"cannot open the job file {path}: {exc}") from exc
        fd = -1
        try:
            conn.execute(f"PRAGMA page_size = {_JOB_PAGE_SIZE}")  # only takes effect on a new file
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
                        [
                            ("schema", str(SCHEMA_VERSION)),
                            ("job", json.dumps(given)),
                            ("vec_rows", "0"),
                        ],
                    )
                else:
                    changed = _check_meta(conn, path, given, changeable, restart_if_unpaid)
            # Under the lock from here on: no other process touches the vectors file.
            fd, created = _open_vectors(vectors_path(path))
            if created and synchronous == "FULL":
                _fsync_dir(path.parent)
            store = cls(conn, path, given, fd=fd, synchronous=synchronous)
            store.changed = changed
            store._cut_to_committed()
        except sqlite3.OperationalError as exc:
            _close_files(conn, fd)
            if "locked" in str(exc):
                raise JobLockedError(
                    f"{path} is in use by another togembed process; wait for it to finish "
                    "or stop it"
                ) from None
            raise TogembedError(f"cannot open the job file {path}: {exc}") from exc
        except BaseException:
            _close_files(conn, fd)
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
        fd, self._fd = self._fd, -1
        _close_files(self._conn, fd, quietly=False)

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

    def _vec_rows(self) -> int:
        """Rows of the vectors file that committed rows may refer to."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'vec_rows'").fetchone()
        return int(row[0])

    def _cut_to_committed(self) -> None:
        """Make the vectors file end where the committed rows do. Longer: bytes a kill left
        between a write and its commit, cut off. Shorter (a power loss under NORMAL, or a
        damaged file): the rows whose bytes are gone are forgotten, to be embedded again."""
        conn, fd = self._conn, self._fd
        row_bytes = 4 * (self._dim or 0)
        committed = self._vec_rows()
        size = os.fstat(fd).st_size
        if size > committed * row_bytes:
            os.ftruncate(fd, committed * row_bytes)
        elif size < committed * row_bytes:
            kept = size // row_bytes
            with _transaction(conn):
                before = conn.total_changes
                conn.execute("DELETE FROM vectors WHERE row >= ?", (kept,))
                lost = conn.total_changes - before
                conn.execute("UPDATE meta SET value = ? WHERE key = 'vec_rows'", (str(kept),))
            os.ftruncate(fd, kept * row_bytes)
            log.warning(
                "%s holds %d of the %d vectors %s recorded (a power loss, or a damaged "
                "file): %d inputs will be embedded again",
                self.vectors_path,
                kept,
                committed,
                self.path,
                lost,
            )

    # -- ids pre-pass -----------------------------------------------------------------------

    def register_ids(self, pairs: Iterable[tuple[int, str]]) -> int:
        """Store every (pos, id) of the input, in position order from 0, and return the count.

        Raises ``DuplicateIdError`` at the first id seen at two positions. Run it over the
        whole input before embedding (it costs a read of the file and ~1 s per million ids):
        then a duplicate stops the job before anything is paid for. Resumable: positions
        already registered are skipped. Ids that cannot repeat (line or row numbers) need no
        pass: ``register_count``.
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
        self.register_count(expected)
        return expected

    def register_count(self, total: int) -> None:
        """How many records the input has, for ids that cannot repeat (line or row numbers):
        nothing to store or check per id."""
        with _transaction(self._conn):
            self._conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('ids_total', ?)", (total,)
            )

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

    # -- a changed input ------------------------------------------------------------------------

    def reconcile(
        self,
        blocks: Iterable[tuple[int, Sequence[str], Sequence[bytes]]],
        *,
        keep_ids: bool,
    ) -> Reconciled:
        """Map the job onto a changed input, in one transaction (see the module doc).

        ``blocks`` are the new input's records in order, (first position, ids, text hashes),
        positions from 0. ``keep_ids``: store the ids for the duplicate check (an id field;
        line numbers need none). Raises ``DuplicateIdError`` (nothing changed) for an id at
        two positions; any error or kill during the pass leaves the job as it was. Afterwards
        the job's meta is ``self.meta`` and ``changed`` is empty.

        Cost: a ``TextIndex`` of the stored texts in memory (24 bytes each), and about 15 s
        per million records on this project's 2-core VM (reading the input aside)."""
        from .textindex import TextIndex  # the job's dedup index, here text hash -> row

        stored = TextIndex()
        for hashes, rows in self._iter_column_pairs("hash", "row"):
            stored.add(hashes, rows)
        conn = self._conn
        with _transaction(conn):
            conn.execute("DROP TABLE IF EXISTS temp.staged")
            conn.execute(
                "CREATE TEMP TABLE staged (pos INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, "
                "hash BLOB NOT NULL, row INTEGER)"
            )
            total = 0
            for start, ids, hashes in blocks:
                if start != total or len(ids) != len(hashes):
                    raise ValueError(f"reconcile wants consecutive blocks; got {start} at {total}")
                rows = [r if r >= 0 else None for r in stored.lookup(hashes)]
                try:
                    self._stage(start, ids, hashes, rows)
                except sqlite3.IntegrityError:
                    self._explain_staged_conflict(start, ids)
                    raise
                total += len(ids)
            gone = conn.execute(
                "SELECT count(*) FROM (SELECT id FROM vectors UNION SELECT id FROM failures) "
                "WHERE id NOT IN (SELECT id FROM temp.staged)"
            ).fetchone()[0]
            conn.execute("DROP TABLE IF EXISTS temp.kept_failures")
            conn.execute(
                "CREATE TEMP TABLE kept_failures AS SELECT s.pos AS pos, s.id AS id, "
                "f.reason AS reason, f.hash AS hash FROM main.failures f "
                "JOIN temp.staged s ON s.id = f.id AND s.hash = f.hash WHERE s.row IS NULL"
            )
            conn.execute("DELETE FROM vectors")
            conn.execute(
                "INSERT INTO vectors (pos, id, hash, row) "
                "SELECT pos, id, hash, row FROM temp.staged WHERE row IS NOT NULL ORDER BY pos"
            )
            conn.execute("DELETE FROM failures")
            conn.execute(
                "INSERT INTO failures (pos, id, reason, hash) "
                "SELECT pos, id, reason, hash FROM temp.kept_failures ORDER BY pos"
            )
            conn.execute("DELETE FROM ids")
            if keep_ids:
                conn.execute(
                    "INSERT INTO ids (pos, id) SELECT pos, id FROM temp.staged ORDER BY pos"
                )
            kept = conn.execute("SELECT count(*) FROM vectors").fetchone()[0]
            failed = conn.execute("SELECT count(*) FROM failures").fetchone()[0]
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('ids_total', ?)", (total,)
            )
            conn.execute("UPDATE meta SET value = ? WHERE key = 'job'", (json.dumps(self.meta),))
            for table in ("staged", "kept_failures"):
                conn.execute(f"DROP TABLE temp.{table}")
        self.changed = {}
        return Reconciled(total=total, kept=kept, failed=failed, gone=gone)

    def _iter_column_pairs(self, a: str, b: str) -> Iterator[tuple[list[Any], list[Any]]]:
        """Two columns of the stored rows, in chunks."""
        cursor = self._conn.execute(f"SELECT {a}, {b} FROM vectors")
        try:
            while rows := cursor.fetchmany(_HASH_CHUNK):
                yield [r[0] for r in rows], [r[1] for r in rows]
        finally:
            cursor.close()

    def _stage(
        self, start: int, ids: Sequence[str], hashes: Sequence[bytes], rows: list[int | None]
    ) -> None:
        """A block of ``reconcile``'s records into temp.staged, in one statement (as
        ``_insert_rows``). Ids come from UTF-8 files: JSON carries every one of them."""
        self._conn.execute(
            "INSERT INTO temp.staged (pos, id, hash, row) SELECT ?4 + key, value ->> 0, "
            "substr(?2, ?3 * key + 1, ?3), value ->> 1 FROM json_each(?1)",
            (orjson.dumps(list(zip(ids, rows, strict=True))), b"".join(hashes), _HASH_SIZE, start),
        )

    def _explain_staged_conflict(self, start: int, ids: Sequence[str]) -> None:
        """Raise the ``DuplicateIdError`` behind an IntegrityError of ``reconcile``'s staging
        of the block at ``start`` (the blocks before it are in the table; its rows are not,
        if staged in one statement, or up to the bad one)."""
        seen: dict[str, int] = {}
        for pos, rid in enumerate(ids, start=start):
            row = self._conn.execute("SELECT pos FROM temp.staged WHERE id = ?", (rid,)).fetchone()
            first = seen.get(rid, row[0] if row else None)
            if first is not None and first != pos:
                raise DuplicateIdError(rid, min(first, pos), max(first, pos))
            seen[rid] = pos

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
        parts = _float32_parts(vectors)
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
        with _transaction(conn):
            # The committed end, read inside the transaction: nothing kept in memory can go
            # stale (e.g. after a commit interrupted by Ctrl-C on its way back).
            start = self._vec_rows()
            if self._dim is None:
                conn.execute("INSERT INTO meta (key, value) VALUES ('dim', ?)", (str(dim),))
            try:
                self._insert_rows(positions, ids, hashes, start)
            except sqlite3.IntegrityError:
                self._explain_conflict("vectors", list(zip(map(int, positions), ids, strict=True)))
                raise
            conn.execute("UPDATE meta SET value = ? WHERE key = 'vec_rows'", (str(start + n),))
            self._forget_failures(positions)
            # Past the committed end: until the commit, nothing refers to these bytes, and a
            # kill before it leaves them to be cut off by the next open.
            _write_at(self._fd, [memoryview(p).cast("B") for p in parts], start * 4 * dim)
            if self._sync:
                _datasync(self._fd)  # the bytes are on disk before the rows that point at them
        self._dim = dim

    def _insert_rows(
        self, positions: Sequence[int], ids: Sequence[str], hashes: Sequence[bytes], start: int
    ) -> None:
        """Insert a batch's rows (row ``start + k`` for the k-th), in one statement when the
        hashes are text hashes and the ids JSON can carry, else one statement per row."""
        packed = None
        if all(len(h) == _HASH_SIZE for h in hashes):
            # orjson.JSONEncodeError (a TypeError): e.g. an id with a lone surrogate.
            with contextlib.suppress(TypeError):
                packed = orjson.dumps(list(zip(map(int, positions), ids, strict=True)))
        if packed is not None:
            self._conn.execute(_INSERT_BATCH, (packed, b"".join(hashes), _HASH_SIZE, start))
        else:
            self._conn.executemany(
                "INSERT INTO vectors (pos, id, hash, row) VALUES (?, ?, ?, ?)",
                [
                    (int(p), rid, bytes(h), start + k)
                    for k, (p, rid, h) in enumerate(zip(positions, ids, hashes, strict=True))
                ],
            )

    def _forget_failures(self, positions: Iterable[int]) -> None:
        """Inside a transaction: remove these positions' failures (usually there are none)."""
        conn = self._conn
        if conn.execute("SELECT 1 FROM failures LIMIT 1").fetchone() is not None:
            conn.executemany("DELETE FROM failures WHERE pos = ?", [(int(p),) for p in positions])

    def record_duplicates(self, items: Sequence[tuple[int, str, int]]) -> None:
        """Store (pos, id, source_pos) rows whose text equals that of an already stored
        position, in one transaction: they point at the source's vector (no bytes copied)."""
        conn = self._conn
        with _transaction(conn):
            before = conn.total_changes
            try:
                conn.executemany(
                    "INSERT INTO vectors (pos, id, hash, row) "
                    "SELECT ?, ?, hash, row FROM vectors WHERE pos = ?",
                    [(int(p), rid, int(src)) for p, rid, src in items],
                )
            except sqlite3.IntegrityError:
                self._explain_conflict("vectors", [(p, rid) for p, rid, _ in items])
                raise
            if conn.total_changes - before != len(items):
                missing = [src for _, _, src in items if not self._has(src)]
                raise ValueError(f"record_duplicates: source positions not stored: {missing}")
            self._forget_failures([p for p, _, _ in items])

    def _has(self, pos: int) -> bool:
        row = self._conn.execute("SELECT 1 FROM vectors WHERE pos = ?", (pos,)).fetchone()
        return row is not None

    def record_failures(
        self, items: Iterable[tuple[int, str, str] | tuple[int, str, str, bytes | None]]
    ) -> None:
        """Store (pos, id, reason[, text hash]) of inputs that can never succeed, in one
        transaction; a position failed before gets the new reason. With its text hash, a
        failure survives a ``reconcile`` that finds the same id with the same text."""
        rows = []
        for pos, rid, reason, *hashed in items:
            rows.append((int(pos), rid, reason, bytes(hashed[0]) if hashed and hashed[0] else None))
        with _transaction(self._conn):
            self._conn.executemany(
                "INSERT OR REPLACE INTO failures (pos, id, reason, hash) VALUES (?, ?, ?, ?)", rows
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

    def iter_hashes(self) -> Iterator[tuple[list[bytes], list[int]]]:
        """(text hashes, positions) of the stored rows, in chunks: what dedup needs to know
        about the work of earlier runs."""
        cursor = self._conn.execute("SELECT hash, pos FROM vectors")
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
                vectors = self._read_rows(where, dim)
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
        return [r[0] for r in rows], self._read_rows(where, self._dim)

    def _read_rows(self, rows: np.ndarray, dim: int) -> np.ndarray:
        """The vectors at these rows of the vectors file, (len(rows), dim), read-only: one
        read per run of consecutive rows."""
        n = len(rows)
        first = int(rows[0])
        if int(rows[-1]) - first == n - 1 and (n == 1 or bool((np.diff(rows) == 1).all())):
            return self._read(first, n, dim)  # the usual case: rows in one run, in order
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        cuts = (np.flatnonzero(np.diff(ordered) > 1) + 1).tolist()
        out = np.empty((n, dim), dtype="<f4")
        for a, b in zip([0, *cuts], [*cuts, n], strict=True):
            lo, hi = int(ordered[a]), int(ordered[b - 1]) + 1
            out[order[a:b]] = self._read(lo, hi - lo, dim)[ordered[a:b] - lo]
        out.flags.writeable = False
        return out

    def _read(self, start: int, count: int, dim: int) -> np.ndarray:
        """Rows start .. start + count of the vectors file, read-only."""
        size = 4 * dim * count
        data = _pread_all(self._fd, size, 4 * dim * start)
        if len(data) != size:
            raise TogembedError(
                f"{self.vectors_path} ends before row {start + count} that {self.path} refers "
                "to (a damaged job); pass --restart to start over"
            )
        return np.frombuffer(data, dtype="<f4").reshape(count, dim)

    def iter_failures(self) -> Iterator[tuple[int, str, str]]:
        """(pos, id, reason) of every failed input, in position order, streamed."""
        cursor = self._conn.execute("SELECT pos, id, reason FROM failures ORDER BY pos")
        try:
            while rows := cursor.fetchmany(_READ_CHUNK):
                yield from rows
        finally:
            cursor.close()


def _check_meta(
    conn: sqlite3.Connection,
    path: Path,
    given: dict[str, Any],
    changeable: Collection[str] = (),
    restart_if_unpaid: bool = False,
) -> dict[str, tuple[Any, Any]]:
    """Inside ``open``'s transaction: compare the stored meta with ``given``; returns the
    ``changeable`` fields that differ (old, new), starts a job that stored nothing afresh (with
    ``restart_if_unpaid``), or raises ``JobMismatchError``."""
    meta = dict(conn.execute("SELECT key, value FROM meta"))
    if meta.get("schema") != str(SCHEMA_VERSION):
        raise JobMismatchError(
            f"{path} was written by another version of togembed (job format "
            f"{meta.get('schema')}, this one reads {SCHEMA_VERSION}); pass --restart to start "
            "over",
            path=str(path),
        )
    _add_failure_hashes(conn)
    stored = json.loads(meta["job"])
    diffs = {
        field: (stored.get(field, _MISSING), given.get(field, _MISSING))
        for field in sorted(stored.keys() | given.keys())
        if stored.get(field, _MISSING) != given.get(field, _MISSING)
    }
    if not diffs:
        return {}
    done = conn.execute("SELECT count(*) FROM vectors").fetchone()[0]
    failed = conn.execute("SELECT count(*) FROM failures").fetchone()[0]
    if restart_if_unpaid and done == 0 and failed == 0:
        _reset(conn, given)
        return {}
    for field, (old, new) in diffs.items():
        if field in changeable:
            continue
        shown_old = "(not set)" if old is _MISSING else repr(old)
        shown_new = "(not set)" if new is _MISSING else repr(new)
        held = f"{done:,} vector{'s' if done != 1 else ''}"
        if failed:
            held += f" and {failed:,} failed input{'s' if failed != 1 else ''}"
        raise JobMismatchError(
            f"{path} belongs to a job started with {field}={shown_old}, but this run has "
            f"{field}={shown_new}; resuming would mix vectors. Run with the original "
            "settings to resume, or pass --restart to discard the stored work and start "
            f"over (the job holds {held})",
            path=str(path),
            field=field,
        )
    return {f: (None if old is _MISSING else old, new) for f, (old, new) in diffs.items()}


def _add_failure_hashes(conn: sqlite3.Connection) -> None:
    """Format 3 job files made before failures kept their text hash get the column (NULL for
    the failures already there): an in-place change older versions still read."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(failures)")}
    if "hash" not in columns:
        conn.execute("ALTER TABLE failures ADD COLUMN hash BLOB")


def _reset(conn: sqlite3.Connection, given: dict[str, Any]) -> None:
    """Inside a transaction: the job becomes a new one with ``given`` (nothing was stored:
    only ids registered, perhaps). The vectors file is cut to its new committed end, 0."""
    for table in ("ids", "vectors", "failures"):
        conn.execute(f"DELETE FROM {table}")
    conn.execute("DELETE FROM meta WHERE key IN ('dim', 'ids_total')")
    conn.execute("UPDATE meta SET value = ? WHERE key = 'job'", (json.dumps(given),))
    conn.execute("UPDATE meta SET value = '0' WHERE key = 'vec_rows'")


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
                    (str(_CACHE_SCHEMA_VERSION),),
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
