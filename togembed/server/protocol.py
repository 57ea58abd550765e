"""Together's ``/v1/embeddings`` protocol, server side, as pure functions: no I/O, no aiohttp.

Owns what both servers must say the same way: a request body parsed and validated with
Together's wording (:func:`parse_request`, :func:`check_count`, :func:`model_not_available`),
Together's JSON error body (:class:`RequestError`, :func:`error_body`), response bodies
rendered from float32 rows as float JSON or base64 (:func:`render_rows`, :func:`list_tail`,
:func:`render_response`; the pieces let a caller render a big answer a slice at a time), the
``/v1/models`` entries, and the API-key check.

May import: the standard library, numpy, orjson, attrs. Nothing in ``togembed.server`` (the
aiohttp app and the backends import this); tested without an event loop.
"""

from __future__ import annotations

import base64
import hmac
from typing import Any, Literal

import attrs
import numpy as np
import orjson

__all__ = [
    "ALLOWED_ARGS",
    "ITEM",
    "LIST_HEAD",
    "NOT_JSON",
    "EncodingMode",
    "Parsed",
    "RequestError",
    "authorized",
    "check_count",
    "encode_vector",
    "error_body",
    "list_tail",
    "load_body",
    "model_entry",
    "model_list",
    "model_not_available",
    "parse_request",
    "render_response",
    "render_rows",
]

EncodingMode = Literal["honour", "float", "reject"]
"""How a server treats ``encoding_format``: ``honour`` it (base64 when asked, 400 for anything
but float/base64), always answer ``float`` (older Together servers), or ``reject`` the argument
as unrecognized."""

ALLOWED_ARGS = frozenset({"model", "input", "encoding_format"})

NOT_JSON: Any = object()
"""What :func:`load_body` returns for a body that is not JSON."""

_F32 = np.dtype("<f4")


# ---------------------------------------------------------------------------------------------
# Errors


def error_body(
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> bytes:
    """Together's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


class RequestError(Exception):
    """A request Together would refuse: the status and the fields of its error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


def model_not_available(name: str) -> RequestError:
    """Together's 404 for a model it does not serve."""
    return RequestError(
        404,
        f"Unable to access model {name}. Please visit https://api.together.ai/models "
        "to view the list of supported models.",
        code="model_not_available",
    )


def authorized(header: str, api_key: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``api_key`` as a bearer key (compared in
    constant time; any or none when the server has no key: None or "")."""
    if not api_key:
        return True
    scheme, _, key = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        key.strip().encode(), api_key.encode()
    )


# ---------------------------------------------------------------------------------------------
# Requests


@attrs.define
class Parsed:
    """A valid embeddings request."""

    model: str
    texts: list[str]
    encoding: str  # "float" | "base64"


def load_body(raw: bytes) -> Any:
    """The decoded JSON body, or :data:`NOT_JSON`."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return NOT_JSON


def parse_request(body: Any, encoding_mode: EncodingMode = "honour") -> Parsed:
    """Check a decoded body's shape the way Together does, in its order; raise
    :class:`RequestError` (400) with Together's wording. The model name and the number of
    inputs are the caller's to check next (:func:`check_count`)."""
    if body is NOT_JSON:
        raise RequestError(400, "Request body is not valid JSON")
    if not isinstance(body, dict):
        raise RequestError(400, "Request body must be a JSON object")
    allowed = ALLOWED_ARGS if encoding_mode != "reject" else ALLOWED_ARGS - {"encoding_format"}
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise RequestError(400, f"Unrecognized request arguments supplied: {', '.join(unknown)}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "'model' is required and must be a non-empty string", param="model")
    if "input" not in body:
        raise RequestError(400, "'input' is required", param="input")
    texts = body["input"]
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list):
        raise RequestError(400, "'input' must be a string or a list of strings", param="input")
    if not texts:
        raise RequestError(400, "'input' must not be an empty list", param="input")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(
                400, f"'input[{i}]' must be a string, got {type(text).__name__}", param="input"
            )
    encoding = "float"
    fmt = body.get("encoding_format")
    if encoding_mode == "honour" and fmt is not None:
        if fmt not in ("float", "base64"):
            raise RequestError(
                400,
                f"'encoding_format' must be 'float' or 'base64', got {fmt!r}",
                param="encoding_format",
            )
        encoding = fmt
    return Parsed(model=model, texts=texts, encoding=encoding)


def check_count(texts: list[str], maximum: int | None, status: int = 413) -> None:
    """Refuse more than ``maximum`` inputs in one request (None: no limit)."""
    if maximum is not None and len(texts) > maximum:
        raise RequestError(
            status, f"Too many inputs: got {len(texts)}, the maximum is {maximum}", param="input"
        )


# ---------------------------------------------------------------------------------------------
# Responses

LIST_HEAD = b'{"object":"list","data":['
"""The start of an embeddings response body; items follow, comma-separated."""
ITEM = b'{"object":"embedding","index":%d,"embedding":%s}'
"""One item: its index and its vector as JSON (an array of floats, or a quoted base64 string)."""
_ITEM_B64 = b'{"object":"embedding","index":%d,"embedding":"%s"}'


def list_tail(model: str, tokens: int | None) -> bytes:
    """What closes a response body after its items (``tokens`` None: no ``usage``)."""
    tail = b'],"model":' + orjson.dumps(model)
    if tokens is not None:
        tail += b',"usage":{"prompt_tokens":%d,"total_tokens":%d}' % (tokens, tokens)
    return tail + b"}"


def encode_vector(row: np.ndarray, b64: bool) -> bytes:
    """One vector as the JSON value of ``embedding``: the shortest decimal that reads back as
    each float32 (orjson), or the quoted base64 of its little-endian float32 bytes."""
    if b64:
        return b'"' + base64.b64encode(row.astype(_F32, copy=False).tobytes()) + b'"'
    return orjson.dumps(row.astype(np.float32, copy=False), option=orjson.OPT_SERIALIZE_NUMPY)


def render_rows(vectors: np.ndarray, start: int, stop: int, b64: bool) -> bytes:
    """Items ``start..stop`` of ``data``, comma-joined, preceded by :data:`LIST_HEAD` for the
    first slice and by a comma for the others: consecutive slices and :func:`list_tail`
    concatenate into the whole body."""
    rows = vectors[start:stop]
    if b64:
        items = [
            _ITEM_B64 % (start + i, base64.b64encode(row.tobytes()))
            for i, row in enumerate(rows.astype(_F32, copy=False))
        ]
    else:
        items = [
            ITEM % (start + i, orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY))
            for i, row in enumerate(rows.astype(np.float32, copy=False))
        ]
    return (b"," if start else LIST_HEAD) + b",".join(items)


def render_response(model: str, vectors: np.ndarray, tokens: int | None, encoding: str) -> bytes:
    """A whole embeddings response body for ``vectors`` (row ``i`` is ``data[i]``)."""
    return render_rows(vectors, 0, len(vectors), encoding == "base64") + list_tail(model, tokens)


def model_entry(name: str, **fields: Any) -> dict[str, Any]:
    """One ``/v1/models`` entry for an embedding model."""
    return {"id": name, "object": "model", "type": "embedding", **fields}


def model_list(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``GET /v1/models`` answer."""
    return {"object": "list", "data": entries}
