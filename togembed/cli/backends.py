"""Where a command's texts are embedded (its backend), opened for the command's duration: an
embeddings API (Together's, or any compatible server: ``--base-url``), or the local model
(``--local``), served on a loopback port. Both give the command an ``AsyncClient``.

Another backend (e.g. workers on a cluster) is one more class with an ``open`` method here, and
one more branch in ``choose_backend``; the commands do not change.

May import: attrs, click; ``togembed.api``, ``togembed.core``; ``togembed.server`` (lazily: only
``--local`` needs aiohttp's server and the local model); ``togembed.ray`` (lazily: only
``--ray``); ``exits``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Protocol

import attrs
import click

from ..api.async_client import AsyncClient
from ..core.config import base_url_source, check_base_url, is_loopback_url, resolve_api_key
from ..core.errors import InvalidBaseURLError
from .exits import EXIT_USAGE, error

__all__ = [
    "ApiBackend",
    "Backend",
    "LocalBackend",
    "RayBackend",
    "check_endpoint",
    "choose_backend",
]

# What to do without a key, for the commands that embed (``{url}``: the base URL).
NO_KEY_HELP = (
    "no API key for {url}. Either\n"
    "  - set your Together key and run the same command again:\n"
    "        export TOGETHER_API_KEY=...   (https://api.together.ai/settings/api-keys)\n"
    "  - or embed on this machine, offline, with a local model:\n"
    "        pip install 'togembed[local]'   and add --local\n"
    "  - or point --base-url at a Together-compatible server here (togembed serve)."
)


def check_endpoint(url: str, given: str | None = None, *, no_key_help: str = NO_KEY_HELP) -> bool:
    """True if ``url`` can be called: it is a well-formed base URL (``given``: what the user
    passed, to say where a bad one came from), and a key is set or the server is on this
    machine. Else say what is wrong and how to proceed (``no_key_help``)."""
    try:
        check_base_url(url, source=base_url_source(given))
    except InvalidBaseURLError as exc:
        error(exc)
        return False
    if resolve_api_key(None) is not None or is_loopback_url(url):
        return True
    error(no_key_help.format(url=url))
    return False


class Backend(Protocol):
    """What a command embeds with: ``open`` starts it (on ``stack``, closed when the command
    ends) and returns the client the command sends its texts through."""

    async def open(self, stack: contextlib.AsyncExitStack) -> AsyncClient: ...


@attrs.frozen
class ApiBackend:
    """An embeddings API: ``client_kwargs`` for ``AsyncClient`` (``base_url`` and the rest)."""

    client_kwargs: dict[str, Any]

    async def open(self, stack: contextlib.AsyncExitStack) -> AsyncClient:
        return await stack.enter_async_context(AsyncClient(**self.client_kwargs))


@attrs.frozen
class LocalBackend:
    """The local ``model``, served on a loopback port while the command runs (no key, no
    network); ``client_kwargs`` as for ``ApiBackend`` (its ``base_url`` is the local one).
    ``announce``: say so on stderr, as it takes a moment."""

    model: str
    client_kwargs: dict[str, Any]
    announce: bool = False

    async def open(self, stack: contextlib.AsyncExitStack) -> AsyncClient:
        if self.announce:
            click.echo(f"starting a local server for {self.model} ...", err=True)
        from ..server import local_server

        url = await stack.enter_async_context(local_server(self.model))
        client = AsyncClient(**{**self.client_kwargs, "base_url": url})
        return await stack.enter_async_context(client)


@attrs.frozen
class RayBackend:
    """An embeddings API, its requests sent by ``workers`` Ray actors (``--ray``): the Ray in
    ``RAY_ADDRESS``, else a local one started for the command. Each worker sends the key of
    its own environment."""

    client_kwargs: dict[str, Any]
    workers: int
    announce: bool = False

    async def open(self, stack: contextlib.AsyncExitStack) -> AsyncClient:
        try:
            import ray

            from ..ray.transport import RayTransport
        except ImportError:
            error("--ray needs Ray: pip install 'togembed[ray]'")
            raise click.exceptions.Exit(EXIT_USAGE) from None
        if not ray.is_initialized():
            if self.announce:
                where = os.environ.get("RAY_ADDRESS") or "a local Ray"
                click.echo(f"starting {self.workers} Ray workers on {where} ...", err=True)
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
            stack.callback(ray.shutdown)
        transport = RayTransport(self.workers)
        client = AsyncClient(**self.client_kwargs, transport=transport)
        return await stack.enter_async_context(client)  # closing it closes the transport


def choose_backend(
    *,
    local: bool,
    model: str,
    client_kwargs: dict[str, Any],
    announce: bool = False,
    ray_workers: int | None = None,
) -> Backend:
    """The backend the command's options name: ``--local``, ``--ray``, else the API."""
    if local:
        return LocalBackend(model, client_kwargs, announce=announce)
    if ray_workers is not None:
        return RayBackend(client_kwargs, ray_workers, announce=announce)
    return ApiBackend(client_kwargs)
