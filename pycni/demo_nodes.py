"""`pycni demo --nodes N`: the vxlan overlay across N simulated nodes, checked and cleaned away.

Every node is a network namespace with an ``eth0`` on a simulated underlay
(a bridge in a namespace of its own, 192.168.100.0/24 inside the demo only).
The cluster store is a file store in the demo's temporary directory; `pycni
cluster init` writes the cluster network into it and one `pycni agent` per
node (a process started and stopped by its PID) leases the node's subnet,
builds its bridge and VXLAN device and programs the routes, neighbour and FDB
entries to the other nodes. Two pods per node are attached with the example
vxlan network (vxlan + portmap + bandwidth from conf/examples), driven as a
runtime drives it, through each node's own plugin executables, which hand
the requests to that node's agent (the warm path). Pings and TCP exchanges across nodes show which source
address each receiver sees (the pod's own: no NAT inside the cluster). With
``dual_stack`` the cluster has an IPv6 pod network too (fd00:10:244::/56, on
the same IPv4 underlay): every pod gets an address of each family and the
pings and TCP exchanges run in both. Then
the nodes are made to look like real ones: rp_filter=1 on every node (pods
still reach other nodes, masqueraded), a pod with the lowest MAC on a node's
bridge comes and goes (the pods' gateway keeps its MAC), and two bad entries
land in the cluster store (every agent skips them and keeps running). All of
it is removed at the end, also on Ctrl-C or when a step fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Sequence

import click

from pycni.demo_checks import Pod, Scorecard
from pycni.demo_checks import ping as _ping
from pycni.demo_checks import tcp_exchange as _tcp_exchange
from pycni import procs

EXAMPLE = "10-pycni-vxlan.conflist"
CLUSTER_NETWORK = "10.244.0.0/16"
CLUSTER_NETWORK6 = "fd00:10:244::/56"
UNDERLAY_PREFIX = "192.168.100"  # only ever inside the demo's namespaces
UNDERLAY_BRIDGE = "ul"
UNDERLAY_BRIDGE_MAC = "02:70:79:00:00:01"
PODS_PER_NODE = 2
POD_PORT = 8080
AGENT_READY_TIMEOUT = 30.0
CONVERGE_TIMEOUT = 20.0
AGENT_STOP_TIMEOUT = 10.0


@dataclass
class DemoNode:
    index: int
    name: str
    path: str
    public_ip: str
    state_dir: str
    data_dir: str
    socket: str
    log: str
    subnet: str = ""
    subnets: list[str] = field(default_factory=list)  # one per pod family
    bridge: str = "pycni0"
    pods: list[Pod] = field(default_factory=list)
    runtime: Any = None  # the node's CNI runtime and network list, to attach more pods
    netlist: Any = None

    @property
    def label(self) -> str:
        return f"node{self.index}"


def _pycni_command() -> list[str]:
    """How to run this pycni's CLI in a child process (the console script beside the interpreter)."""
    script = os.path.join(os.path.dirname(sys.executable), "pycni")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-c", "from pycni.cli import main; main()"]


def _ip(ns: str, *args: str) -> None:
    """`ip -n NS ...`: every demo command names one of the demo's namespaces."""
    done = subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip -n {ns} {' '.join(args)} failed: {done.stderr.strip()}")


def _new_namespace(cleanup: ExitStack, name: str) -> str:
    import netns

    path = netns.create(name)
    cleanup.callback(netns.delete, path)
    _ip(name, "link", "set", "lo", "up")
    return path


def _stop_agent(proc: subprocess.Popen, node: DemoNode) -> None:
    """SIGTERM by PID, a bounded wait, then SIGKILL."""
    if procs.stop(proc, AGENT_STOP_TIMEOUT):
        click.echo(f"  warning: agent of {node.label} (pid {proc.pid}) ignored SIGTERM; it was killed", err=True)


def _log_tail(node: DemoNode, lines: int = 15) -> str:
    try:
        with open(node.log, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_for_states(nodes: list[DemoNode], agents: list[subprocess.Popen]) -> None:
    from cni_plugins.shared.overlaystate import read_state

    deadline = time.monotonic() + AGENT_READY_TIMEOUT
    pending = list(zip(nodes, agents))
    for _ in range(int(AGENT_READY_TIMEOUT / 0.05) + 1):
        for node, proc in list(pending):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the agent of {node.label} exited with status {proc.returncode}:\n{_log_tail(node)}"
                )
            state = read_state(node.state_dir)
            if state is not None:
                node.subnet = state.subnet
                node.subnets = [subnet for _net, subnet, _gw in state.pools()]
                node.bridge = state.bridge
                pending.remove((node, proc))
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if pending:
        node = pending[0][0]
        raise RuntimeError(
            f"the agent of {node.label} leased no subnet within {AGENT_READY_TIMEOUT:g} s:\n{_log_tail(node)}"
        )


