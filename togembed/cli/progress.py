"""What ``togembed embed`` prints while and after it runs: the progress (a tqdm bar on a terminal,
else a line every 10 s), what changed since the job's last run, and the summary that ends with
the exit code.

May import: the standard library, click, tqdm (on a terminal); ``togembed.api``, ``togembed.jobs``;
``exits``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from ..api.async_client import AsyncClient
from ..jobs.jobfile import job_path
from ..jobs.readers import default_ids
from ..jobs.types import JobOptions, JobProgress, JobResult
from .exits import EXIT_BUDGET, EXIT_FAILURES, EXIT_INTERRUPTED, EXIT_OK

__all__ = ["Display", "ids_used", "summary"]


def ids_used(opts: JobOptions, *, detected: bool = False) -> str:
    """Where the job's ids come from, in words: "ids: field 'id'" or "ids: line numbers"."""
    if opts.id_field is None:
        return f"ids: {default_ids(opts.input)}"
    return f"ids: field {opts.id_field!r}" + (" (found in the input)" if detected else "")


class Display:
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


def summary(result: JobResult, display: Display, opts: JobOptions) -> int:
    """Print the summary of a run; return its exit code."""
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
        lines.append(f"wrote {result.output} ({rows}; {ids_used(opts)})")
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
