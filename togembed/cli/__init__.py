"""The ``togembed`` command (``togembed.cli:main``; also ``python -m togembed``): embed a corpus
file, resumably, with progress; search an output; serve a local model; list an API's models.

The modules:
    ``embed``     ``togembed embed``: the options, their checks, the run and its exit code
    ``search``    ``togembed search``: an output's records nearest to queries
    ``serve``     ``togembed serve``: a local model behind Together's API
    ``models``    ``togembed models``: the embedding models an API offers
    ``backends``  what embeds a command's texts (the API, or ``--local``'s server), and the
                  check of a base URL and its key
    ``progress``  ``embed``'s progress display and summary
    ``nearest``   printing nearest records (``search``, ``embed --query``)
    ``options``   options shared by the commands (``--base-url``, durations, exclusions)
    ``exits``     exit codes and the one-line error

May import: click, its modules, and every layer below it (``togembed.core``, ``togembed.api``,
``togembed.jobs``; ``togembed.server`` lazily, inside the code that needs it: ``togembed embed``
against an API needs neither aiohttp's server nor onnxruntime).
"""

from __future__ import annotations

import click

from .embed import embed_command
from .models import models_command
from .search import search_command
from .serve import serve_command

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="togembed")
def cli() -> None:
    """togembed: embed texts with Together AI, fast, within your rate limit, without losing
    work."""


for _command in (embed_command, search_command, serve_command, models_command):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``togembed`` command."""
    cli.main(args=argv, prog_name="togembed")
