"""The overlay's pure logic: VTEP MAC derivation, MTU arithmetic, reconcile diffs, the
state file, the nftables ruleset text and the netlink-notification filter. No root needed."""

from __future__ import annotations

import json
import os
import stat
import struct

import pytest

from cni_plugins.kernel.vxlan import (
    FdbEntry,
    NeighEntry,
    OnlinkRoute,
    is_local_unicast_mac,
    overlay_mtu,
    stable_vtep_mac,
)
from cni_plugins.shared.overlaystate import (
    OverlayState,
    OverlayStateError,
    lease_problem,
    read_state,
    remove_state,
    state_path,
    write_state,
)
from pycni.overlay import firewall
from pycni.overlay.monitor import RTM_DELNEIGH, RTM_DELROUTE, RTM_NEWLINK, RTM_NEWNEIGH, notifications, relevant_indexes
from pycni.overlay.node import vtep_mac_seed
from pycni.overlay.reconcile import Remote, diff, plan, wanted_state


class Lease:
    def __init__(self, subnet: str, public_ip: str, vtep_mac: str, node_name: str = "") -> None:
        self.subnet, self.public_ip, self.vtep_mac, self.node_name = subnet, public_ip, vtep_mac, node_name


# ---- VTEP MAC ---------------------------------------------------------------------------


def test_vtep_mac_is_stable_and_locally_administered_unicast():
    seed = vtep_mac_seed("192.168.100.11", 1, "node-b")
    mac = stable_vtep_mac(seed)
    assert mac == stable_vtep_mac(vtep_mac_seed("192.168.100.11", 1, "node-b"))  # same identity, same MAC
    assert len(mac.split(":")) == 6 and mac == mac.lower()
    first = int(mac.split(":")[0], 16)
    assert first & 0x02, "locally administered bit must be set"
    assert not first & 0x01, "must be unicast"
    assert is_local_unicast_mac(mac)


def test_vtep_mac_differs_per_identity_and_is_always_valid():
    macs = {stable_vtep_mac(vtep_mac_seed(f"10.0.{i // 250}.{i % 250 + 1}", 1, "n")) for i in range(2000)}
    assert len(macs) == 2000
    assert all(is_local_unicast_mac(mac) for mac in macs)
    assert stable_vtep_mac(vtep_mac_seed("10.0.0.1", 1, "n")) != stable_vtep_mac(vtep_mac_seed("10.0.0.1", 2, "n"))
    assert vtep_mac_seed("::1", 1, "n") == vtep_mac_seed("0::1", 1, "n")  # addresses are normalised


# ---- MTU ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "underlay, ipv6, expected", [(1500, False, 1450), (1500, True, 1430), (9000, False, 8950), (1280, True, 1210)]
)
def test_overlay_mtu(underlay, ipv6, expected):
    assert overlay_mtu(underlay, ipv6) == expected


def test_overlay_mtu_too_small():
    with pytest.raises(ValueError, match="at least 68"):
        overlay_mtu(100)


# ---- reconcile -----------------------------------------------------------------------------

NET = "10.244.0.0/16"
A = Lease("10.244.0.0/24", "192.168.100.10", "0a:00:00:00:00:0a", "a")
B = Lease("10.244.1.0/24", "192.168.100.11", "0a:00:00:00:00:0b", "b")
C = Lease("10.244.2.0/24", "192.168.100.12", "0a:00:00:00:00:0c", "c")


def test_wanted_state_excludes_self_and_derives_entries():
    wanted = wanted_state([A, B, C], A.public_ip, A.subnet, NET)
    assert [r.subnet for r in wanted.remotes] == [B.subnet, C.subnet]
    assert wanted.fdb == {FdbEntry(B.vtep_mac, B.public_ip), FdbEntry(C.vtep_mac, C.public_ip)}
    assert wanted.neigh == {NeighEntry("10.244.1.0", B.vtep_mac), NeighEntry("10.244.2.0", C.vtep_mac)}
    assert wanted.routes == {OnlinkRoute("10.244.1.0/24", "10.244.1.0"), OnlinkRoute("10.244.2.0/24", "10.244.2.0")}
    assert wanted.members == {B.public_ip, C.public_ip}  # the accepted remotes; the node adds its own address
    assert wanted.skipped == []


