"""Entry points of the local-model server: ``togembed serve`` and the CLI's ``--local`` mode.

Owns :func:`serve` (load the model off the loop, listen, print the ready line, serve until
SIGINT/SIGTERM or ``stop``, print the stopped line), :func:`local_server` (an in-process server
for a block) and the two lines ``serve`` prints. (Not a module named ``serve``: that name is
the function, exported by the package.)

May import: ``local_backend``, ``batcher`` (the model interface), ``togembed.core.config``;
``togembed.local`` lazily, in a thread (heavy imports).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import AsyncIterator, Iterable
from typing import Any, TextIO

from ..core.config import DEFAULT_HOST, DEFAULT_PORT
from .batcher import EmbeddingModel
from .local_backend import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_INPUTS_PER_REQUEST,
    DEFAULT_MAX_WAIT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    EmbeddingServer,
)

__all__ = ["local_server", "ready_line", "serve", "stopped_line"]


async def _load_model(name: str | None) -> EmbeddingModel:
    """``load_model(name)`` off the event loop, in a daemon thread: a first-time download can
    take minutes, and Ctrl-C must not wait for it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[EmbeddingModel] = loop.create_future()

    def settle(value: Any, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)

    def work() -> None:
        model, error = None, None
        try:
            # Heavy imports (onnxruntime, tokenizers) happen here too, off the loop.
            from ..local.model import load_model

            model = load_model(name)
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            loop.call_soon_threadsafe(settle, model, error)

    threading.Thread(target=work, name="togembed-load-model", daemon=True).start()
    return await future


def ready_line(server: EmbeddingServer) -> str:
    """What ``serve`` prints once listening (scripts wait for it)."""
    return (
        f"togembed serve: listening on {server.base_url} "
        f"(model {server.model_name}, dim {server.dim})"
    )


def stopped_line(server: EmbeddingServer) -> str:
    """What ``serve`` prints once closed: how much it did."""
    n, texts = server.stats.requests, server.stats.inputs
    return (
        f"togembed serve: stopped ({n:,} request{'s' * (n != 1)}, "
        f"{texts:,} input{'s' * (texts != 1)} embedded)"
    )


async def serve(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    model_name: str | None = None,
    api_key: str | None = None,
    *,
    model: EmbeddingModel | None = None,
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
    stop: asyncio.Event | None = None,
    out: TextIO | None = None,
) -> None:
    """Serve ``model_name`` (``load_model``'s default when None; or the ready ``model``) until
    SIGINT/SIGTERM (or ``stop`` is set), then shut down gracefully.

    Prints :func:`ready_line` to ``out`` (stdout) once listening and :func:`stopped_line`
    once closed. Raises :class:`ListenError` if ``host:port`` cannot be bound.
    """
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)  # Windows / not the main thread: no-op
            installed.append(sig)
    try:
        if model is None:
            loading = asyncio.ensure_future(_load_model(model_name))
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait((loading, stopping), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
            if not loading.done():  # interrupted while loading: the daemon thread dies with us
                loading.cancel()
                return
            model = loading.result()
        server = EmbeddingServer(
            model,
            api_key=api_key,
            aliases=aliases,
            max_batch=max_batch,
            max_wait=max_wait,
            max_inputs_per_request=max_inputs_per_request,
            max_body_size=max_body_size,
            shutdown_timeout=shutdown_timeout,
            access_log=access_log,
            header_timeout=header_timeout,
            body_timeout=body_timeout,
            keepalive_timeout=keepalive_timeout,
            max_connections=max_connections,
        )
        out = out if out is not None else sys.stdout
        await server.start(host, port)
        try:
            if api_key is None and server.exposed:
                print(
                    f"togembed serve: warning: {server.base_url} is reachable from other "
                    "machines and no API key is set; anyone who can connect can use it",
                    file=sys.stderr,
                    flush=True,
                )
            print(ready_line(server), file=out, flush=True)
            await stop.wait()
        finally:
            await server.close()
        print(stopped_line(server), file=out, flush=True)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


@contextlib.asynccontextmanager
async def local_server(
    model_name: str | None = None,
    *,
    model: EmbeddingModel | None = None,
    **options: Any,
) -> AsyncIterator[str]:
    """``async with local_server("BAAI/bge-small-en-v1.5") as base_url:`` — the model served on
    127.0.0.1 at a free port in the current event loop; ``base_url`` ends in ``/v1``.

    ``options`` are :class:`EmbeddingServer`'s (``max_batch``, ``max_wait``, ...).
    """
    if model is None:
        model = await _load_model(model_name)
    async with EmbeddingServer(model, **options) as server:
        yield server.base_url
