"""Rate-limit headers, read: Together's ``x-ratelimit-*`` / ``x-tokenlimit-*`` (per second,
with ``-dynamic`` variants) and OpenAI-style ``x-ratelimit-*-requests`` / ``-tokens`` (per
minute). Pure functions; the pacer decides what to do with them."""

from __future__ import annotations

import math
from collections.abc import Mapping

import attrs

__all__ = [
    "LimitHeaders",
    "has_rate_signal",
    "parse_limit_headers",
    "per_second",
    "shows_room",
]


@attrs.frozen
class LimitHeaders:
    """What a response said about the limit. ``*_per_minute``: the header names say the limit
    is per minute (OpenAI style); otherwise Together's documented per-second unit applies,
    unless ``per_second`` finds that implausible."""

    requests_limit: float | None = None
    requests_remaining: float | None = None
    requests_per_minute: bool = False
    tokens_limit: float | None = None
    tokens_remaining: float | None = None
    tokens_per_minute: bool = False

    @property
    def any(self) -> bool:
        return self.requests_limit is not None or self.tokens_limit is not None

    @property
    def requests_per_s(self) -> float | None:
        return per_second(self.requests_limit, self.requests_remaining, self.requests_per_minute)

    @property
    def tokens_per_s(self) -> float | None:
        return per_second(self.tokens_limit, self.tokens_remaining, self.tokens_per_minute)


def _number(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def per_second(limit: float | None, remaining: float | None, per_minute: bool) -> float | None:
    """Together documents ``x-ratelimit-limit``/``x-tokenlimit-limit`` per second; OpenAI-style
    ``x-ratelimit-limit-requests``/``-tokens`` are per minute. A "per second" limit at least 20
    times the most its bucket was seen to hold (``remaining``) is read as per minute: a server
    that refills a 1 s burst of 5 requests and says ``limit: 300`` means 300 a minute."""
    if limit is None or limit <= 0:
        return None
    if not per_minute and remaining and limit >= 20 * remaining:
        per_minute = True
    return limit / 60.0 if per_minute else limit


def _live(headers: Mapping[str, str], name: str) -> float | None:
    """Together's ``-dynamic`` variant of a header (the allowance enforced right now) when
    present, else the plain one."""
    value = _number(headers, f"{name}-dynamic")
    return value if value is not None else _number(headers, name)


def parse_limit_headers(headers: Mapping[str, str]) -> LimitHeaders:
    """Read Together's (``x-ratelimit-*``, ``x-tokenlimit-*``, and their ``-dynamic`` variants,
    which win) and OpenAI-style (``x-ratelimit-*-requests``, ``x-ratelimit-*-tokens``)
    rate-limit headers."""
    if not any(name in headers for name in _LIMIT_NAMES):  # most answers: nothing to read
        return _NO_LIMITS
    req_limit = _live(headers, "x-ratelimit-limit")
    req_left = _live(headers, "x-ratelimit-remaining")
    req_minute = False
    if req_limit is None:
        req_limit = _number(headers, "x-ratelimit-limit-requests")
        req_left = _number(headers, "x-ratelimit-remaining-requests")
        req_minute = True
    tok_limit = _live(headers, "x-tokenlimit-limit")
    tok_left = _live(headers, "x-tokenlimit-remaining")
    tok_minute = False
    if tok_limit is None:
        tok_limit = _number(headers, "x-ratelimit-limit-tokens")
        tok_left = _number(headers, "x-ratelimit-remaining-tokens")
        tok_minute = True
    return LimitHeaders(
        requests_limit=req_limit,
        requests_remaining=req_left,
        requests_per_minute=req_minute,
        tokens_limit=tok_limit,
        tokens_remaining=tok_left,
        tokens_per_minute=tok_minute,
    )


_NO_LIMITS = LimitHeaders()
# Every header a limit is read from (the "remaining" ones mean nothing without their limit).
_LIMIT_NAMES = (
    "x-ratelimit-limit",
    "x-ratelimit-limit-dynamic",
    "x-ratelimit-limit-requests",
    "x-tokenlimit-limit",
    "x-tokenlimit-limit-dynamic",
    "x-ratelimit-limit-tokens",
)
_WAIT_HEADERS = ("retry-after", "retry-after-ms", "x-ratelimit-reset")


def has_rate_signal(headers: Mapping[str, str]) -> bool:
    """Whether a 429 says anything about a rate limit: limit headers, or a wait above zero
    ("Retry-After: 0" means "try again now", not "slow down")."""
    if parse_limit_headers(headers).any:
        return True
    for name in _WAIT_HEADERS:
        raw = headers.get(name)
        if raw is not None and raw.strip() not in ("0", "0.0", ""):
            return True
    return False


def shows_room(headers: Mapping[str, str], tokens: float) -> bool:
    """Whether the headers still show room for a request of ``tokens``: a 429 that says so is
    one of Together's sporadic refusals below the limit, not a sign of going too fast."""
    info = parse_limit_headers(headers)
    req, tok = info.requests_remaining, info.tokens_remaining
    if req is None and tok is None:
        return False
    return (req is None or req >= 1) and (tok is None or tok >= tokens)
