"""togembed serve's connection limits, over raw sockets on 127.0.0.1: header and body deadlines,
the idle keep-alive timeout and the connection cap.

Every "the server closed it" is observed as EOF on the socket (with a generous failure timeout),
never as a sleep; where a test needs "time has passed", it waits for another connection's
deadline to fire."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import orjson
import pytest
from helpers import wait_until
from standin_model import StandInModel

from togembed.server import EmbeddingServer
from togembed.server.listen import ListenError

MODEL = "test/stand-in-mini"
# Generous: a test fails after this long only if the server never closes a connection.
EOF_TIMEOUT = 10.0
# Small deadlines, so the tests that wait for one are quick.
SHORT = 0.2

MakeServe = Callable[..., Awaitable[EmbeddingServer]]
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
async def make_serve() -> AsyncIterator[MakeServe]:
    servers: list[EmbeddingServer] = []

    async def make(model: StandInModel | None = None, **options: Any) -> EmbeddingServer:
        options.setdefault("shutdown_timeout", 2.0)
        options.setdefault("max_wait", 0)
        server = EmbeddingServer(model or StandInModel(), **options)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[EmbeddingServer], Awaitable[Conn]]]:
    """Raw TCP connections to a server, all closed at the end of the test."""
    writers: list[asyncio.StreamWriter] = []

    async def open_(server: EmbeddingServer) -> Conn:
        url = urlsplit(server.base_url)
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        writers.append(writer)
        return reader, writer

    yield open_
    for writer in writers:
        writer.close()
    for writer in writers:
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def read_to_eof(reader: asyncio.StreamReader, timeout: float = EOF_TIMEOUT) -> bytes:
    """Everything the server sends until it closes the connection (fails the test if it does
    not close it within ``timeout``)."""
    data = bytearray()

    async def drain() -> None:
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return
            if not chunk:
                return
            data.extend(chunk)

    try:
        await asyncio.wait_for(drain(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"the server kept the connection open ({bytes(data)!r})") from None
    return bytes(data)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length (the connection stays open)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), EOF_TIMEOUT)
    status, headers = parse_head(head)
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), EOF_TIMEOUT)
    return status, headers, body


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return status, headers


def parse_whole(data: bytes) -> tuple[int, dict[str, str], Any]:
    """A response read to EOF: status, headers, JSON body."""
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, data
    status, headers = parse_head(head + sep)
    return status, headers, orjson.loads(body)


def request_bytes(texts: list[str], *, keep_alive: bool = True) -> tuple[bytes, bytes]:
    """An embeddings request's head and body."""
    body = orjson.dumps({"model": MODEL, "input": texts})
    head = (
        "POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        + ("" if keep_alive else "Connection: close\r\n")
        + "\r\n"
    ).encode()
    return head, body


async def embed_on(conn: Conn, texts: list[str]) -> np.ndarray:
    """A complete request on an open connection; the rows of its 200 answer."""
    reader, writer = conn
    head, body = request_bytes(texts)
    writer.write(head + body)
    await writer.drain()
    status, _, raw = await read_response(reader)
    assert status == 200, raw
    doc = orjson.loads(raw)
    return np.array([d["embedding"] for d in doc["data"]], dtype=np.float32)


PARTIAL_HEAD = b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty"


# ---------------------------------------------------------------------------------------------
# Request head


async def test_partial_headers_get_408_and_are_closed_after_the_header_timeout(
    make_serve, connect
) -> None:
    model = StandInModel()
    server = await make_serve(model, header_timeout=SHORT)
    conns = [await connect(server) for _ in range(100)]
    for _, writer in conns:
        writer.write(PARTIAL_HEAD)
        await writer.drain()
    answers = await asyncio.gather(*(read_to_eof(reader) for reader, _ in conns))
    for data in answers:
        status, headers, doc = parse_whole(data)
        assert status == 408
        assert headers["connection"] == "close"
        assert doc["error"]["code"] == "request_timeout"
        assert doc["error"]["type"] == "invalid_request_error"
        assert "headers did not arrive within 0.2 s" in doc["error"]["message"]
    assert server.stats.header_timeouts == 100
    await wait_until(lambda: server.open_connections == 0)
    # The server is fine: a normal request on a new connection is answered.
    rows = await embed_on(await connect(server), ["a"])
    np.testing.assert_array_equal(rows, model.expected(["a"]))
    assert model.calls == [["a"]]


async def test_a_silent_new_connection_is_closed_without_an_answer(make_serve, connect) -> None:
    server = await make_serve(header_timeout=SHORT)
    reader, _ = await connect(server)
    # Nothing was asked, so nothing is answered: a 408 here would be read by a client as the
    # answer to the request it might be sending right now.
    assert await read_to_eof(reader) == b""
    assert server.stats.header_timeouts == 1


