"""What a server's refusal (a 4xx answer) means for the batch that got it, without I/O.

A refusal is either about the request as a whole (the model, an argument, the key: resending
the same inputs cannot help) or possibly about the inputs (one too long, too many of them: a
split or a bisection can turn it into success, and find the input at fault). Servers say so
in their own words (docs/backends.md); these functions read them.
"""

from __future__ import annotations

import re

from .errors import APIStatusError
from .stated_limits import MAX_INPUTS, StatedLimit, limit_from_message
from .status_errors import rejected_arguments

__all__ = [
    "refused_arguments",
    "rejects_input",
    "stated_limit",
    "too_many_inputs",
]

_REQUEST_LEVEL = re.compile(
    r"model|unrecognized request argument|unknown field|encoding_format|dimensions|matryoshka|"
    r"api key|authoriz",
    re.I,
)
_TOO_MANY = re.compile(
    r"too many inputs|batch size|maximum (?:number of )?inputs|payload too large|"
    r"request (?:entity )?too large|at most \d+ inputs",
    re.I,
)
_INPUT_HINT = re.compile(r"input|token|too long|length|context", re.I)
# Servers that take no ``dimensions`` say so in many ways: Together "Unrecognized request
# arguments supplied: dimensions", vLLM "dimensions is currently not supported" or "does not
# support matryoshka representation", OpenAI "does not support specifying dimensions".
_DIMENSIONS_REFUSED = re.compile(r"dimensions|matryoshka", re.I)
_SIZE_STATUSES = (400, 403, 413, 422)
_OPTIONAL_ARGUMENTS = ("encoding_format", "user", "dimensions")


def _is_request_level(exc: APIStatusError) -> bool:
    return exc.param in ("model", "encoding_format", "dimensions", "user") or bool(
        _REQUEST_LEVEL.search(exc.message)
    )


def stated_limit(exc: APIStatusError) -> StatedLimit | None:
    """The size limit a refusal states (docs/backends.md), if it is one that could."""
    return limit_from_message(exc.message) if exc.status_code in _SIZE_STATUSES else None


def rejects_input(exc: APIStatusError) -> bool:
    """A rejection that may be caused by one input or by the batch's size (so splitting or
    bisecting can fix or find it)."""
    if stated_limit(exc) is not None:
        # A stated size limit is about the inputs, even where the message also says "model"
        # (vLLM and OpenAI: "This model's maximum context length is 512 tokens").
        return True
    if exc.status_code in (400, 413, 422):
        return not _is_request_level(exc)
    if exc.status_code == 403:  # Together answers 403 for inputs over the context length
        return bool(_INPUT_HINT.search(exc.message)) and not _is_request_level(exc)
    return False


def too_many_inputs(exc: APIStatusError) -> bool:
    """The batch has more inputs than the server takes. A 413 means so unless its message
    states another limit: TEI before 1.9 sent 413 for an input over the model's length too."""
    stated = stated_limit(exc)
    if stated is not None:
        return stated.kind == MAX_INPUTS
    return exc.status_code == 413 or bool(_TOO_MANY.search(exc.message))


def refused_arguments(exc: APIStatusError, sent: frozenset[str]) -> frozenset[str]:
    """Which of the optional arguments a request ``sent`` (``encoding_format``, ``user``,
    ``dimensions``) a 400/422 refuses. "Unrecognized request arguments" naming none refuses
    all of them; names given refuse only those (an ``extra_body`` key is the caller's to fix)."""
    if exc.status_code not in (400, 422) or not sent:
        return frozenset()
    named = rejected_arguments(exc.message)
    if named is not None and not named:
        return sent
    refused = set()
    if "encoding_format" in sent and (
        "encoding_format" in exc.message.lower() or (named and "encoding_format" in named)
    ):
        refused.add("encoding_format")
    if "user" in sent and named and "user" in named:
        refused.add("user")
    if "dimensions" in sent and (
        (named and "dimensions" in named)
        or exc.param == "dimensions"
        or (named is None and _DIMENSIONS_REFUSED.search(exc.message))
    ):
        refused.add("dimensions")
    return frozenset(refused)
