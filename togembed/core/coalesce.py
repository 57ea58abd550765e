"""Concurrent small calls share requests: the texts of calls that would wait for the rate
limiter anyway travel together, so a service's many one-text calls fit a request limit.

A call that can be sent now is sent now (``admit_now``: nothing like it waits, and the limiter
has a ticket free). One that would wait joins the queue of its request shape (same model,
format and options); one pump task per shape waits for the limiter and, when a ticket comes,
takes as many queued calls as fit one request (items and tokens) and sends them in a task of
their own, so that cancelling one caller never cancels the others' request. Each caller gets
exactly its rows. A refusal that may be one input's fault comes back as ``SendAlone``: each
caller resends its texts alone, so one caller's bad input never fails a neighbour.

A call with a deadline that the queue cannot meet fails at once (``DeadlineExceededError``);
one whose deadline passes while it waits is dropped before it is sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Hashable, Mapping
from typing import Any

import attrs

from .answers import DecodedBatch
from .config import EncodingFormat
from .errors import APIConnectionError, APIStatusError, APITimeoutError, DeadlineExceededError
from .limiter import Feedback, Limiter, Ticket
from .protocol import encode_request
from .refusals import rejects_input
from .request import Abort, CallAborted, post_batch
from .settings import CallSettings

__all__ = ["Coalescer", "RequestShape", "Resize", "SendAlone", "expected_wait"]

logger = logging.getLogger("togembed")


class SendAlone(Exception):
    """A request shared with other calls was refused in a way that may be one input's fault:
    the caller resends its own texts alone (and bisects them, if need be)."""


class Resize(Exception):
    """A batch admitted by the limiter no longer fits its budget: cut it and start again."""


@attrs.frozen
class RequestShape:
    """Everything of a request but its inputs; calls with the same ``key`` may share one."""

    key: Hashable
    url: str
    headers: Mapping[str, str]
    model: str
    encoding_format: EncodingFormat | None
    extra: dict[str, Any] | None


def expected_wait(limiter: Limiter, ahead: int = 0) -> float:
    """Seconds until the limiter would admit a request behind ``ahead`` more requests than
    those already waiting; 0 for a limiter that cannot tell."""
    estimate = getattr(limiter, "expected_wait", None)
    return float(estimate(ahead)) if estimate is not None else 0.0


class _Part:
    """One call's batch waiting in a queue, until its rows (or its error) come back."""

    __slots__ = ("abort", "deadline", "enqueued", "future", "sent", "taken", "texts", "tokens")

    def __init__(
        self,
        texts: list[str],
        tokens: int,
        deadline: float | None,
        abort: Abort,
        future: asyncio.Future[DecodedBatch],
        enqueued: float,
    ) -> None:
        self.texts = texts
        self.tokens = tokens
        self.deadline = deadline
        self.abort = abort
        self.future = future
        self.enqueued = enqueued
        self.taken = False  # out of the queue: sent, failed, or given up by its caller
        self.sent = False


class _Queue:
    """The calls waiting for one request shape, and the pump that sends them."""

    __slots__ = ("full", "items", "parts", "pump", "shape")

    def __init__(self, shape: RequestShape) -> None:
        self.shape = shape
        self.parts: deque[_Part] = deque()
        self.items = 0  # texts of the parts still queued
        self.pump: asyncio.Task[None] | None = None
        self.full: asyncio.Future[None] | None = None  # set when a request's worth is queued


