"""The iptables masquerade backend against the real kernel, and against the reference bridge. Root only.

Uses Debian's iptables (nf_tables variant here; either works) inside node
namespaces that each test creates.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

import netns
from cni_plugins.spec.errors import CNIError
from cni_plugins.shared.masq import check_masq, gc_masq, iptables_chain, setup_masq, teardown_masq

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

B = "iptables"
REFERENCE_BRIDGE = "/usr/lib/cni/bridge"


@pytest.fixture
def node():
    with netns.temporary("pt") as ns:
        yield ns


def nat_rules(ns, family: int = 4) -> list[str]:
    """The nat table's chains and rules as `-S` lines (policies left out)."""
    tool = "iptables" if family == 4 else "ip6tables"
    out = subprocess.run(["ip", "netns", "exec", ns.name, tool, "-w", "-t", "nat", "-S"],
                         capture_output=True, text=True, check=True, timeout=30)
    return [line for line in out.stdout.splitlines() if not line.startswith("-P ")]


def in_node(ns, fn, *args, **kwargs):
    return netns.run_in(ns.path, fn, *args, **kwargs)


def test_chain_name_is_the_references():
    # The reference's own test vector (pkg/utils: FormatChainName("test", "1234")).
    assert iptables_chain("test", "1234") == "CNI-2bbe0c48b91a7d1b8a6753a8"


