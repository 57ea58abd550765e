"""Text hash -> position of a stored row with that text: the corpus job's dedup, in memory.

Compact, because a job may hold millions of distinct texts: the 16-byte hashes and positions sit
in sorted numpy arrays (24 bytes per text, 24 MB per million), plus a small dict of the latest
additions that is merged in when it fills up. (The job store once kept this as an SQLite index;
its random inserts cost more CPU than the rest of recording a batch.)

A lookup matches both 8-byte halves of the hash. Two different texts whose hashes share the
first half (about 1 in 10^7 for a million texts) may hide each other: the later one is then
embedded again, never given the other's vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["TextIndex"]

_HASH_SIZE = 16
_RECENT_MAX = 32_768  # additions kept in the dict before a merge (~5 MB)


def _halves(hashes: Sequence[bytes]) -> np.ndarray:
    """(n, 2) uint64: the two halves of each 16-byte hash."""
    joined = b"".join(hashes)
    if len(joined) != _HASH_SIZE * len(hashes):
        raise ValueError(f"text hashes must be {_HASH_SIZE} bytes")
    return np.frombuffer(joined, dtype="<u8").reshape(-1, 2)


class TextIndex:
    """Text hash -> position; the first position added for a hash wins."""

    def __init__(self) -> None:
        self._hi = np.empty(0, dtype="<u8")  # sorted
        self._lo = np.empty(0, dtype="<u8")
        self._pos = np.empty(0, dtype=np.int64)
        self._recent: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._hi) + len(self._recent)

    def add(self, hashes: Sequence[bytes], positions: Sequence[int] | np.ndarray) -> None:
        """Remember these rows (hashes already known keep their position)."""
        if len(hashes) != len(positions):
            raise ValueError(f"{len(hashes)} hashes, {len(positions)} positions")
        new = [k for k, p in enumerate(self.lookup(hashes)) if p < 0]
        recent = self._recent
        for k in new:
            recent.setdefault(bytes(hashes[k]), int(positions[k]))
        if len(recent) >= _RECENT_MAX:
            self._merge()

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The position stored for each hash, or -1."""
        if not hashes:
            return []
        if len(self._hi):
            q = _halves(hashes)
            at = np.minimum(np.searchsorted(self._hi, q[:, 0]), len(self._hi) - 1)
            hit = (self._hi[at] == q[:, 0]) & (self._lo[at] == q[:, 1])
            found = np.where(hit, self._pos[at], -1).tolist()
        else:
            found = [-1] * len(hashes)
        recent = self._recent
        if recent:
            found = [recent.get(h, p) if p < 0 else p for h, p in zip(hashes, found, strict=True)]
        return found

    def _merge(self) -> None:
        """Move the recent additions into the sorted arrays: one O(n) insert."""
        keys = list(self._recent)
        q = _halves(keys)
        pos = np.fromiter(self._recent.values(), dtype=np.int64, count=len(keys))
        order = np.argsort(q[:, 0], kind="stable")
        hi, lo, pos = q[order, 0], q[order, 1], pos[order]
        at = np.searchsorted(self._hi, hi)
        self._hi = np.insert(self._hi, at, hi)
        self._lo = np.insert(self._lo, at, lo)
        self._pos = np.insert(self._pos, at, pos)
        self._recent = {}
