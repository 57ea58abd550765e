"""``togembed serve``: a local server that speaks Together's ``/v1/embeddings``.

Why it exists: offline work, tests and CI without a key or a bill, and one code path for
local and hosted models — every Together/OpenAI client (togembed, openai-python, together)
talks to it unchanged.  It answers with Together's JSON shapes, statuses and error bodies, and
runs a local model (``togembed._local_model.LocalModel``, or any object with the same
interface) behind a dynamic batcher:

* concurrent requests are merged into model calls of up to ``max_batch`` texts, after waiting
  at most ``max_wait`` seconds for company;
* the model runs in ONE worker thread, never on the event loop, one call at a time;
* every queued request gets an equal share of each model call (leftover room goes first come,
  first served), so a 2048-input request cannot starve a one-input one;
* a request whose client went away drops the texts not yet sent to the model;
* responses are rendered a slice at a time, so a big float answer never stalls the loop;
* connections have the limits production servers have (``_listen.ConnectionGuard``): a
  deadline for the request head and one for the body, an idle keep-alive timeout, a cap.

See docs/serve.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import itertools
import logging
import shlex
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TextIO

import attrs
import numpy as np
import orjson
from aiohttp import web

from ..core.config import DEFAULT_HOST, DEFAULT_PORT, is_loopback_url
from .listen import ConnectionGuard, ListenError, listen, track_requests

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_HOST",
    "DEFAULT_KEEPALIVE_TIMEOUT",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_INPUTS_PER_REQUEST",
    "DEFAULT_MAX_WAIT",
    "DEFAULT_PORT",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "EmbeddingModel",
    "EmbeddingServer",
    "ListenError",
    "ServeStats",
    "local_server",
    "ready_line",
    "serve",
    "stopped_line",
]

logger = logging.getLogger("togembed")

# Texts per model call: sentence-transformers' default batch size, a good CPU trade-off between
# per-call overhead and padding waste.
DEFAULT_MAX_BATCH = 32
# How long a lone request waits for others to share its model call: small next to a CPU
# forward pass (tens of ms), enough for concurrent requests to land in one call.
DEFAULT_MAX_WAIT = 0.005
# OpenAI's documented limit; Together publishes none.
DEFAULT_MAX_INPUTS_PER_REQUEST = 2048
# 2048 inputs of ~8k tokens of text.
DEFAULT_MAX_BODY_SIZE = 64 * 1024 * 1024
# Seconds close() waits for requests in flight before cutting them off.
DEFAULT_SHUTDOWN_TIMEOUT = 10.0

# Connection limits (aiohttp's server has only an idle timeout of about an hour; docs/serve.md
# has the comparison). A client writes an embeddings request's few hundred bytes of headers at
# once, so the deadlines only ever cut off a stalled or malicious client (slowloris).
#
# Request line and headers: Apache's default (mod_reqtimeout header=20; nginx and Node allow
# 60 s). Also the time a new connection may stay silent.
DEFAULT_HEADER_TIMEOUT = 20.0
# The whole body, from the end of the headers: nginx's client_body_timeout and Node's 60-300 s
# order. A 64 MiB body (max_body_size) then needs ~1.1 MB/s; typical requests are < 5 MB.
DEFAULT_BODY_TIMEOUT = 60.0
# Idle between requests: nginx's keepalive_timeout. Longer than the idle timeouts of the
# clients that talk to us (aiohttp's connector 15 s, httpx/openai-python 5 s), so the client
# closes an idle connection first and never sends a request on one the server is closing
# (the race gunicorn's and AWS's docs warn about with a short server timeout).
DEFAULT_KEEPALIVE_TIMEOUT = 75.0
# Open connections at most (one file descriptor each): nginx's worker_connections default,
# well under the usual 1024 open-files limit and far above what one model worker can use.
# At the cap the idlest keep-alive connection is closed first; only if all are busy is a
# new one answered 503.
DEFAULT_MAX_CONNECTIONS = 512

# Values rendered per event-loop turn, ~2-3 ms each: orjson writes ~13 M float32/s as JSON
# text, base64 goes ~6x faster.
_FLOAT_VALUES_PER_TURN = 32_768
_BASE64_VALUES_PER_TURN = 196_608

_F32 = np.dtype("<f4")
_ALLOWED_ARGS = frozenset({"model", "input", "encoding_format"})
_NOT_JSON = object()


class EmbeddingModel(Protocol):
    """What the server needs from a model (``togembed._local_model.LocalModel`` has it).

    ``embed`` and ``count_tokens`` are synchronous and CPU-bound; the server calls them from
    one worker thread, one call at a time. ``embed`` truncates inputs longer than
    ``max_tokens`` (as sentence-transformers does) rather than failing.
    """

    name: str
    dim: int
    max_tokens: int

    def embed(self, texts: list[str]) -> np.ndarray: ...

    def count_tokens(self, texts: list[str]) -> list[int]: ...


@attrs.define
class ServeStats:
    """Counters since start: is batching working, are clients giving up?"""

    requests: int = 0  # valid embeddings requests handed to the batcher
    inputs: int = 0  # texts in those requests
    model_calls: int = 0  # calls to model.embed (including retries of a failed batch alone)
    embedded: int = 0  # texts passed to model.embed
    largest_batch: int = 0  # most texts in one model call
    cancelled: int = 0  # requests whose client went away before the answer
    dropped: int = 0  # texts of cancelled requests never sent to the model
    model_errors: int = 0  # model calls that raised
    header_timeouts: int = 0  # connections closed: request head not received in time
    body_timeouts: int = 0  # requests answered 408: body not received in time
    refused_connections: int = 0  # connections answered 503: max_connections, all busy
    idle_closed: int = 0  # idle keep-alive connections closed to admit a new one at the cap


# ---------------------------------------------------------------------------------------------
# Errors in Together's shape


class _Unavailable(Exception):
    """The batcher is closed (server shutting down)."""


class _ModelFailed(Exception):
    """The model raised (or returned garbage) for a batch holding this request's texts."""


