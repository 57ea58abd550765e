"""``CappedLimiter``: at most N requests in flight in one process, across every call that
shares its client. Ray Data may run one or several batches of an actor at once; the cap
keeps what an actor sends the same either way (a client's own ``concurrency`` counts per
call). Wraps any ``Limiter``.

May import core.
"""

from __future__ import annotations

import asyncio
from collections import deque

from ..core.coalesce import expected_wait
from ..core.limiter import Feedback, Limiter, Ticket

__all__ = ["CappedLimiter"]


class CappedLimiter:
    """``inner``'s pace, and no more than ``max_in_flight`` of its tickets out at once."""

    def __init__(self, inner: Limiter, max_in_flight: int) -> None:
        self.inner = inner
        self.max_in_flight = max_in_flight
        self._out = 0  # slots taken: tickets out, and acquires waiting for the inner limiter
        self._waiters: deque[asyncio.Future[None]] = deque()

    def max_batch_tokens(self) -> int | None:
        return self.inner.max_batch_tokens()

    async def acquire(self, tokens: int) -> Ticket:
        if self._out >= self.max_in_flight or self._waiters:
            future = asyncio.get_running_loop().create_future()
            self._waiters.append(future)
            try:
                await future  # a slot was handed over: already counted
            except BaseException:
                if future.done() and not future.cancelled():
                    self._free()  # handed over as we gave up: pass it on
                raise
        else:
            self._out += 1
        try:
            return await self.inner.acquire(tokens)
        except BaseException:
            self._free()
            raise

    def try_acquire(self, tokens: int) -> Ticket | None:
        inner = getattr(self.inner, "try_acquire", None)
        if inner is None or self._out >= self.max_in_flight or self._waiters:
            return None
        ticket: Ticket | None = inner(tokens)
        if ticket is not None:
            self._out += 1
        return ticket

    def expected_wait(self, ahead: int = 0) -> float:
        return expected_wait(self.inner, ahead)

    def release(self, ticket: Ticket, feedback: Feedback) -> None:
        self.inner.release(ticket, feedback)
        self._free()

    def _free(self) -> None:
        """A slot comes free: to the first live waiter (still counted), else back."""
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)
                return
        self._out -= 1
