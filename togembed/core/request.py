"""One admitted request: POST it, decode the answer, tell the limiter what happened.

Shared by a call sending its own batch and by the coalescer sending a request that carries
several calls' texts. The limiter's ticket is always released, with what the server said.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import attrs

from .answers import DecodedBatch, decode_embeddings
from .errors import ModelNotAvailableError
from .limiter import Feedback, Ticket
from .protocol import request_id_of
from .settings import CallSettings
from .status_errors import error_from_response

__all__ = ["Abort", "CallAborted", "post_batch"]

logger = logging.getLogger("togembed")


class Abort:
    """Shared by the batches of one call (or one stream): the first error that ends it. Set
    before the failing sender yields, so no other sender starts a request after it."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: BaseException | None = None


class CallAborted(Exception):
    """A sender stopped because another batch of its call failed for good (``Abort.error``)."""


async def post_batch(
    s: CallSettings,
    ticket: Ticket,
    *,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    size: int,
    timeout: float,
    aborts: Sequence[Abort],
    dim: int | None = None,
    estimated_tokens: int | None = None,
) -> DecodedBatch:
    """Send ``body`` (``size`` inputs) under ``ticket`` and return its validated answer.

    A model that is not available aborts every call in ``aborts`` before the limiter lets
    anyone else go. ``estimated_tokens``: charged to the limiter when the server does not
    count tokens itself (a shared request costs more than the ticket's first batch)."""
    feedback = Feedback(status=None)
    s.stats.requests += 1
    s.stats.in_flight += 1
    started = time.monotonic()
    try:
        logger.debug("POST %s (%d inputs)", url, size)
        resp = await s.transport.post(url, body, headers, timeout)
        feedback = Feedback(status=resp.status, headers=resp.headers)
        if not 200 <= resp.status < 300:
            if resp.status == 429:
                s.stats.rate_limited += 1
            elif resp.status >= 500:
                s.stats.server_errors += 1
            exc = error_from_response(resp.status, resp.headers, resp.body, secrets=s.secrets)
            if isinstance(exc, ModelNotAvailableError):
                for abort in aborts:
                    if abort.error is None:
                        abort.error = exc
            hint = exc.retry_after
            if hint is not None:  # the user's cap bounds every pause, the limiter's too
                hint = min(hint, s.retry.max_retry_after)
            feedback = attrs.evolve(feedback, retry_after=hint)
            raise exc
        async with s.cpu_gate:
            decoded = decode_embeddings(
                resp.body,
                size,
                dim=dim,
                request_id=request_id_of(resp.headers),
                secrets=s.secrets,
            )
        s.answered_in(time.monotonic() - started)
        if decoded.usage is not None:
            s.stats.tokens += decoded.usage.prompt_tokens
            feedback = attrs.evolve(feedback, tokens=decoded.usage.prompt_tokens)
        elif estimated_tokens is not None:
            feedback = attrs.evolve(feedback, tokens=estimated_tokens)
    finally:
        s.stats.in_flight -= 1
        s.limiter.release(ticket, feedback)
    return decoded
