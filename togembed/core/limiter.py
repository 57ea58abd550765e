"""The limiter interface the client paces its requests through, and the values that cross it.

Pure values and a ``Protocol``: ``RateLimiter`` (this process), ``RedisLimiter`` (processes that
share a Redis) and the Ray limiter implement it; the client only ever calls these three methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import attrs

__all__ = ["Feedback", "Limiter", "RateLimiterStats", "Ticket"]


@attrs.define
class Ticket:
    """One admitted request: handed back to ``release`` with what happened."""

    seq: int
    tokens: int
    sent_at: float


@attrs.frozen
class Feedback:
    """What the server answered to a ticket's request (``status`` None: no answer)."""

    status: int | None
    headers: Mapping[str, str] = attrs.field(factory=dict)
    tokens: int | None = None  # actual tokens, from the response's usage
    retry_after: float | None = None
    sent: bool = True  # False: the request was never sent (its costs are refunded)


@attrs.frozen
class RateLimiterStats:
    """A snapshot for logs and progress bars: why is my job slow?"""

    rpm: float | None  # current pace in requests/min (None: not limited)
    tpm: float | None  # current pace in tokens/min (None: not limited)
    learned: bool  # limits come from the server's headers
    in_flight: int
    max_in_flight: int | None  # adaptive cap (None: no cap beyond the client's concurrency)
    rate_limited: int  # 429s seen
    slowdowns: int  # times the pace was cut
    paused_for: float  # seconds until requests may go again after a 429


@runtime_checkable
class Limiter(Protocol):
    """What the client asks before each request and tells after it. Implement this to share a
    limit across processes or machines (e.g. backed by Redis)."""

    async def acquire(self, tokens: int) -> Ticket:
        """Wait until a request carrying ``tokens`` estimated tokens may be sent."""
        ...

    def release(self, ticket: Ticket, feedback: Feedback) -> None:
        """Report the answer (or its absence) to the request admitted by ``ticket``."""
        ...

    def max_batch_tokens(self) -> int | None:
        """The largest token cost one request should have, if the limiter needs one."""
        ...
