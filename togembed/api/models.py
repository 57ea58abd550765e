"""``client.models.list()``: the models a key can use, from ``GET {base_url}/models``.

Servers answer in two shapes: Together a bare JSON list whose entries carry ``type``
("embedding", "chat", ...); OpenAI ``{"object": "list", "data": [...]}`` without a type
(``togembed serve`` uses that shape and adds ``type: "embedding"``). Parsing is pure; the
request goes through the client's transport with its retries and typed errors.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, overload

import attrs
import orjson

from ..core.errors import APIResponseValidationError, APITimeoutError
from ..core.protocol import redact, request_id_of
from ..core.retry import call_with_retries
from ..core.status_errors import error_from_response
from ..core.types import _Serializable
from .arguments import check_timeout

if TYPE_CHECKING:
    from .async_client import AsyncClient

__all__ = ["AsyncModels", "Model", "ModelList", "parse_models"]

EMBEDDING = "embedding"


@attrs.frozen
class Model(_Serializable):
    """One entry of the listing. ``type`` is None when the server does not say (OpenAI's
    shape); ``raw`` is the entry as the server sent it (pricing, display name, ...)."""

    _FIELDS: ClassVar[tuple[str, ...]] = (
        "id",
        "object",
        "created",
        "owned_by",
        "type",
        "context_length",
    )
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset(
        {"created", "owned_by", "type", "context_length"}
    )

    id: str
    type: str | None = None
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None
    context_length: int | None = None
    raw: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)


@attrs.frozen
class ModelList:
    """What ``models.list()`` returns: iterate it, index it, or read ``.data`` (as with the
    peers' pages). ``types_known`` is False when the server gives no types: then every model is
    listed, embedding or not."""

    data: list[Model]
    types_known: bool

    def __iter__(self) -> Iterator[Model]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    @overload
    def __getitem__(self, i: int) -> Model: ...
    @overload
    def __getitem__(self, i: slice) -> list[Model]: ...
    def __getitem__(self, i: int | slice) -> Model | list[Model]:
        return self.data[i]

    @property
    def ids(self) -> list[str]:
        return [m.id for m in self.data]


def _int(value: object) -> int | None:
    return value if type(value) is int else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_models(
    body: bytes, *, request_id: str | None = None, secrets: Sequence[str] = ()
) -> list[Model]:
    """Every model of a ``GET /models`` answer, in the server's order."""

    def invalid(message: str) -> APIResponseValidationError:
        return APIResponseValidationError(
            message, body=redact(body[:2000], secrets), request_id=request_id
        )

    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"models list is not valid JSON ({exc})") from exc
    entries = doc.get("data") if isinstance(doc, dict) else doc
    if not isinstance(entries, list):
        raise invalid("models list is neither a JSON list nor {'data': [...]}")
    models = []
    for entry in entries:
        if not isinstance(entry, dict) or not _str(entry.get("id")):
            raise invalid("a models list entry has no 'id'")
        models.append(
            Model(
                id=entry["id"],
                type=_str(entry.get("type")),
                object=_str(entry.get("object")) or "model",
                created=_int(entry.get("created")),
                owned_by=_str(entry.get("owned_by")) or _str(entry.get("organization")),
                context_length=_int(entry.get("context_length")),
                raw=entry,
            )
        )
    return models


def select_models(models: list[Model], *, all: bool) -> ModelList:
    """Embedding models only, unless ``all`` or the server gives no types (then all, and
    ``types_known`` says so). Entries without a type in a typed list are kept: they may embed."""
    types_known = any(m.type is not None for m in models)
    if types_known and not all:
        models = [m for m in models if m.type in (EMBEDDING, None)]
    return ModelList(data=models, types_known=types_known)


class AsyncModels:
    """``client.models``: what this key can use at this base URL."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def list(self, *, all: bool = False, timeout: float | None = None) -> ModelList:
        """The embedding models the server lists for this key (``all=True``: every model).
        Same retries and typed errors as embeddings; ``timeout`` bounds the whole call."""
        c = self._client
        c._check_api_key()
        get = getattr(c._transport, "get", None)
        if get is None:
            raise TypeError(
                "models.list() needs a transport with get(url, headers, timeout); "
                f"{type(c._transport).__name__} has none"
            )
        settings = c._settings
        url = f"{c.base_url}/models"
        headers = {k: v for k, v in settings.headers.items() if k.lower() != "content-type"}
        deadline = None if timeout is None else time.monotonic() + check_timeout(timeout)

        async def attempt() -> list[Model]:
            limit = c.timeout
            if deadline is not None:
                limit = min(limit, deadline - time.monotonic())
                if limit <= 0:
                    raise APITimeoutError(f"models.list() did not finish within {timeout:g} s")
            resp = await get(url, headers, limit)
            if not 200 <= resp.status < 300:
                raise error_from_response(
                    resp.status,
                    resp.headers,
                    resp.body,
                    secrets=settings.secrets,
                    about_model=False,
                )
            return parse_models(
                resp.body, request_id=request_id_of(resp.headers), secrets=settings.secrets
            )

        models = await call_with_retries(
            attempt,
            c.retry,
            describe=f"GET {url}",
            deadline=deadline,
            on_retry=settings.retried,  # counted, and a server that is down says so
        )
        return select_models(models, all=all)
