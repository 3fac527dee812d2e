"""The fuzz suite's scaffolding: a node with live state, requests, two ways to run them, state snapshots.

A ``FuzzNode`` is a node namespace with a pod attached through the real
bridge + portmap + bandwidth chain (container ``base``), so the node has a
bridge, veths, nftables tables, a tbf qdisc, an ifb and leases for a refused
request to damage. Every generated request must fail; ``snapshot`` reads
everything a request could change (links, addresses, routes, qdiscs and
filters, nftables, iptables, and every file under the node's data
directories) so a batch of requests can be checked to have changed nothing.

A ``Request`` is run either in this process through the skeleton's
``dispatch`` inside the node namespace (fast: most requests) or as a real
plugin process in the node namespace (``ip netns exec``), the way a runtime
runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import netns
from tests.helpers.netenv import Node, Pod, temporary_node, wait_until
from tests.helpers.plugins import run_plugin
from tests.helpers.snapshot import node_snapshot, state_diff  # noqa: F401  (state_diff: for the tests)

NETWORK = "fuzznet"
CONTAINER = "fuzz-ctr"
IFNAME = "eth1"  # the base attachment's interface in the pod
FUZZ_IFNAME = "eth2"  # what most fuzzed requests name (free, so a plugin gets as far as it can)
VERSION = "1.1.0"
SUBNET4, SUBNET6 = "10.99.0.0/24", "fd99::/64"
BRIDGE = "fz0"


@dataclass
class Request:
    """One CNI request: command, environment (without PATH), stdin, and the codes it may fail with."""

    plugin: str
    command: str
    env: dict[str, str | None]
    stdin: bytes
    expect: frozenset[int]
    what: str
    in_process_only: bool = False  # a NUL in the environment cannot reach execve

    def describe(self) -> str:
        env = {k: v for k, v in self.env.items() if v is not None}
        return (
            f"{self.plugin} {self.command} [{self.what}] expect {sorted(self.expect)}\n"
            f"  env: {env!r}\n  stdin: {self.stdin[:600]!r}"
        )


@dataclass
class Answer:
    exit_code: int
    stdout: str
    stderr: str
    how: str  # "in-process" or "process"


@dataclass
class Tally:
    """What one plugin's run produced (for the report and docs/reliability.md)."""

    plugin: str
    cases: int = 0
    processes: int = 0
    in_process: int = 0
    tracebacks: int = 0
    state_changes: int = 0
    batches: int = 0
    codes: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "plugin": self.plugin,
            "cases": self.cases,
            "processes": self.processes,
            "in_process": self.in_process,
            "tracebacks": self.tracebacks,
            "state_changes": self.state_changes,
            "batches": self.batches,
            "codes": {str(k): v for k, v in sorted(self.codes.items(), key=str)},
            "kinds": dict(sorted(self.kinds.items())),
            "problems": self.problems[:20],
        }


# ---- the node --------------------------------------------------------------------------------


@dataclass
class FuzzNode:
    node: Node
    pod: Pod
    bin_dir: str
    state_dir: Path
    base_result: dict[str, Any] = field(default_factory=dict)

    @property
    def ipam(self) -> dict[str, Any]:
        return {
            "type": "host-local",
            "dataDir": str(self.node.ipam_dir),
            "ranges": [[{"subnet": SUBNET4}], [{"subnet": SUBNET6}]],
            "routes": [{"dst": "0.0.0.0/0"}],
        }

    def env(self, command: str, ifname: str = FUZZ_IFNAME, **changes: str | None) -> dict[str, str | None]:
        env: dict[str, str | None] = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": CONTAINER,
            "CNI_NETNS": self.pod.path,
            "CNI_IFNAME": ifname,
            "CNI_PATH": self.bin_dir,
            "CNI_ARGS": "",
        }
        env.update(changes)
        return env

    @property
    def data_dirs(self) -> list[Path]:
        return [self.node.ipam_dir, self.state_dir]


