"""``togembed search OUTPUT QUERY...``: the records of an output nearest to each query, embedded
with the model the output was made with.

May import: the standard library, click; ``togembed.core``, ``togembed.jobs``; ``backends``,
``exits``, ``nearest``, ``options``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..core.config import DEFAULT_LOCAL_MODEL, resolve_base_url
from ..core.errors import APIError, TogembedError
from ..jobs.filetypes import OUTPUT_SUFFIXES
from ..jobs.readers import detect_id_field
from .backends import Backend, check_endpoint, choose_backend
from .exits import EXIT_API_ERROR, EXIT_OK, EXIT_USAGE, error, usage_error
from .options import base_url_option, check_exclusive, connect_retries_option

if TYPE_CHECKING:
    from ..jobs.nearest import TextSource

__all__ = ["search_command"]

SEARCH_HELP = f"""Print the records of OUTPUT nearest to each QUERY.

\b
OUTPUT  a file written by togembed embed: {", ".join(OUTPUT_SUFFIXES)}
        (.npy with its NAME.ids.txt beside it)

Each query is embedded with the model OUTPUT was made with, read from a .parquet
output's metadata or from the job file beside OUTPUT; --model where neither is
there (or to override it). The texts are shown when the input file is known (the
same places, or --input).

\b
Examples:
  togembed search vectors.parquet "compress a file" "parse a date" -k 3
  togembed search vectors.npy "compress a file" --local
  togembed search v.jsonl "refunds" --model BAAI/bge-base-en-v1.5 --input docs.jsonl

\b
Exit codes: 0 done; 1 API error; 2 usage error (unknown output type, model unknown,
no API key, a model other than the output's).
"""


@click.command("search", help=SEARCH_HELP, no_args_is_help=True)
@click.argument("output", metavar="OUTPUT", type=click.Path(exists=True, dir_okay=False))
@click.argument("queries", metavar="QUERY...", nargs=-1, required=True)
@click.option(
    "-k", "k", default=5, show_default=True, type=click.IntRange(1), help="Hits per query."
)
@click.option("-m", "--model", help="Embedding model [default: the one OUTPUT was made with].")
@click.option(
    "--input",
    "input_path",
    type=click.Path(dir_okay=False),
    help="Input file with the texts [default: the one OUTPUT was made from].",
)
@click.option("--id-field", default=None, help="Id column/key of --input [default: as made].")
@click.option("--no-id-field", is_flag=True, help="The ids of --input are line/row numbers.")
@click.option("--text-field", default=None, help="Text column/key of --input [default: as made].")
@click.option("--local", is_flag=True, help="Embed the queries with the local model (no key).")
@base_url_option
@connect_retries_option
def search_command(
    output: str,
    queries: tuple[str, ...],
    k: int,
    model: str | None,
    input_path: str | None,
    id_field: str | None,
    no_id_field: bool,
    text_field: str | None,
    local: bool,
    base_url: str | None,
    connect_retries: int | None,
) -> None:
    from ..jobs.nearest import TextSource, made_with

    out = Path(output)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise click.BadParameter(
            f"{out.suffix or '(no suffix)'} is not a togembed output: must end in "
            f"{', '.join(OUTPUT_SUFFIXES)}",
            param_hint="OUTPUT",
        )
    check_exclusive(local=local, base_url=base_url, id_field=id_field, no_id_field=no_id_field)
    try:
        made = made_with(out)
    except TogembedError as exc:  # e.g. a Parquet output without pyarrow
        usage_error(exc)
    model = model or made.get("model") or (DEFAULT_LOCAL_MODEL if local else None)
    if not model:
        usage_error(
            f"the model {out} was made with is not known (no job file beside it, and no "
            "metadata in it: only .parquet outputs keep it); pass --model with that model"
        )
    url = resolve_base_url(base_url)
    if not local and not check_endpoint(url, base_url):
        sys.exit(EXIT_USAGE)
    source = None
    src = Path(input_path) if input_path else None
    if src is None and made.get("input"):
        src = Path(made["input"])
    if src is not None:
        if id_field is None and not no_id_field:
            id_field = made["id_field"] if "id_field" in made else _detect_quietly(src)
        source = TextSource(src, id_field, text_field or made.get("text_field") or "text")
    client_kwargs = {"base_url": url, "connect_retries": connect_retries}
    backend = choose_backend(local=local, model=model, client_kwargs=client_kwargs)
    sys.exit(asyncio.run(_search(out, queries, k, model, source, backend)))


def _detect_quietly(src: Path) -> str | None:
    """``detect_id_field``, or None where it cannot tell (the texts are then not shown)."""
    try:
        return detect_id_field(src)
    except (TogembedError, OSError):
        return None


async def _search(
    output: Path,
    queries: tuple[str, ...],
    k: int,
    model: str,
    source: TextSource | None,
    backend: Backend,
) -> int:
    """Show the nearest records; return the exit code."""
    from ..jobs.nearest import load_output
    from .nearest import show_nearest

    try:
        loaded = load_output(output)  # not an output: said before anything is sent
        async with contextlib.AsyncExitStack() as stack:
            client = await backend.open(stack)
            await show_nearest(client, model, output, queries, source, k, loaded)
    except (APIError, OSError) as exc:
        error(exc)
        return EXIT_API_ERROR
    except TogembedError as exc:
        error(exc)
        return EXIT_USAGE
    return EXIT_OK
