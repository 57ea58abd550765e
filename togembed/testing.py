"""Test helpers: a fault-injecting fake Together server, and a switch that turns retry waits off.

    from togembed.testing import FakeTogetherServer, backoff_disabled, serve_in_thread

With pytest, the fixtures ``fake_together`` and ``fake_together_factory`` (see
``togembed.pytest_plugin``, loaded automatically) give a running server per test.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from .core.retry import backoff_disabled, set_backoff_enabled
from .server.fake import FakeTogetherServer, Fault, fake_embedding, fake_embeddings

__all__ = [
    "Fault",
    "FakeTogetherServer",
    "backoff_disabled",
    "fake_embedding",
    "fake_embeddings",
    "serve_in_thread",
    "set_backoff_enabled",
]


@contextlib.contextmanager
def serve_in_thread(**options: Any) -> Iterator[FakeTogetherServer]:
    """A started ``FakeTogetherServer(**options)`` on its own event-loop thread, so that sync
    code, any async framework, or another process can use ``server.base_url``. Script faults
    with ``server.faults.extend([...])`` and read ``server.stats`` from the test."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="togembed-fake-server", daemon=True)
    thread.start()
    server = FakeTogetherServer(**options)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
        yield server
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
