"""Writes that survive a kill or a power loss: SQLite transactions that are all or nothing,
and the fsyncs that put a file's bytes, or a new name in a directory, on disk.

Used by the job file and its vectors file, the vector cache and the output writers.
May import: the standard library.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["create_tables", "datasync", "fsync_dir", "fsync_file", "transaction"]


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception (Ctrl-C included)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def create_tables(conn: sqlite3.Connection, schema: str) -> None:
    """Run DDL statements inside the caller's transaction (``executescript`` would commit)."""
    for statement in schema.split(";"):
        if statement.strip():
            conn.execute(statement)


def datasync(fd: int) -> None:
    """The file's data (and its length) on disk: ``fdatasync`` where there is one."""
    getattr(os, "fdatasync", os.fsync)(fd)


def fsync_file(path: Path, *, data_only: bool = False) -> None:
    """Data on disk before the rename, so a power loss cannot leave an empty file in place.
    (Any descriptor of a file syncs all of its data the kernel has.)"""
    fd = os.open(path, os.O_RDONLY)
    try:
        if data_only and hasattr(os, "fdatasync"):
            os.fdatasync(fd)
        else:
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """A new file's directory entry (or a rename) on disk. Not possible on Windows, nor needed:
    directories cannot be opened there, and NTFS journals the rename."""
    if sys.platform == "win32":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
