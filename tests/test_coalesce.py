"""Concurrent small calls share requests (docs/services.md): only calls that would wait for the
limiter are merged, each caller gets exactly its rows and its own errors, cancelling one caller
never cancels the others' request, and deadlines fail fast instead of waiting out a queue.

A ``GateLimiter`` lets the test decide when requests may go, so what is merged is decided by
the test, not by the machine's speed."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any

import numpy as np
import pytest
from helpers import MakeServer, wait_until

import togembed
from togembed.core.limiter import Feedback, Ticket
from togembed.testing import FakeTogetherServer, fake_embeddings

DIM = 16
MODEL = "test/model"


class GateLimiter:
    """A ``Limiter`` that admits requests only as the test grants them (``grant(n)``), or all
    of them once ``open()``. It has no ``try_acquire``: every call queues at it."""

    def __init__(self) -> None:
        self._permits = 0
        self._open = False
        self._changed: asyncio.Event | None = None
        self.released: list[Feedback] = []

    async def acquire(self, tokens: int) -> Ticket:
        if self._changed is None:
            self._changed = asyncio.Event()
        while not self._open and self._permits == 0:
            self._changed.clear()
            await self._changed.wait()
        if not self._open:
            self._permits -= 1
        return Ticket(seq=0, tokens=tokens, sent_at=0.0)

    def release(self, ticket: Ticket, feedback: Feedback) -> None:
        self.released.append(feedback)

    def max_batch_tokens(self) -> int | None:
        return None

    def grant(self, n: int = 1) -> None:
        self._permits += n
        if self._changed is not None:
            self._changed.set()

    def open(self) -> None:
        self._open = True
        if self._changed is not None:
            self._changed.set()


@pytest.fixture
async def server(make_server: MakeServer) -> FakeTogetherServer:
    return await make_server()


def client_for(server: FakeTogetherServer, **kwargs: Any) -> togembed.AsyncClient:
    kwargs.setdefault("model", MODEL)
    return togembed.AsyncClient(base_url=server.base_url, **kwargs)


def calls_of(n: int, prefix: str = "t") -> list[list[str]]:
    """``n`` calls of 1-3 distinct texts each."""
    return [[f"{prefix}{i}-{j}" for j in range(1 + i % 3)] for i in range(n)]


async def test_calls_waiting_for_the_limiter_share_one_request(server: FakeTogetherServer) -> None:
    gate = GateLimiter()
    calls = calls_of(10)
    async with client_for(server, limiter=gate) as client:
        tasks = [asyncio.ensure_future(client.embed(texts)) for texts in calls]
        await wait_until(lambda: client.stats.waiting == len(calls))
        gate.grant(1)
        results = await asyncio.gather(*tasks)
        stats = client.stats
    for texts, rows in zip(calls, results, strict=True):
        np.testing.assert_array_equal(rows, fake_embeddings(texts, DIM))
    assert server.stats.requests == 1
    assert server.stats.inputs == sum(map(len, calls))
    assert (stats.calls, stats.requests) == (10, 1)
    assert (stats.merged_calls, stats.shared_requests, stats.waiting) == (10, 1, 0)


async def test_a_call_that_can_go_now_goes_alone(server: FakeTogetherServer) -> None:
    """No company is awaited when the limiter has room: one request per call, none merged."""
    async with client_for(server, rpm=60_000) as client:
        for texts in calls_of(5):
            await client.embed(texts)
        assert (client.stats.requests, client.stats.merged_calls) == (5, 0)
    assert server.stats.requests == 5


async def test_a_cold_burst_goes_out_as_one_request(server: FakeTogetherServer) -> None:
    """A new client probes an unknown limit with one request: the burst that arrives together
    travels in it, instead of one probe and then the rest (two round trips)."""
    calls = calls_of(16)
    async with client_for(server) as client:
        results = await asyncio.gather(*(client.embed(texts) for texts in calls))
    for texts, rows in zip(calls, results, strict=True):
        np.testing.assert_array_equal(rows, fake_embeddings(texts, DIM))
    assert server.stats.requests == 1


async def test_requests_never_exceed_the_batch_size(server: FakeTogetherServer) -> None:
    gate = GateLimiter()
    calls = [[f"c{i}-a", f"c{i}-b"] for i in range(6)]
    async with client_for(server, limiter=gate, batch_size=4) as client:
        tasks = [asyncio.ensure_future(client.embed(texts)) for texts in calls]
        await wait_until(lambda: client.stats.waiting == len(calls))
        gate.open()
        results = await asyncio.gather(*tasks)
    for texts, rows in zip(calls, results, strict=True):
        np.testing.assert_array_equal(rows, fake_embeddings(texts, DIM))
    assert [r.n_inputs for r in server.stats.log] == [4, 4, 4]


class TokenGateLimiter(GateLimiter):
    """A ``GateLimiter`` that paces tokens too: it records the tokens each acquire asks for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[int] = []

    async def acquire(self, tokens: int) -> Ticket:
        self.asked.append(tokens)
        return await super().acquire(tokens)

    def max_batch_tokens(self) -> int | None:
        return 100_000


