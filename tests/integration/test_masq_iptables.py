"""The iptables masquerade backend against the real kernel, and against the reference bridge. Root only.

Uses Debian's iptables (nf_tables variant here; either works) inside node
namespaces that each test creates.
"""

from __future__ import annotations

import pytest

from cni_plugins.spec.errors import CNIError
from cni_plugins.shared.masq import check_masq, gc_masq, iptables_chain, setup_masq, teardown_masq
from tests.helpers.plugins import has_reference, reference, run_plugin
from tests.helpers.state import iptables_rules

pytestmark = pytest.mark.integration

B = "iptables"
REFERENCE_BRIDGE = reference("bridge")


def nat_rules(ns, family: int = 4) -> list[str]:
    """The nat table's chains and rules as `-S` lines (policies left out)."""
    return iptables_rules(ns, "nat", family)


def test_chain_name_is_the_references():
    # The reference's own test vector (pkg/utils: FormatChainName("test", "1234")).
    assert iptables_chain("test", "1234") == "CNI-2bbe0c48b91a7d1b8a6753a8"


def test_setup_builds_the_reference_layout_for_both_families(node):
    node.run_in(setup_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24", "fd00::5/64"], B)
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
    node.run_in(check_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24", "fd00::5/64"], B)
    # ADD again changes nothing.
    before = nat_rules(node, 4) + nat_rules(node, 6)
    node.run_in(setup_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24", "fd00::5/64"], B)
    assert nat_rules(node, 4) + nat_rules(node, 6) == before


def test_teardown_removes_only_that_containers_chain(node):
    node.run_in(setup_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24", "fd00::5/64"], B)
    node.run_in(setup_masq, "net1", "ctr-b", "eth0", ["10.88.0.6/24"], B)
    node.run_in(setup_masq, "net2", "ctr-a", "eth0", ["10.99.0.5/24"], B)
    node.run_in(teardown_masq, "net1", "ctr-a", "eth0", B)
    assert not any(iptables_chain("net1", "ctr-a") in line for line in nat_rules(node, 4) + nat_rules(node, 6))
    node.run_in(check_masq, "net1", "ctr-b", "eth0", ["10.88.0.6/24"], B)
    node.run_in(check_masq, "net2", "ctr-a", "eth0", ["10.99.0.5/24"], B)
    with pytest.raises(CNIError, match="does not exist"):
        node.run_in(check_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24"], B)

    node.run_in(teardown_masq, "net1", "ctr-b", "eth0", B)
    node.run_in(teardown_masq, "net1", "ctr-b", "eth0", B)  # idempotent
    chain = iptables_chain("net2", "ctr-a")
    assert [line.split()[1] for line in nat_rules(node, 4)] == [chain, "POSTROUTING", chain, chain]
    node.run_in(teardown_masq, "net2", "ctr-a", "eth0", B)
    assert nat_rules(node, 4) == [] and nat_rules(node, 6) == []


def test_setup_adds_to_the_containers_chain_like_the_reference(node):
    # One chain per (network, container): a second interface's address joins it, and DEL removes both.
    node.run_in(setup_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24"], B)
    node.run_in(setup_masq, "net1", "ctr-a", "net1", ["10.89.0.9/24"], B)
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
    node.run_in(check_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24"], B)
    node.run_in(check_masq, "net1", "ctr-a", "net1", ["10.89.0.9/24"], B)
    node.run_in(teardown_masq, "net1", "ctr-a", "net1", B)
    assert nat_rules(node) == []


def test_gc_removes_the_networks_stale_containers_only(node):
    for network, cid, addr in [
        ("net1", "a", "10.88.0.2/24"),
        ("net1", "b", "10.88.0.3/24"),
        ("net1", "c", "fd00::4/64"),
        ("net2", "a", "10.77.0.2/24"),
    ]:
        node.run_in(setup_masq, network, cid, "eth0", [addr], B)
    node.run_in(gc_masq, "net1", [("b", "eth0")], B)
    text = "\n".join(nat_rules(node, 4) + nat_rules(node, 6))
    assert iptables_chain("net1", "a") not in text and iptables_chain("net1", "c") not in text
    node.run_in(check_masq, "net1", "b", "eth0", ["10.88.0.3/24"], B)
    node.run_in(check_masq, "net2", "a", "eth0", ["10.77.0.2/24"], B)


def _reference_bridge(command: str, node, pod) -> dict | None:
    conf = {
        "cniVersion": "0.4.0",
        "name": "refnet",
        "type": "bridge",
        "bridge": "cni-m0",
        "isGateway": True,
        "ipMasq": True,
        "ipam": node.host_local(subnet="10.88.0.0/24"),
    }
    outcome = run_plugin(REFERENCE_BRIDGE, command, conf, node=node, netns=pod, container_id="ref-ctr")
    assert outcome.code == 0, (outcome.out, outcome.err)
    return outcome.out


@pytest.mark.skipif(not has_reference("bridge"), reason="reference bridge plugin not installed")
def test_state_is_interchangeable_with_the_reference_bridge(make_node):
    node, ours = make_node(), make_node()
    pod = node.pod()
    result = _reference_bridge("ADD", node, pod)
    address = result["ips"][0]["address"]
    reference_rules = nat_rules(node, 4)
    ours.run_in(setup_masq, "refnet", "ref-ctr", "eth0", [address], B)
    assert nat_rules(ours, 4) == reference_rules  # same chain name, comment and rules

    # Our DEL (by network and container ID alone) removes what the reference added ...
    node.run_in(teardown_masq, "refnet", "ref-ctr", "eth0", B)
    assert nat_rules(node, 4) == []
    # ... and the reference's DEL removes what we added.
    node.run_in(setup_masq, "refnet", "ref-ctr", "eth0", [address], B)
    assert nat_rules(node, 4) == reference_rules
    _reference_bridge("DEL", node, pod)
    assert nat_rules(node, 4) == []