def test_setup_builds_the_reference_layout_for_both_families(node):
    in_node(node, setup_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24", "fd00::5/64"], B)
    chain = iptables_chain("net1", "ctr-a")
    note = r'-m comment --comment "name: \"net1\" id: \"ctr-a\""'
    assert nat_rules(node, 4) == [
        f"-N {chain}",
        f"-A POSTROUTING -s 10.88.0.5/32 {note} -j {chain}",
        f"-A {chain} -d 10.88.0.0/24 {note} -j ACCEPT",
        f"-A {chain} ! -d 224.0.0.0/4 {note} -j MASQUERADE",
    ]
    assert nat_rules(node, 6) == [
        f"-N {chain}",
        f"-A POSTROUTING -s fd00::5/128 {note} -j {chain}",
        f"-A {chain} -d fd00::/64 {note} -j ACCEPT",
        f"-A {chain} ! -d ff00::/8 {note} -j MASQUERADE",
    ]
    in_node(node, check_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24", "fd00::5/64"], B)
    # ADD again changes nothing.
    before = nat_rules(node, 4) + nat_rules(node, 6)
    in_node(node, setup_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24", "fd00::5/64"], B)
    assert nat_rules(node, 4) + nat_rules(node, 6) == before


def test_teardown_removes_only_that_containers_chain(node):
    in_node(node, setup_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24", "fd00::5/64"], B)
    in_node(node, setup_masq, "net1", "ctr-b", "eth0", ["10.88.0.6/24"], B)
    in_node(node, setup_masq, "net2", "ctr-a", "eth0", ["10.99.0.5/24"], B)
    in_node(node, teardown_masq, "net1", "ctr-a", "eth0", B)
    assert not any(iptables_chain("net1", "ctr-a") in line for line in nat_rules(node, 4) + nat_rules(node, 6))
    in_node(node, check_masq, "net1", "ctr-b", "eth0", ["10.88.0.6/24"], B)
    in_node(node, check_masq, "net2", "ctr-a", "eth0", ["10.99.0.5/24"], B)
    with pytest.raises(CNIError, match="does not exist"):
        in_node(node, check_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24"], B)

    in_node(node, teardown_masq, "net1", "ctr-b", "eth0", B)
    in_node(node, teardown_masq, "net1", "ctr-b", "eth0", B)  # idempotent
    chain = iptables_chain("net2", "ctr-a")
    assert [line.split()[1] for line in nat_rules(node, 4)] == [chain, "POSTROUTING", chain, chain]
    in_node(node, teardown_masq, "net2", "ctr-a", "eth0", B)
    assert nat_rules(node, 4) == [] and nat_rules(node, 6) == []


def test_setup_adds_to_the_containers_chain_like_the_reference(node):
    # One chain per (network, container): a second interface's address joins it, and DEL removes both.
    in_node(node, setup_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24"], B)
    in_node(node, setup_masq, "net1", "ctr-a", "net1", ["10.89.0.9/24"], B)
    chain = iptables_chain("net1", "ctr-a")
    rules = [line.replace(r'-m comment --comment "name: \"net1\" id: \"ctr-a\"" ', "") for line in nat_rules(node)]
    assert rules == [
        f"-N {chain}",
        f"-A POSTROUTING -s 10.88.0.5/32 -j {chain}",
        f"-A POSTROUTING -s 10.89.0.9/32 -j {chain}",
        f"-A {chain} -d 10.88.0.0/24 -j ACCEPT",
        f"-A {chain} -d 10.89.0.0/24 -j ACCEPT",
        f"-A {chain} ! -d 224.0.0.0/4 -j MASQUERADE",
    ]
    in_node(node, check_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24"], B)
    in_node(node, check_masq, "net1", "ctr-a", "net1", ["10.89.0.9/24"], B)
    in_node(node, teardown_masq, "net1", "ctr-a", "net1", B)
    assert nat_rules(node) == []


def test_gc_removes_the_networks_stale_containers_only(node):
    for network, cid, addr in [("net1", "a", "10.88.0.2/24"), ("net1", "b", "10.88.0.3/24"),
                               ("net1", "c", "fd00::4/64"), ("net2", "a", "10.77.0.2/24")]:
        in_node(node, setup_masq, network, cid, "eth0", [addr], B)
    in_node(node, gc_masq, "net1", [("b", "eth0")], B)
    text = "\n".join(nat_rules(node, 4) + nat_rules(node, 6))
    assert iptables_chain("net1", "a") not in text and iptables_chain("net1", "c") not in text
    in_node(node, check_masq, "net1", "b", "eth0", ["10.88.0.3/24"], B)
    in_node(node, check_masq, "net2", "a", "eth0", ["10.77.0.2/24"], B)


def _reference_bridge(command: str, node, pod, data_dir: str) -> dict | None:
    conf = {"cniVersion": "0.4.0", "name": "refnet", "type": "bridge", "bridge": "cni-m0", "isGateway": True,
            "ipMasq": True, "ipam": {"type": "host-local", "subnet": "10.88.0.0/24", "dataDir": data_dir}}
    env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": "ref-ctr",
           "CNI_NETNS": pod.path, "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"}
    proc = subprocess.run(["ip", "netns", "exec", node.name, REFERENCE_BRIDGE], input=json.dumps(conf),
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout) if proc.stdout.strip() else None


@pytest.mark.skipif(not os.path.exists(REFERENCE_BRIDGE), reason="reference bridge plugin not installed")
def test_state_is_interchangeable_with_the_reference_bridge(tmp_path):
    with netns.temporary("pt") as node, netns.temporary("pt") as pod, netns.temporary("pt") as ours:
        result = _reference_bridge("ADD", node, pod, str(tmp_path))
        address = result["ips"][0]["address"]
        reference_rules = nat_rules(node, 4)
        in_node(ours, setup_masq, "refnet", "ref-ctr", "eth0", [address], B)
        assert nat_rules(ours, 4) == reference_rules  # same chain name, comment and rules

        # Our DEL (by network and container ID alone) removes what the reference added ...
        in_node(node, teardown_masq, "refnet", "ref-ctr", "eth0", B)
        assert nat_rules(node, 4) == []
        # ... and the reference's DEL removes what we added.
        in_node(node, setup_masq, "refnet", "ref-ctr", "eth0", [address], B)
        assert nat_rules(node, 4) == reference_rules
        _reference_bridge("DEL", node, pod, str(tmp_path))
        assert nat_rules(node, 4) == []
