"""pycni.conformance without a network: what is published, how faults are named, the matrix, the rendezvous."""

from __future__ import annotations

import json
import socket
import struct
import time

import pytest

from ipam.cluster import ClusterConfig, acquire_lease, init_cluster, list_leases, open_store
from pycni.conformance import client, diagnose, echo, facts, report
from pycni.conformance.model import FAIL, PASS, SKIP, Check, NodeResults, Party, node_key, results_key, valid_node_id
from pycni.conformance.probe import ProbeRecord, Record, has_port_mappings
from pycni.conformance.rendezvous import STALE_AFTER, Rendezvous, read_parties
from pycni.conformance.runner import ConformanceError, choose_node_id


def party(node: str, index: int, datapath: dict | None = None, firewall: list | None = None) -> Party:
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
        host_port=17080,
        session=f"s{index}",
        heartbeat=time.time(),
        facts={"datapath": datapath or {}, "firewall": firewall or [], "vxlanPort": 8472},
    )


def healthy_pair() -> tuple[Party, Party]:
    ok = {"fdb": True, "neigh": True, "route": True}
    return party("a", 0, {"192.168.100.11": dict(ok)}), party("b", 1, {"192.168.100.10": dict(ok)})


# ---- model ----------------------------------------------------------------------------------


def test_party_and_results_round_trip_through_json():
    a, _ = healthy_pair()
    assert Party.from_json(a.to_json()) == a
    assert a.vtep_address == "10.244.0.0" and a.probe_label == "a/probe"
    results = NodeResults(
        "a",
        a.public_ip,
        "s0",
        1.0,
        2.0,
        [Check("pmtu", "a", "b", FAIL, None, "MTU mismatch"), Check("no-snat", "a", "b", PASS, 0.5)],
    )
    again = NodeResults.from_json(results.to_json())
    assert again == results
    assert again.checks[1].to_dict() == {
        "check": "no-snat",
        "from": "a",
        "to": "b",
        "result": "pass",
        "latencyMs": 0.5,
        "message": "",
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"node": "../x"},
        {"node": "results"},
        {"probeIP": "pod.example"},
        {"hostPort": 70000},
        {"echoPort": "7080"},
        {"subnet": "10.244.0.1/24"},
    ],
)
def test_party_refuses_malformed_entries(bad):
    data = party("a", 0).to_dict()
    data.update(bad)
    with pytest.raises((ValueError, TypeError)):
        Party.from_dict(data)


def test_node_ids_are_store_key_components():
    for good in ("n0", "node-1.example", "192.168.100.10", "fd00::1"):
        assert valid_node_id(good)
    for bad in ("", "results", ".hidden", "a/b", "x" * 64, "sp ace"):
        assert not valid_node_id(bad)
    assert node_key("n0") == "conformance/n0" and results_key("n0") == "conformance/results/n0"


class Lease:
    def __init__(self, public_ip: str, node_name: str) -> None:
        self.public_ip, self.node_name = public_ip, node_name


def test_node_id_is_the_name_unless_another_node_shares_it():
    leases = [Lease("10.0.0.1", "host"), Lease("10.0.0.2", "host")]
    assert choose_node_id("", "host", "10.0.0.1", leases) == "10.0.0.1"
    assert choose_node_id("", "n1", "10.0.0.1", [Lease("10.0.0.1", "n1"), Lease("10.0.0.2", "n2")]) == "n1"
    assert choose_node_id("mine", "host", "10.0.0.1", leases) == "mine"
    with pytest.raises(ConformanceError):
        choose_node_id("results", "", "10.0.0.1", leases)


# ---- naming the fault -------------------------------------------------------------------------


def test_a_missing_fdb_entry_is_named_on_the_way_there_and_on_the_way_back():
    a, b = healthy_pair()
    a.facts["datapath"]["192.168.100.11"]["fdb"] = False
    there = diagnose.explain_no_reply("TCP x", [diagnose.Leg(a, b)], 1.5)
    assert there == (
        "TCP x: no reply within 1.5s; node a has no ARP/FDB for remote VTEP 0a:58:00:00:00:01 -> "
        "192.168.100.11 on pycni.1: missing FDB entry"
    )
    back = diagnose.explain_no_reply("TCP y", [diagnose.Leg(b, a), diagnose.Leg(a, b, returning=True)], 1.5)
    assert back.endswith("missing FDB entry (the replies' way back)")


def test_missing_neighbour_and_route_entries_are_named():
    a, b = healthy_pair()
    a.facts["datapath"]["192.168.100.11"].update(neigh=False, route=False)
    message = diagnose.explain_no_reply("TCP x", [diagnose.Leg(a, b)], 2)
    assert "no route to 10.244.1.0/24 via 10.244.1.0 on pycni.1: missing route" in message
    assert "no ARP/neighbour entry for remote VTEP 10.244.1.0 (0a:58:00:00:00:01)" in message
    a.facts["datapath"] = {}
    assert "(its agent does not know the node's lease)" in diagnose.explain_no_reply("x", [diagnose.Leg(a, b)], 2)


def test_with_every_entry_in_place_a_drop_rule_is_blamed_then_the_underlay():
    a, b = healthy_pair()
    b.facts["firewall"] = [
        {"table": "inet fw", "chain": "forward", "hook": "forward", "policy": "accept", "drops": 1, "nats": 0}
    ]
    message = diagnose.explain_no_reply("TCP x", [diagnose.Leg(a, b)], 2)
    assert message == (
        "TCP x: no reply within 2s; packets dropped: firewall (node b: table inet fw chain forward "
        "(forward): 1 drop/reject rule)"
    )
    b.facts["firewall"] = []
    message = diagnose.explain_no_reply("TCP x", [diagnose.Leg(a, b)], 2)
    assert "packets lost on the underlay between 192.168.100.10 and 192.168.100.11" in message
    assert "UDP 8472" in message
    rejected = diagnose.explain_no_reply("TCP x", [], 2, "rejected: administratively prohibited")
    assert "packets dropped: firewall" in rejected


def test_a_translated_source_is_named_snat_with_the_rule_that_may_do_it():
    a, b = healthy_pair()
    a.facts["firewall"] = [
        {"table": "ip nat", "chain": "POSTROUTING", "hook": "postrouting", "policy": "accept", "drops": 0, "nats": 1}
    ]
    message = diagnose.explain_seen("10.244.0.0", a.probe_ip, a, [a, b])
    assert message.startswith("reply came from 10.244.0.0 (node a's VXLAN device address), not the pod 10.244.0.2")
    assert (
        "SNAT between nodes (node a: table ip nat chain POSTROUTING (postrouting): 1 masquerade/snat rule)" in message
    )
    assert "(node a's own address)" in diagnose.explain_seen("192.168.100.10", a.probe_ip, a, [a, b])
    assert "(an address outside the cluster)" in diagnose.explain_seen("172.16.0.1", a.probe_ip, a, [a, b])
    assert "(a pod on node b)" in diagnose.explain_seen("10.244.1.3", a.probe_ip, a, [a, b])


