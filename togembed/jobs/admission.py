"""The bound on what a kill can cost: texts handed to the stream whose answer is not yet durable
(committed, or recorded as a failure) stay at most ``concurrency x batch size``.

The stream asks before each batch (``room_for``); each commit tells how many of its rows were
answers (``confirm``). So a kill at any instant loses at most that many paid inputs, whether
they are in flight or answered and not yet committed: commits slower than the server make the
job wait instead of piling up answers in memory.

May import: the standard library.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

__all__ = ["Admission"]


class Admission:
    """At most ``limit`` texts sent and not yet durable. ``drain`` waits for the writer's
    commits, and raises the error of one that failed."""

    def __init__(self, limit: int, drain: Callable[[], Awaitable[None]]) -> None:
        self.unconfirmed = 0
        self.limit = limit
        self._drain = drain
        self._confirmed = asyncio.Event()
        self._commit_failed = False

    def confirm(self, answers: int | None) -> None:
        """``answers`` sent texts are recorded for good; None: a commit failed."""
        if answers is None:
            self._commit_failed = True
        else:
            self.unconfirmed -= answers
        self._confirmed.set()

    async def room_for(self, n: int) -> None:
        """Wait until ``n`` more texts may be sent (the stream asks before each batch), then
        count them as unconfirmed."""
        while self.unconfirmed and self.unconfirmed + n > self.limit:
            if self._commit_failed:  # no room will come: the job stops with the commit's error
                await self._drain()
            self._confirmed.clear()
            await self._confirmed.wait()
        self.unconfirmed += n
