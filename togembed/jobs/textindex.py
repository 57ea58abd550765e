"""The corpus job's dedup: a text's hash (``text_hash``), and text hash -> position of a stored
row with that text, in memory (``TextIndex``).

Compact, because a job may hold millions of distinct texts: 24 bytes per text (24 MB per
million) in sorted numpy runs, plus a small dict of the latest additions that becomes a run
when it fills up. Runs of equal size are merged (like a binary counter) up to ``_RUN_MAX``
entries, so a lookup searches a few runs (8 per million texts) and no array grows past about
1 MB: big arrays
reallocated as they grow fragment the C heap of a long job (measured: +60 MB of RSS over 1M
texts). (The job store once kept this as an SQLite index; its random inserts cost more CPU than
the rest of recording a batch, 4x the job's time at 1M texts.)

A lookup matches both 8-byte halves of the hash. Two different texts whose hashes share the
first half (about 1 in 10^7 for a million texts) may hide each other: the later one is then
embedded again, never given the other's vector.

May import: the standard library, numpy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

__all__ = ["HASH_SIZE", "TextIndex", "text_hash"]

HASH_SIZE = 16  # bytes of a text hash
_RECENT_MAX = 32_768  # additions kept in the dict before they become a run (~5 MB)
_RUN_MAX = 140_000  # entries of the largest run: about 1 MB per array (4 flushes' worth)


def text_hash(text: str) -> bytes:
    """The dedup key of a text within a job: 16 bytes of BLAKE2b over its UTF-8."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=HASH_SIZE).digest()


def _halves(hashes: Sequence[bytes]) -> np.ndarray:
    """(n, 2) uint64: the two halves of each 16-byte hash."""
    joined = b"".join(hashes)
    if len(joined) != HASH_SIZE * len(hashes):
        raise ValueError(f"text hashes must be {HASH_SIZE} bytes")
    return np.frombuffer(joined, dtype="<u8").reshape(-1, 2)


class _Run:
    """Sorted by ``hi``: the hashes' halves and their positions."""

    def __init__(self, hi: np.ndarray, lo: np.ndarray, pos: np.ndarray) -> None:
        order = np.argsort(hi, kind="stable")
        self.hi, self.lo, self.pos = hi[order], lo[order], pos[order]

    def __len__(self) -> int:
        return len(self.hi)

    def find(self, q: np.ndarray, found: np.ndarray) -> None:
        """Fill ``found`` (-1 = not yet found) for the queries ``q`` found in this run."""
        at = np.minimum(np.searchsorted(self.hi, q[:, 0]), len(self.hi) - 1)
        hit = (found < 0) & (self.hi[at] == q[:, 0]) & (self.lo[at] == q[:, 1])
        found[hit] = self.pos[at[hit]]


class TextIndex:
    """Text hash -> position; the first position added for a hash wins."""

    def __init__(self) -> None:
        self._runs: list[_Run] = []  # oldest first; sizes shrink along the list
        self._recent: dict[bytes, int] = {}

    def __len__(self) -> int:
        return sum(len(r) for r in self._runs) + len(self._recent)

    def add(self, hashes: Sequence[bytes], positions: Sequence[int] | np.ndarray) -> None:
        """Remember these rows (hashes already known keep their position)."""
        if len(hashes) != len(positions):
            raise ValueError(f"{len(hashes)} hashes, {len(positions)} positions")
        recent = self._recent
        for k, p in enumerate(self.lookup(hashes)):
            if p < 0:
                recent.setdefault(bytes(hashes[k]), int(positions[k]))
        if len(recent) >= _RECENT_MAX:
            self._flush()

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The position stored for each hash, or -1."""
        if not hashes:
            return []
        if self._runs:
            q = _halves(hashes)
            found = np.full(len(hashes), -1, dtype=np.int64)
            for run in self._runs:
                run.find(q, found)
            result = found.tolist()
        else:
            result = [-1] * len(hashes)
        recent = self._recent
        if recent:
            result = [recent.get(h, p) if p < 0 else p for h, p in zip(hashes, result, strict=True)]
        return result

    def _flush(self) -> None:
        """The recent additions become a run; then equal-sized runs merge, up to _RUN_MAX."""
        q = _halves(list(self._recent))
        pos = np.fromiter(self._recent.values(), dtype=np.int64, count=len(self._recent))
        self._runs.append(_Run(q[:, 0].copy(), q[:, 1].copy(), pos))
        self._recent = {}
        runs = self._runs
        while (
            len(runs) > 1
            and len(runs[-2]) < 2 * len(runs[-1])
            and len(runs[-2]) + len(runs[-1]) <= _RUN_MAX
        ):
            b, a = runs.pop(), runs.pop()
            runs.append(
                _Run(
                    np.concatenate([a.hi, b.hi]),
                    np.concatenate([a.lo, b.lo]),
                    np.concatenate([a.pos, b.pos]),
                )
            )
