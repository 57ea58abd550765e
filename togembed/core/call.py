"""Scheduling one call: a bounded pool of senders pulls batches from a lazy plan, retries each,
splits what the server finds too large, bisects to the input it rejects, and hands every good
answer to a sink that writes it at its place. Small batches that would wait for the rate limit
go through the client's coalescer and share requests with other calls."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from typing import Any
from urllib.parse import urlencode

import orjson

from .answers import DecodedBatch
from .batching import Batch, plan_batches, split_batch
from .coalesce import RequestShape, Resize, SendAlone, expected_wait
from .config import EncodingFormat
from .errors import (
    APIResponseValidationError,
    APIStatusError,
    DeadlineExceededError,
    DimensionsNotSupportedError,
    ModelNotAvailableError,
)
from .limiter import Feedback, Ticket
from .protocol import encode_request
from .refusals import refused_arguments, rejects_input, stated_limit, too_many_inputs
from .request import Abort, CallAborted, post_batch
from .retry import call_with_retries
from .settings import CallOptions, CallSettings
from .sinks import Sink
from .stated_limits import MAX_INPUTS

__all__ = ["Abort", "CallAborted", "run_call"]

logger = logging.getLogger("togembed")


class _Call:
    """The batches of one call, sent under the client's settings."""

    def __init__(
        self,
        settings: CallSettings,
        texts: Sequence[str],
        model: str,
        sink: Sink,
        prefer_float: bool,
        on_input_error: Callable[[int, APIStatusError], None] | None = None,
        options: CallOptions | None = None,
        abort: Abort | None = None,
    ) -> None:
        self.s = settings
        self.texts = texts
        self.model = model
        self.sink = sink
        self.prefer_float = prefer_float
        # Given, an input the server rejects for good is reported here instead of raised, and
        # the rest of its batch goes on (a stream collecting errors); ``embed`` raises.
        self.on_input_error = on_input_error
        self.options = options
        self.abort = abort if abort is not None else Abort()
        self.dim: int | None = None
        self.url = settings.url
        self.headers = settings.headers
        self.deadline = options.deadline if options is not None else None
        self.options_key = options.request_key() if options is not None else None
        if options is not None:
            if options.extra_query:
                sep = "&" if "?" in self.url else "?"
                self.url = f"{self.url}{sep}{urlencode(options.extra_query, doseq=True)}"
            if options.extra_headers:
                headers = {**settings.headers, **options.extra_headers}
                self.headers = {k: v for k, v in headers.items() if v is not None}

    @property
    def encoding_format(self) -> EncodingFormat | None:
        """What to ask for: the client's format (None once the server refused the argument),
        or "float" when the caller wants floats anyway."""
        fmt = self.s.encoding_format
        return "float" if fmt is not None and self.prefer_float else fmt

    def _extra(self) -> dict[str, Any] | None:
        """Optional body arguments, as the server is currently known to accept them."""
        o = self.options
        if o is None:
            return None
        extra: dict[str, Any] = {}
        if o.dimensions is not None and self.model not in self.s.no_dimensions:
            extra["dimensions"] = o.dimensions
        if o.user is not None and self.s.send_user:
            extra["user"] = o.user
        if o.extra_body:
            extra.update(o.extra_body)
        return extra or None

    # -- sending one batch ------------------------------------------------------------------

    def _request_key(self, fmt: EncodingFormat | None, extra: dict[str, Any] | None) -> Hashable:
        """What calls must have in common to share a request: model, format and options."""
        if self.options_key is None and extra is None:
            return (self.model, fmt)
        try:
            body = orjson.dumps(extra, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
        except TypeError:
            body = object()  # arguments that cannot be compared: a request of its own
        return (self.model, fmt, self.options_key, body)

    def _mergeable(self, batch: Batch) -> bool:
        """Whether the batch leaves room in a request for other calls' texts."""
        s = self.s
        return (
            s.coalescer is not None
            and batch.size < s.max_items
            and (batch.tokens < s.token_budget())
        )

    async def _acquire(self, tokens: int) -> Ticket:
        """A limiter ticket, waiting no longer than the call's deadline (never sent after it,
        and not waited for at all when the queue ahead is sure to outlast it)."""
        limiter = self.s.limiter
        if self.deadline is None:
            return await limiter.acquire(tokens)
        left = self.deadline - time.monotonic()
        wait = expected_wait(limiter)
        if wait + (self.s.fastest_answer or 0.0) > left:
            raise _deadline_error(self, wait)
        try:
            return await asyncio.wait_for(limiter.acquire(tokens), left)
        except asyncio.TimeoutError:
            raise _deadline_error(self, None) from None

    async def send(
        self, batch: Batch, fmt: EncodingFormat | None, extra: dict[str, Any] | None
    ) -> DecodedBatch:
        s = self.s
        abort = self.abort
        texts = self.texts[batch.start : batch.stop]

        async def attempt() -> DecodedBatch:
            if abort.error is not None:
                raise CallAborted
            ticket = None
            coalescer = s.coalescer
            if coalescer is not None and self._mergeable(batch):
                key = self._request_key(fmt, extra)
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
                        raise _deadline_error(self, exc.expected_wait) from None
                    else:
                        if self.dim is not None and decoded.dim != self.dim:
                            raise APIResponseValidationError(
                                f"embedding dimension {decoded.dim} differs from {self.dim} "
                                "of earlier answers"
                            )
                        self.dim = decoded.dim
                        return decoded
            if ticket is None:
                ticket = await self._acquire(batch.tokens)
            timeout = s.timeout
            if self.deadline is not None:
                timeout = min(timeout, self.deadline - time.monotonic())
            soonest = s.fastest_answer or 0.0
            if abort.error is not None or self._too_big(batch) or timeout <= soonest:
                s.limiter.release(ticket, Feedback(status=None, sent=False))
                if abort.error is not None:
                    raise CallAborted
                if timeout <= soonest:
                    raise _deadline_error(self, None)
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

        return await call_with_retries(
            attempt,
            s.retry,
            describe=f"inputs [{batch.start}:{batch.stop}]",
            on_retry=s.retried,
            deadline=self.deadline,
        )

    def _too_big(self, batch: Batch) -> bool:
        """The server taught us a smaller batch size, or the limiter's token budget is smaller
        than the batch: cut it to fit rather than wait for a bucket it can never fit in."""
        if batch.size > self.s.max_items:
            return True
        return batch.size > 1 and batch.tokens > self.s.token_budget()

    # -- one batch, start to end ------------------------------------------------------------

    async def process(self, batch: Batch) -> None:
        """Embed one batch into the sink. An error escaping here ends the whole call: it is
        recorded in ``abort`` first, so the call's other senders stop at once."""
        try:
            await self._process(batch)
        except CallAborted:
            raise
        except Exception as exc:
            if self.abort.error is None:
                self.abort.error = exc
            raise

    async def _process(self, batch: Batch) -> None:
        s = self.s
        if self.abort.error is not None:
            raise CallAborted
        if self._too_big(batch):
            for part in plan_batches(
                self.texts,
                max_items=s.max_items,
                max_tokens=s.token_budget(),
                start=batch.start,
                stop=batch.stop,
            ):
                await self._process(part)
            return
        sent_format = self.encoding_format
        extra = self._extra()
        try:
            decoded = await self.send(batch, sent_format, extra)
        except Resize:
            await self._process(batch)
            return
        except APIStatusError as exc:
            await self._recover(batch, exc, sent_format, extra)
            return
        asked = self.options.dimensions if self.options is not None else None
        if asked is not None and decoded.dim != asked:
            raise _dimensions_error(self.s, self.model, asked, decoded.dim)
        s.stats.inputs += batch.size
        s.stats.estimated_tokens += batch.tokens
        async with s.cpu_gate:
            self.sink.write(batch, decoded)

    async def _recover(
        self,
        batch: Batch,
        exc: APIStatusError,
        sent_format: EncodingFormat | None,
        extra: dict[str, Any] | None,
    ) -> None:
        """Split, bisect or fall back where that can turn a rejection into success; else raise
        the error, pinned to the input when it is one input's fault (or report that input to
        ``on_input_error``)."""
        s = self.s
        if isinstance(exc, ModelNotAvailableError):
            raise exc  # the model, not the batch: no bisection, nothing else sent
        sent = frozenset(extra or ()) | ({"encoding_format"} if sent_format is not None else set())
        refused = refused_arguments(exc, sent)
        if refused:
            s.stop_sending(refused, self.model, exc.message)
            # Resent only if it now differs (an ``extra_body`` may carry the same argument).
            if self.encoding_format != sent_format or self._extra() != extra:
                await self._process(batch)
                return
        if batch.size > 1 and rejects_input(exc):
            stated = stated_limit(exc)
            if stated is not None and s.learn(stated, batch.size, batch.tokens):
                # The server said how big a request may be: re-plan at that size at once
                # (``process`` cuts what no longer fits), no halving.
                s.stats.batches_split += 1
                await self._process(batch)
                return
            if too_many_inputs(exc) and batch.size <= s.max_items:  # no usable number: halve
                s.max_items = max(1, batch.size // 2)
                logger.warning(
                    "server refused %d inputs per request; using %d", batch.size, s.max_items
                )
            s.stats.batches_split += 1
            for half in split_batch(self.texts, batch):
                await self._process(half)
            return
        if batch.size == 1 and rejects_input(exc):
            exc.input_index = batch.start
            stated = stated_limit(exc)
            if stated is not None and stated.kind != MAX_INPUTS:
                s.record(stated)
                exc.message = (
                    f"too long for this server (limit {stated.describe()}); "
                    f"the server said: {exc.message}"
                )
            if self.on_input_error is not None:
                self.on_input_error(batch.start, exc)
                return
        raise exc


def _deadline_error(call: _Call, wait: float | None) -> DeadlineExceededError:
    """Nothing was sent for the call: its timeout passed (``wait`` None) or would pass in the
    queue at the rate limit."""
    timeout = call.options.timeout if call.options is not None else None
    if wait is None:
        return DeadlineExceededError(
            f"the call's timeout of {timeout:g} s passed while it waited for the rate "
            "limit; nothing was sent"
        )
    return DeadlineExceededError(
        f"the call cannot be sent within its timeout of {timeout:g} s: the expected wait "
        f"at the rate limit is {wait:.3g} s ({call.s.stats.waiting} calls waiting); "
        "nothing was sent",
        expected_wait=wait,
    )


def _dimensions_error(
    s: CallSettings, model: str, asked: int, got: int
) -> DimensionsNotSupportedError:
    refusal = s.no_dimensions.get(model)
    if refusal is not None:
        message = (
            f"this server does not support dimensions={asked} for model {model!r}; "
            f"the model returns {got} (the server said: {refusal})"
        )
    else:
        message = (
            f"dimensions={asked} was asked, but the server answered vectors of {got} "
            f"dimensions for model {model!r}: it ignores the argument"
        )
    return DimensionsNotSupportedError(message, dimensions=asked, model_dimensions=got)


async def _run_pool(
    batches: Iterator[Batch], process: Callable[[Batch], Awaitable[None]], workers: int
) -> None:
    """``workers`` senders share one lazy plan; the first failure cancels the rest."""

    async def worker() -> None:
        for batch in batches:
            await process(batch)

    tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def run_call(
    settings: CallSettings,
    texts: Sequence[str],
    model: str,
    sink: Sink,
    *,
    prefer_float: bool = False,
    options: CallOptions | None = None,
) -> None:
    """Embed all ``texts`` into ``sink``."""
    call = _Call(settings, texts, model, sink, prefer_float, options=options)
    batches = plan_batches(texts, max_items=settings.max_items, max_tokens=settings.max_tokens)
    first = next(batches, None)
    second = next(batches, None)
    if first is None:
        return
    if second is None:  # a service's few texts: no pool, no extra tasks
        await call.process(first)
        return
    workers = min(settings.concurrency, max(2, -(-len(texts) // settings.max_items)))
    try:
        await _run_pool(itertools.chain((first, second), batches), call.process, workers)
    except CallAborted:  # a sender noticed before the failing one's error surfaced
        error = call.abort.error
        if error is None:
            raise
        raise error from None
