"""The shared limiter's Ray actor: one per API key and model, found by name, hosting one
``GrantBook`` (so one pace) for every worker of the cluster. It asks for no CPU (a limiter
that reserved one could starve the pipeline it paces on a small cluster) and Ray restarts it
if its process dies (the pace is then learned again).

May import ray, core and ``grants``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import ray

from ..core.pacer import DEFAULT_BURST_SECONDS, DEFAULT_MAX_PAUSE
from ..core.ratelimit import RateLimiter
from .grants import DEFAULT_TTL, NAMESPACE, Answer, Grant, GrantBook

__all__ = ["NAMESPACE", "DEFAULT_TTL", "LimiterActor", "limiter_name", "get_or_create"]


def limiter_name(base_url: str, api_key: str | None, model: str) -> str:
    """The actor's name for a key and model: a hash, so the key is never stored or shown."""
    digest = hashlib.sha256(f"{base_url}\0{api_key or ''}\0{model}".encode()).hexdigest()
    return f"togembed-limiter-{digest[:20]}"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class LimiterActor:
    """One pace for every holder (see ``grants.GrantBook``)."""

    def __init__(
        self,
        rpm: float | None = None,
        tpm: float | None = None,
        burst: float = DEFAULT_BURST_SECONDS,
        adaptive: bool = True,
        max_pause: float = DEFAULT_MAX_PAUSE,
        ttl: float = DEFAULT_TTL,
    ) -> None:
        limiter = RateLimiter(rpm=rpm, tpm=tpm, burst=burst, adaptive=adaptive, max_pause=max_pause)
        self._book = GrantBook(limiter, ttl, time.monotonic)
        self._reaper: asyncio.Task[None] | None = None

    def _start(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(self._book.ttl / 4)
            self._book.expire()

    async def grant(self, holder: str, costs: list[int]) -> Grant:
        self._start()
        return await self._book.grant(holder, costs)

    async def report(self, holder: str, answers: list[Answer]) -> int:
        self._start()
        return self._book.report(holder, answers)

    async def heartbeat(self, holder: str) -> None:
        self._book.seen(holder)

    async def describe(self) -> Grant:
        return self._book.describe([])

    async def expire(self, older_than: float | None = None) -> int:
        """Give up holders silent for ``older_than`` seconds now (default: the ttl)."""
        return self._book.expire(older_than)

    async def stats(self) -> dict[str, Any]:
        s = self._book.stats
        return {
            "rpm": s.rpm,
            "tpm": s.tpm,
            "learned": s.learned,
            "in_flight": s.in_flight,
            "rate_limited": s.rate_limited,
            "slowdowns": s.slowdowns,
            "holders": self._book.holders(),
            "booked": self._book.in_flight(),
            "expired": self._book.expired,
        }


def get_or_create(name: str, *, detached: bool = False, **settings: Any) -> Any:
    """The named limiter actor, created with ``settings`` if nobody made it yet (the first
    creator's settings win). ``detached``: it outlives its creator (a worker that made it may
    die; the driver's job ending does not end it either)."""
    options: dict[str, Any] = {"name": name, "namespace": NAMESPACE, "get_if_exists": True}
    if detached:
        options["lifetime"] = "detached"
    handle = LimiterActor.options(**options).remote(**settings)
    # Ray ends a named actor when no handle to it is left: this process keeps one, so the
    # limiter lives as long as the process that made it (the driver: the job).
    _HANDLES[name] = handle
    return handle


_HANDLES: dict[str, Any] = {}
