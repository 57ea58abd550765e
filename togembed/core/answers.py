"""Successful answers, without I/O: decode an embeddings answer into rows and check it (every
index once, one dimension, the expected count). Float answers are parsed by simdjson straight
into an array where it is installed; orjson reads everything else."""

from __future__ import annotations

import binascii
import re
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import orjson

try:  # float answers straight into an array, no Python float per value (2-3x faster)
    import simdjson
except ImportError:  # Python >= 3.14 has no wheel yet: orjson does it all
    simdjson = None

from .errors import APIResponseValidationError
from .protocol import redact
from .types import Embedding, Usage

__all__ = ["DecodedBatch", "decode_embeddings"]

_F32 = np.dtype("<f4")


@attrs.frozen
class DecodedBatch:
    """A validated answer: ``rows[i]`` is the vector of input i of the batch, all of length
    ``dim``: a base64 string or a float list as sent, or, for float answers decoded by
    simdjson, a row of one float64 array."""

    rows: list[Any] | np.ndarray
    dim: int
    model: str | None
    usage: Usage | None
    is_base64: bool

    def write_into(self, out: np.ndarray) -> None:
        """Write the rows into ``out`` (shape ``(len(rows), dim)``), decoding base64 in place."""
        if isinstance(self.rows, np.ndarray):
            with np.errstate(over="ignore"):  # beyond float32: inf, as numpy casts it
                out[:] = self.rows
            return
        try:
            if self.is_base64:
                for i, row in enumerate(self.rows):
                    out[i] = np.frombuffer(binascii.a2b_base64(row), dtype=_F32)
            else:
                with np.errstate(over="ignore"):  # beyond float32: inf, as numpy casts it
                    out[:] = self.rows
        except (ValueError, TypeError, binascii.Error) as exc:
            raise APIResponseValidationError(f"embedding values are not numbers: {exc}") from exc

    def split(self, parts: list[tuple[int, int]]) -> list[DecodedBatch]:
        """A shared request's answer cut into its callers' answers: ``parts`` are (rows,
        estimated tokens) in order. The server's token count is shared out by the estimates
        (the last part gets the rounding), so the parts' counts add up to it."""
        usage, total = self.usage, sum(tokens for _, tokens in parts) or 1
        out: list[DecodedBatch] = []
        start = 0
        left = (usage.prompt_tokens, usage.total_tokens) if usage is not None else (0, 0)
        for i, (n, tokens) in enumerate(parts):
            share = None
            if usage is not None:
                last = i == len(parts) - 1
                prompt = left[0] if last else usage.prompt_tokens * tokens // total
                all_tokens = left[1] if last else usage.total_tokens * tokens // total
                left = (left[0] - prompt, left[1] - all_tokens)
                share = Usage(prompt_tokens=prompt, total_tokens=all_tokens)
            out.append(attrs.evolve(self, rows=self.rows[start : start + n], usage=share))
            start += n
        return out

    def to_embeddings(self, offset: int, *, keep_base64: bool) -> list[Embedding]:
        """``Embedding`` objects indexed from ``offset``; base64 rows become float lists unless
        the caller asked for base64."""
        if isinstance(self.rows, np.ndarray) and not keep_base64:
            values: list[Any] = self.rows.tolist()
        elif self.is_base64 and not keep_base64:
            arr = np.empty((len(self.rows), self.dim), dtype=_F32)
            self.write_into(arr)
            values = arr.tolist()
        elif not self.is_base64 and keep_base64:
            arr = np.empty((len(self.rows), self.dim), dtype=_F32)
            self.write_into(arr)
            values = [binascii.b2a_base64(r.tobytes(), newline=False).decode() for r in arr]
        else:
            values = self.rows
        return [Embedding(embedding=v, index=offset + i) for i, v in enumerate(values)]


def _base64_dim(s: str) -> int:
    n = len(s)
    if n % 4:
        return -1
    nbytes = n // 4 * 3 - (2 if s.endswith("==") else 1 if s.endswith("=") else 0)
    return nbytes // 4 if nbytes % 4 == 0 else -1


class _Invalid:
    """Builds the validation errors of one answer (its body kept, truncated and redacted)."""

    __slots__ = ("body", "request_id", "secrets")

    def __init__(self, body: bytes, request_id: str | None, secrets: Sequence[str]) -> None:
        self.body = body
        self.request_id = request_id
        self.secrets = secrets

    def __call__(self, message: str, **kwargs: Any) -> APIResponseValidationError:
        return APIResponseValidationError(
            redact(message, self.secrets),
            body=redact(self.body[:2000], self.secrets),
            request_id=self.request_id,
            **kwargs,
        )


