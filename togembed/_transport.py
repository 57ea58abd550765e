"""HTTP transport: the only module that imports aiohttp. One method, so tests can swap in a fake."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

import aiohttp
import attrs

from ._exceptions import APIConnectionError, APITimeoutError

__all__ = ["AiohttpTransport", "Response", "Transport"]


@attrs.frozen
class Response:
    """A complete HTTP answer. ``headers`` must be case-insensitive (aiohttp's are)."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class Transport(Protocol):
    """What the client needs from HTTP: POST bytes, get the whole answer or a typed error."""

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

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> Response:
        session = self._get_session()
        try:
            async with session.post(
                url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                data = await resp.read()
                return Response(status=resp.status, headers=resp.headers, body=data)
        except TimeoutError as exc:  # aiohttp's timeouts subclass TimeoutError
            raise APITimeoutError(f"request timed out after {timeout:g} s") from exc
        except aiohttp.ClientError as exc:
            raise APIConnectionError(f"connection error: {type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            raise APIConnectionError(f"connection error: {exc}") from exc

    async def aclose(self) -> None:
        self._closed = True
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None
