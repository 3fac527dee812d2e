"""The incremental reconcile's decisions (pycni/overlay/reconcile.py RemoteTable), without a kernel.

One store event must cost work for that one node only, and the table must always agree with what a full
reconcile over the same leases would want (wanted_state): checked after every step of random event sequences.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from pycni.overlay.reconcile import Own, Remote, RemoteTable, wanted_state

OWN = Own.of("192.168.0.10", "10.244.0.0/24", "10.244.0.0/16", "0a:00:00:00:00:0a")


@dataclass
class Lease:
    subnet: str
    public_ip: str
    vtep_mac: str
    node_name: str = ""


def lease(i: int, mac: int | None = None) -> Lease:
    return Lease(f"10.244.{i}.0/24", f"192.168.1.{i}", f"0a:00:00:00:01:{(i if mac is None else mac):02x}", f"n{i}")


def remote(item: Lease) -> Remote:
    return Remote(item.subnet, item.public_ip, item.vtep_mac, item.node_name)


def test_a_join_and_a_leave_touch_only_that_node():
    table = RemoteTable(OWN)
    for i in range(1, 200):
        table.update(f"k{i}", lease(i))
    delta = table.update("k200", lease(200))
    assert delta.add == [remote(lease(200))] and delta.remove == []
    delta = table.update("k50", None)
    assert delta.remove == [remote(lease(50))] and delta.add == []
    assert "192.168.1.50" not in table.members and "192.168.1.200" in table.members


def test_an_unchanged_put_costs_nothing_and_a_changed_mac_is_one_swap():
    table = RemoteTable(OWN)
    table.update("k1", lease(1))
    assert not table.update("k1", lease(1))
    changed = Lease("10.244.1.0/24", "192.168.1.1", "0a:00:00:00:09:99", "n1")
    delta = table.update("k1", changed)
    assert delta.remove == [remote(lease(1))] and delta.add == [remote(changed)]
    assert table.by_fdb_mac == {"0a:00:00:00:09:99": remote(changed)}


def test_a_second_claim_of_a_mac_unprograms_both_and_the_first_comes_back_when_it_goes():
    table = RemoteTable(OWN)
    table.update("k1", lease(1))
    delta = table.update("k2", lease(2, mac=1))  # claims node 1's VTEP MAC
    assert delta.remove == [remote(lease(1))] and delta.add == []
    assert any("also claimed by 10.244.2.0/24" in reason for reason in table.skipped())
    delta = table.update("k2", None)
    assert delta.add == [remote(lease(1))] and delta.remove == []


def test_own_and_unusable_leases_are_never_programmed():
    table = RemoteTable(OWN)
    assert not table.update("own", Lease("10.244.0.0/24", "192.168.0.10", "0a:00:00:00:00:0a"))
    assert not table.update("pod-ip", Lease("10.244.3.0/24", "10.244.9.9", "0a:00:00:00:00:33"))
    assert not table.update("my-mac", Lease("10.244.4.0/24", "192.168.1.4", "0a:00:00:00:00:0a"))
    assert len(table.skipped()) == 2 and not table.members


@pytest.mark.parametrize("seed", range(5))
def test_every_step_of_a_random_history_matches_a_full_reconcile(seed):
    rng = random.Random(seed)
    table = RemoteTable(OWN)
    current: dict[str, Lease] = {}
    programmed: set[Remote] = set()
    for _ in range(400):
        i = rng.randrange(1, 40)
        key = f"subnets/10.244.{i}.0-24"  # as in the store: one key per subnet
        if rng.random() < 0.3:
            item = None
        else:
            item = lease(i, mac=rng.choice([None, None, None, rng.randrange(1, 6)]))
        delta = table.update(key, item)
        assert not set(delta.remove) - programmed, "removed what was not programmed"
        programmed = (programmed - set(delta.remove)) | set(delta.add)
        if item is None:
            current.pop(key, None)
        else:
            current[key] = item
        full = wanted_state(
            current.values(), "192.168.0.10", "10.244.0.0/24", "10.244.0.0/16", own_vtep_mac="0a:00:00:00:00:0a"
        )
        assert programmed == set(table.wanted().remotes)
        assert {(r.fdb, r.neigh, r.route) for r in programmed} == {(r.fdb, r.neigh, r.route) for r in full.remotes}
        assert table.members == full.members


def test_direct_routing_routes_same_subnet_nodes_via_their_underlay_and_keeps_vxlan_for_the_rest():
    import dataclasses
    import ipaddress

    own = dataclasses.replace(OWN, direct_nets=(ipaddress.ip_network("192.168.1.0/25"),))
    table = RemoteTable(own)
    for i in (5, 200):
        table.update(f"k{i}", lease(i))
    wanted = table.wanted()
    near, far = sorted(wanted.remotes, key=lambda r: r.public_ip != "192.168.1.5")
    assert near.direct == "192.168.1.5" and far.direct == ""
    assert {(r.dst, r.gw) for r in wanted.direct_routes} == {("10.244.5.0/24", "192.168.1.5")}
    # The direct one has no VXLAN entries; the far one has its three; both are members (their VXLAN is accepted).
    assert {f.dst for f in wanted.fdb} == {"192.168.1.200"}
    assert {(r.dst, r.gw) for r in wanted.routes} == {("10.244.200.0/24", "10.244.200.0")}
    assert wanted.members == {"192.168.1.5", "192.168.1.200"}
    assert set(table.by_subnet) == {"10.244.5.0/24", "10.244.200.0/24"} and set(table.by_fdb_mac) == {far.vtep_mac}
    # The near node moves off the subnet: its direct route goes and its VXLAN entries come, in one delta.
    moved = Lease("10.244.5.0/24", "192.168.1.130", lease(5).vtep_mac, "n5")
    delta = table.update("k5", moved)
    assert [r.direct for r in delta.remove] == ["192.168.1.5"] and [r.direct for r in delta.add] == [""]
    assert not table.wanted().direct_routes


def test_without_direct_nets_nothing_is_routed_directly():
    table = RemoteTable(OWN)
    table.update("k5", lease(5))
    assert not table.wanted().direct_routes and len(table.wanted().fdb) == 1
