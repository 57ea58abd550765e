"""Together's wire protocol, without I/O: request bodies, response decoding and validation,
error bodies and statuses mapped to exceptions, and the server's retry hints."""

from __future__ import annotations

import binascii
import email.utils
import html
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import orjson

try:  # float answers straight into float32 arrays, no Python float per value (2-3x faster)
    import simdjson
except ImportError:  # Python >= 3.14 has no wheel yet: orjson does it all
    simdjson = None

from .errors import (
    APIResponseValidationError,
    APIStatusError,
    ModelNotAvailableError,
    status_error_class,
)
from .types import Embedding, Usage

__all__ = [
    "DecodedBatch",
    "decode_embeddings",
    "encode_request",
    "error_from_response",
    "parse_retry_after",
    "redact",
    "rejected_arguments",
    "request_id_of",
]

_F32 = np.dtype("<f4")
REDACTED = "[REDACTED]"


def encode_request(
    model: str,
    texts: Sequence[str],
    encoding_format: str | None,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """The JSON body of ``POST /embeddings``. ``encoding_format`` is omitted when None, because
    servers older than ~2025-09 reject arguments they do not know. ``extra``: more arguments
    (``dimensions``, ``user``, a caller's ``extra_body``), which win over ours."""
    body: dict[str, Any] = {"model": model, "input": list(texts)}
    if encoding_format is not None:
        body["encoding_format"] = encoding_format
    if extra:
        body.update(extra)
    return orjson.dumps(body)


def redact(value: Any, secrets: Sequence[str]) -> Any:
    """``value`` with every secret (the API key) replaced by ``[REDACTED]``: strings, bytes, and
    the strings inside dicts and lists, recursively. Servers sometimes quote the request's
    Authorization header or the key back in an error; we keep and show no copy of it."""
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, (bytes, bytearray)):
        for secret in secrets:
            value = value.replace(secret.encode("utf-8", "surrogatepass"), REDACTED.encode())
        return bytes(value)
    if isinstance(value, dict):
        return {redact(k, secrets): redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, secrets) for v in value]
    return value


def request_id_of(headers: Mapping[str, str]) -> str | None:
    return headers.get("x-request-id") or headers.get("request-id") or None


# ---------------------------------------------------------------------------------------------
# Successful answers


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
    if simdjson is not None:
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


# ---------------------------------------------------------------------------------------------
# Errors

_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def _text_message(body: bytes) -> str:
    """A short human message out of an HTML or text error page."""
    text = body[:4000].decode("utf-8", "replace")
    title = re.search(r"<title>(.*?)</title>", text, re.I | re.S) or re.search(
        r"<h1[^>]*>(.*?)</h1>", text, re.I | re.S
    )
    if title:
        text = title.group(1)
    text = _SPACE.sub(" ", html.unescape(_TAG.sub(" ", text))).strip()
    return text[:300]


def _detail_message(detail: object) -> str | None:
    """The message of a FastAPI error body (Infinity and other Python servers answer 422
    ``{"detail": [{"loc": [...], "msg": ...}, ...]}``, or ``{"detail": "..."}``), where the
    limit a validation error names is ("List should have at most 2048 items ...")."""
    if isinstance(detail, str):
        return detail
    if not isinstance(detail, list):
        return None
    parts = []
    for item in detail[:5]:
        if isinstance(item, dict) and isinstance(item.get("msg"), str):
            loc = item.get("loc")
            where = ".".join(str(p) for p in loc) if isinstance(loc, list) else ""
            parts.append(f"{where}: {item['msg']}" if where else item["msg"])
    return "; ".join(parts) or None


_NON_SERVERLESS = re.compile(r"non-serverless model", re.I)
_MODEL_WORD = re.compile(r"\bmodel\b", re.I)
_MODEL_CODES = ("model_not_available", "model_not_found")


def is_model_not_available(status: int, message: str, code: str | None, param: str | None) -> bool:
    """The model cannot be used here, for good: an unknown model (404 about the model),
    Together's ``model_not_available`` code (400, 404 or 503) or its "Unable to access
    non-serverless model" (400). Other 503s mean "no capacity now" and stay retried."""
    if code in _MODEL_CODES or _NON_SERVERLESS.search(message):
        return True
    return status == 404 and (param == "model" or bool(_MODEL_WORD.search(message)))


