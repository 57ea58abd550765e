"""Faults for the Ray tests, shipped to the workers by value (they cannot import tests/)."""

from __future__ import annotations

import os
from typing import Any

from togembed.ray.embedder import Embedder


class DyingEmbedder(Embedder):
    """Dies (the process, at once, as with SIGKILL) after embedding its first batch, once in
    the whole test: the marker file says it happened. Its requests were paid; Ray must run
    the batch again on a restarted actor."""

    def __init__(self, *, die_marker: str, **settings: Any) -> None:
        super().__init__(**settings)
        self.die_marker = die_marker

    async def __call__(self, batch: Any) -> Any:
        out = await super().__call__(batch)
        try:
            fd = os.open(self.die_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return out
        os.close(fd)
        os._exit(1)
