"""Streaming with bounded memory: texts are pulled lazily, cut into batches on the fly, sent
through the same runner as ``embed`` (retries, limiter, splits, bisection) and handed back as
chunks in input order. At most ``window`` texts are pulled and not yet yielded, so a consumer
that stops consuming stops the input and the sending."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import (
    AsyncIterable,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from typing import cast, overload

import attrs
import numpy as np

from .answers import DecodedBatch
from .batching import Batch, describe_invalid, estimate_tokens, is_sendable
from .call import _Call
from .errors import (
    APIResponseValidationError,
    APIStatusError,
    InvalidInputError,
    TogembedError,
)
from .request import Abort, CallAborted
from .settings import CallSettings

__all__ = ["EmbeddingChunk", "EmbeddingStream", "TextBlocks"]

_END = object()


@attrs.frozen(eq=False)  # an array has no single truth value: chunks compare by identity
class EmbeddingChunk:
    """Consecutive rows of a stream: ``vectors[i]`` (float32) is the vector of input
    ``start + i``. With ``errors="collect"``, rows of inputs the server rejected are NaN and
    ``errors`` maps their stream positions to the error (an ``APIError``, or an
    ``InvalidInputError`` for a text that cannot be sent, e.g. with a lone surrogate)."""

    start: int
    vectors: np.ndarray
    errors: Mapping[int, TogembedError] = attrs.field(factory=dict)

    @property
    def stop(self) -> int:
        return self.start + len(self.vectors)


class _Shifted(Sequence[str]):
    """One batch's texts at their stream positions (``self[start]`` is ``texts[0]``): the
    runner's rows, collected errors and ``input_index`` are stream positions, untranslated.
    Only the positions the runner uses are valid: ints and ``[a:b]`` slices in the batch."""

    def __init__(self, texts: list[str], start: int) -> None:
        self._texts = texts
        self._start = start

    def __len__(self) -> int:
        return self._start + len(self._texts)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return self._texts[i.start - self._start : i.stop - self._start]
        return self._texts[i - self._start]


class _Piece:
    """One batch of the stream until it is yielded: the sink of its rows (allocated by its
    first answer) and of the inputs rejected in it."""

    def __init__(self, stream: EmbeddingStream, start: int, size: int) -> None:
        self.stream = stream
        self.start = start
        self.size = size
        self.rows: np.ndarray | None = None
        self.errors: dict[int, TogembedError] = {}
        self.done = False

    def write(self, batch: Batch, decoded: DecodedBatch) -> None:
        dim = self.stream.learn_dim(decoded.dim)
        if self.rows is None:
            self.rows = np.empty((self.size, dim), dtype=np.float32)
        decoded.write_into(self.rows[batch.start - self.start : batch.stop - self.start])

    def reject(self, position: int, exc: APIStatusError) -> None:
        self.errors[position] = exc

    def chunk(self, dim: int | None) -> EmbeddingChunk:
        rows = self.rows
        if rows is None:  # every input was rejected
            rows = np.full((self.size, dim or 0), np.nan, dtype=np.float32)
        for position in self.errors:
            rows[position - self.start] = np.nan
        return EmbeddingChunk(self.start, rows, self.errors)


class TextBlocks:
    """An async iterable of lists of texts, for a source that has its texts in blocks (the
    corpus job): the stream pulls a list at a time instead of a text at a time. Keep blocks
    to about a batch: the stream holds at most ``window`` texts plus one block. ``admit(n)``,
    if given, is awaited before each batch of ``n`` texts is sent (the job's bound on paid
    inputs that are not yet recorded)."""

    def __init__(
        self,
        blocks: AsyncIterable[list[str]],
        admit: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.blocks = blocks
        self.admit = admit


def _puller(texts: object) -> Callable[[], Awaitable[object]]:
    """``await pull()`` gives a list of the next items (one, unless the source is
    ``TextBlocks``) or ``_END``, for sync and async sources alike."""
    if isinstance(texts, str):  # one text, as in ``embed``, not its characters
        texts = [texts]
    if isinstance(texts, TextBlocks):
        blocks = aiter(texts.blocks)

        async def pull_block() -> object:
            return await anext(blocks, _END)

        return pull_block
    if isinstance(texts, AsyncIterable):
        aitems = aiter(texts)

        async def pull_async() -> object:
            item = await anext(aitems, _END)
            return item if item is _END else (item,)

        return pull_async
    try:
        if isinstance(texts, (bytes, bytearray)):
            raise TypeError
        items = iter(texts)  # type: ignore[call-overload]
    except TypeError:
        kind = type(texts).__name__
        raise InvalidInputError(
            f"input must be an iterable or async iterable of str, not {kind}"
        ) from None

    async def pull() -> object:
        item = next(items, _END)
        return item if item is _END else (item,)

    return pull


class EmbeddingStream:
    """A pump task pulls texts and sends batches (at most ``concurrency`` at once, at most
    ``window`` texts pulled and not yet yielded); ``next()`` gives finished batches in order.
    Plain coroutines, not a generator: the caller's one async generator owns the cleanup, so
    no nested generator is left for the garbage collector to close twice.

    Errors: a batch failing for good fails the stream at once, cancelling the others; the
    input's own errors (a non-str, a failing iterator) come in order, after the chunks before
    them.
    """

    def __init__(
        self,
        settings: CallSettings,
        texts: Iterable[str] | AsyncIterable[str],
        model: str,
        *,
        window: int,
        collect: bool,
        before_send: Callable[[], None],
    ) -> None:
        self.s = settings
        self.texts = texts
        self.model = model
        self.window = window
        self.collect = collect
        self.before_send: Callable[[], None] | None = before_send
        self.admit = texts.admit if isinstance(texts, TextBlocks) else None
        self.pieces: deque[_Piece] = deque()  # sent, not yet yielded, in input order
        self.running: set[asyncio.Task[None]] = set()
        self.held = 0  # texts pulled and not yet yielded
        self.dim: int | None = None
        self.error: BaseException | None = None  # the first batch that failed for good
        self.abort = Abort()  # shared by all batches: once one fails, none is sent after it
        self.wakeup = asyncio.Event()  # for the consumer: a batch was sent or ended, or the pump
        self.room = asyncio.Event()  # for the pump: a chunk was yielded
        self.slots = asyncio.Semaphore(settings.concurrency)
        # the batch being cut
        self._start = 0
        self._texts: list[str] = []
        self._tokens = 0
        self.pump = asyncio.ensure_future(self._pump())
        self.pump.add_done_callback(lambda _: self.wakeup.set())

    def learn_dim(self, dim: int) -> int:
        """The first answer tells the dimension; a concurrent first answer must agree."""
        if self.dim is None:
            self.dim = dim
        elif dim != self.dim:
            raise APIResponseValidationError(
                f"embedding dimension {dim} differs from {self.dim} of earlier answers"
            )
        return dim

    async def next(self) -> EmbeddingChunk | None:
        """The next chunk in input order, or None at the end."""
        while True:
            if self.error is not None:
                raise self.error
            if self.pieces and self._ready(self.pieces[0]):
                piece = self.pieces.popleft()
                self.held -= piece.size
                self.room.set()
                return piece.chunk(self.dim)
            if not self.pieces and self.pump.done():
                self.pump.result()  # the input's own error, if any, after the chunks before it
                return None
            self.wakeup.clear()
            await self.wakeup.wait()

    async def aclose(self) -> None:
        """Cancel the pump and the batches in flight, and wait until they are gone."""
        tasks = [self.pump, *self.running]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _ready(self, piece: _Piece) -> bool:
        """Done, with a known shape. A batch whose every input was rejected before any answer
        told the dimension waits while another batch still may; when none can (the input
        ended, or the whole window was rejected), it goes out with shape (n, 0)."""
        if not piece.done:
            return False
        if piece.rows is not None or self.dim is not None:
            return True
        may_learn = bool(self.running) or (not self.pump.done() and self.held < self.window)
        return not may_learn

    async def _pump(self) -> None:
        """Pull while the window has room; send a batch when it is full (items or tokens), when
        the window is, and at the end."""
        pull = _puller(self.texts)
        while True:
            if self.held >= self.window:
                await self._flush()
                while self.held >= self.window:
                    self.room.clear()
                    await self.room.wait()
                continue
            items = await pull()
            if items is _END:
                await self._flush()
                return
            for item in cast("Sequence[object]", items):
                if not isinstance(item, str) or not is_sendable(item):
                    position = self._start + len(self._texts)
                    error = InvalidInputError(
                        f"input {position}: {describe_invalid(item)}", index=position
                    )
                    if not self.collect or not isinstance(item, str):
                        raise error
                    await self._reject_alone(error)  # a text's own fault: it fails alone
                    continue
                self.held += 1
                tokens = estimate_tokens(item)
                if self._texts and self._tokens + tokens > self.s.max_tokens:
                    await self._flush()
                self._texts.append(item)
                self._tokens += tokens
                if len(self._texts) >= self.s.max_items:
                    await self._flush()

    async def _reject_alone(self, error: InvalidInputError) -> None:
        """Collect mode: the text at ``error.index`` is never sent. The batch being cut is
        sent without it, and the text becomes a one-row piece of its own, already done."""
        await self._flush()
        position = self._start
        piece = _Piece(self, position, 1)
        piece.errors[position] = error
        piece.done = True
        self._start += 1
        self.held += 1
        self.pieces.append(piece)
        self.wakeup.set()

    async def _flush(self) -> None:
        """Send the batch being cut, if any, as soon as a sender is free."""
        if not self._texts:
            return
        if self.before_send is not None:  # once, at the first request
            self.before_send()
            self.before_send = None
        texts = self._texts
        batch = Batch(self._start, self._start + len(texts), self._tokens)
        self._start, self._texts, self._tokens = batch.stop, [], 0
        if self.admit is not None:
            await self.admit(len(texts))
        await self.slots.acquire()
        piece = _Piece(self, batch.start, batch.size)
        on_input_error = piece.reject if self.collect else None
        call = _Call(
            self.s,
            _Shifted(texts, batch.start),
            self.model,
            piece,
            prefer_float=False,
            on_input_error=on_input_error,
            abort=self.abort,
        )
        call.sender.dim = self.dim
        task = asyncio.ensure_future(self._send(call, batch, piece))
        self.running.add(task)
        task.add_done_callback(self._sent)
        self.pieces.append(piece)
        self.wakeup.set()
        await asyncio.sleep(0)  # let it start: a fast sync source would otherwise run on

    async def _send(self, call: _Call, batch: Batch, piece: _Piece) -> None:
        try:
            await call.process(batch)
            piece.done = True
        finally:
            self.slots.release()

    def _sent(self, task: asyncio.Task[None]) -> None:
        self.running.discard(task)
        if not task.cancelled() and task.exception() is not None and self.error is None:
            error = task.exception()
            # a batch that stopped because another failed: that one's error is the stream's
            self.error = self.abort.error if isinstance(error, CallAborted) else error
        self.wakeup.set()