class _Reject(Exception):
    """A request Together would refuse; carries the ready-made error response."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _error(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


# ---------------------------------------------------------------------------------------------
# Dynamic batching


class _Job:
    """One request's texts, results and progress through the queue."""

    __slots__ = ("done", "enqueued", "future", "next", "out", "texts", "tokens")

    def __init__(self, texts: list[str], dim: int, future: asyncio.Future[None], now: float):
        self.texts = texts
        self.out = np.empty((len(texts), dim), dtype=np.float32)
        self.tokens = np.zeros(len(texts), dtype=np.int64)
        self.future = future
        self.enqueued = now
        self.next = 0  # first text not yet handed to the model
        self.done = 0  # texts whose rows are in ``out``

    @property
    def remaining(self) -> int:
        return len(self.texts) - self.next


_Slice = tuple[_Job, int, int]  # job, start, stop


class _Batcher:
    """Merges concurrent requests into model calls run in one worker thread.

    Created and used inside one event loop. ``submit`` waits for a request's rows;
    ``_run`` (a task) cuts batches from the queue and runs them one at a time.
    """

    def __init__(
        self,
        model: EmbeddingModel,
        *,
        max_batch: int,
        max_wait: float,
        stats: ServeStats,
        model_lock: threading.Lock,
    ) -> None:
        self.model = model
        self._model_lock = model_lock  # shared by every app of one server: one caller at a time
        self.dim = int(model.dim)
        self.max_tokens = int(model.max_tokens)
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.stats = stats
        self._queue: deque[_Job] = deque()
        self._queued = 0  # texts in the queue not yet handed to the model
        self._running: list[_Slice] = []  # the batch the model is working on
        self._wake = asyncio.Event()
        self.render_turn = asyncio.Lock()  # one response slice rendered per loop turn
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="togembed-model")
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="togembed-serve-batcher"
            )

    async def aclose(self) -> None:
        """Stop batching, fail whatever still waits, and wait for a model call in progress."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for job in itertools.chain((s[0] for s in self._running), self._queue):
            if not job.future.done():
                job.future.set_exception(_Unavailable())
        self._queue.clear()
        self._queued = 0
        self._running = []
        # The worker may be inside model.embed; wait for it without blocking the loop, so the
        # model is never used after close() returns.
        await asyncio.to_thread(self._executor.shutdown, True)

    async def submit(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Rows (float32, ``(len(texts), dim)``) and token counts for ``texts``, in order."""
        if self._closed:
            raise _Unavailable()
        loop = asyncio.get_running_loop()
        job = _Job(texts, self.dim, loop.create_future(), loop.time())
        if texts:
            self._queue.append(job)
            self._queued += len(texts)
            self._wake.set()
            try:
                await job.future
            except asyncio.CancelledError:
                self._drop(job)
                raise
        return job.out, job.tokens

    def _drop(self, job: _Job) -> None:
        """The client went away: forget the texts the model has not seen yet."""
        self.stats.cancelled += 1
        left = job.remaining
        if left:
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
            self._queued -= left
            self.stats.dropped += left
            job.next = len(job.texts)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._queued < self.max_batch and self.max_wait > 0:
                # Not a full batch yet: wait for company until the oldest request's window
                # closes. Requests that queued while the model was busy are past it already.
                delay = self._queue[0].enqueued + self.max_wait - loop.time()
                if delay > 0:
                    self._wake.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
                    continue
            batch = self._take()
            # Kept on cancellation: aclose() fails these requests, the model call is lost.
            self._running = batch
            try:
                await self._dispatch(batch)
            except Exception as exc:  # a bug here must not leave every request hanging
                logger.exception("togembed serve: batch failed")
                for job, _, _ in batch:
                    self._fail(job, exc)
            self._running = []

    def _take(self) -> list[_Slice]:
        """Cut the next batch: each queued request (oldest first) gets an equal share of the
        room, the leftover goes in queue order; requests not finished go to the back."""
        queue = self._queue
        room = self.max_batch
        jobs = list(itertools.islice(queue, room))  # at most max_batch requests fit
        share = max(1, room // len(jobs))
        counts: list[int] = []
        for job in jobs:
            k = min(job.remaining, share, room)
            counts.append(k)
            room -= k
            if not room:
                break
        for i, job in enumerate(jobs[: len(counts)]):
            if not room:
                break
            extra = min(job.remaining - counts[i], room)
            counts[i] += extra
            room -= extra
        batch: list[_Slice] = []
        for job, k in zip(jobs[: len(counts)], counts, strict=True):
            queue.popleft()  # the served jobs are exactly the first len(counts) of the queue
            start = job.next
            job.next += k
            batch.append((job, start, job.next))
        self._queued -= sum(counts)
        queue.extend(job for job, _, _ in batch if job.remaining)
        return batch

    async def _dispatch(self, batch: list[_Slice]) -> None:
        """Run one model call for ``batch`` and hand each request its rows."""
        texts = [t for job, start, stop in batch for t in job.texts[start:stop]]
        stats = self.stats
        stats.model_calls += 1
        stats.embedded += len(texts)
        stats.largest_batch = max(stats.largest_batch, len(texts))
        loop = asyncio.get_running_loop()
        try:
            vectors, tokens = await loop.run_in_executor(self._executor, self._call, texts)
        except Exception as exc:
            stats.model_errors += 1
            live = [s for s in batch if not s[0].future.done()]
            if len(live) > 1:
                # One request's text may be what broke the model: run each alone, so the others
                # in the batch still get their answer.
                logger.warning(
                    "model call failed (%s); retrying its %d requests alone", exc, len(live)
                )
                for piece in live:
                    await self._dispatch([piece])
                return
            logger.error("model call failed: %r", exc, exc_info=exc)
            for job, _, _ in live:
                self._fail(job, exc)
            return
        pos = 0
        for job, start, stop in batch:
            n = stop - start
            if not job.future.done():
                job.out[start:stop] = vectors[pos : pos + n]
                job.tokens[start:stop] = tokens[pos : pos + n]
                job.done += n
                if job.done == len(job.texts):
                    job.future.set_result(None)
            pos += n

    def _fail(self, job: _Job, exc: BaseException) -> None:
        if not job.future.done():
            job.future.set_exception(_ModelFailed(str(exc) or type(exc).__name__))
        # Whatever else it had queued is moot now.
        if job.remaining:
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
            self._queued -= job.remaining
            job.next = len(job.texts)

    def _call(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """In the worker thread: embed and count tokens, and check what the model returned."""
        with self._model_lock:
            vectors = np.asarray(self.model.embed(texts), dtype=np.float32)
            counts = np.asarray(self.model.count_tokens(texts), dtype=np.int64)
        if vectors.shape != (len(texts), self.dim):
            raise ValueError(
                f"model returned shape {vectors.shape} for {len(texts)} texts, "
                f"expected ({len(texts)}, {self.dim})"
            )
        if counts.shape != (len(texts),):
            raise ValueError(f"count_tokens returned {counts.size} counts for {len(texts)} texts")
        # Usage counts what the model saw: inputs past max_tokens are truncated.
        return vectors, np.minimum(counts, self.max_tokens)


# ---------------------------------------------------------------------------------------------
# Rendering


async def _render(
    model: str, vectors: np.ndarray, tokens: np.ndarray, encoding: str, turn: asyncio.Lock
) -> list[bytes]:
    """Together's response body as consecutive pieces, one slice of rows per event-loop turn;
    ``turn`` is shared by all requests, so answers finishing together take turns instead of
    rendering back to back in one (a 2048 x 1024 float answer is ~160 ms of work)."""
    n, dim = vectors.shape
    b64 = encoding == "base64"
    step = max(1, (_BASE64_VALUES_PER_TURN if b64 else _FLOAT_VALUES_PER_TURN) // dim)
    pieces: list[bytes] = []
    for start in range(0, n, step):
        if start:
            await asyncio.sleep(0)
        async with turn:
            pieces.append(_render_rows(vectors, start, step, b64))
    total = int(tokens.sum())
    pieces.append(
        b'],"model":%s,"usage":{"prompt_tokens":%d,"total_tokens":%d}}'
        % (orjson.dumps(model), total, total)
    )
    return pieces


def _render_rows(vectors: np.ndarray, start: int, step: int, b64: bool) -> bytes:
    """Items ``start..start+step`` of ``data``, comma-joined (and the body's head for 0)."""
    rows = vectors[start : start + step]
    if b64:
        items = [
            b'{"object":"embedding","index":%d,"embedding":"%s"}'
            % (start + i, base64.b64encode(row.tobytes()))
            for i, row in enumerate(rows.astype(_F32, copy=False))
        ]
    else:
        # orjson writes each float32 as its shortest round-tripping decimal.
        items = [
            b'{"object":"embedding","index":%d,"embedding":%s}'
            % (start + i, orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY))
            for i, row in enumerate(rows)
        ]
    return (b"," if start else b'{"object":"list","data":[') + b",".join(items)


# ---------------------------------------------------------------------------------------------
# Server


_BATCHER = web.AppKey("togembed_batcher", _Batcher)


@attrs.define
class _Parsed:
    model: str
    texts: list[str]
    encoding: str  # "float" | "base64"


class EmbeddingServer:
    """An aiohttp server speaking Together's ``/v1/embeddings`` and ``/v1/models``, backed by
    ``model`` (any object with :class:`EmbeddingModel`'s interface).

    ``api_key``: None (or "") accepts any bearer key or none; otherwise requests must carry
    ``Authorization: Bearer <api_key>``. ``aliases``: other model names accepted for the model
    (e.g. Together's names); ``"*"`` accepts any name. ``max_batch`` texts per model call;
    ``max_wait`` seconds a request waits for others to share its call;
    ``max_inputs_per_request`` inputs per request (413 beyond).

    Connection limits (None: no limit): ``header_timeout`` seconds for a request's line and
    headers (the connection is closed, after a 408 if part of a request arrived);
    ``body_timeout`` seconds for its body (408, connection closed); ``keepalive_timeout``
    seconds an idle connection stays open between requests; ``max_connections`` open at
    once (beyond: the idlest keep-alive connection is closed, or the new one gets a 503).
    """

    def __init__(
        self,
        model: EmbeddingModel,
        *,
        api_key: str | None = None,
        aliases: Iterable[str] = (),
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait: float = DEFAULT_MAX_WAIT,
        max_inputs_per_request: int = DEFAULT_MAX_INPUTS_PER_REQUEST,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        access_log: bool = False,
        header_timeout: float | None = DEFAULT_HEADER_TIMEOUT,
        body_timeout: float | None = DEFAULT_BODY_TIMEOUT,
        keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
        max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        for name, value in (
            ("max_batch", max_batch),
            ("max_inputs_per_request", max_inputs_per_request),
            ("max_body_size", max_body_size),
            ("max_connections", 1 if max_connections is None else max_connections),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not max_wait >= 0:
            raise ValueError(f"max_wait must be >= 0 seconds, got {max_wait!r}")
        if not shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {shutdown_timeout!r}")
        for name, value, optional in (
            ("header_timeout", header_timeout, True),
            ("body_timeout", body_timeout, True),
            ("keepalive_timeout", keepalive_timeout, False),
        ):
            if value is None and optional:
                continue  # no limit
            if value is None or not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        if int(model.dim) < 1:
            raise ValueError(f"model.dim must be >= 1, got {model.dim!r}")
        self.model = model
        self.model_name: str = model.name
        self.dim = int(model.dim)
        self.max_tokens = int(model.max_tokens)
        self.api_key = api_key or None  # "" (an unset environment variable) means no key
        aliases = [aliases] if isinstance(aliases, str) else list(aliases)
        self.accept_any_model = "*" in aliases
        self.aliases: tuple[str, ...] = tuple(
            dict.fromkeys(a for a in aliases if a not in ("*", self.model_name))
        )
        self.max_batch = max_batch
        self.max_wait = float(max_wait)
        self.max_inputs_per_request = max_inputs_per_request
        self.max_body_size = max_body_size
        self.shutdown_timeout = float(shutdown_timeout)
        self.access_log = access_log
        self.header_timeout = None if header_timeout is None else float(header_timeout)
        self.body_timeout = None if body_timeout is None else float(body_timeout)
        self.keepalive_timeout = float(keepalive_timeout)
        self.max_connections = max_connections
        self.stats = ServeStats()
        self._names = frozenset((self.model_name, *self.aliases))
        self._created = int(time.time())
        # Held around model calls: one caller at a time even if make_app() runs twice.
        self._model_lock = threading.Lock()
        self._runner: web.AppRunner | None = None
        self._guard: ConnectionGuard | None = None
        self._base_url: str | None = None
        self._exposed = False

    def __repr__(self) -> str:
        where = self._base_url or "not started"
        return f"<togembed.EmbeddingServer {where} model={self.model_name!r} dim={self.dim}>"

    # -- lifecycle ---------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """The aiohttp application. Its batcher starts and stops with the app (on_startup /
        on_cleanup), so ``web.run_app(server.make_app())`` works too."""
        app = web.Application(
            client_max_size=self.max_body_size, middlewares=[track_requests, _json_errors]
        )
        app.router.add_post("/v1/embeddings", self._handle_embeddings)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/v1/models/{name:.+}", self._handle_model)
        app.router.add_get("/health", self._handle_health)
        app.on_response_prepare.append(_add_request_id)
        app.on_startup.append(self._start_batcher)
        app.on_cleanup.append(self._stop_batcher)
        return app

    async def start(self, host: str = DEFAULT_HOST, port: int = 0) -> str:
        """Listen on ``host:port`` (0 = a free port) and return :attr:`base_url`.

        Raises :class:`ListenError` (an ``OSError``) if the address cannot be bound."""
        if self._runner is not None:
            raise RuntimeError("server already started")
        guard = ConnectionGuard(
            header_timeout=self.header_timeout,
            max_connections=self.max_connections,
            stats=self.stats,
        )
        # A handler whose client went away is cancelled: its queued texts are dropped.
        runner, self._base_url = await listen(
            self.make_app(),
            host,
            port,
            shutdown_timeout=self.shutdown_timeout,
            access_log=logging.getLogger("togembed.access") if self.access_log else None,
            keepalive_timeout=self.keepalive_timeout,
            guard=guard,
        )
        self._runner, self._guard = runner, guard
        self._exposed = not all(_is_loopback_host(a[0]) for a in runner.addresses)
        logger.info("serving %s (dim %d) at %s", self.model_name, self.dim, self._base_url)
        return self._base_url

    async def close(self) -> None:
        """Stop listening, let requests in flight finish (up to ``shutdown_timeout``), stop the
        batcher and wait for the model's current call. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> EmbeddingServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1`` (for togembed and openai-python); after :meth:`start`."""
        if self._base_url is None:
            raise RuntimeError("server not started")
        return self._base_url

    @property
    def exposed(self) -> bool:
        """True when listening on an address other machines can reach (0.0.0.0, a LAN IP)."""
        return self._exposed

    @property
    def open_connections(self) -> int:
        """Connections open now (idle keep-alive ones included)."""
        return len(self._guard.open) if self._guard is not None else 0

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT`` (for the together SDK, which adds ``/v1`` itself)."""
        return self.base_url.removesuffix("/v1")

    async def _start_batcher(self, app: web.Application) -> None:
        batcher = _Batcher(
            self.model,
            max_batch=self.max_batch,
            max_wait=self.max_wait,
            stats=self.stats,
            model_lock=self._model_lock,
        )
        batcher.start()
        app[_BATCHER] = batcher

    async def _stop_batcher(self, app: web.Application) -> None:
        batcher = app.get(_BATCHER)
        if batcher is not None:
            await batcher.aclose()

    # -- handlers ----------------------------------------------------------------------------

    def _denied(self, request: web.Request) -> web.Response | None:
        if self.api_key is None:
            return None
        given = request.headers.get("Authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            key.strip().encode(), self.api_key.encode()
        ):
            return None
        return _error(401, "Invalid API key provided", code="invalid_api_key")

    def _model_entry(self, name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": self._created,
            "owned_by": "togembed",
            "type": "embedding",
            "root": self.model_name,
            "context_length": self.max_tokens,
            "dimension": self.dim,
        }

    async def _handle_models(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        data = [self._model_entry(n) for n in (self.model_name, *self.aliases)]
        return web.json_response({"object": "list", "data": data}, dumps=_dumps)

    async def _handle_model(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        name = request.match_info["name"]
        if not self._knows(name):
            return self._unknown_model(name)
        return web.json_response(self._model_entry(name), dumps=_dumps)

    async def _handle_health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "model": self.model_name, "dim": self.dim}, dumps=_dumps
        )

    def _knows(self, name: str) -> bool:
        return self.accept_any_model or name in self._names

    def _unknown_model(self, name: str) -> web.Response:
        """Together's 404 for an unknown model, but naming what this server does serve and
        how to make it answer to ``name`` (a client written for Together sends its names)."""
        shown = name if len(name) <= 200 else name[:200] + "..."
        served = self.model_name
        if self.aliases:
            served += f" (also answering to {', '.join(self.aliases)})"
        return _error(
            404,
            f"Unable to access model {shown}: this togembed server serves {served} only. "
            f"To accept the name {shown} for {self.model_name}, start the server with "
            f"`togembed serve --alias {shlex.quote(shown)}` (or `--alias '*'` for any name; "
            "EmbeddingServer(aliases=[...]) in Python).",
            code="model_not_found",
        )

    async def _handle_embeddings(self, request: web.Request) -> web.StreamResponse:
        denied = self._denied(request)
        if denied is not None:
            return denied
        try:
            raw = await asyncio.wait_for(request.read(), self.body_timeout)
        except asyncio.TimeoutError:
            self.stats.body_timeouts += 1
            return await _answer_and_close(
                request,
                _error(
                    408,
                    f"The request body did not arrive within {self.body_timeout:g} s.",
                    code="request_timeout",
                ),
            )
        except web.HTTPRequestEntityTooLarge:
            return _error(
                413,
                f"Request too large: the body exceeds {self.max_body_size} bytes",
                param="input",
            )
        try:
            parsed = self._validate(raw)
        except _Reject as exc:
            return exc.response
        self.stats.requests += 1
        self.stats.inputs += len(parsed.texts)
        batcher = request.app[_BATCHER]
        try:
            vectors, tokens = await batcher.submit(parsed.texts)
        except _ModelFailed as exc:
            return _error(500, f"The model failed to embed the input: {exc}", "server_error")
        except _Unavailable:
            return _error(503, "The server is shutting down.", "service_unavailable")
        pieces = await _render(
            self.model_name, vectors, tokens, parsed.encoding, batcher.render_turn
        )
        if len(pieces) <= 2:
            return web.Response(body=b"".join(pieces), content_type="application/json")
        # A big answer goes out piece by piece, each write waiting for the socket to drain:
        # no tens-of-MB join or buffer copy in one loop turn, and a slow reader is not flooded.
        response = web.StreamResponse()
        response.content_type = "application/json"
        response.content_length = sum(map(len, pieces))
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
        await response.write_eof()
        return response

    def _validate(self, raw: bytes) -> _Parsed:
        """Check a request the way Together does; raise _Reject with the error response."""
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = _NOT_JSON
        if body is _NOT_JSON:
            raise _Reject(_error(400, "Request body is not valid JSON"))
        if not isinstance(body, dict):
            raise _Reject(_error(400, "Request body must be a JSON object"))
        unknown = sorted(k for k in body if k not in _ALLOWED_ARGS)
        if unknown:
            raise _Reject(
                _error(400, f"Unrecognized request arguments supplied: {', '.join(unknown)}")
            )
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _Reject(
                _error(400, "'model' is required and must be a non-empty string", param="model")
            )
        if "input" not in body:
            raise _Reject(_error(400, "'input' is required", param="input"))
        texts = body["input"]
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list):
            raise _Reject(
                _error(400, "'input' must be a string or a list of strings", param="input")
            )
        if not texts:
            raise _Reject(_error(400, "'input' must not be an empty list", param="input"))
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise _Reject(
                    _error(
                        400,
                        f"'input[{i}]' must be a string, got {type(text).__name__}",
                        param="input",
                    )
                )
        encoding = body.get("encoding_format")
        if encoding is None:
            encoding = "float"
        elif encoding not in ("float", "base64"):
            raise _Reject(
                _error(
                    400,
                    f"'encoding_format' must be 'float' or 'base64', got {encoding!r}",
                    param="encoding_format",
                )
            )
        if not self._knows(model):
            raise _Reject(self._unknown_model(model))
        if len(texts) > self.max_inputs_per_request:
            raise _Reject(
                _error(
                    413,
                    f"Too many inputs: got {len(texts)}, the maximum is "
                    f"{self.max_inputs_per_request}",
                    param="input",
                )
            )
        return _Parsed(model=model, texts=texts, encoding=encoding)


def _is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost; ``0.0.0.0`` and ``::`` (every interface) are not."""
    host = host.strip("[]")
    return host != "" and is_loopback_url(f"http://[{host}]/" if ":" in host else f"http://{host}/")


async def _answer_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send ``response`` and close the connection at once: the rest of the request is not
    coming (aiohttp would otherwise wait up to 10 s more for it, to discard it)."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if request.transport is not None:
        request.transport.close()
    return response


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("x-request-id", f"req-{uuid.uuid4().hex}")


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own answers (no route, wrong method) and unexpected failures in Together's
    JSON error shape instead of text/plain."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {
            404: f"Not found: {request.method} {request.path}",
            405: f"Method {request.method} not allowed for {request.path}",
        }.get(exc.status, exc.reason)
        response = _error(exc.status, message)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except (asyncio.CancelledError, ConnectionError):  # the client went away mid-answer
        raise
    except Exception:
        logger.exception("togembed serve: unexpected error for %s %s", request.method, request.path)
        return _error(500, "Internal server error", "server_error")


# ---------------------------------------------------------------------------------------------
# Entry points: `togembed serve` and the CLI's --local mode


async def _load_model(name: str | None) -> EmbeddingModel:
    """``load_model(name)`` off the event loop, in a daemon thread: a first-time download can
    take minutes, and Ctrl-C must not wait for it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[EmbeddingModel] = loop.create_future()

    def settle(value: Any, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)

    def work() -> None:
        model, error = None, None
        try:
            # Heavy imports (torch, tokenizers) happen here too, off the loop.
            from ..local.model import load_model

            model = load_model(name)
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            loop.call_soon_threadsafe(settle, model, error)

    threading.Thread(target=work, name="togembed-load-model", daemon=True).start()
    return await future


def ready_line(server: EmbeddingServer) -> str:
    """What ``serve`` prints once listening (scripts wait for it)."""
    return (
        f"togembed serve: listening on {server.base_url} "
        f"(model {server.model_name}, dim {server.dim})"
    )


def stopped_line(server: EmbeddingServer) -> str:
    """What ``serve`` prints once closed: how much it did."""
    n, texts = server.stats.requests, server.stats.inputs
    return (
        f"togembed serve: stopped ({n:,} request{'s' * (n != 1)}, "
        f"{texts:,} input{'s' * (texts != 1)} embedded)"
    )


async def serve(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    model_name: str | None = None,
    api_key: str | None = None,
    *,
    model: EmbeddingModel | None = None,
    aliases: Iterable[str] = (),
    max_batch: int = DEFAULT_MAX_BATCH,
    max_wait: float = DEFAULT_MAX_WAIT,
    max_inputs_per_request: int = DEFAULT_MAX_INPUTS_PER_REQUEST,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    access_log: bool = False,
    header_timeout: float | None = DEFAULT_HEADER_TIMEOUT,
    body_timeout: float | None = DEFAULT_BODY_TIMEOUT,
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT,
    max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
    stop: asyncio.Event | None = None,
    out: TextIO | None = None,
) -> None:
    """Serve ``model_name`` (``load_model``'s default when None; or the ready ``model``) until
    SIGINT/SIGTERM (or ``stop`` is set), then shut down gracefully.

    Prints :func:`ready_line` to ``out`` (stdout) once listening and :func:`stopped_line`
    once closed. Raises :class:`ListenError` if ``host:port`` cannot be bound.
    """
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)  # Windows / not the main thread: no-op
            installed.append(sig)
    try:
        if model is None:
            loading = asyncio.ensure_future(_load_model(model_name))
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait((loading, stopping), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
            if not loading.done():  # interrupted while loading: the daemon thread dies with us
                loading.cancel()
                return
            model = loading.result()
        server = EmbeddingServer(
            model,
            api_key=api_key,
            aliases=aliases,
            max_batch=max_batch,
            max_wait=max_wait,
            max_inputs_per_request=max_inputs_per_request,
            max_body_size=max_body_size,
            shutdown_timeout=shutdown_timeout,
            access_log=access_log,
            header_timeout=header_timeout,
            body_timeout=body_timeout,
            keepalive_timeout=keepalive_timeout,
            max_connections=max_connections,
        )
        out = out if out is not None else sys.stdout
        await server.start(host, port)
        try:
            if api_key is None and server.exposed:
                print(
                    f"togembed serve: warning: {server.base_url} is reachable from other "
                    "machines and no API key is set; anyone who can connect can use it",
                    file=sys.stderr,
                    flush=True,
                )
            print(ready_line(server), file=out, flush=True)
            await stop.wait()
        finally:
            await server.close()
        print(stopped_line(server), file=out, flush=True)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


@contextlib.asynccontextmanager
async def local_server(
    model_name: str | None = None,
    *,
    model: EmbeddingModel | None = None,
    **options: Any,
) -> AsyncIterator[str]:
    """``async with local_server("BAAI/bge-small-en-v1.5") as base_url:`` — the model served on
    127.0.0.1 at a free port in the current event loop; ``base_url`` ends in ``/v1``.

    ``options`` are :class:`EmbeddingServer`'s (``max_batch``, ``max_wait``, ...).
    """
    if model is None:
        model = await _load_model(model_name)
    async with EmbeddingServer(model, **options) as server:
        yield server.base_url
