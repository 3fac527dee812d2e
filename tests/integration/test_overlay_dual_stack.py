"""Dual-stack pods across nodes: every pod an IPv4 and an IPv6 address on one flat network. Root only.

Node namespaces on the test underlay (tests/multinode.py, tests/pod_cluster.py), one agent each, pods
attached by `pycni add` through the example vxlan conflist (vxlan + portmap + bandwidth). The cluster
kinds:

    dual, IPv4 underlay     --network 10.244.0.0/16 --ipv6-network fd00:10:244::/56; --public-ip IPv4:
                            both pod families over one VXLAN device on the IPv4 underlay
    dual, IPv6 underlay     the same cluster; --public-ip IPv6: both families over IPv6
    dual, both underlays    --public-ip IPv4 and --public-ipv6: IPv4 pods over pycni.1 (IPv4 underlay),
                            IPv6 pods over pycni6.1 (IPv6 underlay), as flannel's flannel.1/flannel-v6.1
    IPv6 only               --ipv6-network alone, on the IPv4 underlay

on the file store, and the first one on a real etcd too. Every pod pair pings and talks TCP in each
family with the receiver seeing the sender's own address; node -> remote pod in each family; a node
joining and leaving converges in each family within a second; a restart keeps both subnets and MACs;
VXLAN from a non-member is dropped in each underlay family; IPv6 hostPorts map.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import pytest

import netns

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from multinode import Node, route_dsts, state_subnets, wait_for  # noqa: E402
from pod_cluster import NET_NAME, PYCNI, PodCluster, agent_underlay, pod_cluster  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    pytest.mark.multinode,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

NETWORK4 = "10.244.0.0/16"
NETWORK6 = "fd00:10:244::/56"
ECHO_PORT = 7100
HOST_PORT = 17100
CONVERGE_LIMIT = 1.0

KINDS = {
    # kind: (network, ipv6 network, underlay)
    "dual-ipv4-underlay": (NETWORK4, NETWORK6, "ipv4"),
    "dual-ipv6-underlay": (NETWORK4, NETWORK6, "ipv6"),
    "dual-both-underlays": (NETWORK4, NETWORK6, "dual"),
    "ipv6-only": ("", NETWORK6, "ipv4"),
}
PARAMS = [
    pytest.param(("dual-ipv4-underlay", "file"), id="dual-ipv4-underlay-file"),
    pytest.param(("dual-ipv4-underlay", "etcd"), id="dual-ipv4-underlay-etcd", marks=pytest.mark.etcd),
    pytest.param(("dual-ipv6-underlay", "file"), id="dual-ipv6-underlay-file"),
    pytest.param(("dual-both-underlays", "file"), id="dual-both-underlays-file"),
    pytest.param(("ipv6-only", "file"), id="ipv6-only-file"),
]


@dataclass
class Pod:
    name: str
    path: str
    node: Node
    container_id: str
    addresses: dict[int, str] = field(default_factory=dict)  # family -> address


def add_pod(cluster: PodCluster, node: Node, label: str, host_port: bool = False) -> Pod:
    name, path = cluster.topo.add_namespace(f"{label}-{uuid.uuid4().hex[:4]}")
    pod = Pod(name, path, node, uuid.uuid4().hex)
    args = ["add", NET_NAME, path, "--container-id", pod.container_id]
    env = cluster.env(node)
    if host_port:
        env["CAP_ARGS"] = json.dumps(
            {"portMappings": [{"hostPort": HOST_PORT, "containerPort": ECHO_PORT, "protocol": "tcp"}]}
        )
    done = subprocess.run(
        ["ip", "netns", "exec", node.name, PYCNI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    for ip in json.loads(done.stdout)["ips"]:
        address = ipaddress.ip_interface(ip["address"])
        pod.addresses[address.version] = str(address.ip)
    return pod


def ping(ns: str, dst: str) -> bool:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "2", dst],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.returncode == 0


def seen_source(
    server_ns: str, client_ns: str, dst: str, port: int = ECHO_PORT, timeout: float = 3.0, listen: int = ECHO_PORT
) -> str | None:
    """The source address a TCP server in ``server_ns`` (on ``listen``) sees for a client in ``client_ns``
    connecting to ``dst``:``port`` (either family)."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with netns.enter(server_ns):
        server = socket.socket(family, socket.SOCK_STREAM)
    with server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", listen))
        server.listen(1)
        server.settimeout(timeout)
        with netns.enter(client_ns):
            client = socket.socket(family, socket.SOCK_STREAM)
        with client:
            client.settimeout(timeout)
            try:
                client.connect((dst, port))
                conn, peer = server.accept()
            except OSError:
                return None
            conn.close()
            return peer[0]


def families(kind: str) -> list[int]:
    network, network6, _underlay = KINDS[kind]
    return [v for v, net in ((4, network), (6, network6)) if net]


