"""The implementations under test and how to run one of their plugins.

A `Side` is a CNI bin directory: /usr/lib/cni for the reference Go plugins,
a temporary directory of executables for pycni (made by `pycni install`, or by
writing one small launcher per registry entry when that command is missing).

pycni is measured with the executables of the default `pycni install` (the
compiled shim in front of the plugins; the Python shim where install falls back
to it, which ``installed_shim`` tells):

- ``pycni`` (cold): the shims' socket has no agent behind it (a path private to
  the benchmark, so an agent running on the machine is never used): every call
  runs the plugin in its own process, as on a node without `pycni agent`.
- ``pycni-warm``: a `pycni agent` (``WarmAgent``) serves the shims. It runs in a
  namespace of its own that the benchmark creates, and does each request's work
  in the caller's (node) namespace. Its CPU time is read from /proc and added
  to the shims' own in the ``_cpu`` figures, so they count all the work done.
- ``pycni-warm-python-shim``: the same agent serving `pycni install
  --python-shim` executables, measured as figures of their own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from . import spawn

REFERENCE_DIR = "/usr/lib/cni"
PYCNI, PYCNI_WARM, REFERENCE = "pycni", "pycni-warm", "reference"
PYCNI_WARM_PYTHON = "pycni-warm-python-shim"
# `pycni install`'s choice of shim: None the default install, "native" --native-shim, "python" --python-shim.
SHIM_FLAGS = {None: [], "native": ["--native-shim"], "python": ["--python-shim"]}
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


def pycni_side(
    bin_dir: str, agent_socket: str | None = None, name: str = PYCNI, shim: str | None = None
) -> tuple[Side, str]:
    """Install pycni's plugins into bin_dir (shims for ``agent_socket``; ``shim`` as in SHIM_FLAGS);
    return the side and how."""
    registry = pycni_registry()
    how = _install_with_cli(bin_dir, agent_socket, shim)
    for plugin, target in registry.items():
        if not os.access(os.path.join(bin_dir, plugin), os.X_OK):
            _write_launcher(os.path.join(bin_dir, plugin), target)
            how = "launchers written by bench (pycni install unavailable or incomplete)"
    return Side(name, bin_dir, frozenset(registry)), how


def _pycni_cli() -> str:
    return os.path.join(os.path.dirname(sys.executable), "pycni")


def _install_with_cli(bin_dir: str, agent_socket: str | None = None, shim: str | None = None) -> str:
    """`pycni install` from the interpreter's own bin directory (the console script)."""
    cli = _pycni_cli()
    if not os.access(cli, os.X_OK):
        return "launchers written by bench (no pycni command)"
    flags = SHIM_FLAGS[shim]
    args = [
        cli,
        "install",
        "--cni-bin-dir",
        bin_dir,
        *(["--agent-socket", agent_socket] if agent_socket else []),
        *flags,
    ]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd="/")
    if proc.returncode == 0:
        for line in proc.stderr.splitlines():  # e.g. why install fell back to the Python shim
            print(f"bench: note: {line}", file=sys.stderr)
        return (
            f"`pycni install --cni-bin-dir DIR{' --agent-socket SOCK' if agent_socket else ''}"
            f"{''.join(' ' + f for f in flags)}`: {installed_shim(bin_dir)} shim"
        )
    print(
        f"bench: note: `pycni install` failed ({proc.returncode}): "
        f"{(proc.stderr or proc.stdout).strip()[-300:]}; writing launchers instead",
        file=sys.stderr,
    )
    return "launchers written by bench"


def installed_shim(bin_dir: str) -> str:
    """Which shim runs the plugins in ``bin_dir``: "compiled" (their "#!" names pycni-shim), else "python"."""
    from pycni.install import NATIVE_SHIM

    try:
        with open(os.path.join(bin_dir, "loopback"), "rb") as handle:
            first = handle.readline().strip()
    except OSError:
        return "python"
    return "compiled" if first == b"#!" + os.path.join(bin_dir, NATIVE_SHIM).encode() else "python"


def _write_launcher(path: str, target: str) -> None:
    module, _, function = target.partition(":")
    with open(path, "w") as handle:
        handle.write(f"#!{sys.executable} -I\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n")
    os.chmod(path, 0o755)


class WarmAgent:
    """A `pycni agent` serving the warm side, in a namespace the benchmark made; stopped by PID."""

    START_TIMEOUT = 30.0

    def __init__(self, cleanup: Any) -> None:
        self.cleanup = cleanup
        self.dir = cleanup.directory("agent")
        self.socket_path = os.path.join(self.dir, "run", "agent.sock")
        self.log_path = os.path.join(self.dir, "agent.log")
        self.ns = cleanup.namespace("agent")
        self.proc: subprocess.Popen | None = None

    def start(self, extra_args: tuple[str, ...] = ()) -> None:
        args = [
            spawn.IP,
            "netns",
            "exec",
            self.ns,
            _pycni_cli(),
            "agent",
            "--socket",
            self.socket_path,
            "--log-file",
            self.log_path,
            "--log-level",
            "warning",
            *extra_args,
        ]
        self.proc = self.cleanup.process(
            subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
        )
        from pycni.agent.client import AgentUnreachable, status

        deadline = time.monotonic() + self.START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"pycni agent exited ({self.proc.returncode}): "
                    f"{self.proc.stderr.read().decode(errors='replace')[-500:] if self.proc.stderr else ''}"
                )
            try:
                status(self.socket_path, timeout=2.0)
                return
            except (AgentUnreachable, OSError, EOFError):
                time.sleep(0.05)
        raise RuntimeError(f"pycni agent did not answer within {self.START_TIMEOUT:g} s")

    def cpu_s(self) -> float:
        """CPU the agent has used so far: its threads and the tools it ran (nft, tc, ...), from getrusage."""
        cpu = self.status()["cpu_s"]
        return cpu["self"] + cpu["children"]

    def status(self) -> dict[str, Any]:
        from pycni.agent.client import status

        return status(self.socket_path)

    def stop(self) -> None:
        """SIGTERM and a bounded wait (the cleanup registry kills it if this fails)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.cleanup.stop_process(self.proc)


def warm_side(cleanup: Any, bin_dir: str, shim: str | None = None) -> tuple[Side, WarmAgent, str]:
    """Start an agent and install shims for its socket (``shim`` as in SHIM_FLAGS); the warm side,
    its agent, and how."""
    agent = WarmAgent(cleanup)
    agent.start()
    side, how = pycni_side(bin_dir, agent.socket_path, PYCNI_WARM, shim)
    return side, agent, how


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
