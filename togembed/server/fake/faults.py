"""Scripted faults: what a test can ask the fake server to do wrong, one request at a time.

Owns the fault kinds (:data:`FAULT_KINDS`), :class:`Fault` (a parsed spec such as
``"429:retry-after=1"``), :class:`FaultQueue` (specs checked as they are queued, so a typo
fails in the test), the statuses a fault can answer with, and :func:`mangle_items`, what the
body faults do to an answer's items.

May import: the standard library, attrs, ``vectors`` and ``..protocol`` (pure). Pure: how a
fault goes on the wire is ``wire``'s.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable
from typing import Any

import attrs

from ..protocol import encode_vector
from .vectors import fake_embedding

__all__ = [
    "BODY_KINDS",
    "CONNECTION_KINDS",
    "FAULT_KINDS",
    "HTML_STATUSES",
    "JSON_STATUSES",
    "STATUS_KINDS",
    "Fault",
    "FaultQueue",
    "fmt_num",
    "mangle_items",
]

HTML_STATUSES = {
    500: "Internal Server Error",
    502: "Bad Gateway",
    504: "Gateway Timeout",
    520: "Web Server Returned an Unknown Error",
    524: "A Timeout Occurred",
    529: "Site is overloaded",
}
"""Statuses a proxy in front of Together answers with an HTML page, and their reasons."""
JSON_STATUSES: dict[int, tuple[str, str, str | None]] = {
    400: ("Bad request (injected fault)", "invalid_request_error", None),
    401: ("Invalid API key provided", "invalid_request_error", "invalid_api_key"),
    403: ("You do not have access to this resource", "invalid_request_error", None),
    404: ("Not found (injected fault)", "invalid_request_error", "model_not_available"),
    408: ("Request timed out", "request_timeout", None),
    409: ("Conflict (injected fault)", "invalid_request_error", None),
    422: ("Unprocessable request (injected fault)", "invalid_request_error", None),
}
"""Statuses answered with Together's JSON error body: status -> (message, type, code)."""
STATUS_KINDS = {str(s) for s in (*HTML_STATUSES, *JSON_STATUSES, 429, 503)}
CONNECTION_KINDS = {"drop_fin", "drop_rst"}
BODY_KINDS = {
    "truncate",
    "malformed",
    "shuffle",
    "missing_index",
    "duplicate_index",
    "wrong_dim",
    "wrong_count",
}
FAULT_KINDS: frozenset[str] = frozenset(
    STATUS_KINDS | CONNECTION_KINDS | BODY_KINDS | {"slow", "html200"}
)
"""Every kind accepted by :class:`Fault`."""

_PARAM_NAMES = {
    "retry-after": "retry_after",
    "retry-after-ms": "retry_after_ms",
    "reset": "reset",
    "date": "date",
    "type": "type",
    "delay": "delay",
}


def _check_kind(_: Fault, __: attrs.Attribute[str], kind: str) -> None:
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")


@attrs.frozen
class Fault:
    """One scripted misbehaviour, consumed by exactly one ``POST /v1/embeddings``.

    ``retry_after``/``retry_after_ms``/``reset``/``date``/``type`` only matter for 429s;
    ``delay`` only for ``slow``.
    """

    kind: str = attrs.field(validator=_check_kind)
    retry_after: float | None = None
    retry_after_ms: float | None = None
    reset: float | None = None
    date: float | None = None
    type: str | None = None
    delay: float = 0.0

    @classmethod
    def parse(cls, spec: str | Fault) -> Fault:
        """Parse ``"kind[:k=v,k=v]"``, e.g. ``"429:retry-after=1,type=credit_limit"`` or
        ``"slow:0.5"`` (a bare number after ``slow:`` is the delay)."""
        if isinstance(spec, Fault):
            return spec
        kind, _, rest = spec.strip().partition(":")
        kwargs: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in rest.replace(";", ",").split(","))):
            key, eq, value = part.partition("=")
            if not eq and kind == "slow":
                key, value = "delay", key
            name = _PARAM_NAMES.get(key.strip().lower().replace("_", "-"))
            if name is None or (not eq and kind != "slow"):
                raise ValueError(f"bad fault parameter {part!r} in {spec!r}")
            kwargs[name] = value.strip() if name == "type" else float(value)
        return cls(kind.strip().lower(), **kwargs)

    def __str__(self) -> str:
        params = [
            f"{key}={fmt_num(v) if isinstance(v, float) else v}"
            for key, name in _PARAM_NAMES.items()
            if (v := getattr(self, name)) is not None and not (name == "delay" and v == 0.0)
        ]
        return self.kind + (":" + ",".join(params) if params else "")


class FaultQueue(deque[Fault]):
    """A deque of :class:`Fault` that also takes spec strings (parsed on the way in, so a
    typo fails in the test, not inside the server)."""

    def __init__(self, items: Iterable[Fault | str] = ()) -> None:
        super().__init__(Fault.parse(f) for f in items)

    def append(self, item: Fault | str) -> None:
        super().append(Fault.parse(item))

    def appendleft(self, item: Fault | str) -> None:
        super().appendleft(Fault.parse(item))

    def extend(self, items: Iterable[Fault | str]) -> None:
        super().extend(Fault.parse(f) for f in items)

    def extendleft(self, items: Iterable[Fault | str]) -> None:
        super().extendleft(Fault.parse(f) for f in items)

    def insert(self, i: int, item: Fault | str) -> None:
        super().insert(i, Fault.parse(item))


def fmt_num(value: float) -> str:
    """A number as a header or a spec writes it: ``1``, not ``1.0``."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def mangle_items(
    items: list[tuple[int | None, bytes]],
    kind: str | None,
    rng: random.Random,
    texts: list[str],
    dim: int,
    b64: bool,
) -> None:
    """Apply a body fault to an answer's ``(index, embedding)`` items, in place (no index:
    the item has none)."""
    if kind == "shuffle" and len(items) > 1:
        order = items[:]
        rng.shuffle(items)
        if items == order:
            items[:] = items[1:] + items[:1]
    elif kind == "missing_index":
        items[-1] = (None, items[-1][1])
    elif kind == "duplicate_index":
        if len(items) > 1:
            items[-1] = (items[0][0], items[-1][1])
        else:
            items.append(items[0])
    elif kind == "wrong_count":
        items.pop()
    elif kind == "wrong_dim":
        items[-1] = (items[-1][0], encode_vector(fake_embedding(texts[-1], dim)[:-1], b64))
