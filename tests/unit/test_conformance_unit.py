"""pycni.conformance without a network: what is published, how faults are named, the matrix, the rendezvous."""
from __future__ import annotations

import json
import socket
import struct
import time

import pytest

from ipam.cluster import ClusterConfig, acquire_lease, init_cluster, open_store
from pycni.conformance import client, diagnose, echo, facts, report
from pycni.conformance.model import (FAIL, PASS, SKIP, Check, NodeResults, Party, node_key, results_key,
                                     valid_node_id)
from pycni.conformance.probe import ProbeRecord, Record, has_port_mappings
from pycni.conformance.rendezvous import STALE_AFTER, Rendezvous, read_parties
from pycni.conformance.runner import ConformanceError, choose_node_id


def party(node: str, index: int, datapath: dict | None = None, firewall: list | None = None) -> Party:
    return Party(node=node, public_ip=f"192.168.100.{10 + index}", subnet=f"10.244.{index}.0/24",
                 vtep_mac=f"0a:58:00:00:00:0{index}", vxlan_device="pycni.1", mtu=1450,
                 probe_ip=f"10.244.{index}.2", client_ip=f"10.244.{index}.3", echo_port=7080, host_port=17080,
                 session=f"s{index}", heartbeat=time.time(),
                 facts={"datapath": datapath or {}, "firewall": firewall or [], "vxlanPort": 8472})


def healthy_pair() -> tuple[Party, Party]:
    ok = {"fdb": True, "neigh": True, "route": True}
    return party("a", 0, {"192.168.100.11": dict(ok)}), party("b", 1, {"192.168.100.10": dict(ok)})


# ---- model ----------------------------------------------------------------------------------

def test_party_and_results_round_trip_through_json():
    a, _ = healthy_pair()
    assert Party.from_json(a.to_json()) == a
    assert a.vtep_address == "10.244.0.0" and a.probe_label == "a/probe"
    results = NodeResults("a", a.public_ip, "s0", 1.0, 2.0,
                          [Check("pmtu", "a", "b", FAIL, None, "MTU mismatch"), Check("no-snat", "a", "b", PASS, 0.5)])
    again = NodeResults.from_json(results.to_json())
    assert again == results
    assert again.checks[1].to_dict() == {"check": "no-snat", "from": "a", "to": "b", "result": "pass",
                                         "latencyMs": 0.5, "message": ""}


@pytest.mark.parametrize("bad", [{"node": "../x"}, {"node": "results"}, {"probeIP": "pod.example"},
                                 {"hostPort": 70000}, {"echoPort": "7080"}, {"subnet": "10.244.0.1/24"}])
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
    assert there == ("TCP x: no reply within 1.5s; node a has no ARP/FDB for remote VTEP 0a:58:00:00:00:01 -> "
                     "192.168.100.11 on pycni.1: missing FDB entry")
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
    b.facts["firewall"] = [{"table": "inet fw", "chain": "forward", "hook": "forward", "policy": "accept",
                            "drops": 1, "nats": 0}]
    message = diagnose.explain_no_reply("TCP x", [diagnose.Leg(a, b)], 2)
    assert message == ("TCP x: no reply within 2s; packets dropped: firewall (node b: table inet fw chain forward "
                       "(forward): 1 drop/reject rule)")
    b.facts["firewall"] = []
    message = diagnose.explain_no_reply("TCP x", [diagnose.Leg(a, b)], 2)
    assert "packets lost on the underlay between 192.168.100.10 and 192.168.100.11" in message
    assert "UDP 8472" in message
    rejected = diagnose.explain_no_reply("TCP x", [], 2, "rejected: administratively prohibited")
    assert "packets dropped: firewall" in rejected


def test_a_translated_source_is_named_snat_with_the_rule_that_may_do_it():
    a, b = healthy_pair()
    a.facts["firewall"] = [{"table": "ip nat", "chain": "POSTROUTING", "hook": "postrouting", "policy": "accept",
                            "drops": 0, "nats": 1}]
    message = diagnose.explain_seen("10.244.0.0", a.probe_ip, a, [a, b])
    assert message.startswith("reply came from 10.244.0.0 (node a's VXLAN device address), not the pod 10.244.0.2")
    assert "SNAT between nodes (node a: table ip nat chain POSTROUTING (postrouting): 1 masquerade/snat rule)" \
        in message
    assert "(node a's own address)" in diagnose.explain_seen("192.168.100.10", a.probe_ip, a, [a, b])
    assert "(an address outside the cluster)" in diagnose.explain_seen("172.16.0.1", a.probe_ip, a, [a, b])
    assert "(a pod on node b)" in diagnose.explain_seen("10.244.1.3", a.probe_ip, a, [a, b])


