"""Limits that servers state in their error messages, read as numbers. Pure: no I/O.

Embedding servers refuse a request that is too big and often say by how much: TEI's "batch size
60 > maximum allowed batch size 32", OpenAI's "Requested 453357 tokens, max 300000 tokens per
request", vLLM's "This model's maximum context length is 512 tokens". Reading the number lets
the client cut the batch to the right size in one step instead of halving blindly, and tell the
user which limit an input broke. Every pattern below is a wording seen from a real server; the
sources are listed in docs/backends.md.

Three kinds of limit, told apart because they call for different reactions:

- ``MAX_INPUTS``: inputs per request. The whole batch is at fault: re-plan it in pieces of
  that size.
- ``MAX_REQUEST_TOKENS``: tokens summed over a request. Also the whole batch: lower the
  per-request token budget.
- ``MAX_INPUT_TOKENS`` / ``MAX_INPUT_CHARS``: the length of one input. One input is at fault:
  find it (bisect) and name it, with the limit.
"""

from __future__ import annotations

import re
from typing import Literal

import attrs

__all__ = [
    "MAX_INPUTS",
    "MAX_INPUT_CHARS",
    "MAX_INPUT_TOKENS",
    "MAX_REQUEST_TOKENS",
    "TOKEN_BUDGET_SAFETY",
    "UNSTATED_TOKEN_RATIO",
    "LimitKind",
    "StatedLimit",
    "limit_from_message",
    "request_token_budget",
]

LimitKind = Literal["max_inputs", "max_request_tokens", "max_input_tokens", "max_input_chars"]
MAX_INPUTS: LimitKind = "max_inputs"
MAX_REQUEST_TOKENS: LimitKind = "max_request_tokens"
MAX_INPUT_TOKENS: LimitKind = "max_input_tokens"
MAX_INPUT_CHARS: LimitKind = "max_input_chars"

_N = r"(?P<n>\d[\d,_]*)"  # the limit: 300000, 300,000


@attrs.frozen
class StatedLimit:
    """A limit the server stated: its kind, the number, and (when the message says it) how
    much the refused request had by the server's own count (``requested``)."""

    kind: LimitKind
    value: int
    requested: int | None = None

    def describe(self) -> str:
        """For messages: "512 tokens", "32 inputs per request", ..."""
        return {
            MAX_INPUTS: f"{self.value} inputs per request",
            MAX_REQUEST_TOKENS: f"{self.value} tokens per request",
            MAX_INPUT_TOKENS: f"{self.value} tokens",
            MAX_INPUT_CHARS: f"{self.value} characters",
        }[self.kind]


