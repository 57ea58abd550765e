"""What the fake server counts: per-request records and totals, served at ``GET /stats``.

Owns :class:`RequestRecord` (one embeddings request: inputs, status, fault, request id,
disconnect, when) and :class:`ServerStats` (totals, status counts, the log).

May import: the standard library, attrs. Pure.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import attrs

__all__ = ["RequestRecord", "ServerStats"]


@attrs.define
class RequestRecord:
    """What one ``POST /v1/embeddings`` asked for and got.

    ``status`` is 0 when no HTTP response was sent (dropped connection, client gone).
    """

    n_inputs: int = 0
    status: int = 0
    fault: str | None = None
    encoding_format: str | None = None
    request_id: str = ""
    disconnected: bool = False
    at: float = 0.0  # seconds since the server's first embeddings request

    def note(self, body: Any) -> int:
        """Note what a decoded request body asked for (whatever its faults); its inputs."""
        if isinstance(body, dict):
            texts = body.get("input")
            self.n_inputs = (
                1 if isinstance(texts, str) else len(texts) if isinstance(texts, list) else 0
            )
            fmt = body.get("encoding_format")
            self.encoding_format = fmt if isinstance(fmt, str) else None
        return self.n_inputs


@attrs.define
class ServerStats:
    """Counters over ``POST /v1/embeddings`` calls since start or ``reset_stats()``."""

    requests: int = 0
    inputs: int = 0
    status_counts: Counter[int] = attrs.field(factory=Counter)
    log: list[RequestRecord] = attrs.field(factory=list)

    def as_dict(self, *, log: bool = False) -> dict[str, Any]:
        """JSON-able form, served at ``GET /stats`` for benchmarks in another process."""
        out: dict[str, Any] = {
            "requests": self.requests,
            "inputs": self.inputs,
            "status_counts": {str(k): v for k, v in sorted(self.status_counts.items())},
        }
        if log:
            out["log"] = [attrs.asdict(r) for r in self.log]
        return out
