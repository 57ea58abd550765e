"""The one aiohttp app that speaks Together's protocol; a backend says how to answer.

Owns the HTTP side both servers share: the routes (``POST /v1/embeddings``, ``GET /v1/models``
and ``/v1/models/{id}``), the API-key check, ``x-request-id`` on every answer, Together's JSON
error responses (also for aiohttp's own 404/405 and for unexpected failures), and the
lifecycle (start, close, ``base_url``, ``async with``). :class:`TogetherServer` is the base
class; a backend (``local_backend.EmbeddingServer``, ``fake.FakeTogetherServer``) implements
``_handle_embeddings`` and its model names, and may add routes.

May import: ``protocol`` (the pure part), ``listen``, ``togembed.core.config``, aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, TypeVar

import orjson
from aiohttp import web

from ..core.config import DEFAULT_HOST, is_loopback_url
from .listen import ConnectionGuard, listen, track_requests
from .protocol import (
    RequestError,
    authorized,
    error_body,
    model_entry,
    model_list,
    model_not_available,
)

__all__ = [
    "DEFAULT_MAX_BODY_SIZE",
    "TogetherServer",
    "answer_and_close",
    "error_response",
    "is_loopback_host",
    "json_errors",
    "json_response",
    "refusal",
]

logger = logging.getLogger("togembed")

_Server = TypeVar("_Server", bound="TogetherServer")

# 2048 inputs of ~8k tokens of text.
DEFAULT_MAX_BODY_SIZE = 64 * 1024 * 1024


def json_response(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    """An ``application/json`` answer from ready bytes."""
    return web.Response(status=status, body=body, headers=headers, content_type="application/json")


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    *,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """Together's JSON error answer."""
    return json_response(status, error_body(message, type_, param, code), headers)


