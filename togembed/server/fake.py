"""A fault-injecting fake of Together AI's embeddings API.

Why it exists: retries, batching and ordering bugs only show up when the server misbehaves,
and the real API misbehaves rarely and unpredictably.  This server answers exactly like
Together (same JSON shapes, statuses and headers) with *deterministic* vectors, so a client
can check bit-for-bit that every row landed in the right place, while tests script faults
(429s, 5xx, dropped connections, truncated or reordered bodies) request by request.

Use it in-process (``async with FakeTogetherServer() as server``) or as a separate process
for benchmarks::

    python -m togembed._fakeserver --port 0 --latency 0.02   # prints "READY <base_url>"
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import email.utils
import functools
import itertools
import math
import random
import signal
import socket
import struct
import sys
import time
import zlib
from collections import Counter, deque
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Literal

import attrs
import numpy as np
import orjson
from aiohttp import web

from .listen import listen

__all__ = [
    "FAULT_KINDS",
    "Fault",
    "FakeTogetherServer",
    "FaultQueue",
    "RequestRecord",
    "ServerStats",
    "fake_embedding",
    "fake_embeddings",
    "main",
]

# aiohttp >= 3.12 warns about plain string keys on requests.
_LIMIT_HEADERS: Any = (
    web.RequestKey("limit_headers", dict) if hasattr(web, "RequestKey") else "limit_headers"
)
"""Rate-limit headers computed for a request, added to whatever answer it gets."""

POOL_ROWS = 1024
"""Number of distinct base vectors per dimension; texts map onto them by CRC32."""

DEFAULT_MODELS = (
    "togethercomputer/m2-bert-80M-8k-retrieval",
    "BAAI/bge-base-en-v1.5",
    "BAAI/bge-large-en-v1.5",
    "WhereIsAI/UAE-Large-V1",
)
"""What ``GET /v1/models`` lists when the server accepts any model."""

EncodingMode = Literal["honour", "float", "reject"]

# --------------------------------------------------------------------------------------
# Deterministic vectors
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _pool(dim: int) -> np.ndarray:
    """Unit-length random rows, seeded by ``dim`` so any process can recompute them."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    pool = np.random.default_rng(dim).standard_normal((POOL_ROWS, dim)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    pool.setflags(write=False)
    return pool


def _first_value(h: int) -> float:
    """Element 0 of a text's vector: 24 bits of its hash, exact in float32, so swapped rows
    that share a pool row are still told apart."""
    return (h >> 8) / 16777216.0


def fake_embedding(text: str, dim: int = 768) -> np.ndarray:
    """The exact float32 vector the fake server returns for ``text``."""
    h = zlib.crc32(text.encode("utf-8"))
    row = _pool(dim)[h % POOL_ROWS].copy()
    row[0] = _first_value(h)
    return row


def fake_embeddings(texts: Iterable[str], dim: int = 768) -> np.ndarray:
    """``fake_embedding`` for many texts at once, shape ``(len(texts), dim)``."""
    hashes = np.fromiter((zlib.crc32(t.encode("utf-8")) for t in texts), dtype=np.uint64)
    out = _pool(dim)[(hashes % POOL_ROWS).astype(np.intp)]
    out[:, 0] = (hashes >> 8).astype(np.float32) / np.float32(16777216.0)
    return out