async def test_trickled_header_bytes_do_not_extend_the_header_deadline(make_serve, connect) -> None:
    server = await make_serve(header_timeout=SHORT)
    reader, writer = await connect(server)
    writer.write(b"POST /v1/embeddings HTTP/1.1\r\nX-Slow: ")
    loop = asyncio.get_running_loop()
    give_up = loop.time() + EOF_TIMEOUT
    received = b""
    # One byte every 20 ms, forever (a slowloris): only an absolute deadline ends this.
    while not reader.at_eof():
        assert loop.time() < give_up, "the server kept a trickling connection open"
        try:
            writer.write(b"a")
            await writer.drain()
        except ConnectionError:
            break
        try:
            received += await asyncio.wait_for(reader.read(65536), 0.02)
        except asyncio.TimeoutError:
            continue
        except ConnectionResetError:
            break
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert server.stats.header_timeouts == 1


async def test_slow_but_complete_requests_are_answered_and_the_connection_reused(
    make_serve, connect
) -> None:
    model = StandInModel()
    server = await make_serve(model)  # the default deadlines: 20 s head, 60 s body
    reader, writer = await connect(server)
    for texts in (["slow one"], ["slow two", "three"]):
        head, body = request_bytes(texts)
        for piece in (head[:10], head[10:30], head[30:], body[:5], body[5:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.02)  # a slow client (the scenario, not synchronisation)
        status, _, raw = await read_response(reader)
        assert status == 200, raw
        rows = np.array([d["embedding"] for d in orjson.loads(raw)["data"]], dtype=np.float32)
        np.testing.assert_array_equal(rows, model.expected(texts))
    assert server.stats.header_timeouts == server.stats.body_timeouts == 0
    assert server.open_connections == 1  # both on the one connection


async def test_an_idle_keepalive_connection_outlives_the_header_timeout(
    make_serve, connect
) -> None:
    model = StandInModel()
    server = await make_serve(model, header_timeout=SHORT)  # keep-alive: the default 75 s
    kept = await connect(server)
    await embed_on(kept, ["first"])
    # A probe started after `kept` went idle: once its head deadline has fired, `kept` has been
    # idle for longer than header_timeout.
    probe_reader, probe_writer = await connect(server)
    probe_writer.write(PARTIAL_HEAD)
    await probe_writer.drain()
    assert (await read_to_eof(probe_reader)).startswith(b"HTTP/1.1 408 ")
    rows = await embed_on(kept, ["second"])  # same socket, still open
    np.testing.assert_array_equal(rows, model.expected(["second"]))
    assert server.stats.header_timeouts == 1


async def test_the_head_of_a_later_request_on_a_connection_is_timed_too(
    make_serve, connect
) -> None:
    server = await make_serve(header_timeout=SHORT)
    reader, writer = await connect(server)
    await embed_on((reader, writer), ["first"])
    writer.write(PARTIAL_HEAD)
    await writer.drain()
    status, _, doc = parse_whole(await read_to_eof(reader))
    assert status == 408 and doc["error"]["code"] == "request_timeout"


async def test_leftover_body_bytes_do_not_start_a_head_deadline(make_serve, connect) -> None:
    """A 401 answered before the body is read: aiohttp discards the rest of the body as it
    arrives. Those bytes are not the head of a next request, so they must not arm a deadline
    that would later close the kept-alive connection with a stray 408."""
    model = StandInModel()
    server = await make_serve(model, api_key="k", header_timeout=SHORT)
    reader, writer = await connect(server)
    head, body = request_bytes(["a"])
    writer.write(head)  # no Authorization header: 401 before the body is read
    await writer.drain()
    status, _, _ = await read_response(reader)
    assert status == 401
    writer.write(body)  # the body, late
    await writer.drain()
    probe_reader, probe_writer = await connect(server)
    probe_writer.write(PARTIAL_HEAD)
    await probe_writer.drain()
    assert (await read_to_eof(probe_reader)).startswith(b"HTTP/1.1 408 ")
    # The first connection is still open and works, with no 408 waiting in it.
    head, body = request_bytes(["b"])
    writer.write(head.replace(b"\r\n\r\n", b"\r\nAuthorization: Bearer k\r\n\r\n") + body)
    await writer.drain()
    status, _, raw = await read_response(reader)
    assert status == 200, raw
    assert server.stats.header_timeouts == 1  # the probe only


# ---------------------------------------------------------------------------------------------
# Request body


async def test_partial_bodies_get_408_and_are_closed_after_the_body_timeout(
    make_serve, connect
) -> None:
    model = StandInModel()
    server = await make_serve(model, body_timeout=SHORT)
    conns = [await connect(server) for _ in range(50)]
    head, body = request_bytes(["never", "finished"])
    for _, writer in conns:
        writer.write(head + body[:10])
        await writer.drain()
    answers = await asyncio.gather(*(read_to_eof(reader) for reader, _ in conns))
    for data in answers:
        status, headers, doc = parse_whole(data)
        assert status == 408
        assert headers["connection"] == "close"
        assert headers["x-request-id"]
        assert doc["error"]["code"] == "request_timeout"
        assert "body did not arrive within 0.2 s" in doc["error"]["message"]
    assert server.stats.body_timeouts == 50
    assert server.stats.requests == 0 and model.calls == []
    await wait_until(lambda: server.open_connections == 0)


async def test_trickled_body_bytes_do_not_extend_the_body_deadline(make_serve, connect) -> None:
    server = await make_serve(body_timeout=SHORT)
    reader, writer = await connect(server)
    writer.write(
        b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100000\r\n\r\n{"model":'
    )
    loop = asyncio.get_running_loop()
    give_up = loop.time() + EOF_TIMEOUT
    received = b""
    while not reader.at_eof():
        assert loop.time() < give_up, "the server kept a trickling connection open"
        try:
            writer.write(b" ")
            await writer.drain()
        except ConnectionError:
            break
        try:
            received += await asyncio.wait_for(reader.read(65536), 0.02)
        except asyncio.TimeoutError:
            continue
        except ConnectionResetError:
            break
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert server.stats.body_timeouts == 1


# ---------------------------------------------------------------------------------------------
# Keep-alive and the connection cap


async def test_idle_keepalive_connections_are_closed_after_the_keepalive_timeout(
    make_serve, connect
) -> None:
    server = await make_serve(keepalive_timeout=SHORT)
    reader, writer = await connect(server)
    await embed_on((reader, writer), ["a"])
    assert await read_to_eof(reader) == b""  # closed, with nothing more said
    await wait_until(lambda: server.open_connections == 0)
    assert server.stats.header_timeouts == 0


async def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503(
    make_serve, connect
) -> None:
    model = StandInModel()
    server = await make_serve(model, max_connections=3)
    busy = [await connect(server) for _ in range(3)]
    for _, writer in busy:
        writer.write(PARTIAL_HEAD)  # mid-request: not idle
        await writer.drain()
    await wait_until(lambda: server.open_connections == 3)
    reader, _ = await connect(server)
    status, headers, doc = parse_whole(await read_to_eof(reader))
    assert status == 503
    assert headers["retry-after"] == "1"
    assert doc["error"]["code"] == "too_many_connections"
    assert "at most 3" in doc["error"]["message"]
    assert server.stats.refused_connections == 1
    assert server.open_connections == 3
    # One leaves: there is room again.
    busy[0][1].close()
    await wait_until(lambda: server.open_connections == 2)
    rows = await embed_on(await connect(server), ["a"])
    np.testing.assert_array_equal(rows, model.expected(["a"]))


async def test_at_the_cap_an_idle_keepalive_connection_makes_room(make_serve, connect) -> None:
    model = StandInModel()
    server = await make_serve(model, max_connections=2)
    idle_reader, idle_writer = await connect(server)
    await embed_on((idle_reader, idle_writer), ["idle"])
    busy_reader, busy_writer = await connect(server)
    head, body = request_bytes(["busy"])
    busy_writer.write(head[:20])  # mid-request
    await busy_writer.drain()
    await wait_until(lambda: server.open_connections == 2)

    rows = await embed_on(await connect(server), ["new"])
    np.testing.assert_array_equal(rows, model.expected(["new"]))
    assert await read_to_eof(idle_reader) == b""  # the idle one was closed for it
    assert server.stats.idle_closed == 1 and server.stats.refused_connections == 0
    # The busy one was left alone: its request completes.
    busy_writer.write(head[20:] + body)
    await busy_writer.drain()
    status, _, _ = await read_response(busy_reader)
    assert status == 200


# ---------------------------------------------------------------------------------------------
# Options


def test_limit_options_are_checked() -> None:
    for bad in (
        {"header_timeout": 0},
        {"body_timeout": -1},
        {"keepalive_timeout": 0},
        {"keepalive_timeout": None},
        {"max_connections": 0},
        {"max_connections": 1.5},
    ):
        with pytest.raises(ValueError):
            EmbeddingServer(StandInModel(), **bad)
    server = EmbeddingServer(
        StandInModel(), header_timeout=None, body_timeout=None, max_connections=None
    )
    assert server.header_timeout is None and server.max_connections is None


async def test_no_limits_when_disabled(make_serve, connect) -> None:
    """header_timeout/body_timeout None: a partial request is held until the client leaves
    (checked by closing the server, which must still close it)."""
    server = await make_serve(header_timeout=None, body_timeout=None, max_connections=None)
    reader, writer = await connect(server)
    writer.write(PARTIAL_HEAD)
    await writer.drain()
    await wait_until(lambda: server.open_connections == 1)
    assert not reader.at_eof()
    await server.close()
    await read_to_eof(reader)
    assert server.stats.header_timeouts == 0


async def test_a_busy_address_raises_listen_error(make_serve) -> None:
    server = await make_serve()
    port = urlsplit(server.base_url).port
    other = EmbeddingServer(StandInModel())
    with pytest.raises(ListenError) as info:
        await other.start("127.0.0.1", port)
    assert isinstance(info.value, OSError)
    assert str(info.value) == f"cannot listen on 127.0.0.1:{port}: address already in use"
    with pytest.raises(RuntimeError):
        other.base_url  # noqa: B018  (not started)
    await other.close()