def _routes_to(node: DemoNode) -> set[str]:
    dsts = set()
    for family in ("-4", "-6"):
        done = subprocess.run(
            ["ip", "-n", node.name, "-j", family, "route", "show"], capture_output=True, text=True, timeout=10
        )
        dsts |= {route.get("dst", "") for route in json.loads(done.stdout or "[]")}
    return dsts


def _wait_converged(nodes: list[DemoNode]) -> float:
    """Seconds until every node routes every other node's subnets, each family (bounded)."""
    start = time.monotonic()
    for _ in range(int(CONVERGE_TIMEOUT / 0.05) + 1):
        if all({s for o in nodes if o is not n for s in o.subnets} <= _routes_to(n) for n in nodes):
            return time.monotonic() - start
        if time.monotonic() - start >= CONVERGE_TIMEOUT:
            break
        time.sleep(0.05)
    raise RuntimeError(f"the nodes did not learn each other's subnets within {CONVERGE_TIMEOUT:g} s")


def _example_conflist(node: DemoNode) -> dict:
    conflist = json.loads(resources.files("conf").joinpath("examples", EXAMPLE).read_text())
    for plugin in conflist["plugins"]:
        if plugin["type"] == "vxlan":
            plugin["stateDir"] = node.state_dir  # the node agent's --state-dir
            plugin["dataDir"] = node.data_dir  # keep leases out of the machine's /var/lib/cni
    return conflist


