"""Start an aiohttp app on host:port and name its base URL: shared by our two servers."""

from __future__ import annotations

import logging

from aiohttp import web

__all__ = ["listen"]


async def listen(
    app: web.Application,
    host: str,
    port: int,
    *,
    shutdown_timeout: float,
    access_log: logging.Logger | None = None,
) -> tuple[web.AppRunner, str]:
    """The running app and its ``http://HOST:PORT/v1`` (port 0 = any free port; a wildcard
    address is named by its loopback address, so clients on this machine can use the URL).

    ``handler_cancellation``: aiohttp (>= 3.9) no longer cancels a handler whose client went
    away unless asked; both servers want that (to count disconnects, to drop queued work).
    """
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=access_log, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    if bound_host in ("0.0.0.0", "::"):
        bound_host = "127.0.0.1" if bound_host == "0.0.0.0" else "::1"
    if ":" in bound_host:
        bound_host = f"[{bound_host}]"
    return runner, f"http://{bound_host}:{bound_port}/v1"
