"""The bridge plugin: attach containers to a Linux bridge through veth pairs, with IPAM, gateway and masquerading.

This package's entry point stays tiny: ``main`` serves one request, and the
skeleton imports ``.plugin`` (the ADD/CHECK/DEL story) only for a command that
needs it, so VERSION costs no more than the interpreter.
"""

from cni_plugins.spec.skel import PluginFuncs, plugin_main

FUNCS = PluginFuncs(module="cni_plugins.bridge.plugin")


def main() -> None:
    plugin_main(FUNCS, "CNI bridge plugin (pycni)")
