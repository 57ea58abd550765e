"""The fake server's deterministic answers: each text's vector, and its wire forms ready-made.

Owns :func:`fake_embedding` / :func:`fake_embeddings` (any process can recompute exactly what
the fake sent, so a client can be checked bit for bit), :class:`RowCodec` (every pool row
pre-rendered as JSON text and base64, so a response costs a join, not a dump: the fake is
the load generator of every benchmark) and :func:`approx_tokens`, the fake's token count.

May import: the standard library, numpy, orjson. Pure: no I/O.
"""

from __future__ import annotations

import base64
import functools
import struct
import zlib
from collections.abc import Iterable

import numpy as np
import orjson

__all__ = ["POOL_ROWS", "RowCodec", "approx_tokens", "codec", "fake_embedding", "fake_embeddings"]

POOL_ROWS = 1024
"""Number of distinct base vectors per dimension; texts map onto them by CRC32."""


@functools.lru_cache(maxsize=8)
def _pool(dim: int) -> np.ndarray:
    """Unit-length random rows, seeded by ``dim`` so any process can recompute them."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    pool = np.random.default_rng(dim).standard_normal((POOL_ROWS, dim)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    pool.setflags(write=False)
    return pool


def _first_value(h: int) -> float:
    """Element 0 of a text's vector: 24 bits of its hash, exact in float32, so swapped rows
    that share a pool row are still told apart."""
    return (h >> 8) / 16777216.0


def fake_embedding(text: str, dim: int = 768) -> np.ndarray:
    """The exact float32 vector the fake server returns for ``text``."""
    h = zlib.crc32(text.encode("utf-8"))
    row = _pool(dim)[h % POOL_ROWS].copy()
    row[0] = _first_value(h)
    return row


def fake_embeddings(texts: Iterable[str], dim: int = 768) -> np.ndarray:
    """``fake_embedding`` for many texts at once, shape ``(len(texts), dim)``."""
    hashes = np.fromiter((zlib.crc32(t.encode("utf-8")) for t in texts), dtype=np.uint64)
    out = _pool(dim)[(hashes % POOL_ROWS).astype(np.intp)]
    out[:, 0] = (hashes >> 8).astype(np.float32) / np.float32(16777216.0)
    return out


def approx_tokens(text: str) -> int:
    """The fake's token count of a text (for ``usage``, token limits and length errors)."""
    return len(text) // 4 + 1


class RowCodec:
    """Pre-rendered wire forms of every pool row, so a response costs a join, not a dump.

    Only element 0 differs between texts sharing a pool row, so for JSON we keep the text
    of elements ``1..dim-1`` and for base64 the encoding of bytes ``6..`` (6 is a multiple
    of 3, so base64 of the head and of the tail simply concatenate).
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        pool = _pool(dim)
        raw = pool.astype("<f4").tobytes()
        width = 4 * dim
        self._raw = raw
        self._width = width
        self._b64_tails = [
            base64.b64encode(raw[i * width + 6 : (i + 1) * width]) + b'"' for i in range(POOL_ROWS)
        ]
        tails = [
            b"," + orjson.dumps(pool[i, 1:], option=orjson.OPT_SERIALIZE_NUMPY)[1:]
            if dim > 1
            else b"]"
            for i in range(POOL_ROWS)
        ]
        # orjson writes the shortest float32 text; make sure a JSON parser reading it as a
        # double and casting to float32 gets the same bits, and fall back to the exact
        # double repr for any row where that would not hold.
        if dim > 1:
            parsed = np.array(orjson.loads(b"[" + b",".join(b"[0" + t for t in tails) + b"]"))
            bad = np.flatnonzero((parsed[:, 1:].astype(np.float32) != pool[:, 1:]).any(axis=1))
            for i in bad:
                tails[i] = b"," + ",".join(repr(float(v)) for v in pool[i, 1:]).encode() + b"]"
        self._json_tails = tails

    def json(self, h: int) -> bytes:
        """The JSON array for a text with CRC32 ``h``."""
        return b"[" + repr(_first_value(h)).encode() + self._json_tails[h % POOL_ROWS]

    def b64(self, h: int) -> bytes:
        """The quoted base64 string for a text with CRC32 ``h``."""
        start = (h % POOL_ROWS) * self._width
        head = struct.pack("<f", _first_value(h)) + self._raw[start + 4 : start + 6]
        return b'"' + base64.b64encode(head) + self._b64_tails[h % POOL_ROWS]

    def items(self, texts: list[str], b64: bool) -> list[tuple[int | None, bytes]]:
        """``(index, embedding JSON value)`` for each text, in order."""
        encode = self.b64 if b64 else self.json
        return [(i, encode(zlib.crc32(t.encode("utf-8")))) for i, t in enumerate(texts)]


@functools.lru_cache(maxsize=8)
def codec(dim: int) -> RowCodec:
    """The (cached) codec of one dimension: building one renders 1024 rows."""
    return RowCodec(dim)
