"""Refusals, without I/O: a non-2xx answer as the typed exception for its status, with the
server's message (HTML pages, FastAPI ``detail`` bodies and Together's error JSON alike), its
retry hint, whether the model is not available, and which arguments it refuses."""

from __future__ import annotations

import email.utils
import html
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from .errors import APIStatusError, ModelNotAvailableError, status_error_class
from .protocol import redact, request_id_of

__all__ = [
    "error_from_response",
    "is_model_not_available",
    "parse_retry_after",
    "rejected_arguments",
]

_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def _text_message(body: bytes) -> str:
    """A short human message out of an HTML or text error page."""
    text = body[:4000].decode("utf-8", "replace")
    title = re.search(r"<title>(.*?)</title>", text, re.I | re.S) or re.search(
        r"<h1[^>]*>(.*?)</h1>", text, re.I | re.S
    )
    if title:
        text = title.group(1)
    text = _SPACE.sub(" ", html.unescape(_TAG.sub(" ", text))).strip()
    return text[:300]


def _detail_message(detail: object) -> str | None:
    """The message of a FastAPI error body (Infinity and other Python servers answer 422
    ``{"detail": [{"loc": [...], "msg": ...}, ...]}``, or ``{"detail": "..."}``), where the
    limit a validation error names is ("List should have at most 2048 items ...")."""
    if isinstance(detail, str):
        return detail
    if not isinstance(detail, list):
        return None
    parts = []
    for item in detail[:5]:
        if isinstance(item, dict) and isinstance(item.get("msg"), str):
            loc = item.get("loc")
            where = ".".join(str(p) for p in loc) if isinstance(loc, list) else ""
            parts.append(f"{where}: {item['msg']}" if where else item["msg"])
    return "; ".join(parts) or None


_NON_SERVERLESS = re.compile(r"non-serverless model", re.I)
_MODEL_WORD = re.compile(r"\bmodel\b", re.I)
_MODEL_CODES = ("model_not_available", "model_not_found")


def is_model_not_available(status: int, message: str, code: str | None, param: str | None) -> bool:
    """The model cannot be used here, for good: an unknown model (404 about the model),
    Together's ``model_not_available`` code (400, 404 or 503) or its "Unable to access
    non-serverless model" (400). Other 503s mean "no capacity now" and stay retried."""
    if code in _MODEL_CODES or _NON_SERVERLESS.search(message):
        return True
    return status == 404 and (param == "model" or bool(_MODEL_WORD.search(message)))


def error_from_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    secrets: Sequence[str] = (),
    about_model: bool = True,
) -> APIStatusError:
    """The typed exception for a non-2xx answer, with the server's message and request id.

    Every text kept from the server (message, body) has the ``secrets`` (the API key) redacted
    here, once, so no consumer (str, repr, logs, a job's failure list) can show them.
    ``about_model=False`` for requests that name no model (``GET /models``): no
    ``ModelNotAvailableError`` then."""
    parsed: Any = None
    message = error_type = param = code = None
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        err = parsed.get("error", parsed)
        if isinstance(err, dict):
            message = err.get("message")
            error_type = err.get("type")
            param = err.get("param")
            code = err.get("code")
        elif isinstance(err, str):
            message = err
        if not isinstance(message, str) or not message:
            message = _detail_message(parsed.get("detail"))
    if not isinstance(message, str) or not message:
        message = _text_message(body) if body and parsed is None else ""
    message = redact(message, secrets)
    kept = parsed if parsed is not None else body[:2000].decode("utf-8", "replace")
    code_str = str(code) if code is not None else None
    param_str = param if isinstance(param, str) else None
    text = f"HTTP {status}: {message}" if message else f"HTTP {status}"
    cls = status_error_class(status)
    if about_model and is_model_not_available(status, message, code_str, param_str):
        cls = ModelNotAvailableError
    return cls(
        text,
        status_code=status,
        body=redact(kept, secrets),
        request_id=request_id_of(headers),
        error_type=redact(error_type, secrets) if isinstance(error_type, str) else None,
        param=redact(param_str, secrets),
        code=redact(code_str, secrets),
        retry_after=parse_retry_after(headers, now=now, include_reset=status == 429),
    )


# Together/OpenAI: "Unrecognized request argument(s) supplied: dimensions, user";
# Hugging Face TEI (serde): "unknown field `user`".
_UNRECOGNIZED = re.compile(r"unrecognized request arguments?(?: supplied)?:?(.*)", re.I | re.S)
_UNKNOWN_FIELD = re.compile(r"unknown field [`'\"]?(\w+)", re.I)
_NAME = re.compile(r"[A-Za-z_]\w*")


def rejected_arguments(message: str) -> frozenset[str] | None:
    """The request arguments a 400/422 says the server does not know: None if the message is
    not about unknown arguments, an empty set if it is but names none."""
    m = _UNKNOWN_FIELD.findall(message)
    if m:
        return frozenset(m)
    found = _UNRECOGNIZED.search(message)
    if found is None:
        return None
    return frozenset(_NAME.findall(found.group(1)))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(value: str, now: float) -> float | None:
    """Seconds in any form servers use: ``1.5``, ``250ms``, ``1m30s``, an HTTP date, an epoch."""
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        parts = _DURATION.findall(value)
        if parts and "".join(n + u for n, u in parts) == value.replace(" ", ""):
            return sum(float(n) * _UNITS[u] for n, u in parts)
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        return when.timestamp() - now
    if seconds > 1e9:  # an epoch timestamp, not an interval
        return seconds - now
    return seconds


def parse_retry_after(
    headers: Mapping[str, str], *, now: float | None = None, include_reset: bool = True
) -> float | None:
    """How long the server asked us to wait, in seconds (>= 0), or None if it did not say.

    Order: ``retry-after-ms`` (most precise), ``Retry-After`` (seconds or HTTP date), then
    Together's ``x-ratelimit-reset`` (its suggested retry interval; it rides on every answer, so
    callers only count it on a 429).
    """
    now = time.time() if now is None else now
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    for name in ("retry-after", "x-ratelimit-reset") if include_reset else ("retry-after",):
        raw = headers.get(name)
        if raw is not None:
            seconds = _seconds(raw, now)
            if seconds is not None and seconds == seconds:  # not NaN
                return max(0.0, seconds)
    return None
