"""``shared_limiter``: the driver's way to the shared limiter actor of a key and model, for
clients that run outside Ray Data (a Ray task or actor of your own) and for inspection.

May import ray, core and this subpackage.
"""

from __future__ import annotations

from typing import Any

from ..core.config import resolve_api_key, resolve_base_url
from .limiter import RayLimiter
from .limiter_actor import get_or_create, limiter_name

__all__ = ["shared_limiter"]


def shared_limiter(
    model: str,
    *,
    base_url: str | None = None,
    rpm: float | None = None,
    tpm: float | None = None,
    name: str | None = None,
    detached: bool = False,
    **limiter_options: Any,
) -> RayLimiter:
    """This process's end of the limiter actor for the key in ``$TOGETHER_API_KEY`` and
    ``model`` (made with ``rpm``/``tpm`` if nobody made it yet). Pass it as
    ``AsyncClient(limiter=...)``; call its ``aclose()`` when done."""
    name = name or limiter_name(resolve_base_url(base_url), resolve_api_key(None), model)
    get_or_create(name, detached=detached, rpm=rpm, tpm=tpm)
    return RayLimiter.connect(name, **limiter_options)
