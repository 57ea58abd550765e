"""Retry policy: what is retried, how long we wait, when we stop."""

from __future__ import annotations

import pytest

import togembed
from togembed import RetryPolicy
from togembed.core.retry import backoff_delay, backoff_disabled, call_with_retries, is_retryable


def status(code: int, **kw) -> togembed.APIStatusError:
    from togembed.core.errors import status_error_class

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


async def test_a_hint_beyond_max_retry_after_raises_at_once_with_the_hint() -> None:
    calls = 0

    async def fail() -> None:
        nonlocal calls
        calls += 1
        raise status(429, retry_after=3600.0)

    with pytest.raises(togembed.RateLimitError) as info:
        await call_with_retries(fail, RetryPolicy(max_retry_after=120.0))
    assert calls == 1
    assert info.value.retry_after == 3600.0


async def test_a_hint_at_max_retry_after_is_still_waited_for() -> None:
    seen: list[float] = []
    results = iter([status(503, retry_after=5.0), "ok"])

    async def flaky() -> str:
        r = next(results)
        if isinstance(r, Exception):
            raise r
        return r

    with backoff_disabled():
        out = await call_with_retries(
            flaky, RetryPolicy(max_retry_after=5.0), on_retry=lambda e, w: seen.append(w)
        )
    assert out == "ok" and 5.0 <= seen[0] <= 5.5


async def test_a_deadline_stops_before_a_wait_past_it() -> None:
    import time

    calls = 0

    async def fail() -> None:
        nonlocal calls
        calls += 1
        raise status(503)

    policy = RetryPolicy(initial_backoff=4.0, max_backoff=4.0, max_retries=10)
    with backoff_disabled(), pytest.raises(togembed.InternalServerError):
        await call_with_retries(fail, policy, deadline=time.monotonic() + 1.0)
    assert calls == 1  # the first wait (2-4 s) would end past the deadline


@pytest.mark.parametrize(("connect_retries", "calls_made"), [(0, 1), (2, 3), (None, 5)])
async def test_connect_retries_count_failures_to_connect_only(
    connect_retries: int | None, calls_made: int
) -> None:
    calls = 0

    async def refused() -> None:
        nonlocal calls
        calls += 1
        raise togembed.APIConnectionError("refused", connect_failed=True)

    policy = RetryPolicy(max_retries=4, connect_retries=connect_retries)
    with backoff_disabled(), pytest.raises(togembed.APIConnectionError):
        await call_with_retries(refused, policy)
    assert calls == calls_made


def test_model_not_available_and_redirects_are_never_retried() -> None:
    assert not is_retryable(
        togembed.ModelNotAvailableError("gone", status_code=503, code="model_not_available")
    )
    assert not is_retryable(togembed.TooManyRedirectsError("loop", status_code=308))
    assert not is_retryable(
        togembed.DimensionsNotSupportedError("no", dimensions=8, model_dimensions=32)
    )


def test_the_success_path_leaves_no_cyclic_garbage() -> None:
    """Services call this 1000 times a second: a success must not feed the cyclic GC."""
    import asyncio
    import gc

    async def ok() -> int:
        return 1

    async def many() -> None:
        for _ in range(200):
            await call_with_retries(ok, RetryPolicy())

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(many())  # warm up
        gc.collect()
        gc.disable()
        try:
            before = gc.get_count()[0]
            loop.run_until_complete(many())
            grown = gc.get_count()[0] - before
        finally:
            gc.enable()
    finally:
        loop.close()
    assert grown < 50, f"{grown} container objects left per 200 calls"
