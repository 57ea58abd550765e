"""Start an aiohttp app on host:port and name its base URL: shared by our two servers.

aiohttp's server has an idle keep-alive timeout and nothing else: a client that opens a
connection and sends half a request head keeps it, and its memory, for as long as it likes
(slowloris). :class:`ConnectionGuard` adds what production servers have: the request line and
headers must arrive within a deadline, and the number of open connections is capped. It wraps
each connection's aiohttp protocol and learns where a request starts and ends from
:func:`track_requests`, a middleware; the body's own deadline is the handler's (it reads it).

May import: the standard library, orjson, aiohttp; nothing else of togembed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Any, Protocol

import orjson
from aiohttp import web

__all__ = ["ConnectionGuard", "GuardStats", "ListenError", "listen", "track_requests"]


class ListenError(OSError):
    """The server cannot listen on host:port: the address is in use, a port below 1024 needs
    privileges, the host is not an address of this machine or is unknown."""

    def __init__(self, host: str, port: int, exc: OSError) -> None:
        self.unknown_host = isinstance(exc, socket.gaierror)  # its errno is not an errno.E*
        if self.unknown_host:
            reason = f"unknown host ({exc.strerror or exc})"
        else:
            reason = _REASONS.get(exc.errno or 0) or (exc.strerror or str(exc)).lower()
        super().__init__(exc.errno, reason)
        self.host = host
        self.port = port
        self.reason = reason
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def __str__(self) -> str:
        return f"cannot listen on {self.address}: {self.reason}"


_REASONS = {
    errno.EADDRINUSE: "address already in use",
    errno.EACCES: "permission denied",
    errno.EADDRNOTAVAIL: "address not available on this machine",
}


async def listen(
    app: web.Application,
    host: str,
    port: int,
    *,
    shutdown_timeout: float,
    access_log: logging.Logger | None = None,
    keepalive_timeout: float | None = None,
    guard: ConnectionGuard | None = None,
) -> tuple[web.AppRunner, str]:
    """The running app and its ``http://HOST:PORT/v1`` (port 0 = any free port; a wildcard
    address is named by its loopback address, so clients on this machine can use the URL).
    Raises :class:`ListenError` if the address cannot be bound.

    ``handler_cancellation``: aiohttp (>= 3.9) no longer cancels a handler whose client went
    away unless asked; both servers want that (to count disconnects, to drop queued work).
    ``keepalive_timeout``: seconds an idle connection stays open between requests (None:
    aiohttp's default, about an hour). ``guard``: per-connection limits (the app must use
    :func:`track_requests`).
    """
    kwargs: dict[str, Any] = {}
    if keepalive_timeout is not None:
        kwargs["keepalive_timeout"] = keepalive_timeout
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=access_log,
        shutdown_timeout=shutdown_timeout,
        **kwargs,
    )
    await runner.setup()
    try:
        site: web.BaseSite = (
            web.TCPSite(runner, host, port)
            if guard is None
            else _GuardedSite(runner, host, port, guard)
        )
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(host, port, exc) from exc
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    if bound_host in ("0.0.0.0", "::"):
        bound_host = "127.0.0.1" if bound_host == "0.0.0.0" else "::1"
    if ":" in bound_host:
        bound_host = f"[{bound_host}]"
    return runner, f"http://{bound_host}:{bound_port}/v1"


# ---------------------------------------------------------------------------------------------
# Per-connection limits


class GuardStats(Protocol):
    """Where a guard counts what it did (``togembed.server.ServeStats`` has these)."""

    header_timeouts: int
    refused_connections: int
    idle_closed: int


class _NoStats:
    def __init__(self) -> None:
        self.header_timeouts = 0
        self.refused_connections = 0
        self.idle_closed = 0


class ConnectionGuard:
    """The limits one server enforces on its connections, and the connections open now.

    ``header_timeout``: seconds for a request's line and headers to arrive, counted from the
    connection's opening for its first request and from the first byte of each later one
    (None: no limit). When it runs out the connection is closed, after a 408 if part of a
    request had arrived (a 408 on a connection that sent nothing would be read by a client as
    the answer to its next request). ``max_connections``: open connections at most (None: no
    cap). At the cap a new connection closes the longest-open idle keep-alive one, as nginx
    does, or, if every connection is busy, is answered 503 and closed.
    """

    def __init__(
        self,
        *,
        header_timeout: float | None,
        max_connections: int | None,
        stats: GuardStats | None = None,
    ) -> None:
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.stats: GuardStats = stats if stats is not None else _NoStats()
        self.open: dict[_Connection, None] = {}  # insertion order: oldest first

    def _admit(self, conn: _Connection) -> bool:
        cap = self.max_connections
        if cap is not None and len(self.open) >= cap:
            idle = next((c for c in self.open if c.idle), None)
            if idle is None:
                self.stats.refused_connections += 1
                return False
            self.stats.idle_closed += 1
            idle.close()
        self.open[conn] = None
        return True


def _canned(status: int, reason: str, message: str, type_: str, code: str) -> bytes:
    """A whole HTTP/1.1 response in Together's error shape, written before closing."""
    body = orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
    )
    if status == 503:
        head += "Retry-After: 1\r\n"
    return head.encode() + b"\r\n" + body


