"""Small in-process aiohttp servers for tests that need a wording or a shape the fake server
does not have. Each records the requests it saw."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import attrs
import orjson
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@attrs.define
class Seen:
    """One request as the app received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any  # parsed JSON, or None


@attrs.define
class App:
    base_url: str
    seen: list[Seen]
    runner: web.AppRunner

    @property
    def requests(self) -> int:
        return len(self.seen)

    async def close(self) -> None:
        await self.runner.cleanup()


def json_response(status: int, doc: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(doc), content_type="application/json", headers=headers
    )


def error(status: int, message: str, **fields: Any) -> web.Response:
    return json_response(status, {"error": {"message": message, **fields}})


def embeddings(texts: list[str], dim: int) -> web.Response:
    """A valid float answer: row i is [i, i, ..., i] (length ``dim``)."""
    data = [
        {"object": "embedding", "index": i, "embedding": [float(i)] * dim}
        for i in range(len(texts))
    ]
    return json_response(200, {"object": "list", "model": "m", "data": data})


async def start_app(routes: dict[tuple[str, str], Handler]) -> App:
    """Serve ``{(method, path): handler}`` on 127.0.0.1; ``base_url`` ends in ``/v1``."""
    seen: list[Seen] = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        seen.append(
            Seen(request.method, request.path, dict(request.query), dict(request.headers), body)
        )
        return await handler(request)

    app = web.Application(middlewares=[record], client_max_size=64 * 2**20)
    for (method, path), handler in routes.items():
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return App(base_url=f"http://127.0.0.1:{port}/v1", seen=seen, runner=runner)


async def apps() -> AsyncIterator[Callable[..., Awaitable[App]]]:
    """Fixture body: ``make(routes)`` starts an app; all are closed at the end."""
    started: list[App] = []

    async def make(routes: dict[tuple[str, str], Handler]) -> App:
        app = await start_app(routes)
        started.append(app)
        return app

    yield make
    for app in started:
        await app.close()
    await asyncio.sleep(0)


@contextlib.contextmanager
def app_in_thread(routes: dict[tuple[str, str], Handler]) -> Iterator[App]:
    """``start_app`` on an event loop of its own thread, for blocking callers (the CLI)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        app = asyncio.run_coroutine_threadsafe(start_app(routes), loop).result(10)
        try:
            yield app
        finally:
            asyncio.run_coroutine_threadsafe(app.close(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
