"""Transport and client over aioresponses: headers sent, aiohttp errors mapped, sessions owned."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import numpy as np
import pytest
from aioresponses import CallbackResult, aioresponses

import togembed
from togembed.core.transport import AiohttpTransport

URL = "https://api.example.test/v1"


def ok(n: int, dim: int = 2) -> dict:
    return {
        "object": "list",
        "model": "m",
        "data": [
            {"object": "embedding", "embedding": [float(i)] * dim, "index": i} for i in range(n)
        ],
    }


async def test_client_sends_key_model_input_and_encoding() -> None:
    seen = {}

    def capture(url, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(kwargs)
        return CallbackResult(payload=ok(2))

    with aioresponses() as m:
        m.post(f"{URL}/embeddings", callback=capture)
        async with togembed.AsyncClient(api_key="sk-secret", base_url=URL) as c:
            arr = await c.embed(["a", "b"], model="m")
    assert arr.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert seen["headers"]["Authorization"] == "Bearer sk-secret"
    assert seen["headers"]["User-Agent"].startswith("togembed/")
    import orjson

    assert orjson.loads(seen["data"]) == {
        "model": "m",
        "input": ["a", "b"],
        "encoding_format": "base64",
    }


async def test_connection_error_maps_to_api_connection_error() -> None:
    with aioresponses() as m:
        m.post(f"{URL}/embeddings", exception=aiohttp.ClientConnectionError("refused"))
        t = AiohttpTransport()
        with pytest.raises(togembed.APIConnectionError) as info:
            await t.post(f"{URL}/embeddings", b"{}", {}, 5.0)
        await t.aclose()
    assert isinstance(info.value.__cause__, aiohttp.ClientConnectionError)


async def test_timeout_maps_to_api_timeout_error_which_is_a_timeout_error() -> None:
    with aioresponses() as m:
        m.post(f"{URL}/embeddings", exception=asyncio.TimeoutError())
        t = AiohttpTransport()
        with pytest.raises(TimeoutError) as info:
            await t.post(f"{URL}/embeddings", b"{}", {}, 5.0)
        await t.aclose()
    assert isinstance(info.value, togembed.APITimeoutError)


async def test_user_session_is_used_and_left_open() -> None:
    with aioresponses() as m:
        m.post(f"{URL}/embeddings", payload=ok(1))
        async with aiohttp.ClientSession() as session:
            async with togembed.AsyncClient(api_key="k", base_url=URL, session=session) as c:
                await c.embed(["a"], model="m")
            assert not session.closed


async def test_unauthorized_is_raised_once_without_retry() -> None:
    with aioresponses() as m:
        m.post(
            f"{URL}/embeddings",
            status=401,
            payload={"error": {"message": "Invalid API key provided"}},
            repeat=True,
        )
        async with togembed.AsyncClient(api_key="wrong", base_url=URL) as c:
            with pytest.raises(togembed.AuthenticationError, match="Invalid API key"):
                await c.embed(["a"], model="m")
        assert c.stats.requests == 1


async def test_missing_api_key_fails_at_first_call_before_any_request(monkeypatch) -> None:
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    with aioresponses() as m:
        async with togembed.AsyncClient(base_url=URL) as c:
            with pytest.raises(togembed.MissingAPIKeyError, match="TOGETHER_API_KEY"):
                await c.embed(["a"], model="m")
        assert not m.requests


async def test_key_and_base_url_come_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("TOGETHER_API_KEY", "sk-env")
    monkeypatch.setenv("TOGETHER_BASE_URL", URL + "/")
    with aioresponses() as m:
        m.post(f"{URL}/embeddings", payload=ok(1))
        async with togembed.AsyncClient() as c:
            assert c.base_url == URL
            await c.embed("a", model="m")
        (call,) = next(iter(m.requests.values()))
        assert call.kwargs["headers"]["Authorization"] == "Bearer sk-env"


async def test_api_key_never_in_repr_errors_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="togembed")
    key = "sk-very-secret-key-123"
    with aioresponses() as m:
        m.post(f"{URL}/embeddings", status=500, body="<h1>boom</h1>", repeat=True)
        client = togembed.AsyncClient(api_key=key, base_url=URL, max_retries=1)
        with togembed.testing.backoff_disabled(), pytest.raises(togembed.APIError) as info:
            await client.embed(["a"], model="m")
        await client.close()
    assert key not in repr(client) and key not in repr(togembed.Client(api_key=key))
    assert key not in str(info.value) and key not in repr(info.value.__dict__)
    assert key not in caplog.text and "retrying" in caplog.text


def test_embed_empty_returns_empty_array_without_request() -> None:
    with aioresponses() as m, togembed.Client(api_key="k", base_url=URL) as c:
        arr = c.embed([], model="m")
        resp = c.embeddings.create(input=[], model="m")
        assert not m.requests
    assert arr.shape == (0, 0) and arr.dtype == np.float32
    assert resp.data == []
