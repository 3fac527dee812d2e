"""Parsing and validating one network configuration (``.conflist`` or ``.conf``).

Follows libcni: a ``.conflist`` holds ``name``, ``cniVersion`` (or
``cniVersions``), ``disableCheck``, ``disableGC`` and a list of ``plugins``;
a single-plugin ``.conf``/``.json`` file is wrapped into a list of one.
On top of libcni, everything that later becomes a path or a name is
checked here, before any plugin runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from cni_plugins.spec.errors import ERR_DECODE, ERR_INCOMPATIBLE_VERSION, CNIError
from cni_plugins.spec.skel import validate_network_name
from cni_plugins.spec.version import IMPLICIT_VERSION, SUPPORTED_VERSIONS, parse_version

from .errors import ConfError


@dataclass
class NetworkConfigList:
    """A network: its name, spec version, flags and the plugin chain."""

    name: str
    cni_version: str
    disable_check: bool = False
    disable_gc: bool = False
    plugins: list[dict[str, Any]] = field(default_factory=list)
    path: str | None = None
    # The configuration as a JSON object (for a .conf: the wrapped list).
    raw: dict[str, Any] = field(default_factory=dict)
    # The bytes runtimes cache with a result (libcni caches the list's bytes).
    source_bytes: bytes = b""


def check_plugin_type(plugin_type: Any, path: str | None, field_name: str) -> str:
    """A plugin type names an executable in CNI_PATH and nothing else.

    A type with a path separator, or '.'/'..', would let a configuration run
    any file on the host (the CVE-2021-20206 class of bug), so it is refused.
    """
    if not isinstance(plugin_type, str) or not plugin_type:
        raise ConfError("must be a non-empty string naming a plugin executable", path, field_name)
    if "/" in plugin_type or "\\" in plugin_type or plugin_type in (".", ".."):
        raise ConfError(
            f"{plugin_type!r} is not a plugin name: it must not contain '/' or '\\' nor be '.' or '..'",
            path,
            field_name,
            details="plugins are looked up by name in CNI_PATH; put the executable there instead",
        )
    if "\x00" in plugin_type:
        raise ConfError("must not contain a NUL character", path, field_name)
    return plugin_type


def check_network_name(name: Any, path: str | None, field_name: str | None = "name") -> str:
    """The rule every plugin applies (skel.validate_network_name), reported with file and field."""
    if not isinstance(name, str) or not name:
        raise ConfError("required: a non-empty string naming the network", path, field_name)
    try:
        validate_network_name(name)
    except CNIError:
        raise ConfError(
            f"{name!r} is not a valid network name: use letters, digits, '_', '.' and '-', "
            "starting with a letter or digit",
            path,
            field_name,
        ) from None
    return name


def _check_version(version: Any, path: str | None, field_name: str) -> str:
    if not isinstance(version, str) or not version:
        raise ConfError(f"must be a version string like '1.0.0', got {version!r}", path, field_name)
    try:
        parse_version(version)
    except Exception:
        raise ConfError(f"{version!r} is not a version like '1.0.0'", path, field_name) from None
    return version


def _pick_version(raw: dict[str, Any], path: str | None) -> str:
    """The spec version to use: the highest supported one that the file offers.

    ``cniVersions`` (spec 1.1) lists several versions; like libcni, the highest
    one this implementation supports wins, ``cniVersion`` taking part too.
    """
    single = raw.get("cniVersion")
    if single in (None, ""):
        single = None
    else:
        single = _check_version(single, path, "cniVersion")

    if "cniVersions" not in raw:
        if single is None:
            raise ConfError('required: the CNI spec version of this network, e.g. "1.0.0"', path, "cniVersion")
        if single not in SUPPORTED_VERSIONS:
            raise ConfError(
                f"version {single!r} is not supported",
                path,
                "cniVersion",
                code=ERR_INCOMPATIBLE_VERSION,
                details=f"pycni supports {', '.join(SUPPORTED_VERSIONS)}",
            )
        return single

    offered = raw["cniVersions"]
    if not isinstance(offered, list):
        raise ConfError("must be a list of version strings", path, "cniVersions")
    candidates = [_check_version(v, path, f"cniVersions[{i}]") for i, v in enumerate(offered)]
    if single is not None:
        candidates.append(single)
    usable = [v for v in candidates if v in SUPPORTED_VERSIONS]
    if not usable:
        raise ConfError(
            f"none of {candidates} is supported",
            path,
            "cniVersions",
            code=ERR_INCOMPATIBLE_VERSION,
            details=f"pycni supports {', '.join(SUPPORTED_VERSIONS)}",
        )
    return max(usable, key=parse_version)


def _read_bool(raw: dict[str, Any], key: str, path: str | None) -> bool:
    """A boolean flag: JSON true/false or the strings "true"/"false" (as libcni)."""
    value = raw.get(key, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfError(f'must be true or false (or the string "true"/"false"), got {value!r}', path, key)


def _check_plugin(plugin: Any, where: str, path: str | None) -> dict[str, Any]:
    """Check one plugin entry; ``where`` prefixes field names ('' for a .conf file)."""
    prefix = f"{where}." if where else ""
    if not isinstance(plugin, dict):
        raise ConfError("must be a JSON object describing one plugin", path, where or None)
    check_plugin_type(plugin.get("type"), path, f"{prefix}type")
    caps = plugin.get("capabilities")
    if caps is not None:
        if not isinstance(caps, dict) or not all(isinstance(v, bool) for v in caps.values()):
            raise ConfError("must be an object mapping capability names to true/false", path, f"{prefix}capabilities")
    return plugin


def decode_json(data: bytes, path: str | None) -> dict[str, Any]:
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfError(f"not valid JSON: {exc}", path, code=ERR_DECODE) from None
    if not isinstance(raw, dict):
        raise ConfError("must hold a JSON object", path, code=ERR_DECODE)
    return raw


def parse_conflist(data: bytes, path: str | None = None) -> NetworkConfigList:
    """Parse and validate a ``.conflist`` file's bytes."""
    raw = decode_json(data, path)
    return conflist_from_dict(raw, path, data)


