"""Typed reading of network-configuration fields, one rule for every plugin.

``get_field(conf, "mtu", int, 0)`` returns the value when it has the right
JSON type, the default when the key is absent or ``null`` (as Go's decoder
treats them), and otherwise raises the spec's decode error naming the option
and what it should be. Booleans are never taken for integers.
"""
from __future__ import annotations

from typing import Any, Mapping

from cni_plugins.spec.errors import ERR_DECODE, CNIError

_WHAT = {int: "an integer", bool: "true or false", str: "a string", list: "a list", dict: "an object",
         float: "a number"}


def is_kind(value: Any, kind: type) -> bool:
    """Whether a decoded JSON value has ``kind`` (bool is not an int; an int is a float)."""
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def get_field(conf: Mapping[str, Any], key: str, kind: type, default: Any = None, *, where: str = "",
              code: int = ERR_DECODE) -> Any:
    """``conf[key]`` checked to be of ``kind``; ``default`` when absent or null."""
    value = conf.get(key)
    if value is None:
        return default
    if not is_kind(value, kind):
        name = f"{where}.{key}" if where else key
        raise CNIError(code, f"failed to load netconf: {name} must be {_WHAT.get(kind, kind.__name__)}, "
                       f"got {value!r}")
    return value
