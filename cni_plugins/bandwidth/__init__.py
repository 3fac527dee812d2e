"""The bandwidth plugin: shape a container's traffic with tbf (ingress) and an ifb device (egress).

This package's entry point stays tiny: ``main`` serves one request, and the
skeleton imports ``.plugin`` (the ADD/CHECK/DEL story) only for a command that
needs it, so VERSION costs no more than the interpreter.
"""

from cni_plugins.spec.skel import PluginFuncs, plugin_main

FUNCS = PluginFuncs(module="cni_plugins.bandwidth.plugin")


def main() -> None:
    plugin_main(FUNCS, "CNI bandwidth plugin (pycni)")
