"""Retry policy: what is retried, how long we wait, when we stop."""

from __future__ import annotations

import pytest

import togembed
from togembed import RetryPolicy
from togembed._retry import backoff_delay, backoff_disabled, call_with_retries, is_retryable


def status(code: int, **kw) -> togembed.APIStatusError:
    from togembed._exceptions import status_error_class

    return status_error_class(code)(f"HTTP {code}", status_code=code, **kw)


@pytest.mark.parametrize("code", [408, 409, 429, 500, 502, 503, 504, 520, 524, 529])
def test_transient_statuses_are_retried(code: int) -> None:
    assert is_retryable(status(code))


@pytest.mark.parametrize("code", [400, 401, 402, 403, 404, 413, 422])
def test_client_errors_are_not_retried(code: int) -> None:
    assert not is_retryable(status(code))


def test_connection_timeout_and_garbled_answers_are_retried() -> None:
    assert is_retryable(togembed.APIConnectionError("reset"))
    assert is_retryable(togembed.APITimeoutError("slow"))
    assert is_retryable(togembed.APIResponseValidationError("bad json"))
    assert not is_retryable(ValueError("bug"))


def test_out_of_credits_is_not_retried() -> None:
    assert not is_retryable(status(429, error_type="credit_limit"))
    assert is_retryable(status(429, error_type="dynamic_request_limited"))


def test_backoff_grows_exponentially_with_jitter_and_cap() -> None:
    p = RetryPolicy(initial_backoff=0.5, max_backoff=4.0)
    assert [backoff_delay(p, n, None, rand=1.0) for n in range(1, 6)] == [0.5, 1, 2, 4, 4]
    assert [backoff_delay(p, n, None, rand=0.0) for n in range(1, 4)] == [0.25, 0.5, 1.0]


def test_server_hint_replaces_backoff_and_is_capped() -> None:
    p = RetryPolicy(max_retry_after=10.0)
    assert backoff_delay(p, 1, status(429, retry_after=3.0), rand=0.0) == 3.0
    assert backoff_delay(p, 1, status(429, retry_after=3.0), rand=1.0) == pytest.approx(3.3)
    assert backoff_delay(p, 1, status(429, retry_after=999.0), rand=0.0) == 10.0
    assert backoff_delay(p, 1, status(429, retry_after=0.0), rand=0.5) == 0.0


async def test_gives_up_after_max_retries_with_the_last_real_error() -> None:
    calls = 0

    async def fail() -> None:
        nonlocal calls
        calls += 1
        raise status(503)

    with backoff_disabled(), pytest.raises(togembed.InternalServerError):
        await call_with_retries(fail, RetryPolicy(max_retries=3))
    assert calls == 4


async def test_non_retryable_error_raises_at_once() -> None:
    calls = 0

    async def fail() -> None:
        nonlocal calls
        calls += 1
        raise status(401)

    with pytest.raises(togembed.AuthenticationError):
        await call_with_retries(fail, RetryPolicy(max_retries=5))
    assert calls == 1


async def test_total_time_budget_stops_before_a_wait_past_it() -> None:
    calls = 0

    async def fail() -> None:
        nonlocal calls
        calls += 1
        raise status(429, retry_after=50.0)

    with pytest.raises(togembed.RateLimitError):
        await call_with_retries(fail, RetryPolicy(max_retries=10, timeout=20.0))
    assert calls == 1  # the first wait (50 s) would already pass the 20 s budget


async def test_success_after_retries_reports_each_retry() -> None:
    seen: list[tuple[str, float]] = []
    results = iter([togembed.APIConnectionError("drop"), status(429, retry_after=1.5), "ok"])

    async def flaky() -> str:
        r = next(results)
        if isinstance(r, Exception):
            raise r
        return r

    with backoff_disabled():
        out = await call_with_retries(
            flaky, RetryPolicy(), on_retry=lambda e, w: seen.append((type(e).__name__, w))
        )
    assert out == "ok"
    assert [name for name, _ in seen] == ["APIConnectionError", "RateLimitError"]
    assert 1.5 <= seen[1][1] <= 1.65
