"""Retry with backoff: tenacity, wrapped and never leaked (the stamina habit).

Explicit predicate, limits on attempts AND total time, the real error re-raised, and a switch
that turns waiting off for tests while still computing (and reporting) every delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import tenacity

from ._config import RetryPolicy
from ._exceptions import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
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
    """
    if isinstance(exc, (APIConnectionError, APIResponseValidationError)):
        return True
    if isinstance(exc, APIStatusError):
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


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds if _backoff_enabled else 0)


def _log_retry(describe: str) -> Callable[[tenacity.RetryCallState], None]:
    def log(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        logger.info(
            "retrying %s in %.2f s after attempt %d: %s",
            describe,
            wait,
            state.attempt_number,
            exc,
        )

    return log


async def call_with_retries(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    describe: str = "request",
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> T:
    """Await ``fn()`` until it succeeds, fails for good, or the policy's limits are reached; then
    the last real error is raised (never tenacity's ``RetryError``)."""
    log = _log_retry(describe)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        log(state)
        if on_retry is not None and state.outcome is not None:
            exc = state.outcome.exception()
            if exc is not None:
                on_retry(exc, state.next_action.sleep if state.next_action else 0.0)

    retrying = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(policy.max_retries + 1)
        | tenacity.stop_before_delay(policy.timeout),
        wait=lambda state: backoff_delay(
            policy, state.attempt_number, state.outcome.exception() if state.outcome else None
        ),
        retry=tenacity.retry_if_exception(is_retryable),
        sleep=_sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
    return await retrying(fn)