@pytest.mark.parametrize(
    "error, words",
    [
        ("emsgsize (message too long, path MTU 1300)", "the pod's MTU (1450) is below 1400: MTU mismatch"),
        ("frag-needed (next-hop MTU 1400)", "fragmentation needed"),
        ("timeout", "no reply to 1400-byte DF packets while small packets pass"),
    ],
)
def test_pmtu_failures_are_an_mtu_mismatch(error, words):
    a, b = healthy_pair()
    message = diagnose.explain_pmtu("ICMP x", error, 1400, a, b, 1.5)
    assert words in message and "MTU mismatch" in message


def test_refusals_say_what_does_not_listen():
    assert "no hostPort DNAT for port 17080 on node b" in diagnose.explain_refused("x", 17080, True, "b")
    assert "nothing listens on port 7080" in diagnose.explain_refused("x", 7080)


# ---- facts ---------------------------------------------------------------------------------

RULESET = [
    {"table": {"family": "inet", "name": "pycni_overlay"}},
    {"chain": {"family": "inet", "table": "pycni_overlay", "name": "input", "hook": "input", "policy": "accept"}},
    {"rule": {"family": "inet", "table": "pycni_overlay", "chain": "input", "expr": [{"drop": None}]}},
    {"chain": {"family": "inet", "table": "fw", "name": "forward", "hook": "forward", "policy": "accept"}},
    {"chain": {"family": "inet", "table": "fw", "name": "helper"}},
    {"rule": {"family": "inet", "table": "fw", "chain": "forward", "expr": [{"match": {}}, {"drop": None}]}},
    {"rule": {"family": "inet", "table": "fw", "chain": "helper", "expr": [{"reject": {}}]}},
    {"rule": {"family": "inet", "table": "fw", "chain": "forward", "expr": [{"accept": None}]}},
    {"chain": {"family": "ip", "table": "nat", "name": "post", "hook": "postrouting", "policy": "accept"}},
    {"rule": {"family": "ip", "table": "nat", "chain": "post", "expr": [{"masquerade": None}]}},
    {"chain": {"family": "ip", "table": "filter", "name": "INPUT", "hook": "input", "policy": "drop"}},
    {"chain": {"family": "ip", "table": "quiet", "name": "in", "hook": "input", "policy": "accept"}},
]


def test_firewall_facts_list_foreign_chains_that_drop_or_translate():
    found = facts.firewall_facts(RULESET)
    assert found == [
        {
            "table": "inet fw",
            "chain": "forward",
            "hook": "forward",
            "policy": "accept",
            "drops": 2,
            "nats": 0,
            "drops4": 2,
            "drops6": 2,
        },
        {
            "table": "ip nat",
            "chain": "post",
            "hook": "postrouting",
            "policy": "accept",
            "drops": 0,
            "nats": 1,
            "drops4": 0,
            "drops6": 0,
        },
        {
            "table": "ip filter",
            "chain": "INPUT",
            "hook": "input",
            "policy": "drop",
            "drops": 0,
            "nats": 0,
            "drops4": 0,
            "drops6": 0,
        },
    ]
    assert facts.describe_firewall(found) == (
        "table inet fw chain forward (forward): 2 drop/reject rules; table ip filter chain INPUT (input): policy drop"
    )
    assert facts.describe_firewall(found, "nats") == "table ip nat chain post (postrouting): 1 masquerade/snat rule"


def test_datapath_facts_check_each_lease_against_the_vxlan_entries(monkeypatch):
    class L:
        def __init__(self, public_ip, subnet, mac):
            self.public_ip, self.subnet, self.vtep_mac = public_ip, subnet, mac

    monkeypatch.setattr(facts.readers, "fdb", lambda dev: [{"mac": "0a:00:00:00:00:01", "dst": "10.0.0.2"}])
    monkeypatch.setattr(
        facts.readers,
        "neighbours",
        lambda dev: [
            {"dst": "10.244.1.0", "lladdr": "0a:00:00:00:00:01"},
            {"dst": "10.244.2.0", "lladdr": "0a:00:00:00:00:02"},
        ],
    )
    monkeypatch.setattr(
        facts.readers,
        "routes",
        lambda errors, *args, version=4: [{"dst": "10.244.1.0/24", "gateway": "10.244.1.0"}] if version == 4 else [],
    )
    leases = [
        L("10.0.0.1", "10.244.0.0/24", "0a:00:00:00:00:00"),
        L("10.0.0.2", "10.244.1.0/24", "0A:00:00:00:00:01"),
        L("10.0.0.3", "10.244.2.0/24", "0a:00:00:00:00:02"),
    ]
    assert facts.datapath_facts("pycni.1", leases, "10.0.0.1") == {
        "10.0.0.2": {"fdb": True, "neigh": True, "route": True},
        "10.0.0.3": {"fdb": False, "neigh": True, "route": False},
    }


# ---- the echo protocol and ICMP parsing --------------------------------------------------------


def test_the_echo_answers_its_own_requests_only():
    reply = json.loads(echo.answer(b"PYCNI-CONFORMANCE abc123\n", "10.244.1.5", "b/probe"))
    assert reply == {"service": echo.SERVICE, "label": "b/probe", "peer": "10.244.1.5", "nonce": "abc123"}
    assert echo.answer(b"GET / HTTP/1.0\r\n", "10.0.0.1", "x") is None
    assert len(json.loads(echo.answer(b"PYCNI-CONFORMANCE " + b"n" * 500, "1.2.3.4", "x"))["nonce"]) == 64
    assert echo._peer_address(("::ffff:10.0.0.5", 1, 0, 0)) == "10.0.0.5"


def test_checks_never_resolve_names():
    with pytest.raises(ValueError, match="never resolve names"):
        client.tcp_exchange(None, "pod.default.svc.cluster.local", 80, 1)


def _ip_packet(src: str, dst: str, payload: bytes) -> bytes:
    return (
        struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 1, 0, socket.inet_aton(src), socket.inet_aton(dst)
        )
        + payload
    )