class _RowCodec:
    """Pre-rendered wire forms of every pool row, so a response costs a join, not a dump.

    Only element 0 differs between texts sharing a pool row, so for JSON we keep the text
    of elements ``1..dim-1`` and for base64 the encoding of bytes ``6..`` (6 is a multiple
    of 3, so base64 of the head and of the tail simply concatenate).
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        pool = _pool(dim)
        raw = pool.astype("<f4").tobytes()
        width = 4 * dim
        self._raw = raw
        self._width = width
        self._b64_tails = [
            base64.b64encode(raw[i * width + 6 : (i + 1) * width]) + b'"' for i in range(POOL_ROWS)
        ]
        tails = [
            b"," + orjson.dumps(pool[i, 1:], option=orjson.OPT_SERIALIZE_NUMPY)[1:]
            if dim > 1
            else b"]"
            for i in range(POOL_ROWS)
        ]
        # orjson writes the shortest float32 text; make sure a JSON parser reading it as a
        # double and casting to float32 gets the same bits, and fall back to the exact
        # double repr for any row where that would not hold.
        if dim > 1:
            parsed = np.array(orjson.loads(b"[" + b",".join(b"[0" + t for t in tails) + b"]"))
            bad = np.flatnonzero((parsed[:, 1:].astype(np.float32) != pool[:, 1:]).any(axis=1))
            for i in bad:
                tails[i] = b"," + ",".join(repr(float(v)) for v in pool[i, 1:]).encode() + b"]"
        self._json_tails = tails

    def json(self, h: int) -> bytes:
        """The JSON array for a text with CRC32 ``h``."""
        return b"[" + repr(_first_value(h)).encode() + self._json_tails[h % POOL_ROWS]

    def b64(self, h: int) -> bytes:
        """The quoted base64 string for a text with CRC32 ``h``."""
        start = (h % POOL_ROWS) * self._width
        head = struct.pack("<f", _first_value(h)) + self._raw[start + 4 : start + 6]
        return b'"' + base64.b64encode(head) + self._b64_tails[h % POOL_ROWS]


@functools.lru_cache(maxsize=8)
def _codec(dim: int) -> _RowCodec:
    return _RowCodec(dim)


# --------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------

_HTML_STATUSES = {
    500: "Internal Server Error",
    502: "Bad Gateway",
    504: "Gateway Timeout",
    520: "Web Server Returned an Unknown Error",
    524: "A Timeout Occurred",
    529: "Site is overloaded",
}
# status -> (message, type, code)
_JSON_STATUSES: dict[int, tuple[str, str, str | None]] = {
    400: ("Bad request (injected fault)", "invalid_request_error", None),
    401: ("Invalid API key provided", "invalid_request_error", "invalid_api_key"),
    403: ("You do not have access to this resource", "invalid_request_error", None),
    404: ("Not found (injected fault)", "invalid_request_error", "model_not_available"),
    408: ("Request timed out", "request_timeout", None),
    409: ("Conflict (injected fault)", "invalid_request_error", None),
    422: ("Unprocessable request (injected fault)", "invalid_request_error", None),
}
_REASONS = {**_HTML_STATUSES, 503: "Service Unavailable"}
_STATUS_KINDS = {str(s) for s in (*_HTML_STATUSES, *_JSON_STATUSES, 429, 503)}
_CONNECTION_KINDS = {"drop_fin", "drop_rst"}
_BODY_KINDS = {
    "truncate",
    "malformed",
    "shuffle",
    "missing_index",
    "duplicate_index",
    "wrong_dim",
    "wrong_count",
}
FAULT_KINDS: frozenset[str] = frozenset(
    _STATUS_KINDS | _CONNECTION_KINDS | _BODY_KINDS | {"slow", "html200"}
)
"""Every kind accepted by :class:`Fault`."""

_PARAM_NAMES = {
    "retry-after": "retry_after",
    "retry-after-ms": "retry_after_ms",
    "reset": "reset",
    "date": "date",
    "type": "type",
    "delay": "delay",
}


def _check_kind(_: Fault, __: attrs.Attribute[str], kind: str) -> None:
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")


@attrs.frozen
class Fault:
    """One scripted misbehaviour, consumed by exactly one ``POST /v1/embeddings``.

    ``retry_after``/``retry_after_ms``/``reset``/``date``/``type`` only matter for 429s;
    ``delay`` only for ``slow``.
    """

    kind: str = attrs.field(validator=_check_kind)
    retry_after: float | None = None
    retry_after_ms: float | None = None
    reset: float | None = None
    date: float | None = None
    type: str | None = None
    delay: float = 0.0

    @classmethod
    def parse(cls, spec: str | Fault) -> Fault:
        """Parse ``"kind[:k=v,k=v]"``, e.g. ``"429:retry-after=1,type=credit_limit"`` or
        ``"slow:0.5"`` (a bare number after ``slow:`` is the delay)."""
        if isinstance(spec, Fault):
            return spec
        kind, _, rest = spec.strip().partition(":")
        kwargs: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in rest.replace(";", ",").split(","))):
            key, eq, value = part.partition("=")
            if not eq and kind == "slow":
                key, value = "delay", key
            name = _PARAM_NAMES.get(key.strip().lower().replace("_", "-"))
            if name is None or (not eq and kind != "slow"):
                raise ValueError(f"bad fault parameter {part!r} in {spec!r}")
            kwargs[name] = value.strip() if name == "type" else float(value)
        return cls(kind.strip().lower(), **kwargs)

    def __str__(self) -> str:
        params = [
            f"{key}={_fmt_num(v) if isinstance(v, float) else v}"
            for key, name in _PARAM_NAMES.items()
            if (v := getattr(self, name)) is not None and not (name == "delay" and v == 0.0)
        ]
        return self.kind + (":" + ",".join(params) if params else "")


class FaultQueue(deque[Fault]):
    """A deque of :class:`Fault` that also takes spec strings (parsed on the way in, so a
    typo fails in the test, not inside the server)."""

    def __init__(self, items: Iterable[Fault | str] = ()) -> None:
        super().__init__(Fault.parse(f) for f in items)

    def append(self, item: Fault | str) -> None:
        super().append(Fault.parse(item))

    def appendleft(self, item: Fault | str) -> None:
        super().appendleft(Fault.parse(item))

    def extend(self, items: Iterable[Fault | str]) -> None:
        super().extend(Fault.parse(f) for f in items)

    def extendleft(self, items: Iterable[Fault | str]) -> None:
        super().extendleft(Fault.parse(f) for f in items)

    def insert(self, i: int, item: Fault | str) -> None:
        super().insert(i, Fault.parse(item))


def _fmt_num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# --------------------------------------------------------------------------------------
# Stats
# --------------------------------------------------------------------------------------


@attrs.define
class RequestRecord:
    """What one ``POST /v1/embeddings`` asked for and got.

    ``status`` is 0 when no HTTP response was sent (dropped connection, client gone).
    """

    n_inputs: int = 0
    status: int = 0
    fault: str | None = None
    encoding_format: str | None = None
    request_id: str = ""
    disconnected: bool = False
    at: float = 0.0  # seconds since the server's first embeddings request


@attrs.define
class ServerStats:
    """Counters over ``POST /v1/embeddings`` calls since start or ``reset_stats()``."""

    requests: int = 0
    inputs: int = 0
    status_counts: Counter[int] = attrs.field(factory=Counter)
    log: list[RequestRecord] = attrs.field(factory=list)

    def as_dict(self, *, log: bool = False) -> dict[str, Any]:
        """JSON-able form, served at ``GET /stats`` for benchmarks in another process."""
        out: dict[str, Any] = {
            "requests": self.requests,
            "inputs": self.inputs,
            "status_counts": {str(k): v for k, v in sorted(self.status_counts.items())},
        }
        if log:
            out["log"] = [attrs.asdict(r) for r in self.log]
        return out


# --------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------


_NOT_JSON = object()


class _BadRequest(Exception):
    """A request Together would refuse; carries the ready-made error response."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


