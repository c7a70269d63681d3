"""Dataclasses that are JSON objects: `to_dict`, `from_dict` and a JSON Schema, all read from
their type hints, so a record's fields are its format and renaming or retyping a field changes
the schema with it. Kept free of torch (the dashboard renders without it) and of any schema
library (a few hints need a few lines).

Hints a record may use: bool, int, float (a JSON number: ints pass), str, `dict` (any JSON
object), `list[T]`, `dict[str, T]`, `T | None`, and other records, nested or recursive. A field
with metadata OMIT_NONE is left out of the object while it is None (and is optional in the
schema); every other field is always written and required when read. Metadata {"const": v}
pins a field's value (a format version).

Reading checks the shape and says where it is wrong: required keys present, no unknown keys,
records and lists where the hints put them, and the type of every scalar field. Elements of
lists of scalars are taken as they are: a feature report holds millions of them, and the
dashboard shows an odd one as "not measured". The JSON Schema describes them too.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import lru_cache
from typing import Any, Callable, NamedTuple

from saelab.errors import DataError

OMIT_NONE = {"omit_none": True}
JSON_SCHEMA_DRAFT = "https://json-schema.org/draft/2020-12/schema"
_NOT_SET = object()


class Record:
    """Base of the JSON-object dataclasses: subclasses are @dataclass with supported hints."""

    def to_dict(self) -> dict:
        return dump_fields(type(self), self)

    @classmethod
    def from_dict(cls, data, where: str = ""):
        """The record from its JSON object; a DataError names the first place it is wrong."""
        return _load_fields(cls, data, where or cls.__name__)


class _Codec(NamedTuple):
    dump: Callable[[Any], Any]  # value -> JSON value
    load: Callable[[Any, str], Any]  # (JSON value, where) -> value
    schema: Callable[[dict], dict]  # $defs being built -> this type's schema
    leaf: bool = False  # a scalar: lists of it are taken without a per-element pass


class _Field(NamedTuple):
    name: str
    codec: _Codec
    schema: Callable[[dict], dict]  # without "null" for OMIT_NONE fields: absent, never null
    omit_none: bool
    const: Any


def dump_fields(cls: type, obj) -> dict:
    """The JSON object of `obj` as an instance of record class `cls` (a subclass's extra fields
    left out)."""
    out = {}
    for f in _fields(cls):
        value = getattr(obj, f.name)
        if value is None and f.omit_none:
            continue
        out[f.name] = f.codec.dump(value)
    return out


def _load_fields(cls: type, data, where: str):
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object, got {_kind(data)}")
    fields = _fields(cls)
    names = [f.name for f in fields]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise DataError(f"{where}: unknown key {unknown[0]!r} (valid: {', '.join(names)})")
    kwargs = {}
    for f in fields:
        if f.name not in data:
            if not f.omit_none:
                raise DataError(f"{where}: missing key {f.name!r}")
            continue
        kwargs[f.name] = f.codec.load(data[f.name], f"{where}.{f.name}")
        if f.const is not _NOT_SET and kwargs[f.name] != f.const:
            raise DataError(f"{where}.{f.name}: expected {f.const!r}, got {kwargs[f.name]!r}")
    return cls(**kwargs)


@lru_cache(maxsize=None)
def _fields(cls: type) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        omit = bool(f.metadata.get("omit_none"))
        codec = _codec(hints[f.name])
        schema = _codec(_without_none(hints[f.name])).schema if omit else codec.schema
        out.append(_Field(f.name, codec, schema, omit, f.metadata.get("const", _NOT_SET)))
    return tuple(out)


def _without_none(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if _is_optional(hint) else hint


def _is_optional(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


# ---- one codec per hint -------------------------------------------------------------------------
_SCALARS: dict[type, tuple[str, Callable[[Any], bool]]] = {
    bool: ("boolean", lambda v: isinstance(v, bool)),
    int: ("integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    str: ("string", lambda v: isinstance(v, str)),
}


def _codec(hint) -> _Codec:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_optional(hint):
        if len(args) != 2:
            raise TypeError(f"a record field may be one type or None, not {hint}")
        return _optional(_codec(_without_none(hint)))
    if hint in _SCALARS:
        return _scalar(hint)
    if hint is dict:
        return _Codec(_same, _checked(dict, "a JSON object"), lambda defs: {"type": "object"})
    if origin is list:
        return _list(_codec(args[0]))
    if origin is dict and args[0] is str:
        return _mapping(_codec(args[1]))
    if isinstance(hint, type) and issubclass(hint, Record):
        return _record(hint)
    raise TypeError(f"records cannot hold {hint!r}")


def _same(value):
    return value


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _checked(kind: type, what: str) -> Callable[[Any, str], Any]:
    def load(value, where: str):
        if not isinstance(value, kind):
            raise DataError(f"{where}: expected {what}, got {_kind(value)}")
        return value
    return load


def _scalar(hint: type) -> _Codec:
    name, ok = _SCALARS[hint]

    def load(value, where: str):
        if not ok(value):
            raise DataError(f"{where}: expected {name}, got {_kind(value)} {value!r:.40}")
        return value
    return _Codec(_same, load, lambda defs: {"type": name}, leaf=True)


def _optional(inner: _Codec) -> _Codec:
    def schema(defs: dict) -> dict:
        s = inner.schema(defs)
        return {"type": [s["type"], "null"]} if set(s) == {"type"} else {"anyOf": [s, {"type": "null"}]}
    return _Codec(lambda v: None if v is None else inner.dump(v),
                  lambda v, where: None if v is None else inner.load(v, where), schema, inner.leaf)


def _list(inner: _Codec) -> _Codec:
    check = _checked(list, "a list")
    if inner.leaf:
        dump, load = _same, check
    else:
        def dump(value):
            return [inner.dump(v) for v in value]

        def load(value, where: str):
            return [inner.load(v, f"{where}[{i}]") for i, v in enumerate(check(value, where))]
    return _Codec(dump, load, lambda defs: {"type": "array", "items": inner.schema(defs)})


def _mapping(inner: _Codec) -> _Codec:
    check = _checked(dict, "a JSON object")
    return _Codec(lambda value: {k: inner.dump(v) for k, v in value.items()},
                  lambda value, where: {k: inner.load(v, f"{where}.{k}") for k, v in check(value, where).items()},
                  lambda defs: {"type": "object", "additionalProperties": inner.schema(defs)})


def _record(cls: type) -> _Codec:
    """Records dump through their own to_dict (a subclass writes its own fields) and load
    through cls.from_dict (a class may choose a subclass by the data)."""
    return _Codec(lambda value: value.to_dict(), lambda value, where: cls.from_dict(value, where),
                  lambda defs: _ref(cls, defs))


# ---- JSON Schema --------------------------------------------------------------------------------
def json_schema(root: type, *, title: str, description: str = "", extra: tuple[type, ...] = ()) -> dict:
    """The JSON Schema (draft 2020-12) of record class `root`, every record it holds and the
    `extra` ones under "$defs" (by class name). Deterministic: the same classes, the same dict."""
    defs: dict = {}
    ref = _ref(root, defs)
    for cls in extra:
        _ref(cls, defs)
    out = {"$schema": JSON_SCHEMA_DRAFT, "title": title}
    if description:
        out["description"] = description
    return {**out, **ref, "$defs": dict(sorted(defs.items()))}


def _ref(cls: type, defs: dict) -> dict:
    name = cls.__name__
    if name not in defs:
        defs[name] = {}  # reserved first: a recursive record refers to itself
        properties, required = {}, []
        for f in _fields(cls):
            properties[f.name] = f.schema(defs)
            if f.const is not _NOT_SET:
                properties[f.name] = {**properties[f.name], "const": f.const}
            if not f.omit_none:
                required.append(f.name)
        defs[name] = {"type": "object", "description": _doc(cls), "properties": properties,
                      "required": required, "additionalProperties": False}
    return {"$ref": f"#/$defs/{name}"}


def _doc(cls: type) -> str:
    """The class docstring's first paragraph on one line."""
    return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
