"""The fake server's control routes, for benchmarks and tests in another process.

Owns ``GET /stats`` (``?log=1`` adds the request log), ``POST /stats/reset`` and ``POST
/faults`` (a JSON list of fault specs, queued as ``server.faults.extend`` would).

May import: ``..app`` (JSON answers), aiohttp; the server only as a type.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from ..app import error_response, json_response

if TYPE_CHECKING:
    from .backend import FakeTogetherServer

__all__ = ["add_control_routes"]


def add_control_routes(app: web.Application, server: FakeTogetherServer) -> None:
    """Add the control routes of ``server`` to its ``app``."""

    async def stats(request: web.Request) -> web.Response:
        log = request.query.get("log", "") not in ("", "0", "false")
        return json_response(200, orjson.dumps(server.stats_dict(log=log)))

    async def reset(request: web.Request) -> web.Response:
        server.reset_stats()
        return json_response(200, b'{"ok":true}')

    async def add_faults(request: web.Request) -> web.Response:
        try:
            specs = orjson.loads(await request.read())
            if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
                raise ValueError("body must be a JSON list of fault strings")
            server.faults.extend(specs)
        except ValueError as exc:
            return error_response(400, str(exc))
        return json_response(200, orjson.dumps({"faults_pending": len(server.faults)}))

    app.router.add_get("/stats", stats)
    app.router.add_post("/stats/reset", reset)
    app.router.add_post("/faults", add_faults)
