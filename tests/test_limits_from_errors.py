"""Limits read from error messages: every real wording found (sources in docs/backends.md)."""

from __future__ import annotations

import pytest

from togembed.core.stated_limits import (
    MAX_INPUT_CHARS,
    MAX_INPUT_TOKENS,
    MAX_INPUTS,
    MAX_REQUEST_TOKENS,
    TOKEN_BUDGET_SAFETY,
    UNSTATED_TOKEN_RATIO,
    StatedLimit,
    limit_from_message,
    request_token_budget,
)
from togembed.core.status_errors import error_from_response

# (message as the server sends it, kind, limit, the refused amount where the message says it)
REAL_WORDINGS = [
    # TEI >= 1.9, /v1/embeddings and /embed (router/src/http/server.rs)
    ("batch size 60 > maximum allowed batch size 32", MAX_INPUTS, 32, 60),
    # SiliconFlow's gateway, same wording
    ("input batch size 473 > maximum allowed batch size 64", MAX_INPUTS, 64, 473),
    # TEI (core/src/lib.rs + core/src/tokenization.rs)
    (
        "Input validation error: `inputs` must have less than 512 tokens. Given: 600",
        MAX_INPUT_TOKENS,
        512,
        600,
    ),
    # TEI before the backticks (reported 2024)
    (
        "Input validation error: inputs must have less than 512 tokens. Given: 516",
        MAX_INPUT_TOKENS,
        512,
        516,
    ),
    ("input must have less than 512 tokens", MAX_INPUT_TOKENS, 512, None),
    (
        "Input validation error: `inputs` must have less than 32000 characters. Given: 67337",
        MAX_INPUT_CHARS,
        32000,
        67337,
    ),
    # vLLM (vllm/entrypoints/openai/serving_engine.py, .../engine/serving.py)
    (
        "This model's maximum context length is 512 tokens. However, you requested 1451 tokens "
        "in the input for embedding generation. Please reduce the length of the input.",
        MAX_INPUT_TOKENS,
        512,
        1451,
    ),
    # vLLM with --max-embed-len (2025)
    (
        "This model's maximum embedding input length is 8192 tokens. However, you requested "
        "10288 tokens in the input for embedding generation. Please reduce the length of the "
        "input.",
        MAX_INPUT_TOKENS,
        8192,
        10288,
    ),
    # vLLM 2026 renderer (vllm/renderers/params.py): token check, then the character pre-check
    # whose "(at most N characters)" must not be read as a batch size
    (
        "You passed 600 input tokens and requested 0 output tokens. However, the model's context "
        "length is only 512 tokens, resulting in a maximum input length of 512 tokens. Please "
        "reduce the length of the input prompt.",
        MAX_INPUT_TOKENS,
        512,
        None,
    ),
    (
        "You passed 700000 input characters and requested 0 output tokens. However, the model's "
        "context length is only 512 tokens, resulting in a maximum input length of 512 tokens "
        "(at most 600000 characters). Please reduce the length of the input prompt.",
        MAX_INPUT_TOKENS,
        512,
        None,
    ),
    # OpenAI, 2024 and 2026
    (
        "This model's maximum context length is 8192 tokens, however you requested 8610 tokens "
        "(8610 in your prompt; 0 for the completion). Please reduce your prompt; or completion "
        "length.",
        MAX_INPUT_TOKENS,
        8192,
        8610,
    ),
    ("Invalid 'input': maximum context length is 8192 tokens.", MAX_INPUT_TOKENS, 8192, None),
    ("Requested 453357 tokens, max 300000 tokens per request", MAX_REQUEST_TOKENS, 300000, 453357),
    # Azure OpenAI
    ("Too many inputs. The max number of inputs is 16.", MAX_INPUTS, 16, None),
    # Infinity (pydantic-core's wordings, FastAPI's 422)
    ("List should have at most 2048 items after validation, not 2049", MAX_INPUTS, 2048, 2049),
    ("String should have at most 122880 characters", MAX_INPUT_CHARS, 122880, None),
    # togembed serve and the fake server
    ("Too many inputs: got 3000, the maximum is 2048", MAX_INPUTS, 2048, 3000),
    # DashScope, Mistral, Voyage (other OpenAI-compatible services users point clients at)
    (
        "batch size is invalid, it should not be larger than 10.: input.contents",
        MAX_INPUTS,
        10,
        None,
    ),
    ("Too many tokens in batch. Max is 16384 got 17555", MAX_REQUEST_TOKENS, 16384, 17555),
    (
        "Request to model 'voyage-large-2-instruct' failed. The max allowed tokens per submitted "
        "batch is 120000. Your batch has 121138 tokens after truncation.",
        MAX_REQUEST_TOKENS,
        120000,
        121138,
    ),
    # generic wording of the kind the issue quotes
    ("at most 32 inputs per request", MAX_INPUTS, 32, None),
]


@pytest.mark.parametrize(("message", "kind", "value", "requested"), REAL_WORDINGS)
def test_real_wordings_give_their_limit(
    message: str, kind: str, value: int, requested: int | None
) -> None:
    assert limit_from_message(message) == StatedLimit(kind, value, requested)  # type: ignore[arg-type]


