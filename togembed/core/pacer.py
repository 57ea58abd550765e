"""The limiter's arithmetic on an explicit clock (tested with a fake one): two token buckets
(requests and tokens per second), an adaptive cap on requests in flight, a pause after a 429,
and what it learns from rate-limit headers. No asyncio: ``RateLimiter`` wraps it for one event
loop, and a shared limiter (Ray) can hold one for many processes."""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable

import attrs

from .limit_headers import has_rate_signal, parse_limit_headers, per_second, shows_room
from .limiter import Feedback, RateLimiterStats, Ticket

__all__ = ["DEFAULT_BURST_SECONDS", "DEFAULT_MAX_PAUSE", "Bucket", "Pacer"]

# request of slack so that a request arriving a little early still finds a token, and 1% under
# the nominal rate so that timer and network jitter never add up to a 429.
DEFAULT_BURST_SECONDS = 1.0
_CONFIGURED_HEADROOM = 0.99
# Learned limits: the server's numbers are dynamic and our clock is not its clock.
_LEARNED_HEADROOM = 0.95
# After a 429: rate and in-flight cap are cut by this factor, at most once per round trip.
_DECREASE = 0.7
# Recovery: each success adds this share of the ceiling back (~35 successes to recover fully)...
_INCREASE = 0.02
# ... and, when the ceiling is known (configured, or from the headers), the gap to it halves
# every this many seconds of successes: the pace is back within a few seconds after a storm.
_RECOVERY_HALF_LIFE = 1.0
# A 429 without any rate-limit header is treated as a transient error unless this many of the
# last _WINDOW answers were 429s too (then the server is limiting us without saying so).
_BARE_429_WINDOW = 10
_BARE_429_THRESHOLD = 5
# Longest pause a 429's wait may impose on every request (RetryPolicy.max_retry_after's default).
DEFAULT_MAX_PAUSE = 120.0


@attrs.define
class Bucket:
    """A token bucket refilled at ``rate`` per second up to ``capacity``. The level may go below
    zero: a cost bigger than the capacity is let through when the bucket is full and paid back
    before anything else goes (so an oversize batch is slow, never stuck)."""

    rate: float
    capacity: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait(self, now: float, cost: float) -> float:
        """Seconds until ``cost`` may be taken (0 = now)."""
        self.refill(now)
        need = min(cost, self.capacity)
        if self.level >= need:
            return 0.0
        return (need - self.level) / self.rate

    def take(self, cost: float) -> None:
        self.level -= cost


