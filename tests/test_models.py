"""``client.models.list()`` and ``togembed models`` (issue 10 §1) against each shape servers
answer ``GET /v1/models`` in: Together's bare list with ``type``, OpenAI's ``{"data": [...]}``
without it, and ``togembed serve``'s OpenAI shape with ``type: "embedding"``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from apps import App, app_in_thread, apps, error, json_response
from click.testing import CliRunner
from standin_model import StandInModel

import togembed
from togembed import cli as cli_module
from togembed.cli import models as models_module
from togembed.server import EmbeddingServer
from togembed.testing import FakeTogetherServer, serve_in_thread

make_app = pytest.fixture(name="make_app")(apps)

# Together's shape (fields of together-python's ModelObject: id, object, created, type,
# display_name, organization, link, license, context_length, pricing).
TOGETHER_MODELS = [
    {
        "id": "intfloat/multilingual-e5-large-instruct",
        "object": "model",
        "created": 1700000000,
        "type": "embedding",
        "display_name": "Multilingual E5 Large Instruct",
        "organization": "intfloat",
        "context_length": 514,
        "pricing": {"input": 0.02, "output": 0.0},
    },
    {
        "id": "meta-llama/Llama-3.3-70B-Instruct-Turbo",
        "object": "model",
        "created": 1700000001,
        "type": "chat",
        "organization": "Meta",
        "context_length": 131072,
    },
    {"id": "Salesforce/Llama-Rank-V1", "object": "model", "type": "rerank"},
]
OPENAI_MODELS = {
    "object": "list",
    "data": [
        {"id": "text-embedding-3-small", "object": "model", "created": 1, "owned_by": "system"},
        {"id": "gpt-4o-mini", "object": "model", "created": 2, "owned_by": "system"},
    ],
}


def serving(doc: Any) -> Any:
    async def handler(request: web.Request) -> web.Response:
        return json_response(200, doc)

    return handler


async def test_together_shape_lists_embedding_models_by_default(make_app: Any) -> None:
    app: App = await make_app({("GET", "/v1/models"): serving(TOGETHER_MODELS)})
    async with togembed.AsyncClient(base_url=app.base_url, api_key="sk-key-0123456789") as c:
        models = await c.models.list()
        everything = await c.models.list(all=True)
    assert models.types_known
    assert models.ids == ["intfloat/multilingual-e5-large-instruct"]
    (e5,) = models
    assert isinstance(e5, togembed.Model)
    assert (e5.type, e5.context_length, e5.owned_by, e5.created) == (
        "embedding",
        514,
        "intfloat",
        1700000000,
    )
    assert e5.raw["pricing"] == {"input": 0.02, "output": 0.0}
    assert everything.ids == [m["id"] for m in TOGETHER_MODELS]
    assert [m.type for m in everything] == ["embedding", "chat", "rerank"]
    assert app.seen[0].method == "GET" and app.seen[0].path == "/v1/models"
    assert app.seen[0].headers["Authorization"] == "Bearer sk-key-0123456789"


async def test_openai_shape_without_types_lists_everything_and_says_so(make_app: Any) -> None:
    app = await make_app({("GET", "/v1/models"): serving(OPENAI_MODELS)})
    async with togembed.AsyncClient(base_url=app.base_url) as c:
        models = await c.models.list()
    assert not models.types_known
    assert models.ids == ["text-embedding-3-small", "gpt-4o-mini"]
    assert [m.type for m in models] == [None, None]
    assert models[0].owned_by == "system" and len(models) == 2
    assert models.data[1].to_dict() == {
        "id": "gpt-4o-mini",
        "object": "model",
        "created": 2,
        "owned_by": "system",
    }


async def test_togembed_serve_shape() -> None:
    server = EmbeddingServer(StandInModel(), aliases=("my-alias",), shutdown_timeout=2.0)
    base_url = await server.start()
    try:
        async with togembed.AsyncClient(base_url=base_url) as c:
            models = await c.models.list()
    finally:
        await server.close()
    assert models.types_known
    assert models.ids == ["test/stand-in-mini", "my-alias"]
    assert {m.type for m in models} == {"embedding"}


async def test_fake_server_shape(make_server: Any) -> None:
    server: FakeTogetherServer = await make_server(models=["a/b", "c/d"])
    async with togembed.AsyncClient(base_url=server.base_url) as c:
        assert (await c.models.list()).ids == ["a/b", "c/d"]


async def test_models_list_is_retried_and_typed_like_embeddings(make_app: Any) -> None:
    async def flaky(request: web.Request) -> web.Response:
        if len(app.seen) == 1:
            return web.Response(status=502, text="<title>502 Bad Gateway</title>")
        if len(app.seen) == 2:
            return web.Response(status=200, text="not json")
        return json_response(200, TOGETHER_MODELS)

    app = await make_app({("GET", "/v1/models"): flaky})
    async with togembed.AsyncClient(base_url=app.base_url) as c:
        models = await c.models.list()
    assert models.ids == ["intfloat/multilingual-e5-large-instruct"]
    assert app.requests == 3


@pytest.mark.parametrize(
    ("status", "cls"),
    [(401, togembed.AuthenticationError), (404, togembed.NotFoundError)],
)
async def test_models_list_errors_are_typed_and_not_retried(
    make_app: Any, status: int, cls: type[Exception]
) -> None:
    key = "sk-echoed-key-0123456789"

    async def refuse(request: web.Request) -> web.Response:
        return error(status, f"no models for key {key}")

    app = await make_app({("GET", "/v1/models"): refuse})
    async with togembed.AsyncClient(base_url=app.base_url, api_key=key) as c:
        with pytest.raises(cls) as info:
            await c.models.list()
    assert app.requests == 1
    assert not isinstance(info.value, togembed.ModelNotAvailableError)  # no model was named
    assert key not in str(info.value) and key not in repr(info.value.body)


async def test_models_list_needs_a_key_for_a_remote_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    async with togembed.AsyncClient(base_url="https://api.together.example/v1") as c:
        with pytest.raises(togembed.MissingAPIKeyError):
            await c.models.list()
        assert c._transport._session is None  # type: ignore[attr-defined]  # nothing was sent


async def test_models_list_with_a_transport_without_get_says_so() -> None:
    class PostOnly:
        async def post(self, *args: Any) -> Any:
            raise AssertionError

        async def aclose(self) -> None:
            pass

    async with togembed.AsyncClient(base_url="http://127.0.0.1:9/v1", transport=PostOnly()) as c:
        with pytest.raises(TypeError, match="get"):
            await c.models.list()


@pytest.mark.parametrize(
    "body",
    [b"{}", b'{"data": [{"object": "model"}]}', b'[{"id": ""}]', b"[1, 2]"],
)
async def test_malformed_models_lists_are_validation_errors(make_app: Any, body: bytes) -> None:
    async def bad(request: web.Request) -> web.Response:
        return web.Response(status=200, body=body, content_type="application/json")

    app = await make_app({("GET", "/v1/models"): bad})
    async with togembed.AsyncClient(base_url=app.base_url, max_retries=1) as c:
        with pytest.raises(togembed.APIResponseValidationError):
            await c.models.list()
    assert app.requests == 2


# ---------------------------------------------------------------------------------------------
# The sync client and the command


@pytest.fixture
def threaded_server() -> Iterator[FakeTogetherServer]:
    with serve_in_thread(dim=8, models=["x/embed-a", "x/embed-b"]) as s:
        yield s


def test_sync_client_models_list(threaded_server: FakeTogetherServer) -> None:
    with togembed.Client(base_url=threaded_server.base_url) as c:
        assert c.models.list().ids == ["x/embed-a", "x/embed-b"]


def models_cli(*args: str, env: dict[str, str | None] | None = None) -> Any:
    env = {"TOGETHER_API_KEY": None, "TOGETHER_BASE_URL": None, **(env or {})}
    return CliRunner().invoke(cli_module.cli, ["models", *args], env=env, catch_exceptions=False)


def test_models_command_lists_the_servers_embedding_models(
    threaded_server: FakeTogetherServer,
) -> None:
    result = models_cli("--base-url", threaded_server.base_url)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"2 embedding models at {threaded_server.base_url}"
    assert lines[1].split() == ["x/embed-a", "embedding"]
    assert lines[2].split() == ["x/embed-b", "embedding"]


def test_models_command_with_a_server_that_gives_no_types() -> None:
    with app_in_thread({("GET", "/v1/models"): serving(OPENAI_MODELS)}) as app:
        result = models_cli("--base-url", app.base_url)
        everything = models_cli("--base-url", app.base_url, "--all")
    assert result.exit_code == 0, result.output
    assert "the server does not say which embed" in result.stdout
    assert "text-embedding-3-small  type unknown" in result.stdout
    assert "gpt-4o-mini" in result.stdout
    assert everything.stdout.startswith("2 models (the server does not say")


def test_models_command_on_together_without_embedding_models_points_to_dedicated_endpoints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What Together's serverless API lists after 2026 (chat models only): the command says
    where embeddings went. The URL is a loopback stand-in, so the hint is shown by content."""
    chat_only = [m for m in TOGETHER_MODELS if m["type"] != "embedding"]
    with app_in_thread({("GET", "/v1/models"): serving(chat_only)}) as app:
        monkeypatch.setattr(models_module, "_is_together", lambda url: True)
        result = models_cli("--base-url", app.base_url)
        everything = models_cli("--base-url", app.base_url, "--all")
    assert result.exit_code == 0
    assert result.stdout.startswith("0 embedding models at")
    assert "https://api-inference.together.ai/v1" in result.stdout
    assert "meta-llama/Llama-3.3-70B-Instruct-Turbo" in everything.stdout


def test_models_command_exit_codes(threaded_server: FakeTogetherServer) -> None:
    no_key = models_cli("--base-url", "https://api.together.example/v1")
    assert no_key.exit_code == 2 and "no API key" in no_key.stderr
    bad_url = models_cli("--base-url", "127.0.0.1:8765/v1")
    assert bad_url.exit_code == 2 and "malformed" in bad_url.stderr
    assert "http://127.0.0.1:8765/v1" in bad_url.stderr
    threaded_server.api_key = "sk-right-0123456789"
    wrong_key = models_cli(
        "--base-url", threaded_server.base_url, env={"TOGETHER_API_KEY": "sk-wrong-0123456789"}
    )
    assert wrong_key.exit_code == 1
    assert "error: HTTP 401" in wrong_key.stderr and "Traceback" not in wrong_key.stderr
