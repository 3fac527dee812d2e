"""Pods on several nodes through the vxlan plugin: the flat pod network, shown on packets.

Three node namespaces on an underlay bridge (tests/multinode.py), one node
agent per node against a cluster store (the file store, and etcd running in
the underlay namespace when Debian's etcd-server is installed), two pods per
node attached by the vxlan plugin as a real process (`ip netns exec NODE
<bin>/vxlan` with the CNI environment). Then packets prove the Kubernetes
network model: pod<->pod on one node and across nodes and node->remote pod
with the sender's own address as the receiver sees it (a TCP or UDP echo in
the receiving namespace reports the peer it saw), remote pod->node, 1400-byte
packets with DF set across nodes, and only traffic leaving the cluster
network (to an underlay host that is no member, or to another node's own
address) is masqueraded.

Last, `pycni demo --nodes 2` runs and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest

import netns

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from multinode import (
    UNDERLAY_GATEWAY,
    Host,
    Node,
    Topology,
    cluster_topology,
    converged,
    seen_source,  # noqa: E402
    wait_for,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.multinode,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

NETWORK = "10.244.0.0/16"
NET_NAME = "podnet"
N_NODES = 3
PODS_PER_NODE = 2
PYCNI = os.path.join(os.path.dirname(sys.executable), "pycni")
CONVERGE_TIMEOUT = 15.0
ECHO_PORT = 7000


# ---- pods --------------------------------------------------------------------------------


@dataclass
class Pod:
    name: str
    path: str
    node: Node
    container_id: str
    address: str = ""
    result: dict = field(default_factory=dict)


NOT_REACHED = "agent not reached"


def plugin_env(command: str, bin_dir: str, pod: Pod | None = None) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "CNI_COMMAND": command,
        "CNI_PATH": bin_dir,
        "CNI_CONTAINERID": pod.container_id if pod else "",
        "CNI_NETNS": pod.path if pod else "",
        "CNI_IFNAME": "eth0",
    }


def vxlan_conf(node: Node, data_dir: str, version: str = "1.1.0") -> dict:
    return {"cniVersion": version, "name": NET_NAME, "type": "vxlan", "stateDir": node.state_dir, "dataDir": data_dir}


def run_vxlan(
    node: Node, bin_dir: str, command: str, conf: dict, pod: Pod | None = None, cold: bool = False
) -> tuple[int, Any]:
    """The vxlan executable in the node's namespace. Its shim hands the request to the node's agent
    (the warm path; the test fails if the agent is not reached) unless ``cold``."""
    env = plugin_env(command, bin_dir, pod)
    if cold:
        env["PYCNI_NO_AGENT"] = "1"
    proc = subprocess.run(
        ["ip", "netns", "exec", node.name, os.path.join(bin_dir, "vxlan")],
        input=json.dumps(conf).encode(),
        env=env,
        capture_output=True,
        timeout=60,
    )
    out = json.loads(proc.stdout) if proc.stdout.strip() else None
    if not cold:
        assert NOT_REACHED not in proc.stderr.decode(errors="replace"), proc.stderr
    return proc.returncode, out


# ---- the cluster -------------------------------------------------------------------------


@dataclass
class Cluster:
    topo: Topology
    store_url: str
    pods: dict[int, list[Pod]] = field(default_factory=dict)
    outside: Host | None = None

    @property
    def nodes(self) -> list[Node]:
        return self.topo.nodes

    def bin_dir(self, node: Node) -> str:
        """The node's CNI bin dir: shims pointing at that node's agent socket."""
        return self.topo.path(f"n{node.index}-bin")

    def data_dir(self, node: Node) -> str:
        return self.topo.path(f"n{node.index}-ipam")

    def subnet(self, node: Node) -> str:
        state = node.read_state()
        assert state, f"{node.name} has no overlay state"
        return state["subnet"]


def pycni(*args: str, ns: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [PYCNI, *args]
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@contextlib.contextmanager
def etcd_for(topo: Topology) -> Iterator[str]:
    from cluster_helpers import etcd_skip_reason, start_etcd

    reason = etcd_skip_reason()
    if reason:
        pytest.skip(reason)
    member = start_etcd(topo.underlay_path, UNDERLAY_GATEWAY, workdir=topo.path("etcd"))
    try:
        yield member.url
    finally:
        member.stop()


@pytest.fixture(scope="module", params=["file", pytest.param("etcd", marks=pytest.mark.etcd)])
def cluster(request) -> Iterator[Cluster]:
    with contextlib.ExitStack() as stack:
        topo = stack.enter_context(cluster_topology(N_NODES, "mp"))
        if request.param == "file":
            store_url = "file://" + topo.path("store")
        else:
            store_url = stack.enter_context(etcd_for(topo))
        # `cluster init` runs in a node namespace: the etcd store is reachable only on the underlay.
        done = pycni("cluster", "init", "--store", store_url, "--network", NETWORK, ns=topo.nodes[0].name)
        assert done.returncode == 0, done.stdout + done.stderr
        for node in topo.nodes:
            topo.start_agent(node, store_url)
        wait_for(lambda: converged(topo.nodes), CONVERGE_TIMEOUT, what="every node routing every other subnet")

        c = Cluster(topo, store_url)
        c.outside = topo.add_host()
        for node in topo.nodes:
            os.makedirs(c.data_dir(node), exist_ok=True)
            done = pycni("install", "--cni-bin-dir", c.bin_dir(node), "--agent-socket", node.socket)
            assert done.returncode == 0, done.stderr
            bin_dir = c.bin_dir(node)
            c.pods[node.index] = []
            for j in range(PODS_PER_NODE):
                name = f"{topo.tag}-n{node.index}p{j}"
                path = netns.create(name)
                stack.callback(netns.delete, name)
                subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
                pod = Pod(name, path, node, f"{topo.tag}-n{node.index}p{j}")
                rc, out = run_vxlan(node, bin_dir, "ADD", vxlan_conf(node, c.data_dir(node)), pod)
                assert rc == 0, out
                stack.callback(run_vxlan, node, bin_dir, "DEL", vxlan_conf(node, c.data_dir(node)), pod)
                pod.result = out
                pod.address = out["ips"][0]["address"].split("/")[0]
                c.pods[node.index].append(pod)
        yield c


# ---- packets -------------------------------------------------------------------------------


def ping(ns_name: str, dst: str, size: int | None = None, dont_fragment: bool = False, count: int = 1) -> bool:
    args = ["ip", "netns", "exec", ns_name, "ping", "-n", "-q", "-c", str(count), "-W", "2", "-i", "0.2"]
    if size is not None:
        args += ["-s", str(size)]
    if dont_fragment:
        args += ["-M", "do"]
    done = subprocess.run([*args, dst], capture_output=True, text=True, timeout=count * 3 + 5)
    return done.returncode == 0


def node_pairs(c: Cluster) -> list[tuple[Node, Node]]:
    return [(a, b) for a in c.nodes for b in c.nodes if a is not b]


# ---- tests ----------------------------------------------------------------------------------


def test_pods_get_addresses_from_their_nodes_subnet_and_overlay_mtu(cluster):
    seen = set()
    for node in cluster.nodes:
        subnet = ipaddress.ip_network(cluster.subnet(node))
        mtu = node.read_state()["mtu"]
        for pod in cluster.pods[node.index]:
            assert ipaddress.ip_address(pod.address) in subnet
            assert pod.result["interfaces"][2]["mtu"] == mtu
            link = json.loads(
                subprocess.run(
                    ["ip", "-n", pod.name, "-j", "link", "show", "eth0"], capture_output=True, check=True
                ).stdout
            )[0]
            assert link["mtu"] == mtu
            seen.add(pod.address)
    assert len(seen) == N_NODES * PODS_PER_NODE
    subnets = [cluster.subnet(node) for node in cluster.nodes]
    assert len(set(subnets)) == N_NODES


def test_pod_to_pod_on_the_same_node_keeps_the_source(cluster):
    for node in cluster.nodes:
        a, b = cluster.pods[node.index]
        assert ping(a.name, b.address)
        assert seen_source(b.path, a.path, b.address) == a.address


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_pod_to_pod_across_nodes_keeps_the_source(cluster, proto):
    failures = []
    for src_node, dst_node in node_pairs(cluster):
        src, dst = cluster.pods[src_node.index][0], cluster.pods[dst_node.index][1]
        if not ping(src.name, dst.address):
            failures.append(f"ping {src.name} -> {dst.address}")
        peer = seen_source(dst.path, src.path, dst.address, proto)
        if peer != src.address:
            failures.append(f"{proto} {src.name} ({src.address}) -> {dst.address}: server saw {peer}")
    assert not failures, failures


def test_node_to_remote_pod(cluster):
    for src_node, dst_node in node_pairs(cluster):
        dst = cluster.pods[dst_node.index][0]
        assert ping(src_node.name, dst.address), f"{src_node.name} -> {dst.address}"
        # The node's own traffic reaches the pod from the node's overlay address (its VXLAN device's, the
        # network address of its subnet), not translated on the way.
        vtep_address = cluster.subnet(src_node).split("/")[0]
        assert seen_source(dst.path, src_node.path, dst.address) == vtep_address


def test_remote_pod_to_node(cluster):
    """To another node's own address a pod leaves masqueraded (its node's address): the packet travels the
    underlay, where a strict rp_filter drops pod sources. To that node's gateway address, inside the
    cluster network, it keeps its own address."""
    for src_node, dst_node in node_pairs(cluster):
        src = cluster.pods[src_node.index][0]
        gateway = dst_node.read_state()["gateway"]
        assert ping(src.name, dst_node.public_ip), f"{src.name} -> node {dst_node.public_ip}"
        assert ping(src.name, gateway), f"{src.name} -> node {dst_node.name} gateway {gateway}"
        assert seen_source(dst_node.path, src.path, dst_node.public_ip) == src_node.public_ip
        assert seen_source(dst_node.path, src.path, gateway, "udp") == src.address


def test_full_size_packets_with_df_cross_nodes(cluster):
    for src_node, dst_node in node_pairs(cluster):
        src, dst = cluster.pods[src_node.index][0], cluster.pods[dst_node.index][0]
        mtu = src_node.read_state()["mtu"]
        # 1372 bytes of ICMP payload: a 1400-byte IP packet with DF, 1450 bytes on the underlay.
        assert ping(src.name, dst.address, size=1372, dont_fragment=True), f"{src.name} -> {dst.address}"
        # The largest packet the pod MTU allows crosses too: the overlay MTU leaves room for VXLAN.
        assert ping(src.name, dst.address, size=mtu - 28, dont_fragment=True), f"{mtu}-byte packet"
    # One byte more does not fit the pod's MTU (refused in the pod, not lost on the way).
    src_node, dst_node = node_pairs(cluster)[0]
    src, dst = cluster.pods[src_node.index][0], cluster.pods[dst_node.index][0]
    mtu = src_node.read_state()["mtu"]
    assert not ping(src.name, dst.address, size=mtu - 27, dont_fragment=True)


def test_only_traffic_leaving_the_cluster_is_masqueraded(cluster):
    outside = cluster.outside
    assert outside is not None
    for node in cluster.nodes:
        pod = cluster.pods[node.index][0]
        assert seen_source(outside.path, pod.path, outside.public_ip) == node.public_ip, (
            f"{pod.name} -> outside host should arrive from its node {node.public_ip}"
        )
        peer_node = cluster.nodes[(node.index + 1) % len(cluster.nodes)]
        peer = cluster.pods[peer_node.index][1]
        assert seen_source(peer.path, pod.path, peer.address) == pod.address


def test_vxlan_plugin_status_is_ready_on_every_node(cluster):
    for node in cluster.nodes:
        rc, out = run_vxlan(node, cluster.bin_dir(node), "STATUS", vxlan_conf(node, cluster.data_dir(node)))
        assert rc == 0, out
        # The pods went through the node's agent (the warm path).
        done = pycni("agent", "status", "--socket", node.socket, "--json", ns=node.name)
        assert done.returncode == 0, done.stderr
        served = json.loads(done.stdout)["latency"]
        assert served["vxlan"]["ADD"]["count"] >= PODS_PER_NODE


def test_a_new_pod_on_the_cold_path_is_reachable_at_once_and_del_removes_it(cluster):
    node, remote = cluster.nodes[0], cluster.nodes[-1]
    conf = vxlan_conf(node, cluster.data_dir(node))
    bin_dir = cluster.bin_dir(node)
    with netns.temporary("mpx") as ns:
        pod = Pod(ns.name, ns.path, node, f"extra-{ns.name}")
        rc, out = run_vxlan(node, bin_dir, "ADD", conf, pod, cold=True)
        assert rc == 0, out
        try:
            address = out["ips"][0]["address"].split("/")[0]
            assert ping(cluster.pods[remote.index][0].name, address)
        finally:
            rc, out = run_vxlan(node, bin_dir, "DEL", conf, pod, cold=True)
        assert rc == 0, out
        assert not ping(cluster.pods[remote.index][0].name, address)
    leases = os.listdir(os.path.join(cluster.data_dir(node), NET_NAME))
    assert address not in leases


# ---- the demo --------------------------------------------------------------------------------


def test_demo_with_two_nodes_runs_green_and_leaves_nothing_behind():
    proc = subprocess.run(
        [PYCNI, "demo", "--nodes", "2"], capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    match = re.search(r"namespaces tagged (pycni-demo-[0-9a-f]+)", proc.stdout)
    assert match, proc.stdout
    tag = match.group(1)
    assert not [name for name in netns.list_names() if name.startswith(tag)]
    workdir = re.search(r"work dir (\S+)", proc.stdout).group(1)
    assert not os.path.exists(workdir)
    for line in ("across nodes", "seen from"):
        assert line in proc.stdout
