"""The shared limiter's books, without Ray: one ``RateLimiter`` (so one ``Pacer``) paces every
holder (a process that sends requests), and every ticket it grants is booked to its holder.
A holder that falls silent for ``ttl`` seconds is taken for dead and its tickets are released
as "no answer", so a killed worker never holds the limit's in-flight count forever; a report
on a ticket no longer booked (its holder was given up) is ignored.

May import core (limiter values, ``RateLimiter``); never ray: the actor in ``limiter_actor``
wraps this class, and tests drive it on an explicit clock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import attrs

from ..core.limiter import Feedback, RateLimiterStats, Ticket
from ..core.ratelimit import RateLimiter

__all__ = ["DEFAULT_TTL", "NAMESPACE", "Answer", "Grant", "GrantBook", "limit_headers_of"]

# Ray namespace of the limiter actors.
NAMESPACE = "togembed"
# A holder silent this long is taken for dead; live holders say they are alive three times
# as often, so only a dead (or frozen) process ever loses its tickets.
DEFAULT_TTL = 30.0

# Headers the pacer reads: only these travel from a worker to the shared limiter.
_HEADER_PREFIXES = ("x-ratelimit", "x-tokenlimit", "retry-after")


def limit_headers_of(headers: Mapping[str, str]) -> dict[str, str]:
    """The rate-limit headers of an answer, as a small plain dict (lower-case names)."""
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith(_HEADER_PREFIXES)}


@attrs.frozen
class Answer:
    """What a holder reports for one ticket (a picklable ``Feedback``)."""

    seq: int
    status: int | None
    headers: dict[str, str] = attrs.field(factory=dict)
    tokens: int | None = None
    retry_after: float | None = None
    sent: bool = True

    @classmethod
    def of(cls, ticket: Ticket, fb: Feedback) -> Answer:
        return cls(
            seq=ticket.seq,
            status=fb.status,
            headers=limit_headers_of(fb.headers),
            tokens=fb.tokens,
            retry_after=fb.retry_after,
            sent=fb.sent,
        )

    def feedback(self) -> Feedback:
        return Feedback(
            status=self.status,
            headers=self.headers,
            tokens=self.tokens,
            retry_after=self.retry_after,
            sent=self.sent,
        )


@attrs.frozen
class Grant:
    """Tickets for a holder, and what it needs to pace itself until its next call."""

    tickets: list[Ticket]
    unbounded: bool  # no limit known or configured: a holder may take more permits ahead
    max_batch_tokens: int | None
    seconds_per_request: float  # at the current pace (0: unbounded)
    expected_wait: float  # for a request queued behind those waiting now


class GrantBook:
    """Tickets granted by one limiter, booked per holder."""

    def __init__(self, limiter: RateLimiter, ttl: float, clock: Callable[[], float]) -> None:
        self.limiter = limiter
        self.ttl = ttl
        self._clock = clock
        self._held: dict[str, dict[int, Ticket]] = {}
        self._seen: dict[str, float] = {}
        self.expired = 0  # tickets released because their holder fell silent

    def seen(self, holder: str) -> None:
        self._seen[holder] = self._clock()

    async def grant(self, holder: str, costs: Sequence[int]) -> Grant:
        """Wait (in turn with every other holder) for the first request of ``costs``, then
        add as many of the rest as the pace allows at once."""
        if not costs:
            raise ValueError("costs is empty")
        self.seen(holder)
        tickets = [await self.limiter.acquire(costs[0])]
        for cost in costs[1:]:
            ticket = self.limiter.try_acquire(cost)
            if ticket is None:
                break
            tickets.append(ticket)
        self.seen(holder)  # it waited: still alive
        book = self._held.setdefault(holder, {})
        for ticket in tickets:
            book[ticket.seq] = ticket
        return self.describe(tickets)

    def describe(self, tickets: list[Ticket]) -> Grant:
        stats = self.limiter.stats
        unbounded = stats.rpm is None and stats.tpm is None and stats.max_in_flight is None
        return Grant(
            tickets=tickets,
            unbounded=unbounded and stats.paused_for <= 0,
            max_batch_tokens=self.limiter.max_batch_tokens(),
            seconds_per_request=60.0 / stats.rpm if stats.rpm else 0.0,
            expected_wait=self.limiter.expected_wait(),
        )

    def report(self, holder: str, answers: Sequence[Answer]) -> int:
        """Release the tickets answered; returns how many were still booked."""
        self.seen(holder)
        book = self._held.get(holder, {})
        done = 0
        for answer in answers:
            ticket = book.pop(answer.seq, None)
            if ticket is None:
                continue  # given up with its holder: already released
            self.limiter.release(ticket, answer.feedback())
            done += 1
        if not book:
            self._held.pop(holder, None)
        return done

    def expire(self, older_than: float | None = None) -> int:
        """Release the tickets of holders silent for ``older_than`` seconds (default ``ttl``):
        no answer is known for them. Returns how many were released."""
        limit = self.ttl if older_than is None else older_than
        now = self._clock()
        released = 0
        for holder, last in list(self._seen.items()):
            if now - last < limit:
                continue
            del self._seen[holder]
            for ticket in self._held.pop(holder, {}).values():
                self.limiter.release(ticket, Feedback(status=None))
                released += 1
        self.expired += released
        return released

    def holders(self) -> int:
        return len(self._seen)

    def in_flight(self) -> int:
        return sum(len(b) for b in self._held.values())

    @property
    def stats(self) -> RateLimiterStats:
        return self.limiter.stats
