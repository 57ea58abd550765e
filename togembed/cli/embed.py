"""``togembed embed INPUT -o OUTPUT``: embed every text of a corpus file, resumably, with
progress; the options, their checks, and the run with its exit code.

The run is the same whatever embeds the texts: the options choose a backend (``backends``), the
job runs on the client it opens.

May import: the standard library, click; ``togembed.core``, ``togembed.jobs``; ``backends``,
``exits``, ``nearest``, ``options``, ``progress``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from ..core.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    DEFAULT_LOCAL_MODEL,
    resolve_base_url,
)
from ..core.errors import APIError, TogembedError
from ..jobs.filetypes import INPUT_SUFFIXES, OUTPUT_SUFFIXES, CorpusError
from ..jobs.ids import DuplicateIdError
from ..jobs.job import run_job
from ..jobs.jobfile import job_path
from ..jobs.readers import detect_id_field
from ..jobs.types import JobOptions
from .backends import Backend, check_endpoint, choose_backend
from .exits import EXIT_API_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, error, usage_error
from .options import base_url_option, check_exclusive, connect_retries_option, duration_option
from .progress import Display, ids_used, summary

__all__ = ["embed_command"]

DEFAULT_RAY_WORKERS = 4

EMBED_HELP = f"""Embed every text of INPUT into OUTPUT.

\b
INPUT   {", ".join(INPUT_SUFFIXES)}  (.txt: one text per line, id = line number)
OUTPUT  {", ".join(OUTPUT_SUFFIXES)}  (.parquet: columns id, embedding)

Ids come from the records' 'id' field when they have one (the CSV header, the
Parquet schema, the first JSONL record), else from --id-field, else they are line
(Parquet: row) numbers; --no-id-field numbers the records even if they have an 'id'.

\b
Examples:
  togembed embed docs.jsonl -o vectors.parquet --model BAAI/bge-base-en-v1.5
  togembed embed notes.txt -o notes.npy --model BAAI/bge-base-en-v1.5 --rpm 600
  togembed embed docs.csv -o v.parquet --model M --id-field doc_id --text-field body
  togembed embed docs.jsonl -o v.parquet --model M --ray --workers 8

The API key is read from TOGETHER_API_KEY. Progress is saved as it goes in
OUTPUT.togembed-job.sqlite: if the job stops (Ctrl-C, a crash, a budget), run the
same command again and it continues where it stopped, paying only for what was in
flight. If the input changed meanwhile (records added, edited, removed), the same
command embeds only the new or changed texts. Inputs the server rejects for good
are listed in OUTPUT.failures.jsonl; --retry-failed tries them again.

