"""A fault-injecting fake of Together AI's embeddings API (``togembed.testing``'s server).

Why it exists: retries, batching and ordering bugs only show up when the server misbehaves,
and the real API misbehaves rarely and unpredictably. This server answers exactly like
Together (same JSON shapes, statuses and headers) with *deterministic* vectors, so a client
can check bit-for-bit that every row landed in the right place, while tests script faults
(429s, 5xx, dropped connections, truncated or reordered bodies) request by request.

Use it in-process (``async with FakeTogetherServer() as server``) or as a separate process
for benchmarks::

    python -m togembed.server.fake --port 0 --latency 0.02   # prints "READY <base_url>"

Modules, each importing only those listed before it (and ``togembed.server``'s ``protocol``
and ``app``): ``vectors`` (deterministic vectors, pre-rendered rows), ``faults`` (fault specs),
``limits`` (input limits, token buckets), ``stats`` (counters, request log), ``wire`` (faults
as answers), ``control`` (the ``/stats`` and ``/faults`` routes; the server only as a type),
``backend`` (:class:`FakeTogetherServer`, the backend of ``togembed.server.app``), ``cli``
(the command).
"""

from __future__ import annotations

from .backend import DEFAULT_MODELS, FakeTogetherServer
from .cli import main
from .faults import FAULT_KINDS, Fault, FaultQueue
from .stats import RequestRecord, ServerStats
from .vectors import POOL_ROWS, fake_embedding, fake_embeddings

__all__ = [
    "DEFAULT_MODELS",
    "FAULT_KINDS",
    "POOL_ROWS",
    "Fault",
    "FakeTogetherServer",
    "FaultQueue",
    "RequestRecord",
    "ServerStats",
    "fake_embedding",
    "fake_embeddings",
    "main",
]
