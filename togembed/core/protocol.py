"""Together's wire protocol, request side, without I/O: the request body, the request id of an
answer, and the redaction of secrets from every server text we keep. Answers are read by
``answers`` (embeddings) and ``status_errors`` (refusals)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

__all__ = ["REDACTED", "encode_request", "redact", "request_id_of"]

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
