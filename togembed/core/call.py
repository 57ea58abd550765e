"""Scheduling one call: a bounded pool of senders pulls batches from a lazy plan, retries each,
splits what the server finds too large, bisects to the input it rejects, and hands every good
answer to a sink that writes it at its place."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import urlencode

import attrs
import numpy as np

from .batching import Batch, plan_batches, split_batch
from .config import EncodingFormat, RetryPolicy
from .errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    DimensionsNotSupportedError,
    ModelNotAvailableError,
)
from .protocol import (
    DecodedBatch,
    decode_embeddings,
    encode_request,
    error_from_response,
    rejected_arguments,
    request_id_of,
)
from .ratelimit import Feedback, Limiter
from .retry import call_with_retries
from .stated_limits import (
    MAX_INPUT_CHARS,
    MAX_INPUT_TOKENS,
    MAX_INPUTS,
    MAX_REQUEST_TOKENS,
    StatedLimit,
    limit_from_message,
    request_token_budget,
)
from .transport import Transport
from .types import Embedding, EmbeddingResponse, Usage

__all__ = [
    "Abort",
    "ArraySink",
    "CallOptions",
    "CallSettings",
    "ClientStats",
    "ListSink",
    "run_call",
]

logger = logging.getLogger("togembed")

_REQUEST_LEVEL = re.compile(
    r"model|unrecognized request argument|unknown field|encoding_format|dimensions|matryoshka|"
    r"api key|authoriz",
    re.I,
)
_TOO_MANY = re.compile(
    r"too many inputs|batch size|maximum (?:number of )?inputs|payload too large|"
    r"request (?:entity )?too large|at most \d+ inputs",
    re.I,
)
_INPUT_HINT = re.compile(r"input|token|too long|length|context", re.I)
# Servers that take no ``dimensions`` say so in many ways: Together "Unrecognized request
# arguments supplied: dimensions", vLLM "dimensions is currently not supported" or "does not
# support matryoshka representation", OpenAI "does not support specifying dimensions".
_DIMENSIONS_REFUSED = re.compile(r"dimensions|matryoshka", re.I)


@attrs.define
class ClientStats:
    """Running counters of one client, for logs and progress: why is my job slow?"""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    inputs: int = 0
    estimated_tokens: int = 0
    tokens: int = 0  # as counted by the server (``usage``), where it says
    batches_split: int = 0
    in_flight: int = 0
    # Limits a server stated in a refusal ("maximum allowed batch size 32", "max 300000 tokens
    # per request", "must have less than 512 tokens"); None until one did. docs/backends.md
    server_max_inputs: int | None = None
    server_max_request_tokens: int | None = None
    server_max_input_tokens: int | None = None
    server_max_input_chars: int | None = None


@attrs.define
class CallSettings:
    """What a call needs from its client. ``max_items``, ``max_tokens`` and
    ``encoding_format`` are learned: they shrink/fall back when a server refuses, and the whole
    client remembers."""

    transport: Transport
    url: str
    headers: dict[str, str]
    timeout: float
    retry: RetryPolicy
    max_items: int
    max_tokens: int
    concurrency: int
    encoding_format: EncodingFormat | None
    stats: ClientStats
    limiter: Limiter
    cpu_gate: TurnGate = attrs.field(factory=lambda: TurnGate())
    # Redacted from every server text we keep (the API key).
    secrets: tuple[str, ...] = ()
    # Learned: the server refused ``user`` (sent no more), or ``dimensions`` for a model
    # (model -> the server's message, resent without it and the size checked).
    send_user: bool = True
    no_dimensions: dict[str, str] = attrs.field(factory=dict)
    warned_connection: bool = False


@attrs.frozen
class CallOptions:
    """Per-call arguments of ``create``/``embed`` (the peers' ``dimensions``, ``user``,
    ``extra_*`` and ``timeout``); None for a call that passes none (the common case, so no
    per-call work at all). ``deadline`` is ``time.monotonic()`` seconds."""

    dimensions: int | None = None
    user: str | None = None
    extra_headers: Mapping[str, str | None] | None = None
    extra_query: Mapping[str, Any] | None = None
    extra_body: Mapping[str, Any] | None = None
    timeout: float | None = None
    deadline: float | None = None


class Abort:
    """Shared by the batches of one call (or one stream): the first error that ends it. Set
    before the failing sender yields, so no other sender starts a request after it."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: BaseException | None = None


