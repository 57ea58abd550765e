"""Inputs that can never succeed (the server rejects them for good): the job file's ``failures``
table, and ``OUTPUT.failures.jsonl``, the list written for the user at the end of a run.

A failure is kept until the position succeeds (a later success removes it) or ``--retry-failed``
clears it; with its text hash it survives a ``reconcile`` that finds the same id with the same
text.

May import: the standard library, orjson; ``durable``.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson

from .durable import transaction

__all__ = [
    "clear_failures",
    "failed_positions",
    "failures_path",
    "forget_failures",
    "iter_failures",
    "record_failures",
    "write_failures",
]

_READ_CHUNK = 1024


def failures_path(output: str | os.PathLike[str]) -> Path:
    """``vectors.parquet`` -> ``vectors.parquet.failures.jsonl``."""
    out = Path(output)
    return out.with_name(out.name + ".failures.jsonl")


def record_failures(
    conn: sqlite3.Connection,
    items: Iterable[tuple[int, str, str] | tuple[int, str, str, bytes | None]],
) -> None:
    """Store (pos, id, reason[, text hash]) rows in one transaction; a position failed before
    gets the new reason."""
    rows = []
    for pos, rid, reason, *hashed in items:
        rows.append((int(pos), rid, reason, bytes(hashed[0]) if hashed and hashed[0] else None))
    with transaction(conn):
        conn.executemany(
            "INSERT OR REPLACE INTO failures (pos, id, reason, hash) VALUES (?, ?, ?, ?)", rows
        )


def forget_failures(conn: sqlite3.Connection, positions: Iterable[int]) -> None:
    """Inside a transaction: remove these positions' failures (usually there are none)."""
    if conn.execute("SELECT 1 FROM failures LIMIT 1").fetchone() is not None:
        conn.executemany("DELETE FROM failures WHERE pos = ?", [(int(p),) for p in positions])


def clear_failures(conn: sqlite3.Connection, positions: Iterable[int] | None = None) -> int:
    """Forget failures (all of them if ``positions`` is None) in one transaction; returns how
    many were removed."""
    with transaction(conn):
        before = conn.total_changes
        if positions is None:
            conn.execute("DELETE FROM failures")
        else:
            conn.executemany("DELETE FROM failures WHERE pos = ?", [(int(p),) for p in positions])
        return conn.total_changes - before


def failed_positions(conn: sqlite3.Connection) -> set[int]:
    """Positions recorded as failed."""
    return {r[0] for r in conn.execute("SELECT pos FROM failures")}


def iter_failures(conn: sqlite3.Connection) -> Iterator[tuple[int, str, str]]:
    """(pos, id, reason) of every failed input, in position order, streamed."""
    cursor = conn.execute("SELECT pos, id, reason FROM failures ORDER BY pos")
    try:
        while rows := cursor.fetchmany(_READ_CHUNK):
            yield from rows
    finally:
        cursor.close()


def write_failures(path: Path, failures: Iterable[tuple[int, str, str]]) -> None:
    """Write (pos, id, reason) rows to ``path`` as JSON lines, durably, replacing it whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        for pos, id_, reason in failures:
            f.write(orjson.dumps({"id": id_, "position": pos, "error": reason}) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