\b
Exit codes: 0 done, output written; 1 API error (fix and rerun); 2 usage or input
error; 3 done with failed inputs (output written); 4 budget reached (rerun to
continue); 130 interrupted.
"""


@click.command("embed", help=EMBED_HELP, no_args_is_help=True)
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output file.")
@click.option(
    "-m",
    "--model",
    help="Embedding model, e.g. BAAI/bge-base-en-v1.5 [with --local: the local model].",
)
@click.option(
    "--local",
    is_flag=True,
    help="Run a real embedding model on this machine (pip install 'togembed[local]'): no key, "
    "no network.",
)
@click.option(
    "--ray",
    "use_ray",
    is_flag=True,
    help="Send the requests from Ray workers (pip install 'togembed[ray]'): the Ray in "
    "RAY_ADDRESS, else a local one. Each worker reads TOGETHER_API_KEY from its environment.",
)
@click.option(
    "--workers",
    type=click.IntRange(1),
    help="Ray workers for --ray [default: 4].",
)
@click.option(
    "--query",
    multiple=True,
    help="When done, show the 5 nearest inputs to this text (repeatable).",
)
@click.option(
    "--id-field",
    default=None,
    help="Id column/key (.jsonl/.csv/.parquet) [default: 'id' if the records have it].",
)
@click.option(
    "--no-id-field",
    is_flag=True,
    help="Ids are line (Parquet: row) numbers, even if the records have an 'id' field.",
)
@click.option("--text-field", default="text", show_default=True, help="Text column/key.")
@click.option("--batch-size", default=DEFAULT_BATCH_SIZE, show_default=True, type=click.IntRange(1))
@click.option(
    "--concurrency", default=DEFAULT_CONCURRENCY, show_default=True, type=click.IntRange(1)
)
@click.option("--rpm", type=click.FloatRange(min=0, min_open=True), help="Requests per minute.")
@click.option("--tpm", type=click.FloatRange(min=0, min_open=True), help="Tokens per minute.")
@base_url_option
@connect_retries_option
@click.option("--cache", type=click.Path(dir_okay=False), help="Vector cache shared by jobs.")
@click.option("--max-tokens", type=click.IntRange(1), help="Stop after sending this many tokens.")
@click.option(
    "--deadline", callback=duration_option, help="Stop sending after this long, e.g. 45m or 2h."
)
@click.option("--retry-failed", is_flag=True, help="Retry inputs that failed in earlier runs.")
@click.option("--restart", is_flag=True, help="Discard saved progress and start over.")
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: on a tty].")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and the summary.")
def embed_command(
    input_path: str,
    output: str,
    model: str | None,
    local: bool,
    use_ray: bool,
    workers: int | None,
    query: tuple[str, ...],
    id_field: str | None,
    no_id_field: bool,
    text_field: str,
    batch_size: int,
    concurrency: int,
    rpm: float | None,
    tpm: float | None,
    base_url: str | None,
    connect_retries: int | None,
    cache: str | None,
    max_tokens: int | None,
    deadline: float | None,
    retry_failed: bool,
    restart: bool,
    progress: bool | None,
    quiet: bool,
) -> None:
    src, out = Path(input_path), Path(output)
    if src.suffix.lower() not in INPUT_SUFFIXES:
        raise click.BadParameter(f"must end in {', '.join(INPUT_SUFFIXES)}", param_hint="INPUT")
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise click.BadParameter(f"must end in {', '.join(OUTPUT_SUFFIXES)}", param_hint="-o")
    check_exclusive(local=local, base_url=base_url, id_field=id_field, no_id_field=no_id_field)
    if use_ray and local:
        raise click.UsageError("--ray and --local cannot be used together.")
    if workers is not None and not use_ray:
        raise click.UsageError("--workers needs --ray.")
    if local:
        model = model or DEFAULT_LOCAL_MODEL
    elif not model:
        raise click.UsageError("Missing option '-m' / '--model' (or use --local).")
    url = resolve_base_url(base_url)
    if not local and not check_endpoint(url, base_url):
        sys.exit(EXIT_USAGE)
    detected = False
    if id_field is None and not no_id_field:
        try:
            id_field = detect_id_field(src)
        except TogembedError as exc:  # e.g. a Parquet input without pyarrow
            usage_error(exc)
        detected = id_field is not None
    opts = JobOptions(
        input=src,
        output=out,
        model=model,
        id_field=id_field,
        text_field=text_field,
        retry_failed=retry_failed,
        restart=restart,
        max_tokens=max_tokens,
        deadline=time.monotonic() + deadline if deadline is not None else None,
        cache=Path(cache).expanduser() if cache else None,
    )
    client_kwargs: dict[str, Any] = {
        "base_url": url,
        "batch_size": batch_size,
        "concurrency": concurrency,
        "rpm": rpm,
        "tpm": tpm,
        "connect_retries": connect_retries,
    }
    backend = choose_backend(
        local=local,
        model=model,
        client_kwargs=client_kwargs,
        announce=not quiet,
        ray_workers=(workers or DEFAULT_RAY_WORKERS) if use_ray else None,
    )
    show_bar = sys.stderr.isatty() if progress is None else progress
    if not quiet:
        logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    # Everything imported so far lives as long as the process: the cyclic garbage collector
    # stops re-scanning it (its full passes over ~10^5 module objects cost ~5% of a job's CPU).
    gc.freeze()
    sys.exit(
        asyncio.run(
            _embed(
                opts, backend, show_bar=show_bar, quiet=quiet, queries=query, id_detected=detected
            )
        )
    )


def _stop_on_signals() -> asyncio.Event:
    """Ctrl-C (or SIGTERM) once: the returned event is set, the job sends nothing new and
    finishes what is in flight; twice: the running task is cancelled (what is in flight is
    abandoned)."""
    stop = asyncio.Event()
    task = asyncio.current_task()
    presses = 0

    def on_sigint() -> None:  # 1st: finish what is in flight; 2nd: abandon it
        nonlocal presses
        presses += 1
        if presses == 1:
            click.echo(
                "\nstopping: finishing requests in flight (Ctrl-C again to abandon them)", err=True
            )
            stop.set()
        elif task is not None:
            task.cancel()

    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGINT, on_sigint)
        loop.add_signal_handler(signal.SIGTERM, on_sigint)
    return stop


async def _embed(
    opts: JobOptions,
    backend: Backend,
    *,
    show_bar: bool,
    quiet: bool,
    queries: tuple[str, ...] = (),
    id_detected: bool = False,
) -> int:
    """Run the job on ``backend``, showing its progress; return the exit code."""
    stop = _stop_on_signals()
    display = Display(show_bar=show_bar, quiet=quiet)
    if not quiet:
        hint = "; --no-id-field numbers the records instead" if id_detected else ""
        click.echo(
            f"embedding {opts.input} into {opts.output} with {opts.model} "
            f"({ids_used(opts, detected=id_detected)}{hint})",
            err=True,
        )
    try:
        async with contextlib.AsyncExitStack() as stack:
            client = await backend.open(stack)
            display.client = client
            try:
                result = await run_job(client, opts, stop=stop, on_progress=display.update)
            except asyncio.CancelledError:
                display.close()
                saved = job_path(opts.output)
                where = f"progress saved in {saved}" if saved.exists() else "nothing was saved"
                click.echo(f"interrupted; {where}", err=True)
                return EXIT_INTERRUPTED
            display.close()
            code = summary(result, display, opts)
            if queries and result.output is not None:
                from ..jobs.nearest import TextSource
                from .nearest import show_nearest

                source = TextSource(opts.input, opts.id_field, opts.text_field)
                await show_nearest(client, opts.model, result.output, queries, source)
            return code
    except (APIError, OSError) as exc:  # OSError: e.g. the disk is full
        display.close()
        error(exc)
        if job_path(opts.output).exists():
            click.echo(
                f"progress is saved in {job_path(opts.output)}; fix the cause and run the same "
                "command again to continue.",
                err=True,
            )
        else:
            click.echo("nothing was embedded; fix the cause and run the command again.", err=True)
        return EXIT_API_ERROR
    except TogembedError as exc:
        display.close()
        error(exc)
        about_ids = isinstance(exc, DuplicateIdError) or (
            isinstance(exc, CorpusError) and f"{opts.id_field!r}" in str(exc)
        )
        if id_detected and about_ids:
            click.echo(
                f"(ids are taken from the field {opts.id_field!r} found in the input; "
                "--no-id-field numbers the records instead)",
                err=True,
            )
        return EXIT_USAGE
