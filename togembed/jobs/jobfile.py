"""The job file ``<OUTPUT>.togembed-job.sqlite``: its tables and format, its exclusive lock, and
the check of a reopened job's settings against this run's.

The tables (format ``SCHEMA_VERSION``):

- ``meta``      what the job was started with (model, options, input identity): a resume with
                other settings would mix vectors, so ``JobStore.open`` refuses it (unless
                nothing was stored yet, or the caller reconciles the change: ``reconcile``).
                Also ``dim`` and ``vec_rows``, the committed length of the vectors file in
                rows, and ``ids_total``, the input's record count once known.
- ``ids``       every input id at its position, filled by a cheap pre-pass over the input
                (``ids.register_ids``) so an id used twice stops the job before anything is
                paid for.
- ``vectors``   pos (primary key), id (unique), text hash (not indexed: a job loads them
                into a ``TextIndex`` when it resumes), and ``row``: where the vector is in
                the vectors file. Duplicates share their source's row.
- ``failures``  pos, id, reason, text hash: inputs that can never succeed; a later success
                removes them. (The hash column was added to format 3 in place; older rows
                have none.)

Locking. The connection takes SQLite's exclusive lock when the job is claimed and holds it
until it closes (the OS releases it if the process dies): a second process fails at once
(``JobLockedError``) instead of paying for the same inputs twice.

May import: the standard library; ``togembed.core``; ``durable``.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

from ..core.errors import TogembedError
from .durable import create_tables, transaction

__all__ = [
    "SCHEMA_VERSION",
    "JobLockedError",
    "JobMismatchError",
    "claim",
    "connect",
    "job_path",
    "json_value",
    "meta_int",
    "started_with",
    "vectors_path",
]

# The job format. 1: vectors as BLOBs in SQLite; 2: vectors in a file beside it; 3: text
# hashes not indexed.
SCHEMA_VERSION = 3
_JOB_SUFFIX = ".togembed-job.sqlite"
_VECTORS_SUFFIX = ".vectors"
# The job file's rows are small, and its id index takes inserts at random places: a commit
# rewrites every page it touched, and smaller pages write less (measured over 1M rows in
# batches of 512, when hashes were indexed too: 14% less CPU with 4 KB pages than 16 KB).
_JOB_PAGE_SIZE = 4096
_MISSING = object()

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


class JobMismatchError(TogembedError, ValueError):
    """The job file was started with settings that would give other vectors than this run."""

    def __init__(self, message: str, *, path: str, field: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.field = field


class JobLockedError(TogembedError):
    """Another process is running this job (it holds the job file's lock)."""


def job_path(output: str | os.PathLike[str]) -> Path:
    """The job file of an output: ``out.parquet`` -> ``out.parquet.togembed-job.sqlite``."""
    return Path(f"{os.fspath(output)}{_JOB_SUFFIX}")


def vectors_path(job_file: str | os.PathLike[str]) -> Path:
    """The vectors file of a job file: ``X.togembed-job.sqlite`` -> ``X.togembed-job.vectors``
    (any other name gets ``.vectors`` appended)."""
    name = os.fspath(job_file)
    return Path(f"{name.removesuffix('.sqlite')}{_VECTORS_SUFFIX}")


def json_value(value: Any) -> Any:
    """What a value looks like after a JSON round trip (tuples become lists, ...)."""
    return json.loads(json.dumps(value))


def meta_int(conn: sqlite3.Connection, key: str) -> int | None:
    """An integer of the ``meta`` table (``dim``, ``vec_rows``, ``ids_total``), if set."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else None


def started_with(path: Path) -> dict[str, Any]:
    """The settings a job file was started with (its meta's ``job``), read without claiming
    it; {} if there is none, or it is in use."""
    if not path.is_file():
        return {}
    try:
        conn = sqlite3.connect(path, timeout=0)
    except sqlite3.Error:
        return {}
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'job'").fetchone()
        found = json.loads(row[0]) if row else {}
    except (sqlite3.Error, ValueError):  # locked by a running job, or not a job file
        return {}
    finally:
        conn.close()
    return found if isinstance(found, dict) else {}


def connect(path: Path) -> sqlite3.Connection:
    """Connect to the job file (created if missing; its directory must exist). Not locked yet:
    ``claim`` does that. The connection may move to another thread (see ``JobStore``)."""
    if not path.parent.is_dir():
        raise TogembedError(f"cannot create {path}: directory {path.parent} does not exist")
    try:
        return sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise TogembedError(f"cannot open the job file {path}: {exc}") from exc


def claim(
    conn: sqlite3.Connection,
    path: Path,
    given: dict[str, Any],
    *,
    synchronous: Literal["FULL", "NORMAL"],
    changeable: Collection[str] = (),
    restart_if_unpaid: bool = False,
) -> dict[str, tuple[Any, Any]]:
    """Take the exclusive lock (until the connection closes), then create the tables with the
    meta ``given``, or check the stored meta against it (see ``JobStore.open``): returns the
    ``changeable`` fields that differ, (old, new). Raises ``sqlite3.OperationalError`` ("locked")
    when another process holds the job."""
    conn.execute(f"PRAGMA page_size = {_JOB_PAGE_SIZE}")  # only takes effect on a new file
    # Before the first access: the lock is then held until close, and the WAL index lives in
    # process memory (no -shm file).
    conn.execute("PRAGMA locking_mode = EXCLUSIVE")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    with transaction(conn):  # takes the exclusive lock now, not at the first batch
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        if "meta" in tables:
            return _check_meta(conn, path, given, changeable, restart_if_unpaid)
        create_tables(conn, _JOB_SCHEMA)
        conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [("schema", str(SCHEMA_VERSION)), ("job", json.dumps(given)), ("vec_rows", "0")],
        )
    return {}


def _check_meta(
    conn: sqlite3.Connection,
    path: Path,
    given: dict[str, Any],
    changeable: Collection[str] = (),
    restart_if_unpaid: bool = False,
) -> dict[str, tuple[Any, Any]]:
    """Inside ``claim``'s transaction: compare the stored meta with ``given``; returns the
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
