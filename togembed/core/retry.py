"""Retry with backoff: tenacity, wrapped and never leaked (the stamina habit).

An explicit predicate, limits on attempts AND total time (the policy's per-batch budget, and
the call's own deadline), the real error re-raised, and a switch that turns waiting off for
tests while still computing (and reporting) every delay. Beyond tenacity's stock conditions:
a server hint longer than the policy allows ends the call at once, and failures to connect
have their own retry count.

The first attempt runs before any of tenacity's machinery is built: a service calls this 1000
times a second, and a retry controller per call left ~36 objects of cyclic garbage behind on
the success path. Only a failure pays for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import tenacity

from .config import RetryPolicy
from .errors import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    DeadlineExceededError,
    ModelNotAvailableError,
)

__all__ = [
    "backoff_delay",
    "backoff_disabled",
    "call_with_retries",
    "is_retryable",
    "retry_failed",
]

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
    not retried either, nor a call whose deadline passes before it can be sent.
    """
    if isinstance(exc, DeadlineExceededError):
        return False
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
    started = time.monotonic()
    try:
        return await fn()  # the success path: no retry machinery at all
    except Exception as exc:
        first = exc
    return await retry_failed(
        fn, first, policy, started=started, describe=describe, on_retry=on_retry, deadline=deadline
    )


async def retry_failed(
    fn: Callable[[], Awaitable[T]],
    first: Exception,
    policy: RetryPolicy,
    *,
    started: float,
    describe: str = "request",
    on_retry: Callable[[BaseException, float], None] | None = None,
    deadline: float | None = None,
) -> T:
    """``call_with_retries`` after a first attempt (begun at ``started``) failed with
    ``first``: for a caller that makes its first attempt itself, so that its success path
    builds nothing at all (not even the closure ``fn`` would be)."""
    end = started + policy.timeout
    if deadline is not None and deadline < end:
        end = deadline
    if not is_retryable(first) or policy.max_retries == 0:
        raise first
    return await _retry(fn, first, policy, end, describe, on_retry)


async def _retry(
    fn: Callable[[], Awaitable[T]],
    first: Exception,
    policy: RetryPolicy,
    end: float,
    describe: str,
    on_retry: Callable[[BaseException, float], None] | None,
) -> T:
    """The attempts after a failed first one, under tenacity; ``first`` is replayed as
    tenacity's attempt 1 so that its counts, waits and logs start from it."""
    pending = [first]
    connect_failures = 0

    async def attempt() -> T:
        if pending:
            raise pending.pop()
        return await fn()

    def worth_retrying(exc: BaseException) -> bool:
        nonlocal connect_failures
        if not is_retryable(exc):
            return False
        if isinstance(exc, APIConnectionError) and exc.connect_failed:
            connect_failures += 1
            if connect_failures > policy.max_connect_retries:
                return False
        hint = retry_hint(exc)
        # the server wants more than we may wait: say so now, do not freeze
        return hint is None or hint <= policy.max_retry_after

    def wait(state: tenacity.RetryCallState) -> float:
        return backoff_delay(policy, state.attempt_number, _error_of(state))

    def past_end(state: tenacity.RetryCallState) -> bool:
        return time.monotonic() + (state.upcoming_sleep or 0.0) > end

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = _error_of(state)
        pause = state.upcoming_sleep or 0.0
        logger.info(
            "retrying %s in %.2f s after attempt %d: %s", describe, pause, state.attempt_number, exc
        )
        if on_retry is not None and exc is not None:
            on_retry(exc, pause)

    retrying = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(policy.max_retries + 1) | past_end,
        wait=wait,
        retry=tenacity.retry_if_exception(worth_retrying),
        sleep=_sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
    return await retrying(attempt)


def _error_of(state: tenacity.RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome is not None else None