async def queue_while_the_first_waits(
    client: togembed.AsyncClient, gate: TokenGateLimiter, calls: list[list[str]]
) -> list[asyncio.Future[Any]]:
    """Start the first call, let its request wait for a ticket, then queue the others."""
    tasks = [asyncio.ensure_future(client.embed(calls[0]))]
    await wait_until(lambda: len(gate.asked) == 1)
    tasks += [asyncio.ensure_future(client.embed(texts)) for texts in calls[1:]]
    await wait_until(lambda: client.stats.waiting == len(calls))
    return tasks


async def test_a_token_paced_request_carries_no_more_than_its_ticket(
    server: FakeTogetherServer,
) -> None:
    """Calls that queue while a token-paced ticket is awaited wait for the next one: a shared
    request never carries more tokens than the limiter granted (it would overdraw the bucket)."""
    gate = TokenGateLimiter()
    first, later = calls_of(1, "a"), calls_of(5, "b")
    async with client_for(server, limiter=gate) as client:
        tasks = await queue_while_the_first_waits(client, gate, first + later)
        gate.grant(1)
        await wait_until(lambda: len(gate.asked) == 2)
        gate.grant(1)
        results = await asyncio.gather(*tasks)
    for texts, rows in zip(first + later, results, strict=True):
        np.testing.assert_array_equal(rows, fake_embeddings(texts, DIM))
    assert [r.n_inputs for r in server.stats.log] == [len(first[0]), sum(map(len, later))]
    assert [f.tokens for f in gate.released] == gate.asked


class GrowingTokenGateLimiter(TokenGateLimiter):
    """A ``TokenGateLimiter`` whose token budget has room for whatever joins a request."""

    def __init__(self) -> None:
        super().__init__()
        self.added: list[int] = []

    def try_add_tokens(self, ticket: Ticket, tokens: int) -> bool:
        self.added.append(tokens)
        ticket.tokens += tokens
        return True


async def test_calls_queued_meanwhile_join_when_the_limiter_grants_their_tokens(
    server: FakeTogetherServer,
) -> None:
    """With ``try_add_tokens`` a token-paced request still takes in the calls that queued
    while its ticket was awaited, and its ticket carries their tokens."""
    gate = GrowingTokenGateLimiter()
    first, later = calls_of(1, "a"), calls_of(5, "b")
    async with client_for(server, limiter=gate) as client:
        tasks = await queue_while_the_first_waits(client, gate, first + later)
        gate.grant(1)
        results = await asyncio.gather(*tasks)
    for texts, rows in zip(first + later, results, strict=True):
        np.testing.assert_array_equal(rows, fake_embeddings(texts, DIM))
    assert [r.n_inputs for r in server.stats.log] == [sum(map(len, first + later))]
    assert len(gate.asked) == 1 and len(gate.added) == len(later)
    assert [f.tokens for f in gate.released] == [gate.asked[0] + sum(gate.added)]


async def test_calls_of_other_models_or_options_do_not_share(server: FakeTogetherServer) -> None:
    gate = GateLimiter()
    async with client_for(server, limiter=gate) as client:
        tasks = [
            asyncio.ensure_future(client.embed(["a"], model="m/one")),
            asyncio.ensure_future(client.embed(["b"], model="m/two")),
            asyncio.ensure_future(client.embed(["c"], model="m/one")),
            asyncio.ensure_future(client.embed(["d"], model="m/one", extra_headers={"X-A": "1"})),
        ]
        await wait_until(lambda: client.stats.waiting == 4)
        gate.open()
        await asyncio.gather(*tasks)
    assert sorted(r.n_inputs for r in server.stats.log) == [1, 1, 2]