def test_icmp_replies_and_errors_are_matched_to_the_request():
    request = client._echo_request(0x1234, 7, b"x" * 56)
    assert client._checksum(request) == 0  # a valid checksum sums to zero
    reply = bytes([0, 0]) + request[2:]
    assert client._match(_ip_packet("10.244.1.2", "10.244.0.2", reply), "10.244.1.2", 0x1234, 7) == "ok"
    assert client._match(_ip_packet("10.244.1.2", "10.244.0.2", reply), "10.244.1.2", 0x1234, 8) is None
    assert client._match(_ip_packet("10.244.9.9", "10.244.0.2", reply), "10.244.1.2", 0x1234, 7) is None
    original = _ip_packet("10.244.0.2", "10.244.1.2", request)[:28]
    frag = struct.pack("!BBHHH", 3, 4, 0, 0, 1400) + original
    assert (
        client._match(_ip_packet("192.168.1.1", "10.244.0.2", frag), "10.244.1.2", 0x1234, 7)
        == "frag-needed (next-hop MTU 1400)"
    )
    prohibited = struct.pack("!BBHHH", 3, 13, 0, 0, 0) + original
    assert (
        client._match(_ip_packet("192.168.1.1", "10.244.0.2", prohibited), "10.244.1.2", 0x1234, 7)
        == "rejected: administratively prohibited"
    )


# ---- the matrix ------------------------------------------------------------------------------


def test_the_report_lists_missing_nodes_and_fails_on_any_failure():
    rows = [
        Check("pod-pod-other-node", "a", "b", PASS, 1.234, "TCP and UDP"),
        Check("pmtu", "a", "b", SKIP, None, "not measured"),
    ]
    results = [NodeResults("a", "192.168.100.10", "s", 0, 1, rows)]
    collected = report.collect(results, {"192.168.100.10"})
    assert report.passed(collected)
    collected = report.collect(results, {"192.168.100.10", "192.168.100.11"})
    assert not report.passed(collected)
    missing = [r for r in collected if r.check == "rendezvous"]
    assert missing[0].source == "192.168.100.11" and "wrote no conformance results" in missing[0].message
    text = report.table(collected)
    assert text.splitlines()[0].split() == ["CHECK", "FROM", "TO", "RESULT", "LATENCY", "MESSAGE"]
    assert "1.23ms" in text and text.splitlines()[-1].startswith("FAIL: 3 checks, 1 passed, 1 failed, 1 skipped")
    doc = json.loads(report.as_json(collected, results))
    assert doc["passed"] is False and doc["summary"] == {"pass": 1, "fail": 1, "skip": 1}
    assert doc["checks"][0]["check"] == "pod-pod-other-node" and "pmtu" in doc["legend"]
    assert not report.passed([])


def test_the_report_keeps_to_the_newest_run():
    def result(node, session, finished, **peers):
        return NodeResults(node, node, session, finished - 1, finished, [], dict(peers))

    old = [result("a", "a1", 10, b="b1", c="c1"), result("b", "b1", 11, a="a1", c="c1"), result("c", "c1", 12, a="a1")]
    new = [result("a", "a2", 20, b="b2"), result("b", "b2", 21, a="a2")]
    chosen, ignored = report.current_round(old + new)
    assert sorted(r.session for r in chosen) == ["a2", "b2"] and [r.session for r in ignored] == ["c1", "b1", "a1"]
    assert report.ignored_note(ignored) == (
        "ignored results of an earlier run from a, b, c (they did not take part in the newest run)"
    )
    alone = result("a", "a3", 30)  # a run that met nobody
    assert report.current_round(old + new + [alone])[0] == [alone]
    assert report.current_round([]) == ([], [])


# ---- meeting in the store ----------------------------------------------------------------------


def test_nodes_meet_in_the_store_and_wait_for_each_other(tmp_path):
    store = open_store(f"file://{tmp_path}")
    cfg = ClusterConfig(network="10.244.0.0/16")
    init_cluster(store, cfg)
    for i in range(3):
        acquire_lease(store, cfg, f"192.168.100.{10 + i}", f"0a:58:00:00:00:0{i}", f"n{i}")
    a, b = party("n0", 0), party("n1", 1)
    meeting_a, meeting_b = Rendezvous(store, a), Rendezvous(store, b)
    meeting_a.publish()
    meeting_b.publish()
    stale = party("n2", 2)
    stale.heartbeat = 0.0  # published by a run that died long ago
    store.put(node_key("n2"), stale.to_json())
    assert {p.node for p in read_parties(store)} == {"n0", "n1"}
    assert read_parties(store, now=time.time() + STALE_AFTER + 1) == []
    logged = []
    meeting_a.log = logged.append
    peers = meeting_a.wait_for_peers(0.3, sleep=lambda s: None)
    assert [p.node for p in peers.found] == ["n1"] and peers.missing == ["192.168.100.12"]
    assert "192.168.100.12" in logged[0]
    # The barrier: n0 waits for results of the session it measured, not for older ones.
    store.put(results_key("n1"), NodeResults("n1", b.public_ip, "old-session", 0, 1).to_json())
    assert meeting_a.wait_for_results([b], 0.2, sleep=lambda s: None) == ["n1"]
    meeting_b.publish_results(NodeResults("n1", b.public_ip, b.session, 0, 1))
    assert meeting_a.wait_for_results([b], 0.2) == []
    meeting_a.withdraw()
    assert store.get(node_key("n0")) is None and store.get(node_key("n1")) is not None
    meeting_b.clear_previous()
    assert store.get(results_key("n1")) is None
    store.close()


def test_the_run_record_round_trips_and_portmap_is_detected(tmp_path):
    record = Record(
        "net",
        "/etc/cni/net.d",
        "/opt/cni/bin",
        "/var/lib/cni",
        [ProbeRecord("probe", "/run/netns/x", "cid", "eth0", "10.0.0.2")],
        [123],
    )
    record.save(str(tmp_path))
    assert Record.load(str(tmp_path)) == record
    Record.remove(str(tmp_path))
    assert Record.load(str(tmp_path)) is None

    class NetList:
        plugins = [{"type": "vxlan"}, {"type": "portmap", "capabilities": {"portMappings": True}}]

    assert has_port_mappings(NetList)
    NetList.plugins = NetList.plugins[:1]
    assert not has_port_mappings(NetList)


# ---- dual-stack --------------------------------------------------------------------------------

from pycni.conformance import checks  # noqa: E402
from pycni.conformance.model import CHECK_HELP, CHECKS, family_check, split_check  # noqa: E402


def dual_party(
    node: str,
    index: int,
    datapath: dict | None = None,
    firewall: list | None = None,
    public_ipv6: str = "",
    vxlan_device6: str = "",
) -> Party:
    import ipaddress

    p = party(node, index, datapath, firewall)
    subnet = ipaddress.ip_network(f"fd00:10:244:{index}::/64")
    p.subnet6, p.probe_ip6, p.client_ip6 = str(subnet), str(subnet[2]), str(subnet[3])
    if public_ipv6:
        p.public_ipv6, p.vtep_mac6, p.vxlan_device6 = public_ipv6, f"0a:66:00:00:00:0{index}", vxlan_device6
    return p


