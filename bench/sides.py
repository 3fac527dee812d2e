"""The two implementations under test and how to run one of their plugins.

A `Side` is a CNI bin directory: /usr/lib/cni for the reference Go plugins,
a temporary directory of executables for pycni (made by `pycni install`, or by
writing one small launcher per registry entry when that command is missing).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from . import spawn

REFERENCE_DIR = "/usr/lib/cni"
PYCNI, REFERENCE = "pycni", "reference"
# A plain PATH for the plugins (they run iptables, tc, ...); never inherited CNI_* variables.
PLUGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class Side:
    name: str
    bin_dir: str
    plugins: frozenset[str]

    def has(self, plugin: str) -> bool:
        return plugin in self.plugins

    def exe(self, plugin: str) -> str:
        return os.path.join(self.bin_dir, plugin)


def reference_side() -> Side:
    present = frozenset(p for p in os.listdir(REFERENCE_DIR) if os.access(os.path.join(REFERENCE_DIR, p), os.X_OK))
    return Side(REFERENCE, REFERENCE_DIR, present)


def pycni_registry() -> dict[str, str]:
    from cni_plugins.spec.registry import PLUGINS

    return dict(PLUGINS)


def pycni_side(bin_dir: str) -> tuple[Side, str]:
    """Install pycni's plugins into bin_dir; return the side and how it was done."""
    registry = pycni_registry()
    how = _install_with_cli(bin_dir)
    for plugin, target in registry.items():
        if not os.access(os.path.join(bin_dir, plugin), os.X_OK):
            _write_launcher(os.path.join(bin_dir, plugin), target)
            how = "launchers written by bench (pycni install unavailable or incomplete)"
    return Side(PYCNI, bin_dir, frozenset(registry)), how


def _install_with_cli(bin_dir: str) -> str:
    """`pycni install` from the interpreter's own bin directory (the console script)."""
    cli = os.path.join(os.path.dirname(sys.executable), "pycni")
    if not os.access(cli, os.X_OK):
        return "launchers written by bench (no pycni command)"
    proc = subprocess.run([cli, "install", "--cni-bin-dir", bin_dir], capture_output=True, text=True,
                          timeout=120, cwd="/")
    if proc.returncode == 0:
        return f"`pycni install --cni-bin-dir {bin_dir}`"
    print(f"bench: note: `pycni install` failed ({proc.returncode}): "
          f"{(proc.stderr or proc.stdout).strip()[-300:]}; writing launchers instead", file=sys.stderr)
    return "launchers written by bench"


def _write_launcher(path: str, target: str) -> None:
    module, _, function = target.partition(":")
    with open(path, "w") as handle:
        handle.write(f"#!{sys.executable} -I\nimport sys\nfrom {module} import {function}\n"
                     f"sys.exit({function}())\n")
    os.chmod(path, 0o755)


@dataclass
class Call:
    """One CNI invocation: command, config and the runtime's environment."""

    command: str
    config: dict[str, Any]
    container_id: str = ""
    netns: str = ""
    ifname: str = "eth0"

    def env(self, side: Side) -> dict[str, str]:
        env = {"PATH": PLUGIN_PATH, "CNI_COMMAND": self.command, "CNI_PATH": side.bin_dir}
        if self.command != "VERSION":
            env.update(CNI_CONTAINERID=self.container_id, CNI_NETNS=self.netns, CNI_IFNAME=self.ifname)
        return env

    def stdin(self) -> bytes:
        return json.dumps(self.config).encode()


class PluginFailed(RuntimeError):
    pass


def invoke(side: Side, plugin: str, call: Call, node: str | None) -> spawn.Outcome:
    """Run one plugin of `side` with its host side in `node`; raise PluginFailed on error."""
    outcome = spawn.run([side.exe(plugin)], call.env(side), call.stdin(), node)
    if not outcome.ok:
        raise PluginFailed(f"{side.name} {plugin} {call.command}: {outcome.describe()}")
    return outcome


def start(side: Side, plugin: str, call: Call, node: str | None) -> spawn.Running:
    return spawn.start([side.exe(plugin)], call.env(side), call.stdin(), node)
