"""End to end: the rate limiter against a FakeTogetherServer that enforces token buckets, over
real HTTP on loopback. Every test checks that the call completes with every row right and in
order, and bounds the 429s it cost. Rates are high (50-100 requests/s) so the suite stays fast;
retry waits are off (conftest), so the limiter's pacing is the only thing that keeps 429s away.

The tests that bound how long pacing takes run on a virtual clock shared by the limiter and the
server's buckets (``virtual_clock``): it moves only when the limiter waits, by what it waits, so
"near the ideal time" is a property of the limiter's schedule, not of how busy the machine is.
"""

from __future__ import annotations

import asyncio
import math
import time
import types
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import numpy as np
import pytest
from helpers import MakeServer

import togembed
import togembed.server.fake.backend
from togembed.testing import FakeTogetherServer, fake_embeddings

T = TypeVar("T")

MODEL = "BAAI/bge-base-en-v1.5"
DIM = 16


def texts(n: int, prefix: str = "text", width: int = 0) -> list[str]:
    """``n`` distinct texts, each padded to at least ``width`` characters."""
    return [f"{prefix} number {i} ".ljust(width, "x") for i in range(n)]


def server_tokens(text: str) -> int:
    """How the fake server counts a text's tokens (and the client estimates ASCII)."""
    return len(text) // 4 + 1


def assert_rows(arr: np.ndarray, items: list[str]) -> None:
    assert arr.dtype == np.float32
    assert arr.shape == (len(items), DIM)
    np.testing.assert_array_equal(arr, fake_embeddings(items, DIM))


def client_for(server: FakeTogetherServer, **kwargs: Any) -> togembed.AsyncClient:
    kwargs.setdefault("model", MODEL)
    return togembed.AsyncClient(base_url=server.base_url, **kwargs)


def count(server: FakeTogetherServer, status: int) -> int:
    return server.stats.status_counts.get(status, 0)


async def within(coro: Awaitable[T], seconds: float = 10.0) -> T:
    """A guard: a limiter that stalls fails the test in seconds, not minutes."""
    try:
        return await asyncio.wait_for(coro, seconds)
    except asyncio.TimeoutError:
        raise AssertionError(f"not done after {seconds:.1f} s") from None


def limiter_of(client: togembed.AsyncClient) -> togembed.RateLimiter:
    assert isinstance(client.limiter, togembed.RateLimiter)
    return client.limiter


