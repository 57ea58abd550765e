"""``RayLimiter``: the ``Limiter`` a worker's client uses to pace itself through the shared
limiter actor. It keeps the cost per request small: one grant call serves every request that
waits in this process at that moment (and, while no limit is known, permits for the next few
ahead); successful answers travel back together every ``report_delay`` seconds (10 ms), a
429 or a failure at once.

A grant is never lost: a permit whose waiter gave up (cancelled, deadline) goes to the next
waiter or into a small pool, and a pooled permit unused after ``lease_seconds`` is handed back
as "never sent". While it holds tickets it tells the actor it is alive, so only a dead
process's tickets expire.

May import ray, core and this subpackage's ``grants`` and ``limiter_actor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections import deque
from typing import Any

from ..core.limiter import Feedback, Ticket
from .grants import DEFAULT_TTL, NAMESPACE, Answer, Grant

__all__ = ["RayLimiter"]

_MAX_ASK = 64  # permits asked for in one grant call


class _Waiter:
    __slots__ = ("future", "tokens")

    def __init__(self, future: asyncio.Future[Ticket], tokens: int) -> None:
        self.future = future
        self.tokens = tokens


class RayLimiter:
    """This process's end of a shared limiter actor (``actor``: its handle)."""

    def __init__(
        self,
        actor: Any,
        *,
        prefetch: int = 32,
        lease_seconds: float = 0.5,
        report_delay: float = 0.01,
        heartbeat: float = DEFAULT_TTL / 3,
    ) -> None:
        self._actor = actor
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.prefetch = prefetch
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat
        self._pool: deque[tuple[Ticket, float]] = deque()
        self._waiters: deque[_Waiter] = deque()
        self._fetching = False
        self._answers: list[Answer] = []
        self._flushing = False
        self._urgent = False
        self.report_delay = report_delay
        self._out = 0  # tickets handed to requests and not yet answered
        self._last_call = 0.0
        self._info: Grant | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pulse: asyncio.Task[None] | None = None
        self._closed = False
        self.grant_calls = 0  # remote calls made for permits (the limiter's cost, for stats)

    @classmethod
    def connect(cls, name: str, **kwargs: Any) -> RayLimiter:
        """The named limiter actor's end in this process (the actor must exist)."""
        import ray

        actor = ray.get_actor(name, namespace=NAMESPACE)
        limiter = cls(actor, **kwargs)
        limiter._info = ray.get(actor.describe.remote())
        return limiter

    @classmethod
    async def open(cls, actor: Any, **kwargs: Any) -> RayLimiter:
        """This process's end of ``actor`` (a limiter actor's handle), from async code."""
        limiter = cls(actor, **kwargs)
        limiter._info = await actor.describe.remote()
        return limiter

    def __repr__(self) -> str:
        return f"<togembed.ray.RayLimiter holder={self.holder!r}>"

    # -- the Limiter protocol ---------------------------------------------------------------

    def max_batch_tokens(self) -> int | None:
        return self._info.max_batch_tokens if self._info is not None else None

    def try_acquire(self, tokens: int) -> Ticket | None:
        """A permit this process already holds, if nobody here waits for one."""
        if self._live_waiters():
            return None
        ticket = self._from_pool()
        if ticket is not None:
            self._out += 1
        return ticket

    async def acquire(self, tokens: int) -> Ticket:
        ticket = self.try_acquire(tokens)
        if ticket is not None:
            return ticket
        if self._closed:
            raise RuntimeError("this RayLimiter is closed")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), tokens)
        self._waiters.append(waiter)
        self._fetch()
        try:
            ticket = await waiter.future
        except asyncio.CancelledError:
            fut = waiter.future
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._give(fut.result())  # granted as its caller gave up: it goes back
            raise
        self._out += 1
        return ticket

    def expected_wait(self, ahead: int = 0) -> float:
        info = self._info
        if info is None:
            return 0.0
        queued = len(self._waiters) + ahead
        return info.expected_wait + queued * info.seconds_per_request

    def release(self, ticket: Ticket, feedback: Feedback) -> None:
        self._out = max(0, self._out - 1)
        self._answers.append(Answer.of(ticket, feedback))
        urgent = feedback.status is None or feedback.status >= 300 or not self._info
        if urgent or len(self._answers) >= _MAX_ASK:
            self._flush_soon()
        elif not self._flushing:
            # Successes travel together, a few milliseconds later: one message, not one each.
            self._flushing = True
            asyncio.get_running_loop().call_later(self.report_delay, self._flush)

    async def flush(self) -> None:
        """Send the answers reported so far and wait until the actor has them."""
        self._flush()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        """Hand back the permits held and send the last answers."""
        self._closed = True
        while self._pool:
            ticket, _ = self._pool.popleft()
            self._answers.append(Answer(seq=ticket.seq, status=None, sent=False))
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.cancel()
        if self._pulse is not None:
            self._pulse.cancel()
        if self._answers:
            answers, self._answers = self._answers, []
            await self._actor.report.remote(self.holder, answers)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- permits ----------------------------------------------------------------------------

    def _live_waiters(self) -> int:
        while self._waiters and self._waiters[0].future.done():
            self._waiters.popleft()
        return sum(1 for w in self._waiters if not w.future.done())

    def _from_pool(self) -> Ticket | None:
        now = asyncio.get_running_loop().time()
        while self._pool:
            ticket, expires = self._pool.popleft()
            if expires > now:
                return ticket
            self._hand_back(ticket)
        return None

    def _give(self, ticket: Ticket) -> None:
        """A permit to the next live waiter, else into the pool for a while."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(ticket)
                return
        loop = asyncio.get_running_loop()
        self._pool.append((ticket, loop.time() + self.lease_seconds))
        loop.call_later(self.lease_seconds, self._return_expired)

    def _return_expired(self) -> None:
        now = asyncio.get_running_loop().time()
        keep: deque[tuple[Ticket, float]] = deque()
        for ticket, expires in self._pool:
            if expires > now:
                keep.append((ticket, expires))
            else:
                self._hand_back(ticket)
        self._pool = keep

    def _hand_back(self, ticket: Ticket) -> None:
        self._answers.append(Answer(seq=ticket.seq, status=None, sent=False))
        self._flush_soon()

    def _flush_soon(self) -> None:
        """Report at the end of this event-loop turn (a 429 paces everyone: no delay)."""
        if not self._urgent:
            self._urgent = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _fetch(self) -> None:
        if self._fetching or self._closed or not self._live_waiters():
            return
        self._fetching = True
        self._spawn(self._grant())

    async def _grant(self) -> None:
        try:
            costs = [w.tokens for w in self._waiters if not w.future.done()][:_MAX_ASK]
            if not costs:
                return
            if self._info is not None and self._info.unbounded and self.prefetch:
                costs += [costs[-1]] * self.prefetch
            self.grant_calls += 1
            self._touch()
            grant: Grant = await self._actor.grant.remote(self.holder, costs[:_MAX_ASK])
            self._info = grant
            for ticket in grant.tickets:
                self._give(ticket)
        except Exception as exc:  # the actor is gone: the requests waiting cannot be paced
            for waiter in self._waiters:
                if not waiter.future.done():
                    waiter.future.set_exception(exc)
            self._waiters.clear()
        finally:
            self._fetching = False
        self._fetch()
        self._start_pulse()

    def _flush(self) -> None:
        self._flushing = self._urgent = False
        if not self._answers:
            return
        answers, self._answers = self._answers, []
        self._touch()
        ref = self._actor.report.remote(self.holder, answers)
        self._spawn(_settle(ref))

    # -- staying alive ----------------------------------------------------------------------

    def _touch(self) -> None:
        self._last_call = asyncio.get_running_loop().time()

    def _start_pulse(self) -> None:
        if self._pulse is None and not self._closed:
            self._pulse = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        """While requests are out, say so often enough that the actor never gives them up."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            if self._out and loop.time() - self._last_call >= self.heartbeat_seconds:
                self._touch()
                self._spawn(_settle(self._actor.heartbeat.remote(self.holder)))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _settle(ref: Any) -> None:
    """Await a fire-and-forget call (its failure is not the caller's: the actor restarts)."""
    with contextlib.suppress(Exception):
        await ref
