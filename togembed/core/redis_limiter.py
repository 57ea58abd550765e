"""``RedisLimiter``: one rate limit shared by every process that reaches the same Redis (Ray or
Spark workers, Dask tasks, the replicas of one service). The bucket lives and is timed in
Redis (``core.gcra``'s scripts); this module only runs them and reads the server's answers.

May import core's limiter values and the header parser; imports redis (an optional extra,
``togembed[redis]``) only when a ``RedisLimiter`` is made, so ``import togembed`` never needs it.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import logging
from typing import Any

from .gcra import ACQUIRE, RELEASE, STATE_TTL_MS
from .limit_headers import has_rate_signal, parse_limit_headers, per_second
from .limiter import Feedback, Ticket
from .pacer import DEFAULT_BURST_SECONDS
from .retry import backoff_enabled

__all__ = ["RedisLimiter"]

logger = logging.getLogger("togembed")

# An unconfigured limit sends one probe until an answer tells the limit; a probe whose answer
# never comes (its process died) frees the way after this long.
_PROBE_TTL = 30.0
# Waiters look again at least this often: other processes' answers change the picture.
_MAX_POLL = 0.25
_PROBE_POLL = 0.02
# Bare 429s (no rate signal) count as "too fast" when this many of the last 10 answers were 429s.
_BARE_429_THRESHOLD = 5


class RedisLimiter:
    """Paces requests and tokens per minute for every process sharing ``url``'s Redis under
    ``name`` (default: one limit per API key, the key itself never stored).

    With ``rpm``/``tpm`` it holds that pace (1 % under it) from the first request; without
    them the first answer's rate-limit headers set it for every process (one probe request
    goes first). A 429 that says "too fast" pauses everyone for its ``Retry-After`` and cuts
    the shared pace; successes bring it back. ``redis``: an existing ``redis.asyncio.Redis``
    client instead of ``url`` (then the caller closes it).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        rpm: float | None = None,
        tpm: float | None = None,
        name: str | None = None,
        api_key: str | None = None,
        burst: float = DEFAULT_BURST_SECONDS,
        redis: Any = None,
    ) -> None:
        if (url is None) == (redis is None):
            raise ValueError("pass a Redis url (redis://host:port/db) or redis=, exactly one")
        for label, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and not value > 0:
                raise ValueError(f"{label} must be > 0, got {value!r}")
        if not burst > 0:
            raise ValueError(f"burst must be > 0 seconds, got {burst!r}")
        if redis is None:
            redis = _connect(url)  # type: ignore[arg-type]
            self._owns_redis = True
        else:
            self._owns_redis = False
        self._redis = redis
        self.key = f"togembed:limit:{name or _default_name(api_key)}"
        self.rpm, self.tpm, self.burst = rpm, tpm, burst
        self.configured = rpm is not None or tpm is not None
        self._acquire = redis.register_script(ACQUIRE)
        self._release = redis.register_script(RELEASE)
        self._lock = asyncio.Lock()
        self._ready = False
        self._waiting = 0
        self._seq = itertools.count(1)
        self._probes: set[int] = set()
        self._recent_429 = collections.deque[bool](maxlen=10)
        self._most_held = [0.0, 0.0]
        self._rps = rpm / 60.0 if rpm else None
        self._tps = tpm / 60.0 if tpm else None
        self._last_wait = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<togembed.RedisLimiter key={self.key!r} rpm={self.rpm} tpm={self.tpm}>"

    # -- the Limiter protocol ---------------------------------------------------------------

    def max_batch_tokens(self) -> int | None:
        return int(self._tps * self.burst) if self._tps else None

    async def acquire(self, tokens: int) -> Ticket:
        # Local waiters queue in arrival order; only the head asks Redis.
        self._waiting += 1
        try:
            async with self._lock:
                while True:
                    answer = await self._poll(tokens)
                    if isinstance(answer, Ticket):
                        return answer
                    seconds, probing = answer
                    await asyncio.sleep(min(seconds, _PROBE_POLL if probing else _MAX_POLL))
        finally:
            self._waiting -= 1

    async def poll(self, tokens: int) -> Ticket | None:
        """A ticket if the shared limit admits a request now, else None (one round trip)."""
        answer = await self._poll(tokens)
        return answer if isinstance(answer, Ticket) else None

    def expected_wait(self, ahead: int = 0) -> float:
        """Seconds until a request behind the local queue and ``ahead`` more would go: an
        estimate at the last known pace (other processes' requests are not counted)."""
        queued = self._waiting + ahead
        per = 1.0 / self._rps if self._rps else 0.0
        return self._last_wait + queued * per

    def release(self, ticket: Ticket, feedback: Feedback) -> None:
        """Report the answer; the update runs in the background (Redis is a round trip away)."""
        args = self._release_args(ticket, feedback)
        task = asyncio.get_running_loop().create_task(self._send_release(args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """Wait until every answer reported so far has reached Redis."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        """Wait for the updates still travelling, then close the connection if it is ours."""
        await self.flush()
        if self._owns_redis:
            await self._redis.aclose()

    async def reset(self) -> None:
        """Forget everything this limit learned or counted (for tests and new accounts)."""
        await self._redis.delete(self.key)
        self._ready = False

    async def state(self) -> dict[str, str]:
        """The limit's shared state in Redis, for logs and tests."""
        raw = await self._redis.hgetall(self.key)
        return {_text(k): _text(v) for k, v in raw.items()}

    # -- internals --------------------------------------------------------------------------

    async def _configure(self) -> None:
        if self._ready:
            return
        if self.configured:
            fields: dict[str, str] = {"burst": repr(self.burst), "headroom": "0.99", "slack": "1"}
            if self._rps:
                fields["rps"] = repr(self._rps)
            if self._tps:
                fields["tps"] = repr(self._tps)
            await self._redis.hset(self.key, mapping=fields)
            await self._redis.pexpire(self.key, STATE_TTL_MS)
        self._ready = True

    async def _poll(self, tokens: int) -> Ticket | tuple[float, bool]:
        """One attempt: a ticket, or (seconds to wait, whether a probe is what we wait for)."""
        await self._configure()
        status, value, probe = await self._acquire(keys=[self.key], args=[tokens, _PROBE_TTL])
        seconds = float(value)
        probing = _text(probe) == "1"
        if _text(status) != "ok":
            self._last_wait = seconds
            return seconds, probing
        self._last_wait = 0.0
        seq = next(self._seq)
        if probing:
            self._probes.add(seq)
        return Ticket(seq=seq, tokens=tokens, sent_at=seconds)

    def _release_args(self, ticket: Ticket, fb: Feedback) -> list[Any]:
        probe = ticket.seq in self._probes
        self._probes.discard(ticket.seq)
        charged = ticket.tokens
        correction = 0
        if fb.sent and fb.tokens is not None and fb.status is not None and fb.status < 300:
            correction = fb.tokens - charged
        learned_rps = learned_tps = ""
        req_left = tok_left = ""
        over = False
        info = parse_limit_headers(fb.headers) if fb.sent else None
        if info is not None and info.any:
            cost = fb.tokens if fb.tokens is not None else ticket.tokens
            for i, (left, c) in enumerate(
                ((info.requests_remaining, 1), (info.tokens_remaining, cost))
            ):
                if left is not None:
                    self._most_held[i] = max(self._most_held[i], left + c)
            if info.requests_remaining is not None:
                req_left = repr(info.requests_remaining)
            if info.tokens_remaining is not None:
                tok_left = repr(info.tokens_remaining)
            if not self.configured:
                rps = per_second(info.requests_limit, self._most_held[0], info.requests_per_minute)
                tps = per_second(info.tokens_limit, self._most_held[1], info.tokens_per_minute)
                if rps is not None:
                    self._rps, learned_rps = rps, repr(rps)
                if tps is not None:
                    self._tps, learned_tps = tps, repr(tps)
        if fb.sent and fb.status is not None:
            self._recent_429.append(fb.status == 429)
        if fb.sent and fb.status == 429:
            over = self._over_the_limit(fb, ticket)
        retry_after = fb.retry_after if backoff_enabled() else None
        return [
            int(fb.sent),
            int(probe),
            charged,
            correction,
            learned_rps,
            learned_tps,
            req_left,
            tok_left,
            int(over),
            "" if not retry_after else repr(float(retry_after)),
            int(fb.sent and fb.status is not None and fb.status < 300),
            repr(ticket.sent_at),
            int(fb.status is not None),
        ]

    def _over_the_limit(self, fb: Feedback, ticket: Ticket) -> bool:
        """As the in-process pacer judges a 429: too fast when it carries a rate signal and
        its headers show no room, or when 429s dominate the recent answers."""
        if sum(self._recent_429) >= _BARE_429_THRESHOLD:
            return True
        if not (has_rate_signal(fb.headers) or (fb.retry_after or 0) > 0):
            return False
        info = parse_limit_headers(fb.headers)
        req, tok = info.requests_remaining, info.tokens_remaining
        if req is None and tok is None:
            return True
        return not ((req is None or req >= 1) and (tok is None or tok >= ticket.tokens))

    async def _send_release(self, args: list[Any]) -> None:
        try:
            await self._release(keys=[self.key], args=args)
        except Exception as exc:  # the pace is shared state: losing one update is not fatal
            logger.warning("rate limit: could not report an answer to Redis: %s", exc)


def _connect(url: str) -> Any:
    try:
        import redis.asyncio as aioredis
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("RedisLimiter needs redis-py: pip install 'togembed[redis]'") from None
    return aioredis.from_url(url)


def _default_name(api_key: str | None) -> str:
    """One limit per key: a hash of it (the key itself never leaves the process)."""
    if api_key is None:
        from .config import resolve_api_key

        api_key = resolve_api_key(None)
    digest = hashlib.sha256((api_key or "").encode()).hexdigest()[:16]
    return f"key-{digest}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
