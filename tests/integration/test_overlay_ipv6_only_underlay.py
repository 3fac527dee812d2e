"""An IPv6-only pod network on an IPv6 underlay, end to end across two nodes. Root only.

The gap the other IPv6 tests leave: test_overlay_dual_stack.py runs IPv6 pods across nodes on an IPv4
underlay (ipv6-only, dual-ipv4-underlay) and on an IPv6 underlay only beside IPv4 pods (dual-ipv6-underlay,
dual-both-underlays); test_overlay_ipv6_underlay.py runs IPv4 pods over an IPv6 underlay. Here the
cluster has no IPv4 at all: `cluster init --ipv6-network` alone, every node's --public-ip IPv6
(tests/pod_cluster.py, underlay "ipv6": fd70:7963::/64 on the test underlay), pods attached by
`pycni add` through the example vxlan conflist. Asserted on kernel state and packets that flow:

    - each pod has one address, IPv6, from its node's subnet, and no IPv4 address
    - the VXLAN device's local address and every FDB destination are the nodes' IPv6 underlay addresses,
      its MTU leaves room for the 70-byte IPv6 VXLAN header (1500 - 70)
    - pod <-> pod across nodes: ping, TCP with the receiver seeing the sender's own address, and a
      full-MTU packet with DF crosses while one byte more does not
    - a node reaches the other node's pod
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import uuid
from typing import Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import netns  # noqa: E402
from pod_cluster import NET_NAME, PYCNI, PodCluster, pod_cluster  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.multinode]

NETWORK6 = "fd00:10:244::/56"
PORT = 7106
VXLAN = "pycni.1"
IPV6_VXLAN_OVERHEAD = 70


def add_pod(cluster: PodCluster, node, label: str) -> tuple[str, str, list[str]]:
    """A pod on node through `pycni add`; (namespace name, its path, its addresses)."""
    name, path = cluster.topo.add_namespace(f"{label}-{uuid.uuid4().hex[:4]}")
    done = subprocess.run(
        ["ip", "netns", "exec", node.name, PYCNI, "add", NET_NAME, path, "--container-id", uuid.uuid4().hex],
        capture_output=True,
        text=True,
        timeout=120,
        env=cluster.env(node),
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    return name, path, [ip["address"] for ip in json.loads(done.stdout)["ips"]]


def ping6(ns: str, dst: str, size: int | None = None, count: int = 2) -> bool:
    args = ["ping", "-6", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "2" if count > 1 else "1"]
    if size is not None:
        args += ["-s", str(size), "-M", "do"]
    return subprocess.run(["ip", "netns", "exec", ns, *args, dst], capture_output=True, timeout=30).returncode == 0


def seen_source(server_path: str, client_path: str, dst: str, timeout: float = 3.0) -> str | None:
    """The source address a TCP server in server_path sees for a client in client_path connecting to dst."""
    with netns.enter(server_path):
        server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    with server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("::", PORT))
        server.listen(1)
        server.settimeout(timeout)
        with netns.enter(client_path):
            client = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        with client:
            client.settimeout(timeout)
            try:
                client.connect((dst, PORT))
                conn, peer = server.accept()
            except OSError:
                return None
            conn.close()
            return peer[0]


@pytest.fixture(scope="module")
def cluster() -> Iterator[PodCluster]:
    with pod_cluster(2, "file", "v6u", network="", ipv6_network=NETWORK6, underlay="ipv6") as c:
        c.pods = {node.name: add_pod(c, node, f"p{node.index}") for node in c.nodes}  # type: ignore[attr-defined]
        yield c


def test_pods_get_only_an_ipv6_address_of_their_nodes_subnet(cluster):
    for node in cluster.nodes:
        state = node.read_state()
        subnet = ipaddress.ip_network(state.get("ipv6Subnet") or state["subnet"])
        assert subnet.version == 6 and subnet.subnet_of(ipaddress.ip_network(NETWORK6))
        name, _path, addresses = cluster.pods[node.name]
        assert len(addresses) == 1
        address = ipaddress.ip_interface(addresses[0])
        assert address.version == 6 and address.ip in subnet
        inet = subprocess.run(
            ["ip", "-n", name, "-4", "-o", "addr", "show", "dev", "eth0"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert inet.strip() == ""


def test_the_vxlan_device_rides_the_ipv6_underlay(cluster):
    n0, n1 = cluster.nodes
    link = n0.ip_json("-d", "link", "show", VXLAN)[0]
    assert ipaddress.ip_address(link["linkinfo"]["info_data"]["local6"]) == ipaddress.ip_address(n0.public_ip)
    assert link["mtu"] == n0.ip_json("link", "show", "eth0")[0]["mtu"] - IPV6_VXLAN_OVERHEAD
    fdb = json.loads(n0.run("bridge", "-j", "fdb", "show", "dev", VXLAN).stdout or "[]")
    dsts = {e["dst"] for e in fdb if e.get("dst") and e.get("state") == "permanent"}
    assert {ipaddress.ip_address(d) for d in dsts} == {ipaddress.ip_address(n1.public_ip)}


def test_pod_pairs_talk_across_nodes_with_their_own_addresses_at_the_full_mtu(cluster):
    n0, n1 = cluster.nodes
    mtu = n0.ip_json("link", "show", VXLAN)[0]["mtu"]
    failures = []
    for a, b in ((n0, n1), (n1, n0)):
        src_name, src_path, (src_address,) = cluster.pods[a.name]
        _dst_name, dst_path, (dst_address,) = cluster.pods[b.name]
        dst = dst_address.split("/")[0]
        if not ping6(src_name, dst):
            failures.append(f"ping {a.name} pod -> {b.name} pod")
        seen = seen_source(dst_path, src_path, dst)
        if seen is None or ipaddress.ip_address(seen) != ipaddress.ip_interface(src_address).ip:
            failures.append(f"TCP {a.name} pod -> {b.name} pod: the receiver saw {seen}, not {src_address}")
        if not ping6(src_name, dst, size=mtu - 48):  # 40 bytes of IPv6 + 8 of ICMPv6: exactly the MTU
            failures.append(f"a {mtu}-byte packet with DF {a.name} pod -> {b.name} pod")
        if ping6(src_name, dst, size=mtu - 47, count=1):
            failures.append(f"a packet one byte over the {mtu}-byte MTU crossed {a.name} -> {b.name}")
    assert not failures, failures


def test_a_node_reaches_the_other_nodes_pod(cluster):
    n0, n1 = cluster.nodes
    dst = cluster.pods[n1.name][2][0].split("/")[0]
    assert ping6(n0.name, dst)