def test_wanted_state_skips_unusable_leases():
    outside = Lease("10.99.0.0/24", "192.168.100.20", "0a:00:00:00:00:20")
    same_mac = Lease("10.244.3.0/24", "192.168.100.13", B.vtep_mac)
    v6_underlay = Lease("10.244.4.0/24", "fd00::14", "0a:00:00:00:00:14")
    stale_self = Lease("10.244.9.0/24", A.public_ip, A.vtep_mac)  # an older lease of this very node
    wanted = wanted_state([A, B, C, outside, same_mac, v6_underlay, stale_self], A.public_ip, A.subnet, NET)
    # B and same_mac claim one VTEP MAC: neither is programmed (which one is genuine cannot be told).
    assert [r.subnet for r in wanted.remotes] == [C.subnet]
    assert wanted.members == {C.public_ip}
    assert len(wanted.skipped) == 4 and wanted.skipped == sorted(wanted.skipped)
    assert any("outside the cluster" in s for s in wanted.skipped)
    assert any(s.startswith(f"{B.subnet}: VTEP MAC") and "also claimed by 10.244.3.0/24" in s for s in wanted.skipped)
    assert any(s.startswith("10.244.3.0/24: VTEP MAC") and f"also claimed by {B.subnet}" in s for s in wanted.skipped)
    assert any("IPv6" in s for s in wanted.skipped)


def test_diff_adds_missing_removes_stale_and_replaces_changed():
    d = diff({1, 2, 3}, {2, 3, 4})
    assert d.add == [1] and d.remove == [4]
    assert not diff({1}, {1})


def test_plan_nothing_to_do_when_in_step():
    wanted = wanted_state([A, B, C], A.public_ip, A.subnet, NET)
    assert not plan(wanted, wanted.fdb, wanted.neigh, wanted.routes)


def test_plan_repairs_deleted_and_changed_entries():
    wanted = wanted_state([A, B, C], A.public_ip, A.subnet, NET)
    b, c = Remote(B.subnet, B.public_ip, B.vtep_mac), Remote(C.subnet, C.public_ip, C.vtep_mac)
    old_c = FdbEntry("0a:00:00:00:00:99", C.public_ip)  # C restarted with another MAC (old agent)
    gone = Remote("10.244.7.0/24", "192.168.100.17", "0a:00:00:00:00:17")  # a node that left
    todo = plan(
        wanted,
        fdb=[b.fdb, old_c, gone.fdb],  # C's current FDB entry missing
        neigh=[b.neigh, NeighEntry(c.vtep_address, "0a:00:00:00:00:99"), gone.neigh],
        routes=[b.route, gone.route],
    )  # C's route deleted by hand
    assert todo.fdb.add == [c.fdb] and sorted(todo.fdb.remove) == sorted([old_c, gone.fdb])
    assert todo.neigh.add == [c.neigh]
    assert sorted(todo.neigh.remove) == sorted([NeighEntry(c.vtep_address, "0a:00:00:00:00:99"), gone.neigh])
    assert todo.routes.add == [c.route] and todo.routes.remove == [gone.route]
    assert "+1 fdb" in todo.summary() and "-2 fdb" in todo.summary()


def test_remote_entries_follow_flannel_layout():
    r = Remote("10.244.5.0/24", "192.168.100.15", "0a:00:00:00:00:15")
    assert r.vtep_address == "10.244.5.0"
    assert r.route == OnlinkRoute("10.244.5.0/24", "10.244.5.0")
    assert r.neigh == NeighEntry("10.244.5.0", "0a:00:00:00:00:15")
    assert r.fdb == FdbEntry("0a:00:00:00:00:15", "192.168.100.15")


# ---- state file ---------------------------------------------------------------------------

