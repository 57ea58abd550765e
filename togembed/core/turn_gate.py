"""A budget of CPU-heavy work per event-loop turn, so answers arriving together never stall
the loop (decoding and copying rows costs 1-5 ms a step)."""

from __future__ import annotations

import asyncio
import time

__all__ = ["TurnGate"]


class TurnGate:
    """Bounds the CPU-heavy work (decoding answers, copying rows: 1-5 ms a step) done in one
    event-loop turn. Answers that arrive together would otherwise be handled back to back —
    16 of them stall the loop for 80 ms. Steps share a budget per turn; once it is spent, the
    next step waits two turns (a task woken by a timer needs two: the timer, then its step)."""

    BUDGET = 0.002  # seconds of heavy work per turn

    def __init__(self) -> None:
        self._spent = 0.0
        self._blocked = False
        self._armed = False
        self._entered = 0.0

    async def __aenter__(self) -> None:
        while self._blocked:
            await asyncio.sleep(0)
        self._entered = time.perf_counter()

    async def __aexit__(self, *exc_info: object) -> None:
        self._spent += time.perf_counter() - self._entered
        loop = asyncio.get_running_loop()
        if self._spent >= self.BUDGET:
            self._spent = 0.0
            self._blocked = True
            loop.call_soon(self._unblock, 2)
        elif not self._armed:
            self._armed = True
            loop.call_soon(self._new_turn)

    def _new_turn(self) -> None:
        self._armed = False
        self._spent = 0.0

    def _unblock(self, turns: int) -> None:
        if turns > 1:
            asyncio.get_running_loop().call_soon(self._unblock, turns - 1)
        else:
            self._blocked = False