def conflist_from_dict(raw: dict[str, Any], path: str | None, data: bytes) -> NetworkConfigList:
    name = check_network_name(raw.get("name"), path)
    version = _pick_version(raw, path)
    disable_check = _read_bool(raw, "disableCheck", path)
    disable_gc = _read_bool(raw, "disableGC", path)
    plugins = raw.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise ConfError("must be a non-empty list", path, "plugins")
    checked = [_check_plugin(p, f"plugins[{i}]", path) for i, p in enumerate(plugins)]
    return NetworkConfigList(
        name=name,
        cni_version=version,
        disable_check=disable_check,
        disable_gc=disable_gc,
        plugins=checked,
        path=path,
        raw=raw,
        source_bytes=data,
    )


def parse_single_conf(data: bytes, path: str | None = None) -> NetworkConfigList:
    """Parse a single-plugin ``.conf`` file into a list of one plugin.

    As libcni's ConfListFromConf: the list takes the plugin's name and
    cniVersion; a missing cniVersion means 0.1.0, as it always did for
    single-plugin files.
    """
    raw = decode_json(data, path)
    if "plugins" in raw:
        raise ConfError(
            "a single-plugin .conf file must not hold a 'plugins' list; rename it to .conflist", path, "plugins"
        )
    _check_plugin(raw, "", path)
    version = raw.get("cniVersion")
    listed: dict[str, Any] = {
        "cniVersion": IMPLICIT_VERSION if version in (None, "") else version,
        "name": raw.get("name"),
        "plugins": [raw],
    }
    return conflist_from_dict(listed, path, json.dumps(listed).encode())
