"""``togembed models``: the embedding models an API offers to your key (GET BASE_URL/models).

May import: the standard library, click; ``togembed.api``, ``togembed.core``; ``backends``,
``exits``, ``options``.
"""

from __future__ import annotations

import asyncio
import sys

import click

from ..api.async_client import AsyncClient
from ..core.config import resolve_base_url
from ..core.errors import APIError
from .backends import check_endpoint
from .exits import EXIT_API_ERROR, EXIT_OK, EXIT_USAGE, error
from .options import base_url_option, connect_retries_option

__all__ = ["models_command"]

_NO_KEY_HELP = (
    "no API key for {url}: set TOGETHER_API_KEY (or pass --base-url of a server here, e.g. "
    "togembed serve)."
)


@click.command("models")
@base_url_option
@connect_retries_option
@click.option("--all", "show_all", is_flag=True, help="Every model, not only embedding models.")
def models_command(base_url: str | None, connect_retries: int | None, show_all: bool) -> None:
    """List the embedding models your key can use (GET BASE_URL/models).

    \b
    Examples:
      togembed models
      togembed models --base-url https://api-inference.together.ai/v1
      togembed models --base-url http://127.0.0.1:8000/v1 --all
    """
    url = resolve_base_url(base_url)
    if not check_endpoint(url, base_url, no_key_help=_NO_KEY_HELP):
        sys.exit(EXIT_USAGE)
    sys.exit(asyncio.run(_list_models(url, show_all, connect_retries)))


async def _list_models(url: str, show_all: bool, connect_retries: int | None = None) -> int:
    try:
        async with AsyncClient(base_url=url, connect_retries=connect_retries) as client:
            models = await client.models.list(all=show_all)
    except APIError as exc:
        error(exc)
        return EXIT_API_ERROR
    what = "models" if show_all or not models.types_known else "embedding models"
    if not models.types_known:
        what += " (the server does not say which embed: all are listed)"
    click.echo(f"{len(models)} {what} at {url}")
    if models:
        width = min(60, max(len(m.id) for m in models))
        for m in models:
            extras = [m.type or "type unknown"]
            if m.context_length:
                extras.append(f"context {m.context_length}")
            click.echo(f"  {m.id:<{width}}  {', '.join(extras)}")
    elif models.types_known and not show_all and _is_together(url):
        click.echo(
            "Together withdrew its serverless embedding models in 2026: use a dedicated "
            "endpoint (--base-url https://api-inference.together.ai/v1, the model being the "
            "endpoint's name), another OpenAI-compatible provider, or --local. "
            "--all lists every model.",
        )
    return EXIT_OK


def _is_together(url: str) -> bool:
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    return host.endswith(("together.xyz", "together.ai"))