class Coalescer:
    """Merges the waiting small batches of one client's concurrent calls into shared requests.

    ``window``: seconds a call may wait for company even when it could be sent at once (0:
    merge only what would wait anyway).
    """

    def __init__(self, settings: CallSettings, *, window: float = 0.0) -> None:
        self.s = settings
        self.window = window
        self._queues: dict[Hashable, _Queue] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._try_acquire = getattr(settings.limiter, "try_acquire", None)
        self._try_add_tokens = getattr(settings.limiter, "try_add_tokens", None)

    def admit_now(self, key: Hashable, tokens: int) -> Ticket | None:
        """A ticket for a request that may go alone right now, or None: then ``submit``."""
        if self.window > 0 or self._try_acquire is None or key in self._queues:
            return None
        ticket: Ticket | None = self._try_acquire(tokens)
        return ticket

    def expected_wait(self) -> float:
        """Seconds a one-text call started now would wait to be sent, behind the queue."""
        max_items = self.s.max_items
        ahead = sum(-(-q.items // max_items) - 1 for q in self._queues.values() if q.items)
        return expected_wait(self.s.limiter, max(0, ahead))

    async def submit(
        self,
        shape: RequestShape,
        texts: list[str],
        tokens: int,
        deadline: float | None,
        abort: Abort,
    ) -> DecodedBatch:
        """Queue ``texts`` for the next request of ``shape`` and wait for their rows."""
        s = self.s
        if self._closed:
            raise RuntimeError("this togembed client is closed")
        q = self._queues.get(shape.key)
        if q is None:
            q = self._queues[shape.key] = _Queue(shape)
        if deadline is not None:
            self._check_deadline(q, len(texts), deadline)
        loop = asyncio.get_running_loop()
        part = _Part(texts, tokens, deadline, abort, loop.create_future(), loop.time())
        q.parts.append(part)
        q.items += len(texts)
        s.stats.waiting += 1
        if q.pump is None:
            q.pump = loop.create_task(self._pump(q))
        elif q.full is not None and q.items >= s.max_items and not q.full.done():
            q.full.set_result(None)
        timer = None
        if deadline is not None:
            timer = loop.call_later(deadline - time.monotonic(), _expire, part)
        try:
            return await part.future
        finally:
            if timer is not None:
                timer.cancel()
            if not part.taken:  # given up (cancelled, expired) before it was sent
                self._unqueue(q, part)

    async def aclose(self) -> None:
        """Fail whatever waits and cancel what is in flight (the client is closing), from the
        client's own event loop or from another one."""
        self._closed = True
        tasks = [q.pump for q in self._queues.values() if q.pump is not None]
        tasks += self._tasks
        if not tasks:
            return
        owner = tasks[0].get_loop()
        if owner is asyncio.get_running_loop():
            await _cancel(tasks)
        elif owner.is_running():  # in another thread
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_cancel(tasks), owner))

    # -- the pump ---------------------------------------------------------------------------

    async def _pump(self, q: _Queue) -> None:
        s = self.s
        try:
            while (head := self._head(q)) is not None:
                if self.window > 0:
                    await self._gather(q, head)
                # Paced by tokens: the group's tokens are asked for, and calls queued meanwhile
                # join only if the limiter grants their tokens too; by requests only: they join.
                by_tokens = s.limiter.max_batch_tokens() is not None
                asked = self._group_tokens(q) if by_tokens else head.tokens
                ticket = await s.limiter.acquire(asked)
                parts = self._take(q, ticket if by_tokens else None)
                if not parts:
                    s.limiter.release(ticket, Feedback(status=None, sent=False))
                    continue
                task = asyncio.get_running_loop().create_task(self._send(q.shape, parts, ticket))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except BaseException as exc:
            # The limiter failed, or the client is closing: nobody queued may wait forever.
            error = exc if isinstance(exc, Exception) else APIConnectionError("client closed")
            while q.parts:
                part = q.parts.popleft()
                if not part.taken:
                    self._unqueue(q, part)
                self._settle(part, error)
            if not isinstance(exc, Exception):
                raise
        finally:
            q.pump = None
            if not q.parts and self._queues.get(q.shape.key) is q:
                del self._queues[q.shape.key]

    def _head(self, q: _Queue) -> _Part | None:
        """The oldest part still waiting (those given up or aborted are dropped)."""
        parts = q.parts
        while parts:
            part = parts[0]
            if part.taken or part.future.done():
                parts.popleft()
            elif part.abort.error is not None:
                self._unqueue(q, part)
                parts.popleft()
                part.future.set_exception(CallAborted())
            else:
                return part
        return None

    async def _gather(self, q: _Queue, head: _Part) -> None:
        """``window``: wait for company until the oldest call has waited that long, or a
        request's worth is queued."""
        loop = asyncio.get_running_loop()
        delay = head.enqueued + self.window - loop.time()
        if delay <= 0 or q.items >= self.s.max_items:
            return
        q.full = full = loop.create_future()
        handle = loop.call_later(delay, _wake, full)
        try:
            await full
        finally:
            handle.cancel()
            q.full = None

    def _group_tokens(self, q: _Queue) -> int:
        """Estimated tokens of the next request: the oldest queued parts that fit one."""
        max_items, budget = self.s.max_items, self.s.token_budget()
        items = tokens = 0
        for part in (p for p in q.parts if not (p.taken or p.future.done())):
            if items and (items + len(part.texts) > max_items or tokens + part.tokens > budget):
                break
            items += len(part.texts)
            tokens += part.tokens
        return tokens

    def _take(self, q: _Queue, granted: Ticket | None = None) -> list[_Part]:
        """The queued parts that go in the request a ticket was granted for: oldest first,
        as many as fit the request's items and token budget (and the ``granted`` ticket's
        tokens, or more if the limiter grants them now)."""
        s = self.s
        max_items, budget = s.max_items, s.token_budget()
        now = time.monotonic()
        soonest = s.fastest_answer or 0.0
        taken: list[_Part] = []
        items = tokens = 0
        while (part := self._head(q)) is not None:
            n = len(part.texts)
            if taken and (items + n > max_items or tokens + part.tokens > budget):
                break
            if taken and granted is not None and not self._granted(granted, tokens + part.tokens):
                break
            q.parts.popleft()
            self._unqueue(q, part)
            if part.deadline is not None and part.deadline - now <= soonest:
                part.future.set_exception(_deadline_error(None))  # cannot be answered in time
            elif n > max_items or (n > 1 and part.tokens > budget):
                part.future.set_exception(Resize())  # learned a smaller budget meanwhile
            else:
                part.sent = True
                taken.append(part)
                items += n
                tokens += part.tokens
        return taken

    def _granted(self, ticket: Ticket, tokens: int) -> bool:
        """Whether ``ticket`` covers ``tokens`` (asking the limiter for the difference)."""
        extra = tokens - ticket.tokens
        return extra <= 0 or bool(self._try_add_tokens and self._try_add_tokens(ticket, extra))

    def _unqueue(self, q: _Queue, part: _Part) -> None:
        part.taken = True
        q.items -= len(part.texts)
        self.s.stats.waiting -= 1

    def _check_deadline(self, q: _Queue, n: int, deadline: float) -> None:
        """Fail now a call the queue cannot send before its deadline."""
        s = self.s
        ahead = -(-(q.items + n) // s.max_items) - 1
        wait = expected_wait(s.limiter, ahead)
        left = deadline - time.monotonic()
        if wait + (s.fastest_answer or 0.0) > left:
            raise _deadline_error(wait)

    # -- one shared request -----------------------------------------------------------------

    async def _send(self, shape: RequestShape, parts: list[_Part], ticket: Ticket) -> None:
        s = self.s
        merged = len(parts) > 1
        texts = [t for p in parts for t in p.texts] if merged else parts[0].texts
        timeout = s.timeout
        if all(p.deadline is not None for p in parts):
            latest = max(p.deadline for p in parts if p.deadline is not None)
            timeout = min(timeout, latest - time.monotonic())
        if merged:
            s.stats.shared_requests += 1
            s.stats.merged_calls += len(parts)
        try:
            decoded = await post_batch(
                s,
                ticket,
                url=shape.url,
                headers=shape.headers,
                body=encode_request(shape.model, texts, shape.encoding_format, shape.extra),
                size=len(texts),
                timeout=timeout,
                aborts=[p.abort for p in parts],
                estimated_tokens=sum(p.tokens for p in parts) if merged else None,
            )
        except Exception as exc:
            error: Exception = exc
            if merged and isinstance(exc, APIStatusError) and rejects_input(exc):
                error = SendAlone()
            for part in parts:
                self._settle(part, error)
            return
        except BaseException:
            for part in parts:
                self._settle(part, APIConnectionError("the client was closed"))
            raise
        if not merged:
            self._settle(parts[0], decoded)
            return
        shares = decoded.split([(len(p.texts), p.tokens) for p in parts])
        for part, share in zip(parts, shares, strict=True):
            self._settle(part, share)

    @staticmethod
    def _settle(part: _Part, outcome: DecodedBatch | BaseException) -> None:
        if part.future.done():  # its caller gave up meanwhile
            pass
        elif isinstance(outcome, BaseException):
            part.future.set_exception(outcome)
        else:
            part.future.set_result(outcome)


def _deadline_error(wait: float | None) -> DeadlineExceededError:
    """The call re-raises it in its own words (with its timeout)."""
    return DeadlineExceededError("deadline", expected_wait=wait)


def _expire(part: _Part) -> None:
    """A waiting part's deadline passed: its caller fails now, and it is never sent."""
    if part.future.done():
        return
    late = APITimeoutError("the call did not finish within its timeout")
    part.future.set_exception(late if part.sent else _deadline_error(None))


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
