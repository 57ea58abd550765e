"""A tiny deterministic stand-in for ``togembed.local.model.LocalModel`` (same interface), so the
server's tests need no model download. It records how it was called: batch sizes, threads,
overlapping calls."""

from __future__ import annotations

import functools
import hashlib
import threading
import time
import zlib

import numpy as np

_POOL_ROWS = 4096
_BURN_BUFFER = bytes(256 * 1024)


@functools.lru_cache(maxsize=8)
def _pool(dim: int) -> np.ndarray:
    pool = np.random.default_rng(dim).standard_normal((_POOL_ROWS, dim)).astype(np.float32)
    pool.setflags(write=False)
    return pool


class StandInModel:
    """Words are tokens; a text's vector is seeded by the CRC32 of its first ``max_tokens``
    words, so truncation is visible. Per call, ``delay`` seconds of sleep and ``burn`` seconds
    of hashing (one core busy, GIL released, as in a torch or onnx forward pass). With ``gate``,
    each call takes one permit from it before answering: the test decides when calls finish,
    instead of hoping a delay is long enough."""

    def __init__(
        self,
        name: str = "test/stand-in-mini",
        dim: int = 8,
        max_tokens: int = 16,
        *,
        delay: float = 0.0,
        burn: float = 0.0,
        fail_on: str | None = None,
        gate: threading.Semaphore | None = None,
    ) -> None:
        self.name = name
        self.dim = dim
        self.max_tokens = max_tokens
        self.delay = delay
        self.burn = burn
        self.fail_on = fail_on
        self.gate = gate
        self.calls: list[list[str]] = []
        self.threads: set[int] = set()
        self.overlaps = 0
        self.started = threading.Event()  # set when a call starts; tests clear it
        self._busy = threading.Lock()

    def truncate(self, text: str) -> str:
        return " ".join(text.split()[: self.max_tokens])

    def expected(self, texts: list[str]) -> np.ndarray:
        """The rows ``embed`` returns for ``texts``: a pool row picked by the hash, element 0
        set from the hash too (so two texts sharing a pool row still differ). Vectorised, so
        the stand-in itself holds the GIL only briefly."""
        hashes = np.fromiter(
            (zlib.crc32(self.truncate(t).encode("utf-8")) for t in texts),
            dtype=np.uint64,
            count=len(texts),
        )
        out = _pool(self.dim)[(hashes % _POOL_ROWS).astype(np.intp)]
        out[:, 0] = (hashes >> np.uint64(8)).astype(np.float32) / np.float32(16777216.0)
        return out

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Before truncation, as a tokenizer would report; the server clips to max_tokens."""
        return [len(t.split()) for t in texts]

    def embed(self, texts: list[str]) -> np.ndarray:
        if not self._busy.acquire(blocking=False):
            self.overlaps += 1
            self._busy.acquire()
        try:
            self.calls.append(list(texts))
            self.threads.add(threading.get_ident())
            self.started.set()
            if self.gate is not None and not self.gate.acquire(timeout=30):
                raise RuntimeError("stand-in model: no permit to answer within 30 s")
            if self.fail_on is not None and any(self.fail_on in t for t in texts):
                raise RuntimeError(f"stand-in model refuses {self.fail_on!r}")
            if self.delay:
                time.sleep(self.delay)
            if self.burn:
                # hashlib releases the GIL on big buffers: one core busy, like one forward pass
                # thread (numpy's BLAS would take every core of a small CI machine).
                end = time.perf_counter() + self.burn
                while time.perf_counter() < end:
                    hashlib.sha256(_BURN_BUFFER).digest()
            return self.expected(texts)
        finally:
            self._busy.release()
