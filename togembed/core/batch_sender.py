"""How one call's batches are sent: alone through the limiter, or with other calls' texts
through the coalescer when they would wait anyway; within the call's deadline, to its URL with
its headers; the first attempt made at once and retries only after it failed."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Hashable, Sequence
from typing import Any
from urllib.parse import urlencode

import orjson

from .answers import DecodedBatch
from .batching import Batch
from .call_errors import deadline_error
from .coalesce import RequestShape, Resize, SendAlone, expected_wait
from .config import EncodingFormat
from .errors import APIResponseValidationError, DeadlineExceededError
from .limiter import Feedback, Ticket
from .protocol import encode_request
from .request import Abort, CallAborted, post_batch
from .retry import retry_failed
from .settings import CallOptions, CallSettings

__all__ = ["BatchSender"]


class BatchSender:
    """Sends the batches of one call (``abort`` is the call's: once it is set, nothing more
    is sent). ``dim`` is the vectors' size once an answer told it."""

    def __init__(
        self, settings: CallSettings, model: str, options: CallOptions | None, abort: Abort
    ) -> None:
        self.s = settings
        self.model = model
        self.abort = abort
        self.dim: int | None = None
        self.url = settings.url
        self.headers = settings.headers
        self.deadline = options.deadline if options is not None else None
        self.timeout = options.timeout if options is not None else None
        self.options_key = options.request_key() if options is not None else None
        if options is not None:
            if options.extra_query:
                sep = "&" if "?" in self.url else "?"
                self.url = f"{self.url}{sep}{urlencode(options.extra_query, doseq=True)}"
            if options.extra_headers:
                headers = {**settings.headers, **options.extra_headers}
                self.headers = {k: v for k, v in headers.items() if v is not None}

    def request_key(self, fmt: EncodingFormat | None, extra: dict[str, Any] | None) -> Hashable:
        """What calls must have in common to share a request: model, format and options."""
        if self.options_key is None and extra is None:
            return (self.model, fmt)
        try:
            body = orjson.dumps(extra, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
        except TypeError:
            body = object()  # arguments that cannot be compared: a request of its own
        return (self.model, fmt, self.options_key, body)

    def mergeable(self, batch: Batch) -> bool:
        """Whether the batch leaves room in a request for other calls' texts."""
        s = self.s
        return (
            s.coalescer is not None
            and batch.size < s.max_items
            and (batch.tokens < s.token_budget())
        )

    async def acquire(self, tokens: int) -> Ticket:
        """A limiter ticket, waiting no longer than the call's deadline (never sent after it,
        and not waited for at all when the queue ahead is sure to outlast it)."""
        limiter = self.s.limiter
        if self.deadline is None:
            return await limiter.acquire(tokens)
        left = self.deadline - time.monotonic()
        wait = expected_wait(limiter)
        if wait + (self.s.fastest_answer or 0.0) > left:
            raise self.deadline_error(wait)
        try:
            return await asyncio.wait_for(limiter.acquire(tokens), left)
        except asyncio.TimeoutError:
            raise self.deadline_error(None) from None

    async def retry(
        self,
        batch: Batch,
        texts: Sequence[str],
        fmt: EncodingFormat | None,
        extra: dict[str, Any] | None,
        first: Exception,
        started: float,
    ) -> DecodedBatch:
        """The attempts after a failed first one (begun at ``started``), as the policy allows."""
        return await retry_failed(
            functools.partial(self.attempt, batch, texts, fmt, extra),
            first,
            self.s.retry,
            started=started,
            describe=f"inputs [{batch.start}:{batch.stop}]",
            on_retry=self.s.retried,
            deadline=self.deadline,
        )

    async def attempt(
        self,
        batch: Batch,
        texts: Sequence[str],
        fmt: EncodingFormat | None,
        extra: dict[str, Any] | None,
    ) -> DecodedBatch:
        """One try: with other calls' texts if it would wait for the limiter, else alone."""
        s = self.s
        abort = self.abort
        if abort.error is not None:
            raise CallAborted
        ticket = None
        coalescer = s.coalescer
        if coalescer is not None and self.mergeable(batch):
            key = self.request_key(fmt, extra)
            ticket = coalescer.admit_now(key, batch.tokens)
            if ticket is None:
                shape = RequestShape(key, self.url, self.headers, self.model, fmt, extra)
                try:
                    decoded = await coalescer.submit(
                        shape, list(texts), batch.tokens, self.deadline, abort
                    )
                except SendAlone:
                    pass  # refused with other calls' texts: this batch goes alone
                except DeadlineExceededError as exc:  # said in the call's words
                    raise self.deadline_error(exc.expected_wait) from None
                else:
                    if self.dim is not None and decoded.dim != self.dim:
                        raise APIResponseValidationError(
                            f"embedding dimension {decoded.dim} differs from {self.dim} "
                            "of earlier answers"
                        )
                    self.dim = decoded.dim
                    return decoded
        if ticket is None:
            ticket = await self.acquire(batch.tokens)
        timeout = s.timeout
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
        soonest = s.fastest_answer or 0.0
        if abort.error is not None or self.too_big(batch) or timeout <= soonest:
            s.limiter.release(ticket, Feedback(status=None, sent=False))
            if abort.error is not None:
                raise CallAborted
            if timeout <= soonest:
                raise self.deadline_error(None)
            raise Resize  # the limiter learned a smaller budget while we waited
        decoded = await post_batch(
            s,
            ticket,
            url=self.url,
            headers=self.headers,
            body=encode_request(self.model, texts, fmt, extra),
            size=batch.size,
            timeout=timeout,
            aborts=(abort,),
            dim=self.dim,
        )
        self.dim = decoded.dim
        return decoded

    def deadline_error(self, wait: float | None) -> DeadlineExceededError:
        return deadline_error(self.timeout, wait, self.s.stats.waiting)

    def too_big(self, batch: Batch) -> bool:
        """The server taught us a smaller batch size, or the limiter's token budget is smaller
        than the batch: cut it to fit rather than wait for a bucket it can never fit in."""
        if batch.size > self.s.max_items:
            return True
        return batch.size > 1 and batch.tokens > self.s.token_budget()
