"""Response values: the shape of Together's (and OpenAI's) embeddings answer.

They serialise like the peers' pydantic models (openai-python's ``BaseModel``), so code written
for ``openai`` / ``together`` responses works on ours: ``model_dump()``, ``model_dump_json()``,
``to_dict()``, ``to_json()`` and ``dict(resp)``, with the common keyword arguments.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import attrs
import orjson

__all__ = ["Embedding", "EmbeddingResponse", "Usage"]


def _pick(spec: Any, key: object) -> Any:
    """What an include/exclude spec (pydantic's: a set of keys, or a dict of key -> True or a
    nested spec, with ``"__all__"`` for every item of a list) says about ``key``: None when it
    does not name it, True for the whole value, or the nested spec."""
    if spec is None:
        return None
    if isinstance(spec, (set, frozenset, list, tuple)):
        return True if key in spec else None
    if isinstance(spec, dict):
        value = spec.get(key, spec.get("__all__"))
        if value is None or value is False:
            return None
        return True if value is True or value is ... else value
    raise TypeError(f"include/exclude must be a set or a dict, not {type(spec).__name__}")


def _nested(spec: Any) -> Any:
    return None if spec is True else spec


@attrs.frozen
class _Flags:
    exclude_unset: bool
    exclude_defaults: bool
    exclude_none: bool


class _Serializable:
    """``model_dump`` & co for attrs classes. ``_FIELDS`` lists the fields in the peers' order;
    a field is "unset" when it is an optional field the server did not send (None)."""

    __slots__ = ()
    _FIELDS: ClassVar[tuple[str, ...]] = ()
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset()

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        """``dict(resp)``: field name -> value, one level deep (as pydantic models do)."""
        for name in self._FIELDS:
            yield name, getattr(self, name)

    def _dump(self, include: Any, exclude: Any, flags: _Flags) -> dict[str, Any]:
        out: dict[str, Any] = {}
        defaults = {a.name: a.default for a in attrs.fields(type(self))}  # type: ignore[misc]
        for name in self._FIELDS:
            inc = True if include is None else _pick(include, name)
            exc = _pick(exclude, name)
            if inc is None or exc is True:
                continue
            value = getattr(self, name)
            if value is None and (
                flags.exclude_none or (flags.exclude_unset and name in self._OPTIONAL)
            ):
                continue
            # Only optional fields have a default in the peers' models (``object`` is a
            # required Literal there), so only they can be left out as "default".
            if flags.exclude_defaults and name in self._OPTIONAL and value == defaults[name]:
                continue
            out[name] = _value(value, _nested(inc), _nested(exc), flags)
        return out

    def model_dump(
        self,
        *,
        mode: Literal["json", "python"] | str = "python",
        include: Any = None,
        exclude: Any = None,
        context: Any = None,
        by_alias: bool | None = None,
        exclude_unset: bool = False,
        exclude_defaults: bool = False,
        exclude_none: bool = False,
        round_trip: bool = False,
        warnings: bool | str = True,
        serialize_as_any: bool = False,
        fallback: Any = None,
    ) -> dict[str, Any]:
        """A dict of the fields (nested values as dicts and lists), as pydantic's. Our values
        are JSON types already, so ``mode="json"`` and ``"python"`` give the same."""
        if mode not in ("json", "python"):
            raise ValueError("mode must be either 'json' or 'python'")
        return self._dump(include, exclude, _Flags(exclude_unset, exclude_defaults, exclude_none))

    def model_dump_json(
        self,
        *,
        indent: int | None = None,
        include: Any = None,
        exclude: Any = None,
        context: Any = None,
        by_alias: bool | None = None,
        exclude_unset: bool = False,
        exclude_defaults: bool = False,
        exclude_none: bool = False,
        round_trip: bool = False,
        warnings: bool | str = True,
        fallback: Any = None,
        serialize_as_any: bool = False,
    ) -> str:
        """JSON text of ``model_dump``: compact unless ``indent`` is given."""
        data = self._dump(include, exclude, _Flags(exclude_unset, exclude_defaults, exclude_none))
        return _json(data, indent)

    def to_dict(
        self,
        *,
        mode: Literal["json", "python"] = "python",
        use_api_names: bool = True,
        exclude_unset: bool = True,
        exclude_defaults: bool = False,
        exclude_none: bool = False,
        warnings: bool = True,
    ) -> dict[str, Any]:
        """The dict the API sent (openai-python's ``to_dict``): fields it did not send, such as
        a missing ``usage``, are left out unless ``exclude_unset=False``."""
        return self.model_dump(
            mode=mode,
            exclude_unset=exclude_unset,
            exclude_defaults=exclude_defaults,
            exclude_none=exclude_none,
        )

    def to_json(
        self,
        *,
        indent: int | None = 2,
        use_api_names: bool = True,
        exclude_unset: bool = True,
        exclude_defaults: bool = False,
        exclude_none: bool = False,
        warnings: bool = True,
    ) -> str:
        """``to_dict`` as JSON text, indented by 2 unless ``indent=None``."""
        return self.model_dump_json(
            indent=indent,
            exclude_unset=exclude_unset,
            exclude_defaults=exclude_defaults,
            exclude_none=exclude_none,
        )


def _value(value: Any, include: Any, exclude: Any, flags: _Flags) -> Any:
    if isinstance(value, _Serializable):
        return value._dump(include, exclude, flags)
    if isinstance(value, list):
        if include is None and exclude is None:
            if value and isinstance(value[0], _Serializable):
                return [_value(v, None, None, flags) for v in value]
            return list(value)
        out = []
        for i, item in enumerate(value):
            inc = True if include is None else _pick(include, i)
            exc = _pick(exclude, i)
            if inc is None or exc is True:
                continue
            out.append(_value(item, _nested(inc), _nested(exc), flags))
        return out
    if isinstance(value, dict):
        return dict(value)
    return value


def _json(data: dict[str, Any], indent: int | None) -> str:
    if indent is None:
        return orjson.dumps(data).decode()
    if indent == 2:
        return orjson.dumps(data, option=orjson.OPT_INDENT_2).decode()
    return json.dumps(data, indent=indent, ensure_ascii=False)


@attrs.frozen
class Usage(_Serializable):
    """Token counts. Together's spec does not promise them, so a response may carry none."""

    _FIELDS: ClassVar[tuple[str, ...]] = ("prompt_tokens", "total_tokens")

    prompt_tokens: int
    total_tokens: int


@attrs.frozen
class Embedding(_Serializable):
    """One vector: a list of floats, or base64 if ``encoding_format="base64"`` was asked."""

    _FIELDS: ClassVar[tuple[str, ...]] = ("embedding", "index", "object")

    embedding: list[float] | str
    index: int
    object: str = "embedding"


@attrs.frozen
class EmbeddingResponse(_Serializable):
    """All vectors of one ``embeddings.create`` call; ``data[i].index == i``, any batch count."""

    _FIELDS: ClassVar[tuple[str, ...]] = ("data", "model", "object", "usage")
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset({"usage"})

    data: list[Embedding]
    model: str
    usage: Usage | None = None
    object: str = "list"