@attrs.define
class _Parsed:
    model: str
    texts: list[str]
    encoding: str  # "float" | "base64"


def _error_body(
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def _json_response(
    status: int, body: bytes, headers: dict[str, str] | None = None, reason: str | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=body,
        headers=headers,
        reason=reason,
        content_type="application/json",
    )


def _error(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return _json_response(
        status, _error_body(message, type_, param, code), headers, reason=_REASONS.get(status)
    )


def _html_error(status: int) -> web.Response:
    reason = _REASONS.get(status, "Error")
    return web.Response(
        status=status,
        reason=reason,
        content_type="text/html",
        text=f"<html><body><h1>{status} {reason}</h1></body></html>",
    )


def _tokens(text: str) -> int:
    return len(text) // 4 + 1


class _Limits:
    """Token buckets on requests and tokens per minute, holding ``burst`` seconds of each, with
    Together's headers (limits per second, ``x-ratelimit-reset`` = seconds until full)."""

    def __init__(self, *, rpm: float | None, tpm: float | None, burst: float) -> None:
        self.buckets: dict[str, list[float]] = {}  # kind -> [rate/s, capacity, level, time]
        now = time.monotonic()
        for kind, per_minute in (("requests", rpm), ("tokens", tpm)):
            if per_minute:
                rate = per_minute / 60.0
                self.buckets[kind] = [rate, rate * burst, rate * burst, now]

    def admit(self, now: float, tokens: int) -> tuple[float | None, dict[str, str]]:
        """(None, headers) if the request may go (and is charged), else (seconds to wait, ...)."""
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
            headers[f"{prefix}-limit"] = _fmt_num(round(rate, 3))
            headers[f"{prefix}-remaining"] = str(max(0, math.floor(level)))
            if kind == "requests":
                headers["x-ratelimit-reset"] = _fmt_num(round(max(0.0, capacity - level) / rate, 3))
        if short is not None:
            headers["_kind"] = short
        return (wait if short is not None else None), headers


class FakeTogetherServer:
    """A Together-compatible ``/v1/embeddings`` server with scripted and random faults.

    Scripted faults (``server.faults``) are consumed one per embeddings request, in order,
    before random faults (``fault_rate_429``/``fault_rate_5xx``) are considered.
    """

    def __init__(
        self,
        *,
        dim: int = 768,
        latency: float = 0.0,
        encoding: EncodingMode = "honour",
        api_key: str | None = None,
        models: Collection[str] | None = None,
        max_batch_size: int | None = None,
        too_large_status: int = 413,
        max_input_chars: int | None = None,
        too_long_status: int = 400,
        reject_substring: str | None = None,
        usage: bool = True,
        fault_rate_429: float = 0.0,
        fault_rate_5xx: float = 0.0,
        bare_429_rate: float = 0.0,
        sporadic_429_rate: float = 0.0,
        sporadic_429_wait: float = 1.0,
        sporadic_429_ms: bool = False,
        storm: tuple[float, float] | None = None,
        rpm: float | None = None,
        tpm: float | None = None,
        burst: float = 1.0,
        limit_headers: bool = True,
        seed: int = 0,
        request_id_prefix: str = "req-",
        shutdown_timeout: float = 1.0,
    ) -> None:
        if encoding not in ("honour", "float", "reject"):
            raise ValueError(f"encoding must be 'honour', 'float' or 'reject', got {encoding!r}")
        self.dim = dim
        self.latency = latency
        self.encoding: EncodingMode = encoding
        self.api_key = api_key
        self.models: frozenset[str] | None = None if models is None else frozenset(models)
        self.max_batch_size = max_batch_size
        self.too_large_status = too_large_status
        self.max_input_chars = max_input_chars
        self.too_long_status = too_long_status
        self.reject_substring = reject_substring
        self.usage = usage
        self.fault_rate_429 = fault_rate_429
        self.fault_rate_5xx = fault_rate_5xx
        self.bare_429_rate = bare_429_rate
        # Together's dynamic limits: 429s with a wait while the headers still show capacity.
        self.sporadic_429_rate = sporadic_429_rate
        self.sporadic_429_wait = sporadic_429_wait
        self.sporadic_429_ms = sporadic_429_ms
        # (start, duration) in seconds after the first request: every request is refused with
        # a 429 whose headers show an empty bucket (the limit fell, then comes back).
        self.storm = storm
        self._first_request: float | None = None
        self.limits = _Limits(rpm=rpm, tpm=tpm, burst=burst) if rpm or tpm else None
        self.limit_headers = limit_headers
        self.request_id_prefix = request_id_prefix
        self.shutdown_timeout = shutdown_timeout

        self.faults: FaultQueue = FaultQueue()
        self.stats = ServerStats()
        self.disconnects = 0
        self.in_flight = 0
        self.max_in_flight = 0

        self._rng = random.Random(seed)
        self._ids = itertools.count(1)
        self._codec = _codec(dim)
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None
        self._closing = False

    # -- lifecycle --------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """The aiohttp application (exposed for embedding in another test server)."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/embeddings", self._handle_embeddings)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/stats", self._handle_stats)
        app.router.add_post("/stats/reset", self._handle_stats_reset)
        app.router.add_post("/faults", self._handle_add_faults)
        app.on_response_prepare.append(self._add_request_id)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 = any free port) and return :attr:`base_url`."""
        if self._runner is not None:
            raise RuntimeError("server already started")
        runner, self._base_url = await listen(
            self.make_app(), host, port, shutdown_timeout=self.shutdown_timeout
        )
        self._runner = runner
        self._closing = False
        return self._base_url

    async def close(self) -> None:
        """Stop listening and drop open connections; idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            self._closing = True
            await runner.cleanup()

    async def __aenter__(self) -> FakeTogetherServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``; only valid after :meth:`start`."""
        if self._base_url is None:
            raise RuntimeError("server not started")
        return self._base_url

    def reset_stats(self) -> None:
        """Zero the counters (not the scripted faults or the random seed)."""
        self.stats = ServerStats()
        self.disconnects = 0
        self.max_in_flight = self.in_flight

    def stats_dict(self, *, log: bool = False) -> dict[str, Any]:
        """Everything ``GET /stats`` reports."""
        return {
            **self.stats.as_dict(log=log),
            "disconnects": self.disconnects,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "faults_pending": len(self.faults),
        }

    # -- seams ------------------------------------------------------------------------

    def check_rate_limit(self, request: web.Request, parsed: _Parsed) -> web.Response | None:
        """Return a 429 response to refuse the request, or None to let it through. Called once
        per valid embeddings request; override for other limit schemes."""
        if self.limits is None:
            return None
        tokens = sum(_tokens(t) for t in parsed.texts)
        wait, headers = self.limits.admit(time.monotonic(), tokens)
        if self.limit_headers:
            request[_LIMIT_HEADERS] = headers
        if wait is None:
            return None
        retry = {"Retry-After": str(max(1, math.ceil(wait)) if wait >= 1 else 1)}
        retry["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
        kind = (
            "dynamic_token_limited"
            if headers.get("_kind") == "tokens"
            else ("dynamic_request_limited")
        )
        headers.pop("_kind", None)
        return _error(
            429,
            "You have exceeded the rate limit for this model, please slow down",
            kind,
            headers={**retry, **(headers if self.limit_headers else {})},
        )

    # -- handlers ---------------------------------------------------------------------

    async def _add_request_id(self, request: web.Request, response: web.StreamResponse) -> None:
        if "x-request-id" not in response.headers:
            response.headers["x-request-id"] = self._new_request_id()
        limit_headers = request.get(_LIMIT_HEADERS)
        if limit_headers and response.status != 429:
            for name, value in limit_headers.items():
                if not name.startswith("_"):
                    response.headers.setdefault(name, value)

    def _new_request_id(self) -> str:
        return f"{self.request_id_prefix}{next(self._ids):08d}"

    def _auth_error(self, request: web.Request) -> web.Response | None:
        if self.api_key is None or request.headers.get("Authorization") == (
            f"Bearer {self.api_key}"
        ):
            return None
        return _error(401, "Invalid API key provided", code="invalid_api_key")

    async def _handle_models(self, request: web.Request) -> web.Response:
        denied = self._auth_error(request)
        if denied is not None:
            return denied
        names = sorted(self.models) if self.models is not None else list(DEFAULT_MODELS)
        data = [{"id": n, "object": "model", "type": "embedding"} for n in names]
        return _json_response(200, orjson.dumps({"object": "list", "data": data}))

    async def _handle_stats(self, request: web.Request) -> web.Response:
        log = request.query.get("log", "") not in ("", "0", "false")
        return _json_response(200, orjson.dumps(self.stats_dict(log=log)))

    async def _handle_stats_reset(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return _json_response(200, b'{"ok":true}')

    async def _handle_add_faults(self, request: web.Request) -> web.Response:
        """``POST /faults`` with a JSON list of spec strings: script faults cross-process."""
        try:
            specs = orjson.loads(await request.read())
            if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
                raise ValueError("body must be a JSON list of fault strings")
            self.faults.extend(specs)
        except ValueError as exc:
            return _error(400, str(exc))
        return _json_response(200, orjson.dumps({"faults_pending": len(self.faults)}))

    async def _handle_embeddings(self, request: web.Request) -> web.StreamResponse:
        now = time.monotonic()
        if self._first_request is None:
            self._first_request = now
        record = RequestRecord(request_id=self._new_request_id(), at=now - self._first_request)
        self.stats.requests += 1
        self.stats.log.append(record)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = await self._answer(request, record)
        except asyncio.CancelledError:
            # handler_cancellation=True: the client went away mid-request.
            if not self._closing:
                self._note_disconnect(record)
            raise
        finally:
            self.in_flight -= 1
        if response is None:  # connection dropped on purpose, or client gone
            # Never reaches the wire; the header just keeps request ids sequential.
            return web.Response(status=204, headers={"x-request-id": record.request_id})
        record.status = response.status
        self.stats.status_counts[response.status] += 1
        if not response.prepared:
            response.headers["x-request-id"] = record.request_id
        return response

    def _note_disconnect(self, record: RequestRecord) -> None:
        if not record.disconnected:
            record.disconnected = True
            self.disconnects += 1

    async def _sleep(self, request: web.Request, record: RequestRecord, delay: float) -> bool:
        """Sleep, then say whether the client is still there (the fallback for when the
        handler was not cancelled on disconnect)."""
        await asyncio.sleep(delay)
        transport = request.transport
        if transport is None or transport.is_closing():
            self._note_disconnect(record)
            return False
        return True

    async def _answer(
        self, request: web.Request, record: RequestRecord
    ) -> web.StreamResponse | None:
        body = self._decode(await request.read(), record)
        fault = self.faults.popleft() if self.faults else None
        if fault is not None:
            record.fault = fault.kind
        delay = self.latency + (fault.delay if fault is not None and fault.kind == "slow" else 0)
        if delay > 0 and not await self._sleep(request, record, delay):
            return None

        if fault is not None:
            early = self._early_fault(request, fault, record)
            if early is not None or fault.kind in _CONNECTION_KINDS:
                return early
        denied = self._auth_error(request)
        if denied is not None:
            return denied
        try:
            parsed = self._validate(body)
        except _BadRequest as exc:
            return exc.response
        limited = self.check_rate_limit(request, parsed)
        if limited is not None:
            return limited
        if fault is None and self._in_storm(record):
            record.fault = "storm"
            return self._dynamic_429(request, empty=True)
        if (
            fault is None
            and self.sporadic_429_rate > 0
            and self._rng.random() < self.sporadic_429_rate
        ):
            record.fault = "sporadic_429"
            return self._dynamic_429(request, empty=False)
        if fault is None:
            random_fault = self._random_fault()
            if random_fault is not None:
                record.fault = f"random_{random_fault.status}"
                return random_fault

        kind = fault.kind if fault is not None and fault.kind in _BODY_KINDS else None
        body = self._render(parsed, kind)
        if kind == "truncate":
            return await self._send_truncated(request, body, record.request_id)
        if kind == "malformed":
            body = body[: max(1, len(body) // 2)]
        return _json_response(200, body)

    def _early_fault(
        self, request: web.Request, fault: Fault, record: RequestRecord
    ) -> web.Response | None:
        """Faults that replace the whole answer, whatever the request said."""
        kind = fault.kind
        if kind == "drop_fin":
            transport = request.transport
            if transport is not None:
                transport.close()
            return None
        if kind == "drop_rst":
            transport = request.transport
            if transport is not None:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                transport.abort()
            return None
        if kind == "html200":
            return web.Response(
                status=200,
                content_type="text/html",
                text="<html><body><h1>Welcome</h1><p>Nothing to see here.</p></body></html>",
            )
        if kind == "429":
            return self._rate_limited(fault)
        if kind == "503":
            return _json_response(
                503,
                b'{"error":{"message":"The server is overloaded or not ready yet.",'
                b'"type":"service_unavailable"}}',
            )
        if kind in _STATUS_KINDS:
            status = int(kind)
            if status in _HTML_STATUSES:
                return _html_error(status)
            message, type_, code = _JSON_STATUSES[status]
            return _error(status, message, type_, code=code)
        return None

    def _rate_limited(self, fault: Fault) -> web.Response:
        headers: dict[str, str] = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = _fmt_num(fault.retry_after)
        if fault.date is not None:
            headers["Retry-After"] = email.utils.formatdate(time.time() + fault.date, usegmt=True)
        if fault.retry_after_ms is not None:
            headers["retry-after-ms"] = _fmt_num(fault.retry_after_ms)
        if fault.reset is not None:
            headers["x-ratelimit-reset"] = _fmt_num(fault.reset)
        type_ = fault.type or "dynamic_request_limited"
        message = (
            "Credit limit exceeded; please add credits to your account"
            if type_ == "credit_limit"
            else "You have exceeded the rate limit for this model, please slow down"
        )
        return _error(429, message, type_, headers=headers)

    def _in_storm(self, record: RequestRecord) -> bool:
        if self.storm is None:
            return False
        start, duration = self.storm
        return start <= record.at < start + duration

    def _dynamic_429(self, request: web.Request, *, empty: bool) -> web.Response:
        """A 429 as Together's dynamic limits send it: a wait, and the rate-limit headers (the
        bucket's, which may still show capacity; ``empty``: remaining 0)."""
        headers = {
            name: value
            for name, value in (request.get(_LIMIT_HEADERS) or {}).items()
            if not name.startswith("_")
        }
        if empty:
            for name in list(headers):
                if name.endswith("-remaining"):
                    headers[name] = "0"
        wait = self.sporadic_429_wait
        if self.sporadic_429_ms:
            headers["retry-after-ms"] = _fmt_num(round(wait * 1000))
        else:
            headers["Retry-After"] = _fmt_num(wait)
        return _error(
            429,
            "You have exceeded the rate limit for this model, please slow down",
            "dynamic_request_limited",
            headers=headers,
        )

    def _random_fault(self) -> web.Response | None:
        if self.fault_rate_429 <= 0 and self.fault_rate_5xx <= 0 and self.bare_429_rate <= 0:
            return None
        roll = self._rng.random()
        if roll < self.bare_429_rate:  # a 429 that says nothing about a rate limit
            return _error(429, "Too many requests", "rate_limit")
        roll -= self.bare_429_rate
        if roll < self.fault_rate_429:
            return _error(
                429,
                "You have exceeded the rate limit for this model, please slow down",
                "dynamic_request_limited",
                headers={"Retry-After": "0"},
            )
        if roll < self.fault_rate_429 + self.fault_rate_5xx:
            return _html_error(self._rng.choice((500, 502, 503)))
        return None

    def _decode(self, raw: bytes, record: RequestRecord) -> Any:
        """Parse the body and note what it asked for, before any fault can intervene."""
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _NOT_JSON
        if isinstance(body, dict):
            texts = body.get("input")
            n_inputs = 1 if isinstance(texts, str) else len(texts) if isinstance(texts, list) else 0
            record.n_inputs = n_inputs
            self.stats.inputs += n_inputs
            fmt = body.get("encoding_format")
            record.encoding_format = fmt if isinstance(fmt, str) else None
        return body

    def _validate(self, body: Any) -> _Parsed:
        """Validate like Together does; raise _BadRequest with the error response."""
        if body is _NOT_JSON:
            raise _BadRequest(_error(400, "Request body is not valid JSON"))
        if not isinstance(body, dict):
            raise _BadRequest(_error(400, "Request body must be a JSON object"))
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        fmt = body.get("encoding_format")
        allowed = (
            {"model", "input"}
            if self.encoding == "reject"
            else {"model", "input", "encoding_format"}
        )
        unknown = sorted(k for k in body if k not in allowed)
        if unknown:
            raise _BadRequest(
                _error(400, f"Unrecognized request arguments supplied: {', '.join(unknown)}")
            )
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest(
                _error(400, "'model' is required and must be a non-empty string", param="model")
            )
        if "input" not in body:
            raise _BadRequest(_error(400, "'input' is required", param="input"))
        if not isinstance(texts, list):
            raise _BadRequest(
                _error(400, "'input' must be a string or a list of strings", param="input")
            )
        if not texts:
            raise _BadRequest(_error(400, "'input' must not be an empty list", param="input"))
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise _BadRequest(
                    _error(
                        400,
                        f"'input[{i}]' must be a string, got {type(text).__name__}",
                        param="input",
                    )
                )
        encoding = "float"
        if self.encoding == "honour" and fmt is not None:
            if fmt not in ("float", "base64"):
                raise _BadRequest(
                    _error(
                        400,
                        f"'encoding_format' must be 'float' or 'base64', got {fmt!r}",
                        param="encoding_format",
                    )
                )
            encoding = fmt
        if self.models is not None and model not in self.models:
            raise _BadRequest(
                _error(
                    404,
                    f"Unable to access model {model}. Please visit https://api.together.ai/models "
                    "to view the list of supported models.",
                    code="model_not_available",
                )
            )
        if self.max_batch_size is not None and len(texts) > self.max_batch_size:
            raise _BadRequest(
                _error(
                    self.too_large_status,
                    f"Too many inputs: got {len(texts)}, the maximum is {self.max_batch_size}",
                    param="input",
                )
            )
        if self.max_input_chars is not None:
            for i, text in enumerate(texts):
                if len(text) > self.max_input_chars:
                    raise _BadRequest(
                        _error(
                            self.too_long_status,
                            f"Input validation error: input {i} is too long "
                            f"({_tokens(text)} tokens > 512 max)",
                            param="input",
                        )
                    )
        if self.reject_substring is not None:
            for i, text in enumerate(texts):
                if self.reject_substring in text:
                    raise _BadRequest(
                        _error(400, f"Input validation error: input {i} is invalid", param="input")
                    )
        return _Parsed(model=model, texts=texts, encoding=encoding)

    def _render(self, parsed: _Parsed, fault: str | None) -> bytes:
        """Build the response JSON by hand from pre-rendered rows (the hot path)."""
        codec = self._codec
        encode = codec.b64 if parsed.encoding == "base64" else codec.json
        texts = parsed.texts
        items: list[tuple[int | None, bytes]] = [
            (i, encode(zlib.crc32(t.encode("utf-8")))) for i, t in enumerate(texts)
        ]
        if fault == "shuffle" and len(items) > 1:
            order = items[:]
            self._rng.shuffle(items)
            if items == order:
                items = items[1:] + items[:1]
        elif fault == "missing_index":
            items[-1] = (None, items[-1][1])
        elif fault == "duplicate_index":
            if len(items) > 1:
                items[-1] = (items[0][0], items[-1][1])
            else:
                items.append(items[0])
        elif fault == "wrong_count":
            items.pop()
        elif fault == "wrong_dim":
            row = fake_embedding(texts[-1], self.dim)[:-1]
            if parsed.encoding == "base64":
                short = b'"' + base64.b64encode(row.astype("<f4").tobytes()) + b'"'
            else:
                short = orjson.dumps([float(v) for v in row])
            items[-1] = (items[-1][0], short)

        parts = [
            b'{"object":"embedding","index":%d,"embedding":%s}' % (i, e)
            if i is not None
            else b'{"object":"embedding","embedding":%s}' % e
            for i, e in items
        ]
        out = (
            b'{"object":"list","data":['
            + b",".join(parts)
            + b'],"model":'
            + orjson.dumps(parsed.model)
        )
        if self.usage:
            tokens = sum(_tokens(t) for t in texts)
            out += b',"usage":{"prompt_tokens":%d,"total_tokens":%d}' % (tokens, tokens)
        return out + b"}"

    async def _send_truncated(
        self, request: web.Request, body: bytes, request_id: str
    ) -> web.StreamResponse:
        """Status 200 and the full Content-Length, then half the body and a FIN."""
        response = web.StreamResponse(status=200, headers={"x-request-id": request_id})
        response.content_type = "application/json"
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        transport = request.transport
        if transport is not None:
            transport.close()
        return response


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m togembed._fakeserver",
        description="Fake Together embeddings server; prints 'READY <base_url>' when listening.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--encoding", choices=("honour", "float", "reject"), default="honour")
    p.add_argument("--fault-rate-429", type=float, default=0.0)
    p.add_argument("--fault-rate-5xx", type=float, default=0.0)
    p.add_argument("--bare-429-rate", type=float, default=0.0, help="429s without any header")
    p.add_argument(
        "--sporadic-429-rate",
        type=float,
        default=0.0,
        help="429s with a wait while the rate-limit headers still show capacity",
    )
    p.add_argument("--sporadic-429-wait", type=float, default=1.0, help="their wait, seconds")
    p.add_argument("--sporadic-429-ms", action="store_true", help="send it as retry-after-ms")
    p.add_argument(
        "--storm",
        default=None,
        metavar="START:SECONDS",
        help="refuse every request with a 429 (empty bucket) from START s after the first "
        "request, for SECONDS",
    )
    p.add_argument("--rpm", type=float, default=None, help="token-bucket limit, requests/min")
    p.add_argument("--tpm", type=float, default=None, help="token-bucket limit, tokens/min")
    p.add_argument("--burst", type=float, default=1.0, help="seconds of burst in the buckets")
    p.add_argument("--no-limit-headers", action="store_true", help="send no x-ratelimit-*")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--max-input-chars", type=int, default=None)
    p.add_argument(
        "--reject-substring", default=None, help="answer 400 to any input containing this"
    )
    p.add_argument("--models", default=None, help="comma-separated allow-list of model names")
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="scripted fault, e.g. 429:retry-after=1 (repeatable, consumed in order)",
    )
    return p


async def _serve(args: argparse.Namespace) -> None:
    server = FakeTogetherServer(
        dim=args.dim,
        latency=args.latency,
        encoding=args.encoding,
        fault_rate_429=args.fault_rate_429,
        fault_rate_5xx=args.fault_rate_5xx,
        bare_429_rate=args.bare_429_rate,
        sporadic_429_rate=args.sporadic_429_rate,
        sporadic_429_wait=args.sporadic_429_wait,
        sporadic_429_ms=args.sporadic_429_ms,
        storm=tuple(float(x) for x in args.storm.split(":")) if args.storm else None,
        rpm=args.rpm,
        tpm=args.tpm,
        burst=args.burst,
        limit_headers=not args.no_limit_headers,
        seed=args.seed,
        api_key=args.api_key,
        max_batch_size=args.max_batch_size,
        max_input_chars=args.max_input_chars,
        reject_substring=args.reject_substring,
        models=None if args.models is None else [m for m in args.models.split(",") if m],
    )
    server.faults.extend(args.fault)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):  # Windows
            loop.add_signal_handler(sig, stop.set)
    url = await server.start(args.host, args.port)
    print(f"READY {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.close()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: serve until SIGTERM/SIGINT."""
    args = _parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
