"""The vector cache (``--cache``): vectors already paid for, shared by every job and corpus.

A separate SQLite file the user names; its key is a hash of (model, options, text)
(``cache_key``), so any job or corpus reuses what was paid for. Many processes may share it
(WAL, busy timeout); it uses ``synchronous=NORMAL``, since losing its last entries to a power
loss only costs re-embedding them.

May import: the standard library, numpy; ``durable``.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .durable import create_tables, transaction

__all__ = ["VectorCache", "cache_key"]

_CACHE_SCHEMA_VERSION = 1
_IN_CHUNK = 500  # host parameters per IN (...) query, far below SQLite's limit
# Big pages hold several of the cache's 3 KB vectors each (a 4 KB page holds one and wastes a
# quarter).
_PAGE_SIZE = 16384

_CACHE_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, vector BLOB NOT NULL);
"""


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


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
            with transaction(conn):
                create_tables(conn, _CACHE_SCHEMA)
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
        with transaction(self._conn):
            self._conn.executemany(
                "INSERT OR IGNORE INTO vectors (key, vector) VALUES (?, ?)", rows
            )
