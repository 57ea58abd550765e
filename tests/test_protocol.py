"""Protocol: request bodies, decoding and validating answers, error mapping, retry hints."""

from __future__ import annotations

import base64
import email.utils

import numpy as np
import orjson
import pytest
from multidict import CIMultiDict

import togembed
from togembed._protocol import (
    decode_embeddings,
    encode_request,
    error_from_response,
    parse_retry_after,
)


def body(rows: list, *, b64: bool = False, order: list[int] | None = None, **extra) -> bytes:
    order = order if order is not None else list(range(len(rows)))
    data = []
    for i in order:
        emb = (
            base64.b64encode(np.asarray(rows[i], dtype="<f4").tobytes()).decode()
            if b64
            else rows[i]
        )
        data.append({"object": "embedding", "embedding": emb, "index": i})
    return orjson.dumps({"object": "list", "model": "m", "data": data, **extra})


ROWS = [[0.5, 1.0, -2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.25]]


def test_request_body_omits_encoding_when_none() -> None:
    assert orjson.loads(encode_request("m", ["a"], None)) == {"model": "m", "input": ["a"]}
    assert orjson.loads(encode_request("m", ("a", "b"), "base64"))["encoding_format"] == "base64"


@pytest.mark.parametrize("b64", [False, True])
def test_decode_places_shuffled_items_by_index(b64: bool) -> None:
    d = decode_embeddings(body(ROWS, b64=b64, order=[2, 0, 1]), 3)
    out = np.empty((3, 3), dtype=np.float32)
    d.write_into(out)
    assert np.array_equal(out, np.array(ROWS, dtype=np.float32))
    assert d.dim == 3 and d.is_base64 is b64 and d.model == "m"


def test_decode_reads_optional_usage() -> None:
    assert decode_embeddings(body(ROWS), 3).usage is None
    u = decode_embeddings(body(ROWS, usage={"prompt_tokens": 7, "total_tokens": 7}), 3).usage
    assert u == togembed.Usage(prompt_tokens=7, total_tokens=7)


def test_to_embeddings_converts_between_formats() -> None:
    d = decode_embeddings(body(ROWS, b64=True), 3)
    lists = d.to_embeddings(10, keep_base64=False)
    assert [e.index for e in lists] == [10, 11, 12] and lists[2].embedding == ROWS[2]
    f = decode_embeddings(body(ROWS), 3).to_embeddings(0, keep_base64=True)
    assert np.frombuffer(base64.b64decode(f[1].embedding), "<f4").tolist() == ROWS[1]


@pytest.mark.parametrize(
    ("raw", "expected", "match"),
    [
        (b'{"data": [', 3, "not valid JSON"),
        (b"<html>oops</html>", 3, "not valid JSON"),
        (b'{"object": "list"}', 3, "no 'data'"),
        (body(ROWS[:2]), 3, "expected 3 embeddings, got 2"),
        (body(ROWS, order=[0, 1, 1]), 3, "appears twice"),
        (body([[1.0, 2.0, 3.0], [1.0, 2.0], [1.0, 2.0, 3.0]]), 3, "dimension"),
        (orjson.dumps({"data": [{"embedding": [1.0], "index": 5}]}), 1, "out of range"),
        (orjson.dumps({"data": [{"embedding": [1.0], "index": "0"}]}), 1, "out of range"),
        (orjson.dumps({"data": [{"index": 0}]}), 1, "lacks"),
        (orjson.dumps({"data": [{"embedding": 3, "index": 0}]}), 1, "neither"),
        (orjson.dumps({"data": [{"embedding": "abc", "index": 0}]}), 1, "dimension"),
    ],
)
def test_decode_rejects_malformed_answers(raw: bytes, expected: int, match: str) -> None:
    with pytest.raises(togembed.APIResponseValidationError, match=match):
        decode_embeddings(raw, expected)


def test_decode_checks_dimension_against_earlier_batches() -> None:
    with pytest.raises(togembed.APIResponseValidationError, match="expected 4"):
        decode_embeddings(body(ROWS), 3, dim=4)


def test_non_numeric_values_are_a_validation_error() -> None:
    d = decode_embeddings(orjson.dumps({"data": [{"embedding": ["a", "b"], "index": 0}]}), 1)
    with pytest.raises(togembed.APIResponseValidationError):
        d.write_into(np.empty((1, 2), dtype=np.float32))


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, togembed.BadRequestError),
        (401, togembed.AuthenticationError),
        (403, togembed.PermissionDeniedError),
        (404, togembed.NotFoundError),
        (422, togembed.UnprocessableEntityError),
        (429, togembed.RateLimitError),
        (500, togembed.InternalServerError),
        (503, togembed.InternalServerError),
        (529, togembed.InternalServerError),
        (402, togembed.APIStatusError),
        (409, togembed.APIStatusError),
    ],
)
def test_status_maps_to_exception_class(status: int, cls: type) -> None:
    err = error_from_response(status, CIMultiDict(), b"")
    assert type(err) is cls and err.status_code == status


def test_error_carries_together_message_type_and_request_id() -> None:
    raw = orjson.dumps(
        {
            "error": {
                "message": "Model x not found",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_available",
            }
        }
    )
    err = error_from_response(404, CIMultiDict({"x-request-id": "abc"}), raw)
    assert isinstance(err, togembed.NotFoundError)
    assert err.message == "HTTP 404: Model x not found"
    assert (err.request_id, err.error_type, err.param, err.code) == (
        "abc",
        "invalid_request_error",
        "model",
        "model_not_available",
    )
    assert "abc" in str(err) and err.body["error"]["code"] == "model_not_available"


def test_html_error_page_becomes_a_short_message() -> None:
    page = b"<html><head><title>502 Bad Gateway</title></head><body>" + b"x" * 5000 + b"</body>"
    err = error_from_response(502, CIMultiDict(), page)
    assert err.message == "HTTP 502: 502 Bad Gateway"


def test_retry_after_forms() -> None:
    now = 1_700_000_000.0
    h = CIMultiDict
    assert parse_retry_after(h({"Retry-After": "2"}), now=now) == 2.0
    assert parse_retry_after(h({"retry-after-ms": "250"}), now=now) == 0.25
    assert parse_retry_after(h({"Retry-After": "5", "retry-after-ms": "100"}), now=now) == 0.1
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(h({"Retry-After": date}), now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after(h({"Retry-After": email.utils.formatdate(now - 30)}), now=now) == 0
    assert parse_retry_after(h({"x-ratelimit-reset": "1m30s"}), now=now) == 90.0
    assert parse_retry_after(h({"x-ratelimit-reset": "250ms"}), now=now) == 0.25
    assert parse_retry_after(h({"x-ratelimit-reset": str(now + 3)}), now=now) == 3.0
    assert parse_retry_after(h({"Retry-After": "soon"}), now=now) is None
    assert parse_retry_after(h({}), now=now) is None


def test_ratelimit_reset_only_counts_on_429() -> None:
    headers = CIMultiDict({"x-ratelimit-reset": "7"})
    assert error_from_response(429, headers, b"").retry_after == 7.0
    assert error_from_response(503, headers, b"").retry_after is None