def _error_in_200(doc: dict[str, Any], invalid: _Invalid) -> APIResponseValidationError:
    """A 200 whose JSON is ``{"error": ...}``: the server's own message, type and code."""
    err = doc["error"]
    message = err.get("message") if isinstance(err, dict) else err
    if not isinstance(message, str) or not message:
        message = orjson.dumps(err).decode()[:300]
    error_type = err.get("type") if isinstance(err, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    return invalid(
        f"HTTP 200 with an error instead of embeddings: {message}",
        error_type=error_type if isinstance(error_type, str) else None,
        code=str(code) if code is not None else None,
    )


def decode_embeddings(
    body: bytes,
    expected: int,
    *,
    dim: int | None = None,
    request_id: str | None = None,
    secrets: Sequence[str] = (),
) -> DecodedBatch:
    """Parse and check an embeddings answer for ``expected`` inputs.

    Every index 0..expected-1 must appear exactly once (items may come in any order) and every
    row must have the same dimension (``dim`` when given: the one earlier batches had); anything
    else is an ``APIResponseValidationError`` (a 200 carrying ``{"error": ...}`` too, with the
    server's message).
    """
    if simdjson is not None and _has_float_rows(body):
        fast = _decode_float_rows(body, expected, dim)
        if fast is not None:
            return fast
    _invalid = _Invalid(body, request_id, secrets)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _invalid(f"response is not valid JSON ({exc})") from exc
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        if isinstance(doc, dict) and doc.get("error"):
            raise _error_in_200(doc, _invalid)
        raise _invalid("response has no 'data' list")
    if len(data) != expected:
        raise _invalid(f"expected {expected} embeddings, got {len(data)}")

    rows: list[Any] = [None] * expected
    dim = -1 if dim is None else dim
    kind: type | None = None
    for item in data:
        try:
            index = item["index"]
            emb = item["embedding"]
        except (TypeError, KeyError):
            raise _invalid("an item lacks 'index' or 'embedding'") from None
        if type(index) is not int or not 0 <= index < expected:
            raise _invalid(f"index {index!r} out of range 0..{expected - 1}")
        if rows[index] is not None:
            raise _invalid(f"index {index} appears twice")
        if kind is None:
            kind = type(emb)
            if kind is not list and kind is not str:
                raise _invalid("embedding is neither a list nor a string")
        elif type(emb) is not kind:
            raise _invalid("embeddings mix lists and base64 strings")
        d = len(emb) if kind is list else _base64_dim(emb)
        if dim == -1:
            dim = d
        if d != dim or d <= 0:
            raise _invalid(f"row {index} has dimension {d}, expected {dim}")
        rows[index] = emb
    return DecodedBatch(
        rows=rows,
        dim=max(dim, 0),
        model=doc.get("model") if isinstance(doc.get("model"), str) else None,
        usage=_usage(doc.get("usage")),
        is_base64=kind is str,
    )


_EMBEDDING_KEY = re.compile(rb'"embedding"\s*:\s*(.)')


def _has_float_rows(body: bytes) -> bool:
    """Whether the first row of an answer is a list (not base64): only then is simdjson's
    array path worth a parse. Looked for near the start, where the first row begins."""
    found = _EMBEDDING_KEY.search(body, 0, 65536)
    return found is not None and found.group(1) == b"["


def _decode_float_rows(body: bytes, expected: int, dim: int | None) -> DecodedBatch | None:
    """A well-formed answer of float lists, parsed by simdjson straight into one float64
    array (the very doubles orjson would give, without a Python object per value; sinks cast
    them to float32 in one step). None for anything else
    (base64 rows, or any flaw): the general decoder then decodes it or says what is wrong."""
    assert simdjson is not None
    try:
        doc = simdjson.Parser().parse(body)
        data = doc["data"]
        if not isinstance(data, simdjson.Array) or len(data) != expected:
            return None
        out: np.ndarray | None = None
        seen = bytearray(expected)
        for item in data:
            index = item["index"]
            if type(index) is not int or not 0 <= index < expected or seen[index]:
                return None
            seen[index] = 1
            values = np.frombuffer(item["embedding"].as_buffer(of_type="d"), dtype=np.float64)
            if out is None:
                if not values.size or (dim is not None and values.size != dim):
                    return None
                out = np.empty((expected, values.size), dtype=np.float64)
            elif values.size != out.shape[1]:
                return None
            out[index] = values
        model = doc.get("model")
        usage = doc.get("usage")
        if isinstance(usage, simdjson.Object):
            usage = usage.as_dict()
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError):
        return None
    if out is None:
        return None
    return DecodedBatch(
        rows=out,
        dim=out.shape[1],
        model=model if isinstance(model, str) else None,
        usage=_usage(usage),
        is_base64=False,
    )


def _usage(raw: object) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    prompt, total = raw.get("prompt_tokens"), raw.get("total_tokens")
    if type(prompt) is not int:
        return None
    return Usage(prompt_tokens=prompt, total_tokens=total if type(total) is int else prompt)
