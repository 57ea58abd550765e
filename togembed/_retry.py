"""Retry with backoff, the stamina habits without a retry framework: an explicit predicate,
limits on attempts AND total time (the policy's per-batch budget, and the call's own deadline),
the real error re-raised, and a switch that turns waiting off for tests while still computing
(and reporting) every delay.

A plain loop rather than tenacity: a service calls this 1000 times a second, and the loop
leaves no per-call objects behind on the success path (tenacity built ~36 objects of cyclic
garbage per call). It also decides things tenacity cannot see: a server hint longer than the
policy allows ends the call at once, and connection failures have their own retry count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from ._config import RetryPolicy
from ._exceptions import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    ModelNotAvailableError,
)

__all__ = ["backoff_delay", "backoff_disabled", "call_with_retries", "is_retryable"]

logger = logging.getLogger("togembed")
T = TypeVar("T")

RETRY_STATUSES = frozenset({408, 409, 429})
_backoff_enabled = True


@contextlib.contextmanager
def backoff_disabled() -> Iterator[None]:
    """Within this block, retries happen at once (delays are still computed and logged)."""
    global _backoff_enabled
    previous, _backoff_enabled = _backoff_enabled, False
    try:
        yield
    finally:
        _backoff_enabled = previous


def set_backoff_enabled(enabled: bool) -> None:
    """Turn waiting between retries on or off process-wide (tests, notebooks)."""
    global _backoff_enabled
    _backoff_enabled = enabled


def backoff_enabled() -> bool:
    """False inside ``backoff_disabled()``: waits the server asks for are skipped too."""
    return _backoff_enabled


def is_retryable(exc: BaseException) -> bool:
    """Transient failures only: no answer, a garbled 200, 408/409/429 and 5xx.

    A 429 of type ``credit_limit`` means the account is out of credits: waiting will not fix it.
    A ``ModelNotAvailableError`` (even a 503 one) is never retried. A 3xx (a redirect loop) is
    not retried either.
    """
    if isinstance(exc, (APIConnectionError, APIResponseValidationError)):
        return True
    if isinstance(exc, APIStatusError):
        if isinstance(exc, ModelNotAvailableError):
            return False
        if exc.status_code == 429:
            return exc.error_type != "credit_limit"
        return exc.status_code in RETRY_STATUSES or exc.status_code >= 500
    return False


def backoff_delay(
    policy: RetryPolicy, attempt: int, exc: BaseException | None, rand: float | None = None
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    The server's hint wins, capped at ``max_retry_after`` plus up to 10% jitter so that many
    clients told the same moment do not return together. Otherwise
    ``min(initial * 2**(attempt-1), max)`` scaled by a random factor in [0.5, 1] (equal jitter).
    """
    rand = random.random() if rand is None else rand
    hint = exc.retry_after if isinstance(exc, APIStatusError) else None
    if hint is not None:
        hint = min(hint, policy.max_retry_after)
        return hint + hint * 0.1 * rand
    base = min(policy.initial_backoff * 2 ** (attempt - 1), policy.max_backoff)
    return base * (0.5 + 0.5 * rand)


def retry_hint(exc: BaseException) -> float | None:
    """What the server asked us to wait, if it said."""
    return exc.retry_after if isinstance(exc, APIStatusError) else None


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds if _backoff_enabled else 0)


async def call_with_retries(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    describe: str = "request",
    on_retry: Callable[[BaseException, float], None] | None = None,
    deadline: float | None = None,
) -> T:
    """Await ``fn()`` until it succeeds, fails for good, or a limit is reached; then the last
    real error is raised as it is.

    Limits: ``max_retries`` retries (``connect_retries`` for failures to connect), the
    policy's ``timeout`` from the first attempt, and ``deadline`` (``time.monotonic()``
    seconds: the whole call's, when it has one). No wait starts that would end past a time
    limit, and a server hint above ``max_retry_after`` is not waited for at all.
    """
    end = time.monotonic() + policy.timeout
    if deadline is not None and deadline < end:
        end = deadline
    attempt = 0
    connect_failures = 0
    while True:
        attempt += 1
        try:
            return await fn()
        except Exception as exc:
            if not is_retryable(exc) or attempt > policy.max_retries:
                raise
            if isinstance(exc, APIConnectionError) and exc.connect_failed:
                connect_failures += 1
                if connect_failures > policy.max_connect_retries:
                    raise
            hint = retry_hint(exc)
            if hint is not None and hint > policy.max_retry_after:
                raise  # the server wants more than we may wait: say so now, do not freeze
            wait = backoff_delay(policy, attempt, exc)
            if time.monotonic() + wait > end:
                raise
            logger.info("retrying %s in %.2f s after attempt %d: %s", describe, wait, attempt, exc)
            if on_retry is not None:
                on_retry(exc, wait)
        await _sleep(wait)
