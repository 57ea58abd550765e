"""pytest fixtures for testing code that calls Together's embeddings API (loaded automatically
when togembed is installed)::

    def test_my_service_survives_an_outage(fake_together):
        fake_together.faults.extend(["429:retry-after=1", "503", "drop_rst"])
        with togembed.Client(base_url=fake_together.base_url, model="m") as client:
            assert client.embed(["hello"]).shape == (1, 768)

The server runs on its own thread, so the fixtures work in sync tests and under any async test
framework alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .core.retry import backoff_disabled
from .server.fake import FakeTogetherServer
from .testing import serve_in_thread


@pytest.fixture
def fake_together() -> Iterator[FakeTogetherServer]:
    """A fake Together server on 127.0.0.1 with default options (dim 768, no latency)."""
    with serve_in_thread() as server:
        yield server


@pytest.fixture
def fake_together_factory() -> Iterator[Callable[..., FakeTogetherServer]]:
    """``make(**options)`` starts a ``FakeTogetherServer(**options)``; all stop after the test."""
    with contextlib.ExitStack() as stack:

        def make(**options: Any) -> FakeTogetherServer:
            return stack.enter_context(serve_in_thread(**options))

        yield make


@pytest.fixture
def togembed_no_backoff() -> Iterator[None]:
    """Retries happen at once (delays are still computed): fault tests stay fast."""
    with backoff_disabled():
        yield
