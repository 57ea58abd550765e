"""``embed_stream`` end to end against the FakeTogetherServer: rows bit for bit equal to
``fake_embeddings``, chunks in input order, bounded pulling (backpressure), faults, collected
and raised input errors, cancellation, and memory that does not grow with the stream."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import pytest
from helpers import MakeServer, wait_until

import togembed
from togembed.core.batching import estimate_tokens
from togembed.testing import FakeTogetherServer, fake_embeddings

MODEL = "BAAI/bge-base-en-v1.5"
DIM = 32


def text(i: int) -> str:
    return f"text number {i}"


def texts(n: int) -> list[str]:
    return [text(i) for i in range(n)]


class Source:
    """``n`` texts (with optional replacements) as a sync or async iterable that counts what
    was pulled; the consumer counts what it was given in ``yielded``, so ``max_ahead`` is the
    most texts ever pulled and not yet yielded."""

    def __init__(self, n: int, replace: Mapping[int, Any] | None = None) -> None:
        self.n = n
        self.replace = dict(replace or {})
        self.pulled = 0
        self.yielded = 0
        self.max_ahead = 0

    def _item(self, i: int) -> Any:
        self.pulled += 1
        self.max_ahead = max(self.max_ahead, self.pulled - self.yielded)
        return self.replace.get(i, text(i))

    def __iter__(self) -> Iterator[Any]:
        for i in range(self.n):
            yield self._item(i)

    async def __aiter__(self) -> AsyncIterator[Any]:
        for i in range(self.n):
            yield self._item(i)

    def items(self) -> list[Any]:
        return [self.replace.get(i, text(i)) for i in range(self.n)]


def client_for(server: FakeTogetherServer, **kwargs: Any) -> togembed.AsyncClient:
    kwargs.setdefault("model", MODEL)
    return togembed.AsyncClient(base_url=server.base_url, **kwargs)


async def consume(
    chunks: AsyncIterator[togembed.EmbeddingChunk],
    source: Source | None = None,
    *,
    delay: float | None = None,
) -> list[togembed.EmbeddingChunk]:
    got: list[togembed.EmbeddingChunk] = []
    async for chunk in chunks:
        got.append(chunk)
        if source is not None:
            source.yielded += len(chunk.vectors)
        if delay is not None:
            await asyncio.sleep(delay)
    return got


def assert_contiguous(chunks: list[togembed.EmbeddingChunk], n: int) -> None:
    """Every position exactly once, in order."""
    assert [c.start for c in chunks] == [0] + [c.stop for c in chunks[:-1]]
    assert chunks[-1].stop == n
    assert all(c.stop > c.start for c in chunks)


def assert_exact(chunks: list[togembed.EmbeddingChunk], items: list[str], dim: int = DIM) -> None:
    assert_contiguous(chunks, len(items))
    for c in chunks:
        assert c.vectors.dtype == np.float32
        assert c.vectors.shape == (c.stop - c.start, dim)
        assert dict(c.errors) == {}
    np.testing.assert_array_equal(
        np.concatenate([c.vectors for c in chunks]), fake_embeddings(items, dim)
    )


def stream_tasks() -> set[asyncio.Task[Any]]:
    """Tasks running togembed code (the server's own handlers run on this loop too)."""
    return {
        t
        for t in asyncio.all_tasks()
        if "togembed" in t.get_coro().cr_code.co_filename  # type: ignore[union-attr]
    }


@pytest.fixture
async def server(make_server: MakeServer) -> FakeTogetherServer:
    return await make_server()


# ---------------------------------------------------------------------------------------------
# Inputs and order


@pytest.mark.parametrize("kind", ["list", "generator", "async generator"])
async def test_list_generator_and_async_generator_give_exact_rows_in_order(
    make_server: MakeServer, kind: str
) -> None:
    server = await make_server(latency=0.01)
    source = Source(1000)
    inputs: Any = {"list": source.items(), "generator": iter(source), "async generator": source}
    async with client_for(server, batch_size=64, concurrency=4) as client:
        chunks = await consume(client.embed_stream(inputs[kind]))
    assert_exact(chunks, source.items())
    assert server.stats.requests == math.ceil(1000 / 64) == len(chunks)
    assert server.stats.inputs == 1000
    assert 2 <= server.max_in_flight <= 4


async def test_batches_are_cut_by_the_token_budget_on_the_fly(
    server: FakeTogetherServer,
) -> None:
    items = [f"{i} " + "word " * (i % 50) for i in range(300)]
    async with client_for(server, batch_size=64, max_batch_tokens=200) as client:
        chunks = await consume(client.embed_stream(iter(items)))
    assert_exact(chunks, items)
    assert len(chunks) == server.stats.requests > 300 * 20 // 200
    for c in chunks:  # every batch as full as the budget allows
        tokens = sum(estimate_tokens(t) for t in items[c.start : c.stop])
        assert tokens <= 200
        assert c.stop == len(items) or tokens + estimate_tokens(items[c.stop]) > 200


async def test_empty_input_yields_nothing_sends_nothing_and_needs_no_key(
    server: FakeTogetherServer,
) -> None:
    async def nothing() -> AsyncIterator[str]:
        return
        yield

    async with client_for(server) as client:
        assert await consume(client.embed_stream([])) == []
        assert await consume(client.embed_stream(iter([]))) == []
        assert await consume(client.embed_stream(nothing())) == []
    assert server.stats.requests == 0

    remote = togembed.AsyncClient(base_url="https://api.together.example/v1", model=MODEL)
    assert await consume(remote.embed_stream([])) == []
    with pytest.raises(togembed.MissingAPIKeyError):
        await consume(remote.embed_stream(["a"]))
    await remote.close()


async def test_a_single_string_is_one_text(server: FakeTogetherServer) -> None:
    async with client_for(server) as client:
        chunks = await consume(client.embed_stream("hello"))
    assert_exact(chunks, ["hello"])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"errors": "ignore"}, ValueError),
        ({"window": 0}, ValueError),
        ({"texts": b"bytes"}, togembed.InvalidInputError),
        ({"texts": 42}, togembed.InvalidInputError),
    ],
)
async def test_bad_arguments_raise_at_the_first_step(
    server: FakeTogetherServer, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    kwargs.setdefault("texts", ["a"])
    async with client_for(server) as client:
        with pytest.raises(error):
            await consume(client.embed_stream(**kwargs))
    assert server.stats.requests == 0


# ---------------------------------------------------------------------------------------------
# Backpressure and memory


async def test_slow_consumer_bounds_texts_pulled_ahead_to_the_window(
    server: FakeTogetherServer,
) -> None:
    source = Source(400)
    async with client_for(server, batch_size=10, concurrency=2) as client:
        stream = client.embed_stream(source, window=40)
        first = await anext(stream)
        source.yielded += len(first.vectors)
        await wait_until(lambda: source.max_ahead == 40)  # the window fills up...
        chunks = [first, *await consume(stream, source, delay=0.003)]
    assert_exact(chunks, source.items())
    assert source.max_ahead == 40  # ...and never more


async def test_consumer_that_stops_consuming_stops_pulling_and_sending(
    server: FakeTogetherServer,
) -> None:
    source = Source(1000)
    async with client_for(server, batch_size=10, concurrency=4) as client:
        stream = client.embed_stream(iter(source), window=40)
        first = await anext(stream)
        source.yielded += 10
        # The consumer is busy: the window fills, its batches are answered...
        await wait_until(
            lambda: source.pulled >= 10 + 40 and server.stats.requests >= 5 and not server.in_flight
        )
        await asyncio.sleep(0.05)  # ...then all stops (a quiet spell: nothing more may happen)
        assert source.pulled == 10 + 40
        assert server.stats.requests == 5
        chunks = [first, *await consume(stream, source)]
    assert_exact(chunks, source.items())
    assert source.max_ahead <= 40


async def test_200k_texts_stream_with_bounded_texts_held(make_server: MakeServer) -> None:
    server = await make_server(dim=16)
    n = 200_000
    source = Source(n)
    seen = 0
    async with client_for(server, batch_size=500, concurrency=8) as client:
        window = 4 * 8 * 500
        async for chunk in client.embed_stream(source):
            assert chunk.start == seen
            source.yielded = seen = chunk.stop
            if chunk.start % 20_000 == 0:  # spot checks: decoding every row again is slow
                items = [text(i) for i in range(chunk.start, chunk.stop)]
                np.testing.assert_array_equal(chunk.vectors, fake_embeddings(items, 16))
    assert seen == n
    assert source.pulled == n
    assert source.max_ahead <= window
    assert server.stats.inputs == n


# ---------------------------------------------------------------------------------------------
# Faults and errors


async def test_faults_are_recovered_with_exact_rows(server: FakeTogetherServer) -> None:
    server.faults.extend(
        ["429:retry-after=0", "500", "drop_fin", "shuffle", "502", "drop_rst", "truncate"]
    )
    source = Source(600)
    async with client_for(server, batch_size=50, concurrency=4) as client:
        chunks = await consume(client.embed_stream(source))
    assert_exact(chunks, source.items())
    assert len(server.faults) == 0
    assert server.stats.requests == 12 + 6  # shuffle is a valid answer


async def test_collect_gives_nan_rows_and_errors_at_bad_positions_only(
    make_server: MakeServer,
) -> None:
    server = await make_server(reject_substring="POISON")
    bad = [0, 5, 63, 64, 500, 501, 999]
    source = Source(1000, {i: f"POISON {i}" for i in bad})
    items = source.items()
    async with client_for(server, batch_size=64, concurrency=4) as client:
        chunks = await consume(client.embed_stream(source, errors="collect"))
    assert_contiguous(chunks, 1000)
    arr = np.concatenate([c.vectors for c in chunks])
    assert arr.shape == (1000, DIM)
    nan_rows = np.isnan(arr).all(axis=1)
    assert np.flatnonzero(nan_rows).tolist() == bad
    assert not np.isnan(arr[~nan_rows]).any()
    np.testing.assert_array_equal(arr[~nan_rows], fake_embeddings(items, DIM)[~nan_rows])

    errors = {pos: err for c in chunks for pos, err in c.errors.items()}
    assert sorted(errors) == bad
    for c in chunks:
        assert all(c.start <= pos < c.stop for pos in c.errors)
    for pos, err in errors.items():
        assert isinstance(err, togembed.BadRequestError)
        assert err.input_index == pos
        assert str(err).startswith(f"input {pos}:")
    # bisection: about 2 requests per level of a 64-input batch for each bad input
    assert server.stats.requests <= math.ceil(1000 / 64) + len(bad) * 2 * 6


async def test_collect_a_batch_rejected_whole_waits_for_the_dimension(
    make_server: MakeServer,
) -> None:
    server = await make_server(reject_substring="POISON")
    source = Source(20, {i: f"POISON {i}" for i in range(4)})
    async with client_for(server, batch_size=4, concurrency=2) as client:
        chunks = await consume(client.embed_stream(source, errors="collect"))
        assert_contiguous(chunks, 20)
        assert chunks[0].vectors.shape == (4, DIM)  # learned from a later batch
        assert np.isnan(chunks[0].vectors).all()
        assert sorted(chunks[0].errors) == [0, 1, 2, 3]
        np.testing.assert_array_equal(
            np.concatenate([c.vectors for c in chunks[1:]]),
            fake_embeddings(source.items()[4:], DIM),
        )

        # nothing ever succeeds: no dimension to learn, so the rows have none
        everything_bad = [f"POISON {i}" for i in range(6)]
        chunks = await consume(client.embed_stream(everything_bad, errors="collect"))
        assert [c.vectors.shape for c in chunks] == [(4, 0), (2, 0)]
        assert sorted(pos for c in chunks for pos in c.errors) == list(range(6))

        # a whole window rejected: waiting could never end, so those chunks go out dimensionless
        source = Source(20, {i: f"POISON {i}" for i in range(12)})
        stream = client.embed_stream(source, window=8, errors="collect")
        chunks = await consume(stream)
    assert [c.vectors.shape for c in chunks] == [(4, 0), (4, 0)] + [(4, DIM)] * 3
    assert np.isnan(chunks[2].vectors).all()


async def test_raise_pins_the_rejected_input_by_its_stream_position(
    make_server: MakeServer,
) -> None:
    server = await make_server(reject_substring="POISON")
    source = Source(1000, {637: "this one is POISON"})
    got: list[togembed.EmbeddingChunk] = []
    async with client_for(server, batch_size=128, concurrency=4) as client:
        with pytest.raises(togembed.BadRequestError) as info:
            async for chunk in client.embed_stream(source):
                got.append(chunk)
    assert info.value.input_index == 637
    assert str(info.value).startswith("input 637:")
    assert all(c.stop <= 512 for c in got)  # [512, 640) failed; nothing after it is yielded


@pytest.mark.parametrize("errors", ["raise", "collect"])
async def test_request_level_failures_raise_in_both_modes(
    make_server: MakeServer, errors: Any
) -> None:
    server = await make_server(api_key="sk-right")
    async with client_for(server, api_key="sk-wrong", batch_size=10) as client:
        with pytest.raises(togembed.AuthenticationError):
            await consume(client.embed_stream(texts(100), errors=errors))
    server.faults.extend(["500"] * 3)
    async with client_for(server, api_key="sk-right", max_retries=2) as client:
        with pytest.raises(togembed.InternalServerError):
            await consume(client.embed_stream(["a"], errors=errors))


@pytest.mark.parametrize("bad", [None, 7])
async def test_non_string_raises_with_its_position_after_the_chunks_before_its_batch(
    server: FakeTogetherServer, bad: object
) -> None:
    source = Source(1000, {250: bad})
    got: list[togembed.EmbeddingChunk] = []
    async with client_for(server, batch_size=100, concurrency=2) as client:
        with pytest.raises(togembed.InvalidInputError) as info:
            async for chunk in client.embed_stream(iter(source)):
                got.append(chunk)
    assert info.value.index == 250
    assert str(info.value).startswith("input 250:")
    assert_exact(got, source.items()[:200])
    assert source.pulled == 251  # nothing after it is pulled
    assert server.stats.inputs == 200  # nor is its batch [200, 300) sent


async def test_an_error_of_the_input_iterator_propagates_in_order(
    server: FakeTogetherServer,
) -> None:
    def lines() -> Iterator[str]:
        yield from texts(150)
        raise OSError("disk gone")

    got: list[togembed.EmbeddingChunk] = []
    async with client_for(server, batch_size=50) as client:
        with pytest.raises(OSError, match="disk gone"):
            async for chunk in client.embed_stream(lines()):
                got.append(chunk)
    assert_exact(got, texts(150))


# ---------------------------------------------------------------------------------------------
# Cancellation


@pytest.mark.parametrize("how", ["aclosing", "break", "cancel"])
async def test_leaving_early_cancels_in_flight_requests_and_leaves_no_tasks(
    server: FakeTogetherServer, how: str
) -> None:
    """The first batch is answered at once; then the server hangs, so 4 requests are in flight
    when the consumer leaves."""

    async def source() -> AsyncIterator[str]:
        for i in range(10):
            yield text(i)
        await wait_until(lambda: server.stats.requests == 1 and server.in_flight == 0)
        server.latency = 60.0
        for i in range(10, 1000):
            yield text(i)

    before = asyncio.all_tasks()
    client = client_for(server, batch_size=10, concurrency=4, rpm=1e6)
    stream = client.embed_stream(source())
    got: list[togembed.EmbeddingChunk] = []

    async def consume_until_four_in_flight() -> None:
        async for chunk in stream:
            got.append(chunk)
            if how == "cancel":
                continue  # cancelled while waiting for the next chunk
            await wait_until(lambda: server.in_flight == 4)
            assert stream_tasks()
            break

    if how == "aclosing":
        async with contextlib.aclosing(stream):
            await consume_until_four_in_flight()
        assert stream_tasks() == set()  # closed on the spot: nothing left running
    elif how == "break":
        await consume_until_four_in_flight()
        del stream  # the event loop closes a dropped generator soon after
    else:
        task = asyncio.ensure_future(consume_until_four_in_flight())
        await wait_until(lambda: server.in_flight == 4 and len(got) == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert stream_tasks() == set()
    assert [c.start for c in got] == [0]
    await wait_until(lambda: server.in_flight == 0 and server.disconnects == 4)
    assert server.stats.requests == 5
    await client.close()
    await wait_until(lambda: not (asyncio.all_tasks() - before))


# ---------------------------------------------------------------------------------------------
# Sync client


def test_sync_client_embed_stream() -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def call(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(10)

    server = FakeTogetherServer(dim=DIM, reject_substring="POISON")
    try:
        base_url = call(server.start())
        items = texts(300)
        items[123] = "POISON"
        with togembed.Client(base_url=base_url, model=MODEL, batch_size=50) as c:
            chunks = list(c.embed_stream(iter(items), errors="collect"))
            assert_contiguous(chunks, 300)
            assert [pos for ch in chunks for pos in ch.errors] == [123]
            arr = np.concatenate([ch.vectors for ch in chunks])
            expected = fake_embeddings(items, DIM)
            expected[123] = np.nan
            np.testing.assert_array_equal(arr, expected)

            stream = c.embed_stream(texts(300))
            assert next(stream).start == 0
            stream.close()  # cancels the rest; the client stays usable
            with pytest.raises(togembed.BadRequestError) as info:
                list(c.embed_stream(_lazy(items)))
            assert info.value.input_index == 123
    finally:
        call(server.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def _lazy(items: Iterable[str]) -> Iterator[str]:
    yield from items