def test_the_ipv6_rows_carry_the_family_in_their_name_next_to_their_ipv4_rows():
    assert family_check("pmtu", 4) == "pmtu" and family_check("pmtu", 6) == "pmtu/ipv6"
    assert split_check("pod-pod-other-node/ipv6") == ("pod-pod-other-node", 6)
    assert split_check("gateway-mac") == ("gateway-mac", 4)
    assert CHECKS.index("pod-pod-other-node/ipv6") == CHECKS.index("pod-pod-other-node") + 1
    assert CHECKS[:2] == ("probe-pod", "gateway-mac") and CHECKS[-2:] == ("store-entries", "rendezvous")
    assert all(name in CHECK_HELP for name in CHECKS)
    assert "IPv6" in CHECK_HELP["pmtu/ipv6"] and "1280" in CHECK_HELP["pmtu"]
    rows = [Check("pmtu/ipv6", "a", "b", PASS), Check("pmtu", "a", "b", PASS), Check("no-snat/ipv6", "a", "b", PASS)]
    assert [r.check for r in sorted(rows, key=lambda r: r.sort_key)] == ["no-snat/ipv6", "pmtu", "pmtu/ipv6"]


def test_a_dual_stack_party_round_trips_and_an_older_one_still_reads():
    a = dual_party("a", 0, public_ipv6="fd70::10", vxlan_device6="pycni6.1")
    data = a.to_dict()
    assert (data["ipv6Subnet"], data["ipv6ProbeIP"], data["publicIPv6"]) == (
        "fd00:10:244::/64",
        "fd00:10:244::2",
        "fd70::10",
    )
    again = Party.from_json(a.to_json())
    assert again == a
    assert again.families == [4, 6] and again.probe(6) == a.probe_ip6 and again.client(4) == a.client_ip
    assert again.node_ip(4) == a.public_ip and again.node_ip(6) == "fd70::10"
    assert again.vtep_address_of(6) == "fd00:10:244::" and again.vtep_address_of(4) == "10.244.0.0"
    # An entry of an older run (IPv4 only, no IPv6 keys) reads as an IPv4-only party.
    old = party("b", 1).to_dict()
    assert not any(key.startswith("ipv6") or key == "publicIPv6" for key in old)
    b = Party.from_dict(old)
    assert b.families == [4] and b.node_ip(6) == "" and b.probe(6) == ""
    # An IPv6-only node publishes its IPv6 pods in the plain fields.
    c = Party(
        node="c",
        public_ip="192.168.100.12",
        subnet="fd00:10:244:2::/64",
        vtep_mac="0a:58:00:00:00:02",
        vxlan_device="pycni.1",
        mtu=1450,
        probe_ip="fd00:10:244:2::2",
        client_ip="fd00:10:244:2::3",
        echo_port=7080,
        host_port=17080,
        session="s2",
    )
    assert c.families == [6] and c.probe(4) == "" and c.vtep_address_of(6) == "fd00:10:244:2::"


@pytest.mark.parametrize(
    "bad",
    [
        {"ipv6ProbeIP": "10.244.0.9"},
        {"ipv6ClientIP": "pod.example"},
        {"publicIPv6": "192.168.1.1"},
        {"ipv6Subnet": "10.244.0.0/24"},
        {"ipv6Subnet": "fd00:10:244::1/64"},
    ],
)
def test_a_party_refuses_malformed_ipv6_fields(bad):
    data = dual_party("a", 0).to_dict()
    data.update(bad)
    with pytest.raises((ValueError, TypeError)):
        Party.from_dict(data)


def test_ipv6_pods_take_the_second_device_only_when_both_nodes_have_an_ipv6_underlay():
    a = dual_party("a", 0, public_ipv6="fd70::10", vxlan_device6="pycni6.1")
    b = dual_party("b", 1, public_ipv6="fd70::11", vxlan_device6="pycni6.1")
    assert a.lane_to(b, 6) == ("pycni6.1", "0a:66:00:00:00:01", "fd70::11")
    assert a.lane_to(b, 4) == ("pycni.1", "0a:58:00:00:00:01", "192.168.100.11")
    assert a.lane_to(dual_party("c", 2), 6) == ("pycni.1", "0a:58:00:00:00:02", "192.168.100.12")


def test_a_missing_ipv6_entry_is_named_with_its_family_and_device():
    ok = {"fdb": True, "neigh": True, "route": True}
    a = dual_party("a", 0, {"192.168.100.11": {**ok, "ipv6": {**ok, "neigh": False, "device": "pycni.1"}}})
    b = dual_party("b", 1)
    message = diagnose.explain_no_reply("IPv6 TCP x", [diagnose.Leg(a, b, version=6)], 2)
    assert message == (
        "IPv6 TCP x: no reply within 2s; node a has no NDP/neighbour entry for remote VTEP "
        "fd00:10:244:1:: (0a:58:00:00:00:01) on pycni.1: missing neighbour entry"
    )
    # The IPv4 leg of the same pair is complete: nothing missing, so the underlay is blamed.
    assert "packets lost on the underlay" in diagnose.explain_no_reply("TCP x", [diagnose.Leg(a, b)], 2)
    a.facts["datapath"]["192.168.100.11"].pop("ipv6")
    assert "has no IPv6 overlay entries at all for node b" in diagnose.explain_no_reply(
        "x", [diagnose.Leg(a, b, version=6)], 2
    )
    # On the second device the FDB entry names the remote's IPv6 underlay.
    a = dual_party(
        "a",
        0,
        {"192.168.100.11": {**ok, "ipv6": {**ok, "fdb": False, "device": "pycni6.1"}}},
        public_ipv6="fd70::10",
        vxlan_device6="pycni6.1",
    )
    b = dual_party("b", 1, public_ipv6="fd70::11", vxlan_device6="pycni6.1")
    assert (
        "node a has no ARP/FDB for remote VTEP 0a:66:00:00:00:01 -> fd70::11 on pycni6.1: missing FDB entry"
        in diagnose.explain_no_reply("x", [diagnose.Leg(a, b, version=6)], 2)
    )