STATE = OverlayState(
    network="10.244.0.0/16",
    subnet="10.244.3.0/24",
    gateway="10.244.3.1",
    mtu=1450,
    bridge="pycni0",
    vxlan_device="pycni.1",
    vni=1,
    public_ip="192.168.100.11",
    vtep_mac="0a:58:0a:f4:03:00",
    node_name="node-3",
)


def test_lease_problem_says_lapsed_or_lost_and_nothing_for_a_valid_lease():
    from dataclasses import replace

    valid = replace(STATE, lease_expires=1000.0)
    assert lease_problem(valid, now=999.0) == ""
    assert lease_problem(STATE, now=1e10) == ""  # an older agent's state: no expiry known
    lapsed = lease_problem(valid, now=1030.0)
    assert "10.244.3.0/24 lapsed 30 s ago" in lapsed and "is it running" in lapsed
    lost = lease_problem(replace(valid, lease_lost="the subnet is now leased to 192.168.100.99"), now=999.0)
    assert lost.startswith("this node lost its pod subnet 10.244.3.0/24") and "192.168.100.99" in lost


def test_lease_fields_round_trip_and_are_validated(tmp_path):
    from dataclasses import replace

    state = replace(STATE, lease_expires=1796000000.5, lease_lost="gone")
    doc = state.to_dict()
    assert doc["leaseExpires"] == 1796000000.5 and doc["leaseLost"] == "gone"
    assert OverlayState.from_dict(doc) == state
    for bad in ({"leaseExpires": "soon"}, {"leaseExpires": -1}, {"leaseLost": 7}):
        with pytest.raises(OverlayStateError):
            OverlayState.from_dict({**doc, **bad})


def test_state_round_trip(tmp_path):
    directory = tmp_path / "run" / "pycni"
    path = write_state(str(directory), STATE)
    assert path == state_path(str(directory))
    assert read_state(str(directory)) == STATE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # root's alone (tests/unit/test_state_trust.py)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    doc = json.loads(open(path).read())
    assert doc["vxlanDevice"] == "pycni.1" and doc["publicIP"] == "192.168.100.11" and doc["vtepMAC"]
    assert [n for n in os.listdir(directory)] == ["overlay.json"]  # no temp files left behind
    assert remove_state(str(directory)) is True
    assert read_state(str(directory)) is None
    assert remove_state(str(directory)) is False


def test_state_absent_is_none(tmp_path):
    assert read_state(str(tmp_path / "missing")) is None


def test_state_refuses_symlink(tmp_path):
    write_state(str(tmp_path / "real"), STATE)
    (tmp_path / "d").mkdir()
    os.symlink(tmp_path / "real" / "overlay.json", tmp_path / "d" / "overlay.json")
    with pytest.raises(OverlayStateError, match="symlink"):
        read_state(str(tmp_path / "d"))


def test_state_write_replaces_a_symlink_instead_of_following_it(tmp_path):
    target = tmp_path / "victim"
    target.write_text("keep")
    (tmp_path / "d").mkdir()
    os.symlink(target, tmp_path / "d" / "overlay.json")
    write_state(str(tmp_path / "d"), STATE)
    assert target.read_text() == "keep"
    assert not os.path.islink(tmp_path / "d" / "overlay.json")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"subnet": "10.245.3.0/24"}, "not inside network"),
        ({"gateway": "10.244.4.1"}, "not inside subnet"),
        ({"mtu": 20}, "mtu"),
        ({"bridge": "a;b c"}, "interface name"),
        ({"vtepMAC": "zz"}, "vtepMAC"),
        ({"vni": "1"}, "integer"),
    ],
)
def test_state_rejects_invalid_content(tmp_path, change, message):
    doc = STATE.to_dict()
    doc.update(change)
    (tmp_path / "overlay.json").write_text(json.dumps(doc))
    with pytest.raises(OverlayStateError, match=message):
        read_state(str(tmp_path))


