"""The fixtures users get from togembed's pytest plugin."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

import togembed
from togembed.testing import FakeTogetherServer, fake_embeddings


def test_fake_together_fixture_serves_sync_clients_through_scripted_faults(
    fake_together: FakeTogetherServer,
) -> None:
    fake_together.faults.extend(["429:retry-after=0", "503", "drop_rst", "truncate", "shuffle"])
    with togembed.Client(base_url=fake_together.base_url, model="m") as client:
        vectors = client.embed(["a", "b", "c"])
    np.testing.assert_array_equal(vectors, fake_embeddings(["a", "b", "c"], 768))
    assert fake_together.stats.requests == 5  # four faults, then the shuffled success


def test_fake_together_factory_takes_server_options(
    fake_together_factory: Callable[..., FakeTogetherServer],
) -> None:
    server = fake_together_factory(dim=8, api_key="secret")
    with togembed.Client(base_url=server.base_url, model="m", api_key="wrong") as client:
        try:
            client.embed(["x"])
        except togembed.AuthenticationError as exc:
            assert exc.status_code == 401
        else:
            raise AssertionError("a wrong key must be refused")
    with togembed.Client(base_url=server.base_url, model="m", api_key="secret") as client:
        assert client.embed(["x"]).shape == (1, 8)


async def test_fake_together_fixture_works_in_async_tests(
    fake_together: FakeTogetherServer,
) -> None:
    async with togembed.AsyncClient(base_url=fake_together.base_url, model="m") as client:
        resp = await client.embeddings.create(input="hello")
    assert resp.data[0].index == 0 and len(resp.data[0].embedding) == 768