def refusal(exc: RequestError) -> web.Response:
    """The answer to a request the protocol refused."""
    return json_response(exc.status, exc.body())


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost; ``0.0.0.0`` and ``::`` (every interface) are not."""
    host = host.strip("[]")
    return host != "" and is_loopback_url(f"http://[{host}]/" if ":" in host else f"http://{host}/")


async def answer_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send ``response`` and close the connection at once: the rest of the request is not
    coming (aiohttp would otherwise wait up to 10 s more for it, to discard it)."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if request.transport is not None:
        request.transport.close()
    return response


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own answers (no route, wrong method, body too large) and unexpected failures
    in Together's JSON error shape instead of text/plain."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {
            404: f"Not found: {request.method} {request.path}",
            405: f"Method {request.method} not allowed for {request.path}",
        }.get(exc.status, exc.reason)
        response = error_response(exc.status, message)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except (asyncio.CancelledError, ConnectionError):  # the client went away mid-answer
        raise
    except Exception:
        logger.exception(
            "togembed server: unexpected error for %s %s", request.method, request.path
        )
        return error_response(500, "Internal server error", "server_error")


class TogetherServer:
    """Start, stop and route a Together-compatible server; subclasses are the backends.

    A backend implements ``_handle_embeddings``, ``model_names`` and ``knows_model``; it may
    override ``model_entry`` and ``model_error`` (Together's by default), ``_add_routes``
    (more routes, startup/cleanup hooks), ``new_request_id`` and ``_prepare``, and set
    ``guarded`` to get per-connection limits from ``_make_guard`` under :meth:`start`.
    """

    guarded = False  # True: connections go through _make_guard()'s ConnectionGuard

    def __init__(
        self,
        *,
        api_key: str | None,
        shutdown_timeout: float,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        access_log: bool = False,
        keepalive_timeout: float | None = None,
    ) -> None:
        self.api_key = api_key
        self.shutdown_timeout = shutdown_timeout
        self.max_body_size = max_body_size
        self.access_log = access_log
        self.keepalive_timeout = keepalive_timeout
        self._runner: web.AppRunner | None = None
        self._guard: ConnectionGuard | None = None
        self._base_url: str | None = None
        self._exposed = False
        self._closing = False

    # -- what a backend provides ---------------------------------------------------------

    async def _handle_embeddings(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    def model_names(self) -> list[str]:
        """The names ``GET /v1/models`` lists."""
        raise NotImplementedError

    def knows_model(self, name: str) -> bool:
        raise NotImplementedError

    def model_entry(self, name: str) -> dict[str, Any]:
        """The ``/v1/models`` entry of a name this server knows."""
        return model_entry(name)

    def model_error(self, name: str) -> RequestError:
        """The refusal of a model this server does not serve: Together's 404."""
        return model_not_available(name)

    def _add_routes(self, app: web.Application) -> None:
        """More routes and hooks for the app :meth:`make_app` builds."""

    def _make_guard(self) -> ConnectionGuard:
        raise NotImplementedError

    def new_request_id(self) -> str:
        return f"req-{uuid.uuid4().hex}"

    async def _prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Runs as each answer's headers go out: every answer carries a request id."""
        if "x-request-id" not in response.headers:
            response.headers["x-request-id"] = self.new_request_id()

    # -- lifecycle -------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """The aiohttp application (usable with ``web.run_app`` or aiohttp's test utilities;
        the connection limits apply only under :meth:`start`)."""
        middlewares = [track_requests, json_errors] if self.guarded else [json_errors]
        app = web.Application(client_max_size=self.max_body_size, middlewares=middlewares)
        app.router.add_post("/v1/embeddings", self._handle_embeddings)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/v1/models/{name:.+}", self._handle_model)
        app.on_response_prepare.append(self._prepare)
        self._add_routes(app)
        return app

    async def start(self, host: str = DEFAULT_HOST, port: int = 0) -> str:
        """Listen on ``host:port`` (0 = a free port) and return :attr:`base_url`.

        Raises :class:`~togembed.server.ListenError` (an ``OSError``) if the address cannot be
        bound."""
        if self._runner is not None:
            raise RuntimeError("server already started")
        guard = self._make_guard() if self.guarded else None
        # handler_cancellation: a handler whose client went away is cancelled.
        runner, self._base_url = await listen(
            self.make_app(),
            host,
            port,
            shutdown_timeout=self.shutdown_timeout,
            access_log=logging.getLogger("togembed.access") if self.access_log else None,
            keepalive_timeout=self.keepalive_timeout,
            guard=guard,
        )
        self._runner, self._guard, self._closing = runner, guard, False
        self._exposed = not all(is_loopback_host(a[0]) for a in runner.addresses)
        return self._base_url

    async def close(self) -> None:
        """Stop listening, let requests in flight finish (up to ``shutdown_timeout``), run the
        app's cleanup. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            self._closing = True
            await runner.cleanup()

    async def __aenter__(self: _Server) -> _Server:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1`` (for togembed and openai-python); after :meth:`start`."""
        if self._base_url is None:
            raise RuntimeError("server not started")
        return self._base_url

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT`` (for the together SDK, which adds ``/v1`` itself)."""
        return self.base_url.removesuffix("/v1")

    @property
    def exposed(self) -> bool:
        """True when listening on an address other machines can reach (0.0.0.0, a LAN IP)."""
        return self._exposed

    # -- shared handlers -------------------------------------------------------------------

    def _denied(self, request: web.Request) -> web.Response | None:
        """Together's 401 unless the request carries the server's key (if it has one)."""
        if authorized(request.headers.get("Authorization", ""), self.api_key):
            return None
        return error_response(401, "Invalid API key provided", code="invalid_api_key")

    async def _handle_models(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        entries = [self.model_entry(name) for name in self.model_names()]
        return json_response(200, orjson.dumps(model_list(entries)))

    async def _handle_model(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        name = request.match_info["name"]
        if not self.knows_model(name):
            return refusal(self.model_error(name))
        return json_response(200, orjson.dumps(self.model_entry(name)))
