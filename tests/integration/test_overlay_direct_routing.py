"""DirectRouting (flannel's Backend.DirectRouting): same-subnet nodes route pods to each other without VXLAN.

`pycni cluster init --direct-routing`, then three nodes: n0 and n1 on the underlay subnet 192.168.100.0/24,
n2 alone on 172.31.5.0/24 behind the underlay namespace, which routes between the two subnets::

        n0 192.168.100.10 ─┐                      ┌─ n2 172.31.5.12
        n1 192.168.100.11 ─┴── ul (192.168.100.1, ─┘
                                   172.31.5.1, forwarding)

n0 and n1 reach each other's pod subnet by a plain route via the other's underlay address on eth0 (no FDB,
neighbour or onlink route for each other on the VXLAN device, and not one packet through it between them);
n2 is another subnet away, so it and the others keep the VXLAN path. Pods on every pair talk with their own
addresses (no SNAT), a direct route deleted by hand comes back, conformance passes on the mixed cluster,
and a node that leaves takes its direct routes with it, on itself and on the others.
"""

from __future__ import annotations

import ipaddress
import json
import re
import os
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from typing import Iterator

import pytest

import netns

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from multinode import UNDERLAY_GATEWAY, UNDERLAY_NET, Node, Topology, route_dsts, wait_for  # noqa: E402
from pod_cluster import NET_NAME, PASSING, PYCNI, RUN_TIMEOUT, PodCluster, pod_cluster  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    pytest.mark.multinode,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

OTHER_NET = ipaddress.ip_network("172.31.5.0/24")
OTHER_ROUTER = "172.31.5.1"
ECHO_PORT = 7200
VXLAN = "pycni.1"


@dataclass
class Pod:
    name: str
    node: Node
    container_id: str
    address: str


def move_to_other_subnet(node: Node) -> None:
    """The node's underlay address becomes 172.31.5.(10+i) on a subnet of its own, routed by the underlay."""
    address = str(OTHER_NET.network_address + 10 + node.index)
    node.ip("addr", "flush", "dev", "eth0")
    node.ip("addr", "add", f"{address}/{OTHER_NET.prefixlen}", "dev", "eth0")
    node.ip("route", "add", str(UNDERLAY_NET), "via", OTHER_ROUTER)
    node.public_ip = address


