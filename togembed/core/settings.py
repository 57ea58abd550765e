"""What a call needs from its client, and what the client learns from servers as calls go.

``CallSettings`` is shared by every call of one client: transport, headers, limits, the
limiter, and what servers taught us (batch size, token budget, arguments they refuse).
``CallOptions`` are one call's own arguments; ``ClientStats`` the running counters.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import orjson

from .config import EncodingFormat, RetryPolicy
from .errors import APIConnectionError
from .limiter import Limiter
from .stated_limits import (
    MAX_INPUT_CHARS,
    MAX_INPUT_TOKENS,
    MAX_INPUTS,
    MAX_REQUEST_TOKENS,
    StatedLimit,
    request_token_budget,
)
from .transport import Transport
from .turn_gate import TurnGate

if TYPE_CHECKING:
    from .coalesce import Coalescer

__all__ = ["CallOptions", "CallSettings", "ClientStats"]

logger = logging.getLogger("togembed")


@attrs.define
class ClientStats:
    """Running counters of one client, for logs and progress: why is my job (or my service)
    slow? ``waiting`` and ``expected_wait`` describe the queue at the rate limit right now."""

    calls: int = 0  # embeddings.create / embed / embed_stream calls
    requests: int = 0
    # Calls (or batches of a big call) whose texts travelled in a request shared with another
    # call's, and the requests that carried more than one call's texts.
    merged_calls: int = 0
    shared_requests: int = 0
    waiting: int = 0  # calls queued at the limiter, to be merged into the next request
    expected_wait: float = 0.0  # seconds a call started now would wait before it is sent
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
    # Merges small batches of concurrent calls into shared requests (None: every batch alone).
    coalescer: Coalescer | None = None
    # Learned: the server refused ``user`` (sent no more), or ``dimensions`` for a model
    # (model -> the server's message, resent without it and the size checked).
    send_user: bool = True
    no_dimensions: dict[str, str] = attrs.field(factory=dict)
    warned_connection: bool = False
    # The quickest answer seen (seconds): a request with less time left cannot be answered in
    # time, so it is not sent (it would spend the rate limit for nothing).
    fastest_answer: float | None = None

    def retried(self, exc: BaseException, wait: float) -> None:
        """Count a retry; say once per client that the server cannot be reached."""
        self.stats.retries += 1
        if isinstance(exc, APIConnectionError) and not self.warned_connection:
            self.warned_connection = True
            logger.warning(
                "cannot reach %s (%s); retrying, up to %d times (no more warnings; "
                "connect_retries=0 / --connect-retries 0 fails at once instead)",
                self.url,
                exc,
                self.retry.max_connect_retries if exc.connect_failed else self.retry.max_retries,
            )

    def token_budget(self) -> int:
        """Estimated tokens one request may carry: the client's budget (lowered when a server
        states a per-request limit) or the limiter's, whichever is smaller."""
        cap = self.limiter.max_batch_tokens()
        return self.max_tokens if cap is None else min(cap, self.max_tokens)

    def answered_in(self, seconds: float) -> None:
        if self.fastest_answer is None or seconds < self.fastest_answer:
            self.fastest_answer = seconds

    def learn(self, stated: StatedLimit, size: int, tokens: int) -> bool:
        """Take in a limit the server stated on refusing a batch of ``size`` inputs and
        ``tokens`` estimated tokens. True when such a batch no longer fits what was learned, so
        re-planning it fixes the refusal. A per-input limit is only recorded: one input is at
        fault, and bisecting finds it."""
        self.record(stated)
        if stated.kind == MAX_INPUTS:
            if stated.value >= size:  # the number does not explain this refusal
                return False
            if stated.value < self.max_items:
                logger.warning(
                    "server takes at most %d inputs per request (it said so); using %d",
                    stated.value,
                    stated.value,
                )
                self.max_items = stated.value
            return True
        if stated.kind == MAX_REQUEST_TOKENS:
            budget = request_token_budget(stated, tokens)
            if budget >= tokens:  # our estimate cannot explain the refusal: halve it
                budget = max(1, tokens // 2)
            if budget < self.max_tokens:
                logger.warning(
                    "server takes at most %d tokens per request (it said so); sending at most "
                    "%d estimated tokens per request",
                    stated.value,
                    budget,
                )
                self.max_tokens = budget
            return tokens > self.token_budget()
        return False

    def record(self, stated: StatedLimit) -> None:
        """Keep the limit in ClientStats, where a user looking at a slow or failed job sees it."""
        field = {
            MAX_INPUTS: "server_max_inputs",
            MAX_REQUEST_TOKENS: "server_max_request_tokens",
            MAX_INPUT_TOKENS: "server_max_input_tokens",
            MAX_INPUT_CHARS: "server_max_input_chars",
        }[stated.kind]
        setattr(self.stats, field, stated.value)

    def stop_sending(self, refused: frozenset[str], model: str, message: str) -> None:
        """Optional arguments a server refused are not sent again (``encoding_format``,
        ``user``) or, for ``dimensions``, not for this model (the answer's size is checked)."""
        if "encoding_format" in refused and self.encoding_format is not None:
            logger.warning("server rejects encoding_format; asking for float JSON from now on")
            self.encoding_format = None
        if "user" in refused and self.send_user:
            logger.warning("server rejects the 'user' argument; not sending it from now on")
            self.send_user = False
        if "dimensions" in refused:
            self.no_dimensions.setdefault(model, message)


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

    def request_key(self) -> Hashable:
        """What the request of a call with these options looks like, apart from its inputs
        and deadline: calls with equal keys may share a request. Options that cannot be
        compared get a key of their own (never shared)."""
        try:
            return orjson.dumps(
                [
                    self.dimensions,
                    self.user,
                    self.extra_headers,
                    self.extra_query,
                    self.extra_body,
                ],
                option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS,
            )
        except TypeError:
            return object()
