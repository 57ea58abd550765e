"""Printing the records of an output nearest to queries: ``togembed search`` and
``togembed embed --query``.

May import: click; ``togembed.api``, ``togembed.core``, ``togembed.jobs``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..api.async_client import AsyncClient
from ..core.errors import TogembedError
from ..jobs.nearest import TextSource, load_output, nearest, texts_of

__all__ = ["show_nearest"]


async def show_nearest(
    client: AsyncClient,
    model: str,
    output: Path,
    queries: tuple[str, ...],
    source: TextSource | None = None,
    k: int = 5,
    loaded: tuple[list[str], Any] | None = None,
) -> None:
    """Embed each query with ``client`` and print the ``k`` rows of ``output`` nearest to it:
    score, id and, with a ``source``, the text. The code behind
    both ``embed --query`` and ``togembed search``. ``loaded``: ``load_output(output)``,
    if the caller has it."""
    ids, matrix = loaded if loaded is not None else load_output(output)
    vectors = await client.embed(list(queries), model=model)
    if len(ids) and vectors.shape[1] != matrix.shape[1]:
        raise TogembedError(
            f"the queries' vectors have {vectors.shape[1]} dimensions, those of {output} "
            f"{matrix.shape[1]}: {output} was made with another model than {model}; pass "
            "--model with the one it was made with"
        )
    hits = {q: nearest(matrix, v, k) for q, v in zip(queries, vectors, strict=True)}
    wanted = {ids[i] for found in hits.values() for i, _ in found}
    texts: dict[str, str] = {}
    if source is not None and wanted:
        try:
            texts = texts_of(source, wanted)
        except (TogembedError, OSError) as exc:
            click.echo(f"texts not shown: {exc}", err=True)
    for n, (q, found) in enumerate(hits.items()):
        if n:
            click.echo("")
        click.echo(f"nearest to {q!r}:")
        if not found:
            click.echo(f"  (none: {output} has no rows)")
        for i, score in found:
            text = " ".join(texts.get(ids[i], "").split())
            click.echo(f"  {score:.3f}  {ids[i]:<20} {text[:70]}".rstrip())