# (kind, pattern with the limit as group "n" and optionally the refused amount as "got").
# Per-input patterns come first: vLLM's per-input message also says "at most N characters",
# which must not read as a batch size.
_PATTERNS: tuple[tuple[LimitKind, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern, re.I))
    for kind, pattern in (
        # TEI: "Input validation error: `inputs` must have less than 512 tokens. Given: 600"
        # (older TEI and other servers: "inputs ..."/"input must have less than 512 tokens")
        (
            MAX_INPUT_TOKENS,
            rf"must have less than {_N} tokens"
            r"(?:\.\s*Given:\s*(?P<got>\d+))?",
        ),
        # vLLM >= 2026 renderer: "... resulting in a maximum input length of 512 tokens"
        (MAX_INPUT_TOKENS, rf"maximum input length of {_N} tokens"),
        # vLLM with --max-embed-len: "This model's maximum embedding input length is 512 tokens"
        (
            MAX_INPUT_TOKENS,
            rf"maximum embedding input length is {_N} tokens"
            r"(?:.*?you requested (?P<got>\d+) tokens)?",
        ),
        # vLLM: "This model's maximum context length is 512 tokens. However, you requested 600
        # tokens in the input for embedding generation." OpenAI: "This model's maximum
        # context length is 8192 tokens, however you requested 8610 tokens (...)" and, newer,
        # "Invalid 'input': maximum context length is 8192 tokens."
        (
            MAX_INPUT_TOKENS,
            rf"maximum context length is {_N} tokens"
            r"(?:.*?you requested (?P<got>\d+) tokens)?",
        ),
        # TEI: "`inputs` must have less than 128000 characters. Given: 130000"
        (
            MAX_INPUT_CHARS,
            rf"must have less than {_N} characters"
            r"(?:\.\s*Given:\s*(?P<got>\d+))?",
        ),
        # Infinity (pydantic): "String should have at most 122880 characters"
        (MAX_INPUT_CHARS, rf"string should have at most {_N} characters"),
        # TEI: "batch size 60 > maximum allowed batch size 32" (also SiliconFlow's gateway)
        (MAX_INPUTS, rf"(?:batch size (?P<got>\d+) > )?maximum allowed batch size {_N}"),
        # Infinity (pydantic): "List should have at most 2048 items after validation, not 2049"
        (
            MAX_INPUTS,
            rf"list should have at most {_N} items?"
            r"(?: after validation, not (?P<got>\d+))?",
        ),
        # togembed serve / the fake server: "Too many inputs: got 3000, the maximum is 2048";
        # Azure OpenAI: "Too many inputs. The max number of inputs is 16."
        (
            MAX_INPUTS,
            r"too many inputs(?::\s*got (?P<got>\d+))?[^\d]{0,40}?"
            rf"(?:the maximum is|max(?:imum)? number of inputs is) {_N}",
        ),
        # DashScope: "batch size is invalid, it should not be larger than 10"
        (MAX_INPUTS, rf"batch size is invalid, it should not be larger than {_N}"),
        # Generic: "at most 32 inputs", "at most 32 texts per request"
        (MAX_INPUTS, rf"at most {_N} (?:inputs|texts|items|sentences|strings)\b"),
        # OpenAI: "Requested 453357 tokens, max 300000 tokens per request"
        (
            MAX_REQUEST_TOKENS,
            r"(?:requested (?P<got>\d+) tokens, )?"
            rf"max {_N} tokens per request",
        ),
        # Mistral: "Too many tokens in batch. Max is 16384 got 17555"
        (
            MAX_REQUEST_TOKENS,
            rf"too many tokens in batch\. max is {_N}"
            r"(?: got (?P<got>\d+))?",
        ),
        # Voyage: "The max allowed tokens per submitted batch is 120000. Your batch has 121138
        # tokens after truncation."
        (
            MAX_REQUEST_TOKENS,
            rf"max allowed tokens per submitted batch is {_N}"
            r"(?:\.\s*your batch has (?P<got>\d+) tokens)?",
        ),
    )
)


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    digits = text.replace(",", "").replace("_", "")
    return int(digits) if digits.isdigit() else None


def limit_from_message(message: str | None) -> StatedLimit | None:
    """The limit ``message`` states, or None when it states none we know (then the caller
    falls back to halving). A limit of 0 is no limit anyone can meet: ignored."""
    if not message:
        return None
    for kind, pattern in _PATTERNS:
        match = pattern.search(message)
        if match is None:
            continue
        value = _int(match.group("n"))
        if not value:
            continue
        got = _int(match.groupdict().get("got"))
        return StatedLimit(kind=kind, value=value, requested=got)
    return None


# A per-request token limit is counted by the server's tokenizer; the client only estimates
# (~bytes/4, see ``estimate_tokens``). When the refusal says how many tokens the batch had, the
# ratio of that count to our estimate scales the budget; when it does not, we assume the server
# counts up to twice our estimate. Either way 10% of the limit is left free, because other
# batches have other ratios.
TOKEN_BUDGET_SAFETY = 0.9
UNSTATED_TOKEN_RATIO = 2.0


def request_token_budget(limit: StatedLimit, estimated: int) -> int:
    """Estimated tokens per request that keep the server's own count under ``limit.value``,
    for a refused batch whose estimate was ``estimated``. Never more than the limit itself
    (an estimate that overcounts is left as a margin), never below 1."""
    if limit.requested and estimated > 0:
        ratio = limit.requested / estimated
    else:
        ratio = UNSTATED_TOKEN_RATIO
    return max(1, int(limit.value * TOKEN_BUDGET_SAFETY / max(ratio, 1.0)))