class VirtualClock:
    """Seconds that pass only when a :class:`VirtualTimeLimiter` waits."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class VirtualTimeLimiter(togembed.RateLimiter):
    """A RateLimiter on ``clock`` whose paced waits take no real time: each moves the clock on
    by what the limiter asked for. A wait for a release (no end) is a real one, as always."""

    def __init__(self, clock: VirtualClock, rpm: float | None = None, tpm: float | None = None):
        super().__init__(rpm=rpm, tpm=tpm, clock=clock)
        self._virtual = clock

    async def _sleep(self, seconds: float) -> None:
        if math.isinf(seconds):
            await super()._sleep(seconds)
            return
        self._virtual.now += max(seconds, 1e-9)  # always forward, even by a rounding error
        await asyncio.sleep(0)


@pytest.fixture
def virtual_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[VirtualClock]:
    """The clock of the servers made after it (their token buckets) and of the limiters given
    it: rates are then measured by both sides in the same, virtual, seconds."""
    clock = VirtualClock()
    fake_time = types.SimpleNamespace(**{**vars(time), "monotonic": clock})
    monkeypatch.setattr(togembed.server.fake.backend, "time", fake_time)
    yield clock


# ---------------------------------------------------------------------------------------------
# Configured pace


async def test_configured_rpm_equal_to_the_servers_paces_without_429s_near_ideal_time(
    make_server: MakeServer, virtual_clock: VirtualClock
) -> None:
    rpm, n_requests, batch = 6000, 200, 5  # 100 requests/s, a 1 s burst of 100
    server = await make_server(rpm=rpm)
    items = texts(n_requests * batch)
    limiter = VirtualTimeLimiter(virtual_clock, rpm=rpm)
    async with client_for(server, limiter=limiter, batch_size=batch) as client:
        start = virtual_clock()
        arr = await within(client.embed(items))
        elapsed = virtual_clock() - start
    assert_rows(arr, items)
    limited = count(server, 429)
    assert limited <= 0.02 * n_requests, f"{limited} 429s in {server.stats.requests} requests"
    assert count(server, 200) == n_requests
    rate = rpm / 60
    ideal = (n_requests - rate * 1.0) / rate  # the burst goes at once, the rest at the rate
    assert elapsed <= 1.5 * ideal + 0.3, f"took {elapsed:.2f} s, ideal {ideal:.2f} s"
    # and it really paced: sending all 200 at once would take no (virtual) time at all
    assert elapsed >= 0.9 * ideal, f"took {elapsed:.2f} s, ideal {ideal:.2f} s"


async def test_nothing_configured_learns_the_limit_from_headers(
    make_server: MakeServer, virtual_clock: VirtualClock
) -> None:
    rpm, n_requests, batch = 3000, 100, 5  # 50 requests/s
    server = await make_server(rpm=rpm)
    items = texts(n_requests * batch)
    limiter = VirtualTimeLimiter(virtual_clock)
    async with client_for(server, limiter=limiter, batch_size=batch) as client:
        start = virtual_clock()
        arr = await within(client.embed(items))
        elapsed = virtual_clock() - start
    assert_rows(arr, items)
    limited = count(server, 429)
    assert limited <= 0.10 * n_requests, f"{limited} 429s in {server.stats.requests} requests"
    stats = limiter_of(client).stats
    assert stats.learned is True
    assert stats.rpm is not None
    assert 0.6 * rpm <= stats.rpm <= rpm, f"learned {stats.rpm:.0f} requests/min of {rpm}"
    ideal = (n_requests - rpm / 60) / (rpm / 60)
    assert elapsed <= 1.5 * ideal + 0.5, f"took {elapsed:.2f} s, ideal {ideal:.2f} s"


async def test_token_limited_server_batches_are_cut_to_the_learned_token_bucket(
    make_server: MakeServer, virtual_clock: VirtualClock
) -> None:
    """20,000 tokens/s with a 1 s burst, texts of 101 tokens, batch_size=250 (25,250 tokens,
    more than the bucket holds). Nothing configured: the first answer teaches the token limit,
    and every request after that first one must fit the bucket (<= 198 texts)."""
    tps = 20_000
    server = await make_server(tpm=tps * 60)
    items = texts(500, width=400)
    per_text = server_tokens(items[0])
    assert per_text == 101
    total = per_text * len(items)
    ideal = (total - tps) / tps  # 1.5 s
    limiter = VirtualTimeLimiter(virtual_clock)
    async with client_for(server, limiter=limiter, batch_size=250) as client:
        start = virtual_clock()
        arr = await within(client.embed(items))
        elapsed = virtual_clock() - start
    assert_rows(arr, items)
    log = server.stats.log
    sizes = [(r.n_inputs, r.status) for r in log]
    stats = limiter_of(client).stats
    limited = count(server, 429)
    assert limited <= 0.10 * len(log), f"{limited} 429s: (inputs, status) {sizes}, {stats}"
    assert stats.learned and stats.tpm is not None
    assert 0.6 * tps * 60 <= stats.tpm <= tps * 60, f"learned {stats.tpm:.0f} tokens/min"
    capacity_texts = tps // per_text
    assert all(n <= capacity_texts for n, _ in sizes[1:]), f"(inputs, status) {sizes}"
    assert elapsed <= 1.5 * ideal + 0.5, f"took {elapsed:.2f} s, ideal {ideal:.2f} s, {sizes}"


async def test_learned_token_limit_keeps_its_unit_when_the_first_batch_nearly_drains_it(
    make_server: MakeServer, virtual_clock: VirtualClock
) -> None:
    """Together's ``x-tokenlimit-limit`` is per second. A first batch that leaves little in the
    bucket (here 19,493 of 20,000 tokens: remaining ~507) must not make the limiter read the
    limit as per minute, 60x too slow."""
    tps = 20_000
    server = await make_server(tpm=tps * 60)
    items = texts(393, width=400)  # 101 tokens each; first batch 193 texts = 19,493 tokens
    ideal = (server_tokens(items[0]) * len(items) - tps) / tps  # ~1 s
    limiter = VirtualTimeLimiter(virtual_clock)
    async with client_for(server, limiter=limiter, batch_size=193) as client:
        start = virtual_clock()
        arr = await within(client.embed(items))
        elapsed = virtual_clock() - start
    assert_rows(arr, items)
    stats = limiter_of(client).stats
    assert stats.tpm is not None
    assert 0.6 * tps * 60 <= stats.tpm <= tps * 60, f"learned {stats.tpm:.0f} tokens/min"
    assert elapsed <= 1.5 * ideal + 0.5, f"took {elapsed:.2f} s, ideal {ideal:.2f} s"


async def test_token_limited_server_with_tpm_configured_never_sends_an_oversize_batch(
    make_server: MakeServer, virtual_clock: VirtualClock
) -> None:
    tps = 20_000
    server = await make_server(tpm=tps * 60)
    items = texts(400, width=400)
    per_text = server_tokens(items[0])
    ideal = (per_text * len(items) - tps) / tps  # ~1 s
    limiter = VirtualTimeLimiter(virtual_clock, tpm=tps * 60)
    async with client_for(server, limiter=limiter, batch_size=400) as client:
        start = virtual_clock()
        arr = await within(client.embed(items))
        elapsed = virtual_clock() - start
    assert_rows(arr, items)
    log = server.stats.log
    sizes = [r.n_inputs for r in log]
    assert all(n * per_text <= tps for n in sizes), sizes
    assert count(server, 429) <= 0.02 * len(log), sizes
    assert elapsed <= 1.5 * ideal + 0.3, f"took {elapsed:.2f} s, ideal {ideal:.2f} s"


async def test_two_clients_sharing_one_limiter_stay_under_the_servers_rpm(
    make_server: MakeServer, virtual_clock: VirtualClock
) -> None:
    rpm, batch = 6000, 5
    server = await make_server(rpm=rpm)
    limiter = VirtualTimeLimiter(virtual_clock, rpm=rpm)
    a_items, b_items = texts(500, "a"), texts(500, "b")
    async with (
        client_for(server, limiter=limiter, batch_size=batch) as a,
        client_for(server, limiter=limiter, batch_size=batch) as b,
    ):
        start = virtual_clock()
        a_arr, b_arr = await within(asyncio.gather(a.embed(a_items), b.embed(b_items)))
        elapsed = virtual_clock() - start
    assert_rows(a_arr, a_items)
    assert_rows(b_arr, b_items)
    n_requests = 200
    limited = count(server, 429)
    assert count(server, 200) == n_requests
    assert limited <= 0.02 * n_requests, f"{limited} 429s in {server.stats.requests} requests"
    assert a.stats.requests + b.stats.requests == server.stats.requests
    assert limiter.stats.in_flight == 0
    rate = rpm / 60
    ideal = (n_requests - rate) / rate
    assert elapsed <= 1.5 * ideal + 0.3, f"took {elapsed:.2f} s, ideal {ideal:.2f} s"


async def test_two_clients_each_with_the_full_rpm_get_429s_that_a_shared_limiter_avoids(
    make_server: MakeServer,
) -> None:
    """The contrast that makes the shared limiter worth having: two separately paced clients
    open with two bursts into one bucket, and the adaptive limiters must absorb the 429s
    (slow down, and still finish)."""
    rpm, batch, per_client = 3000, 5, 50  # 50 requests/s, a burst of 50; each client's is 49
    server = await make_server(rpm=rpm)
    a_items, b_items = texts(per_client * batch, "a"), texts(per_client * batch, "b")
    async with (
        client_for(server, rpm=rpm, batch_size=batch) as a,
        client_for(server, rpm=rpm, batch_size=batch) as b,
    ):
        a_arr, b_arr = await within(asyncio.gather(a.embed(a_items), b.embed(b_items)))
    assert_rows(a_arr, a_items)
    assert_rows(b_arr, b_items)
    assert count(server, 200) == 2 * per_client
    limited = count(server, 429)
    assert limited >= 1  # the scenario happened
    assert limiter_of(a).stats.slowdowns + limiter_of(b).stats.slowdowns >= 1
    # Two bursts of 49 into a bucket of 50 could cost ~50 429s; the server's "remaining"
    # headers, which each limiter trusts, and the cut pace keep it well under that (~16 seen).
    assert limited <= 40, f"{limited} 429s in {server.stats.requests} requests"


# ---------------------------------------------------------------------------------------------
# What slows the limiter down, and what does not


async def test_bare_429s_without_headers_are_retried_without_slowing_down(
    make_server: MakeServer,
) -> None:
    server = await make_server(bare_429_rate=0.1, seed=1)
    items = texts(600)
    async with client_for(server, batch_size=10) as client:
        arr = await within(client.embed(items))
    assert_rows(arr, items)
    limited = count(server, 429)
    assert limited >= 1  # the scenario happened
    assert count(server, 200) == 60
    stats = limiter_of(client).stats
    assert stats.rate_limited == limited == client.stats.rate_limited
    # One window of 10 answers with 5 bare 429s is possible but rare at a 10% rate.
    assert stats.slowdowns <= 1, stats
    assert stats.rpm is None and stats.learned is False, stats


async def test_a_503_storm_does_not_cut_the_rate_but_a_429_with_headers_does(
    make_server: MakeServer,
) -> None:
    server = await make_server()
    server.faults.extend(["503"] * 12)
    items = texts(200)
    async with client_for(server, batch_size=10) as client:
        arr = await within(client.embed(items))
        assert_rows(arr, items)
        stats = limiter_of(client).stats
        assert count(server, 503) == 12 == client.stats.server_errors
        assert stats.slowdowns == 0, stats
        assert stats.rpm is None and stats.max_in_flight is None, stats

        server.faults.append("429:retry-after=1")
        arr = await within(client.embed(items))
        assert_rows(arr, items)
        stats = limiter_of(client).stats
        assert stats.slowdowns == 1, stats
        assert stats.rate_limited == 1
        assert stats.max_in_flight is not None  # the in-flight cap is what a 429 can cut here


async def test_429s_from_the_servers_bucket_cut_a_configured_rate_set_too_high(
    make_server: MakeServer,
) -> None:
    """rpm configured at twice the server's: the 429s (with headers) must slow the client
    down so the job still finishes with a bounded number of 429s."""
    rpm, n_requests, batch = 3000, 80, 5
    server = await make_server(rpm=rpm)
    items = texts(n_requests * batch)
    async with client_for(server, rpm=2 * rpm, batch_size=batch) as client:
        arr = await within(client.embed(items))
    assert_rows(arr, items)
    stats = limiter_of(client).stats
    assert stats.slowdowns >= 1
    limited = count(server, 429)
    # 100 requests/s into a 50/s bucket: without slowing down ~half of everything after the
    # burst would be refused.
    assert limited <= 0.2 * n_requests, f"{limited} 429s in {server.stats.requests} requests"


# ---------------------------------------------------------------------------------------------
# Failures stay proportional to batches


async def test_a_rate_limited_batch_that_fails_is_not_fanned_out_into_single_texts(
    make_server: MakeServer,
) -> None:
    """An unpaced client (adaptive=False, no limits) bursts into a 10 requests/s server with
    few retries: the call fails with RateLimitError, and the request count stays O(batches)
    with every request carrying a full batch (a 429 is never bisected)."""
    server = await make_server(rpm=600, burst=0.5)
    batch, n_batches, max_retries = 10, 60, 1
    items = texts(batch * n_batches)
    unpaced = togembed.RateLimiter(adaptive=False)
    async with client_for(
        server, limiter=unpaced, batch_size=batch, max_retries=max_retries, concurrency=16
    ) as client:
        with pytest.raises(togembed.RateLimitError):
            await within(client.embed(items))
    sizes = [r.n_inputs for r in server.stats.log]
    assert set(sizes) == {batch}, sizes
    assert len(sizes) <= n_batches * (max_retries + 1)
    assert client.stats.batches_split == 0
    assert client.stats.in_flight == 0
    assert unpaced.stats.in_flight == 0


async def test_a_failed_batch_under_an_adaptive_limiter_is_not_fanned_out(
    make_server: MakeServer,
) -> None:
    """Scripted 429s with headers until one batch runs out of retries: the adaptive limiter
    slows down, the call fails, and no batch was split."""
    server = await make_server()
    batch, n_batches, max_retries = 10, 20, 2
    server.faults.extend(["429:retry-after=1"] * 40)
    items = texts(batch * n_batches)
    async with client_for(server, batch_size=batch, max_retries=max_retries) as client:
        with pytest.raises(togembed.RateLimitError):
            await within(client.embed(items))
    sizes = [r.n_inputs for r in server.stats.log]
    assert set(sizes) == {batch}, sizes
    assert len(sizes) <= n_batches * (max_retries + 1)
    assert client.stats.batches_split == 0
    assert limiter_of(client).stats.in_flight == 0


# ---------------------------------------------------------------------------------------------
# Counters


async def test_client_stats_agree_with_the_servers(make_server: MakeServer) -> None:
    server = await make_server(rpm=3000, fault_rate_5xx=0.05, seed=3)
    server.faults.extend(["429:retry-after=1", "503"])
    items = texts(400, width=40)
    async with client_for(server, batch_size=5) as client:
        arr = await within(client.embed(items))
        assert client.stats.in_flight == 0
    assert_rows(arr, items)
    s, srv = client.stats, server.stats
    n_batches = math.ceil(len(items) / 5)
    assert s.requests == srv.requests
    assert s.rate_limited == count(server, 429) >= 1
    assert s.server_errors == sum(n for st, n in srv.status_counts.items() if st >= 500) >= 1
    assert s.retries == s.requests - n_batches
    assert count(server, 200) == n_batches
    assert s.inputs == len(items)
    assert s.tokens == sum(server_tokens(t) for t in items) == s.estimated_tokens
    assert s.in_flight == 0
    lim = limiter_of(client).stats
    assert lim.in_flight == 0
    assert lim.rate_limited == s.rate_limited


# ---------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize("kwargs", [{"rpm": 600}, {"tpm": 60_000}, {"rpm": 600, "tpm": 60_000}])
async def test_rpm_or_tpm_together_with_a_limiter_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="limiter"):
        togembed.AsyncClient(
            base_url="http://127.0.0.1:1/v1", limiter=togembed.RateLimiter(), **kwargs
        )


async def test_each_client_gets_its_own_limiter_unless_given_one() -> None:
    a = togembed.AsyncClient(base_url="http://127.0.0.1:1/v1", rpm=600)
    b = togembed.AsyncClient(base_url="http://127.0.0.1:1/v1", rpm=600)
    shared = togembed.RateLimiter(rpm=600)
    c = togembed.AsyncClient(base_url="http://127.0.0.1:1/v1", limiter=shared)
    try:
        assert a.limiter is not b.limiter
        assert c.limiter is shared
        assert limiter_of(a).stats.rpm == pytest.approx(600 * 0.99)
    finally:
        for client in (a, b, c):
            await client.close()