def test_a_drop_rule_for_one_family_is_blamed_for_that_family_only():
    ruleset = [
        {"chain": {"family": "inet", "table": "fw6", "name": "forward", "hook": "forward", "policy": "accept"}},
        {
            "rule": {
                "family": "inet",
                "table": "fw6",
                "chain": "forward",
                "expr": [
                    {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "pycni.1"}},
                    {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv6"}},
                    {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}},
                    {"drop": None},
                ],
            }
        },
    ]
    found = facts.firewall_facts(ruleset)
    assert found[0]["drops"] == 1 and (found[0]["drops4"], found[0]["drops6"]) == (0, 1)
    ok = {"fdb": True, "neigh": True, "route": True}
    a, b = dual_party("a", 0, {"192.168.100.11": {**ok, "ipv6": dict(ok)}}), dual_party("b", 1, firewall=found)
    v6 = diagnose.explain_no_reply("IPv6 TCP x", [diagnose.Leg(a, b, version=6)], 2)
    assert v6.endswith(
        "packets dropped: firewall (node b: table inet fw6 chain forward (forward): 1 drop/reject rule, IPv6 only)"
    )
    assert "packets dropped" not in diagnose.explain_no_reply("TCP x", [diagnose.Leg(a, b)], 2)
    # A rule that matches both families is blamed for both, without the qualifier (and entries of older
    # runs, without per-family counts, count for both).
    both = [{"table": "inet fw", "chain": "forward", "hook": "forward", "policy": "accept", "drops": 1, "nats": 0}]
    assert facts.describe_firewall(both, "drops", 6) == "table inet fw chain forward (forward): 1 drop/reject rule"
    ip6_policy = [
        {
            "table": "ip6 filter",
            "chain": "FORWARD",
            "hook": "forward",
            "policy": "drop",
            "drops": 0,
            "nats": 0,
            "drops4": 0,
            "drops6": 0,
        }
    ]
    assert facts.describe_firewall(ip6_policy, "drops", 4) == ""
    assert facts.describe_firewall(ip6_policy, "drops", 6) == "table ip6 filter chain FORWARD (forward): policy drop"


@pytest.mark.parametrize(
    "family, expr, families",
    [
        ("ip", [], {4}),
        ("ip6", [], {6}),
        ("inet", [], {4, 6}),
        (
            "inet",
            [{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": "fd00::1"}}],
            {6},
        ),
        (
            "inet",
            [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "10.0.0.1"}}],
            {4},
        ),
        ("inet", [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "ipv6-icmp"}}], {6}),
        ("inet", [{"match": {"op": "!=", "left": {"meta": {"key": "nfproto"}}, "right": "ipv6"}}], {4, 6}),
        (
            "bridge",
            [{"match": {"op": "==", "left": {"payload": {"protocol": "ether", "field": "type"}}, "right": "ip"}}],
            {4},
        ),
    ],
)
def test_the_families_a_drop_rule_can_match(family, expr, families):
    assert facts.rule_families(family, expr) == families


def test_datapath_facts_check_each_family_on_the_device_that_carries_it(monkeypatch):
    class L:
        def __init__(self, public_ip, subnet, mac, ipv6_subnet, public_ipv6="", vtep_mac6=""):
            self.public_ip, self.subnet, self.vtep_mac, self.ipv6_subnet = public_ip, subnet, mac, ipv6_subnet
            self.public_ipv6, self.vtep_mac6 = public_ipv6, vtep_mac6

    kernel = {
        "pycni.1": (
            [{"mac": "0a:00:00:00:00:01", "dst": "10.0.0.2"}, {"mac": "0a:00:00:00:00:02", "dst": "10.0.0.3"}],
            [
                {"dst": "10.244.1.0", "lladdr": "0a:00:00:00:00:01"},
                {"dst": "fd00:10:244:1::", "lladdr": "0a:00:00:00:00:01"},
                {"dst": "10.244.2.0", "lladdr": "0a:00:00:00:00:02"},
            ],
            {
                4: [
                    {"dst": "10.244.1.0/24", "gateway": "10.244.1.0"},
                    {"dst": "10.244.2.0/24", "gateway": "10.244.2.0"},
                ],
                6: [{"dst": "fd00:10:244:1::/64", "gateway": "fd00:10:244:1::"}],
            },
        ),
        "pycni6.1": (
            [{"mac": "0a:66:00:00:00:02", "dst": "fd70::3"}],
            [{"dst": "fd00:10:244:2::", "lladdr": "0a:66:00:00:00:02"}],
            {4: [], 6: []},
        ),
    }
    monkeypatch.setattr(facts.readers, "fdb", lambda dev: kernel[dev][0])
    monkeypatch.setattr(facts.readers, "neighbours", lambda dev: kernel[dev][1])
    monkeypatch.setattr(facts.readers, "routes", lambda errors, *args, version=4: kernel[args[1]][2][version])
    leases = [
        L("10.0.0.2", "10.244.1.0/24", "0a:00:00:00:00:01", "fd00:10:244:1::/64"),
        L("10.0.0.3", "10.244.2.0/24", "0a:00:00:00:00:02", "fd00:10:244:2::/64", "fd70::3", "0a:66:00:00:00:02"),
    ]
    assert facts.datapath_facts("pycni.1", leases, "10.0.0.1", "pycni6.1") == {
        "10.0.0.2": {
            "fdb": True,
            "neigh": True,
            "route": True,
            "ipv6": {"fdb": True, "neigh": True, "route": True, "device": "pycni.1"},
        },
        "10.0.0.3": {
            "fdb": True,
            "neigh": True,
            "route": True,
            "ipv6": {"fdb": True, "neigh": True, "route": False, "device": "pycni6.1"},
        },
    }
    # An IPv6-only lease (its subnet in either field) has IPv6 facts only.
    only6 = L("10.0.0.2", "", "0a:00:00:00:00:01", "fd00:10:244:1::/64")
    assert facts.datapath_facts("pycni.1", [only6], "10.0.0.1") == {
        "10.0.0.2": {"ipv6": {"fdb": True, "neigh": True, "route": True, "device": "pycni.1"}}
    }


@pytest.mark.parametrize(
    "error, words",
    [
        ("timeout", "no reply to 1280-byte packets while small packets pass"),
        ("packet-too-big (next-hop MTU 1200)", "a hop answered 'packet too big'"),
    ],
)
def test_an_ipv6_path_below_1280_bytes_is_named_as_breaking_ipv6(error, words):
    a, b = dual_party("a", 0), dual_party("b", 1)
    message = diagnose.explain_pmtu("IPv6 ICMP x", error, 1280, a, b, 2, version=6)
    assert words in message and "MTU mismatch" in message
    assert "1280 bytes is the least every IPv6 link must carry" in message
    # 1400 bytes after 1280-byte packets passed: the overhead of the underlay the lane uses (70 on IPv6).
    a6 = dual_party("a", 0, public_ipv6="fd70::10", vxlan_device6="pycni6.1")
    b6 = dual_party("b", 1, public_ipv6="fd70::11", vxlan_device6="pycni6.1")
    message = diagnose.explain_pmtu("IPv6 ICMP x", "timeout", 1400, a6, b6, 2, version=6, passed=1280)
    assert "while small packets pass (1280-byte ones too)" in message
    assert "with VXLAN's 70 bytes the underlay between fd70::10 and fd70::11 must carry 1470-byte packets" in message
    assert "least every IPv6 link" not in message


