"""Client-side pacing for one event loop: ``RateLimiter`` sends requests evenly at the
account's rate instead of colliding with it. ``acquire`` waits (FIFO) until the ``Pacer`` says
go, ``release`` feeds back what the server answered. It implements ``Limiter``, the interface a
cross-process or cross-machine limiter implements too (``RedisLimiter``, ``togembed.ray``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

import attrs

from .limiter import Feedback, RateLimiterStats, Ticket
from .pacer import DEFAULT_BURST_SECONDS, DEFAULT_MAX_PAUSE, Pacer
from .retry import backoff_enabled

__all__ = ["RateLimiter"]

logger = logging.getLogger("togembed")


class RateLimiter:
    """Paces requests (and tokens) per minute, evenly, for any number of clients and tasks of
    one process. With no ``rpm``/``tpm`` it learns the limit from the server's headers and
    slows down on 429s (AIMD); with them it holds that pace from the first request.

    ``burst``: seconds of traffic that may go at once (default 1 s, less one request of slack).
    ``adaptive=False``: never learn or slow down; pace exactly as configured.
    ``max_pause``: the longest a 429's wait may hold every request back (a longer wait fails
    the calls that cannot wait instead; a client's own limiter takes its
    ``RetryPolicy.max_retry_after``).
    """

    def __init__(
        self,
        rpm: float | None = None,
        tpm: float | None = None,
        *,
        burst: float = DEFAULT_BURST_SECONDS,
        adaptive: bool = True,
        max_pause: float = DEFAULT_MAX_PAUSE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._pacer = Pacer(
            rpm=rpm, tpm=tpm, burst=burst, adaptive=adaptive, max_pause=max_pause, now=clock()
        )
        self._lock = asyncio.Lock()
        self._waiting = 0  # tasks inside acquire()
        self._wakeup: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        s = self.stats
        return f"<togembed.RateLimiter rpm={s.rpm} tpm={s.tpm} learned={s.learned}>"

    @property
    def stats(self) -> RateLimiterStats:
        return self._pacer.snapshot(self._clock())

    def max_batch_tokens(self) -> int | None:
        return self._pacer.max_cost()

    async def acquire(self, tokens: int) -> Ticket:
        # The lock makes waiters queue in arrival order; the head sleeps for the rest.
        self._waiting += 1
        try:
            async with self._lock:
                while True:
                    wait = self._pacer.wait(self._clock(), tokens)
                    if wait <= 0:
                        return self._pacer.take(self._clock(), tokens)
                    await self._sleep(wait)
        finally:
            self._waiting -= 1

    def try_acquire(self, tokens: int) -> Ticket | None:
        """A ticket at once if the pace allows one now and nobody waits for one, else None.
        None also until an unconfigured limiter's first answer (it probes the limit with one
        request): a cold burst of calls then waits to be merged into that one request."""
        if self._waiting or self._pacer.probing:
            return None
        now = self._clock()
        if self._pacer.wait(now, tokens) > 0:
            return None
        return self._pacer.take(now, tokens)

    def try_add_tokens(self, ticket: Ticket, tokens: int) -> bool:
        """Let an admitted request carry ``tokens`` more if the token budget has them now
        (calls that queued while it waited join it), else False."""
        bucket = self._pacer.tokens
        if bucket is not None:
            bucket.refill(self._clock())
            if bucket.level < tokens:
                return False
            bucket.take(tokens)
        ticket.tokens += tokens
        return True

    def expected_wait(self, ahead: int = 0) -> float:
        """Seconds until a request queued behind those waiting now and ``ahead`` more would be
        admitted at the current pace: an estimate (answers change the pace; a cap on requests
        in flight is not counted)."""
        return self._pacer.expected_wait(self._clock(), self._waiting + ahead + 1)

    def release(self, ticket: Ticket, feedback: Feedback) -> None:
        if feedback.retry_after and not backoff_enabled():  # tests: no waiting on 429s
            feedback = attrs.evolve(feedback, retry_after=None)
        message = self._pacer.release(self._clock(), ticket, feedback)
        if message:
            logger.info("rate limit: %s", message)
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` or until a release changes the picture, whichever comes first."""
        loop = asyncio.get_running_loop()
        self._wakeup = wakeup = loop.create_future()
        handle = None if math.isinf(seconds) else loop.call_later(seconds, _wake, wakeup)
        try:
            await wakeup
        finally:
            if handle is not None:
                handle.cancel()
            self._wakeup = None


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
