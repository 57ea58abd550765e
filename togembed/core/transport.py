"""HTTP transport: the only module that imports aiohttp. One method, so tests can swap in a fake."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Coroutine, Mapping
from typing import Any, Protocol

import aiohttp
import attrs

from .errors import APIConnectionError, APITimeoutError, TooManyRedirectsError

__all__ = ["AiohttpTransport", "Response", "Transport"]

# aiohttp warns (ResourceWarning) about bytes bodies over 1 MiB and writes them in one go;
# a BytesIO it writes in chunks, yielding to the loop between them. Smaller bodies stay bytes:
# the common case pays nothing.
_LARGE_BODY = 2**20
# aiohttp's own default; a POST API that redirects more than this is misconfigured.
_MAX_REDIRECTS = 10


@attrs.frozen
class Response:
    """A complete HTTP answer. ``headers`` must be case-insensitive (aiohttp's are)."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class Transport(Protocol):
    """What the client needs from HTTP: POST bytes, get the whole answer or a typed error.
    (``client.models.list()`` also uses an optional ``get(url, headers, timeout)``.)"""

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> Response: ...

    async def aclose(self) -> None: ...


class AiohttpTransport:
    """aiohttp-backed transport. Creates its session lazily inside the running loop, and closes
    only a session it created; a user's session is used as is and left open."""

    def __init__(self, session: aiohttp.ClientSession | None = None, *, limit: int = 100) -> None:
        self._session = session
        self._owns_session = session is None
        self._limit = limit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("this togembed client is closed")
        loop = asyncio.get_running_loop()
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._limit, limit_per_host=0)
            self._session = aiohttp.ClientSession(connector=connector)
            self._loop = loop
        elif self._owns_session and self._loop is not loop:
            raise RuntimeError(
                "a togembed AsyncClient is bound to the event loop it was first used in; "
                "create one client per event loop (or use togembed.Client from sync code)"
            )
        return self._session

    def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> Coroutine[Any, Any, Response]:
        # Not itself a coroutine: the request's own is all that stays alive while it waits.
        data: Any = io.BytesIO(body) if len(body) > _LARGE_BODY else body
        return self._request("POST", url, headers, timeout, data=data)

    def get(
        self, url: str, headers: Mapping[str, str], timeout: float
    ) -> Coroutine[Any, Any, Response]:
        return self._request("GET", url, headers, timeout)

    async def _request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        timeout: float,
        *,
        data: Any = None,
    ) -> Response:
        session = self._get_session()
        try:
            async with session.request(
                method,
                url,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
                max_redirects=_MAX_REDIRECTS,
            ) as resp:
                body = await resp.read()
                return Response(status=resp.status, headers=resp.headers, body=body)
        except TimeoutError as exc:  # aiohttp's timeouts subclass TimeoutError
            raise APITimeoutError(f"request timed out after {timeout:g} s") from exc
        except aiohttp.TooManyRedirects as exc:
            raise _redirect_error(method, url, exc) from exc
        except aiohttp.ClientConnectorError as exc:  # refused, DNS, unreachable, TLS handshake
            raise APIConnectionError(
                f"cannot connect: {type(exc).__name__}: {exc}", connect_failed=True
            ) from exc
        except aiohttp.ClientError as exc:
            raise APIConnectionError(f"connection error: {type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            raise APIConnectionError(f"connection error: {exc}") from exc

    async def aclose(self) -> None:
        """Close the session if we created it — from any event loop: on the loop that owns
        its connections if that loop still runs (in another thread), else by closing the
        sockets at once (a loop that stopped or was closed will never run their cleanup)."""
        self._closed = True
        session, self._session = self._session, None
        if not self._owns_session or session is None or session.closed:
            return
        owner = self._loop
        if owner is None or owner is asyncio.get_running_loop():
            await session.close()
            return
        if owner.is_running():  # in another thread: close there, and wait for it
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(session.close(), owner))
            return
        if not owner.is_closed():  # stopped: run it once more, in a worker thread, to close
            try:
                await asyncio.to_thread(owner.run_until_complete, session.close())
                return
            except RuntimeError:  # someone started it meanwhile, or closed it
                pass
        close_sockets_now(session)
        with contextlib.suppress(Exception):  # bookkeeping only: the sockets are closed
            await session.close()


def close_sockets_now(session: aiohttp.ClientSession) -> None:
    """Close every socket of ``session``'s connector without its event loop, which has stopped
    or closed (aiohttp's own close needs that loop, and skips a closed one, leaking the file
    descriptors). Uses asyncio's transport internals, so only on this fallback path."""
    connector = session.connector
    if connector is None:
        return
    protocols = [proto for conns in getattr(connector, "_conns", {}).values() for proto, _ in conns]
    protocols += list(getattr(connector, "_acquired", ()))
    for proto in protocols:
        transport = getattr(proto, "transport", None)
        while transport is not None:
            inner = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
            sock = getattr(transport, "_sock", None)
            # Either would make the transport warn "unclosed transport" at GC (and close again).
            with contextlib.suppress(AttributeError):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()
                    transport._sock = None
                if getattr(transport, "_closed", True) is False:  # an SSL transport
                    transport._closed = True
            transport = inner


def _redirect_error(method: str, url: str, exc: aiohttp.TooManyRedirects) -> TooManyRedirectsError:
    history = getattr(exc, "history", ()) or ()
    last = history[-1] if history else None
    location = last.headers.get("Location") if last is not None else None
    status = last.status if last is not None else 310
    seen = dict.fromkeys(str(r.headers.get("Location", "?")) for r in history)
    hops = ", ".join(list(seen)[-3:])
    return TooManyRedirectsError(
        f"{method} {url} redirects in a loop ({len(history)} redirects, to {hops}); "
        "check base_url (the URL the API answers at, e.g. https://api.together.xyz/v1)",
        status_code=status,
        location=location,
    )