def test_ipv6_addresses_are_classified_too():
    a, b = dual_party("a", 0, public_ipv6="fd70::10"), dual_party("b", 1)
    assert diagnose.classify_address("fd00:10:244:1::2", [a, b]) == "a pod on node b"
    assert diagnose.classify_address("fd00:10:244::", [a, b]) == "node a's VXLAN device address"
    assert diagnose.classify_address("fd70::10", [a, b]) == "node a's own address"
    assert diagnose.classify_address("fd00:10:244:1::99", [a, b]) == "an address in node b's pod subnet"
    assert diagnose.classify_address("2001:db8::1", [a, b]) == "an address outside the cluster"


def _icmp6_error(kind: int, code: int, word: int, dst: str, ident: int, seq: int) -> bytes:
    inner = struct.pack(
        "!IHBB16s16s",
        0x60000000,
        8 + 56,
        58,
        64,
        socket.inet_pton(socket.AF_INET6, "fd00::2"),
        socket.inet_pton(socket.AF_INET6, dst),
    )
    inner += struct.pack("!BBHHH", 128, 0, 0, ident, seq)
    return struct.pack("!BBHI", kind, code, 0, word) + inner


def test_icmpv6_replies_and_errors_are_matched_to_the_request():
    request = client._echo_request6(0x1234, 7, b"x" * 56)
    assert request[0] == 128
    reply = bytes([129, 0]) + request[2:]
    assert client._match6(reply, "fd00:10:244:1::2", "fd00:10:244:1::2", 0x1234, 7) == "ok"
    assert client._match6(reply, "fd00:10:244:1::9", "fd00:10:244:1::2", 0x1234, 7) is None
    assert client._match6(reply, "fd00:10:244:1::2", "fd00:10:244:1::2", 0x1234, 8) is None
    too_big = _icmp6_error(2, 0, 1280, "fd00:10:244:1::2", 0x1234, 7)
    assert client._match6(too_big, "fd70::1", "fd00:10:244:1::2", 0x1234, 7) == "packet-too-big (next-hop MTU 1280)"
    prohibited = _icmp6_error(1, 1, 0, "fd00:10:244:1::2", 0x1234, 7)
    assert (
        client._match6(prohibited, "fd70::1", "fd00:10:244:1::2", 0x1234, 7) == "rejected: administratively prohibited"
    )
    assert (
        client._match6(_icmp6_error(1, 1, 0, "fd00:10:244:1::3", 0x1234, 7), "fd70::1", "fd00:10:244:1::2", 0x1234, 7)
        is None
    )
    assert client._match6(bytes([135, 0, 0, 0]) + b"\0" * 20, "fe80::1", "fd00:10:244:1::2", 1, 1) is None  # NDP


class FakeClient:
    """Every exchange answers (as the right echo service would), recording where it went."""

    def __init__(self, parties):
        self.labels = {}
        for p in parties:
            for v in p.families:
                self.labels[(p.probe(v), p.echo_port)] = p.probe_label
            for address in (p.public_ip, p.public_ipv6):
                if address:
                    self.labels[(address, p.echo_port)] = p.node_label
                    self.labels[(address, p.host_port)] = p.probe_label  # the hostPort's DNAT
        self.dialled = []

    def tcp_exchange(self, netns_path, address, port, timeout):
        self.dialled.append(address)
        return client.Exchange(True, 0.5, {"label": self.labels.get((address, port), "?"), "peer": "x"})

    udp_exchange = tcp_exchange

    def icmp_echo(self, netns_path, address, size, dont_fragment, timeout, tries=2):
        return client.Exchange(True, 0.1)


def matrix(monkeypatch, me, peers):
    fake = FakeClient([me, *peers])
    for name in ("tcp_exchange", "udp_exchange", "icmp_echo"):
        monkeypatch.setattr(checks.client, name, getattr(fake, name))
    local = checks.Local(me=me, probe_netns="", client_netns="", timeout=1)
    rows = checks.run_checks(local, peers)
    return rows, fake


def test_an_ipv4_only_pair_has_the_rows_it_always_had(monkeypatch):
    a, b = healthy_pair()
    rows, _ = matrix(monkeypatch, a, [b])
    assert [(r.check, r.target) for r in rows] == [
        ("pod-pod-same-node", "a"),
        ("pod-pod-other-node", "b"),
        ("no-snat", "a"),
        ("no-snat", "b"),
        ("node-pod", "a"),
        ("node-pod", "b"),
        ("pod-node", "a"),
        ("pod-node", "b"),
        ("hostport", "b"),
        ("pmtu", "b"),
    ]


def test_a_dual_stack_pair_checks_each_family_and_ipv6_node_paths_only_with_ipv6_node_addresses(monkeypatch):
    a, b = dual_party("a", 0), dual_party("b", 1)
    rows, fake = matrix(monkeypatch, a, [b])
    names = [r.check for r in rows]
    assert len(rows) == 4 + 3 + 6 + 4
    assert "pod-node/ipv6" not in names and "hostport/ipv6" not in names
    assert {"pod-pod-other-node/ipv6", "no-snat/ipv6", "node-pod/ipv6", "pmtu/ipv6"} <= set(names)
    assert "fd00:10:244:1::2" in fake.dialled
    a, b = dual_party("a", 0, public_ipv6="fd70::10"), dual_party("b", 1, public_ipv6="fd70::11")
    rows, fake = matrix(monkeypatch, a, [b])
    assert {("pod-node/ipv6", "a"), ("pod-node/ipv6", "b"), ("hostport/ipv6", "b")} <= {
        (r.check, r.target) for r in rows
    }
    assert "fd70::11" in fake.dialled
    assert all(r.result == PASS for r in rows if not r.check.startswith("no-snat"))  # the fake sees "x"
    # A peer of an older run publishes no IPv6 pods: only the IPv4 rows run between the two.
    rows, _ = matrix(monkeypatch, dual_party("a", 0), [party("b", 1)])
    assert not [r for r in rows if r.target == "b" and r.check.endswith("/ipv6")]


def test_a_failure_in_one_family_only_says_so():
    rows = [
        Check("pod-pod-other-node", "a", "b", PASS),
        Check("pod-pod-other-node/ipv6", "a", "b", FAIL, None, "x"),
        Check("node-pod/ipv6", "a", "b", FAIL, None, "y"),
        Check("pmtu", "a", "b", FAIL, None, "z"),
        Check("pmtu/ipv6", "a", "b", PASS),
    ]
    checks.contrast_families(rows)
    assert rows[1].message == "x; the same check passes in IPv4 between these nodes, so the fault is IPv6's alone"
    assert rows[2].message == "y"
    assert rows[3].message == "z; the same check passes in IPv6 between these nodes, so the fault is IPv4's alone"


