"""Decoding a network configuration the way the reference plugins' Go decoder does, for every plugin.

Runtimes rely on Go's ``encoding/json`` semantics, so pycni applies them in one
place, before a plugin sees its configuration:

* an object key matches an option regardless of letter case (an exact match
  wins; of several spellings the last one in the document wins, as in Go);
* ``null`` means absent, and unknown keys are ignored (kept as they are);
* a value of the wrong JSON type is the spec's error 7 naming the option
  (``runtimeConfig.portMappings[0].hostPort must be an integer``), except on
  DEL, which must not fail for a reason only ADD cares about: there the bad
  value is dropped, as if absent, with a warning on stderr.

A plugin declares its options as a ``Schema`` (``SCHEMA`` in its config
module); the skeleton decodes with it, and the plugin reads plain dicts whose
known keys have their canonical spelling and the right types.
``get_field`` remains for reading a decoded mapping with a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Union

from cni_plugins.spec.errors import ERR_DECODE, ERR_INVALID_CONFIG, CNIError

_WHAT = {
    int: "an integer",
    bool: "true or false",
    str: "a string",
    list: "a list",
    dict: "an object",
    float: "a number",
}


class AnyValue:
    """A value the schema does not look into (prevResult, an IPAM section owned by the IPAM plugin)."""


ANY = AnyValue()


@dataclass
class ListOf:
    item: "Spec"


@dataclass
class Schema:
    """An object: canonical option name -> its spec. Keys not listed are kept untouched."""

    fields: dict[str, "Spec"] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_lower = {name.lower(): name for name in self.fields}

    def extend(self, **more: "Spec") -> "Schema":
        return Schema({**self.fields, **more})

    def canonical(self, key: str) -> str | None:
        if key in self.fields:
            return key
        return self._by_lower.get(key.lower())


Spec = Union[type, Schema, ListOf, AnyValue]

# The keys every network configuration may carry (the spec's, and what runtimes inject).
COMMON = Schema(
    {
        "cniVersion": str,
        "name": str,
        "type": str,
        "prevResult": ANY,
        "capabilities": dict,
        "runtimeConfig": Schema(),
        "args": Schema(),
        "dns": Schema({"nameservers": ListOf(str), "domain": str, "search": ListOf(str), "options": ListOf(str)}),
    }
)


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def is_kind(value: Any, kind: type) -> bool:
    """Whether a decoded JSON value has ``kind`` (bool is not an int; an int is a float)."""
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _describe(spec: Spec) -> str:
    if isinstance(spec, Schema):
        return "an object"
    if isinstance(spec, ListOf):
        return "a list"
    return _WHAT.get(spec, getattr(spec, "__name__", str(spec)))  # type: ignore[arg-type]


class _Dropped(Exception):
    pass


def decode(
    conf: Mapping[str, Any], schema: Schema, *, lenient: bool = False, warn: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """``conf`` with known keys in canonical spelling, nulls removed, types checked (see module doc)."""

    def bad(path: str, spec: Spec, value: Any) -> Any:
        if lenient:
            if warn is not None:
                warn(f"ignoring {path}: it must be {_describe(spec)}, got {json_type(value)}")
            raise _Dropped
        raise CNIError(
            ERR_INVALID_CONFIG,
            f"{path} must be {_describe(spec)}, got {json_type(value)}",
            f"fix the option {path!r} in the network configuration",
        )

    def value_of(spec: Spec, value: Any, path: str) -> Any:
        if isinstance(spec, AnyValue):
            return value
        if isinstance(spec, Schema):
            if not isinstance(value, dict):
                return bad(path, spec, value)
            return obj(spec, value, path)
        if isinstance(spec, ListOf):
            if not isinstance(value, list):
                return bad(path, spec, value)
            out = []
            for n, item in enumerate(value):
                if item is None:
                    continue
                try:
                    out.append(value_of(spec.item, item, f"{path}[{n}]"))
                except _Dropped:
                    continue
            return out
        if not is_kind(value, spec):
            return bad(path, spec, value)
        return value

    def obj(spec: Schema, raw: Mapping[str, Any], where: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in raw.items():
            name = spec.canonical(key)
            if name is None:
                out[key] = value  # unknown: not ours to judge
                continue
            out.pop(name, None)  # a later spelling of the same option wins
            if value is None:
                continue
            try:
                out[name] = value_of(spec.fields[name], value, f"{where}.{name}" if where else name)
            except _Dropped:
                continue
        return out

    return obj(schema, conf, "")


def get_field(
    conf: Mapping[str, Any], key: str, kind: type, default: Any = None, *, where: str = "", code: int = ERR_DECODE
) -> Any:
    """``conf[key]`` checked to be of ``kind``; ``default`` when absent or null."""
    value = conf.get(key)
    if value is None:
        return default
    if not is_kind(value, kind):
        name = f"{where}.{key}" if where else key
        raise CNIError(code, f"failed to load netconf: {name} must be {_WHAT.get(kind, kind.__name__)}, got {value!r}")
    return value
