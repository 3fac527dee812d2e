"""Overlay: cross-node throughput, join/leave convergence, programming 1000 remote nodes.

Every figure runs on a simulated underlay: a bridge in a namespace of its own
(192.168.100.0/24, inside the benchmark's namespaces only) with one veth per
node namespace. Node agents (`pycni agent --store file://DIR ...`) run as
processes inside their node namespaces and are stopped by PID.

- throughput: iperf3 TCP from a pod on node A to a pod on node B, both
  attached by the vxlan plugin with an agent per node, measured in the same
  run and in alternating rounds (7 in full mode) against (1) a hand-built
  vxlan pair: two namespaces whose VXLAN devices carry the addresses
  themselves (the ceiling)
  and (2) the same pod-bridge-vxlan path built by hand with `ip` (flannel's
  data path without the agent's firewall). Ratios are per round (medians of
  the rounds' ratios). Also
  pycni with `cluster init --direct-routing` (the two nodes share the
  underlay subnet, so pods are routed without VXLAN) against (3) that path
  built by hand (flannel's host-gw: pod - veth - bridge - route via the
  other node) and against (4) a bare veth path: two namespaces on the
  underlay talking over their own addresses (that path's ceiling, as the
  vxlan pair is the overlay's); and IPv6 pods of a dual-stack pycni cluster
  next to IPv4.

  Masquerade and conntrack: by default an agent masquerades pod traffic that
  leaves the cluster network (flannel's --ip-masq does the same). A nat chain
  turns connection tracking on for every packet of the node, pod to pod
  included (not to rewrite it: to know which connections were rewritten). So
  the default is also measured against the hand-built paths with
  flannel's masquerade rules (nft, same matches), and `pycni agent
  --no-ip-masq` (no nat chain, no conntrack) against (2). Untracking pod to
  pod traffic is no way out: a Service's DNAT on one node needs the
  connection tracked there for the replies coming back from another node's
  pod, and so do policy engines' "established" rules.
- convergence: with N-1 agents running, another node's agent starts (join)
  and later its lease is released (leave). The time runs from the lease
  appearing in the store (the lease file's mtime) or disappearing from it (the
  release call) to the matching FDB entry being added or deleted on every
  other node (`bridge monitor fdb` in each, lines time-stamped as they
  arrive). Reported per round as the slowest node and the median node.
- program 1000: one node's agent is running when 1000 simulated remote
  nodes' leases are written straight into the file store; the figure is the
  time until the agent holds all 1000 routes, FDB and neighbour entries. Also
  an agent starting on a node with 1000 leases already in the store, and the
  1000 being removed again.

`run(ctx)` returns the figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .. import chain, topology
from ..chain import Attachment
from ..context import Context
from ..spawn import IP
from ..stats import summary
from .dataplane import IPERF, iperf_rounds
from pycni import procs

NET_NAME = "benchov"
UNDERLAY_PREFIX = "192.168.100"
UNDERLAY_BRIDGE = "ul"
UNDERLAY_BRIDGE_MAC = "02:70:79:00:00:01"
CLUSTER_NETWORK = "10.244.0.0/16"
CLUSTER_NETWORK6 = "fd00:10:244::/56"
SCALE_NETWORK = "10.0.0.0/8"  # room for 65536 /24 node subnets
OVERLAY_MTU = 1450  # underlay 1500 - 50 (VXLAN over IPv4)
VXLAN_PORT = 8472
AGENT_READY_TIMEOUT = 30.0
CONVERGE_TIMEOUT = 30.0
PROGRAM_TIMEOUT = 180.0
STOP_TIMEOUT = 10.0
SCALE_NODES = 1000
SMOKE_SCALE_NODES = 50  # --smoke checks the case works, not the scale
CONVERGENCE_SIZES = (3, 20)
OVERLAY_FULL_ROUNDS = 7  # iperf3 rounds over the throughput paths in full mode


def run(ctx: Context) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    if not ctx.pycni.has("vxlan"):
        ctx.note("overlay: skipped, pycni has no vxlan plugin")
        return {"skipped": "no vxlan plugin"}
    if (
        subprocess.run([*_pycni_command(), "agent", "--help"], capture_output=True, text=True, timeout=60).returncode
        != 0
    ):
        ctx.note("overlay: skipped, `pycni agent` is not available")
        return {"skipped": "no pycni agent"}
    if subprocess.run(["which", IPERF], capture_output=True).returncode == 0:
        print("  overlay: throughput", flush=True)
        figures["throughput"] = ctx.attempt("overlay/throughput", lambda: _scoped(ctx, _throughput))
    else:
        figures["throughput"] = {"skipped": "iperf3 not installed"}
    smoke = ctx.settings.mode == "smoke"
    for size in CONVERGENCE_SIZES[:1] if smoke else CONVERGENCE_SIZES:
        print(f"  overlay: join/leave convergence, {size} nodes", flush=True)
        figures[f"convergence {size} nodes"] = ctx.attempt(
            f"overlay/convergence {size}", lambda size=size: _scoped(ctx, lambda c: _convergence(c, size))
        )
    many = SMOKE_SCALE_NODES if smoke else SCALE_NODES
    print(f"  overlay: programming {many} remote nodes", flush=True)
    figures[f"program {many} nodes"] = ctx.attempt(
        f"overlay/program {many}", lambda: _scoped(ctx, lambda c: _program_many(c, many))
    )
    return figures


def _scoped(ctx: Context, measure: Callable[[Context], dict[str, Any]]) -> dict[str, Any]:
    with ctx.cleanup.scope():
        return measure(ctx)


def _rounds(ctx: Context) -> int:
    return 1 if ctx.settings.mode == "smoke" else 3


# ---- underlay, nodes, agents ------------------------------------------------------------


def _pycni_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "pycni")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-c", "from pycni.cli import main; main()"]


class Underlay:
    """A bridge in its own namespace; ``host()`` adds a namespace with an eth0 on it."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.ns = ctx.cleanup.namespace("ul")
        topology.bridge(self.ns, UNDERLAY_BRIDGE, mac=UNDERLAY_BRIDGE_MAC)
        topology.add_address(self.ns, UNDERLAY_BRIDGE, f"{UNDERLAY_PREFIX}.1/24")
        self.count = 0

    def host(self, role: str) -> tuple[str, str]:
        """A new namespace on the underlay: (name, its underlay address)."""
        self.count += 1
        if self.count > 240:
            raise RuntimeError("the underlay /24 is full")
        ns = self.ctx.cleanup.namespace(role)
        address = f"{UNDERLAY_PREFIX}.{10 + self.count}"
        topology.ip(ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{self.count}", "netns", self.ns)
        topology.ip(self.ns, "link", "set", f"p{self.count}", "master", UNDERLAY_BRIDGE, "up")
        topology.add_address(ns, "eth0", f"{address}/24")
        topology.set_up(ns, "eth0")
        return ns, address


@dataclass
class Agent:
    ns: str
    public_ip: str
    state_dir: str
    log: str
    proc: subprocess.Popen | None = None
    started: float = 0.0

    def state(self) -> Any:
        from cni_plugins.shared.overlaystate import read_state

        return read_state(self.state_dir)


def _init_cluster(store_url: str, network: str, extra_args: tuple[str, ...] = ()) -> None:
    done = subprocess.run(
        [*_pycni_command(), "cluster", "init", "--store", store_url, "--network", network, *extra_args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pycni cluster init failed: {(done.stderr or done.stdout).strip()}")


def _new_agent(ctx: Context, workdir: str, ns: str, public_ip: str) -> Agent:
    node_dir = os.path.join(workdir, ns)
    os.makedirs(node_dir, exist_ok=True)
    return Agent(ns, public_ip, os.path.join(node_dir, "state"), os.path.join(node_dir, "agent.log"))


def _socket(agent: Agent) -> str:
    return os.path.join(os.path.dirname(agent.state_dir), "agent.sock")


def _start(ctx: Context, agent: Agent, store_url: str, extra_args: tuple[str, ...] = ()) -> None:
    """Start the agent in its node namespace; ``extra_args`` go after the overlay's own (bench/cases/store.py)."""
    args = [
        *_pycni_command(),
        "agent",
        "--store",
        store_url,
        "--public-ip",
        agent.public_ip,
        "--state-dir",
        agent.state_dir,
        "--socket",
        _socket(agent),
        "--log-file",
        agent.log,
        *extra_args,
    ]
    agent.started = time.time()
    # `ip netns exec` execs the agent: the PID is the agent's own. Registered so that the run's
    # cleanup kills it even if this case is interrupted; _stop() ends it politely first.
    agent.proc = ctx.cleanup.process(
        subprocess.Popen(
            [IP, "netns", "exec", agent.ns, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
    )


def _stop(ctx: Context, agent: Agent) -> None:
    """SIGTERM by PID, a bounded wait, then the cleanup registry's SIGKILL."""
    proc = agent.proc
    if proc is None:
        return
    procs.stop(proc, STOP_TIMEOUT)
    ctx.cleanup.stop_process(proc)
    agent.proc = None


def _log_tail(agent: Agent, lines: int = 10) -> str:
    try:
        with open(agent.log, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_ready(agents: list[Agent], since: float = 0.0, timeout: float = AGENT_READY_TIMEOUT) -> None:
    """Until every agent has written its state file (after ``since``, when given)."""
    from cni_plugins.shared.overlaystate import state_path

    deadline = time.monotonic() + timeout
    pending = list(agents)
    for _ in range(int(timeout / 0.02) + 1):
        for agent in list(pending):
            if agent.proc is not None and agent.proc.poll() is not None:
                raise RuntimeError(f"agent in {agent.ns} exited ({agent.proc.returncode}):\n{_log_tail(agent)}")
            try:
                if os.stat(state_path(agent.state_dir)).st_mtime >= since:
                    pending.remove(agent)
            except FileNotFoundError:
                pass
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    if pending:
        raise RuntimeError(f"agent in {pending[0].ns} wrote no state within {timeout:g} s:\n{_log_tail(pending[0])}")


def _poll(predicate: Callable[[], bool], timeout: float, interval: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        if predicate():
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


def _json(argv: list[str]) -> Any:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return json.loads(done.stdout or "[]")


def _routes(ns: str) -> set[str]:
    return {r.get("dst", "") for r in _json([IP, "-n", ns, "-j", "route", "show"])}


# ---- throughput ---------------------------------------------------------------------------


def _overlay_pods(
    ctx: Context,
    underlay: Underlay,
    version: int = 4,
    init_args: tuple[str, ...] = (),
    agent_args: tuple[str, ...] = (),
) -> tuple[str, str, str]:
    """Two nodes with agents, a pod on each through the vxlan plugin: (pod_b, ip_b, pod_a); ``version``: which
    of the pods' addresses the figure uses (6: the cluster is dual-stack); ``init_args`` for `cluster init`,
    ``agent_args`` for each `pycni agent`."""
    workdir = ctx.cleanup.directory("overlay")
    store = "file://" + os.path.join(workdir, "store")
    _init_cluster(store, CLUSTER_NETWORK, (("--ipv6-network", CLUSTER_NETWORK6) if version == 6 else ()) + init_args)
    agents = [_new_agent(ctx, workdir, *underlay.host("ovnode")) for _ in range(2)]
    for agent in agents:
        _start(ctx, agent, store, agent_args)
    _wait_ready(agents)
    subnets = [agent.state().subnet for agent in agents]
    _poll(
        lambda: all(subnets[1 - i] in _routes(agent.ns) for i, agent in enumerate(agents)),
        CONVERGE_TIMEOUT,
        0.05,
        "the two nodes to route each other's subnet",
    )
    pods, ips = [], []
    for i, agent in enumerate(agents):
        pod = ctx.cleanup.namespace("ovpod")
        conf = {
            "cniVersion": "1.0.0",
            "name": NET_NAME,
            "type": "vxlan",
            "stateDir": agent.state_dir,
            "dataDir": os.path.join(workdir, f"ipam{i}"),
        }
        result = chain.add(ctx.pycni, [conf], Attachment(f"ov-{i}", f"/var/run/netns/{pod}"), agent.ns).result
        pods.append(pod)
        ips.append(
            next(ip["address"].split("/")[0] for ip in result["ips"] if (":" in ip["address"]) == (version == 6))
        )
    return pods[1], ips[1], pods[0]


def _vxlan_device(ns: str, name: str, vni: int, local: str, mtu: int) -> None:
    topology.ip(
        ns,
        "link",
        "add",
        name,
        "type",
        "vxlan",
        "id",
        str(vni),
        "local",
        local,
        "dev",
        "eth0",
        "dstport",
        str(VXLAN_PORT),
        "nolearning",
    )
    topology.ip(ns, "link", "set", name, "mtu", str(mtu))
    topology.set_up(ns, name)


def _bare_veth_path(ctx: Context, underlay: Underlay) -> tuple[str, str, str]:
    """Two namespaces on the underlay talking over their own eth0 addresses (veth - bridge - veth, no pods, no
    routing hop): the ceiling of the direct-routing path. (server, ip, client)."""
    ends = [underlay.host("vepair") for _ in range(2)]
    return ends[1][0], ends[1][1], ends[0][0]


def _hand_vxlan_pair(ctx: Context, underlay: Underlay) -> tuple[str, str, str]:
    """Two namespaces whose VXLAN devices hold the addresses: (server, ip, client)."""
    ends = [underlay.host("vxpair") for _ in range(2)]
    for i, (ns, local) in enumerate(ends):
        _vxlan_device(ns, "vx0", 42, local, OVERLAY_MTU)
        topology.add_address(ns, "vx0", f"10.250.0.{i + 1}/24")
        topology.ip(ns, "link", "set", "vx0", "address", f"0a:58:0a:fa:00:0{i + 1}")
    for i, (ns, _local) in enumerate(ends):
        peer_ns, peer_ip = ends[1 - i]
        topology.ip(
            ns,
            "neigh",
            "add",
            f"10.250.0.{2 - i}",
            "lladdr",
            f"0a:58:0a:fa:00:0{2 - i}",
            "dev",
            "vx0",
            "nud",
            "permanent",
        )
        topology.ip(ns, "link", "set", "vx0", "up")
        subprocess.run(
            [
                IP,
                "netns",
                "exec",
                ns,
                "bridge",
                "fdb",
                "append",
                f"0a:58:0a:fa:00:0{2 - i}",
                "dev",
                "vx0",
                "dst",
                peer_ip,
                "self",
                "permanent",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
    return ends[1][0], "10.250.0.2", ends[0][0]


def _hand_node(ctx: Context, underlay: Underlay, role: str, octet: int, i: int) -> tuple[str, str, str]:
    """One node of a hand-built path: forwarding on, bridge br0 holding 10.<octet>.<i>.1/24, a pod on it at
    .2 with its default route through the bridge, all at the overlay's pod MTU: (node ns, its underlay address,
    pod ns)."""
    ns, local = underlay.host(role)
    subprocess.run([IP, "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True, timeout=30)
    topology.bridge(ns, "br0")
    topology.ip(ns, "link", "set", "br0", "mtu", str(OVERLAY_MTU))
    topology.add_address(ns, "br0", f"10.{octet}.{i}.1/24")
    pod = ctx.cleanup.namespace(role.replace("node", "pod"))
    topology.ip(
        ns, "link", "add", "veth0", "mtu", str(OVERLAY_MTU), "type", "veth", "peer", "name", "eth0", "netns", pod
    )
    topology.enslave(ns, "veth0", "br0")
    topology.set_up(ns, "veth0")
    topology.ip(pod, "link", "set", "eth0", "mtu", str(OVERLAY_MTU))
    topology.add_address(pod, "eth0", f"10.{octet}.{i}.2/24")
    topology.set_up(pod, "eth0")
    topology.ip(pod, "route", "add", "default", "via", f"10.{octet}.{i}.1")
    return ns, local, pod


# Masquerade for pods leaving the hand-built network 10.<octet>.0.0/16, in nft: the agent's rules, which do what
# flannel's --ip-masq does (its FLANNEL-POSTRTG chain).
HAND_MASQUERADE = """table ip hand_masq {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr 10.{octet}.0.0/16 ip daddr 10.{octet}.0.0/16 return
        ip saddr 10.{octet}.0.0/16 ip daddr 224.0.0.0/4 return
        ip saddr 10.{octet}.0.0/16 masquerade fully-random
    }}
}}
"""


def _hand_masquerade(ns: str, octet: int) -> None:
    subprocess.run(
        [IP, "netns", "exec", ns, "nft", "-f", "-"],
        input=HAND_MASQUERADE.format(octet=octet),
        text=True,
        check=True,
        capture_output=True,
        timeout=30,
    )


def _hand_overlay(ctx: Context, underlay: Underlay, masquerade: bool = False) -> tuple[str, str, str]:
    """Flannel's data path built with `ip`: pod - veth - bridge - route - vxlan, per node: (pod_b, ip_b, pod_a);
    with ``masquerade`` also flannel's --ip-masq rules on each node."""
    octet = 253 if masquerade else 251
    nodes = [_hand_node(ctx, underlay, "hmnode" if masquerade else "hvnode", octet, i) for i in range(2)]
    for i, (ns, local, _pod) in enumerate(nodes):
        _vxlan_device(ns, "vx0", 43, local, OVERLAY_MTU)
        topology.ip(ns, "link", "set", "vx0", "address", f"0a:58:0a:{octet:02x}:0{i}:00")
        topology.add_address(ns, "vx0", f"10.{octet}.{i}.0/32")
        if masquerade:
            _hand_masquerade(ns, octet)
    for i, (ns, _local, _pod) in enumerate(nodes):
        j = 1 - i
        peer_mac = f"0a:58:0a:{octet:02x}:0{j}:00"
        topology.ip(ns, "neigh", "add", f"10.{octet}.{j}.0", "lladdr", peer_mac, "dev", "vx0", "nud", "permanent")
        subprocess.run(
            [IP, "netns", "exec", ns, "bridge", "fdb", "append", peer_mac, "dev", "vx0"]
            + ["dst", nodes[j][1], "self", "permanent"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        topology.ip(ns, "route", "add", f"10.{octet}.{j}.0/24", "via", f"10.{octet}.{j}.0", "dev", "vx0", "onlink")
    return nodes[1][2], f"10.{octet}.1.2", nodes[0][2]


def _hand_direct(ctx: Context, underlay: Underlay, masquerade: bool = False) -> tuple[str, str, str]:
    """The same-subnet path without VXLAN built with `ip` (flannel's host-gw): pod - veth - bridge - route via the
    other node's underlay address - eth0, per node: (pod_b, ip_b, pod_a). Pod MTU as the overlay's pods have;
    with ``masquerade`` also the masquerade rules on each node."""
    octet = 254 if masquerade else 252
    nodes = [_hand_node(ctx, underlay, "hmdnode" if masquerade else "hdnode", octet, i) for i in range(2)]
    for i, (ns, _local, _pod) in enumerate(nodes):
        topology.ip(ns, "route", "add", f"10.{octet}.{1 - i}.0/24", "via", nodes[1 - i][1], "dev", "eth0")
        if masquerade:
            _hand_masquerade(ns, octet)
    return nodes[1][2], f"10.{octet}.1.2", nodes[0][2]


# (figure, reference, ratio name): each pycni path against the hand-built path it should match.
RATIOS = (
    ("pycni overlay (vxlan plugin + agents)", "hand-built vxlan pair", "ratio vs vxlan pair"),
    ("pycni overlay (vxlan plugin + agents)", "hand-built overlay path", "ratio vs hand-built overlay"),
    (
        "pycni overlay (vxlan plugin + agents)",
        "hand-built overlay path + masquerade",
        "ratio vs hand-built overlay with masquerade (like for like)",
    ),
    ("pycni overlay, --no-ip-masq", "hand-built overlay path", "--no-ip-masq ratio vs hand-built overlay"),
    ("pycni overlay, direct routing", "hand-built direct path", "direct routing ratio vs hand-built direct"),
    ("pycni overlay, direct routing", "bare veth path", "direct routing ratio vs bare veth path"),
    (
        "pycni overlay, direct routing",
        "hand-built direct path + masquerade",
        "direct routing ratio vs hand-built direct with masquerade (like for like)",
    ),
    ("pycni overlay, IPv6 pods", "pycni overlay (vxlan plugin + agents)", "IPv6 pods ratio vs IPv4 pods"),
)


def _throughput(ctx: Context) -> dict[str, Any]:
    underlay = Underlay(ctx)
    topologies = {
        "pycni overlay (vxlan plugin + agents)": _overlay_pods(ctx, underlay),
        "hand-built vxlan pair": _hand_vxlan_pair(ctx, underlay),
        "hand-built overlay path": _hand_overlay(ctx, underlay),
        "hand-built overlay path + masquerade": _hand_overlay(ctx, underlay, masquerade=True),
        "pycni overlay, --no-ip-masq": _overlay_pods(ctx, underlay, agent_args=("--no-ip-masq",)),
        "pycni overlay, direct routing": _overlay_pods(ctx, underlay, init_args=("--direct-routing",)),
        "hand-built direct path": _hand_direct(ctx, underlay),
        "bare veth path": _bare_veth_path(ctx, underlay),
        "hand-built direct path + masquerade": _hand_direct(ctx, underlay, masquerade=True),
        "pycni overlay, IPv6 pods": _overlay_pods(ctx, underlay, version=6),
    }
    # Rounds of one path scatter by up to 30 % on a small VM: full mode takes more of them than the dataplane
    # case, so that the per-round ratios' median means something (~8 minutes for the ten paths).
    rounds = OVERLAY_FULL_ROUNDS if ctx.settings.mode == "full" else None
    gbits = iperf_rounds(ctx, topologies, rounds)
    out: dict[str, Any] = {name: summary(values, "Gbit/s") for name, values in gbits.items()}
    for ours_name, ref_name, key in RATIOS:
        # Paired by round (the two measured within one pass over the topologies): the machine's drift between
        # rounds cancels, and min..max shows how far single rounds scatter.
        pairs = [round(ours / ref, 3) for ours, ref in zip(gbits[ours_name], gbits[ref_name]) if ours and ref]
        out[key] = summary(pairs, "x") if pairs else None
    return out


# ---- join/leave convergence -----------------------------------------------------------------


class FdbMonitor:
    """`bridge monitor fdb` in one namespace, every line stamped with time.time() as it arrives."""

    def __init__(self, ctx: Context, ns: str) -> None:
        self.ns = ns
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self.proc = ctx.cleanup.process(
            subprocess.Popen(
                [IP, "netns", "exec", ns, "bridge", "monitor", "fdb"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                text=True,
                bufsize=1,
            )
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            stamp = time.time()
            with self._lock:
                self.lines.append((stamp, line.strip()))

    def first(self, dst: str, deleted: bool, after: float) -> float | None:
        """When an FDB entry towards ``dst`` was added (or deleted) after ``after``."""
        with self._lock:
            for stamp, line in self.lines:
                if stamp >= after and f"dst {dst} " in line + " " and line.startswith("Deleted") == deleted:
                    return stamp
        return None


def _lease_mtime(store_dir: str, public_ip: str) -> float | None:
    from ipam.cluster import list_leases, open_store

    store = open_store("file://" + store_dir)
    try:
        leases, _rev = list_leases(store)
    finally:
        store.close()
    for lease in leases:
        if lease.public_ip == public_ip:
            try:
                return os.stat(os.path.join(store_dir, lease.key)).st_mtime
            except FileNotFoundError:
                return None
    return None


def _wait_all(monitors: list[FdbMonitor], dst: str, deleted: bool, after: float) -> list[float]:
    stamps: dict[str, float] = {}

    def done() -> bool:
        for monitor in monitors:
            if monitor.ns not in stamps:
                stamp = monitor.first(dst, deleted, after)
                if stamp is not None:
                    stamps[monitor.ns] = stamp
        return len(stamps) == len(monitors)

    _poll(done, CONVERGE_TIMEOUT, 0.01, f"every node to {'delete' if deleted else 'add'} the FDB entry to {dst}")
    return list(stamps.values())


def _convergence(ctx: Context, size: int) -> dict[str, Any]:
    underlay = Underlay(ctx)
    workdir = ctx.cleanup.directory("overlay-conv")
    store_dir = os.path.join(workdir, "store")
    store = "file://" + store_dir
    _init_cluster(store, CLUSTER_NETWORK)
    members = [_new_agent(ctx, workdir, *underlay.host("cvnode")) for _ in range(size - 1)]
    joiner = _new_agent(ctx, workdir, *underlay.host("cvjoin"))
    started = time.monotonic()
    for agent in members:
        _start(ctx, agent, store)
    _wait_ready(members)
    subnets = {agent.ns: agent.state().subnet for agent in members}
    _poll(
        lambda: all(set(subnets.values()) - {subnets[a.ns]} <= _routes(a.ns) for a in members),
        CONVERGE_TIMEOUT,
        0.1,
        f"{size - 1} nodes to route each other",
    )
    cluster_up = time.monotonic() - started
    monitors = [FdbMonitor(ctx, agent.ns) for agent in members]
    time.sleep(0.3)  # the monitors subscribe before the first join

    from ipam.cluster import open_store, release_lease

    join_max, join_median, leave_max, leave_median = [], [], [], []
    try:
        for _round in range(_rounds(ctx)):
            mark = time.time()
            _start(ctx, joiner, store)
            stamps = _wait_all(monitors, joiner.public_ip, deleted=False, after=mark)
            leased = _lease_mtime(store_dir, joiner.public_ip)
            if leased is None:
                raise RuntimeError("the joining node's lease is not in the store")
            delays = sorted(s - leased for s in stamps)
            join_max.append(delays[-1])
            join_median.append(delays[len(delays) // 2])
            _wait_ready([joiner], since=mark)
            _stop(ctx, joiner)  # SIGTERM keeps the lease; the release below is the leave

            handle = open_store(store)
            try:
                released_at = time.time()
                if not release_lease(handle, joiner.public_ip):
                    raise RuntimeError("the joining node held no lease to release")
            finally:
                handle.close()
            stamps = _wait_all(monitors, joiner.public_ip, deleted=True, after=released_at)
            delays = sorted(s - released_at for s in stamps)
            leave_max.append(delays[-1])
            leave_median.append(delays[len(delays) // 2])
    finally:
        _stop(ctx, joiner)
        for agent in members:
            _stop(ctx, agent)
    return {
        "nodes": size,
        "cluster up": summary([cluster_up], "s"),
        "join, slowest node": summary(join_max, "ms", 1000),
        "join, median node": summary(join_median, "ms", 1000),
        "leave, slowest node": summary(leave_max, "ms", 1000),
        "leave, median node": summary(leave_median, "ms", 1000),
    }


# ---- programming 1000 remote nodes -------------------------------------------------------------


@dataclass
class Counts:
    routes: int = 0
    fdb: int = 0
    neigh: int = 0


def _count(ns: str, device: str, subnets: set[str], public_ips: set[str]) -> Counts:
    routes = _json([IP, "-n", ns, "-j", "route", "show", "dev", device])
    fdb = _json(["bridge", "-n", ns, "-j", "fdb", "show", "dev", device])
    neigh = _json([IP, "-n", ns, "-j", "neigh", "show", "dev", device])
    return Counts(
        routes=sum(1 for r in routes if r.get("dst") in subnets),
        fdb=sum(1 for f in fdb if f.get("dst") in public_ips),
        neigh=sum(1 for n in neigh if "PERMANENT" in n.get("state", [])),
    )


def _wait_programmed(
    ns: str, device: str, subnets: set[str], public_ips: set[str], start: float, want: int
) -> dict[str, float]:
    """Seconds from ``start`` until each kind of entry reaches ``want`` (exactly)."""
    reached: dict[str, float] = {}

    def check() -> bool:
        counts = _count(ns, device, subnets, public_ips)
        now = time.monotonic() - start
        for kind in ("routes", "fdb", "neigh"):
            if kind not in reached and getattr(counts, kind) == want:
                reached[kind] = now
        return len(reached) == 3

    _poll(check, PROGRAM_TIMEOUT, 0.05, f"{want} routes, FDB and neighbour entries in {ns}")
    return reached


def _program_many(ctx: Context, count: int = SCALE_NODES) -> dict[str, Any]:
    from ipam.cluster import ClusterConfig, NodeLease, open_store, read_config

    underlay = Underlay(ctx)
    workdir = ctx.cleanup.directory("overlay-scale")
    store_url = "file://" + os.path.join(workdir, "store")
    _init_cluster(store_url, SCALE_NETWORK)
    agent = _new_agent(ctx, workdir, *underlay.host("scnode"))
    _start(ctx, agent, store_url)
    try:
        _wait_ready([agent])
        state = agent.state()
        device = state.vxlan_device
        store = open_store(store_url)
        try:
            cfg: ClusterConfig = read_config(store)
            subnets: list[str] = []
            for net in cfg.subnets():
                if str(net) != state.subnet:
                    subnets.append(str(net))
                if len(subnets) == count:
                    break
            leases = [
                NodeLease(
                    subnet=subnet,
                    public_ip=f"172.16.{i // 250}.{i % 250 + 1}",
                    vtep_mac=f"0a:58:ac:10:{i // 250:02x}:{i % 250 + 1:02x}",
                    node_name=f"sim{i}",
                )
                for i, subnet in enumerate(subnets)
            ]
            subnet_set = set(subnets)
            ip_set = {lease.public_ip for lease in leases}

            start = time.monotonic()
            for lease in leases:
                if not store.create(lease.key, lease.to_json().encode()):
                    raise RuntimeError(f"lease {lease.key} already exists")
            written = time.monotonic() - start
            join = _wait_programmed(agent.ns, device, subnet_set, ip_set, start, count)

            # A node (re)starting into a cluster of 1000: its device, and with it every entry, gone.
            _stop(ctx, agent)
            topology.ip(agent.ns, "link", "del", device)
            mark = time.time()
            restart_begin = time.monotonic()
            _start(ctx, agent, store_url)
            _wait_ready([agent], since=mark)
            ready = time.monotonic() - restart_begin
            restart = _wait_programmed(agent.ns, device, subnet_set, ip_set, restart_begin, count)

            start = time.monotonic()
            for lease in leases:
                store.delete(lease.key)
            deleted = time.monotonic() - start
            leave = _wait_programmed(agent.ns, device, subnet_set, ip_set, start, 0)
        finally:
            store.close()
    finally:
        _stop(ctx, agent)

    def seconds(value: float) -> dict[str, Any]:
        return summary([value], "s")

    return {
        "remote nodes": count,
        "leases written": seconds(written),
        "all entries programmed": seconds(max(join.values())),
        "programmed after the last write": seconds(max(join.values()) - written),
        "by kind": {kind: seconds(value) for kind, value in join.items()},
        "agent restart: state written": seconds(ready),
        "agent restart: all entries programmed": seconds(max(restart.values())),
        "leases deleted": seconds(deleted),
        "all entries removed": seconds(max(leave.values())),
    }
