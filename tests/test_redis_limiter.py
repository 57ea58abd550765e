"""RedisLimiter against a real redis-server (started by the ``redis_url`` fixture): the bucket
and what is learned live in Redis, so every limiter with the same name shares them. Two
``RedisLimiter`` objects with their own connections stand for two processes.

Bucket tests use rates so slow (one request per 100 s) that no refill can happen while a
test runs: what they assert does not depend on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
from helpers import MakeServer

import togembed
import togembed.testing
from togembed import Feedback, RedisLimiter
from togembed.testing import fake_embeddings

MODEL = "BAAI/bge-base-en-v1.5"
DIM = 16
SLOW_RPM = 0.6  # 0.01 requests/s
BIG_BURST = 1000.0  # seconds: a bucket of 0.01 * 1000 - 1 = 9 requests

MakeLimiter = Callable[..., RedisLimiter]


@pytest.fixture
async def make_limiter(redis_url: str) -> AsyncIterator[MakeLimiter]:
    """Limiters on a limit of this test's own (a fresh name), closed at the end."""
    name = f"test-{uuid.uuid4().hex}"
    made: list[RedisLimiter] = []

    def make(**kwargs: object) -> RedisLimiter:
        kwargs.setdefault("name", name)
        limiter = RedisLimiter(redis_url, **kwargs)  # type: ignore[arg-type]
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.aclose()


def test_exported_and_a_limiter() -> None:
    assert "RedisLimiter" in togembed.__all__
    assert isinstance(RedisLimiter("redis://127.0.0.1:1/0", rpm=60), togembed.Limiter)


def test_url_or_client_exactly_one() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        RedisLimiter()
    with pytest.raises(ValueError, match="rpm must be > 0"):
        RedisLimiter("redis://127.0.0.1:1/0", rpm=0)


def test_default_name_hides_the_key() -> None:
    limiter = RedisLimiter("redis://127.0.0.1:1/0", rpm=60, api_key="sk-secret-key-123")
    assert "secret" not in limiter.key
    same = RedisLimiter("redis://127.0.0.1:1/0", rpm=60, api_key="sk-secret-key-123")
    other = RedisLimiter("redis://127.0.0.1:1/0", rpm=60, api_key="sk-other-key-456")
    assert limiter.key == same.key != other.key


async def test_one_bucket_for_every_process(make_limiter: MakeLimiter) -> None:
    a = make_limiter(rpm=SLOW_RPM, burst=BIG_BURST)
    b = make_limiter(rpm=SLOW_RPM, burst=BIG_BURST)
    got = [await a.poll(1) for _ in range(5)] + [await b.poll(1) for _ in range(4)]
    assert all(t is not None for t in got)
    assert await a.poll(1) is None
    assert await b.poll(1) is None
    assert b.expected_wait() > 0


async def test_a_request_never_sent_gives_its_place_back(make_limiter: MakeLimiter) -> None:
    a = make_limiter(rpm=SLOW_RPM, burst=BIG_BURST)
    b = make_limiter(rpm=SLOW_RPM, burst=BIG_BURST)
    tickets = [await a.poll(1) for _ in range(9)]
    assert await b.poll(1) is None
    assert tickets[0] is not None
    a.release(tickets[0], Feedback(status=None, sent=False))
    await a.flush()
    assert await b.poll(1) is not None
    assert await b.poll(1) is None


async def test_token_bucket_and_batch_budget(make_limiter: MakeLimiter) -> None:
    a = make_limiter(tpm=0.6, burst=10_000.0)  # 100 tokens, refilled at 0.01 tokens/s
    assert a.max_batch_tokens() == 100
    assert await a.poll(60) is not None
    assert await a.poll(60) is None
    assert await a.poll(30) is not None
    assert await a.poll(20) is None


async def test_a_429_pauses_and_slows_every_process(make_limiter: MakeLimiter) -> None:
    a = make_limiter(rpm=6000)
    b = make_limiter(rpm=6000)
    ticket = await a.poll(1)
    assert ticket is not None
    assert await b.poll(1) is not None
    headers = {"x-ratelimit-limit": "100", "x-ratelimit-remaining": "0"}
    togembed.testing.set_backoff_enabled(True)  # the 429's wait counts (tests skip waits)
    try:
        a.release(ticket, Feedback(status=429, headers=headers, retry_after=100.0))
        await a.flush()
    finally:
        togembed.testing.set_backoff_enabled(False)
    assert await b.poll(1) is None  # paused for 100 s
    state = await b.state()
    assert float(state["factor"]) == pytest.approx(0.7)
    assert float(state["paused_until"]) > ticket.sent_at + 99


async def test_unconfigured_probes_once_then_shares_what_it_learned(
    make_limiter: MakeLimiter, make_server: MakeServer
) -> None:
    server = await make_server(rpm=600, burst=1.0)
    a = make_limiter()
    b = make_limiter()
    probe = await a.poll(1)
    assert probe is not None
    assert await b.poll(1) is None  # one probe at a time, across processes
    a.release(probe, Feedback(status=None, sent=False))  # the probe never went
    await a.flush()
    async with togembed.AsyncClient(base_url=server.base_url, model=MODEL, limiter=a) as client:
        assert (await client.embed(["hello"])).shape == (1, DIM)
    await a.flush()
    state = await b.state()
    assert float(state["rps"]) == pytest.approx(10.0)  # 600/min, from the server's headers
    assert state["probed"] == "1"
    assert await b.poll(1) is not None  # paced now, no longer probing


async def test_no_limit_headers_means_no_pacing_after_the_probe(
    make_limiter: MakeLimiter, make_server: MakeServer
) -> None:
    server = await make_server(limit_headers=False)
    a = make_limiter()
    async with togembed.AsyncClient(base_url=server.base_url, model=MODEL, limiter=a) as client:
        await client.embed(["one"])
    await a.flush()
    b = make_limiter()
    assert all([await b.poll(1) for _ in range(50)])


async def test_processes_sharing_redis_share_the_servers_limit(
    make_limiter: MakeLimiter, make_server: MakeServer
) -> None:
    """Two clients (as two processes would) with limiters on one Redis limit, against a server
    limited to the same rate: every row right; 429s only from timing jitter. Each client alone
    at that rate would send twice the limit."""
    server = await make_server(rpm=3000, burst=1.0)
    texts = [[f"client {c} text {i}" for i in range(60)] for c in range(2)]
    clients = [
        togembed.AsyncClient(
            base_url=server.base_url,
            model=MODEL,
            limiter=make_limiter(rpm=3000),
            batch_size=1,
            concurrency=8,
        )
        for _ in range(2)
    ]
    try:
        arrays = await asyncio.gather(*(c.embed(t) for c, t in zip(clients, texts, strict=True)))
    finally:
        for client in clients:
            await client.close()
    for arr, items in zip(arrays, texts, strict=True):
        np.testing.assert_array_equal(arr, fake_embeddings(items, DIM))
    assert server.stats.status_counts.get(429, 0) <= 12  # <= 10 % of 120 requests
