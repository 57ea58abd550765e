"""Together's dynamic limits: sporadic 429s below a limit the headers still show as open must
not collapse the pace, a storm must be recovered from within seconds, and no wait may hold the
client longer than the user's cap. Arithmetic on a fake clock, plus one run over loopback."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

import numpy as np
import pytest
from helpers import MakeServer

import togembed
from togembed.core.limit_headers import parse_limit_headers
from togembed.core.limiter import Feedback
from togembed.core.pacer import Pacer
from togembed.testing import fake_embeddings

OK = Feedback(status=200)
MODEL = "BAAI/bge-base-en-v1.5"
DIM = 16

# A 429 from a bucket that still has room (Together: refused on live capacity, not our pace).
SPORADIC = Feedback(
    status=429,
    headers={"x-ratelimit-limit": "10", "x-ratelimit-remaining": "7", "retry-after": "1"},
    retry_after=1.0,
)
# A 429 from an empty bucket: we really are too fast.
EMPTY = Feedback(
    status=429,
    headers={"x-ratelimit-limit": "10", "x-ratelimit-remaining": "0", "retry-after": "1"},
    retry_after=1.0,
)
HEADERS_OK = Feedback(status=200, headers={"x-ratelimit-limit": "10", "x-ratelimit-remaining": "8"})


def test_sporadic_429_below_the_limit_neither_pauses_nor_slows_down() -> None:
    pacer = Pacer(rpm=600)
    before = pacer.requests.rate if pacer.requests else None
    for _ in range(4):  # 1 in 3 refused: sporadic, well under the "they dominate" threshold
        pacer.release(0.0, pacer.take(0.0, 1), SPORADIC)
        pacer.release(0.0, pacer.take(0.0, 1), OK)
        pacer.release(0.0, pacer.take(0.0, 1), OK)
    assert pacer.rate_limited == 4
    assert pacer.slowdowns == 0 and pacer.factor == 1.0 and pacer.cap is None
    assert pacer.paused_until == 0.0
    assert pacer.requests is not None and pacer.requests.rate == before


def test_sporadic_429_with_token_room_is_not_a_token_limit() -> None:
    pacer = Pacer(tpm=60_000)  # 1000 tokens/s
    headers = {"x-tokenlimit-limit": "1000", "x-tokenlimit-remaining": "900", "retry-after": "1"}
    pacer.release(0.0, pacer.take(0.0, 100), Feedback(status=429, headers=headers, retry_after=1))
    assert pacer.slowdowns == 0
    headers["x-tokenlimit-remaining"] = "50"  # less than this request's 100 tokens: too fast
    pacer.release(0.0, pacer.take(0.0, 100), Feedback(status=429, headers=headers, retry_after=1))
    assert pacer.slowdowns == 1


def test_sporadic_429s_that_dominate_do_slow_down() -> None:
    pacer = Pacer(rpm=600)
    for _ in range(5):
        pacer.release(0.0, pacer.take(0.0, 1), SPORADIC)
    assert pacer.slowdowns >= 1 and pacer.factor < 1.0


def test_429_from_an_empty_bucket_pauses_and_cuts() -> None:
    pacer = Pacer(rpm=600)
    pacer.release(0.0, pacer.take(0.0, 1), EMPTY)
    assert pacer.slowdowns == 1 and pacer.factor < 1.0
    assert pacer.wait(0.5, 1) >= 0.5  # paused for the server's second


def test_dynamic_header_variants_win() -> None:
    info = parse_limit_headers(
        {
            "x-ratelimit-limit": "100",
            "x-ratelimit-remaining": "90",
            "x-ratelimit-limit-dynamic": "20",
            "x-ratelimit-remaining-dynamic": "0",
            "x-tokenlimit-limit": "5000",
            "x-tokenlimit-remaining-dynamic": "10",
        }
    )
    assert (info.requests_limit, info.requests_remaining) == (20, 0)
    assert (info.tokens_limit, info.tokens_remaining) == (5000, 10)
    # an empty dynamic bucket behind an open static one is a real limit
    pacer = Pacer()
    headers = {
        "x-ratelimit-limit": "10",
        "x-ratelimit-remaining": "8",
        "x-ratelimit-remaining-dynamic": "0",
        "retry-after": "1",
    }
    pacer.release(0.0, pacer.take(0.0, 1), Feedback(status=429, headers=headers, retry_after=1))
    assert pacer.slowdowns == 1


def run_at_pace(pacer: Pacer, start: float, seconds: float, feedback: Feedback) -> float:
    """Send as fast as the pacer allows from ``start`` for ``seconds`` (answers come back at
    once with ``feedback``); returns the clock at the end."""
    now = start
    while now < start + seconds:
        wait = pacer.wait(now, 1)
        assert wait != math.inf
        now += wait
        pacer.release(now, pacer.take(now, 1), feedback)
    return now


def test_pace_is_back_within_a_few_seconds_after_a_storm() -> None:
    pacer = Pacer()  # nothing configured: learns 10 requests/s from the headers
    now = run_at_pace(pacer, 0.0, 2.0, HEADERS_OK)
    full = pacer.requests.rate if pacer.requests else 0.0
    assert full > 0
    for _ in range(4):  # a storm: four rounds of refusals from an empty bucket
        ticket = pacer.take(now, 1)
        pacer.release(now, ticket, EMPTY)
        now += 1.0
    assert pacer.factor < 0.3
    end = run_at_pace(pacer, now, 3.0, HEADERS_OK)
    assert pacer.factor > 0.9, f"pace at {pacer.factor:.0%} of the limit 3 s after the storm"
    assert pacer.cap is None  # no in-flight cap left once the known pace is back
    assert end > now


def test_after_a_cut_recovery_toward_a_known_limit_is_gradual() -> None:
    pacer = Pacer(rpm=600)
    pacer.release(0.0, pacer.take(0.0, 1), EMPTY)
    cut = pacer.factor
    pacer.release(0.01, pacer.take(0.01, 1), OK)
    assert cut < pacer.factor < 1.0  # not all at once


def test_a_guessed_ceiling_recovers_only_additively() -> None:
    """No limit headers at all: the ceiling is the pace we had when the server objected, so it
    is probed upward slowly, not restored by the clock."""
    pacer = Pacer()
    now = 0.0
    for _ in range(20):  # 10 requests/s, answered without headers
        pacer.release(now, pacer.take(now, 1), OK)
        now += 0.1
    pacer.release(
        now, pacer.take(now, 1), Feedback(status=429, headers={"retry-after": "1"}, retry_after=1)
    )
    assert pacer.guessed and pacer.factor < 1.0
    cut = pacer.factor
    now += 5.0  # a long quiet time, then one success
    pacer.release(now, pacer.take(now, 1), OK)
    assert pacer.factor == pytest.approx(cut + 0.02)


def test_max_pause_bounds_the_pause_of_a_long_retry_after() -> None:
    pacer = Pacer(rpm=600, max_pause=5.0)
    long_wait = Feedback(status=429, headers={"retry-after": "3600"}, retry_after=3600.0)
    pacer.release(0.0, pacer.take(0.0, 1), long_wait)
    assert 0 < pacer.wait(0.0, 1) <= 5.0


def test_client_limiter_takes_the_retry_policys_cap() -> None:
    client = togembed.AsyncClient(
        base_url="http://127.0.0.1:1/v1", retry=togembed.RetryPolicy(max_retry_after=7.0)
    )
    assert isinstance(client.limiter, togembed.RateLimiter)
    assert client.limiter._pacer.max_pause == 7.0


def quiet_seed(rate: float, draws: int, window: int, most: int) -> int:
    """A seed whose first ``draws`` random numbers never put more than ``most`` hits (< rate) in
    any ``window`` consecutive draws: however concurrent answers are reordered, the client never
    sees 5 of 10 answers refused, so a slowdown could only come from treating a sporadic 429 as
    a limit."""
    for seed in range(1000):
        rng = random.Random(seed)
        hits = [rng.random() < rate for _ in range(draws)]
        spread = all(sum(hits[i : i + window]) <= most for i in range(draws - window))
        if sum(hits[:40]) >= 2 and spread:
            return seed
    raise AssertionError("no seed found")


async def test_sporadic_429s_below_the_limit_keep_the_learned_pace(make_server: MakeServer) -> None:
    rate = 0.1
    seed = quiet_seed(rate, draws=200, window=32, most=4)
    # 1000 requests/s with a 1 s burst: this short run never empties the bucket, so every 429
    # is sporadic, sent with headers that show room.
    server = await make_server(rpm=60_000, sporadic_429_rate=rate, seed=seed)
    items = [f"text {i}" for i in range(40 * 8)]
    async with togembed.AsyncClient(base_url=server.base_url, model=MODEL, batch_size=8) as client:
        vectors = await client.embed(items)
    np.testing.assert_array_equal(vectors, fake_embeddings(items, DIM))
    assert server.stats.status_counts.get(429, 0) >= 1  # the noise happened
    stats = client.limiter.stats
    assert stats.slowdowns == 0 and stats.paused_for == 0.0
    assert stats.learned and stats.rpm is not None and stats.rpm > 0.9 * 60_000 * 0.95


async def post(url: str, texts: list[str]) -> tuple[int, Mapping[str, str]]:
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/embeddings", json={"model": MODEL, "input": texts}) as resp,
    ):
        await resp.read()
        return resp.status, resp.headers.copy()  # case-insensitive, like HTTP


async def test_fake_server_sporadic_429s_carry_a_wait_and_headers_with_room(
    make_server: MakeServer,
) -> None:
    server = await make_server(rpm=60_000, sporadic_429_rate=1.0, sporadic_429_wait=0.2)
    status, headers = await post(server.base_url, ["a"])
    assert status == 429
    assert headers["Retry-After"] == "0.2"
    assert float(headers["x-ratelimit-remaining"]) >= 1
    server.sporadic_429_ms = True
    status, headers = await post(server.base_url, ["a"])
    assert status == 429 and headers["retry-after-ms"] == "200"


async def test_fake_server_storm_refuses_with_an_empty_bucket_in_its_window(
    make_server: MakeServer,
) -> None:
    server = await make_server(rpm=60_000, storm=(0.0, 3600.0))
    status, headers = await post(server.base_url, ["a"])
    assert status == 429 and headers["x-ratelimit-remaining"] == "0"
    assert server.stats.log[0].fault == "storm"
    later = await make_server(rpm=60_000, storm=(3600.0, 1.0))  # not yet
    status, _ = await post(later.base_url, ["a"])
    assert status == 200