class CallAborted(Exception):
    """A sender stopped because another batch of its call failed for good (``Abort.error``)."""


class TurnGate:
    """Bounds the CPU-heavy work (decoding answers, copying rows: 1-5 ms a step) done in one
    event-loop turn. Answers that arrive together would otherwise be handled back to back —
    16 of them stall the loop for 80 ms. Steps share a budget per turn; once it is spent, the
    next step waits two turns (a task woken by a timer needs two: the timer, then its step)."""

    BUDGET = 0.002  # seconds of heavy work per turn

    def __init__(self) -> None:
        self._spent = 0.0
        self._blocked = False
        self._armed = False
        self._entered = 0.0

    async def __aenter__(self) -> None:
        while self._blocked:
            await asyncio.sleep(0)
        self._entered = time.perf_counter()

    async def __aexit__(self, *exc_info: object) -> None:
        self._spent += time.perf_counter() - self._entered
        loop = asyncio.get_running_loop()
        if self._spent >= self.BUDGET:
            self._spent = 0.0
            self._blocked = True
            loop.call_soon(self._unblock, 2)
        elif not self._armed:
            self._armed = True
            loop.call_soon(self._new_turn)

    def _new_turn(self) -> None:
        self._armed = False
        self._spent = 0.0

    def _unblock(self, turns: int) -> None:
        if turns > 1:
            asyncio.get_running_loop().call_soon(self._unblock, turns - 1)
        else:
            self._blocked = False


class Sink(Protocol):
    """Where the rows of a validated batch go."""

    def write(self, batch: Batch, decoded: DecodedBatch) -> None: ...


class ArraySink:
    """Rows straight into one preallocated float32 array; allocated when the first answer tells
    the dimension, so nothing is held per vector."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.array: np.ndarray | None = None

    def write(self, batch: Batch, decoded: DecodedBatch) -> None:
        if self.array is None:
            self.array = np.empty((self.n, decoded.dim), dtype=np.float32)
        decoded.write_into(self.array[batch.start : batch.stop])

    def result(self) -> np.ndarray:
        return self.array if self.array is not None else np.empty((0, 0), dtype=np.float32)


class ListSink:
    """``Embedding`` objects for ``embeddings.create``, the peers' response shape."""

    def __init__(self, n: int, *, keep_base64: bool) -> None:
        self.data: list[Embedding | None] = [None] * n
        self.keep_base64 = keep_base64
        self.model: str | None = None
        self.usage: list[Usage | None] = []

    def write(self, batch: Batch, decoded: DecodedBatch) -> None:
        self.data[batch.start : batch.stop] = decoded.to_embeddings(
            batch.start, keep_base64=self.keep_base64
        )
        self.model = self.model or decoded.model
        self.usage.append(decoded.usage)

    def result(self, model: str) -> EmbeddingResponse:
        usage = None
        if self.usage and all(u is not None for u in self.usage):
            prompt = sum(u.prompt_tokens for u in self.usage if u)
            total = sum(u.total_tokens for u in self.usage if u)
            usage = Usage(prompt_tokens=prompt, total_tokens=total)
        data: list[Embedding] = self.data  # type: ignore[assignment]  # every slot is written
        return EmbeddingResponse(data=data, model=self.model or model, usage=usage)


def _is_request_level(exc: APIStatusError) -> bool:
    return exc.param in ("model", "encoding_format", "dimensions", "user") or bool(
        _REQUEST_LEVEL.search(exc.message)
    )


_SIZE_STATUSES = (400, 403, 413, 422)