def test_store_entries_check_judges_a_dual_stack_store_on_every_device(tmp_path):
    from pycni.conformance.nodechecks import store_entries_check

    cfg = ClusterConfig("10.244.0.0/16", ipv6_network="fd00:10:244::/56")
    with open_store(f"file://{tmp_path}/store") as store:
        init_cluster(store, cfg)
        own = acquire_lease(
            store,
            cfg,
            "192.168.100.10",
            "0a:00:00:00:00:10",
            node_name="n0",
            public_ipv6="fd70::10",
            vtep_mac6="0a:66:00:00:00:10",
        )
        acquire_lease(
            store,
            cfg,
            "192.168.100.11",
            "0a:00:00:00:00:11",
            node_name="n1",
            public_ipv6="fd70::11",
            vtep_mac6="0a:66:00:00:00:11",
        )
        row = store_entries_check(
            "n0",
            store,
            cfg,
            "192.168.100.10",
            own.subnet,
            own.vtep_mac,
            ipv6_subnet=own.ipv6_subnet,
            public_ipv6="fd70::10",
            vtep_mac6="0a:66:00:00:00:10",
        )
        assert row.result == PASS and "2 leases" in row.message, row.message
        # A third node claims n1's IPv6 VTEP MAC on the IPv6 underlay: only the second device can tell.
        acquire_lease(
            store,
            cfg,
            "192.168.100.12",
            "0a:00:00:00:00:12",
            node_name="n2",
            public_ipv6="fd70::12",
            vtep_mac6="0a:66:00:00:00:11",
        )
        row = store_entries_check(
            "n0",
            store,
            cfg,
            "192.168.100.10",
            own.subnet,
            own.vtep_mac,
            ipv6_subnet=own.ipv6_subnet,
            public_ipv6="fd70::10",
            vtep_mac6="0a:66:00:00:00:10",
        )
        assert row.result == FAIL and "VTEP MAC 0a:66:00:00:00:11 is also claimed" in row.message, row.message
        # Without the second underlay the node's main device carries every family: no conflict there.
        row = store_entries_check(
            "n0", store, cfg, "192.168.100.10", own.subnet, own.vtep_mac, ipv6_subnet=own.ipv6_subnet
        )
        assert row.result == PASS, row.message


# ---- --expect-nodes: nodes that come up one after another -------------------------------------

from pycni.conformance import runner  # noqa: E402


def three_node_store(tmp_path, leased: int):
    """A file store with the cluster config and the first ``leased`` of n0, n1, n2 holding a lease."""
    store = open_store(f"file://{tmp_path}/store")
    cfg = ClusterConfig(network="10.244.0.0/16")
    init_cluster(store, cfg)
    for i in range(leased):
        acquire_lease(store, cfg, f"192.168.100.{10 + i}", f"0a:58:00:00:00:0{i}", f"n{i}")
    return store, cfg


def test_alone_without_expect_nodes_a_node_meets_only_itself_at_once(tmp_path):
    # The behaviour --expect-nodes exists for: node 1 of a cluster provisioned node by node checks itself alone.
    store, _cfg = three_node_store(tmp_path, leased=1)
    me = party("n0", 0)
    store.put(node_key("n0"), me.to_json())
    start = time.monotonic()
    met = runner.meet(store, me, 0, 5.0, log=lambda _m: None)
    assert time.monotonic() - start < 1.0
    assert met.found == [] and met.missing == [] and met.shortfall == 0
    store.close()


def test_expect_nodes_waits_for_nodes_that_are_not_up_yet_and_meets_them_all(tmp_path):
    import threading

    store, cfg = three_node_store(tmp_path, leased=1)
    me = party("n0", 0)
    store.put(node_key("n0"), me.to_json())
    logged: list[str] = []

    def later_nodes() -> None:
        # n1 and n2 come up one after another: a lease first (the agent), then the probe (conformance run).
        for i in (1, 2):
            time.sleep(0.4)
            acquire_lease(store, cfg, f"192.168.100.{10 + i}", f"0a:58:00:00:00:0{i}", f"n{i}")
            time.sleep(0.3)
            store.put(node_key(f"n{i}"), party(f"n{i}", i).to_json())

    joining = threading.Thread(target=later_nodes)
    joining.start()
    try:
        start = time.monotonic()
        met = runner.meet(store, me, 3, 20.0, log=logged.append)
        took = time.monotonic() - start
    finally:
        joining.join()
    assert [p.node for p in met.found] == ["n1", "n2"] and met.missing == [] and met.shortfall == 0
    assert 1.3 < took < 10, took
    assert logged[0].startswith(
        "waiting for 2 more node(s) to come up (--expect-nodes 3; here so far: "
        "n0 (192.168.100.10)) (waiting up to 20s more)"
    ), logged
    store.close()


def test_expect_nodes_times_out_naming_who_came_and_how_many_are_missing(tmp_path):
    store, _cfg = three_node_store(tmp_path, leased=2)  # n1 holds a lease but never publishes; n2 never comes
    me = party("n0", 0)
    store.put(node_key("n0"), me.to_json())
    logged: list[str] = []
    met = runner.meet(store, me, 3, 0.5, log=logged.append)
    assert met.found == [] and met.missing == ["192.168.100.11"] and met.shortfall == 2
    assert len(logged) == 1 and logged[0].startswith(
        "waiting for 1 node(s) holding a lease to publish their probes: 192.168.100.11; and for 1 more node(s) to "
        "come up (--expect-nodes 3; here so far: n0 (192.168.100.10)) (waiting up to 0."
    ), logged
    message = met.shortfall_message(0.5)
    assert message.startswith(
        "expected 3 nodes (--expect-nodes 3), but within 0.5s only 1 held a subnet lease "
        "and published a probe: n0 (192.168.100.10); 2 missing: 1 of them hold a subnet "
        "lease but published no probe (192.168.100.11); 1 hold no subnet lease"
    ), message
    # Fewer expected than the leased nodes: every leased node is still waited for, and no shortfall is named.
    met = runner.meet(store, me, 1, 0.2, log=lambda _m: None)
    assert met.missing == ["192.168.100.11"] and met.shortfall == 0
    store.close()


class Spy:
    def __init__(self) -> None:
        self.published = 0

    def publish(self) -> None:
        self.published += 1


