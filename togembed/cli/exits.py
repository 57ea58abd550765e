"""How a command ends: its exit code (what a script driving it needs to decide what to do next)
and the one-line error it prints, on stderr.

May import: the standard library, click.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click

__all__ = [
    "EXIT_API_ERROR",
    "EXIT_BUDGET",
    "EXIT_FAILURES",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "error",
    "usage_error",
]

EXIT_OK = 0  # every input embedded (none, for an empty input), output written
EXIT_API_ERROR = 1  # the API stopped the job (key, model, retries exhausted): fix, rerun
EXIT_USAGE = 2  # bad arguments, unreadable input, job settings changed, no API key
EXIT_FAILURES = 3  # done, output written, but some (or all) inputs failed for good
EXIT_BUDGET = 4  # --max-tokens / --deadline reached: rerun the same command to continue
EXIT_INTERRUPTED = 130  # Ctrl-C: rerun the same command to continue


def error(what: object) -> None:
    """Print ``error: WHAT`` on stderr (an exception prints its message)."""
    click.echo(f"error: {what}", err=True)


def usage_error(what: object) -> NoReturn:
    """Print ``error: WHAT`` and exit with ``EXIT_USAGE``."""
    error(what)
    sys.exit(EXIT_USAGE)
