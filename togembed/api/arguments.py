"""What users pass, checked before anything is sent: call options, timeouts, models, encoding
formats, positive sizes, inputs, and the secrets to redact from server texts."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..core.batching import find_invalid_input, invalid_input_error
from ..core.config import EncodingFormat
from ..core.errors import InvalidModelError
from ..core.settings import CallOptions

__all__ = [
    "CHECK_CHUNK",
    "ENCODINGS",
    "call_options",
    "check_encoding",
    "check_inputs",
    "check_inputs_now",
    "check_model",
    "check_timeout",
    "positive",
    "secrets_of",
]

CHECK_CHUNK = 50_000  # inputs type-checked per event-loop step (~2 ms)
ENCODINGS = ("base64", "float")
# Headers whose values are secrets, redacted from server texts like the API key. Shorter values
# are not redacted: no real key is that short, and replacing e.g. every "k" would garble text.
_SECRET_HEADERS = ("authorization", "api-key", "x-api-key")
_MIN_SECRET = 8


def positive(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_timeout(timeout: object) -> float:
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    return float(timeout)


def call_options(
    started: float,
    timeout: float | None,
    dimensions: int | None,
    user: str | None,
    extra_headers: Mapping[str, str | None] | None,
    extra_query: Mapping[str, Any] | None,
    extra_body: Mapping[str, Any] | None,
) -> CallOptions | None:
    """The call's options, or None when it passes none (nothing to do per call)."""
    if (
        timeout is None
        and dimensions is None
        and user is None
        and not extra_headers
        and not extra_query
        and not extra_body
    ):
        return None
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        raise ValueError(f"dimensions must be a positive integer, got {dimensions!r}")
    if user is not None and not isinstance(user, str):
        raise ValueError(f"user must be a str, got {type(user).__name__}")
    return CallOptions(
        dimensions=dimensions,
        user=user,
        extra_headers=extra_headers,
        extra_query=extra_query,
        extra_body=extra_body,
        timeout=None if timeout is None else check_timeout(timeout),
        deadline=None if timeout is None else started + check_timeout(timeout),
    )


def check_encoding(fmt: str | None) -> EncodingFormat | None:
    if fmt is not None and fmt not in ENCODINGS:
        raise ValueError(f"encoding_format must be 'base64' or 'float', not {fmt!r}")
    return fmt  # type: ignore[return-value]


def check_model(model: object) -> None:
    if not isinstance(model, str):
        raise InvalidModelError(f"model must be a str, not {type(model).__name__}")
    if not model.strip():
        raise InvalidModelError(
            'model is empty: pass a model name (model="" does not mean the client\'s default; '
            "leave model out for that)"
        )


def secrets_of(api_key: str | None, headers: Mapping[str, str]) -> tuple[str, ...]:
    """The values redacted from every server text: the key, and secret-looking headers."""
    found = [api_key] if api_key else []
    for name, value in headers.items():
        if name.lower() in _SECRET_HEADERS and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            # "Bearer <key>" becomes "Bearer [REDACTED]": the scheme says what was hidden
            found.append(token if token and scheme.lower() == "bearer" else value)
    # longest first, so a secret containing another is replaced whole
    unique = {v for v in found if len(v) >= _MIN_SECRET}
    return tuple(sorted(unique, key=len, reverse=True))


def check_inputs_now(texts: Sequence[object]) -> None:
    """``check_inputs`` for at most ``CHECK_CHUNK`` inputs, in one step."""
    bad = find_invalid_input(texts, 0, len(texts))
    if bad is not None:
        raise invalid_input_error(texts, bad)


async def check_inputs(texts: Sequence[object]) -> None:
    """Refuse inputs that cannot be sent (non-strings, lone surrogates) before anything is
    sent (and paid for), naming the first one; in chunks, so a million inputs never stall the
    event loop."""
    n = len(texts)
    for start in range(0, n, CHECK_CHUNK):
        bad = find_invalid_input(texts, start, min(n, start + CHECK_CHUNK))
        if bad is not None:
            raise invalid_input_error(texts, bad)
        if n > CHECK_CHUNK:
            await asyncio.sleep(0)