async def test_coalesce_false_sends_every_call_alone(server: FakeTogetherServer) -> None:
    gate = GateLimiter()
    async with client_for(server, limiter=gate, coalesce=False) as client:
        tasks = [asyncio.ensure_future(client.embed(texts)) for texts in calls_of(5)]
        await wait_until(lambda: len(gate.released) == 0 and all(not t.done() for t in tasks))
        gate.open()
        await asyncio.gather(*tasks)
        assert client.stats.merged_calls == 0
    assert server.stats.requests == 5


async def test_one_callers_bad_input_fails_that_caller_only(make_server: MakeServer) -> None:
    server = await make_server(reject_substring="BAD")
    gate = GateLimiter()
    calls = [["a", "b"], ["c", "BAD", "d"], ["e"]]
    async with client_for(server, limiter=gate) as client:
        tasks = [asyncio.ensure_future(client.embed(texts)) for texts in calls]
        await wait_until(lambda: client.stats.waiting == len(calls))
        gate.open()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    np.testing.assert_array_equal(results[0], fake_embeddings(calls[0], DIM))
    np.testing.assert_array_equal(results[2], fake_embeddings(calls[2], DIM))
    error = results[1]
    assert isinstance(error, togembed.BadRequestError)
    assert error.input_index == 1  # its own position, in its own call


async def test_a_request_level_error_reaches_every_caller(make_server: MakeServer) -> None:
    server = await make_server(models=["only/this"])
    gate = GateLimiter()
    async with client_for(server, limiter=gate, model="not/served") as client:
        tasks = [asyncio.ensure_future(client.embed(texts)) for texts in calls_of(3)]
        await wait_until(lambda: client.stats.waiting == 3)
        gate.grant(1)
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, togembed.ModelNotAvailableError) for r in results)
    assert server.stats.requests == 1  # never retried, never resent alone


async def test_cancelling_one_caller_keeps_the_shared_request(make_server: MakeServer) -> None:
    server = await make_server(latency=0.2)
    gate = GateLimiter()
    calls = calls_of(4)
    async with client_for(server, limiter=gate) as client:
        tasks = [asyncio.ensure_future(client.embed(texts)) for texts in calls]
        await wait_until(lambda: client.stats.waiting == len(calls))
        gate.grant(1)
        await wait_until(lambda: server.in_flight == 1)
        tasks[0].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    for texts, rows in zip(calls[1:], results[1:], strict=True):
        np.testing.assert_array_equal(rows, fake_embeddings(texts, DIM))
    assert server.stats.requests == 1
    assert server.disconnects == 0


async def test_a_cancelled_waiting_caller_is_not_sent(server: FakeTogetherServer) -> None:
    gate = GateLimiter()
    async with client_for(server, limiter=gate) as client:
        gone = asyncio.ensure_future(client.embed(["gone"]))
        kept = asyncio.ensure_future(client.embed(["kept"]))
        await wait_until(lambda: client.stats.waiting == 2)
        gone.cancel()
        await wait_until(lambda: client.stats.waiting == 1)
        gate.open()
        rows = await kept
    np.testing.assert_array_equal(rows, fake_embeddings(["kept"], DIM))
    assert server.stats.inputs == 1