def error_from_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    secrets: Sequence[str] = (),
    about_model: bool = True,
) -> APIStatusError:
    """The typed exception for a non-2xx answer, with the server's message and request id.

    Every text kept from the server (message, body) has the ``secrets`` (the API key) redacted
    here, once, so no consumer (str, repr, logs, a job's failure list) can show them.
    ``about_model=False`` for requests that name no model (``GET /models``): no
    ``ModelNotAvailableError`` then."""
    parsed: Any = None
    message = error_type = param = code = None
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        err = parsed.get("error", parsed)
        if isinstance(err, dict):
            message = err.get("message")
            error_type = err.get("type")
            param = err.get("param")
            code = err.get("code")
        elif isinstance(err, str):
            message = err
        if not isinstance(message, str) or not message:
            message = _detail_message(parsed.get("detail"))
    if not isinstance(message, str) or not message:
        message = _text_message(body) if body and parsed is None else ""
    message = redact(message, secrets)
    kept = parsed if parsed is not None else body[:2000].decode("utf-8", "replace")
    code_str = str(code) if code is not None else None
    param_str = param if isinstance(param, str) else None
    text = f"HTTP {status}: {message}" if message else f"HTTP {status}"
    cls = status_error_class(status)
    if about_model and is_model_not_available(status, message, code_str, param_str):
        cls = ModelNotAvailableError
    return cls(
        text,
        status_code=status,
        body=redact(kept, secrets),
        request_id=request_id_of(headers),
        error_type=redact(error_type, secrets) if isinstance(error_type, str) else None,
        param=redact(param_str, secrets),
        code=redact(code_str, secrets),
        retry_after=parse_retry_after(headers, now=now, include_reset=status == 429),
    )


# Together/OpenAI: "Unrecognized request argument(s) supplied: dimensions, user";
# Hugging Face TEI (serde): "unknown field `user`".
_UNRECOGNIZED = re.compile(r"unrecognized request arguments?(?: supplied)?:?(.*)", re.I | re.S)
_UNKNOWN_FIELD = re.compile(r"unknown field [`'\"]?(\w+)", re.I)
_NAME = re.compile(r"[A-Za-z_]\w*")


def rejected_arguments(message: str) -> frozenset[str] | None:
    """The request arguments a 400/422 says the server does not know: None if the message is
    not about unknown arguments, an empty set if it is but names none."""
    m = _UNKNOWN_FIELD.findall(message)
    if m:
        return frozenset(m)
    found = _UNRECOGNIZED.search(message)
    if found is None:
        return None
    return frozenset(_NAME.findall(found.group(1)))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(value: str, now: float) -> float | None:
    """Seconds in any form servers use: ``1.5``, ``250ms``, ``1m30s``, an HTTP date, an epoch."""
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        parts = _DURATION.findall(value)
        if parts and "".join(n + u for n, u in parts) == value.replace(" ", ""):
            return sum(float(n) * _UNITS[u] for n, u in parts)
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        return when.timestamp() - now
    if seconds > 1e9:  # an epoch timestamp, not an interval
        return seconds - now
    return seconds


def parse_retry_after(
    headers: Mapping[str, str], *, now: float | None = None, include_reset: bool = True
) -> float | None:
    """How long the server asked us to wait, in seconds (>= 0), or None if it did not say.

    Order: ``retry-after-ms`` (most precise), ``Retry-After`` (seconds or HTTP date), then
    Together's ``x-ratelimit-reset`` (its suggested retry interval; it rides on every answer, so
    callers only count it on a 429).
    """
    now = time.time() if now is None else now
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    for name in ("retry-after", "x-ratelimit-reset") if include_reset else ("retry-after",):
        raw = headers.get(name)
        if raw is not None:
            seconds = _seconds(raw, now)
            if seconds is not None and seconds == seconds:  # not NaN
                return max(0.0, seconds)
    return None
