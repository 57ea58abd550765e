"""Test helpers: a fault-injecting fake Together server and a switch that turns retry waits off.

from togembed.testing import FakeTogetherServer, backoff_disabled
"""

from __future__ import annotations

from ._fakeserver import FakeTogetherServer, Fault, fake_embedding, fake_embeddings
from ._retry import backoff_disabled, set_backoff_enabled

__all__ = [
    "Fault",
    "FakeTogetherServer",
    "backoff_disabled",
    "fake_embedding",
    "fake_embeddings",
    "set_backoff_enabled",
]
