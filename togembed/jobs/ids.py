"""Ids are unique within a job: the pre-pass that stores every input id in the job file's
``ids`` table, so that an id used twice stops the job before anything is paid for, and the
``DuplicateIdError`` behind a uniqueness conflict of a (pos, id) insert.

May import: the standard library; ``togembed.core``; ``durable``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence

from ..core.errors import TogembedError
from .durable import transaction

__all__ = ["DuplicateIdError", "explain_conflict", "register_count", "register_ids"]

_REGISTER_CHUNK = 50_000


class DuplicateIdError(TogembedError, ValueError):
    """One id at two input positions: the output could not say which vector is which."""

    def __init__(self, id: str, first: int, second: int) -> None:
        super().__init__(
            f"id {id!r} appears twice in the input, at records {first + 1} and {second + 1} "
            "(counting from 1); ids must be unique"
        )
        self.id = id
        self.positions = (first, second)


def register_ids(conn: sqlite3.Connection, pairs: Iterable[tuple[int, str]]) -> int:
    """Store every (pos, id) of the input, in position order from 0, and the count; return the
    count. Resumable: positions already registered are skipped. See ``JobStore.register_ids``."""
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
            _insert_ids(conn, chunk)
            chunk = []
    if chunk:
        _insert_ids(conn, chunk)
    register_count(conn, expected)
    return expected


def register_count(conn: sqlite3.Connection, total: int) -> None:
    """How many records the input has, for ids that cannot repeat (line or row numbers):
    nothing to store or check per id."""
    with transaction(conn):
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('ids_total', ?)", (total,))


def _insert_ids(conn: sqlite3.Connection, chunk: list[tuple[int, str]]) -> None:
    with transaction(conn):
        try:
            conn.executemany("INSERT INTO ids (pos, id) VALUES (?, ?)", chunk)
        except sqlite3.IntegrityError:
            explain_conflict(conn, "ids", chunk)
            raise


def explain_conflict(
    conn: sqlite3.Connection, table: str, pairs: Sequence[tuple[int, str]]
) -> None:
    """Raise what an IntegrityError of a (pos, id) insert into ``table`` means: an id at two
    positions (``DuplicateIdError``) or a position stored twice (a bug of the caller). Rolls
    the transaction back first, so only committed rows are compared."""
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