def run_multinode_demo(node_count: int, dual_stack: bool = False) -> int:
    import netns
    from conf import parse_conflist
    from pycni.install import install_plugins
    from pycni.runtime import CNIRuntime, RuntimeConf

    tag = f"pycni-demo-{secrets.token_hex(3)}"
    score = Scorecard()
    pycni = _pycni_command()
    families = [4, 6] if dual_stack else [4]
    with ExitStack() as cleanup:
        workdir = tempfile.mkdtemp(prefix="pycni-demo-nodes-")
        cleanup.callback(shutil.rmtree, workdir, True)
        kind = "a dual-stack vxlan overlay (IPv4 and IPv6 pods)" if dual_stack else "a vxlan overlay"
        click.echo(f"pycni demo: {node_count} nodes on {kind}; namespaces tagged {tag}, work dir {workdir}")
        underlay = f"{tag}-u"
        _new_namespace(cleanup, underlay)
        # A fixed MAC: without one the bridge follows its lowest port MAC and changes as nodes join.
        _ip(underlay, "link", "add", UNDERLAY_BRIDGE, "address", UNDERLAY_BRIDGE_MAC, "type", "bridge")
        _ip(underlay, "addr", "add", f"{UNDERLAY_PREFIX}.1/24", "dev", UNDERLAY_BRIDGE)
        _ip(underlay, "link", "set", UNDERLAY_BRIDGE, "up")

        nodes: list[DemoNode] = []
        for i in range(node_count):
            name = f"{tag}-n{i}"
            path = _new_namespace(cleanup, name)
            node_dir = os.path.join(workdir, f"node{i}")
            os.makedirs(node_dir)
            node = DemoNode(
                i,
                name,
                path,
                f"{UNDERLAY_PREFIX}.{11 + i}",
                os.path.join(node_dir, "state"),
                os.path.join(node_dir, "ipam"),
                os.path.join(node_dir, "agent.sock"),
                os.path.join(node_dir, "agent.log"),
            )
            # Both ends created in their final namespaces: nothing passes through the root namespace.
            _ip(name, "link", "add", "eth0", "type", "veth", "peer", "name", f"n{i}", "netns", underlay)
            _ip(underlay, "link", "set", f"n{i}", "master", UNDERLAY_BRIDGE, "up")
            _ip(name, "addr", "add", f"{node.public_ip}/24", "dev", "eth0")
            _ip(name, "link", "set", "eth0", "up")
            nodes.append(node)
        click.echo(
            f"underlay: bridge {UNDERLAY_BRIDGE} in {underlay}; nodes "
            + ", ".join(f"{n.label} {n.public_ip}" for n in nodes)
        )

        store = "file://" + os.path.join(workdir, "store")
        networks = ["--network", CLUSTER_NETWORK] + (["--ipv6-network", CLUSTER_NETWORK6] if dual_stack else [])
        init = subprocess.run(
            [*pycni, "cluster", "init", "--store", store, *networks], capture_output=True, text=True, timeout=60
        )
        if init.returncode != 0:
            raise RuntimeError(f"pycni cluster init failed: {(init.stderr or init.stdout).strip()}")
        click.echo(
            f"cluster store {store}: network {CLUSTER_NETWORK}"
            + (f" and IPv6 network {CLUSTER_NETWORK6}" if dual_stack else "")
        )

        agents: list[subprocess.Popen] = []
        for node in nodes:
            args = [
                *pycni,
                "agent",
                "--store",
                store,
                "--public-ip",
                node.public_ip,
                "--node-name",
                node.label,
                "--state-dir",
                node.state_dir,
                "--socket",
                node.socket,
            ]
            with open(node.log, "ab") as log:
                # `ip netns exec` execs the agent: the PID is the agent's own.
                proc = subprocess.Popen(
                    ["ip", "netns", "exec", node.name, *args],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    close_fds=True,
                )
            cleanup.callback(_stop_agent, proc, node)
            agents.append(proc)
        _wait_for_states(nodes, agents)
        for node, proc in zip(nodes, agents):
            click.echo(f"  agent {node.label} (pid {proc.pid}): leased {' and '.join(node.subnets)}")
        took = _wait_converged(nodes)
        score.record(
            "every node routes every other node's subnet" + ("s (both families)" if dual_stack else ""),
            True,
            f"after {took:.2f} s",
        )

        for node in nodes:
            # The node's CNI bin dir: executables that hand each request to this node's agent.
            bin_dir = os.path.join(workdir, f"node{node.index}", "bin")
            install_plugins(bin_dir, agent_socket=node.socket)
            runtime = CNIRuntime(bin_dir, os.path.join(workdir, f"node{node.index}", "cache"))
            netlist = parse_conflist(json.dumps(_example_conflist(node)).encode(), f"conf/examples/{EXAMPLE}")
            node.runtime, node.netlist = runtime, netlist
            for j in range(PODS_PER_NODE):
                pod_name = f"{tag}-n{node.index}p{j}"
                path = _new_namespace(cleanup, pod_name)
                pod = Pod(pod_name, path, f"{tag}-n{node.index}p{j}")
                rt = RuntimeConf(container_id=pod.container_id, netns=pod.path, ifname="eth0")
                with netns.enter(node.path):  # plugin processes inherit the node namespace
                    result = runtime.add(netlist, rt)
                cleanup.callback(_delete_quietly, runtime, netlist, rt, node.path)
                _take_addresses(pod, result)
                node.pods.append(pod)
                shown = ", ".join(f"{ip['address']} via {ip.get('gateway', '?')}" for ip in result["ips"])
                click.echo(f"  ADD {node.label}/pod{j}: eth0 {shown}")
                missing = [v for v in families if not pod.address_of(v)]
                if missing:
                    raise RuntimeError(f"{node.label}/pod{j} got no IPv{missing[0]} address: {result['ips']}")

        if dual_stack:
            took = _wait_bridge_link_local(nodes)
            click.echo(
                f"  (IPv6: {took:.1f} s until every node bridge's link-local address finished duplicate "
                f"address detection, which starts when its first pod plugs in; until then a node resolves "
                f"no IPv6 neighbour on it)"
            )
        click.echo("reachability" + (" (each family)" if dual_stack else "") + ":")
        for version in families:
            _reachability(nodes, version, score)
        if dual_stack:
            click.echo(
                "  (pod -> remote node stays IPv4: on this IPv4 underlay the nodes have no IPv6 address of their own)"
            )

        click.echo("TCP across nodes (the receiver reports the source address it saw):")
        for version in families:
            for node in nodes:
                peer = nodes[(node.index + 1) % len(nodes)]
                src, dst = node.pods[0], peer.pods[1]
                source, target = src.address_of(version), dst.address_of(version)
                ok, detail = _tcp_exchange(dst.path, src.path, target, POD_PORT, POD_PORT)
                at = f"[{target}]:{POD_PORT}" if version == 6 else f"{target}:{POD_PORT}"
                score.record(
                    f"{_ipv6(version)}TCP {node.label}/pod0 ({source}) -> {peer.label}/pod1 {at} across nodes, no NAT",
                    ok and detail.endswith(f"seen from {source}"),
                    detail,
                )

        click.echo("like real nodes:")
        _strict_hosts(nodes, score, families)
        _gateway_churn(nodes[0], f"{tag}-churn", cleanup, score, families)
        _bad_store_entries(os.path.join(workdir, "store"), nodes, agents, score, families)

        click.echo("cleaning up: DEL every pod, stop the agents, remove namespaces and the work dir")
    import netns as _netns

    leftovers = [n for n in _netns.list_names() if n.startswith(tag)]
    score.record("nothing left behind", not leftovers and not os.path.exists(workdir), ", ".join(leftovers))
    total = len(score.passed) + len(score.failed)
    click.echo(f"{len(score.passed)} of {total} checks passed")
    return 0 if not score.failed else 1


