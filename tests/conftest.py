"""Shared test setup: no retry waits, and an aioresponses shim for aiohttp >= 3.14."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any
from unittest import mock

import aiohttp
import aioresponses.core
import pytest
from helpers import MakeServer

import togembed.testing
from togembed.testing import FakeTogetherServer


class _ShimResponse(aiohttp.ClientResponse):
    """aiohttp 3.14 made ``stream_writer`` a required argument of ClientResponse and
    aioresponses 0.7.9 does not pass it (pnuckowski/aioresponses#289, unreleased fix).
    A mocked response never uploads, so a writer reporting 0 bytes is faithful."""

    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs.setdefault("stream_writer", mock.Mock(output_size=0))
        super().__init__(*args, **kwargs)


if "stream_writer" in aiohttp.ClientResponse.__init__.__code__.co_varnames:
    aioresponses.core.ClientResponse = _ShimResponse  # type: ignore[misc]


@pytest.fixture(autouse=True)
def _no_backoff() -> Iterator[None]:
    """Retries happen at once in tests; delays are still computed and asserted where it matters."""
    with togembed.testing.backoff_disabled():
        yield


@pytest.fixture
async def make_server(request: pytest.FixtureRequest) -> AsyncIterator[MakeServer]:
    """Start fake Together servers on 127.0.0.1 (``dim`` defaults to the module's ``DIM``)."""
    servers: list[FakeTogetherServer] = []

    async def make(**kwargs: Any) -> FakeTogetherServer:
        kwargs.setdefault("dim", getattr(request.module, "DIM", 32))
        server = FakeTogetherServer(**kwargs)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server on 127.0.0.1 for the whole session (skips where there is none)."""
    pytest.importorskip("redis", reason="redis-py is not installed (pip install 'togembed[redis]')")
    from redis_server import redis_server

    try:
        with redis_server() as url:
            yield url
    except FileNotFoundError:
        pytest.skip("redis-server is not installed")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """A local Ray for the whole session: 2 CPUs, a small object store, no dashboard."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'togembed[ray]')")
    pytest.importorskip("ray.data")
    import ray_faults

    ray.cloudpickle.register_pickle_by_value(ray_faults)
    ray.init(
        num_cpus=2,
        object_store_memory=128 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A port that refuses connections: bound (so nothing else takes it), never listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        sock.close()
