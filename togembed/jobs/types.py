"""The values a corpus job is run with and reports: ``JobOptions`` (what to embed, where, within
which budget), ``JobProgress`` (live counters, for the display) and ``JobResult`` (how it ended).

May import: the standard library, attrs; ``reconcile`` (for a type).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import attrs

from .reconcile import Reconciled

__all__ = ["JobOptions", "JobProgress", "JobResult", "JobStatus"]

JobStatus = Literal["complete", "failures", "budget", "interrupted"]


@attrs.frozen(kw_only=True)
class JobOptions:
    """What a job embeds (input, model, fields), where to, and within which budget."""

    input: Path
    output: Path
    model: str
    id_field: str | None = None
    text_field: str = "text"
    retry_failed: bool = False
    restart: bool = False
    max_tokens: int | None = None  # stop sending once this many estimated tokens went out
    deadline: float | None = None  # time.monotonic() after which nothing new is sent
    cache: Path | None = None
    window: int | None = None


@attrs.define
class JobProgress:
    """Live counters, handed to the progress display."""

    total: int = 0  # inputs in the file
    done_before: int = 0  # embedded by earlier runs
    failed_before: int = 0
    embedded: int = 0  # this run, from the API
    deduplicated: int = 0  # this run, copied from an identical text
    cached: int = 0  # this run, from the vector cache
    failed: int = 0  # this run, rejected for good
    tokens_sent: int = 0  # estimated
    started: float = attrs.field(factory=time.monotonic)
    # The input changed since the job's last run: what changed (field -> (old, new)) and
    # what the reconciliation made of it.
    changes: dict[str, tuple[Any, Any]] = attrs.field(factory=dict)
    reconciled: Reconciled | None = None

    @property
    def finished(self) -> int:
        return (
            self.done_before
            + self.failed_before
            + self.embedded
            + self.deduplicated
            + self.cached
            + self.failed
        )


@attrs.frozen
class JobResult:
    """How a run ended, with its counters and the files it wrote."""

    status: JobStatus
    progress: JobProgress
    output: Path | None  # written, or None when the job is not complete
    failures: Path | None  # the failures file, if any input failed
    message: str = ""
    rows: int = 0  # rows in the output written
