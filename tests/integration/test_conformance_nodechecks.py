"""The conformance checks of a node's own set-up, each against the fault it names. Root only.

gateway-mac     a bridge whose MAC follows its ports (made without an address, the kernel's way)
                fails; a bridge with its own address passes. Real bridges and veths in a test
                namespace; the third probe pod is a veth pair the stand-in for ProbePods plugs in.
store-entries   a file store holding a value that is no lease, and two leases with one VTEP MAC.
pod-node        a strict receiver (rp_filter=1) and a sender without masquerading: the row says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

import netns
from ipam.cluster import ClusterConfig, acquire_lease, init_cluster, open_store
from pycni.conformance import diagnose
from pycni.conformance.model import FAIL, GATEWAY_MAC, PASS, STORE_ENTRIES, Party
from pycni.conformance.nodechecks import LOWEST_MAC, gateway_mac_check, store_entries_check
from pycni.conformance.probe import ProbeRecord

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, timeout=30)


class VethPods:
    """Stands in for ProbePods: a "pod" is a veth pair, its host end plugged into the bridge."""

    def __init__(self, ns: str, bridge: str) -> None:
        self.ns, self.bridge, self.added, self.removed = ns, bridge, [], []

    def add(self, role: str) -> ProbeRecord:
        host = f"h-{role}"[:15]
        ip(
            self.ns,
            "link",
            "add",
            host,
            "address",
            "0a:00:00:00:00:20",
            "type",
            "veth",
            "peer",
            "name",
            f"c-{role}"[:15],
        )
        ip(self.ns, "link", "set", host, "master", self.bridge, "up")
        self.added.append(role)
        return ProbeRecord(role=role, netns="", container_id=role, address="10.0.0.9", host_ifname=host)

    def remove(self, role: str) -> list[str]:
        ip(self.ns, "link", "del", f"h-{role}"[:15])
        self.removed.append(role)
        return []


def bridge_with_a_port(ns: str, own_address: bool) -> None:
    if own_address:
        ip(ns, "link", "add", "br0", "address", "02:aa:bb:cc:dd:01", "type", "bridge")
    else:
        ip(ns, "link", "add", "br0", "type", "bridge")
    ip(ns, "link", "add", "p0", "address", "0a:00:00:00:00:10", "type", "veth", "peer", "name", "q0")
    ip(ns, "link", "set", "p0", "master", "br0", "up")
    ip(ns, "link", "set", "br0", "up")


@pytest.mark.parametrize("own_address", [True, False], ids=["pinned", "follows-ports"])
def test_gateway_mac_check_fails_exactly_a_bridge_that_follows_its_ports(own_address):
    with netns.temporary("cgw") as ns:
        bridge_with_a_port(ns.name, own_address)
        pods = VethPods(ns.name, "br0")
        with netns.enter(ns.path):
            row = gateway_mac_check("n0", "br0", pods)
        assert pods.added == ["churn"] and pods.removed == ["churn"]
        assert row.check == GATEWAY_MAC and (row.source, row.target) == ("n0", "n0")
        if own_address:
            assert row.result == PASS, row.message
            assert "br0 kept 02:aa:bb:cc:dd:01" in row.message
        else:
            assert row.result == FAIL, row.message
            assert LOWEST_MAC in row.message and "takes its MAC from its ports" in row.message
            assert "ip link set br0 address" in row.message


def test_gateway_mac_check_without_the_bridge_fails_and_adds_no_pod():
    with netns.temporary("cgw") as ns:
        pods = VethPods(ns.name, "br0")
        with netns.enter(ns.path):
            row = gateway_mac_check("n0", "br0", pods)
        assert row.result == FAIL and "no bridge br0" in row.message and not pods.added


def test_store_entries_check_lists_what_the_agents_skip(tmp_path):
    cfg = ClusterConfig("10.244.0.0/16")
    with open_store(f"file://{tmp_path}/store") as store:
        init_cluster(store, cfg)
        own = acquire_lease(store, cfg, "192.168.100.10", "0a:00:00:00:00:10", node_name="n0")
        acquire_lease(store, cfg, "192.168.100.11", "0a:00:00:00:00:11", node_name="n1")
        row = store_entries_check("n0", store, cfg, "192.168.100.10", own.subnet, own.vtep_mac)
        assert row.check == STORE_ENTRIES and row.result == PASS and "2 leases" in row.message
        store.put("subnets/10.244.200.0-24", b"[" * 3000 + b"]" * 3000)
        twin = {"PublicIP": "192.168.100.12", "BackendType": "vxlan", "BackendData": {"VtepMAC": "0a:00:00:00:00:11"}}
        store.put("subnets/10.244.201.0-24", json.dumps(twin).encode())
        row = store_entries_check("n0", store, cfg, "192.168.100.10", own.subnet, own.vtep_mac)
    assert row.result == FAIL
    assert "subnets/10.244.200.0-24" in row.message and "10.244.201.0/24" in row.message, row.message
    assert "etcdctl del" in row.message


def party(node: str, index: int, facts: dict) -> Party:
    return Party(
        node=node,
        public_ip=f"192.168.100.{10 + index}",
        subnet=f"10.244.{index}.0/24",
        vtep_mac=f"0a:58:00:00:00:0{index}",
        vxlan_device="pycni.1",
        mtu=1450,
        probe_ip=f"10.244.{index}.2",
        client_ip=f"10.244.{index}.3",
        echo_port=7080,
        host_port=None,
        session=f"s{index}",
        heartbeat=time.time(),
        facts=facts,
    )


def test_a_strict_receiver_and_a_sender_without_masquerade_are_named():
    sender = party("n0", 0, {"rpFilter": 0, "masquerades": False})
    receiver = party("n1", 1, {"rpFilter": 1, "masquerades": True})
    text = diagnose.explain_strict_peer(sender, receiver)
    assert "node n1 drops pod sources" in text and "rp_filter=1" in text and "--no-ip-masq" in text
    assert diagnose.explain_strict_peer(party("n0", 0, {"masquerades": True}), receiver) == ""
    assert diagnose.explain_strict_peer(sender, party("n1", 1, {"rpFilter": 2})) == ""
