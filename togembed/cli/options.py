"""Options that several commands share, with the same words everywhere: ``--base-url``,
``--connect-retries``, the pairs of options that exclude each other, and durations
(``--deadline 2h30m``).

May import: the standard library, click; ``togembed.core.config``.
"""

from __future__ import annotations

import re

import click

from ..core.config import DEFAULT_MAX_RETRIES

__all__ = [
    "base_url_option",
    "check_exclusive",
    "connect_retries_option",
    "duration_option",
    "seconds",
]

base_url_option = click.option(
    "--base-url", default=None, help="API root [default: $TOGETHER_BASE_URL or Together]."
)

# AsyncClient(connect_retries=N): a server that cannot be reached at all (refused, DNS,
# unreachable) is otherwise retried like any failure, ~24 s before the command gives up.
connect_retries_option = click.option(
    "--connect-retries",
    metavar="N",
    type=click.IntRange(0),
    default=None,
    help="Retries when the server cannot be reached at all (connection refused, DNS, "
    f"unreachable); 0 fails at once [default: as other failures, {DEFAULT_MAX_RETRIES}].",
)

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def seconds(text: str) -> float:
    """``90``, ``90s``, ``15m`` or ``2h30m`` in seconds."""
    m = _DURATION.match(text.strip())
    if not m or not any(m.groups()):
        raise click.BadParameter(f"{text!r} is not a duration like 90, 90s, 15m or 2h30m")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s


def duration_option(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """A click callback: the option's duration in seconds (None if not given)."""
    return None if value is None else seconds(value)


def check_exclusive(
    *, local: bool, base_url: str | None, id_field: str | None, no_id_field: bool
) -> None:
    """Refuse the options that exclude each other (a usage error, exit 2)."""
    if local and base_url:
        raise click.UsageError("--local runs its own server: leave out --base-url")
    if id_field is not None and no_id_field:
        raise click.UsageError("--id-field and --no-id-field exclude each other")
