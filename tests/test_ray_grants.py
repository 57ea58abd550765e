"""The shared limiter without Ray: its books (``GrantBook``) on a virtual clock, and a worker's
end of it (``RayLimiter``) against an in-process stand-in for the actor, so that grants,
cancellations and hand-backs happen in an order the test chooses."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from togembed import Feedback, RateLimiter
from togembed.ray.grants import Answer, Grant, GrantBook
from togembed.ray.limiter import RayLimiter


async def turns_until(predicate: Callable[[], object]) -> None:
    """Let the event loop run until ``predicate`` holds (a bounded number of turns)."""
    for _ in range(100):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("not reached")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def book(rpm: float | None = 600, ttl: float = 30.0) -> tuple[GrantBook, Clock]:
    clock = Clock()
    return GrantBook(RateLimiter(rpm=rpm, burst=1.0, clock=clock), ttl, clock), clock


async def test_a_grant_takes_what_the_pace_allows_now() -> None:
    b, _ = book(rpm=600)  # a bucket of 9 requests
    grant = await b.grant("a", [1] * 20)
    assert len(grant.tickets) == 9
    assert not grant.unbounded
    assert grant.seconds_per_request == pytest.approx(60 / (600 * 0.99))
    assert b.in_flight() == 9 == b.stats.in_flight


async def test_an_unknown_limit_is_unbounded_after_the_first_answer() -> None:
    b, _ = book(rpm=None)
    first = await b.grant("a", [1, 1, 1])
    assert len(first.tickets) == 1  # probing: one request until an answer
    b.report("a", [Answer(seq=first.tickets[0].seq, status=200)])
    grant = await b.grant("a", [1] * 10)
    assert len(grant.tickets) == 10
    assert grant.unbounded


async def test_what_one_holder_learns_paces_every_holder() -> None:
    b, _ = book(rpm=None)
    first = await b.grant("a", [1])
    headers = {"x-ratelimit-limit": "10", "x-ratelimit-remaining": "9"}
    b.report("a", [Answer(seq=first.tickets[0].seq, status=200, headers=headers)])
    grant = await b.grant("b", [1] * 20)
    assert b.stats.learned
    assert len(grant.tickets) < 20
    assert not grant.unbounded


async def test_a_silent_holders_tickets_expire_and_its_late_answers_are_ignored() -> None:
    b, clock = book(rpm=6000, ttl=30.0)
    dead = await b.grant("dead", [1, 1, 1])
    clock.now += 20
    alive = await b.grant("alive", [1, 1])
    assert b.stats.in_flight == 5
    clock.now += 15  # "dead" silent for 35 s, "alive" for 15 s
    assert b.expire() == 3
    assert b.stats.in_flight == 2
    assert b.holders() == 1
    late = [Answer(seq=t.seq, status=200) for t in dead.tickets]
    assert b.report("dead", late) == 0
    assert b.stats.in_flight == 2
    assert b.report("alive", [Answer(seq=t.seq, status=200) for t in alive.tickets]) == 2
    assert b.stats.in_flight == 0


async def test_a_report_keeps_its_holder_alive() -> None:
    b, clock = book(rpm=6000, ttl=30.0)
    grant = await b.grant("a", [1, 1])
    clock.now += 25
    b.report("a", [Answer(seq=grant.tickets[0].seq, status=200)])
    clock.now += 25
    assert b.expire() == 0
    assert b.in_flight() == 1


def test_answers_carry_only_rate_limit_headers() -> None:
    from togembed.core.limiter import Ticket

    fb = Feedback(
        status=429,
        headers={"X-RateLimit-Remaining": "0", "Set-Cookie": "secret", "Retry-After": "2"},
        retry_after=2.0,
    )
    answer = Answer.of(Ticket(seq=3, tokens=5, sent_at=0.0), fb)
    assert answer.headers == {"x-ratelimit-remaining": "0", "retry-after": "2"}
    assert answer.feedback().status == 429


# -- a worker's end ---------------------------------------------------------------------------


class _Method:
    def __init__(self, fn: Callable[..., Awaitable[Any]]) -> None:
        self._fn = fn

    def remote(self, *args: Any) -> asyncio.Task[Any]:
        return asyncio.get_running_loop().create_task(self._fn(*args))


class StandInActor:
    """The limiter actor's methods, in this process: ``gate`` holds grants back."""

    def __init__(self, rpm: float | None = 6000) -> None:
        self.book, self.clock = book(rpm=rpm)
        self.gate = asyncio.Event()
        self.gate.set()
        self.asked: list[list[int]] = []
        self.answers: list[Answer] = []
        self.grant = _Method(self._grant)
        self.report = _Method(self._report)
        self.heartbeat = _Method(self._heartbeat)
        self.describe = _Method(self._describe)

    async def _grant(self, holder: str, costs: list[int]) -> Grant:
        self.asked.append(list(costs))
        await self.gate.wait()
        return await self.book.grant(holder, costs)

    async def _report(self, holder: str, answers: list[Answer]) -> int:
        self.answers.extend(answers)
        return self.book.report(holder, answers)

    async def _heartbeat(self, holder: str) -> None:
        self.book.seen(holder)

    async def _describe(self) -> Grant:
        return self.book.describe([])