@pytest.fixture(scope="module", params=PARAMS)
def cluster(request) -> Iterator[PodCluster]:
    kind, store = request.param
    network, network6, underlay = KINDS[kind]
    with pod_cluster(
        2, store, f"ds{kind[:1]}{underlay[-1]}", network=network, ipv6_network=network6, underlay=underlay
    ) as c:
        c.kind = kind  # type: ignore[attr-defined]
        c.test_pods = {
            node.name: add_pod(c, node, f"p{node.index}", host_port=True)  # type: ignore[attr-defined]
            for node in c.nodes
        }
        yield c


def pods(cluster: PodCluster) -> dict[str, Pod]:
    return cluster.test_pods  # type: ignore[attr-defined]


def test_every_pod_gets_an_address_of_each_family_from_its_nodes_subnets(cluster):
    for node in cluster.nodes:
        state = node.read_state()
        pod = pods(cluster)[node.name]
        assert sorted(pod.addresses) == families(cluster.kind)
        subnets = {ipaddress.ip_network(s).version: ipaddress.ip_network(s) for s in state_subnets(state)}
        for version, address in pod.addresses.items():
            assert ipaddress.ip_address(address) in subnets[version]
        link = json.loads(
            subprocess.run(
                ["ip", "-n", pod.name, "-j", "link", "show", "eth0"], capture_output=True, check=True, timeout=30
            ).stdout
        )[0]
        assert link["mtu"] == state["mtu"]
        for version in families(cluster.kind):
            routes = {
                r["dst"]
                for r in json.loads(
                    subprocess.run(
                        ["ip", "-n", pod.name, "-j", f"-{version}", "route", "show"],
                        capture_output=True,
                        check=True,
                        timeout=30,
                    ).stdout
                    or "[]"
                )
            }
            network = NETWORK4 if version == 4 else NETWORK6
            assert "default" in routes and network in routes, (version, routes)


