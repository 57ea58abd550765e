"""Scheduling one call: a bounded pool of senders pulls batches from a lazy plan, retries each,
splits what the server finds too large, bisects to the input it rejects, and hands every good
answer to a sink that writes it at its place. Small batches that would wait for the rate limit
go through the client's coalescer and share requests with other calls."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from .batch_sender import BatchSender
from .batching import Batch, plan_batches, split_batch
from .call_errors import dimensions_error
from .coalesce import Resize
from .config import EncodingFormat
from .errors import (
    APIStatusError,
    ModelNotAvailableError,
)
from .refusals import refused_arguments, rejects_input, stated_limit, too_many_inputs
from .request import Abort, CallAborted
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
        self.sender = BatchSender(settings, model, options, self.abort)

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
        if self.sender.too_big(batch):
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
        texts = self.texts[batch.start : batch.stop]
        started = time.monotonic()
        try:
            # The first attempt is made here and retries only after it failed: the success
            # path builds no retry machinery, and no coroutine of ours waits in between (a
            # service makes 1000 calls a second: what lives per call feeds the collector).
            try:
                decoded = await self.sender.attempt(batch, texts, sent_format, extra)
            except Exception as first:
                decoded = await self.sender.retry(batch, texts, sent_format, extra, first, started)
        except Resize:
            await self._process(batch)
            return
        except APIStatusError as exc:
            await self._recover(batch, exc, sent_format, extra)
            return
        asked = self.options.dimensions if self.options is not None else None
        if asked is not None and decoded.dim != asked:
            raise dimensions_error(self.s, self.model, asked, decoded.dim)
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


def run_call(
    settings: CallSettings,
    texts: Sequence[str],
    model: str,
    sink: Sink,
    *,
    prefer_float: bool = False,
    options: CallOptions | None = None,
) -> Awaitable[None]:
    """Embed all ``texts`` into ``sink`` (await what it returns). A call of one batch is that
    batch's own coroutine, with nothing of ours around it while it waits."""
    call = _Call(settings, texts, model, sink, prefer_float, options=options)
    batches = plan_batches(texts, max_items=settings.max_items, max_tokens=settings.max_tokens)
    first = next(batches, None)
    second = next(batches, None)
    if first is None:
        return asyncio.sleep(0)
    if second is None:  # a service's few texts: no pool, no extra tasks, no other sender
        return call._process(first)
    workers = min(settings.concurrency, max(2, -(-len(texts) // settings.max_items)))
    return _run_batches(call, itertools.chain((first, second), batches), workers)


async def _run_batches(call: _Call, batches: Iterator[Batch], workers: int) -> None:
    try:
        await _run_pool(batches, call.process, workers)
    except CallAborted:  # a sender noticed before the failing one's error surfaced
        error = call.abort.error
        if error is None:
            raise
        raise error from None
