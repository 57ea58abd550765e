"""What an ``Embedder`` is told (its constructor arguments, which Ray keeps in the object
store: so never the API key, which each worker reads from its own environment) and how a
worker turns that into a client and a limiter. No ray at import time.

May import core and api.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import attrs

from ..core.config import (
    API_KEY_ENV,
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    resolve_base_url,
)

__all__ = ["EmbedSettings", "Pacing"]

Pacing = Literal["shared", "per-worker", "redis"]
# Requests in flight per actor, whatever number of batches Ray Data runs in it at once.
DEFAULT_MAX_IN_FLIGHT = 16


@attrs.frozen(kw_only=True)
class EmbedSettings:
    """An embedding step's settings, as every worker sees them.

    ``pacing``: "shared" (default) one limiter actor per key and model paces every worker;
    "per-worker" each worker paces alone (a cluster of N then goes N times the limit: for
    comparisons); "redis" a ``RedisLimiter`` at ``redis_url``.
    """

    model: str
    text_column: str = "text"
    output_column: str = "embedding"
    errors: Literal["raise", "collect"] = "raise"
    error_column: str | None = None  # collect mode; default "<output_column>_error"
    id_column: str | None = None  # names rows in errors
    base_url: str | None = None
    api_key_env: str = API_KEY_ENV
    rpm: float | None = None
    tpm: float | None = None
    pacing: Pacing = "shared"
    limiter_name: str | None = None  # the shared limiter actor (default: from key and model)
    redis_url: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT  # requests in flight per actor
    max_retries: int = DEFAULT_MAX_RETRIES
    timeout: float = DEFAULT_TIMEOUT
    dimensions: int | None = None
    client_options: dict[str, Any] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if not (isinstance(self.max_in_flight, int) and self.max_in_flight >= 1):
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight!r}")
        if self.errors not in ("raise", "collect"):
            raise ValueError(f"errors must be 'raise' or 'collect', not {self.errors!r}")
        if self.pacing not in ("shared", "per-worker", "redis"):
            raise ValueError(
                f"pacing must be 'shared', 'per-worker' or 'redis', not {self.pacing!r}"
            )
        if self.pacing == "redis" and not self.redis_url:
            raise ValueError("pacing='redis' needs redis_url=")
        if "api_key" in self.client_options:
            raise ValueError(
                "no api_key in the settings: Ray stores them where any worker can read them. "
                f"Set ${self.api_key_env} in the workers' environment instead"
            )
        for name in ("limiter", "session", "transport", "rpm", "tpm"):
            if name in self.client_options:
                raise ValueError(f"{name!r} cannot be a client option here")

    @property
    def errors_column(self) -> str:
        return self.error_column or f"{self.output_column}_error"

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None

    def resolved_base_url(self) -> str:
        return resolve_base_url(self.base_url)

    def client_kwargs(self) -> dict[str, Any]:
        """The worker's ``AsyncClient`` arguments, less the limiter."""
        return {
            "api_key": self.api_key(),
            "base_url": self.base_url,
            "model": self.model,
            "batch_size": self.batch_size,
            "concurrency": self.max_in_flight,
            "max_retries": self.max_retries,
            "timeout": self.timeout,
            **self.client_options,
        }

    def limiter_settings(self) -> dict[str, Any]:
        """How the shared limiter actor is made, if this worker is the first to need it."""
        return {"rpm": self.rpm, "tpm": self.tpm}
