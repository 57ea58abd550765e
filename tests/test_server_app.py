"""One protocol, two backends: the local-model server and the fake server are the same aiohttp
app (togembed.server.app), so they refuse, list models and report errors alike."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from standin_model import StandInModel

from togembed.server import EmbeddingServer
from togembed.server.app import TogetherServer
from togembed.testing import FakeTogetherServer

MODEL = "test/stand-in-mini"


@pytest.fixture
async def servers() -> AsyncIterator[list[TogetherServer]]:
    """A local server and a fake one, both with a key and one model name."""
    local = EmbeddingServer(StandInModel(), api_key="k", max_wait=0, shutdown_timeout=2.0)
    fake = FakeTogetherServer(dim=8, api_key="k", models=[MODEL])
    async with local, fake:
        yield [local, fake]


async def answer(
    server: TogetherServer, method: str, path: str, body: bytes | None = None, key: str = "k"
) -> tuple[int, Any, str]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    url = server.root_url + path
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, data=body, headers=headers) as r,
    ):
        return r.status, orjson.loads(await r.read()), r.headers["x-request-id"]


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1]",
        b'{"model": "test/stand-in-mini", "input": "x", "user": "u"}',
        b'{"input": "x"}',
        b'{"model": "test/stand-in-mini"}',
        b'{"model": "test/stand-in-mini", "input": []}',
        b'{"model": "test/stand-in-mini", "input": ["a", 3]}',
        b'{"model": "test/stand-in-mini", "input": "x", "encoding_format": "int8"}',
    ],
)
async def test_both_backends_refuse_a_bad_request_alike(
    servers: list[TogetherServer], body: bytes
) -> None:
    local, fake = [await answer(s, "POST", "/v1/embeddings", body) for s in servers]
    assert local[0] == fake[0] == 400
    assert local[1] == fake[1]
    assert set(local[1]["error"]) == {"message", "type", "param", "code"}


async def test_both_backends_check_the_key_list_models_and_answer_json_errors(
    servers: list[TogetherServer],
) -> None:
    for server in servers:
        status, doc, request_id = await answer(server, "GET", "/v1/models", key="wrong")
        assert (status, doc["error"]["code"]) == (401, "invalid_api_key")
        assert request_id
        status, doc, _ = await answer(server, "GET", "/v1/models")
        assert status == 200 and MODEL in [e["id"] for e in doc["data"]]
        assert all(e["object"] == "model" and e["type"] == "embedding" for e in doc["data"])
        status, doc, _ = await answer(server, "GET", f"/v1/models/{MODEL}")
        assert (status, doc["id"]) == (200, MODEL)
        status, doc, _ = await answer(server, "GET", "/v1/models/no/such-model")
        assert status == 404 and doc["error"]["code"] in ("model_not_found", "model_not_available")
        status, doc, _ = await answer(server, "GET", "/v1/nowhere")
        assert (status, doc["error"]["message"]) == (404, "Not found: GET /v1/nowhere")
        status, doc, _ = await answer(server, "GET", "/v1/embeddings")
        assert (status, doc["error"]["message"]) == (
            405,
            "Method GET not allowed for /v1/embeddings",
        )
