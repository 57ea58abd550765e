"""Helpers shared by the end-to-end test modules."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from togembed.testing import FakeTogetherServer

MakeServer = Callable[..., Awaitable[FakeTogetherServer]]


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds (generous:
    only a bug gets near it, not a busy machine)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)
