"""Reading ahead of the sending: the records still to do, read, hashed and (with ``--cache``)
looked up in the cache a couple of blocks before their texts are sent, so a request slot that
frees up finds its texts ready instead of waiting for a read, or for a cache lookup queued
behind a commit and its fsyncs.

May import: the standard library, attrs, numpy; ``cache``, ``readers``, ``textindex``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import attrs
import numpy as np

from .cache import VectorCache
from .readers import RecordBlock
from .textindex import text_hash

__all__ = ["Block", "BlockQueue", "drop_unread", "read_ahead"]


@attrs.frozen(eq=False)
class Block:
    """Records read ahead (``texts[k]`` at ``positions[k]`` with ``ids[k]``), with their text
    hashes, and with ``--cache`` their cache keys and the future of their cache lookup."""

    positions: list[int]
    ids: list[str]
    texts: list[str]
    hashes: list[bytes]
    keys: list[bytes] | None
    cached: asyncio.Future[dict[bytes, np.ndarray]] | None


# Blocks read ahead; then None at the end, or the error reading raised.
BlockQueue = asyncio.Queue[Block | BaseException | None]


async def read_ahead(
    blocks: Callable[[], Iterable[RecordBlock]],
    done: np.ndarray,
    failed: set[int],
    queue: BlockQueue,
    *,
    cache: VectorCache | None,
    cache_key: Callable[[str], bytes],
    submit: Callable[..., asyncio.Future[dict[bytes, np.ndarray]]],
) -> None:
    """Read, hash and (in the cache) look up blocks of the records still to do into ``queue``
    (then None, or the error reading raised): the event loop does it while it would wait for
    answers. ``blocks`` reads the input; ``submit`` runs a cache lookup in the writer thread."""
    try:
        for block in blocks():
            start, stop = block.start, block.start + len(block.ids)
            if done[start:stop].any() or failed:  # a resumed job: keep what is left
                keep = [
                    k
                    for k in range(stop - start)
                    if not done[start + k] and start + k not in failed
                ]
                positions = [start + k for k in keep]
                ids = [block.ids[k] for k in keep]
                texts = [block.texts[k] for k in keep]
            else:
                positions, ids, texts = list(range(start, stop)), block.ids, block.texts
            if not texts:
                continue
            hashes = [text_hash(t) for t in texts]
            keys = cached = None
            if cache is not None:
                keys = [cache_key(t) for t in texts]
                cached = submit(cache.get_many, keys)
            await queue.put(Block(positions, ids, texts, hashes, keys, cached))
    except Exception as exc:  # e.g. a bad record: raised where the texts reach it
        await queue.put(exc)
    else:
        await queue.put(None)


def drop_unread(queue: BlockQueue) -> None:
    """Cancel the cache lookups of blocks no one will read."""
    while not queue.empty():
        item = queue.get_nowait()
        if isinstance(item, Block) and item.cached is not None:
            if item.cached.done() and not item.cached.cancelled():
                item.cached.exception()  # retrieved: no "never retrieved" warning
            item.cached.cancel()
