"""Responses serialise like openai-python's / together's pydantic models (issue 14 §3).

The expected texts below were produced by openai-python 3.57.0 (pydantic 2.14) from the same
response (``CreateEmbeddingResponse.model_validate(DOC)``); the last test compares live when
openai is installed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers import MakeServer

import togembed
from togembed import Embedding, EmbeddingResponse, Usage

DOC: dict[str, Any] = {
    "object": "list",
    "model": "m",
    "data": [
        {"object": "embedding", "index": 0, "embedding": [0.5, 1.0]},
        {"object": "embedding", "index": 1, "embedding": [0.25, -2.0]},
    ],
    "usage": {"prompt_tokens": 3, "total_tokens": 3},
}
DUMP = {
    "data": [
        {"embedding": [0.5, 1.0], "index": 0, "object": "embedding"},
        {"embedding": [0.25, -2.0], "index": 1, "object": "embedding"},
    ],
    "model": "m",
    "object": "list",
    "usage": {"prompt_tokens": 3, "total_tokens": 3},
}
COMPACT = (
    '{"data":[{"embedding":[0.5,1.0],"index":0,"object":"embedding"},{"embedding":[0.25,-2.0],'
    '"index":1,"object":"embedding"}],"model":"m","object":"list","usage":{"prompt_tokens":3,'
    '"total_tokens":3}}'
)


def response(usage: bool = True) -> EmbeddingResponse:
    return EmbeddingResponse(
        data=[Embedding([0.5, 1.0], 0), Embedding([0.25, -2.0], 1)],
        model="m",
        usage=Usage(prompt_tokens=3, total_tokens=3) if usage else None,
    )


def test_model_dump_and_to_dict_give_the_peers_dict() -> None:
    r = response()
    assert r.model_dump() == DUMP
    assert r.model_dump(mode="json") == DUMP
    assert r.to_dict() == DUMP
    assert list(r.model_dump()) == ["data", "model", "object", "usage"]  # the peers' order


def test_json_forms_are_the_peers_text() -> None:
    r = response()
    assert r.model_dump_json() == COMPACT
    assert r.to_json(indent=None) == COMPACT
    assert r.to_json() == json.dumps(DUMP, indent=2)  # to_json indents by 2, like openai's
    assert r.model_dump_json(indent=2) == r.to_json()
    assert r.model_dump_json(indent=4) == json.dumps(DUMP, indent=4)


def test_dict_of_a_response_is_its_fields_one_level_deep() -> None:
    r = response()
    d = dict(r)
    assert list(d) == ["data", "model", "object", "usage"]
    assert d["data"] is r.data and d["usage"] is r.usage  # as pydantic's __iter__
    assert dict(r.data[1]) == {"embedding": [0.25, -2.0], "index": 1, "object": "embedding"}
    assert dict(r.usage) == {"prompt_tokens": 3, "total_tokens": 3}  # type: ignore[arg-type]


def test_embedding_and_usage_serialise_on_their_own() -> None:
    r = response()
    assert r.data[0].to_dict() == {"embedding": [0.5, 1.0], "index": 0, "object": "embedding"}
    assert r.data[0].model_dump_json() == '{"embedding":[0.5,1.0],"index":0,"object":"embedding"}'
    assert r.usage is not None
    assert r.usage.model_dump_json() == '{"prompt_tokens":3,"total_tokens":3}'
    assert r.usage.to_json(indent=None) == '{"prompt_tokens":3,"total_tokens":3}'


def test_a_missing_usage_is_unset_as_in_the_peers() -> None:
    r = response(usage=False)
    assert "usage" not in r.to_dict()  # to_dict: exclude_unset=True by default
    assert r.model_dump()["usage"] is None  # model_dump: everything
    assert "usage" not in r.model_dump(exclude_none=True)
    assert "usage" not in r.model_dump(exclude_defaults=True)
    assert r.model_dump(exclude_defaults=True)["object"] == "list"  # a required field there
    assert r.to_dict(exclude_unset=False)["usage"] is None


def test_include_and_exclude_take_sets_and_nested_dicts() -> None:
    r = response()
    assert r.model_dump(exclude={"usage"}) == {k: v for k, v in DUMP.items() if k != "usage"}
    assert r.model_dump(include={"model", "usage"}) == {"model": "m", "usage": DUMP["usage"]}
    assert r.model_dump(exclude={"data": {"__all__": {"embedding"}}})["data"] == [
        {"index": 0, "object": "embedding"},
        {"index": 1, "object": "embedding"},
    ]
    assert r.model_dump(include={"data": {0: True}, "model": True}) == {
        "data": [DUMP["data"][0]],
        "model": "m",
    }


def test_dumps_are_copies() -> None:
    r = response()
    dumped = r.model_dump()
    dumped["data"][0]["embedding"].append(9.0)
    assert r.data[0].embedding == [0.5, 1.0]


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        response().model_dump(mode="yaml")


async def test_a_real_create_response_round_trips_through_json(make_server: MakeServer) -> None:
    server = await make_server(dim=4)
    async with togembed.AsyncClient(base_url=server.base_url, model="m") as client:
        resp = await client.embeddings.create(input=["a", "b", "c"])
    doc = json.loads(resp.model_dump_json())
    assert doc["object"] == "list" and [d["index"] for d in doc["data"]] == [0, 1, 2]
    assert [d["embedding"] for d in doc["data"]] == [d.embedding for d in resp.data]
    assert doc["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert json.loads(resp.to_json()) == resp.to_dict() == doc


def test_same_output_as_openai_python_when_installed() -> None:
    openai_types = pytest.importorskip("openai.types")
    theirs = openai_types.CreateEmbeddingResponse.model_validate(DOC)
    ours = response()
    assert ours.model_dump() == theirs.model_dump()
    assert ours.model_dump_json() == theirs.model_dump_json()
    assert ours.to_dict() == theirs.to_dict()
    assert ours.to_json() == theirs.to_json()
    assert list(dict(ours)) == list(dict(theirs))
    excluded = {"data": {"__all__": {"embedding"}}}
    assert ours.model_dump(exclude=excluded) == theirs.model_dump(exclude=excluded)
    assert ours.model_dump(exclude_defaults=True) == theirs.model_dump(exclude_defaults=True)