def two_subnets(topo: Topology) -> None:
    subprocess.run(
        ["ip", "-n", topo.underlay, "addr", "add", f"{OTHER_ROUTER}/{OTHER_NET.prefixlen}", "dev", "ul"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    subprocess.run(
        ["ip", "netns", "exec", topo.underlay, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    move_to_other_subnet(topo.nodes[2])
    for node in topo.nodes[:2]:
        node.ip("route", "add", str(OTHER_NET), "via", UNDERLAY_GATEWAY)


def add_pod(cluster: PodCluster, node: Node, label: str) -> Pod:
    name, path = cluster.topo.add_namespace(f"{label}-{uuid.uuid4().hex[:4]}")
    container_id = uuid.uuid4().hex
    done = subprocess.run(
        ["ip", "netns", "exec", node.name, PYCNI, "add", NET_NAME, path, "--container-id", container_id],
        capture_output=True,
        text=True,
        timeout=120,
        env=cluster.env(node),
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    address = str(ipaddress.ip_interface(json.loads(done.stdout)["ips"][0]["address"]).ip)
    return Pod(name, node, container_id, address)


@pytest.fixture(scope="module")
def cluster() -> Iterator[PodCluster]:
    with pod_cluster(3, "file", "drt", init_args=("--direct-routing",), prepare=two_subnets) as c:
        c.pods = [add_pod(c, node, f"p{node.index}") for node in c.nodes]  # type: ignore[attr-defined]
        yield c


def pods(cluster: PodCluster) -> list[Pod]:
    return cluster.pods  # type: ignore[attr-defined]


def route(node: Node, dst: str) -> dict:
    found = node.ip_json("route", "show", dst)
    assert len(found) == 1, (node.name, dst, found)
    return found[0]


def vxlan_packets(node: Node) -> tuple[int, int]:
    """(tx, rx) packets of the node's VXLAN device."""
    stats = node.ip_json("-s", "link", "show", VXLAN)[0]["stats64"]
    return stats["tx"]["packets"], stats["rx"]["packets"]


def ping(ns: str, dst: str, count: int = 5) -> bool:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", str(count), "-i", "0.05", "-W", "2", dst],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.returncode == 0


def seen_source(server: Pod, client: Pod, timeout: float = 3.0) -> str | None:
    """The source address a TCP server in ``server`` sees for a connection from ``client``."""
    with netns.enter(server.name):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", ECHO_PORT))
        listener.listen(1)
        listener.settimeout(timeout)
        with netns.enter(client.name):
            conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with conn:
            conn.settimeout(timeout)
            try:
                conn.connect((server.address, ECHO_PORT))
                accepted, peer = listener.accept()
            except OSError:
                return None
            accepted.close()
            return peer[0]


def test_same_subnet_nodes_route_directly_and_the_node_on_another_subnet_through_vxlan(cluster):
    n0, n1, n2 = cluster.nodes
    for here, there in ((n0, n1), (n1, n0)):
        direct = route(here, cluster.subnet(there))
        assert direct["dev"] == "eth0" and direct["gateway"] == there.public_ip, direct
        assert "onlink" not in direct.get("flags", []), direct
        # Nothing of the neighbour's on the VXLAN device: no FDB entry for its underlay, no VTEP neighbour.
        fdb_dsts = {e.get("dst") for e in json.loads(here.run("bridge", "-j", "fdb", "show", "dev", VXLAN).stdout)}
        assert there.public_ip not in fdb_dsts and n2.public_ip in fdb_dsts, fdb_dsts
        vtep = str(ipaddress.ip_network(cluster.subnet(there)).network_address)
        assert not [n for n in here.ip_json("neigh", "show", "dev", VXLAN) if n.get("dst") == vtep]
        far = route(here, cluster.subnet(n2))
        assert far["dev"] == VXLAN and "onlink" in far.get("flags", []), far
    for there in (n0, n1):
        far = route(n2, cluster.subnet(there))
        assert far["dev"] == VXLAN and far["gateway"] == str(
            ipaddress.ip_network(cluster.subnet(there)).network_address
        ), far


def test_pods_on_every_pair_of_nodes_talk_with_their_own_addresses(cluster):
    failures = []
    for client in pods(cluster):
        for server in pods(cluster):
            if client is server:
                continue
            seen = seen_source(server, client)
            if seen != client.address:
                failures.append(f"{client.node.name} -> {server.node.name}: seen {seen}, sent from {client.address}")
    assert not failures, failures


def test_no_packet_between_same_subnet_nodes_goes_through_vxlan(cluster):
    n0, n1, _n2 = cluster.nodes
    p0, p1, p2 = pods(cluster)
    before0, before1 = vxlan_packets(n0), vxlan_packets(n1)
    assert ping(p0.name, p1.address, count=20) and ping(p1.name, p0.address, count=20)
    after0, after1 = vxlan_packets(n0), vxlan_packets(n1)
    assert after0 == before0 and after1 == before1, (before0, after0, before1, after1)
    # The control: to the node on the other subnet the same pings do go through the VXLAN device.
    assert ping(p0.name, p2.address, count=20)
    tx, rx = vxlan_packets(n0)
    assert tx - after0[0] >= 20 and rx - after0[1] >= 20, (after0, (tx, rx))


def test_the_status_names_the_direct_hop_of_each_remote(cluster):
    n0, n1, n2 = cluster.nodes
    done = subprocess.run(
        [PYCNI, "agent", "status", "--socket", n0.socket, "--json"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    overlay = doc.get("overlay", doc)
    assert overlay["directRouting"] is True
    via = {r["nodeName"]: r["via"] for r in overlay["remoteNodes"]}
    assert via == {"n1": n1.public_ip, "n2": "vxlan"}, via


def test_a_direct_route_deleted_by_hand_comes_back(cluster):
    n0, n1, _n2 = cluster.nodes
    subnet = cluster.subnet(n1)
    n0.ip("route", "del", subnet)
    wait_for(lambda: subnet in route_dsts(n0), 5, what=f"n0 routing {subnet} again")
    direct = route(n0, subnet)
    assert direct["dev"] == "eth0" and direct["gateway"] == n1.public_ip, direct


def test_conformance_passes_on_the_mixed_cluster(cluster):
    runs = cluster.conformance_runs(args=lambda _node: ("--check-timeout", "2", "--wait", "60"), timeout=RUN_TIMEOUT)
    outputs = list(runs.values())
    assert all(code == 0 for code, _o, _e in outputs), outputs
    logged = "".join(out + err for _code, out, err in outputs)
    node = cluster.nodes[0]
    done = subprocess.run(
        ["nsenter", f"--net={node.path}", PYCNI, "conformance", "report", "--store", cluster.store_url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=cluster.env(node),
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] is True
    failing = [row for row in report["checks"] if row["result"] not in PASSING]
    assert not failing, failing
    other_node = {
        (r["from"], r["to"]) for r in report["checks"] if r["check"] == "pod-pod-other-node" and r["result"] == "pass"
    }
    assert {("n0", "n1"), ("n1", "n0"), ("n0", "n2"), ("n2", "n0")} <= other_node, other_node
    # No SNAT on the direct routes either: the receiver saw the sending probe pod's own address.
    senders: dict[str, set[str]] = {}
    for node, addresses in re.findall(r"node (\S+) \([^)]*\): probe pod ([^ ]+(?:, [^ ]+)*) \(hostPort", logged):
        senders.setdefault(node, set()).update(addresses.split(", "))
    for row in report["checks"]:
        if row["check"] == "no-snat" and row["from"] != row["to"]:
            seen = row["message"].split(" saw ")[1].split(",")[0]
            assert seen in senders.get(row["from"], set()), (row, senders)


def test_a_node_that_leaves_takes_its_direct_routes_with_it(cluster):
    topo = cluster.topo
    n0, n1, n2 = cluster.nodes
    newcomer = topo.add_node()
    handle = topo.start_agent(newcomer, cluster.store_url, extra_args=("--leave",))
    try:
        subnet = newcomer.read_state()["subnet"]
        wait_for(
            lambda: subnet in route_dsts(n0) and subnet in route_dsts(n1) and subnet in route_dsts(n2),
            5,
            what="every node routing the newcomer",
        )
        assert route(n0, subnet)["gateway"] == newcomer.public_ip
        mine = [route(newcomer, cluster.subnet(n)) for n in (n0, n1)]
        assert [r["dev"] for r in mine] == ["eth0", "eth0"], mine
    finally:
        handle.stop()
    # Its own direct routes went with it, and the others dropped theirs to it.
    network = ipaddress.ip_network("10.244.0.0/16")
    left = [
        r
        for r in newcomer.ip_json("route", "show")
        if r["dst"] != "default" and ipaddress.ip_network(r["dst"]).subnet_of(network)
    ]
    assert not left, left
    wait_for(lambda: not any(subnet in route_dsts(n) for n in (n0, n1, n2)), 5, what="the others dropping it")