class _Connection(asyncio.Protocol):
    """One accepted connection: aiohttp's protocol inside, the header deadline around it.

    Phases: *head* (bytes of a request may be arriving; the timer runs), *busy* (a handler
    runs: the head is complete, the body is the handler's to time), *idle* (between
    requests: aiohttp's keep-alive timeout applies). Bytes that arrive while the last
    request's body is unfinished are that body (aiohttp discards what a handler left
    unread), not a new head.
    """

    def __init__(self, guard: ConnectionGuard, make_handler: web.Server) -> None:
        self._guard = guard
        self._make_handler = make_handler
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False
        self._head_bytes = False  # bytes of the pending request's head have arrived
        self._payload: Any = None  # the last request's body stream (aiohttp StreamReader)

    @property
    def idle(self) -> bool:
        """No request in progress and no byte of the next one received."""
        return not self._busy and not self._head_bytes and self._body_done()

    def _body_done(self) -> bool:
        return self._payload is None or self._payload.is_eof()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if not self._guard._admit(self):
            cap = self._guard.max_connections
            transport.write(
                _canned(
                    503,
                    "Service Unavailable",
                    f"Too many connections: this server serves at most {cap} at once. "
                    "Retry in a moment.",
                    "service_unavailable",
                    "too_many_connections",
                )
            )
            transport.close()
            return
        self._inner = self._make_handler()
        self._arm()  # a new connection's first request must arrive in time too
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if not self._busy and self._body_done():
            if self._timer is None and not self._head_bytes:
                # The first byte of a request on a kept-alive connection: its head is timed
                # from now, and aiohttp's keep-alive timer (which would cut it off) stops.
                self._arm()
                if isinstance(self._inner, web.RequestHandler):
                    self._inner.keep_alive(True)
            self._head_bytes = True
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self._guard.open.pop(self, None)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # -- what track_requests tells us ---------------------------------------------------------

    def request_started(self, payload: Any) -> None:
        self._disarm()
        self._busy = True
        self._head_bytes = False
        self._payload = payload

    def request_finished(self) -> None:
        self._busy = False

    # -- the deadline --------------------------------------------------------------------------

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _arm(self) -> None:
        timeout = self._guard.header_timeout
        if timeout is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(timeout, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        transport = self._transport
        if self._busy or transport is None or transport.is_closing():
            return
        self._guard.stats.header_timeouts += 1
        if self._head_bytes:
            transport.write(
                _canned(
                    408,
                    "Request Timeout",
                    f"The request line and headers did not arrive within "
                    f"{self._guard.header_timeout:g} s.",
                    "invalid_request_error",
                    "request_timeout",
                )
            )
        transport.close()


class _GuardedSite(web.BaseSite):
    """aiohttp's TCPSite, with each connection's protocol wrapped in a :class:`_Connection`."""

    __slots__ = ("_guard", "_host", "_port")

    def __init__(self, runner: web.AppRunner, host: str, port: int, guard: ConnectionGuard):
        super().__init__(runner)
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        handlers = self._runner.server
        assert handlers is not None
        guard = self._guard
        self._server = await loop.create_server(
            lambda: _Connection(guard, handlers), self._host, self._port, backlog=self._backlog
        )


@web.middleware
async def track_requests(request: web.Request, handler: Any) -> web.StreamResponse:
    """Tell a guarded connection where each request's head ends and its handling ends (a no-op
    under aiohttp's own runners, whose connections are not guarded)."""
    transport = request.transport
    conn = transport.get_protocol() if transport is not None else None
    if not isinstance(conn, _Connection):
        return await handler(request)
    conn.request_started(request.content)
    try:
        return await handler(request)
    finally:
        conn.request_finished()
