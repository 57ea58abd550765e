"""The vectors file of a job, ``<OUTPUT>.togembed-job.vectors``: raw little-endian float32 rows
of the job's dimension, append-only, beside the job file.

Kept out of SQLite because pushing 3 KB blobs through it costs more CPU than the rest of the
job's bookkeeping together (~0.7 s per 20k x 768 vectors, vs ~0.05 s to write them to a file).
Rows are written with one ``pwritev`` per batch at the end the job file has committed, and read
with ``pread`` (not a memory map: every mapped page read would count in RSS), one read per run
of consecutive rows. Which rows count, and when bytes are synced, is the job store's business.

May import: the standard library, numpy; ``togembed.core``; ``durable``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.errors import TogembedError
from .durable import datasync, fsync_dir

__all__ = ["VectorFile", "float32_parts"]

_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation
_IOV_MAX = 1024  # buffers per pwritev (Linux's limit; a group commit has far fewer)


def float32_parts(vectors: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """``record_batch``'s vectors as C-contiguous little-endian float32 arrays: the arrays of
    a list of 2-D arrays, else the one array (any nested sequence of numbers converts)."""
    if (
        isinstance(vectors, (list, tuple))
        and vectors
        and all(isinstance(v, np.ndarray) and v.ndim == 2 for v in vectors)
    ):
        return [np.ascontiguousarray(v, dtype="<f4") for v in vectors]
    return [np.ascontiguousarray(vectors, dtype="<f4")]


class VectorFile:
    """An open vectors file, used under the job file's lock by one thread at a time. ``job`` is
    the job file, named in the error about a file damaged under it."""

    def __init__(self, path: Path, fd: int, *, job: Path) -> None:
        self.path = path
        self.job = job
        self._fd = fd

    @classmethod
    def open(cls, path: Path, *, job: Path, sync_dir: bool) -> VectorFile:
        """Open the file for reading and writing, creating it if needed (and then, with
        ``sync_dir``, making its directory entry durable)."""
        flags = os.O_RDWR | _O_BINARY | getattr(os, "O_CLOEXEC", 0)
        try:
            fd, created = os.open(path, flags), False
        except FileNotFoundError:
            fd, created = os.open(path, flags | os.O_CREAT, 0o666), True
        try:
            if created and sync_dir:
                fsync_dir(path.parent)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, job=job)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)

    def write(self, parts: list[np.ndarray], row: int, *, sync: bool) -> None:
        """Write the rows of ``parts`` (float32 arrays of one width) one after the other from
        ``row`` on; with ``sync``, wait until they are on disk."""
        dim = parts[0].shape[1]
        _write_at(self._fd, [memoryview(p).cast("B") for p in parts], row * 4 * dim)
        if sync:
            datasync(self._fd)

    def read_rows(self, rows: np.ndarray, dim: int) -> np.ndarray:
        """The vectors at these rows, (len(rows), dim), read-only: one read per run of
        consecutive rows."""
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
        """Rows start .. start + count, read-only."""
        size = 4 * dim * count
        data = _pread_all(self._fd, size, 4 * dim * start)
        if len(data) != size:
            raise TogembedError(
                f"{self.path} ends before row {start + count} that {self.job} refers "
                "to (a damaged job); pass --restart to start over"
            )
        return np.frombuffer(data, dtype="<f4").reshape(count, dim)


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