@pytest.mark.parametrize("error, words", [
    ("emsgsize (message too long, path MTU 1300)", "the pod's MTU (1450) is below 1400: MTU mismatch"),
    ("frag-needed (next-hop MTU 1400)", "fragmentation needed"),
    ("timeout", "no reply to 1400-byte DF packets while small packets pass"),
])
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
        {"table": "inet fw", "chain": "forward", "hook": "forward", "policy": "accept", "drops": 2, "nats": 0},
        {"table": "ip nat", "chain": "post", "hook": "postrouting", "policy": "accept", "drops": 0, "nats": 1},
        {"table": "ip filter", "chain": "INPUT", "hook": "input", "policy": "drop", "drops": 0, "nats": 0},
    ]
    assert facts.describe_firewall(found) == ("table inet fw chain forward (forward): 2 drop/reject rules; "
                                              "table ip filter chain INPUT (input): policy drop")
    assert facts.describe_firewall(found, "nats") == "table ip nat chain post (postrouting): 1 masquerade/snat rule"


def test_datapath_facts_check_each_lease_against_the_vxlan_entries(monkeypatch):
    class L:
        def __init__(self, public_ip, subnet, mac):
            self.public_ip, self.subnet, self.vtep_mac = public_ip, subnet, mac

    monkeypatch.setattr(facts.readers, "fdb", lambda dev: [{"mac": "0a:00:00:00:00:01", "dst": "10.0.0.2"}])
    monkeypatch.setattr(facts.readers, "neighbours", lambda dev: [{"dst": "10.244.1.0", "lladdr": "0a:00:00:00:00:01"},
                                                                  {"dst": "10.244.2.0", "lladdr": "0a:00:00:00:00:02"}])
    monkeypatch.setattr(facts.readers, "routes",
                        lambda errors, *args: [{"dst": "10.244.1.0/24", "gateway": "10.244.1.0"}])
    leases = [L("10.0.0.1", "10.244.0.0/24", "0a:00:00:00:00:00"), L("10.0.0.2", "10.244.1.0/24", "0A:00:00:00:00:01"),
              L("10.0.0.3", "10.244.2.0/24", "0a:00:00:00:00:02")]
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
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 1, 0, socket.inet_aton(src),
                       socket.inet_aton(dst)) + payload


def test_icmp_replies_and_errors_are_matched_to_the_request():
    request = client._echo_request(0x1234, 7, b"x" * 56)
    assert client._checksum(request) == 0          # a valid checksum sums to zero
    reply = bytes([0, 0]) + request[2:]
    assert client._match(_ip_packet("10.244.1.2", "10.244.0.2", reply), "10.244.1.2", 0x1234, 7) == "ok"
    assert client._match(_ip_packet("10.244.1.2", "10.244.0.2", reply), "10.244.1.2", 0x1234, 8) is None
    assert client._match(_ip_packet("10.244.9.9", "10.244.0.2", reply), "10.244.1.2", 0x1234, 7) is None
    original = _ip_packet("10.244.0.2", "10.244.1.2", request)[:28]
    frag = struct.pack("!BBHHH", 3, 4, 0, 0, 1400) + original
    assert client._match(_ip_packet("192.168.1.1", "10.244.0.2", frag), "10.244.1.2", 0x1234, 7) \
        == "frag-needed (next-hop MTU 1400)"
    prohibited = struct.pack("!BBHHH", 3, 13, 0, 0, 0) + original
    assert client._match(_ip_packet("192.168.1.1", "10.244.0.2", prohibited), "10.244.1.2", 0x1234, 7) \
        == "rejected: administratively prohibited"


# ---- the matrix ------------------------------------------------------------------------------

def test_the_report_lists_missing_nodes_and_fails_on_any_failure():
    rows = [Check("pod-pod-other-node", "a", "b", PASS, 1.234, "TCP and UDP"),
            Check("pmtu", "a", "b", SKIP, None, "not measured")]
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
    assert report.ignored_note(ignored) == ("ignored results of an earlier run from a, b, c "
                                            "(they did not take part in the newest run)")
    alone = result("a", "a3", 30)     # a run that met nobody
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
    stale.heartbeat = 0.0   # published by a run that died long ago
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
    record = Record("net", "/etc/cni/net.d", "/opt/cni/bin", "/var/lib/cni",
                    [ProbeRecord("probe", "/run/netns/x", "cid", "eth0", "10.0.0.2")], [123])
    record.save(str(tmp_path))
    assert Record.load(str(tmp_path)) == record
    Record.remove(str(tmp_path))
    assert Record.load(str(tmp_path)) is None

    class NetList:
        plugins = [{"type": "vxlan"}, {"type": "portmap", "capabilities": {"portMappings": True}}]

    assert has_port_mappings(NetList)
    NetList.plugins = NetList.plugins[:1]
    assert not has_port_mappings(NetList)
