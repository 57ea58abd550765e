"""The limiter's arithmetic on a fake clock: pacing, learning from headers, slowing down."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest

from togembed.core.limit_headers import has_rate_signal, parse_limit_headers
from togembed.core.limiter import Feedback
from togembed.core.pacer import Pacer
from togembed.core.ratelimit import RateLimiter

OK = Feedback(status=200)


def drive(pacer: Pacer, n: int, tokens: int = 1, latency: float = 0.0) -> list[float]:
    """Admit ``n`` requests one after another as early as the pacer allows; send times."""
    now, times = 0.0, []
    for _ in range(n):
        wait = pacer.wait(now, tokens)
        assert wait != math.inf
        now += wait
        ticket = pacer.take(now, tokens)
        times.append(now)
        pacer.release(now + latency, ticket, OK)
    return times


def test_configured_rpm_spends_burst_then_paces_evenly() -> None:
    pacer = Pacer(rpm=300)  # 5/s, 1 s burst less one request of slack
    times = drive(pacer, 40)
    assert times[:4] == [0.0] * 4
    gaps = [b - a for a, b in itertools.pairwise(times[4:])]
    assert all(gap == pytest.approx(1 / (5 * 0.99)) for gap in gaps)
    ideal = (40 - 5) / 5
    assert times[-1] / ideal < 1.05


def test_configured_tpm_charges_estimated_tokens_and_corrects_with_actual() -> None:
    pacer = Pacer(tpm=6000)  # 100 tokens/s, capacity 100
    assert pacer.max_cost() == 100
    assert pacer.wait(0.0, 60) == 0
    ticket = pacer.take(0.0, 60)
    # the server counted 90 tokens, not 60: the bucket is charged the difference
    pacer.release(0.0, ticket, Feedback(status=200, tokens=90))
    assert pacer.tokens is not None and pacer.tokens.level == pytest.approx(10)
    assert pacer.wait(0.0, 60) == pytest.approx(50 / 99)


def test_cost_above_capacity_waits_for_a_full_bucket_then_goes_into_debt() -> None:
    pacer = Pacer(tpm=600)  # 10 tokens/s, capacity 10
    assert pacer.wait(0.0, 50) == 0
    pacer.take(0.0, 50)
    assert pacer.wait(0.0, 5) == pytest.approx(45 / 9.9)


def test_an_admitted_request_may_carry_more_tokens_only_while_the_bucket_has_them() -> None:
    """``try_add_tokens``: calls that queued while a request waited join it only with tokens
    the bucket holds now; the ticket then carries them (release reconciles with them)."""
    now = [0.0]
    limiter = RateLimiter(tpm=6000, clock=lambda: now[0])  # capacity 100 tokens
    ticket = limiter.try_acquire(60)
    assert ticket is not None
    assert not limiter.try_add_tokens(ticket, 41)  # 40 left
    assert limiter.try_add_tokens(ticket, 40)
    assert ticket.tokens == 100
    assert not limiter.try_add_tokens(ticket, 1)
    limiter.release(ticket, Feedback(status=200, tokens=100))  # counted as charged: no debt
    now[0] = 0.5  # 49.5 tokens back
    assert limiter.try_acquire(49) is not None


def test_try_add_tokens_is_free_without_a_token_limit() -> None:
    limiter = RateLimiter(rpm=600)
    ticket = limiter.try_acquire(10)
    assert ticket is not None
    assert limiter.try_add_tokens(ticket, 10**6)
    assert ticket.tokens == 10**6 + 10


def test_unconfigured_probes_with_one_request_until_the_first_answer() -> None:
    pacer = Pacer()
    ticket = pacer.take(0.0, 10)
    assert pacer.wait(0.0, 10) == math.inf
    pacer.release(0.02, ticket, OK)
    assert pacer.wait(0.02, 10) == 0
    assert pacer.requests is None  # no headers: nothing to pace by


def test_learns_together_per_second_headers_and_syncs_remaining() -> None:
    pacer = Pacer()
    ticket = pacer.take(0.0, 10)
    headers = {"x-ratelimit-limit": "5", "x-ratelimit-remaining": "4"}
    assert pacer.release(0.02, ticket, Feedback(status=200, headers=headers))
    assert pacer.learned and pacer.req_ceiling == 5
    assert pacer.requests is not None and pacer.requests.level == 4
    times = [pacer.take(0.02, 1).sent_at for _ in range(4)]
    assert times == [0.02] * 4
    assert pacer.wait(0.02, 1) == pytest.approx(1 / (5 * 0.95))


@pytest.mark.parametrize(
    ("headers", "rps", "tps"),
    [
        ({"x-ratelimit-limit": "10", "x-ratelimit-remaining": "9"}, 10, None),
        ({"x-ratelimit-limit": "300", "x-ratelimit-remaining": "4"}, 5, None),  # per minute
        ({"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "599"}, 10, None),
        ({"x-tokenlimit-limit": "1000", "x-tokenlimit-remaining": "900"}, None, 1000),
        ({"x-ratelimit-limit-tokens": "60000", "x-ratelimit-remaining-tokens": "1"}, None, 1000),
        ({"x-ratelimit-limit": "banana"}, None, None),
        ({}, None, None),
    ],
)
def test_parse_limit_headers(headers: dict[str, str], rps: float, tps: float) -> None:
    info = parse_limit_headers(headers)
    assert info.requests_per_s == (pytest.approx(rps) if rps else None)
    assert info.tokens_per_s == (pytest.approx(tps) if tps else None)


def test_rate_signal_needs_a_header() -> None:
    assert has_rate_signal({"retry-after": "1"})
    assert has_rate_signal({"x-ratelimit-remaining": "0", "x-ratelimit-limit": "5"})
    assert not has_rate_signal({"content-type": "application/json"})


def test_429_with_retry_after_pauses_and_cuts_rate_and_in_flight_once_per_round() -> None:
    pacer = Pacer(rpm=600)
    tickets = [pacer.take(0.0, 1) for _ in range(8)]
    limited = Feedback(status=429, headers={"retry-after": "2"}, retry_after=2.0)
    msg = pacer.release(0.1, tickets[0], limited)
    assert msg and "slowing down" in msg
    assert pacer.wait(0.1, 1) == math.inf or pacer.wait(0.1, 1) >= 1.9
    assert pacer.factor == pytest.approx(0.7)
    # the other 429s of the same round were sent before the cut: no further cut
    for t in tickets[1:4]:
        pacer.release(0.1, t, limited)
    assert pacer.factor == pytest.approx(0.7) and pacer.slowdowns == 1
    for t in tickets[4:]:
        pacer.release(0.2, t, OK)
    assert pacer.wait(2.2, 1) < math.inf


def test_bare_429s_are_transient_unless_they_dominate() -> None:
    pacer = Pacer()
    bare = Feedback(status=429)
    for _ in range(4):
        pacer.release(0.0, pacer.take(0.0, 1), bare)
        pacer.release(0.0, pacer.take(0.0, 1), OK)
    assert pacer.slowdowns == 0 and pacer.rate_limited == 4
    for _ in range(5):
        pacer.release(0.0, pacer.take(0.0, 1), bare)
    assert pacer.slowdowns >= 1


def test_recovers_gradually_after_a_cut() -> None:
    pacer = Pacer(rpm=600)
    ticket = pacer.take(0.0, 1)
    pacer.release(0.0, ticket, Feedback(status=429, headers={"retry-after": "1"}, retry_after=1))
    assert pacer.factor < 1
    for _ in range(10):
        pacer.release(0.0, pacer.take(0.0, 1), OK)
    assert 0.7 < pacer.factor < 1
    for _ in range(20):
        pacer.release(0.0, pacer.take(0.0, 1), OK)
    assert pacer.factor == 1.0


def test_503_does_not_slow_down() -> None:
    pacer = Pacer(rpm=600)
    pacer.release(0.0, pacer.take(0.0, 1), Feedback(status=503))
    assert pacer.factor == 1.0 and pacer.slowdowns == 0


def test_not_adaptive_never_changes_pace() -> None:
    pacer = Pacer(rpm=600, adaptive=False)
    pacer.release(0.0, pacer.take(0.0, 1), Feedback(status=429, headers={"retry-after": "1"}))
    assert pacer.factor == 1.0


@pytest.mark.parametrize("kwargs", [{"rpm": 0}, {"tpm": -1}, {"burst": 0}])
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Pacer(**kwargs)


async def test_rate_limiter_admits_in_order_at_the_configured_pace() -> None:
    limiter = RateLimiter(rpm=6000, burst=0.05)  # 100/s, burst of 5 less one
    loop = asyncio.get_running_loop()
    start = loop.time()
    order: list[int] = []

    async def one(i: int) -> None:
        ticket = await limiter.acquire(1)
        order.append(i)
        limiter.release(ticket, OK)

    await asyncio.gather(*(one(i) for i in range(24)))
    elapsed = loop.time() - start
    assert order == list(range(24))
    assert elapsed >= (24 - 4) / 100 * 0.95


async def test_rate_limiter_wakes_waiter_on_release_when_probing() -> None:
    limiter = RateLimiter()
    first = await limiter.acquire(1)
    second = asyncio.ensure_future(limiter.acquire(1))
    await asyncio.sleep(0.01)
    assert not second.done()
    limiter.release(first, OK)
    ticket = await asyncio.wait_for(second, 1)
    limiter.release(ticket, OK)
    assert limiter.stats.in_flight == 0


def test_retry_after_zero_is_not_a_slow_down_signal() -> None:
    pacer = Pacer()
    pacer.release(0.0, pacer.take(0.0, 1), Feedback(status=429, headers={"retry-after": "0"}))
    assert pacer.slowdowns == 0 and pacer.rate_limited == 1
