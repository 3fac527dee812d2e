"""Building the JSON a plugin reads on stdin from a network's plugin entry."""

from __future__ import annotations

import copy
from typing import Any, Mapping

from .netconf import NetworkConfigList


def runtime_config(plugin: Mapping[str, Any], cap_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """The capability arguments this plugin declared it understands (libcni's filter).

    A capability reaches the plugin only if its entry says
    ``"capabilities": {"<name>": true}`` and the runtime supplied a value.
    """
    declared = plugin.get("capabilities") or {}
    if not cap_args:
        return {}
    return {
        key: cap_args[key]
        for key, enabled in declared.items()
        if enabled is True and key in cap_args and cap_args[key] is not None
    }


def build_plugin_config(
    netlist: NetworkConfigList,
    plugin: Mapping[str, Any],
    prev_result: Mapping[str, Any] | None = None,
    cap_args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The configuration for one plugin of ``netlist``.

    The plugin's entry as written (``args`` and all) plus the list's ``name``
    and ``cniVersion``, the previous result if any, and ``runtimeConfig``
    holding the declared capabilities (replacing any written in the file,
    as libcni does, when there is something to inject).
    """
    config = copy.deepcopy(dict(plugin))
    config["name"] = netlist.name
    config["cniVersion"] = netlist.cni_version
    if prev_result is not None:
        config["prevResult"] = copy.deepcopy(dict(prev_result))
    injected = runtime_config(plugin, cap_args)
    if injected:
        config["runtimeConfig"] = copy.deepcopy(injected)
    return config
