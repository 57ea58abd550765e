"""The fake backend: :class:`FakeTogetherServer`, Together's API with faults on request.

Owns the fake's options, its embeddings handler (in order: scripted fault, latency, the
API key, validation, rate limits, storms and random faults, then the ready-made rows), its
counters and request log, and the routes tests and benchmarks drive it with from another
process (``GET /stats``, ``POST /stats/reset``, ``POST /faults``). Everything that speaks
Together's protocol is the shared app's (``..app``, ``..protocol``).

May import: ``..app``, ``..protocol``, the fake's own modules (``vectors``, ``faults``,
``limits``, ``stats``, ``wire``), aiohttp.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Collection
from typing import Any

from aiohttp import web

from ..app import TogetherServer, json_response, refusal
from ..protocol import (
    ITEM,
    LIST_HEAD,
    EncodingMode,
    Parsed,
    RequestError,
    list_tail,
    load_body,
    parse_request,
)
from .control import add_control_routes
from .faults import BODY_KINDS, CONNECTION_KINDS, FaultQueue, mangle_items
from .limits import Limits, check_inputs, retry_headers
from .stats import RequestRecord, ServerStats
from .vectors import approx_tokens, codec
from .wire import dynamic_429, fault_answer, random_fault, rate_limit_refusal, send_truncated

__all__ = ["DEFAULT_MODELS", "FakeTogetherServer"]

DEFAULT_MODELS = (
    "togethercomputer/m2-bert-80M-8k-retrieval",
    "BAAI/bge-base-en-v1.5",
    "BAAI/bge-large-en-v1.5",
    "WhereIsAI/UAE-Large-V1",
)
"""What ``GET /v1/models`` lists when the server accepts any model."""

# aiohttp >= 3.12 warns about plain string keys on requests.
_LIMIT_HEADERS: Any = (
    web.RequestKey("limit_headers", dict) if hasattr(web, "RequestKey") else "limit_headers"
)
"""Rate-limit headers computed for a request, added to whatever answer it gets."""

_ITEM_NO_INDEX = b'{"object":"embedding","embedding":%s}'  # the missing_index fault


class FakeTogetherServer(TogetherServer):
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
        super().__init__(api_key=api_key, shutdown_timeout=shutdown_timeout)
        self.dim = dim
        self.latency = latency
        self.encoding: EncodingMode = encoding
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
        self.limits = (
            Limits(rpm=rpm, tpm=tpm, burst=burst, now=time.monotonic()) if rpm or tpm else None
        )
        self.limit_headers = limit_headers
        self.request_id_prefix = request_id_prefix

        self.faults: FaultQueue = FaultQueue()
        self.stats = ServerStats()
        self.disconnects = 0
        self.in_flight = 0
        self.max_in_flight = 0

        self._rng = random.Random(seed)
        self._ids = itertools.count(1)
        self._codec = codec(dim)

    # -- the app ------------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        add_control_routes(app, self)

    def new_request_id(self) -> str:
        return f"{self.request_id_prefix}{next(self._ids):08d}"

    async def _prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        await super()._prepare(request, response)
        limit_headers = request.get(_LIMIT_HEADERS)
        if limit_headers and response.status != 429:
            for name, value in limit_headers.items():
                response.headers.setdefault(name, value)

    def model_names(self) -> list[str]:
        return sorted(self.models) if self.models is not None else list(DEFAULT_MODELS)

    def knows_model(self, name: str) -> bool:
        return self.models is None or name in self.models

    # -- stats --------------------------------------------------------------------------

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

    # -- the seam -----------------------------------------------------------------------

    def check_rate_limit(self, request: web.Request, parsed: Parsed) -> web.Response | None:
        """Return a 429 response to refuse the request, or None to let it through. Called once
        per valid embeddings request; override for other limit schemes."""
        if self.limits is None:
            return None
        tokens = sum(approx_tokens(t) for t in parsed.texts)
        verdict = self.limits.admit(time.monotonic(), tokens)
        if self.limit_headers:
            request[_LIMIT_HEADERS] = verdict.headers
        if verdict.wait is None:
            return None
        headers = {**retry_headers(verdict.wait), **(verdict.headers if self.limit_headers else {})}
        return rate_limit_refusal(verdict.short, headers)

    # -- embeddings ---------------------------------------------------------------------

    async def _handle_embeddings(self, request: web.Request) -> web.StreamResponse:
        now = time.monotonic()
        if self._first_request is None:
            self._first_request = now
        record = RequestRecord(request_id=self.new_request_id(), at=now - self._first_request)
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
        # What the body asked for is noted before any fault can intervene.
        body = load_body(await request.read())
        self.stats.inputs += record.note(body)
        fault = self.faults.popleft() if self.faults else None
        if fault is not None:
            record.fault = fault.kind
        delay = self.latency + (fault.delay if fault is not None and fault.kind == "slow" else 0)
        if delay > 0 and not await self._sleep(request, record, delay):
            return None
        if fault is not None:
            answer = fault_answer(request, fault)
            if answer is not None or fault.kind in CONNECTION_KINDS:
                return answer
        denied = self._denied(request)
        if denied is not None:
            return denied
        try:
            parsed = self._validate(body)
        except RequestError as exc:
            return refusal(exc)
        limited = self.check_rate_limit(request, parsed)
        if limited is not None:
            return limited
        if fault is None:
            unscripted = self._unscripted_fault(request, record)
            if unscripted is not None:
                return unscripted
        kind = fault.kind if fault is not None and fault.kind in BODY_KINDS else None
        rendered = self._render(parsed, kind)
        if kind == "truncate":
            return await send_truncated(request, rendered, record.request_id)
        if kind == "malformed":
            rendered = rendered[: max(1, len(rendered) // 2)]
        return json_response(200, rendered)

    def _unscripted_fault(self, request: web.Request, record: RequestRecord) -> web.Response | None:
        """A storm's 429 (the bucket shown empty), a sporadic 429 (the bucket may still show
        room) or a random fault, if one is due."""
        storm = self.storm  # (start, duration)
        if storm is not None and storm[0] <= record.at < storm[0] + storm[1]:
            record.fault = "storm"
        elif self.sporadic_429_rate > 0 and self._rng.random() < self.sporadic_429_rate:
            record.fault = "sporadic_429"
        else:
            answer = random_fault(
                self._rng,
                rate_429=self.fault_rate_429,
                rate_5xx=self.fault_rate_5xx,
                bare_429_rate=self.bare_429_rate,
            )
            if answer is not None:
                record.fault = f"random_{answer.status}"
            return answer
        return dynamic_429(
            request.get(_LIMIT_HEADERS),
            self.sporadic_429_wait,
            in_ms=self.sporadic_429_ms,
            empty=record.fault == "storm",
        )

    def _validate(self, body: Any) -> Parsed:
        """Validate like Together does; raise RequestError."""
        parsed = parse_request(body, self.encoding)
        if not self.knows_model(parsed.model):
            raise self.model_error(parsed.model)
        check_inputs(
            parsed.texts,
            max_batch_size=self.max_batch_size,
            too_large_status=self.too_large_status,
            max_input_chars=self.max_input_chars,
            too_long_status=self.too_long_status,
            reject_substring=self.reject_substring,
        )
        return parsed

    def _render(self, parsed: Parsed, fault: str | None) -> bytes:
        """Build the response JSON by hand from pre-rendered rows (the hot path)."""
        b64 = parsed.encoding == "base64"
        items = self._codec.items(parsed.texts, b64)
        if fault is not None:
            mangle_items(items, fault, self._rng, parsed.texts, self.dim, b64)
        parts = [ITEM % (i, e) if i is not None else _ITEM_NO_INDEX % e for i, e in items]
        tokens = sum(approx_tokens(t) for t in parsed.texts) if self.usage else None
        return b"".join((LIST_HEAD, b",".join(parts), list_tail(parsed.model, tokens)))