def _tentative(node: DemoNode) -> list[str]:
    done = subprocess.run(
        ["ip", "-n", node.name, "-6", "-j", "addr", "show", "dev", node.bridge, "tentative"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return [a["local"] for e in json.loads(done.stdout or "[]") for a in e.get("addr_info", []) if a.get("local")]


def _wait_bridge_link_local(nodes: list[DemoNode], limit: float = 5.0) -> float:
    """Seconds until no node bridge holds a tentative IPv6 address (bounded by ``limit``)."""
    start = time.monotonic()
    for _ in range(int(limit / 0.1) + 1):
        if not any(_tentative(node) for node in nodes) or time.monotonic() - start >= limit:
            break
        time.sleep(0.1)
    return time.monotonic() - start


def _ipv6(version: int) -> str:
    """The prefix of a check of the IPv6 family ("" for IPv4: the labels of the IPv4-only demo stay as they were)."""
    return "IPv6 " if version == 6 else ""


def _take_addresses(pod: Pod, result: dict) -> None:
    """The pod's address (and gateway) of each family from its ADD result."""
    for ip in result.get("ips") or []:
        address, gateway = ip["address"].split("/")[0], ip.get("gateway", "")
        if ":" in address:
            pod.address6, pod.gateway6 = pod.address6 or address, pod.gateway6 or gateway
        elif not pod.address:
            pod.address, pod.gateway = address, gateway


def _reachability(nodes: list[DemoNode], version: int, score: Scorecard) -> None:
    """Pings in one family: pod -> pod on a node and across nodes, node -> remote pod, pod -> remote node
    (IPv4: the nodes' own addresses are IPv4)."""
    family = _ipv6(version)
    for node in nodes:
        a, b = node.pods[0], node.pods[1]
        ok, rtt = _ping(a.name, b.address_of(version))
        score.record(
            f"{family}ping {node.label}/pod0 -> {node.label}/pod1 ({b.address_of(version)}), same node", ok, rtt
        )
    for node in nodes:
        peer = nodes[(node.index + 1) % len(nodes)]
        src, dst = node.pods[0], peer.pods[1]
        ok, rtt = _ping(src.name, dst.address_of(version))
        score.record(
            f"{family}ping {node.label}/pod0 -> {peer.label}/pod1 ({dst.address_of(version)}), across nodes", ok, rtt
        )
        target = peer.pods[0].address_of(version)
        ok, rtt = _ping(node.name, target)
        score.record(f"{family}ping {node.label} -> {peer.label}/pod0 ({target}), node to remote pod", ok, rtt)
        if version == 4:
            ok, rtt = _ping(src.name, peer.public_ip)
            score.record(f"ping {node.label}/pod0 -> {peer.label} ({peer.public_ip}), pod to remote node", ok, rtt)


def _strict_hosts(nodes: list[DemoNode], score: Scorecard, families: Sequence[int] = (4,)) -> None:
    """rp_filter=1 on every node (RHEL's default): a pod reaches another node's own address masqueraded."""
    for node in nodes:
        subprocess.run(
            ["ip", "netns", "exec", node.name, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1"],
            capture_output=True,
            timeout=10,
            check=True,
        )
    for node in nodes:
        peer = nodes[(node.index + 1) % len(nodes)]
        src = node.pods[0]
        ok, detail = _tcp_exchange(peer.path, src.path, peer.public_ip, POD_PORT + 1, POD_PORT + 1)
        score.record(
            f"rp_filter=1: TCP {node.label}/pod0 -> {peer.label} {peer.public_ip}, leaves as {node.public_ip}",
            ok and detail.endswith(f"seen from {node.public_ip}"),
            detail,
        )
        for version in families:
            target = peer.pods[0].address_of(version)
            ok, rtt = _ping(src.name, target)
            score.record(
                f"rp_filter=1: {_ipv6(version)}ping {node.label}/pod0 -> {peer.label}/pod0 ({target})", ok, rtt
            )


def _bridge_mac(node: DemoNode) -> str:
    done = subprocess.run(
        ["ip", "-n", node.name, "-j", "link", "show", "pycni0"], capture_output=True, text=True, timeout=10
    )
    return (json.loads(done.stdout or "[{}]")[0] or {}).get("address", "(none)")


def _gateway_churn(
    node: DemoNode, name: str, cleanup: ExitStack, score: Scorecard, families: Sequence[int] = (4,)
) -> None:
    """A pod whose host veth has the lowest MAC on the bridge comes and goes: the gateway's MAC stays."""
    import netns
    from pycni.runtime import RuntimeConf

    before = _bridge_mac(node)
    path = _new_namespace(cleanup, name)
    rt = RuntimeConf(container_id=name, netns=path, ifname="eth0")
    seen = [before]
    with netns.enter(node.path):
        result = node.runtime.add(node.netlist, rt)
    try:
        host = [i["name"] for i in result.get("interfaces", []) if not i.get("sandbox")][-1]
        _ip(node.name, "link", "set", host, "address", "00:00:00:00:00:01")
        seen.append(_bridge_mac(node))
    finally:
        with netns.enter(node.path):
            node.runtime.delete(node.netlist, rt)
    seen.append(_bridge_mac(node))
    score.record(
        f"the gateway of {node.label} keeps its MAC {before} while a pod with MAC 00:00:00:00:00:01 comes and goes",
        set(seen) == {before},
        " -> ".join(dict.fromkeys(seen)),
    )
    for version in families:
        gateway = node.pods[0].gateway_of(version)
        ok, rtt = _ping(node.pods[0].name, gateway)
        score.record(f"{_ipv6(version)}ping {node.label}/pod0 -> its gateway {gateway} after the churn", ok, rtt)


def _bad_store_entries(
    store_dir: str,
    nodes: list[DemoNode],
    agents: list[subprocess.Popen],
    score: Scorecard,
    families: Sequence[int] = (4,),
) -> None:
    """Two values under subnets/ that are no lease: every agent skips them (one warning) and keeps going."""
    from ipam.cluster.filestore import FileStore

    bad = {
        "subnets/10.244.250.0-24": b"[" * 5000 + b"]" * 5000,
        "subnets/10.244.251.0-24": json.dumps(
            {"PublicIP": "192.168.100.77%eth0", "BackendType": "vxlan", "BackendData": {"VtepMAC": "0a:00:00:00:00:77"}}
        ).encode(),
    }
    with FileStore(store_dir) as store:
        for key, value in bad.items():
            store.put(key, value)
        time.sleep(1.0)
        rejected = set()
        done = subprocess.run(
            [*_pycni_command(), "agent", "status", "--socket", nodes[0].socket, "--json"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode == 0:
            rejected = {r["key"] for r in json.loads(done.stdout)["overlay"]["rejectedEntries"]}
        running = all(proc.poll() is None for proc in agents)
        score.record(
            "bad store entries (5000-deep JSON, a zoned address) skipped by the agents, which keep running",
            running and set(bad) <= rejected,
            f"{node_count_text(agents)} running",
        )
        src, dst = nodes[0].pods[0], nodes[-1].pods[1]
        for version in families:
            ok, rtt = _ping(src.name, dst.address_of(version))
            score.record(
                f"{_ipv6(version)}ping {nodes[0].label}/pod0 -> {nodes[-1].label}/pod1 "
                f"({dst.address_of(version)}) with them in the store",
                ok,
                rtt,
            )
        for key in bad:
            store.delete(key)


def node_count_text(agents: list[subprocess.Popen]) -> str:
    alive = sum(proc.poll() is None for proc in agents)
    return f"{alive} of {len(agents)} agents"


def _delete_quietly(runtime, netlist, rt, node_path: str) -> None:
    import netns

    try:
        with netns.enter(node_path):
            runtime.delete(netlist, rt)
    except Exception as exc:  # cleanup goes on; say what could not be removed
        click.echo(f"  warning: DEL {rt.container_id} failed: {exc}", err=True)
