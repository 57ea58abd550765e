"""The servers' shared protocol (togembed.server.protocol): validation with Together's wording,
error bodies, and rendered bodies that the client's own decoder reads back exactly. Pure: no
event loop, no sockets."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

import togembed
from togembed.core.answers import decode_embeddings
from togembed.core.status_errors import error_from_response
from togembed.server.protocol import (
    NOT_JSON,
    Parsed,
    RequestError,
    authorized,
    check_count,
    error_body,
    list_tail,
    load_body,
    model_entry,
    model_list,
    model_not_available,
    parse_request,
    render_response,
    render_rows,
)


def refusal(body: Any, encoding_mode: str = "honour") -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_request(body, encoding_mode)  # type: ignore[arg-type]
    return info.value


# ---------------------------------------------------------------------------------------------
# Requests


def test_a_valid_request_is_parsed() -> None:
    assert parse_request({"model": "m", "input": "hi"}) == Parsed("m", ["hi"], "float")
    assert parse_request({"model": "m", "input": ["a", "b"], "encoding_format": None}) == Parsed(
        "m", ["a", "b"], "float"
    )
    got = parse_request({"model": "m", "input": ["a"], "encoding_format": "base64"})
    assert got.encoding == "base64"


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        (NOT_JSON, "Request body is not valid JSON", None),
        ([1], "Request body must be a JSON object", None),
        (
            {"model": "m", "input": "x", "user": "u", "dimensions": 3},
            "Unrecognized request arguments supplied: dimensions, user",
            None,
        ),
        ({"input": "x"}, "'model' is required and must be a non-empty string", "model"),
        (
            {"model": "", "input": "x"},
            "'model' is required and must be a non-empty string",
            "model",
        ),
        ({"model": "m"}, "'input' is required", "input"),
        ({"model": "m", "input": 5}, "'input' must be a string or a list of strings", "input"),
        ({"model": "m", "input": []}, "'input' must not be an empty list", "input"),
        ({"model": "m", "input": ["a", 3]}, "'input[1]' must be a string, got int", "input"),
        (
            {"model": "m", "input": "x", "encoding_format": "int8"},
            "'encoding_format' must be 'float' or 'base64', got 'int8'",
            "encoding_format",
        ),
    ],
)
def test_invalid_requests_get_togethers_wording(body: Any, message: str, param: str | None) -> None:
    exc = refusal(body)
    assert (exc.status, exc.message, exc.type, exc.param, exc.code) == (
        400,
        message,
        "invalid_request_error",
        param,
        None,
    )


def test_checks_come_in_togethers_order() -> None:
    # Unknown arguments before a missing model, a missing model before a bad input.
    assert "Unrecognized" in refusal({"input": 5, "user": "u"}).message
    assert refusal({"input": 5}).param == "model"


def test_encoding_modes() -> None:
    body = {"model": "m", "input": "x", "encoding_format": "base64"}
    assert parse_request(body, "float").encoding == "float"  # older servers: always floats
    assert parse_request({**body, "encoding_format": "int8"}, "float").encoding == "float"
    exc = refusal(body, "reject")
    assert exc.message == "Unrecognized request arguments supplied: encoding_format"


def test_load_body() -> None:
    assert load_body(b'{"a": 1}') == {"a": 1}
    assert load_body(b"not json") is NOT_JSON
    assert load_body(b"") is NOT_JSON


def test_too_many_inputs() -> None:
    check_count(["a"] * 3, 3)
    check_count(["a"] * 5000, None)
    with pytest.raises(RequestError) as info:
        check_count(["a"] * 4, 3, status=422)
    exc = info.value
    assert (exc.status, exc.message, exc.param) == (
        422,
        "Too many inputs: got 4, the maximum is 3",
        "input",
    )


def test_unknown_model_is_togethers_404() -> None:
    exc = model_not_available("x/y")
    assert (exc.status, exc.code) == (404, "model_not_available")
    assert exc.message.startswith("Unable to access model x/y.")


@pytest.mark.parametrize(
    ("header", "key", "ok"),
    [
        ("", None, True),
        ("Bearer anything", "", True),  # "" (an unset variable) means no key
        ("Bearer k", "k", True),
        ("bearer  k ", "k", True),
        ("Bearer wrong", "k", False),
        ("Basic k", "k", False),
        ("", "k", False),
    ],
)
def test_authorized(header: str, key: str | None, ok: bool) -> None:
    assert authorized(header, key) is ok


# ---------------------------------------------------------------------------------------------
# Errors


def test_error_body_is_togethers_shape_and_the_client_maps_it() -> None:
    body = error_body("Too many inputs", param="input")
    assert orjson.loads(body) == {
        "error": {
            "message": "Too many inputs",
            "type": "invalid_request_error",
            "param": "input",
            "code": None,
        }
    }
    exc = RequestError(401, "Invalid API key provided", code="invalid_api_key")
    assert orjson.loads(exc.body())["error"]["code"] == "invalid_api_key"
    err = error_from_response(exc.status, {}, exc.body())
    assert isinstance(err, togembed.AuthenticationError)
    assert "Invalid API key provided" in str(err)


# ---------------------------------------------------------------------------------------------
# Responses


def vectors(n: int, dim: int) -> np.ndarray:
    return np.random.default_rng(n * 1000 + dim).standard_normal((n, dim)).astype(np.float32)


@pytest.mark.parametrize("encoding", ["float", "base64"])
@pytest.mark.parametrize("tokens", [None, 42])
def test_rendered_body_decodes_to_the_exact_rows(encoding: str, tokens: int | None) -> None:
    rows = vectors(5, 7)
    body = render_response("some/model", rows, tokens, encoding)
    doc = orjson.loads(body)
    assert [d["index"] for d in doc["data"]] == [0, 1, 2, 3, 4]
    assert all(d["object"] == "embedding" for d in doc["data"])
    assert doc["object"] == "list" and doc["model"] == "some/model"
    decoded = decode_embeddings(body, 5, dim=7)
    assert decoded.is_base64 is (encoding == "base64")
    out = np.empty((5, 7), dtype=np.float32)
    decoded.write_into(out)
    np.testing.assert_array_equal(out, rows)  # bit for bit, float text included
    if tokens is None:
        assert "usage" not in doc and decoded.usage is None
    else:
        assert doc["usage"] == {"prompt_tokens": 42, "total_tokens": 42}


@pytest.mark.parametrize("b64", [False, True])
def test_slices_concatenate_into_the_whole_body(b64: bool) -> None:
    rows = vectors(10, 3)
    pieces = [render_rows(rows, start, start + 4, b64) for start in range(0, 10, 4)]
    whole = b"".join(pieces) + list_tail("m", 3)
    assert whole == render_response("m", rows, 3, "base64" if b64 else "float")
    assert pieces[0].startswith(b'{"object":"list","data":[') and pieces[1].startswith(b",")


def test_model_entries() -> None:
    assert model_entry("m") == {"id": "m", "object": "model", "type": "embedding"}
    assert model_entry("m", dimension=8)["dimension"] == 8
    assert model_list([model_entry("m")]) == {"object": "list", "data": [model_entry("m")]}
