"""What the fake server limits: the inputs of one request, and the rate of requests and tokens.

Owns :func:`check_inputs` (how many inputs, how long, which text it refuses: Together's
wording), :class:`Limits` (requests and tokens per minute, each a token bucket holding
``burst`` seconds of its rate) and the headers Together sends with them: ``x-ratelimit-*`` /
``x-tokenlimit-*`` on every answer, and ``Retry-After`` / ``retry-after-ms`` on a refusal.

May import: the standard library, attrs, ``..protocol``, ``vectors`` (token counts), ``faults``
(number formatting). Pure: the caller passes the time, so a test can run the buckets on a
virtual clock.
"""

from __future__ import annotations

import math

import attrs

from ..protocol import RequestError, check_count
from .faults import fmt_num
from .vectors import approx_tokens

__all__ = ["Admission", "Limits", "check_inputs", "retry_headers"]


def check_inputs(
    texts: list[str],
    *,
    max_batch_size: int | None,
    too_large_status: int,
    max_input_chars: int | None,
    too_long_status: int,
    reject_substring: str | None,
) -> None:
    """Refuse (raise :class:`RequestError`) too many inputs, an input over ``max_input_chars``
    characters, or one containing ``reject_substring``; None: no such limit."""
    check_count(texts, max_batch_size, too_large_status)
    if max_input_chars is not None:
        for i, text in enumerate(texts):
            if len(text) > max_input_chars:
                raise RequestError(
                    too_long_status,
                    f"Input validation error: input {i} is too long "
                    f"({approx_tokens(text)} tokens > 512 max)",
                    param="input",
                )
    if reject_substring is not None:
        for i, text in enumerate(texts):
            if reject_substring in text:
                message = f"Input validation error: input {i} is invalid"
                raise RequestError(400, message, param="input")


@attrs.frozen
class Admission:
    """A bucket's verdict on one request: ``wait`` None if it may go (and was charged), else
    the seconds until it could, and which bucket was short (``requests`` or ``tokens``)."""

    wait: float | None
    headers: dict[str, str]
    short: str = "requests"


class Limits:
    """Token buckets on requests and tokens per minute, holding ``burst`` seconds of each, with
    Together's headers (limits per second, ``x-ratelimit-reset`` = seconds until full)."""

    def __init__(self, *, rpm: float | None, tpm: float | None, burst: float, now: float) -> None:
        self.buckets: dict[str, list[float]] = {}  # kind -> [rate/s, capacity, level, time]
        for kind, per_minute in (("requests", rpm), ("tokens", tpm)):
            if per_minute:
                rate = per_minute / 60.0
                self.buckets[kind] = [rate, rate * burst, rate * burst, now]

    def admit(self, now: float, tokens: int) -> Admission:
        """Charge one request of ``tokens`` tokens at time ``now``, if every bucket holds it."""
        costs = {"requests": 1.0, "tokens": float(tokens)}
        wait, short = 0.0, None
        for kind, b in self.buckets.items():
            rate, capacity, level, then = b
            b[2] = level = min(capacity, level + (now - then) * rate)
            b[3] = now
            need = min(costs[kind], capacity)
            if level < need and (need - level) / rate > wait:
                wait, short = (need - level) / rate, kind
        if short is None:
            for kind, b in self.buckets.items():
                b[2] -= costs[kind]
        headers = {}
        for kind, (rate, capacity, level, _) in self.buckets.items():
            prefix = "x-ratelimit" if kind == "requests" else "x-tokenlimit"
            headers[f"{prefix}-limit"] = fmt_num(round(rate, 3))
            headers[f"{prefix}-remaining"] = str(max(0, math.floor(level)))
            if kind == "requests":
                headers["x-ratelimit-reset"] = fmt_num(round(max(0.0, capacity - level) / rate, 3))
        if short is None:
            return Admission(None, headers)
        return Admission(wait, headers, short)


def retry_headers(wait: float) -> dict[str, str]:
    """When to retry a refused request: whole seconds (at least 1) and milliseconds."""
    return {
        "Retry-After": str(max(1, math.ceil(wait)) if wait >= 1 else 1),
        "retry-after-ms": str(max(1, math.ceil(wait * 1000))),
    }