def test_the_pods_ipv6_gateway_is_usable_at_once_no_duplicate_address_detection_on_the_bridge(cluster):
    for node in cluster.nodes:  # every kind has IPv6 pods
        bridge = node.read_state()["bridge"]
        dad = subprocess.run(
            ["ip", "netns", "exec", node.name, "sysctl", "-n", f"net.ipv6.conf.{bridge}.accept_dad"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        assert dad == "0", dad
        shown = json.loads(
            subprocess.run(
                ["ip", "-n", node.name, "-j", "-6", "addr", "show", "dev", bridge],
                capture_output=True,
                check=True,
                timeout=30,
            ).stdout
        )[0]
        # Every address, the link-local one included, is usable: none tentative, so the first packets go at once.
        assert shown["addr_info"] and not [a for a in shown["addr_info"] if a.get("tentative")], shown


def test_flannels_subnet_env_names_each_family_of_the_node(cluster):
    network, network6, _underlay = KINDS[cluster.kind]
    for node in cluster.nodes:
        state = node.read_state()
        with open(os.path.join(node.state_dir, "subnet.env")) as fh:
            env = dict(line.rstrip("\n").split("=", 1) for line in fh)
        wanted = {"FLANNEL_MTU": str(state["mtu"]), "FLANNEL_IPMASQ": "true"}
        if network:
            wanted |= {"FLANNEL_NETWORK": network, "FLANNEL_SUBNET": f"{state['gateway']}/24"}
        if network6:
            v6 = "ipv6" if network else ""  # an IPv6-only node's one subnet is its "subnet"
            gateway6 = state["ipv6Gateway"] if v6 else state["gateway"]
            wanted |= {"FLANNEL_IPV6_NETWORK": network6, "FLANNEL_IPV6_SUBNET": f"{gateway6}/64"}
        assert env == wanted, (node.name, env)


def test_every_pod_pair_talks_in_each_family_with_its_own_address(cluster):
    failures = []
    for a in cluster.nodes:
        for b in cluster.nodes:
            if a is b:
                continue
            src, dst = pods(cluster)[a.name], pods(cluster)[b.name]
            for version in families(cluster.kind):
                if not ping(src.name, dst.addresses[version]):
                    failures.append(f"IPv{version} ping {a.name} pod -> {b.name} pod")
                seen = seen_source(dst.path, src.path, dst.addresses[version])
                if seen is None or ipaddress.ip_address(seen) != ipaddress.ip_address(src.addresses[version]):
                    failures.append(f"IPv{version} TCP {a.name} pod -> {b.name} pod: the receiver saw {seen}")
    assert not failures, failures


def test_a_node_reaches_remote_pods_in_each_family(cluster):
    a, b = cluster.nodes[0], cluster.nodes[1]
    dst = pods(cluster)[b.name]
    for version in families(cluster.kind):
        assert ping(a.name, dst.addresses[version]), f"IPv{version}"
        seen = seen_source(dst.path, a.path, dst.addresses[version])
        vtep = {
            ipaddress.ip_network(s).version: str(ipaddress.ip_network(s).network_address)
            for s in state_subnets(a.read_state())
        }
        assert seen is not None and ipaddress.ip_address(seen) == ipaddress.ip_address(vtep[version]), seen


@pytest.mark.parametrize(
    "cluster",
    [("dual-ipv6-underlay", "file"), ("dual-both-underlays", "file")],
    indirect=True,
    ids=["dual-ipv6-underlay-file", "dual-both-underlays-file"],
)
def test_ipv6_host_ports_map_too(cluster):
    """Only nodes with an IPv6 address of their own have one to map a port on."""
    a, b = cluster.nodes[0], cluster.nodes[1]
    dst = pods(cluster)[b.name]
    address = b.public_ip if ":" in b.public_ip else b.read_state()["publicIPv6"]
    seen = seen_source(dst.path, a.path, address, port=HOST_PORT)
    assert seen is not None, f"no answer on [{address}]:{HOST_PORT}"


def test_a_join_and_a_leave_converge_in_each_family_within_a_second(cluster):
    topo = cluster.topo
    newcomer = topo.add_node()
    extra = ("--node-name", f"n{newcomer.index}", *agent_underlay(topo, newcomer, cluster.underlay))
    handle = topo.start_agent(newcomer, cluster.store_url, extra_args=extra)
    subnets = state_subnets(newcomer.read_state())
    assert len(subnets) == len(families(cluster.kind))
    old = cluster.nodes[:2]
    # From the newcomer's state file (written right after its lease) to every other node routing it.
    took = wait_for(
        lambda: all(set(subnets) <= route_dsts(node) for node in old),
        10,
        interval=0.01,
        what="the others routing the newcomer's subnets",
    )
    assert took < CONVERGE_LIMIT, f"join took {took:.2f} s"
    handle.stop()
    done = topo.leave(newcomer, cluster.store_url)
    assert done.returncode == 0, done.stderr
    took = wait_for(
        lambda: not any(set(subnets) & route_dsts(node) for node in old),
        10,
        interval=0.01,
        what="the others dropping the newcomer's subnets",
    )
    assert took < CONVERGE_LIMIT, f"leave took {took:.2f} s"


def test_a_restart_keeps_both_subnets_and_every_mac(cluster):
    node = cluster.nodes[0]
    before = node.read_state()
    handle = cluster.agents[node.name]
    handle.stop()
    extra = (
        "--node-name",
        f"n{node.index}",
        *(("--public-ipv6", before["publicIPv6"]) if before.get("publicIPv6") else ()),
    )
    cluster.agents[node.name] = cluster.topo.start_agent(node, cluster.store_url, extra_args=extra)
    after = node.read_state()
    for key in ("subnet", "ipv6Subnet", "vtepMAC", "ipv6VtepMAC", "gateway", "ipv6Gateway"):
        assert after.get(key) == before.get(key), key
    assert ping(
        pods(cluster)[cluster.nodes[1].name].name, pods(cluster)[node.name].addresses[families(cluster.kind)[-1]]
    )


def test_vxlan_from_a_non_member_is_dropped_in_each_underlay_family(cluster):
    topo = cluster.topo
    target = cluster.nodes[1]
    outsider = topo.add_host()
    addresses = [target.public_ip]
    if cluster.underlay == "dual":
        addresses.append(target.read_state()["publicIPv6"])
    if any(":" in a for a in addresses):
        from pod_cluster import UNDERLAY6_PREFIX

        outsider.ip("addr", "add", f"{UNDERLAY6_PREFIX}c8/64", "dev", "eth0", "nodad")
    for address in addresses:
        before = counter(target, "vxlan from non-members")
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with netns.enter(outsider.path):
            sender = socket.socket(family, socket.SOCK_DGRAM)
        with sender:
            for _ in range(5):
                sender.sendto(b"\x08\x00\x00\x00\x00\x00\x01\x00" + b"\x00" * 50, (address, 8472))
        wait_for(
            lambda: counter(target, "vxlan from non-members") >= before + 5,
            5,
            what=f"the non-member's datagrams to {address} dropped",
        )


def counter(node: Node, comment: str) -> int:
    data = json.loads(node.run("nft", "-j", "list", "table", "inet", "pycni_overlay").stdout)
    for obj in data["nftables"]:
        rule = obj.get("rule")
        if rule and rule.get("comment") == comment:
            return next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    raise AssertionError(f"no rule {comment!r}")


@pytest.mark.parametrize("cluster", [("dual-both-underlays", "file")], indirect=True, ids=["dual-both-underlays-file"])
def test_both_lanes_on_a_dual_underlay(cluster):
    """With --public-ipv6 the IPv6 pods' traffic rides the IPv6 underlay on a second VXLAN device."""
    a = cluster.nodes[0]
    state = a.read_state()
    assert state["ipv6VxlanDevice"] == "pycni6.1" and state["publicIPv6"].startswith("fd70:7963::")
    info = a.ip_json("-d", "link", "show", "pycni6.1")[0]["linkinfo"]["info_data"]
    assert info.get("local6") == state["publicIPv6"]
    b_state = cluster.nodes[1].read_state()
    fdb6 = {
        (e["mac"], e.get("dst"))
        for e in json.loads(a.run("bridge", "-j", "fdb", "show", "dev", "pycni6.1").stdout or "[]")
    }
    assert (b_state["ipv6VtepMAC"], b_state["publicIPv6"]) in fdb6
    routes6 = {r["dst"] for r in a.ip_json("-6", "route", "show", "dev", "pycni6.1")}
    assert b_state["ipv6Subnet"] in routes6