def _stated_limit(exc: APIStatusError) -> StatedLimit | None:
    """The size limit a refusal states (docs/backends.md), if it is one that could."""
    return limit_from_message(exc.message) if exc.status_code in _SIZE_STATUSES else None


def _rejects_input(exc: APIStatusError) -> bool:
    """A rejection that may be caused by one input or by the batch's size (so splitting or
    bisecting can fix or find it)."""
    if _stated_limit(exc) is not None:
        # A stated size limit is about the inputs, even where the message also says "model"
        # (vLLM and OpenAI: "This model's maximum context length is 512 tokens").
        return True
    if exc.status_code in (400, 413, 422):
        return not _is_request_level(exc)
    if exc.status_code == 403:  # Together answers 403 for inputs over the context length
        return bool(_INPUT_HINT.search(exc.message)) and not _is_request_level(exc)
    return False


def _too_many_inputs(exc: APIStatusError) -> bool:
    """The batch has more inputs than the server takes. A 413 means so unless its message
    states another limit: TEI before 1.9 sent 413 for an input over the model's length too."""
    stated = _stated_limit(exc)
    if stated is not None:
        return stated.kind == MAX_INPUTS
    return exc.status_code == 413 or bool(_TOO_MANY.search(exc.message))


class _Resize(Exception):
    """A batch admitted by the limiter no longer fits its budget: cut it and start again."""


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

    def _timed_out(self) -> APITimeoutError:
        timeout = self.options.timeout if self.options is not None else None
        return APITimeoutError(f"the call did not finish within its timeout of {timeout:g} s")

    async def _acquire(self, tokens: int) -> Any:
        """A limiter ticket, waiting no longer than the call's deadline (never sent after it)."""
        if self.deadline is None:
            return await self.s.limiter.acquire(tokens)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self._timed_out()
        try:
            return await asyncio.wait_for(self.s.limiter.acquire(tokens), left)
        except TimeoutError:
            raise self._timed_out() from None

    async def send(
        self, batch: Batch, fmt: EncodingFormat | None, extra: dict[str, Any] | None
    ) -> DecodedBatch:
        s = self.s
        abort = self.abort
        body = encode_request(self.model, self.texts[batch.start : batch.stop], fmt, extra)

        async def attempt() -> DecodedBatch:
            if abort.error is not None:
                raise CallAborted
            ticket = await self._acquire(batch.tokens)
            timeout = s.timeout
            if self.deadline is not None:
                timeout = min(timeout, self.deadline - time.monotonic())
            if abort.error is not None or self._too_big(batch) or timeout <= 0:
                s.limiter.release(ticket, Feedback(status=None, sent=False))
                if abort.error is not None:
                    raise CallAborted
                if timeout <= 0:
                    raise self._timed_out()
                raise _Resize  # the limiter learned a smaller budget while we waited
            feedback = Feedback(status=None)
            s.stats.requests += 1
            s.stats.in_flight += 1
            try:
                logger.debug("POST %s inputs [%d:%d]", self.url, batch.start, batch.stop)
                resp = await s.transport.post(self.url, body, self.headers, timeout)
                feedback = Feedback(status=resp.status, headers=resp.headers)
                if not 200 <= resp.status < 300:
                    if resp.status == 429:
                        s.stats.rate_limited += 1
                    elif resp.status >= 500:
                        s.stats.server_errors += 1
                    exc = error_from_response(
                        resp.status, resp.headers, resp.body, secrets=s.secrets
                    )
                    if isinstance(exc, ModelNotAvailableError) and abort.error is None:
                        abort.error = exc  # before the limiter wakes anyone up
                    hint = exc.retry_after
                    if hint is not None:  # the user's cap bounds every pause, the limiter's too
                        hint = min(hint, s.retry.max_retry_after)
                    feedback = attrs.evolve(feedback, retry_after=hint)
                    raise exc
                async with s.cpu_gate:
                    decoded = decode_embeddings(
                        resp.body,
                        batch.size,
                        dim=self.dim,
                        request_id=request_id_of(resp.headers),
                        secrets=s.secrets,
                    )
                if decoded.usage is not None:
                    s.stats.tokens += decoded.usage.prompt_tokens
                    feedback = attrs.evolve(feedback, tokens=decoded.usage.prompt_tokens)
            finally:
                s.stats.in_flight -= 1
                s.limiter.release(ticket, feedback)
            self.dim = decoded.dim
            return decoded

        def on_retry(exc: BaseException, wait: float) -> None:
            s.stats.retries += 1
            if isinstance(exc, APIConnectionError) and not s.warned_connection:
                s.warned_connection = True  # once per client: a server that is down says so
                logger.warning(
                    "cannot reach %s (%s); retrying, up to %d times (no more warnings; "
                    "RetryPolicy(connect_retries=0) fails at once instead)",
                    s.url,
                    exc,
                    s.retry.max_connect_retries
                    if getattr(exc, "connect_failed", False)
                    else s.retry.max_retries,
                )

        return await call_with_retries(
            attempt,
            s.retry,
            describe=f"inputs [{batch.start}:{batch.stop}]",
            on_retry=on_retry,
            deadline=self.deadline,
        )

    def _too_big(self, batch: Batch) -> bool:
        """The server taught us a smaller batch size, or the limiter's token budget is smaller
        than the batch: cut it to fit rather than wait for a bucket it can never fit in."""
        if batch.size > self.s.max_items:
            return True
        return batch.size > 1 and batch.tokens > self._token_budget()

    def _token_budget(self) -> int:
        """Estimated tokens one request may carry: the client's budget (lowered when a server
        states a per-request limit) or the limiter's, whichever is smaller."""
        cap = self.s.limiter.max_batch_tokens()
        return self.s.max_tokens if cap is None else min(cap, self.s.max_tokens)

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
                max_tokens=self._token_budget(),
                start=batch.start,
                stop=batch.stop,
            ):
                await self._process(part)
            return
        sent_format = self.encoding_format
        extra = self._extra()
        try:
            decoded = await self.send(batch, sent_format, extra)
        except _Resize:
            await self._process(batch)
            return
        except APIStatusError as exc:
            await self._recover(batch, exc, sent_format, extra)
            return
        asked = self.options.dimensions if self.options is not None else None
        if asked is not None and decoded.dim != asked:
            raise self._dimensions_error(asked, decoded.dim)
        s.stats.inputs += batch.size
        s.stats.estimated_tokens += batch.tokens
        async with s.cpu_gate:
            self.sink.write(batch, decoded)

    def _dimensions_error(self, asked: int, got: int) -> DimensionsNotSupportedError:
        refusal = self.s.no_dimensions.get(self.model)
        if refusal is not None:
            message = (
                f"this server does not support dimensions={asked} for model {self.model!r}; "
                f"the model returns {got} (the server said: {refusal})"
            )
        else:
            message = (
                f"dimensions={asked} was asked, but the server answered vectors of {got} "
                f"dimensions for model {self.model!r}: it ignores the argument"
            )
        return DimensionsNotSupportedError(message, dimensions=asked, model_dimensions=got)

    def _drop_refused_arguments(
        self, exc: APIStatusError, sent_format: EncodingFormat | None, extra: dict[str, Any] | None
    ) -> bool:
        """If a 400/422 refuses optional arguments this request sent (``encoding_format``,
        ``user``, ``dimensions``), stop sending them and say True (resend). Judged by what this
        request sent, not by the current setting: concurrent senders that sent an argument
        before the first refusal came back must resend too."""
        if exc.status_code not in (400, 422):
            return False
        s = self.s
        named = rejected_arguments(exc.message)
        # "unrecognized request arguments" naming none: drop all we sent. Names given: only
        # those (an ``extra_body`` key of the caller's is the caller's to fix).
        drop_all = named is not None and not named
        resend = False
        if sent_format is not None and (
            drop_all
            or "encoding_format" in exc.message.lower()
            or (named and "encoding_format" in named)
        ):
            if s.encoding_format is not None:
                logger.warning("server rejects encoding_format; asking for float JSON from now on")
                s.encoding_format = None
            resend = True
        if extra and "user" in extra and (drop_all or (named and "user" in named)):
            if s.send_user:
                logger.warning("server rejects the 'user' argument; not sending it from now on")
                s.send_user = False
            resend = True
        if (
            extra
            and "dimensions" in extra
            and (
                drop_all
                or (named and "dimensions" in named)
                or exc.param == "dimensions"
                or (named is None and _DIMENSIONS_REFUSED.search(exc.message))
            )
        ):
            # Resent without it; the answer's size is then checked against what was asked.
            s.no_dimensions.setdefault(self.model, exc.message)
            resend = True
        return resend

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
        if self._drop_refused_arguments(exc, sent_format, extra) and (
            self.encoding_format != sent_format or self._extra() != extra
        ):  # resent only if it now differs (an ``extra_body`` may carry the same argument)
            await self._process(batch)
            return
        if batch.size > 1 and _rejects_input(exc):
            stated = _stated_limit(exc)
            if stated is not None and self._learn(batch, stated):
                # The server said how big a request may be: re-plan at that size at once
                # (``process`` cuts what no longer fits), no halving.
                s.stats.batches_split += 1
                await self._process(batch)
                return
            if _too_many_inputs(exc) and batch.size <= s.max_items:  # no usable number: halve
                s.max_items = max(1, batch.size // 2)
                logger.warning(
                    "server refused %d inputs per request; using %d", batch.size, s.max_items
                )
            s.stats.batches_split += 1
            for half in split_batch(self.texts, batch):
                await self._process(half)
            return
        if batch.size == 1 and _rejects_input(exc):
            exc.input_index = batch.start
            stated = _stated_limit(exc)
            if stated is not None and stated.kind != MAX_INPUTS:
                self._record(stated)
                exc.message = (
                    f"too long for this server (limit {stated.describe()}); "
                    f"the server said: {exc.message}"
                )
            if self.on_input_error is not None:
                self.on_input_error(batch.start, exc)
                return
        raise exc

    def _learn(self, batch: Batch, stated: StatedLimit) -> bool:
        """Take in a limit the server stated on refusing ``batch``. True when the batch no
        longer fits what was learned, so re-planning it fixes the refusal. A per-input limit is
        only recorded: one input is at fault, and bisecting finds it."""
        s = self.s
        self._record(stated)
        if stated.kind == MAX_INPUTS:
            if stated.value >= batch.size:  # the number does not explain this refusal
                return False
            if stated.value < s.max_items:
                logger.warning(
                    "server takes at most %d inputs per request (it said so); using %d",
                    stated.value,
                    stated.value,
                )
                s.max_items = stated.value
            return True
        if stated.kind == MAX_REQUEST_TOKENS:
            budget = request_token_budget(stated, batch.tokens)
            if budget >= batch.tokens:  # our estimate cannot explain the refusal: halve it
                budget = max(1, batch.tokens // 2)
            if budget < s.max_tokens:
                logger.warning(
                    "server takes at most %d tokens per request (it said so); sending at most "
                    "%d estimated tokens per request",
                    stated.value,
                    budget,
                )
                s.max_tokens = budget
            return batch.tokens > self._token_budget()
        return False

    def _record(self, stated: StatedLimit) -> None:
        """Keep the limit in ClientStats, where a user looking at a slow or failed job sees it."""
        stats = self.s.stats
        if stated.kind == MAX_INPUTS:
            stats.server_max_inputs = stated.value
        elif stated.kind == MAX_REQUEST_TOKENS:
            stats.server_max_request_tokens = stated.value
        elif stated.kind == MAX_INPUT_TOKENS:
            stats.server_max_input_tokens = stated.value
        elif stated.kind == MAX_INPUT_CHARS:
            stats.server_max_input_chars = stated.value


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
