"""Defaults and small frozen configuration values. Every tunable lives here with its reason."""

from __future__ import annotations

import ipaddress
import os
from typing import Literal
from urllib.parse import urlsplit

import attrs

from .errors import InvalidBaseURLError

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_ENCODING_FORMAT",
    "DEFAULT_HOST",
    "DEFAULT_LOCAL_MODEL",
    "DEFAULT_MAX_BATCH_TOKENS",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "EncodingFormat",
    "RetryPolicy",
]

EncodingFormat = Literal["base64", "float"]

DEFAULT_BASE_URL = "https://api.together.xyz/v1"
# `togembed serve` and `--local`: loopback only unless asked; vLLM's and most OpenAI-compatible
# local servers' default port; the int8 MiniLM, the model a plain `pip install` can run.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_LOCAL_MODEL = "sentence-transformers/all-MiniLM-L6-v2-int8"
# Seconds for one HTTP attempt (connect + send + full body). A 128-input batch answers in well
# under a second; 60 s leaves room for a loaded server without hanging a request handler forever.
DEFAULT_TIMEOUT = 60.0
# Retries after the first attempt, per batch. Higher than openai's 2: a corpus job sees 429s as
# routine, and giving up on one batch fails the whole call.
DEFAULT_MAX_RETRIES = 6
# Inputs per request. 128 keeps a float-JSON response near 2 MB (decoded in ~5 ms, so the event
# loop never stalls) while amortising per-request overhead.
DEFAULT_BATCH_SIZE = 128
# Estimated tokens per request: 128 inputs of a 512-token model.
DEFAULT_MAX_BATCH_TOKENS = 65_536
# Requests in flight per call. Enough to hide 20-200 ms of latency; not a burst that trips limits.
DEFAULT_CONCURRENCY = 16
# base64 is 4x smaller on the wire and ~4x cheaper to decode than float JSON (docs/benchmarks.md).
DEFAULT_ENCODING_FORMAT: EncodingFormat = "base64"

API_KEY_ENV = "TOGETHER_API_KEY"
BASE_URL_ENV = "TOGETHER_BASE_URL"


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How one batch is retried: jittered exponential backoff, bounded in attempts AND time.

    The server's own hint (``Retry-After``, ``retry-after-ms``, ``x-ratelimit-reset``) replaces
    the computed backoff. A hint above ``max_retry_after`` is not waited for: the call fails at
    once with that error (its ``retry_after`` says what the server asked), and the rate limiter
    is paused for ``max_retry_after`` at most.

    ``connect_retries``: retries after failures to connect at all (refused, DNS, unreachable);
    None means ``max_retries``. 0 fails fast — for a service that would rather answer an error
    now than wait ~20 s for a server that is down.
    """

    max_retries: int = attrs.field(default=DEFAULT_MAX_RETRIES, validator=attrs.validators.ge(0))
    initial_backoff: float = attrs.field(default=0.5, validator=attrs.validators.ge(0))
    max_backoff: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    max_retry_after: float = attrs.field(default=120.0, validator=attrs.validators.ge(0))
    # Total seconds one batch may spend, attempts and waits included; no wait starts past it.
    timeout: float = attrs.field(default=600.0, validator=attrs.validators.gt(0))
    connect_retries: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(0))
    )

    @property
    def max_connect_retries(self) -> int:
        return self.max_retries if self.connect_retries is None else self.connect_retries


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None


def resolve_base_url(base_url: str | None) -> str:
    """The API root without a trailing slash: ``base_url``, else ``$TOGETHER_BASE_URL``, else
    Together's. Not checked here (``check_base_url`` does that; ``AsyncClient`` calls it)."""
    url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    return url.rstrip("/")


def base_url_source(base_url: str | None) -> str:
    """Where the base URL came from, for error messages."""
    return BASE_URL_ENV if not base_url and os.environ.get(BASE_URL_ENV) else "base_url"


def check_base_url(url: object, *, source: str = "base_url") -> None:
    """Raise ``InvalidBaseURLError`` unless ``url`` is ``http(s)://host[:port][/path]``: e.g.
    ``127.0.0.1:8765/v1`` would be read as a scheme "127.0.0.1" and fail later in confusing
    ways (as a missing API key, since it is not a loopback URL)."""
    if not isinstance(url, str):
        raise InvalidBaseURLError(f"{source} must be a str, not {type(url).__name__}")
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # e.g. a port that is not a number
        parts, port_ok = None, False
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        example = (
            repr(f"http://{url}")
            if url and "://" not in url
            else "'https://api.together.xyz/v1' or 'http://127.0.0.1:8000/v1'"
        )
        raise InvalidBaseURLError(
            f"{source} {url!r} is malformed: it needs http:// or https:// and a host, "
            f"like {example}"
        )


def is_loopback_url(url: str) -> bool:
    """True for servers on this machine (``togembed serve``, test servers): no key needed."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