async def test_usage_of_a_shared_request_adds_up(server: FakeTogetherServer) -> None:
    gate = GateLimiter()
    calls = [["short"], ["a somewhat longer text " * 4], ["mid sized text here"]]
    async with client_for(server, limiter=gate) as client:
        tasks = [asyncio.ensure_future(client.embeddings.create(input=t)) for t in calls]
        await wait_until(lambda: client.stats.waiting == len(calls))
        gate.grant(1)
        responses = await asyncio.gather(*tasks)
    assert server.stats.requests == 1
    expected = sum(len(t) // 4 + 1 for texts in calls for t in texts)  # the fake's count
    assert sum(r.usage.prompt_tokens for r in responses) == expected
    assert all(r.usage.prompt_tokens > 0 for r in responses)
    for texts, resp in zip(calls, responses, strict=True):
        got = np.array([d.embedding for d in resp.data], dtype=np.float32)
        np.testing.assert_array_equal(got, fake_embeddings(texts, DIM))
        assert [d.index for d in resp.data] == list(range(len(texts)))


async def test_a_deadline_the_queue_cannot_meet_fails_at_once(server: FakeTogetherServer) -> None:
    limiter = togembed.RateLimiter(rpm=60)  # one request now, the next in about a second
    async with client_for(server, limiter=limiter) as client:
        await client.embed(["first"])
        assert client.stats.expected_wait > 0.5
        with pytest.raises(togembed.DeadlineExceededError, match=r"timeout of 0\.2 s") as info:
            await client.embed(["second"], timeout=0.2)
    assert isinstance(info.value, togembed.APITimeoutError)
    assert info.value.expected_wait is not None and info.value.expected_wait > 0.2
    assert server.stats.requests == 1


async def test_a_deadline_that_passes_in_the_queue_sends_nothing(
    server: FakeTogetherServer,
) -> None:
    gate = GateLimiter()  # cannot estimate a wait: the call queues, then its deadline passes
    async with client_for(server, limiter=gate) as client:
        with pytest.raises(togembed.DeadlineExceededError, match="nothing was sent"):
            await client.embed(["late"], timeout=0.2)
        assert client.stats.waiting == 0
        gate.open()
        rows = await client.embed(["after"])
    np.testing.assert_array_equal(rows, fake_embeddings(["after"], DIM))
    assert server.stats.inputs == 1


async def test_a_coalesce_window_merges_calls_that_could_go_at_once(
    server: FakeTogetherServer,
) -> None:
    calls = calls_of(5)
    async with client_for(server, rpm=60_000, coalesce_window=0.05) as client:
        results = await asyncio.gather(*(client.embed(texts) for texts in calls))
    for texts, rows in zip(calls, results, strict=True):
        np.testing.assert_array_equal(rows, fake_embeddings(texts, DIM))
    assert server.stats.requests == 1


def test_bad_coalesce_window_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="coalesce_window"):
        togembed.AsyncClient(base_url="http://127.0.0.1:1/v1", coalesce_window=-1)


def test_sync_client_threads_share_requests(server_in_thread: FakeTogetherServer) -> None:
    gate = GateLimiter()
    calls = calls_of(8)
    results: dict[int, np.ndarray] = {}
    with togembed.Client(base_url=server_in_thread.base_url, model=MODEL, limiter=gate) as client:

        def work(i: int) -> None:
            results[i] = client.embed(calls[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while client.stats.waiting < len(calls):
            assert time.monotonic() < deadline, "calls did not queue"
            time.sleep(0.01)
        client._portal.loop.call_soon_threadsafe(gate.open)
        for t in threads:
            t.join()
        assert client.stats.shared_requests == 1
    for i, texts in enumerate(calls):
        np.testing.assert_array_equal(results[i], fake_embeddings(texts, DIM))
    assert server_in_thread.stats.requests == 1


@pytest.fixture
def server_in_thread() -> Any:
    from togembed.testing import serve_in_thread

    with serve_in_thread(dim=DIM) as server:
        yield server


@pytest.mark.parametrize("merged", [False, True], ids=["alone", "merged"])
async def test_calls_leave_no_cyclic_garbage(server: FakeTogetherServer, merged: bool) -> None:
    """Services make 1000 calls a second: a successful call, merged or not, must not feed the
    cyclic garbage collector (its pauses are what a service's p99 feels)."""
    gate = GateLimiter()
    limiter: Any = gate if merged else togembed.RateLimiter(rpm=6_000_000)

    async def round_of_calls() -> None:
        tasks = [asyncio.ensure_future(client.embed([f"x{i}"])) for i in range(20)]
        if merged:
            await wait_until(lambda: client.stats.waiting == 20)
            gate.grant(1)
        await asyncio.gather(*tasks)

    async with client_for(server, limiter=limiter) as client:
        await round_of_calls()  # warm up: connections, caches
        gc.collect()
        gc.disable()
        try:
            for _ in range(5):
                await round_of_calls()
            garbage = gc.collect()
        finally:
            gc.enable()
    assert garbage < 20, f"{garbage} objects of cyclic garbage after 100 calls"
