"""How the fake server misbehaves on the wire: faults turned into answers or cut connections.

Owns the answers of the scripted faults that replace a whole answer (:func:`fault_answer`:
statuses, HTML pages, 429s with their headers, dropped connections), the sporadic 429 of
Together's dynamic limits (:func:`dynamic_429`), the random faults (:func:`random_fault`) and
a body cut off mid-way (:func:`send_truncated`).

May import: ``faults``, ``..app`` (Together's error answers), aiohttp.
"""

from __future__ import annotations

import contextlib
import email.utils
import random
import socket
import struct
import time

from aiohttp import web

from ..app import error_response, json_response
from .faults import HTML_STATUSES, JSON_STATUSES, STATUS_KINDS, Fault, fmt_num

__all__ = [
    "dynamic_429",
    "fault_answer",
    "html_error",
    "random_fault",
    "rate_limit_refusal",
    "send_truncated",
]

_SLOW_DOWN = "You have exceeded the rate limit for this model, please slow down"
_REASONS = {**HTML_STATUSES, 503: "Service Unavailable"}


def html_error(status: int) -> web.Response:
    """An HTML error page, as a proxy in front of the API sends it."""
    reason = _REASONS.get(status, "Error")
    return web.Response(
        status=status,
        reason=reason,
        content_type="text/html",
        text=f"<html><body><h1>{status} {reason}</h1></body></html>",
    )


def fault_answer(request: web.Request, fault: Fault) -> web.Response | None:
    """The answer of a fault that replaces the whole answer, whatever the request said; None
    for a dropped connection (and for the faults that do not replace it)."""
    kind = fault.kind
    if kind == "drop_fin":
        if request.transport is not None:
            request.transport.close()
        return None
    if kind == "drop_rst":
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        return None
    if kind == "html200":
        return web.Response(
            status=200,
            content_type="text/html",
            text="<html><body><h1>Welcome</h1><p>Nothing to see here.</p></body></html>",
        )
    if kind == "429":
        return _rate_limited(fault)
    if kind == "503":
        return json_response(
            503,
            b'{"error":{"message":"The server is overloaded or not ready yet.",'
            b'"type":"service_unavailable"}}',
        )
    if kind in STATUS_KINDS:
        status = int(kind)
        if status in HTML_STATUSES:
            return html_error(status)
        message, type_, code = JSON_STATUSES[status]
        return error_response(status, message, type_, code=code)
    return None


def _rate_limited(fault: Fault) -> web.Response:
    headers: dict[str, str] = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = fmt_num(fault.retry_after)
    if fault.date is not None:
        headers["Retry-After"] = email.utils.formatdate(time.time() + fault.date, usegmt=True)
    if fault.retry_after_ms is not None:
        headers["retry-after-ms"] = fmt_num(fault.retry_after_ms)
    if fault.reset is not None:
        headers["x-ratelimit-reset"] = fmt_num(fault.reset)
    type_ = fault.type or "dynamic_request_limited"
    message = (
        "Credit limit exceeded; please add credits to your account"
        if type_ == "credit_limit"
        else _SLOW_DOWN
    )
    return error_response(429, message, type_, headers=headers)


def dynamic_429(
    limit_headers: dict[str, str] | None, wait: float, *, in_ms: bool, empty: bool
) -> web.Response:
    """A 429 as Together's dynamic limits send it: a wait (``retry-after-ms`` if ``in_ms``),
    and the bucket's rate-limit headers, which may still show capacity (``empty``: remaining
    0)."""
    headers = dict(limit_headers or {})
    if empty:
        for name in list(headers):
            if name.endswith("-remaining"):
                headers[name] = "0"
    if in_ms:
        headers["retry-after-ms"] = fmt_num(round(wait * 1000))
    else:
        headers["Retry-After"] = fmt_num(wait)
    return error_response(429, _SLOW_DOWN, "dynamic_request_limited", headers=headers)


def rate_limit_refusal(kind: str, headers: dict[str, str]) -> web.Response:
    """The 429 of a request a token bucket refused (``kind``: which bucket was short)."""
    type_ = "dynamic_token_limited" if kind == "tokens" else "dynamic_request_limited"
    return error_response(429, _SLOW_DOWN, type_, headers=headers)


def random_fault(
    rng: random.Random, *, rate_429: float, rate_5xx: float, bare_429_rate: float
) -> web.Response | None:
    """One roll of the dice: a bare 429, a 429 with ``Retry-After: 0``, a 5xx page, or None."""
    if rate_429 <= 0 and rate_5xx <= 0 and bare_429_rate <= 0:
        return None
    roll = rng.random()
    if roll < bare_429_rate:  # a 429 that says nothing about a rate limit
        return error_response(429, "Too many requests", "rate_limit")
    roll -= bare_429_rate
    if roll < rate_429:
        return error_response(
            429, _SLOW_DOWN, "dynamic_request_limited", headers={"Retry-After": "0"}
        )
    if roll < rate_429 + rate_5xx:
        return html_error(rng.choice((500, 502, 503)))
    return None


async def send_truncated(request: web.Request, body: bytes, request_id: str) -> web.StreamResponse:
    """Status 200 and the full Content-Length, then half the body and a FIN."""
    response = web.StreamResponse(status=200, headers={"x-request-id": request_id})
    response.content_type = "application/json"
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    if request.transport is not None:
        request.transport.close()
    return response
