"""Masquerading seen on the wire, for both backends. Root only.

Four namespaces, all created here; the node routes between the others:

    pod     (eth0 10.88.0.5/24 fd00::5/64) ---- vpod  \\
                                                        node (gateway 10.88.0.1 and fd00::1 on vpod;
    peer    (eth0 10.88.0.6/24 fd00::6/64) ---- vpeer /       forwarding, proxy ARP/NDP; /32 and /128 routes)
    outside (eth0 10.99.0.2/24 fd01::2/64) ---- vout  (10.99.0.1/24 fd01::1/64)

The outside has no route back to the pod subnets.

Pod-to-peer traffic is routed by the node (not bridged), so it really passes
the node's postrouting hook and must keep the pod's source address; traffic to
the outside must leave with the node's address (the outside could not even
answer otherwise).
"""

from __future__ import annotations

import select
import socket
import time
from contextlib import contextmanager

import pytest

import netns
from cni_plugins.shared.masq import setup_masq, teardown_masq
from tests.helpers.netenv import ping

pytestmark = pytest.mark.integration

ETH_P_ALL = 0x0003


@pytest.fixture
def topology(make_node, make_pod):
    node = make_node()
    ns = {"node": node, **{role: make_pod(role) for role in ("pod", "peer", "outside")}}
    for dev, other in (("vpod", "pod"), ("vpeer", "peer"), ("vout", "outside")):
        node.ip("link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", ns[other].name)
    node.exec(
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
        "net.ipv4.conf.vpod.proxy_arp=1",
        "net.ipv4.conf.vpeer.proxy_arp=1",
        "net.ipv6.conf.vpod.proxy_ndp=1",
        "net.ipv6.conf.vpeer.proxy_ndp=1",
        # Answer proxied ARP/NDP at once instead of after a random delay of up to 0.8 s.
        *(f"net.{v}.neigh.{dev}.proxy_delay=0" for v in ("ipv4", "ipv6") for dev in ("vpod", "vpeer")),
    )
    node.exec("sysctl", "-qw", *(f"net.ipv6.conf.{dev}.accept_dad=0" for dev in ("vpod", "vpeer", "vout")))
    for dev in ("lo", "vpod", "vpeer", "vout"):
        node.ip("link", "set", dev, "up")
    node.ip("addr", "add", "10.88.0.1/32", "dev", "vpod")
    node.ip("addr", "add", "fd00::1/128", "dev", "vpod", "nodad")
    node.ip("addr", "add", "10.99.0.1/24", "dev", "vout")
    node.ip("addr", "add", "fd01::1/64", "dev", "vout", "nodad")
    for dev, pod_end in (("vpod", "5"), ("vpeer", "6")):
        node.ip("route", "add", f"10.88.0.{pod_end}/32", "dev", dev)
        node.ip("-6", "route", "add", f"fd00::{pod_end}/128", "dev", dev)
    for addr, dev in (("fd00::6", "vpod"), ("fd00::5", "vpeer"), ("fd00::1", "vpeer")):
        node.ip("-6", "neigh", "add", "proxy", addr, "dev", dev)
    for role, v4, v6 in (
        ("pod", "10.88.0.5/24", "fd00::5/64"),
        ("peer", "10.88.0.6/24", "fd00::6/64"),
        ("outside", "10.99.0.2/24", "fd01::2/64"),
    ):
        pod = ns[role]
        pod.exec("sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0")
        pod.ip("addr", "add", v4, "dev", "eth0")
        pod.ip("addr", "add", v6, "dev", "eth0", "nodad")
        pod.ip("link", "set", "eth0", "up")
        pod.ip("link", "set", "lo", "up")
    for role in ("pod", "peer"):
        ns[role].ip("route", "add", "default", "via", "10.88.0.1", "dev", "eth0")
        ns[role].ip("-6", "route", "add", "default", "via", "fd00::1", "dev", "eth0")
    # Resolve the neighbours once, so that later single pings do not race address resolution.
    for src, dst in (
        ("pod", "10.88.0.1"),
        ("pod", "fd00::1"),
        ("node", "10.99.0.2"),
        ("node", "fd01::2"),
        ("node", "10.88.0.5"),
        ("node", "fd00::5"),
        ("node", "10.88.0.6"),
        ("node", "fd00::6"),
    ):
        assert ping(ns[src], dst), f"test topology broken: {src} cannot reach {dst}"
    return ns


@contextmanager
def capture(ns, ifname: str):
    """An AF_PACKET socket opened inside ``ns`` (it stays bound there); yields a function returning echo requests."""
    with netns.enter(ns.path):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        sock.bind((ifname, ETH_P_ALL))

        def echo_requests(timeout: float = 1.0) -> list[tuple[str, str]]:
            """(source, destination) of the ICMP and ICMPv6 echo requests seen so far."""
            from scapy.layers.inet import ICMP, IP
            from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
            from scapy.layers.l2 import Ether

            seen, deadline = [], time.monotonic() + timeout
            while time.monotonic() < deadline:
                ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    break
                frame = Ether(sock.recv(65535))
                if IP in frame and ICMP in frame and frame[ICMP].type == 8:
                    seen.append((frame[IP].src, frame[IP].dst))
                elif IPv6 in frame and ICMPv6EchoRequest in frame:
                    seen.append((frame[IPv6].src, frame[IPv6].dst))
                else:
                    continue
                deadline = min(deadline, time.monotonic() + 0.05)  # got one: only drain what follows it
            return seen

        yield echo_requests
    finally:
        sock.close()


PLAN = [  # pod address, peer (same subnet), outside, node address on the outside link
    ("10.88.0.5", "10.88.0.6", "10.99.0.2", "10.99.0.1"),
    ("fd00::5", "fd00::6", "fd01::2", "fd01::1"),
]


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_pod_traffic_leaves_masqueraded_but_stays_unchanged_inside_its_subnet(topology, backend):
    node, pod, peer, outside = (topology[r] for r in ("node", "pod", "peer", "outside"))

    netns.run_in(node.path, setup_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24", "fd00::5/64"], backend)

    for pod_ip, peer_ip, outside_ip, node_ip in PLAN:
        with capture(outside, "eth0") as seen:
            assert ping(pod, outside_ip), f"{pod_ip} -> {outside_ip} should be masqueraded and answered"
            assert seen() == [(node_ip, outside_ip)]
        with capture(peer, "eth0") as seen:
            assert ping(pod, peer_ip), f"{pod_ip} -> {peer_ip} should be routed by the node"
            assert seen() == [(pod_ip, peer_ip)]

    # Once torn down, the outside sees the pod's own address again and cannot answer it.
    netns.run_in(node.path, teardown_masq, "net1", "ctr-a", "eth0", backend)
    for pod_ip, _peer_ip, outside_ip, _node_ip in PLAN:
        with capture(outside, "eth0") as seen:
            assert not ping(pod, outside_ip, wait=0.3)
            assert (pod_ip, outside_ip) in seen()
