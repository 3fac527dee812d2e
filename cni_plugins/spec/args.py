"""Parsing of CNI_ARGS ("K1=V1;K2=V2") with the reference's IgnoreUnknown rule."""

from __future__ import annotations

from cni_plugins.spec.errors import ERR_INVALID_ENV, CNIError

_TRUE = {"1", "true"}
_FALSE = {"0", "false", ""}


def parse_bool(value: str, what: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise CNIError(ERR_INVALID_ENV, f"{what}: {value!r} is not a boolean", "use true, false, 1 or 0")


def split_cni_args(raw: str, allow_empty_value: bool = True) -> list[tuple[str, str]]:
    """CNI_ARGS "K1=V1;K2=V2" as (key, value) pairs in order, duplicates kept.

    Plugins accept ``K=`` (an empty value) as the reference skeleton does; the
    runtime side refuses it, as cnitool does (``allow_empty_value=False``).
    """
    pairs: list[tuple[str, str]] = []
    for item in raw.split(";") if raw else []:
        if not item and allow_empty_value:
            continue
        key, sep, value = item.partition("=")
        if not sep or "=" in value or not key or (not value and not allow_empty_value):
            raise CNIError(
                ERR_INVALID_ENV,
                f"CNI_ARGS: invalid pair {item!r}",
                "CNI_ARGS is KEY=VALUE pairs separated by ';', e.g. IP=10.1.0.5;IgnoreUnknown=1",
            )
        pairs.append((key, value))
    return pairs


def parse_cni_args(raw: str) -> dict[str, str]:
    """Split CNI_ARGS into a dict (a later pair wins); every pair must be KEY=VALUE."""
    return dict(split_cni_args(raw))


def load_args(raw: str, known: set[str] | frozenset[str]) -> dict[str, str]:
    """Parse CNI_ARGS keeping the keys a plugin understands.

    An unknown key is an error unless the runtime sets IgnoreUnknown=1, as the
    reference plugins do; K8S_POD_* keys are always accepted since every
    Kubernetes runtime sends them.
    """
    pairs = parse_cni_args(raw)
    ignore_unknown = parse_bool(pairs.pop("IgnoreUnknown", "false"), "CNI_ARGS IgnoreUnknown")
    out: dict[str, str] = {}
    for key, value in pairs.items():
        if key in known:
            out[key] = value
        elif not ignore_unknown:
            raise CNIError(
                ERR_INVALID_ENV,
                f"CNI_ARGS: unknown argument {key!r}",
                "set IgnoreUnknown=1 in CNI_ARGS to let the plugin skip arguments it does not use",
            )
    return out