def test_the_datapath_facts_follow_the_leases_while_a_node_waits(tmp_path, monkeypatch):
    store, cfg = three_node_store(tmp_path, leased=2)
    me = party("n0", 0, {"192.168.100.11": {"fdb": True, "neigh": True, "route": True}})
    reads: list[int] = []
    complete = {"fdb": True, "neigh": True, "route": True}
    answers = [
        {"192.168.100.11": dict(complete), "192.168.100.12": {**complete, "fdb": False}},
        {"192.168.100.11": dict(complete), "192.168.100.12": dict(complete)},
    ]

    def read(leases):
        reads.append(len(leases))
        return answers[min(len(reads), len(answers)) - 1]

    spy = Spy()
    refresh = runner.DatapathRefresh(me, spy, list_leases(store)[0], lambda _m: None, read)
    refresh(list_leases(store)[0])
    assert reads == []  # same leases, facts complete: nothing to read
    acquire_lease(store, cfg, "192.168.100.12", "0a:58:00:00:00:02", "n2")
    refresh(list_leases(store)[0])
    assert reads == [3] and spy.published == 1  # a new node: read again, published
    assert me.facts["datapath"]["192.168.100.12"]["fdb"] is False
    refresh(list_leases(store)[0])
    assert reads == [3]  # an entry is missing, but it was read a moment ago
    monkeypatch.setattr(runner, "FACTS_RECHECK", 0.0)
    refresh(list_leases(store)[0])
    assert reads == [3, 3] and spy.published == 2  # the agent has programmed it since
    assert me.facts["datapath"]["192.168.100.12"]["fdb"] is True and me.facts["vxlanPort"] == 8472
    refresh(list_leases(store)[0])
    assert reads == [3, 3]  # complete again: no more reads
    store.close()


def conformance_cli(*args: str, env: dict[str, str] | None = None):
    from click.testing import CliRunner

    from pycni.conformance.cli import conformance

    return CliRunner().invoke(conformance, list(args), env=env, catch_exceptions=False)


def test_report_expect_nodes_fails_when_fewer_nodes_wrote_results_and_reads_its_environment_variable(tmp_path):
    store, _cfg = three_node_store(tmp_path, leased=2)
    for i, peer in ((0, "n1"), (1, "n0")):
        store.put(
            results_key(f"n{i}"),
            NodeResults(
                f"n{i}",
                f"192.168.100.{10 + i}",
                f"s{i}",
                1.0,
                2.0,
                [Check("pmtu", f"n{i}", peer, PASS, 0.1)],
                peers={peer: f"s{1 - i}"},
            ).to_json(),
        )
    store.close()
    url = f"file://{tmp_path}/store"
    assert conformance_cli("report", "--store", url).exit_code == 0
    done = conformance_cli("report", "--store", url, "--expect-nodes", "3")
    assert done.exit_code == 1
    assert (
        "expected results from 3 nodes (--expect-nodes 3), but the newest run has results from 2: "
        "n0 (192.168.100.10), n1 (192.168.100.11); 1 missing"
    ) in done.output
    by_env = conformance_cli("report", "--json", env={"PYCNI_STORE": url, "PYCNI_EXPECT_NODES": "3"})
    assert by_env.exit_code == 1
    rows = json.loads(by_env.output)["checks"]
    assert [(r["check"], r["from"], r["to"], r["result"]) for r in rows][-1] == ("rendezvous", "-", "-", "fail")
    assert conformance_cli("report", "--store", url, env={"PYCNI_EXPECT_NODES": "2"}).exit_code == 0


def test_run_takes_expect_nodes_from_its_environment_variable(monkeypatch):
    seen = {}

    def fake_run_node(store, opts, log):
        seen["expect_nodes"] = opts.expect_nodes
        raise runner.ConformanceError("stop here")

    monkeypatch.setattr(runner, "run_node", fake_run_node)
    done = conformance_cli(
        "run", "--store", "file:///nonexistent-pycni-test", "--network", "n", env={"PYCNI_EXPECT_NODES": "4"}
    )
    assert seen == {"expect_nodes": 4} and "stop here" in done.output
    conformance_cli(
        "run",
        "--store",
        "file:///nonexistent-pycni-test",
        "--network",
        "n",
        "--expect-nodes",
        "2",
        env={"PYCNI_EXPECT_NODES": "4"},
    )
    assert seen == {"expect_nodes": 2}  # the flag wins over the variable


def test_peers_lists_who_takes_part_and_waits_for_a_node(tmp_path):
    store, _cfg = three_node_store(tmp_path, leased=2)
    store.put(node_key("n0"), party("n0", 0).to_json())
    store.close()
    url = f"file://{tmp_path}/store"
    done = conformance_cli("peers", "--store", url)
    assert done.exit_code == 0
    lines = done.output.splitlines()
    assert lines[1].split()[:4] == ["n0", "192.168.100.10", "10.244.0.0/24", "yes:"]
    assert lines[2].split()[:4] == ["n1", "192.168.100.11", "10.244.1.0/24", "no:"]
    assert "1 node(s) taking part, 1 holding a lease without a probe" in done.output
    assert conformance_cli("peers", "--store", url, "--node", "n0", "--wait", "5").exit_code == 0
    assert conformance_cli("peers", "--store", url, "--node", "192.168.100.10").exit_code == 0
    start = time.monotonic()
    missing = conformance_cli("peers", "--store", url, "--node", "n1", "--wait", "1", "--json")
    assert missing.exit_code == 1 and 0.9 < time.monotonic() - start < 5
    assert "node n1 has not published a conformance probe within 1s" in missing.output
    nodes = json.loads(missing.output[: missing.output.rindex("}") + 1])["nodes"]
    assert [(n["node"], n["published"]) for n in nodes] == [("n0", True), ("n1", False)]


def test_peers_counts_a_run_that_finished_since_and_fails_at_once_for_one_that_could_not_start(tmp_path):
    store, _cfg = three_node_store(tmp_path, leased=2)
    since = time.time()
    # n0's run met everyone, checked and removed its probe before anyone looked; n1's earlier run counts not.
    store.put(
        results_key("n0"),
        NodeResults("n0", "192.168.100.10", "s0", since + 0.2, since + 2, peers={"n1": "s1"}).to_json(),
    )
    store.put(results_key("n1"), NodeResults("n1", "192.168.100.11", "s1", since - 100, since - 90).to_json())
    store.close()
    url = f"file://{tmp_path}/store"
    done = conformance_cli("peers", "--store", url, "--node", "n0", "--since", str(since), "--wait", "5")
    assert (
        done.exit_code == 0
        and "node n0 took part: its run has finished already (1 other node(s) checked)" in done.output
    )
    assert conformance_cli("peers", "--store", url, "--node", "n0", "--wait", "0.5").exit_code == 1
    assert (
        conformance_cli("peers", "--store", url, "--node", "n1", "--since", str(since), "--wait", "0.5").exit_code == 1
    )
    with open_store(url) as again:
        again.put(
            results_key("n1"),
            NodeResults(
                "n1",
                "192.168.100.11",
                "failed",
                since + 1,
                since + 1,
                [
                    Check(
                        "probe-pod", "n1", "n1", FAIL, None, "cannot attach a probe pod to network 'x': no such network"
                    )
                ],
            ).to_json(),
        )
    start = time.monotonic()
    failed = conformance_cli("peers", "--store", url, "--node", "n1", "--since", str(since), "--wait", "30")
    assert failed.exit_code == 1 and time.monotonic() - start < 5
    assert (
        "the conformance run of node n1 failed: cannot attach a probe pod to network 'x': no such network"
        in failed.output
    )