def attach_base(fn: FuzzNode) -> None:
    """The pod ``base`` through bridge + portmap + bandwidth, so the node has state to protect."""
    conf = {
        "cniVersion": VERSION,
        "name": NETWORK,
        "type": "bridge",
        "bridge": BRIDGE,
        "isGateway": True,
        "ipMasq": True,
        "hairpinMode": True,
        "ipam": fn.ipam,
    }
    common = dict(node=fn.node, netns=fn.pod.path, container_id="base", ifname=IFNAME, path=fn.bin_dir)
    out = run_plugin(os.path.join(fn.bin_dir, "bridge"), "ADD", conf, **common)
    assert out.code == 0, out
    pm = {
        "cniVersion": VERSION,
        "name": NETWORK,
        "type": "portmap",
        "prevResult": out.out,
        "runtimeConfig": {"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]},
    }
    out = run_plugin(os.path.join(fn.bin_dir, "portmap"), "ADD", pm, **common)
    assert out.code == 0, out
    bw = {
        "cniVersion": VERSION,
        "name": NETWORK,
        "type": "bandwidth",
        "prevResult": out.out,
        "ingressRate": 8_000_000,
        "ingressBurst": 80_000,
        "egressRate": 8_000_000,
        "egressBurst": 80_000,
    }
    out = run_plugin(os.path.join(fn.bin_dir, "bandwidth"), "ADD", bw, **common)
    assert out.code == 0, out
    fn.base_result = out.out
    if os.path.exists(os.path.join(fn.bin_dir, "vxlan")):
        attach_vxlan_base(fn)


def attach_vxlan_base(fn: FuzzNode) -> None:
    """The node's overlay state (as the agent writes it) and one pod interface through vxlan."""
    from cni_plugins.shared.overlaystate import OverlayState, write_state

    write_state(
        str(fn.state_dir),
        OverlayState(
            network="10.99.0.0/16",
            subnet=SUBNET4,
            gateway="10.99.0.1",
            mtu=1450,
            bridge=BRIDGE,
            vxlan_device="fzvx.1",
            vni=1,
            public_ip="192.0.2.1",
            vtep_mac="0a:00:00:00:00:01",
            node_name="fuzz",
        ),
    )
    conf = {
        "cniVersion": VERSION,
        "name": "fuzzvx",
        "type": "vxlan",
        "stateDir": str(fn.state_dir),
        "dataDir": str(fn.node.ipam_dir),
    }
    out = run_plugin(
        os.path.join(fn.bin_dir, "vxlan"),
        "ADD",
        conf,
        node=fn.node,
        netns=fn.pod.path,
        container_id="basevx",
        ifname="eth3",
        path=fn.bin_dir,
    )
    assert out.code == 0, out


@contextlib.contextmanager
def fuzz_node(bin_dir: str, tag: str = "fuzz", attach: bool = True) -> Iterator[FuzzNode]:
    with temporary_node(tag, cni_path=bin_dir) as node:
        pod = node.pod("fzpod")
        state_dir = Path(tempfile.mkdtemp(prefix=f"{node.name}-state-"))
        try:
            fn = FuzzNode(node=node, pod=pod, bin_dir=bin_dir, state_dir=state_dir)
            if attach:
                attach_base(fn)
                settle(fn)
            yield fn
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)


def settle(fn: FuzzNode, timeout: float = 5.0) -> None:
    """Wait (bounded) until IPv6 duplicate address detection is over: addresses stop changing."""

    def no_tentative() -> bool:
        out = subprocess.run(
            ["ip", "-n", fn.node.name, "-6", "addr", "show", "tentative"], capture_output=True, text=True, timeout=10
        ).stdout
        return not out.strip()

    wait_until(no_tentative, timeout=timeout, interval=0.1)


# ---- state ---------------------------------------------------------------------------------


def snapshot(fn: FuzzNode) -> dict[str, Any]:
    """Everything a refused request must leave as it is, in the node (and the pod's links)."""
    return node_snapshot(fn.node.name, fn.data_dirs, pods=[fn.pod.name])


# ---- running requests -------------------------------------------------------------------------


def run_in_process(fn: FuzzNode, req: Request) -> Answer:
    """The request through the plugin's skeleton, in this process, inside the node namespace."""
    from cni_plugins.spec import registry
    from cni_plugins.spec.skel import dispatch

    funcs = registry.funcs(req.plugin)
    environ = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    environ.update({k: v for k, v in req.env.items() if v is not None})
    outcome = netns.run_in(fn.node.path, dispatch, funcs, environ, req.stdin)
    return Answer(outcome.exit_code, outcome.stdout, outcome.stderr, "in-process")


def run_process(fn: FuzzNode, req: Request, exe: str | None = None, timeout: float = 60) -> Answer:
    """The request as a real plugin process in the node namespace (stdin and environment as bytes)."""
    exe = exe or os.path.join(fn.bin_dir, req.plugin)
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    env.update({k: v for k, v in req.env.items() if v is not None})
    env_bytes = {os.fsencode(k): os.fsencode(v) for k, v in env.items()}
    proc = subprocess.run(
        ["ip", "netns", "exec", fn.node.name, exe], input=req.stdin, env=env_bytes, capture_output=True, timeout=timeout
    )
    return Answer(
        proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"), "process"
    )


def judge(req: Request, answer: Answer, need_version: bool = True) -> str | None:
    """Why the answer breaks the contract for a malformed request (None: it does not).

    need_version=False: an error object without "cniVersion" (the v1.1.1 reference's) still counts."""
    if "Traceback (most recent call last)" in answer.stderr or "Traceback" in answer.stdout:
        return f"a Python traceback ({answer.how}):\n{answer.stderr[-3000:]}"
    if answer.exit_code != 1:
        return f"exit status {answer.exit_code}, not 1 ({answer.how}); stdout {answer.stdout[:500]!r}"
    try:
        err = json.loads(answer.stdout)
    except ValueError:
        return f"stdout is not a JSON error object ({answer.how}): {answer.stdout[:500]!r}"
    if (
        not isinstance(err, dict)
        or not isinstance(err.get("code"), int)
        or not isinstance(err.get("msg"), str)
        or ("cniVersion" not in err and need_version)
    ):
        return f"not a spec error object ({answer.how}): {err!r}"
    if err["code"] not in req.expect:
        return f"code {err['code']} ({err.get('msg')!r}), expected one of {sorted(req.expect)} ({answer.how})"
    return None


def error_code(answer: Answer) -> int | None:
    try:
        return json.loads(answer.stdout).get("code")
    except (ValueError, AttributeError):
        return None
