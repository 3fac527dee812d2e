"""The nftables masquerade backend against the real kernel. Root only.

Each test creates its own node namespace(s) and calls the masq API inside them;
the root namespace is never touched.
"""

from __future__ import annotations

import json

import pytest

from cni_plugins.spec.errors import CNIError
from cni_plugins.shared.masq import TABLE, check_masq, gc_masq, setup_masq, teardown_masq
from tests.helpers.state import nft_ruleset as ruleset

pytestmark = pytest.mark.integration


def elements(ns) -> dict[str, tuple[str, str]]:
    """address -> (comment, jump target) over both pod maps."""
    out = {}
    for obj in ruleset(ns):
        m = obj.get("map")
        if m and m["table"] == TABLE:
            for key, verdict in m.get("elem", []):
                out[key["elem"]["val"]] = (key["elem"].get("comment"), verdict["jump"]["target"])
    return out


def rules(ns) -> list[dict]:
    return [o["rule"] for o in ruleset(ns) if "rule" in o and o["rule"]["table"] == TABLE]


def test_setup_writes_one_element_per_address_with_owner_comment(node):
    node.run_in(setup_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24", "fd00::5/64"])
    elems = elements(node)
    assert set(elems) == {"10.88.0.5", "fd00::5"}
    comment, target = elems["10.88.0.5"]
    assert comment.split()[1:] == ["net1", "ctr-a", "eth0"]
    assert target == "net4_0a580000_24"
    assert elems["fd00::5"][1] == "net6_fd000000000000000000000000000000_64"

    by_chain: dict[str, list] = {}
    for rule in rules(node):
        by_chain.setdefault(rule["chain"], []).append(rule["expr"])
    # Base chain: multicast is never masqueraded, then the per-family lookups.
    base = json.dumps(by_chain["postrouting"])
    assert '"addr": "224.0.0.0", "len": 4' in base and '"addr": "ff00::", "len": 8' in base
    assert '"@pods4"' in base and '"@pods6"' in base
    (v4,) = by_chain["net4_0a580000_24"]
    assert {"masquerade": None} in v4
    assert any(
        s.get("match", {}).get("op") == "!=" and s["match"]["right"] == {"prefix": {"addr": "10.88.0.0", "len": 24}}
        for s in v4
    )
    node.run_in(check_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24", "fd00::5/64"])


def test_setup_is_idempotent_and_follows_a_changed_address(node):
    node.run_in(setup_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24"])
    node.run_in(setup_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24"])
    assert set(elements(node)) == {"10.88.0.5"}
    node.run_in(setup_masq, "net1", "ctr-a", "eth0", ["10.89.0.7/16"])
    assert set(elements(node)) == {"10.89.0.7"}
    chains = {o["chain"]["name"] for o in ruleset(node) if "chain" in o}
    assert "net4_0a580000_24" not in chains and "net4_0a590000_16" in chains


def test_rule_count_does_not_grow_with_pods(node):
    node.run_in(setup_masq, "net1", "ctr-0", "eth0", ["10.88.0.10/24"])
    one = len(rules(node))
    for i in range(1, 10):
        node.run_in(setup_masq, "net1", f"ctr-{i}", "eth0", [f"10.88.0.{10 + i}/24"])
    assert len(elements(node)) == 10
    assert len(rules(node)) == one


def test_teardown_removes_only_that_attachment(node):
    node.run_in(setup_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24", "fd00::5/64"])
    node.run_in(setup_masq, "net1", "ctr-b", "eth0", ["10.88.0.6/24"])
    node.run_in(setup_masq, "net1", "ctr-a", "net1", ["10.88.0.7/24"])  # same container, other interface
    node.run_in(setup_masq, "net2", "ctr-a", "eth0", ["10.99.0.5/24"])  # same container, other network

    node.run_in(teardown_masq, "net1", "ctr-a", "eth0")  # found by owner, not by address
    assert set(elements(node)) == {"10.88.0.6", "10.88.0.7", "10.99.0.5"}
    node.run_in(teardown_masq, "net1", "ctr-b", "eth0")
    assert set(elements(node)) == {"10.88.0.7", "10.99.0.5"}
    node.run_in(check_masq, "net2", "ctr-a", "eth0", ["10.99.0.5/24"])
    with pytest.raises(CNIError, match="no masquerade entry"):
        node.run_in(check_masq, "net1", "ctr-b", "eth0", ["10.88.0.6/24"])

    # Idempotent: a second DEL, and a DEL of something never added, succeed and change nothing.
    before = ruleset(node)
    node.run_in(teardown_masq, "net1", "ctr-a", "eth0")
    node.run_in(teardown_masq, "net9", "nobody", "eth0")
    assert ruleset(node) == before

    node.run_in(teardown_masq, "net1", "ctr-a", "net1")
    node.run_in(teardown_masq, "net2", "ctr-a", "eth0")
    assert ruleset(node) == []  # the last pod leaves no table behind


def test_teardown_in_a_namespace_without_the_table_succeeds(node):
    node.run_in(teardown_masq, "net1", "ctr-a", "eth0")
    node.run_in(gc_masq, "net1", [])
    assert ruleset(node) == []


def test_a_reused_address_belongs_to_its_newest_owner(node):
    # ADD A, ADD B with the same address (A's DEL was lost), then A's late DEL: B keeps masquerading.
    node.run_in(setup_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24"])
    node.run_in(setup_masq, "net1", "ctr-b", "eth0", ["10.88.0.5/24"])
    with pytest.raises(CNIError, match="another attachment"):
        node.run_in(check_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24"])
    node.run_in(teardown_masq, "net1", "ctr-a", "eth0")
    assert elements(node)["10.88.0.5"][0].split()[1:] == ["net1", "ctr-b", "eth0"]
    node.run_in(check_masq, "net1", "ctr-b", "eth0", ["10.88.0.5/24"])


def test_gc_keeps_only_valid_attachments_of_that_network(node):
    for cid, ifname, addr in [
        ("a", "eth0", "10.88.0.2/24"),
        ("b", "eth0", "10.88.0.3/24"),
        ("b", "net1", "10.88.0.4/24"),
        ("c", "eth0", "10.88.0.5/24"),
    ]:
        node.run_in(setup_masq, "net1", cid, ifname, [addr])
    node.run_in(setup_masq, "net2", "z", "eth0", ["10.77.0.2/24"])
    node.run_in(gc_masq, "net1", [("b", "eth0"), ("c", "eth0"), ("z", "eth0")])
    assert set(elements(node)) == {"10.88.0.3", "10.88.0.5", "10.77.0.2"}
    node.run_in(gc_masq, "net1", [])
    assert set(elements(node)) == {"10.77.0.2"}
    assert {o["chain"]["name"] for o in ruleset(node) if "chain" in o} == {"postrouting", "net4_0a4d0000_24"}


def test_check_reports_a_removed_subnet_rule(node):
    node.run_in(setup_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24"])
    node.exec("nft", "flush", "chain", "inet", TABLE, "net4_0a580000_24")
    with pytest.raises(CNIError, match="does not masquerade"):
        node.run_in(check_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24"])
    node.run_in(setup_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24"])  # ADD again repairs it
    node.run_in(check_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24"])


INJECTIONS = [
    ("net1; flush ruleset", "ctr", "eth0", 7),
    ('net1" ; delete table inet x ; "', "ctr", "eth0", 7),
    ("net1 }", "ctr", "eth0", 7),
    ("net1\nflush ruleset", "ctr", "eth0", 7),
    ("net1", 'ctr"; flush ruleset; "', "eth0", 4),
    ("net1", "ctr\nflush ruleset", "eth0", 4),
    ("net1", "ctr{}", "eth0", 4),
    ("net1", "ctr", 'e"th0', 4),
    ("net1", "ctr", "e;th0", 4),
    ("net1", "ctr", "e{h}", 4),
    ("net1", "ctr", "eth 0", 4),
]


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_injection_attempts_are_rejected_and_change_nothing(node, backend):
    node.run_in(setup_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24"], backend)
    before = ruleset(node)
    for network, cid, ifname, code in INJECTIONS:
        for call in (
            lambda: setup_masq(network, cid, ifname, ["10.88.0.9/24"], backend),
            lambda: teardown_masq(network, cid, ifname, backend),
            lambda: check_masq(network, cid, ifname, ["10.88.0.9/24"], backend),
        ):
            with pytest.raises(CNIError) as info:
                node.run_in(call)
            assert info.value.code == code, (network, cid, ifname, info.value)
    for bad in (["10.88.0.9/24 } ; flush ruleset"], ["10.88.0.9/24\n"], ["fe80::1%eth0/64"], "10.88.0.9/24"):
        with pytest.raises(CNIError) as info:
            node.run_in(setup_masq, "net1", "ctr-b", "eth0", bad, backend)
        assert info.value.code == 7
    with pytest.raises(CNIError) as info:
        node.run_in(gc_masq, "net1; flush ruleset", [], backend)
    assert info.value.code == 7
    assert ruleset(node) == before


def test_unknown_backend_is_a_config_error(node):
    for call in (
        lambda: setup_masq("net1", "c", "eth0", ["10.88.0.5/24"], "ebtables"),
        lambda: teardown_masq("net1", "c", "eth0", "ebtables"),
        lambda: check_masq("net1", "c", "eth0", ["10.88.0.5/24"], "ebtables"),
        lambda: gc_masq("net1", [], "ebtables"),
    ):
        with pytest.raises(CNIError) as info:
            node.run_in(call)
        assert info.value.code == 7 and "backend" in info.value.msg
    assert ruleset(node) == []


def test_namespaces_are_independent(make_node):
    a, b = make_node(), make_node()
    a.run_in(setup_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24"])
    assert ruleset(b) == []
    b.run_in(teardown_masq, "net1", "ctr-a", "eth0")
    assert set(elements(a)) == {"10.88.0.5"}


def test_concurrent_adds_and_dels_leave_consistent_state(node):
    from concurrent.futures import ThreadPoolExecutor

    def add(i):
        node.run_in(setup_masq, "net1", f"ctr-{i}", "eth0", [f"10.{80 + i % 3}.0.{10 + i}/24"])

    def delete(i):
        node.run_in(teardown_masq, "net1", f"ctr-{i}", "eth0")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(add, range(16)))
        assert len(elements(node)) == 16
        list(pool.map(delete, range(0, 16, 2)))
    assert set(elements(node)) == {f"10.{80 + i % 3}.0.{10 + i}" for i in range(1, 16, 2)}
    chains = {o["chain"]["name"] for o in ruleset(node) if "chain" in o}
    assert chains == {"postrouting", "net4_0a500000_24", "net4_0a510000_24", "net4_0a520000_24"}
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(delete, range(1, 16, 2)))
    assert ruleset(node) == []


def test_the_lock_is_the_node_namespace_s_own_and_leaves_no_file(make_node):
    """Held in node a, a setup there waits for it; node b's setup does not; no lock file appears on the host."""
    import os
    import threading
    import time

    from cni_plugins.kernel import locks
    from cni_plugins.shared import masq

    host_lock = "/run/pycni/masq.lock"  # where the lock file used to be
    existed = os.path.lexists(host_lock)
    a, b = make_node(), make_node()
    held, release, finished = threading.Event(), threading.Event(), []

    def hold():
        with locks.netns_lock(masq.LOCK_NAME, timeout=5):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=a.run_in, args=(hold,))
    holder.start()
    try:
        assert held.wait(5)
        b.run_in(setup_masq, "net1", "ctr-b", "eth0", ["10.88.0.6/24"])  # another namespace: no wait
        waiter = threading.Thread(
            target=lambda: finished.append(
                a.run_in(setup_masq, "net1", "ctr-a", "eth0", ["10.88.0.5/24"]) or time.monotonic()
            )
        )
        waiter.start()
        time.sleep(0.3)
        assert finished == [] and elements(a) == {}, "setup in node a ran while a's lock was held"
        released_at = time.monotonic()
        release.set()
        waiter.join(15)
        assert finished and finished[0] >= released_at
    finally:
        release.set()
        holder.join(15)
    assert set(elements(a)) == {"10.88.0.5"} and set(elements(b)) == {"10.88.0.6"}
    if not existed:
        assert not os.path.lexists(host_lock)
