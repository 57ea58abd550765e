"""The wire protocol without I/O: request bodies (``protocol``), decoding and validating answers
(``answers``), refusals mapped to errors and retry hints (``status_errors``)."""

from __future__ import annotations

import base64
import email.utils

import numpy as np
import orjson
import pytest
from multidict import CIMultiDict

import togembed
from togembed.core import answers
from togembed.core.answers import decode_embeddings
from togembed.core.protocol import encode_request, redact
from togembed.core.status_errors import error_from_response, parse_retry_after, rejected_arguments


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


@pytest.fixture(params=["simdjson", "orjson"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Float answers are decoded by simdjson where it is installed, else by orjson: both
    paths must give the same rows and the same verdicts."""
    if request.param == "simdjson" and answers.simdjson is None:
        pytest.skip("pysimdjson is not installed")
    if request.param == "orjson":
        monkeypatch.setattr(answers, "simdjson", None)
    return str(request.param)


def test_request_body_omits_encoding_when_none() -> None:
    assert orjson.loads(encode_request("m", ["a"], None)) == {"model": "m", "input": ["a"]}
    assert orjson.loads(encode_request("m", ("a", "b"), "base64"))["encoding_format"] == "base64"


@pytest.mark.usefixtures("decoder")
@pytest.mark.parametrize("b64", [False, True])
def test_decode_places_shuffled_items_by_index(b64: bool) -> None:
    d = decode_embeddings(body(ROWS, b64=b64, order=[2, 0, 1]), 3)
    out = np.empty((3, 3), dtype=np.float32)
    d.write_into(out)
    assert np.array_equal(out, np.array(ROWS, dtype=np.float32))
    assert d.dim == 3 and d.is_base64 is b64 and d.model == "m"


@pytest.mark.usefixtures("decoder")
def test_decode_reads_optional_usage() -> None:
    assert decode_embeddings(body(ROWS), 3).usage is None
    u = decode_embeddings(body(ROWS, usage={"prompt_tokens": 7, "total_tokens": 7}), 3).usage
    assert u == togembed.Usage(prompt_tokens=7, total_tokens=7)


@pytest.mark.usefixtures("decoder")
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
@pytest.mark.usefixtures("decoder")
def test_decode_rejects_malformed_answers(raw: bytes, expected: int, match: str) -> None:
    with pytest.raises(togembed.APIResponseValidationError, match=match):
        decode_embeddings(raw, expected)


@pytest.mark.usefixtures("decoder")
def test_decode_checks_dimension_against_earlier_batches() -> None:
    with pytest.raises(togembed.APIResponseValidationError, match="expected 4"):
        decode_embeddings(body(ROWS), 3, dim=4)


def test_both_float_decoders_give_the_same_float32_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """simdjson parses the text to doubles and casts, as orjson + numpy do: bit for bit the
    same float32 rows, whatever the text (long decimals, ints, exponents, subnormals, values
    that round to infinity in float32)."""
    if answers.simdjson is None:
        pytest.skip("pysimdjson is not installed")
    rng = np.random.default_rng(3)
    texts = [[repr(v) for v in row] for row in rng.standard_normal((8, 64)).tolist()]
    texts[0][:7] = ["0", "1", "-3", "1e-45", "3.4028235e38", "1e39", "-0.0"]
    texts[1][:4] = ["0.1234567890123456789", "-2.5e-310", "1.5E+2", "12345678901234567890"]
    items = [
        b'{"object":"embedding","index":%d,"embedding":[%s]}' % (i, ",".join(texts[i]).encode())
        for i in (3, 1, 0, 2, 7, 6, 5, 4)
    ]
    raw = b'{"object":"list","model":"m","data":[%s],"usage":{"prompt_tokens":9}}' % (
        b",".join(items)
    )
    fast = decode_embeddings(raw, 8)
    assert isinstance(fast.rows, np.ndarray)  # the simdjson path was taken
    monkeypatch.setattr(answers, "simdjson", None)
    slow = decode_embeddings(raw, 8)
    a, b = np.empty((8, 64), np.float32), np.empty((8, 64), np.float32)
    fast.write_into(a)
    slow.write_into(b)
    assert a.tobytes() == b.tobytes()
    assert (fast.usage, fast.model, fast.dim) == (slow.usage, slow.model, slow.dim)
    # ``create`` gives the server's numbers as doubles either way (an int as its double)
    fast_lists = [e.embedding for e in fast.to_embeddings(0, keep_base64=False)]
    slow_lists = [e.embedding for e in slow.to_embeddings(0, keep_base64=False)]
    assert np.array(fast_lists).tobytes() == np.array(slow_lists, dtype=np.float64).tobytes()


def test_an_answer_simdjson_cannot_read_is_decoded_by_orjson() -> None:
    """An integer beyond 64 bits is valid JSON that simdjson refuses: the answer is not lost."""
    raw = b'{"data":[{"index":0,"embedding":[1.5,12345678901234567890123]}]}'
    out = np.empty((1, 2), np.float32)
    decode_embeddings(raw, 1).write_into(out)
    assert out.tolist() == [[1.5, np.float32(12345678901234567890123.0)]]


@pytest.mark.usefixtures("decoder")
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


# ---------------------------------------------------------------------------------------------
# Request arguments, model availability, redaction, refused arguments


def test_request_body_carries_extra_arguments_which_win() -> None:
    body = orjson.loads(
        encode_request("m", ["a"], "base64", {"dimensions": 8, "user": "u", "model": "x"})
    )
    assert body == {
        "model": "x",
        "input": ["a"],
        "encoding_format": "base64",
        "dimensions": 8,
        "user": "u",
    }


def _err(status: int, **error: object) -> togembed.APIStatusError:
    return error_from_response(status, CIMultiDict(), orjson.dumps({"error": error}))


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (503, {"message": "Model X is not available", "code": "model_not_available"}),
        (400, {"message": "Unable to access non-serverless model X. Please visit ..."}),
        (404, {"message": "Unable to access model X.", "code": "model_not_available"}),
        (404, {"message": "The model `x` does not exist."}),  # vLLM, OpenAI
        (404, {"message": "not found", "param": "model"}),
        (400, {"message": "bad", "code": "model_not_found"}),
    ],
)
def test_model_not_available_in_its_forms(status: int, error: dict) -> None:
    exc = _err(status, **error)
    assert type(exc) is togembed.ModelNotAvailableError
    assert exc.status_code == status
    assert exc.message == f"HTTP {status}: {error['message']}"
    assert str(exc).startswith(exc.message) and "dedicated endpoint" in str(exc)


@pytest.mark.parametrize(
    ("status", "error", "cls"),
    [
        (503, {"message": "The server is overloaded", "type": "service_unavailable"}, None),
        (404, {"message": "Not found: POST /v2/embeddings"}, togembed.NotFoundError),
        (404, {"message": "Not found: GET /v1/models"}, togembed.NotFoundError),
        (400, {"message": "Input validation error: input 3 is too long"}, None),
    ],
)
def test_other_errors_are_not_model_not_available(
    status: int, error: dict, cls: type | None
) -> None:
    exc = _err(status, **error)
    assert not isinstance(exc, togembed.ModelNotAvailableError)
    if cls is not None:
        assert type(exc) is cls


def test_a_request_without_a_model_gives_no_model_error() -> None:
    raw = orjson.dumps({"error": {"message": "x", "code": "model_not_available"}})
    exc = error_from_response(404, CIMultiDict(), raw, about_model=False)
    assert type(exc) is togembed.NotFoundError


def test_secrets_are_redacted_from_message_body_and_fields() -> None:
    key = "sk-0123456789abcdef"
    raw = orjson.dumps(
        {
            "error": {
                "message": f"bad key Bearer {key}",
                "type": f"t {key}",
                "param": key,
                "code": key,
            },
            "echo": [key, {key: key}],
        }
    )
    exc = error_from_response(400, CIMultiDict(), raw, secrets=(key,))
    assert exc.message == "HTTP 400: bad key Bearer [REDACTED]"
    assert (exc.error_type, exc.param, exc.code) == ("t [REDACTED]", "[REDACTED]", "[REDACTED]")
    assert exc.body["echo"] == ["[REDACTED]", {"[REDACTED]": "[REDACTED]"}]
    html = error_from_response(
        502, CIMultiDict(), f"<title>no {key}</title>".encode(), secrets=(key,)
    )
    assert key not in html.message and key not in repr(html.body)


def test_redact_leaves_other_values_alone() -> None:
    assert redact({"a": 1, "b": None, "c": [1.5, True]}, ("secret-key",)) == {
        "a": 1,
        "b": None,
        "c": [1.5, True],
    }
    assert redact(b"x secret-key y", ("secret-key",)) == b"x [REDACTED] y"
    assert redact("untouched", ()) == "untouched"


def test_a_200_with_an_error_keeps_the_servers_words() -> None:
    raw = orjson.dumps({"error": {"message": "upstream failed", "type": "api_error", "code": 7}})
    with pytest.raises(togembed.APIResponseValidationError) as info:
        decode_embeddings(raw, 1, secrets=("never-shown",))
    assert info.value.message == "HTTP 200 with an error instead of embeddings: upstream failed"
    assert (info.value.error_type, info.value.code) == ("api_error", "7")
    with pytest.raises(togembed.APIResponseValidationError, match="instead of embeddings: busy"):
        decode_embeddings(b'{"error": "busy"}', 1)


@pytest.mark.parametrize(
    ("message", "names"),
    [
        (
            "HTTP 400: Unrecognized request arguments supplied: dimensions, user",
            {"dimensions", "user"},
        ),
        ("HTTP 400: Unrecognized request argument supplied: user", {"user"}),
        ("unrecognized request arguments", set()),
        ("Failed to deserialize the JSON body: unknown field `user`, expected", {"user"}),
        ("HTTP 400: Too many inputs", None),
    ],
)
def test_rejected_arguments_are_read_from_the_message(message: str, names: set | None) -> None:
    found = rejected_arguments(message)
    assert (set(found) if found is not None else None) == names