async def test_one_grant_call_serves_every_waiter() -> None:
    actor = StandInActor()
    limiter = await RayLimiter.open(actor)
    actor.gate.clear()
    waiters = [asyncio.ensure_future(limiter.acquire(1)) for _ in range(5)]
    await asyncio.sleep(0)
    actor.gate.set()
    tickets = await asyncio.gather(*waiters)
    assert len({t.seq for t in tickets}) == 5
    assert limiter.grant_calls == 1
    assert actor.asked == [[1] * 5]
    for t in tickets:
        limiter.release(t, Feedback(status=200))
    await limiter.aclose()
    assert actor.book.stats.in_flight == 0


async def test_a_grant_arriving_after_its_caller_gave_up_goes_back() -> None:
    actor = StandInActor()
    limiter = await RayLimiter.open(actor, lease_seconds=3600)
    actor.gate.clear()
    waiter = asyncio.ensure_future(limiter.acquire(1))
    await turns_until(lambda: actor.asked)
    assert actor.asked == [[1]]
    waiter.cancel()
    actor.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.gather(*limiter._tasks)  # the grant call, answered after the cancellation
    # its permit came back: the next request uses it, no new grant call
    again = limiter.try_acquire(1)
    assert again is not None
    limiter.release(again, Feedback(status=200))
    await limiter.aclose()
    assert actor.book.stats.in_flight == 0
    assert limiter.grant_calls == 1


async def test_permits_unused_are_handed_back_as_never_sent() -> None:
    actor = StandInActor(rpm=None)
    limiter = await RayLimiter.open(actor, prefetch=4, lease_seconds=3600)
    probe = await limiter.acquire(1)
    limiter.release(probe, Feedback(status=200))
    await limiter.flush()
    first = await limiter.acquire(1)  # this grant says: no limit
    limiter.release(first, Feedback(status=200))
    ticket = await limiter.acquire(1)  # so four more come with this one
    assert actor.asked[-1] == [1] * 5
    limiter.release(ticket, Feedback(status=200))
    await limiter.aclose()
    assert sum(1 for a in actor.answers if not a.sent) == 4
    assert actor.book.stats.in_flight == 0


async def test_a_dead_actor_fails_the_waiters() -> None:
    actor = StandInActor()

    async def gone(holder: str, costs: list[int]) -> Grant:
        raise RuntimeError("the limiter actor died")

    actor.grant = _Method(gone)
    limiter = await RayLimiter.open(actor)
    with pytest.raises(RuntimeError, match="died"):
        await limiter.acquire(1)
    await limiter.aclose()


def test_togembed_imports_without_ray_or_redis_and_says_which_extra() -> None:
    """With ray and redis unimportable: ``import togembed`` works, and using togembed.ray or
    RedisLimiter names the extra to install."""
    import subprocess
    import sys

    code = """
import sys
sys.modules["ray"] = None
sys.modules["redis"] = None
import togembed, togembed.ray
assert "ray" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
try:
    togembed.ray.embed_dataset
except ImportError as exc:
    assert "togembed[ray]" in str(exc), exc
else:
    raise AssertionError("no ImportError")
try:
    togembed.RedisLimiter("redis://127.0.0.1:1/0", rpm=60)
except ImportError as exc:
    assert "togembed[redis]" in str(exc), exc
else:
    raise AssertionError("no ImportError")
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


async def test_an_actor_has_at_most_max_in_flight_requests_out() -> None:
    """CappedLimiter: the cap holds across every call of a client; a slot freed goes to the
    next waiter, and one handed to a waiter that gave up is passed on."""
    from togembed.ray.capped import CappedLimiter

    capped = CappedLimiter(RateLimiter(rpm=60_000), max_in_flight=2)
    a, b = await capped.acquire(1), await capped.acquire(1)
    assert capped.try_acquire(1) is None
    third = asyncio.ensure_future(capped.acquire(1))
    fourth = asyncio.ensure_future(capped.acquire(1))
    await turns_until(lambda: len(capped._waiters) == 2)
    capped.release(a, Feedback(status=200))  # its slot goes to the third
    third.cancel()  # ... which gives up before it runs: the slot goes on to the fourth
    with pytest.raises(asyncio.CancelledError):
        await third
    d = await fourth
    assert capped.try_acquire(1) is None
    for ticket in (b, d):
        capped.release(ticket, Feedback(status=200))
    assert capped.try_acquire(1) is not None
