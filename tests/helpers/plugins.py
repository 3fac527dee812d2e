"""Running CNI plugins the way a runtime does: a real process, the CNI environment, config on stdin."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

REFERENCE_DIR = "/usr/lib/cni"  # the reference Go plugins (Debian's containernetworking-plugins)


def reference(plugin_type: str) -> str:
    """The reference plugin's executable, e.g. /usr/lib/cni/bridge."""
    return os.path.join(REFERENCE_DIR, plugin_type)


def has_reference(plugin_type: str) -> bool:
    return os.access(reference(plugin_type), os.X_OK)


@dataclass
class Outcome:
    """What a plugin process did: its exit status, its stdout as JSON (None if empty), its stderr."""

    code: int
    out: Any
    err: str

    @property
    def error(self) -> tuple[int, str] | None:
        """The CNI error object's (code, msg) when the plugin failed, else None."""
        if self.code == 0:
            return None
        return self.out.get("code"), self.out.get("msg")


# Bin dirs whose executables are shims with an agent behind them (tests/plugin_modes.py, warm mode):
# directory -> the agent's socket. Every request run_plugin sends through one of them must reach that
# agent, checked per request (warm_served_check), so a warm test that silently ran cold fails.
WARM_BIN_DIRS: dict[str, str] = {}
AGENT_COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS")  # VERSION: the shim answers it itself
DECLINED_NOTE = "pycni: the agent refused the request ("  # the agent's own verdict, relayed by the shim


def agent_counters(socket_path: str) -> tuple[int, int]:
    """(served, declined) of the agent at socket_path."""
    from pycni.agent.client import status

    requests = status(socket_path)["requests"]
    return int(requests["served"]), int(requests["declined"])


def warm_socket_for(argv: Sequence[str], variables: Mapping[str, str | None]) -> str | None:
    """The agent socket a request must go through (None: not a warm request)."""
    if len(argv) != 1 or variables.get("CNI_COMMAND") not in AGENT_COMMANDS or variables.get("PYCNI_NO_AGENT"):
        return None
    return WARM_BIN_DIRS.get(os.path.dirname(os.path.realpath(argv[0])))


def warm_served_check(
    argv: Sequence[str], command: str, socket_path: str, before: tuple[int, int], err: str, cni_netns: str = ""
) -> None:
    """The agent behind ``socket_path`` served this request: its served counter moved and the shim wrote no
    note of running the plugin itself. The one cold run allowed is the agent's designed refusal of a
    CNI_NETNS that is no network namespace (its declined counter moved, the shim relayed that reason):
    a test that sends such a path on purpose cannot be served warm. Anything else ran cold behind the
    test's back."""
    import netns

    after = agent_counters(socket_path)
    notes = [line for line in err.splitlines() if line.startswith("pycni: ")]
    served = after[0] > before[0] and not notes
    bogus_netns = bool(cni_netns) and not netns.is_netns(cni_netns)
    declined = (
        bogus_netns
        and after[1] > before[1]
        and len(notes) == 1
        and notes[0].startswith(DECLINED_NOTE)
        and f"CNI_NETNS {cni_netns}" in notes[0]
    )
    assert served or declined, (
        f"warm mode: {argv[0]} {command} was not served by the agent at {socket_path} (served, declined: "
        f"{before} -> {after}); stderr: {err[-1000:]}"
    )


def _ns_name(node: Any) -> str:
    return node if isinstance(node, str) else node.name


def run_plugin(
    exe_or_argv: str | os.PathLike[str] | Sequence[str],
    command: str,
    conf: Mapping[str, Any] | None,
    *,
    node: Any = None,
    netns: str | os.PathLike[str] = "",
    container_id: str = "c1",
    ifname: str = "eth0",
    args: str = "",
    path: str | None = None,
    env: Mapping[str, str | None] | None = None,
    timeout: float = 60,
) -> Outcome:
    """Run a plugin executable with CNI_COMMAND=command and conf (JSON) on stdin.

    node: a namespace (Node, netns.Namespace or name) to run the plugin in, via
    `ip netns exec`; None runs it where the caller is. netns: CNI_NETNS, a path
    or anything with __fspath__ (a Pod). path: CNI_PATH, by default the
    directory holding the executable (where a runtime found it), or the
    reference dir for an argv like [python, -m, ...]. env: extra variables;
    a None value removes one. conf=None: no stdin (VERSION needs none).
    """
    argv = [os.fspath(exe_or_argv)] if isinstance(exe_or_argv, (str, os.PathLike)) else list(exe_or_argv)
    if path is None:
        path = os.path.dirname(argv[0]) if len(argv) == 1 and os.path.isabs(argv[0]) else REFERENCE_DIR
    variables: dict[str, str | None] = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": os.fspath(netns),
        "CNI_IFNAME": ifname,
        "CNI_PATH": path,
        "CNI_ARGS": args,
    }
    variables.update(env or {})
    warm_socket = warm_socket_for(argv, variables)
    counters_before = agent_counters(warm_socket) if warm_socket else (0, 0)
    exe = argv[0]
    if node is not None:
        argv = ["ip", "netns", "exec", _ns_name(node), *argv]
    proc = subprocess.run(
        argv,
        input=None if conf is None else json.dumps(conf).encode(),
        stdin=subprocess.DEVNULL if conf is None else None,
        env={k: v for k, v in variables.items() if v is not None},
        capture_output=True,
        timeout=timeout,
    )
    text, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    if warm_socket:
        warm_served_check([exe], command, warm_socket, counters_before, err, variables.get("CNI_NETNS") or "")
    try:
        out = json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        raise AssertionError(
            f"{argv} {command} wrote no JSON (exit {proc.returncode}):\nstdout: {text[-2000:]}\nstderr: {err[-2000:]}"
        ) from None
    return Outcome(proc.returncode, out, err)


def pycni_command() -> list[str]:
    """The `pycni` console script next to our interpreter, else the module."""
    script = Path(sys.executable).parent / "pycni"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pycni.cli"]


def run_pycni(
    *args: str,
    node: Any,
    conf_dir: str | os.PathLike[str],
    cni_path: str,
    cache_dir: str | os.PathLike[str],
    cap_args: dict | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """`pycni <args>` (the runtime CLI) inside a node namespace, with its own config, plugin and cache dirs.

    CNI_* and CAP_ARGS from our own environment are not passed on; cap_args
    becomes CAP_ARGS. Never raises on a non-zero exit: callers assert on it.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_") and k != "CAP_ARGS"}
    env.update(NETCONFPATH=os.fspath(conf_dir), CNI_PATH=cni_path, CNI_CACHE_DIR=os.fspath(cache_dir))
    if cap_args is not None:
        env["CAP_ARGS"] = json.dumps(cap_args)
    return subprocess.run(
        ["ip", "netns", "exec", _ns_name(node), *pycni_command(), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def launchers(tmp_path_factory: Any) -> str:
    """A fresh CNI bin dir holding an executable for each of our plugins (host-local included).

    Written by pycni.install.install_plugins, as `pycni install` does. Where
    install_plugins can write agent-forwarding shims, these launchers are
    in-process only (agent_socket=None): tests exercise the plugin itself and
    never depend on whether an agent happens to run on this machine.
    """
    from pycni.install import install_plugins

    bin_dir = str(tmp_path_factory.mktemp("pycni-bin"))
    if "agent_socket" in inspect.signature(install_plugins).parameters:
        install_plugins(bin_dir, agent_socket=None)
    else:
        install_plugins(bin_dir)
    return bin_dir
