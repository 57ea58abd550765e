"""A changed input: the job's stored work mapped onto the new input, by id and text.

Vectors depend only on (model, text), and the job file's rows are keyed by input position. When
the input changes under a job (records appended, edited, removed, reordered; another id field),
``reconcile_stored`` maps the job onto the new input in one transaction: every new record whose
text has a stored vector points at that vector (nothing is re-embedded, whatever its id or
position was), failures of records whose id and text are unchanged are kept, the rest is
forgotten, and the meta becomes the new input's. The vectors file is not touched: vectors no
record refers to any more stay in it, unreferenced. A kill during the pass rolls it back (the
job is as before, and the next run reconciles again); after its commit the job is the new
input's, resumed as usual.

May import: the standard library, attrs, orjson; ``durable``, ``ids``, ``textindex``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import orjson

from .durable import transaction
from .ids import DuplicateIdError
from .textindex import HASH_SIZE, TextIndex

__all__ = ["Reconciled", "reconcile_stored"]


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


def reconcile_stored(
    conn: sqlite3.Connection,
    blocks: Iterable[tuple[int, Sequence[str], Sequence[bytes]]],
    *,
    stored: Iterable[tuple[list[bytes], list[int]]],
    meta: dict[str, Any],
    keep_ids: bool,
) -> Reconciled:
    """Map the job onto a changed input, in one transaction (see ``JobStore.reconcile``).
    ``stored``: (text hashes, rows of the vectors file) of the stored rows, in chunks; ``meta``
    becomes the job's."""
    index = TextIndex()  # the job's dedup index, here text hash -> row
    for hashes, rows in stored:
        index.add(hashes, rows)
    with transaction(conn):
        conn.execute("DROP TABLE IF EXISTS temp.staged")
        conn.execute(
            "CREATE TEMP TABLE staged (pos INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, "
            "hash BLOB NOT NULL, row INTEGER)"
        )
        total = 0
        for start, ids, hashes in blocks:
            if start != total or len(ids) != len(hashes):
                raise ValueError(f"reconcile wants consecutive blocks; got {start} at {total}")
            rows = [r if r >= 0 else None for r in index.lookup(hashes)]
            try:
                _stage(conn, start, ids, hashes, rows)
            except sqlite3.IntegrityError:
                _explain_staged_conflict(conn, start, ids)
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
            conn.execute("INSERT INTO ids (pos, id) SELECT pos, id FROM temp.staged ORDER BY pos")
        kept = conn.execute("SELECT count(*) FROM vectors").fetchone()[0]
        failed = conn.execute("SELECT count(*) FROM failures").fetchone()[0]
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('ids_total', ?)", (total,))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'job'", (json.dumps(meta),))
        for table in ("staged", "kept_failures"):
            conn.execute(f"DROP TABLE temp.{table}")
    return Reconciled(total=total, kept=kept, failed=failed, gone=gone)


def _stage(
    conn: sqlite3.Connection,
    start: int,
    ids: Sequence[str],
    hashes: Sequence[bytes],
    rows: list[int | None],
) -> None:
    """A block of records into temp.staged, in one statement (as ``JobStore``'s batches). Ids
    come from UTF-8 files: JSON carries every one of them."""
    conn.execute(
        "INSERT INTO temp.staged (pos, id, hash, row) SELECT ?4 + key, value ->> 0, "
        "substr(?2, ?3 * key + 1, ?3), value ->> 1 FROM json_each(?1)",
        (orjson.dumps(list(zip(ids, rows, strict=True))), b"".join(hashes), HASH_SIZE, start),
    )


def _explain_staged_conflict(conn: sqlite3.Connection, start: int, ids: Sequence[str]) -> None:
    """Raise the ``DuplicateIdError`` behind an IntegrityError of the staging of the block at
    ``start`` (the blocks before it are in the table; its rows are not, if staged in one
    statement, or up to the bad one)."""
    seen: dict[str, int] = {}
    for pos, rid in enumerate(ids, start=start):
        row = conn.execute("SELECT pos FROM temp.staged WHERE id = ?", (rid,)).fetchone()
        first = seen.get(rid, row[0] if row else None)
        if first is not None and first != pos:
            raise DuplicateIdError(rid, min(first, pos), max(first, pos))
        seen[rid] = pos
