"""``togembed serve``: a local embedding model behind Together's API, until Ctrl-C or SIGTERM;
its flags, and a one-line error (exit 2) when it cannot listen.

May import: the standard library, click; ``togembed.core``; ``togembed.server`` (lazily: only
this command needs aiohttp's server and the local model); ``exits``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import sys
from collections.abc import Callable

import click

from ..core.config import DEFAULT_HOST, DEFAULT_LOCAL_MODEL, DEFAULT_PORT
from ..core.errors import TogembedError
from .exits import usage_error

__all__ = ["serve_command"]

SERVE_HELP = """Serve a local embedding model with Together's API: POST /v1/embeddings,
GET /v1/models.

\b
Any Together/OpenAI client works against it, e.g.:
  togembed serve --port 8000 &
  togembed embed docs.txt -o v.npy --base-url http://127.0.0.1:8000/v1 \\
      --model sentence-transformers/all-MiniLM-L6-v2-int8

Requests naming another model get a 404 unless --alias lets the local model answer
to that name (e.g. --alias BAAI/bge-base-en-v1.5, or --alias '*' for any name).
Prints a line on stdout once listening and one when stopped (Ctrl-C or SIGTERM:
requests in flight are answered first). See docs/serve.md.

\b
Exit codes: 0 stopped by Ctrl-C/SIGTERM; 2 usage error, model not available, or
HOST:PORT cannot be listened on (in use, permission denied, unknown host).
"""

_HOST_HINT = " (check --host: 127.0.0.1 for this machine only, 0.0.0.0 for every interface)"
_LISTEN_HINTS = {
    errno.EADDRINUSE: " (try --port 0 for any free port, or another port)",
    errno.EACCES: " (ports below 1024 need privileges: try a higher --port)",
    errno.EADDRNOTAVAIL: _HOST_HINT,
}


def _seconds_or_none(value: float) -> float | None:
    return value or None  # 0 = no limit


# The server's limits, (flag, default, type, help). The defaults are the server's DEFAULT_*,
# written out (importing them would import aiohttp); a test checks that they agree.
_SECONDS = click.FloatRange(0)
_LIMITS = (
    ("--max-batch", 32, click.IntRange(1), "Texts per model call."),
    (
        "--max-wait",
        0.005,
        _SECONDS,
        "Seconds a request may wait for others to share its model call.",
    ),
    (
        "--header-timeout",
        20.0,
        _SECONDS,
        "Seconds for a request's headers to arrive (0 = no limit).",
    ),
    ("--body-timeout", 60.0, _SECONDS, "Seconds for a request's body to arrive (0 = no limit)."),
    (
        "--keepalive-timeout",
        75.0,
        click.FloatRange(0, min_open=True),
        "Seconds an idle connection stays open between requests.",
    ),
    ("--max-connections", 512, click.IntRange(0), "Open connections at most (0 = no limit)."),
)


def _limit_options(command: Callable[..., None]) -> Callable[..., None]:
    """The ``_LIMITS`` options, with their defaults shown, in this order in ``--help``."""
    for flag, default, kind, text in reversed(_LIMITS):
        command = click.option(flag, default=default, show_default=True, type=kind, help=text)(
            command
        )
    return command


@click.command("serve", help=SERVE_HELP)
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Interface to listen on.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535))
@click.option("-m", "--model", default=None, help=f"Local model [default: {DEFAULT_LOCAL_MODEL}].")
@click.option("--api-key", default=None, help="Require this bearer key [default: accept any].")
@click.option(
    "--alias",
    multiple=True,
    help="Also answer to this model name (repeatable; '*' = any name).",
)
@_limit_options
@click.option("--access-log", is_flag=True, help="Log each request to stderr.")
def serve_command(
    host: str,
    port: int,
    model: str | None,
    api_key: str | None,
    alias: tuple[str, ...],
    max_batch: int,
    max_wait: float,
    header_timeout: float,
    body_timeout: float,
    keepalive_timeout: float,
    max_connections: int,
    access_log: bool,
) -> None:
    from ..server import ListenError, serve

    if access_log:
        log = logging.getLogger("togembed.access")
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    try:
        asyncio.run(
            serve(
                host,
                port,
                model,
                api_key,
                aliases=alias,
                max_batch=max_batch,
                max_wait=max_wait,
                header_timeout=_seconds_or_none(header_timeout),
                body_timeout=_seconds_or_none(body_timeout),
                keepalive_timeout=keepalive_timeout,
                max_connections=max_connections or None,
                access_log=access_log,
            )
        )
    except ListenError as exc:
        hint = _HOST_HINT if exc.unknown_host else _LISTEN_HINTS.get(exc.errno or 0, "")
        usage_error(f"{exc}{hint}")
    except TogembedError as exc:
        usage_error(exc)
