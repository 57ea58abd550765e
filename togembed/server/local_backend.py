"""The local-model backend: :class:`EmbeddingServer`, a model behind the dynamic batcher.

Owns the local server's options and their defaults, its connection limits (a
``listen.ConnectionGuard``), model names and aliases, ``GET /health``, and its embeddings
handler: read the body within a deadline, validate (``protocol``), wait for the rows from the
``batcher``, and render the answer a slice per event-loop turn, so a big float answer never
stalls the loop, writing it out piece by piece.

May import: ``app``, ``protocol``, ``batcher``, ``listen``, ``togembed.core.config``, aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import threading
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from ..core.config import DEFAULT_HOST, DEFAULT_PORT
from .app import (
    DEFAULT_MAX_BODY_SIZE,
    TogetherServer,
    answer_and_close,
    error_response,
    json_response,
    refusal,
)
from .batcher import Batcher, EmbeddingModel, ModelFailed, ServeStats, Unavailable
from .listen import ConnectionGuard
from .protocol import (
    RequestError,
    check_count,
    list_tail,
    load_body,
    model_entry,
    parse_request,
    render_rows,
)

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_HOST",
    "DEFAULT_KEEPALIVE_TIMEOUT",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_INPUTS_PER_REQUEST",
    "DEFAULT_MAX_WAIT",
    "DEFAULT_PORT",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "EmbeddingServer",
]

logger = logging.getLogger("togembed")

# Texts per model call: sentence-transformers' default batch size, a good CPU trade-off between
# per-call overhead and padding waste.
DEFAULT_MAX_BATCH = 32
# How long a lone request waits for others to share its model call: small next to a CPU
# forward pass (tens of ms), enough for concurrent requests to land in one call.
DEFAULT_MAX_WAIT = 0.005
# OpenAI's documented limit; Together publishes none.
DEFAULT_MAX_INPUTS_PER_REQUEST = 2048
# Seconds close() waits for requests in flight before cutting them off.
DEFAULT_SHUTDOWN_TIMEOUT = 10.0

# Connection limits (aiohttp's server has only an idle timeout of about an hour; docs/serve.md
# has the comparison). A client writes an embeddings request's few hundred bytes of headers at
# once, so the deadlines only ever cut off a stalled or malicious client (slowloris).
#
# Request line and headers: Apache's default (mod_reqtimeout header=20; nginx and Node allow
# 60 s). Also the time a new connection may stay silent.
DEFAULT_HEADER_TIMEOUT = 20.0
# The whole body, from the end of the headers: nginx's client_body_timeout and Node's 60-300 s
# order. A 64 MiB body (max_body_size) then needs ~1.1 MB/s; typical requests are < 5 MB.
DEFAULT_BODY_TIMEOUT = 60.0
# Idle between requests: nginx's keepalive_timeout. Longer than the idle timeouts of the
# clients that talk to us (aiohttp's connector 15 s, httpx/openai-python 5 s), so the client
# closes an idle connection first and never sends a request on one the server is closing
# (the race gunicorn's and AWS's docs warn about with a short server timeout).
DEFAULT_KEEPALIVE_TIMEOUT = 75.0
# Open connections at most (one file descriptor each): nginx's worker_connections default,
# well under the usual 1024 open-files limit and far above what one model worker can use.
# At the cap the idlest keep-alive connection is closed first; only if all are busy is a
# new one answered 503.
DEFAULT_MAX_CONNECTIONS = 512

# Values rendered per event-loop turn, ~2-3 ms each: orjson writes ~13 M float32/s as JSON
# text, base64 goes ~6x faster.
_FLOAT_VALUES_PER_TURN = 32_768
_BASE64_VALUES_PER_TURN = 196_608

_BATCHER = web.AppKey("togembed_batcher", Batcher)
# Shared by all requests of an app: answers finishing together take turns rendering slices.
_RENDER_TURN = web.AppKey("togembed_render_turn", asyncio.Lock)


class EmbeddingServer(TogetherServer):
    """An aiohttp server speaking Together's ``/v1/embeddings`` and ``/v1/models``, backed by
    ``model`` (any object with :class:`EmbeddingModel`'s interface).

    ``api_key``: None (or "") accepts any bearer key or none; otherwise requests must carry
    ``Authorization: Bearer <api_key>``. ``aliases``: other model names accepted for the model
    (e.g. Together's names); ``"*"`` accepts any name. ``max_batch`` texts per model call;
    ``max_wait`` seconds a request waits for others to share its call;
    ``max_inputs_per_request`` inputs per request (413 beyond).

    Connection limits (None: no limit): ``header_timeout`` seconds for a request's line and
    headers (the connection is closed, after a 408 if part of a request arrived);
    ``body_timeout`` seconds for its body (408, connection closed); ``keepalive_timeout``
    seconds an idle connection stays open between requests; ``max_connections`` open at
    once (beyond: the idlest keep-alive connection is closed, or the new one gets a 503).
    """

    guarded = True

    def __init__(
        self,
        model: EmbeddingModel,
        *,
        api_key: str | None = None,
        aliases: Iterable[str] = (),
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait: float = DEFAULT_MAX_WAIT,
        max_inputs_per_request: int = DEFAULT_MAX_INPUTS_PER_REQUEST,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        access_log: bool = False,
        header_timeout: float | None = DEFAULT_HEADER_TIMEOUT,
        body_timeout: float | None = DEFAULT_BODY_TIMEOUT,
        keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
        max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        for name, value in (
            ("max_batch", max_batch),
            ("max_inputs_per_request", max_inputs_per_request),
            ("max_body_size", max_body_size),
            ("max_connections", 1 if max_connections is None else max_connections),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not max_wait >= 0:
            raise ValueError(f"max_wait must be >= 0 seconds, got {max_wait!r}")
        if not shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {shutdown_timeout!r}")
        for name, value, optional in (
            ("header_timeout", header_timeout, True),
            ("body_timeout", body_timeout, True),
            ("keepalive_timeout", keepalive_timeout, False),
        ):
            if value is None and optional:
                continue  # no limit
            if value is None or not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        if int(model.dim) < 1:
            raise ValueError(f"model.dim must be >= 1, got {model.dim!r}")
        super().__init__(
            api_key=api_key or None,  # "" (an unset environment variable) means no key
            shutdown_timeout=float(shutdown_timeout),
            max_body_size=max_body_size,
            access_log=access_log,
            keepalive_timeout=float(keepalive_timeout),
        )
        self.model = model
        self.model_name: str = model.name
        self.dim = int(model.dim)
        self.max_tokens = int(model.max_tokens)
        aliases = [aliases] if isinstance(aliases, str) else list(aliases)
        self.accept_any_model = "*" in aliases
        self.aliases: tuple[str, ...] = tuple(
            dict.fromkeys(a for a in aliases if a not in ("*", self.model_name))
        )
        self.max_batch = max_batch
        self.max_wait = float(max_wait)
        self.max_inputs_per_request = max_inputs_per_request
        self.header_timeout = None if header_timeout is None else float(header_timeout)
        self.body_timeout = None if body_timeout is None else float(body_timeout)
        self.max_connections = max_connections
        self.stats = ServeStats()
        self._names = frozenset((self.model_name, *self.aliases))
        self._created = int(time.time())
        # Held around model calls: one caller at a time even if make_app() runs twice.
        self._model_lock = threading.Lock()

    def __repr__(self) -> str:
        where = self._base_url or "not started"
        return f"<togembed.EmbeddingServer {where} model={self.model_name!r} dim={self.dim}>"

    # -- lifecycle ---------------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        """``GET /health``; the batcher starts and stops with the app (on_startup /
        on_cleanup), so ``web.run_app(server.make_app())`` works too."""
        app.router.add_get("/health", self._handle_health)
        app.on_startup.append(self._start_batcher)
        app.on_cleanup.append(self._stop_batcher)

    def _make_guard(self) -> ConnectionGuard:
        return ConnectionGuard(
            header_timeout=self.header_timeout,
            max_connections=self.max_connections,
            stats=self.stats,
        )

    async def start(self, host: str = DEFAULT_HOST, port: int = 0) -> str:
        """Listen on ``host:port`` (0 = a free port) and return :attr:`base_url`.

        Raises :class:`ListenError` (an ``OSError``) if the address cannot be bound."""
        base_url = await super().start(host, port)
        logger.info("serving %s (dim %d) at %s", self.model_name, self.dim, base_url)
        return base_url

    @property
    def open_connections(self) -> int:
        """Connections open now (idle keep-alive ones included)."""
        return len(self._guard.open) if self._guard is not None else 0

    async def _start_batcher(self, app: web.Application) -> None:
        batcher = Batcher(
            self.model,
            max_batch=self.max_batch,
            max_wait=self.max_wait,
            stats=self.stats,
            model_lock=self._model_lock,
        )
        batcher.start()
        app[_BATCHER] = batcher
        app[_RENDER_TURN] = asyncio.Lock()

    async def _stop_batcher(self, app: web.Application) -> None:
        batcher = app.get(_BATCHER)
        if batcher is not None:
            await batcher.aclose()

    # -- models --------------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        return [self.model_name, *self.aliases]

    def model_entry(self, name: str) -> dict[str, Any]:
        return model_entry(
            name,
            created=self._created,
            owned_by="togembed",
            root=self.model_name,
            context_length=self.max_tokens,
            dimension=self.dim,
        )

    def knows_model(self, name: str) -> bool:
        return self.accept_any_model or name in self._names

    def model_error(self, name: str) -> RequestError:
        """Together's 404 for an unknown model, but naming what this server does serve and
        how to make it answer to ``name`` (a client written for Together sends its names)."""
        shown = name if len(name) <= 200 else name[:200] + "..."
        served = self.model_name
        if self.aliases:
            served += f" (also answering to {', '.join(self.aliases)})"
        return RequestError(
            404,
            f"Unable to access model {shown}: this togembed server serves {served} only. "
            f"To accept the name {shown} for {self.model_name}, start the server with "
            f"`togembed serve --alias {shlex.quote(shown)}` (or `--alias '*'` for any name; "
            "EmbeddingServer(aliases=[...]) in Python).",
            code="model_not_found",
        )

    # -- handlers ----------------------------------------------------------------------------

    async def _handle_health(self, request: web.Request) -> web.Response:
        body = {"status": "ok", "model": self.model_name, "dim": self.dim}
        return json_response(200, orjson.dumps(body))

    async def _handle_embeddings(self, request: web.Request) -> web.StreamResponse:
        denied = self._denied(request)
        if denied is not None:
            return denied
        try:
            raw = await asyncio.wait_for(request.read(), self.body_timeout)
        except asyncio.TimeoutError:
            self.stats.body_timeouts += 1
            message = f"The request body did not arrive within {self.body_timeout:g} s."
            return await answer_and_close(
                request, error_response(408, message, code="request_timeout")
            )
        except web.HTTPRequestEntityTooLarge:
            message = f"Request too large: the body exceeds {self.max_body_size} bytes"
            return error_response(413, message, param="input")
        try:
            parsed = parse_request(load_body(raw))
            if not self.knows_model(parsed.model):
                raise self.model_error(parsed.model)
            check_count(parsed.texts, self.max_inputs_per_request)
        except RequestError as exc:
            return refusal(exc)
        self.stats.requests += 1
        self.stats.inputs += len(parsed.texts)
        try:
            vectors, tokens = await request.app[_BATCHER].submit(parsed.texts)
        except ModelFailed as exc:
            return error_response(
                500, f"The model failed to embed the input: {exc}", "server_error"
            )
        except Unavailable:
            return error_response(503, "The server is shutting down.", "service_unavailable")
        pieces = await _render(
            self.model_name, vectors, tokens, parsed.encoding, request.app[_RENDER_TURN]
        )
        if len(pieces) <= 2:
            return json_response(200, b"".join(pieces))
        # A big answer goes out piece by piece, each write waiting for the socket to drain:
        # no tens-of-MB join or buffer copy in one loop turn, and a slow reader is not flooded.
        response = web.StreamResponse()
        response.content_type = "application/json"
        response.content_length = sum(map(len, pieces))
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
        await response.write_eof()
        return response


async def _render(
    model: str, vectors: np.ndarray, tokens: np.ndarray, encoding: str, turn: asyncio.Lock
) -> list[bytes]:
    """Together's response body as consecutive pieces, one slice of rows per event-loop turn;
    ``turn`` is shared by all requests, so answers finishing together take turns instead of
    rendering back to back in one (a 2048 x 1024 float answer is ~160 ms of work)."""
    n, dim = vectors.shape
    b64 = encoding == "base64"
    step = max(1, (_BASE64_VALUES_PER_TURN if b64 else _FLOAT_VALUES_PER_TURN) // dim)
    pieces: list[bytes] = []
    for start in range(0, n, step):
        if start:
            await asyncio.sleep(0)
        async with turn:
            pieces.append(render_rows(vectors, start, start + step, b64))
    pieces.append(list_tail(model, int(tokens.sum())))
    return pieces