class Pacer:
    """The limiter's arithmetic, on an explicit clock."""

    def __init__(
        self,
        *,
        rpm: float | None = None,
        tpm: float | None = None,
        burst: float = DEFAULT_BURST_SECONDS,
        adaptive: bool = True,
        max_pause: float = DEFAULT_MAX_PAUSE,
        now: float = 0.0,
    ) -> None:
        if not max_pause >= 0:
            raise ValueError(f"max_pause must be >= 0 seconds, got {max_pause!r}")
        if rpm is not None and not rpm > 0:
            raise ValueError(f"rpm must be > 0, got {rpm!r}")
        if tpm is not None and not tpm > 0:
            raise ValueError(f"tpm must be > 0, got {tpm!r}")
        if not burst > 0:
            raise ValueError(f"burst must be > 0 seconds, got {burst!r}")
        self.burst = burst
        self.adaptive = adaptive
        self.max_pause = max_pause
        self.configured = rpm is not None or tpm is not None
        self.learned = False
        # Ceilings (per second) and the share of them we currently allow ourselves.
        self.req_ceiling = rpm / 60.0 if rpm else None
        self.tok_ceiling = tpm / 60.0 if tpm else None
        self.factor = 1.0
        self.recovered_at = now  # when the factor was last cut or recovered
        # The ceiling is the pace we were going at when a 429 came (not a known limit).
        self.guessed = False
        self.requests = self._bucket(self.req_ceiling, now, slack=1.0) if rpm else None
        self.tokens = self._bucket(self.tok_ceiling, now, slack=0.0) if tpm else None
        # Until the first answer, an unconfigured limiter sends one request at a time: a job
        # must not open with a burst of 16 into an unknown limit.
        self.probing = adaptive and not self.configured
        self.in_flight = 0
        self.cap: float | None = None
        self.paused_until = 0.0
        self.seq = 0
        self.last_cut_seq = -1
        self.rate_limited = 0
        self.slowdowns = 0
        self.recent_429 = collections.deque[bool](maxlen=_BARE_429_WINDOW)
        self.sent_times = collections.deque[float](maxlen=64)
        self.most_held = [0.0, 0.0]  # requests, tokens: the fullest the server's bucket was seen

    # -- admission ---------------------------------------------------------------------------

    def _headroom(self) -> float:
        return _LEARNED_HEADROOM if self.learned else _CONFIGURED_HEADROOM

    def _bucket(self, ceiling: float | None, now: float, slack: float) -> Bucket | None:
        if ceiling is None:
            return None
        rate = ceiling * self._headroom() * self.factor
        capacity = max(1.0, ceiling * self.burst - slack) if slack else ceiling * self.burst
        return Bucket(rate=rate, capacity=capacity, level=capacity, updated=now)

    def max_cost(self) -> int | None:
        """The most tokens one request should carry: batches are cut to fit the bucket."""
        return int(self.tokens.capacity) if self.tokens is not None else None

    def wait(self, now: float, tokens: int) -> float:
        """Seconds until a request of ``tokens`` may go; ``math.inf``: until a release."""
        if self.probing and self.in_flight >= 1:
            return math.inf
        if self.cap is not None and self.in_flight >= int(self.cap):
            return math.inf
        wait = max(0.0, self.paused_until - now)
        if self.requests is not None:
            wait = max(wait, self.requests.wait(now, 1))
        if self.tokens is not None:
            wait = max(wait, self.tokens.wait(now, tokens))
        return wait

    def expected_wait(self, now: float, requests: int) -> float:
        """Seconds until ``requests`` more requests could have gone at the current pace."""
        wait = max(0.0, self.paused_until - now)
        bucket = self.requests
        if bucket is not None:
            bucket.refill(now)
            if bucket.level < requests:
                wait = max(wait, (requests - bucket.level) / bucket.rate)
        return wait

    def take(self, now: float, tokens: int) -> Ticket:
        if self.requests is not None:
            self.requests.take(1)
        if self.tokens is not None:
            self.tokens.take(tokens)
        self.in_flight += 1
        self.seq += 1
        self.sent_times.append(now)
        return Ticket(seq=self.seq, tokens=tokens, sent_at=now)

    # -- feedback ----------------------------------------------------------------------------

    def release(self, now: float, ticket: Ticket, fb: Feedback) -> str | None:
        """Account for an answer; returns a message when the pace changed (for the log)."""
        self.in_flight -= 1
        if not fb.sent or fb.status == 429:  # never sent, or refused uncounted: refund
            self._refund(ticket)
        if not fb.sent:
            return None
        self.probing = False
        if fb.status is None:  # no answer: nothing learned
            return None
        later_in_flight = max(0, self.seq - ticket.seq) if self.in_flight else 0
        later_in_flight = min(later_in_flight, self.in_flight)
        if self.tokens is not None and fb.tokens is not None and fb.status < 300:
            self.tokens.take(fb.tokens - ticket.tokens)  # charge what the server counted
        message = self._learn(now, fb, later_in_flight, ticket)
        is_429 = fb.status == 429
        self.recent_429.append(is_429)
        if is_429:
            self.rate_limited += 1
            if self._over_the_limit(fb, ticket):
                message = self._slow_down(now, ticket, fb) or message
        elif fb.status < 300:
            self._speed_up(now)
        return message

    def _refund(self, ticket: Ticket) -> None:
        if self.requests is not None:
            self.requests.take(-1)
        if self.tokens is not None:
            self.tokens.take(-ticket.tokens)

    def _learn(self, now: float, fb: Feedback, later_in_flight: int, ticket: Ticket) -> str | None:
        if not self.adaptive:
            return None
        info = parse_limit_headers(fb.headers)
        if not info.any:
            return None
        message = None
        # The unit is judged by the most the bucket was seen to hold: what remained after
        # this request plus what this request cost. That can only grow, so the guess can only
        # move from "per minute" to "per second", never the other way as our own traffic
        # drains the bucket.
        tokens = fb.tokens if fb.tokens is not None else ticket.tokens
        for i, (left, cost) in enumerate(
            ((info.requests_remaining, 1), (info.tokens_remaining, tokens))
        ):
            if left is not None:
                self.most_held[i] = max(self.most_held[i], left + cost)
        if not self.configured:
            req_rate = per_second(info.requests_limit, self.most_held[0], info.requests_per_minute)
            tok_rate = per_second(info.tokens_limit, self.most_held[1], info.tokens_per_minute)
            changed = (req_rate, tok_rate) != (self.req_ceiling, self.tok_ceiling)
            if changed and req_rate is not None:
                self.req_ceiling = req_rate
            if changed and tok_rate is not None:
                self.tok_ceiling = tok_rate
            if not self.learned or changed:
                self.learned = True
                self.guessed = False
                self._rebuild(now)
                message = f"server limit: {self._describe()}"
        # The server's "remaining" is the truth about the bucket (other processes share it),
        # less what we sent after this request that it may not have counted yet.
        if self.requests is not None and info.requests_remaining is not None:
            self.requests.refill(now)
            self.requests.level = min(
                self.requests.level, info.requests_remaining - later_in_flight
            )
        if self.tokens is not None and info.tokens_remaining is not None:
            self.tokens.refill(now)
            self.tokens.level = min(self.tokens.level, info.tokens_remaining)
        # A server reports an overdrawn bucket as 0: what this request cost, less what has
        # refilled since it was sent, is a bound it cannot hide.
        for bucket, cost in ((self.requests, 1), (self.tokens, tokens)):
            if bucket is not None:
                bound = bucket.capacity - cost + (now - ticket.sent_at) * bucket.rate
                bucket.level = min(bucket.level, bound)
        return message

    def _rebuild(self, now: float) -> None:
        """New buckets for new ceilings, keeping how full the old ones were."""
        old_req, old_tok = self.requests, self.tokens
        self.requests = self._bucket(self.req_ceiling, now, slack=1.0 if self.configured else 0)
        self.tokens = self._bucket(self.tok_ceiling, now, slack=0.0)
        for old, new in ((old_req, self.requests), (old_tok, self.tokens)):
            if old is not None and new is not None:
                old.refill(now)
                new.level = min(new.capacity, old.level)

    def _over_the_limit(self, fb: Feedback, ticket: Ticket) -> bool:
        """Whether a 429 says we are going too fast. Not when it carries no rate signal (a
        transient refusal), nor when its headers still show room in the bucket (Together's
        dynamic limits refuse sporadically below the limit: the batch retries after its wait,
        the pace stays) — unless such 429s dominate the recent answers."""
        if sum(self.recent_429) >= _BARE_429_THRESHOLD:
            return True
        if not (has_rate_signal(fb.headers) or (fb.retry_after or 0) > 0):
            return False
        cap = self.tokens.capacity if self.tokens is not None else float(ticket.tokens)
        return not shows_room(fb.headers, min(ticket.tokens, cap))

    def _slow_down(self, now: float, ticket: Ticket, fb: Feedback) -> str | None:
        retry_after = fb.retry_after
        if retry_after is not None and retry_after > 0:
            self.paused_until = max(self.paused_until, now + min(retry_after, self.max_pause))
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.refill(now)
                bucket.level = min(bucket.level, 0.0)
        if not self.adaptive or ticket.seq <= self.last_cut_seq:
            return None  # sent before the last cut: its 429 is old news
        self.last_cut_seq = self.seq
        self.slowdowns += 1
        if self.req_ceiling is None and self.tok_ceiling is None:
            # No limit known: take the pace we were going at when the server objected, if we
            # have seen enough of it; otherwise the pause and the in-flight cap must do.
            self.req_ceiling = _recent_rate(self.sent_times, now)
            self.learned = self.guessed = self.req_ceiling is not None
        self.factor = max(0.05, self.factor * _DECREASE)
        self.recovered_at = now
        self.cap = max(1.0, (self.cap or float(self.in_flight + 1)) * _DECREASE)
        self._rebuild(now)
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.level = min(bucket.level, 0.0)
        return f"429: slowing down to {self._describe()}, at most {int(self.cap)} in flight"

    def _speed_up(self, now: float) -> None:
        known = not self.guessed and (self.req_ceiling is not None or self.tok_ceiling is not None)
        if self.cap is not None:
            # one more in flight per success toward a known limit, per round of them otherwise
            self.cap += 1.0 if known else 1.0 / self.cap
            if self.cap >= 256 or (known and self.factor >= 1.0):
                self.cap = None
        if self.factor < 1.0:
            factor = self.factor + _INCREASE
            if known:  # the gap to a known limit halves every half-life of successes
                gap = (1.0 - self.factor) * 0.5 ** ((now - self.recovered_at) / _RECOVERY_HALF_LIFE)
                factor = max(factor, 1.0 - gap)
            self.factor = min(1.0, factor)
            self.recovered_at = now
            if self.factor > 0.999:
                self.factor = 1.0
            headroom = self._headroom() * self.factor
            if self.requests is not None and self.req_ceiling is not None:
                self.requests.rate = self.req_ceiling * headroom
            if self.tokens is not None and self.tok_ceiling is not None:
                self.tokens.rate = self.tok_ceiling * headroom

    def _describe(self) -> str:
        parts = []
        if self.requests is not None:
            parts.append(f"{self.requests.rate * 60:.0f} requests/min")
        if self.tokens is not None:
            parts.append(f"{self.tokens.rate * 60:.0f} tokens/min")
        return ", ".join(parts) or "no limit"

    def snapshot(self, now: float) -> RateLimiterStats:
        return RateLimiterStats(
            rpm=self.requests.rate * 60 if self.requests is not None else None,
            tpm=self.tokens.rate * 60 if self.tokens is not None else None,
            learned=self.learned,
            in_flight=self.in_flight,
            max_in_flight=1 if self.probing else (int(self.cap) if self.cap else None),
            rate_limited=self.rate_limited,
            slowdowns=self.slowdowns,
            paused_for=max(0.0, self.paused_until - now),
        )


def _recent_rate(sent_times: Iterable[float], now: float) -> float | None:
    """Requests/s sent over the last 5 s, if there were enough to tell."""
    times = [t for t in sent_times if t >= now - 5.0]
    if len(times) >= 8 and times[-1] - times[0] >= 0.2:
        return (len(times) - 1) / (times[-1] - times[0])
    return None