@pytest.mark.parametrize(("message", "kind", "value", "requested"), REAL_WORDINGS)
def test_wordings_are_found_inside_our_error_messages(
    message: str, kind: str, value: int, requested: int | None
) -> None:
    """The runner sees ``exc.message``: "HTTP 422: <server's message>"."""
    stated = limit_from_message(f"HTTP 422: {message}")
    assert stated is not None and (stated.kind, stated.value) == (kind, value)


@pytest.mark.parametrize(
    "message",
    [
        None,
        "",
        # OpenAI above 2048 inputs, and for an empty string: no number to read
        "'$.input' is invalid. Please check the API reference: "
        "https://platform.openai.com/docs/api-reference.",
        "is not valid under any of the given schemas - 'input'",
        # Together's argument rejections, model errors, overload: no size limit
        "Unrecognized request arguments supplied: dimensions, user",
        "Unable to access non-serverless model BAAI/bge-base-en-v1.5. Please visit "
        "https://api.together.ai/models/BAAI/bge-base-en-v1.5 to create and start a new "
        "dedicated endpoint for the model.",
        'Model "BAAI/bge-m3" does not support matryoshka representation, changing output '
        "dimensions will lead to poor results.",
        "Model is overloaded",
        "Failed to buffer the request body: length limit exceeded",
        "Input validation error: input 3 is invalid",
        # a number that is not a limit
        "batch size 0 > maximum allowed batch size 0",
    ],
)
def test_messages_without_a_stated_limit_give_none(message: str | None) -> None:
    assert limit_from_message(message) is None


def test_numbers_with_thousands_separators_are_read() -> None:
    stated = limit_from_message("Requested 453,357 tokens, max 300,000 tokens per request")
    assert stated is not None and stated.value == 300_000


def test_describe_names_the_limit_for_users() -> None:
    assert StatedLimit(MAX_INPUT_TOKENS, 512).describe() == "512 tokens"
    assert StatedLimit(MAX_INPUT_CHARS, 122880).describe() == "122880 characters"
    assert StatedLimit(MAX_INPUTS, 32).describe() == "32 inputs per request"
    assert StatedLimit(MAX_REQUEST_TOKENS, 300000).describe() == "300000 tokens per request"


# ---------------------------------------------------------------------------------------------
# The per-request token budget


def test_budget_is_scaled_by_the_ratio_the_server_states() -> None:
    """The server counted 450k real tokens where we estimated 300k (ratio 1.5): to keep its
    count under 300k, send at most 300k * 0.9 / 1.5 = 180k estimated tokens."""
    stated = StatedLimit(MAX_REQUEST_TOKENS, 300_000, requested=450_000)
    assert request_token_budget(stated, 300_000) == int(300_000 * TOKEN_BUDGET_SAFETY / 1.5)


def test_budget_assumes_the_default_ratio_when_the_count_is_not_stated() -> None:
    stated = StatedLimit(MAX_REQUEST_TOKENS, 16_384)
    expected = int(16_384 * TOKEN_BUDGET_SAFETY / UNSTATED_TOKEN_RATIO)
    assert request_token_budget(stated, 20_000) == expected


def test_budget_never_exceeds_the_limit_when_we_overestimate() -> None:
    """Our estimate said 900k where the server counted 310k: the budget stays under the
    limit itself rather than growing past it."""
    stated = StatedLimit(MAX_REQUEST_TOKENS, 300_000, requested=310_000)
    assert request_token_budget(stated, 900_000) == int(300_000 * TOKEN_BUDGET_SAFETY)


def test_budget_is_at_least_one() -> None:
    assert request_token_budget(StatedLimit(MAX_REQUEST_TOKENS, 1, requested=10**9), 1) == 1


# ---------------------------------------------------------------------------------------------
# Error bodies whose message carries the limit


def test_fastapi_detail_bodies_keep_their_message() -> None:
    """Infinity's 422 is FastAPI's: the message is in ``detail``; without it the client saw
    only "HTTP 422" and could neither read the limit nor tell the user."""
    body = (
        b'{"detail":[{"type":"too_long","loc":["body","input","list[constrained-str]"],'
        b'"msg":"List should have at most 2048 items after validation, not 2049","input":[],'
        b'"ctx":{"field_type":"List","max_length":2048,"actual_length":2049}},'
        b'{"type":"string_type","loc":["body","input","constrained-str"],'
        b'"msg":"Input should be a valid string","input":[]}]}'
    )
    exc = error_from_response(422, {}, body)
    assert "List should have at most 2048 items" in exc.message
    assert "body.input.list[constrained-str]" in exc.message
    assert limit_from_message(exc.message) == StatedLimit(MAX_INPUTS, 2048, 2049)


def test_fastapi_string_detail_is_the_message() -> None:
    exc = error_from_response(404, {}, b'{"detail":"Not Found"}')
    assert exc.message == "HTTP 404: Not Found"


def test_tei_bodies_keep_their_message() -> None:
    native = b'{"error":"batch size 60 > maximum allowed batch size 32","error_type":"Validation"}'
    compat = (
        b'{"message":"batch size 60 > maximum allowed batch size 32","code":422,'
        b'"type":"Validation"}'
    )
    for body in (native, compat):
        exc = error_from_response(422, {}, body)
        assert limit_from_message(exc.message) == StatedLimit(MAX_INPUTS, 32, 60)