def test_state_keeps_unknown_keys(tmp_path):
    doc = STATE.to_dict()
    doc["future"] = {"x": 1}
    (tmp_path / "overlay.json").write_text(json.dumps(doc))
    state = read_state(str(tmp_path))
    assert state == STATE and state.to_dict()["future"] == {"x": 1}


# ---- firewall text ----------------------------------------------------------------------------


def test_firewall_ruleset_text():
    text = firewall.render_table(firewall.FirewallSpec("10.244.0.0/16", 8472), ["192.168.100.11", "192.168.100.10"])
    assert "udp dport 8472 ip saddr @members counter accept" in text
    assert "udp dport 8472 counter drop" in text
    assert "ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return" in text
    # pod -> another node's own address is masqueraded too (a strict host's rp_filter drops a pod source)
    assert "daddr @members return" not in text
    assert "ip saddr 10.244.0.0/16 counter masquerade fully-random" in text
    assert "add element inet pycni_overlay members { 192.168.100.10, 192.168.100.11 }" in text


def test_firewall_without_masquerade_has_no_nat_chain():
    spec = firewall.FirewallSpec("10.244.0.0/16", 8472, masquerade=False)
    text = firewall.render_table(spec, ["192.168.100.10"])
    assert "postrouting" not in text and "masquerade" not in text
    assert "udp dport 8472 counter drop" in text
    intact = firewall.TableState(members=set(), sets={"members", "members6"}, rules={"input": 3})
    assert intact.intact(spec) and not intact.intact(firewall.FirewallSpec("10.244.0.0/16", 8472))


@pytest.mark.parametrize("bad", ["192.168.100.1; flush ruleset", "1.2.3.4 }", "evil"])
def test_firewall_rejects_non_addresses(bad):
    with pytest.raises(ValueError):
        firewall.render_members(["192.168.100.1", bad])


def test_firewall_spec_validates():
    with pytest.raises(ValueError):
        firewall.FirewallSpec("10.244.0.1/16", 8472)
    with pytest.raises(ValueError):
        firewall.FirewallSpec("10.244.0.0/16", 70000)
    v6 = firewall.render_table(firewall.FirewallSpec("fd10::/48", 4789), ["fd00::1"])
    assert "ip6 saddr fd10::/48 ip6 daddr fd10::/48 return" in v6
    assert "add element inet pycni_overlay members6 { fd00::1 }" in v6


# ---- netlink notification filter ---------------------------------------------------------------


def _msg(kind: int, body: bytes) -> bytes:
    length = 16 + len(body)
    return struct.pack("=IHHII", length, kind, 0, 0, 0) + body + b"\0" * ((-length) % 4)


def test_monitor_extracts_interface_indexes():
    neigh = _msg(RTM_DELNEIGH, struct.pack("=BBHiHBB", 7, 0, 0, 42, 0x80, 2, 0))
    link = _msg(RTM_NEWLINK, struct.pack("=BBHiII", 0, 0, 1, 7, 0, 0))
    rtattr_oif = struct.pack("=HHi", 8, 4, 9)
    route = _msg(RTM_DELROUTE, struct.pack("=BBBBBBBBI", 2, 24, 0, 0, 254, 3, 0, 1, 4) + rtattr_oif)
    assert relevant_indexes(neigh + link + route) == {42, 7, 9}
    assert relevant_indexes(_msg(4, b"")) is None  # overrun: unknown, reconcile anyway


def test_monitor_classifies_and_ignores_neighbour_discovery_churn():
    v6_reachable = _msg(RTM_NEWNEIGH, struct.pack("=BBHiHBB", 10, 0, 0, 5, 0x02, 0, 0))
    v6_permanent = _msg(RTM_NEWNEIGH, struct.pack("=BBHiHBB", 10, 0, 0, 6, 0x80, 0, 0))
    v4_reachable = _msg(RTM_NEWNEIGH, struct.pack("=BBHiHBB", 2, 0, 0, 8, 0x02, 0, 0))
    assert notifications(v6_reachable + v6_permanent + v4_reachable) == [("neigh", 6), ("neigh", 8)]
