"""Every value read from the cluster store is input: bounded decoding, every field checked, bad ones skipped.

    boundedjson.loads        size, UTF-8, nesting (a linear scan, no recursion), strict JSON
    ClusterConfig.from_json  bounded, typed fields
    scan_leases              accepted leases + (key, mod_revision, reason) for each rejected one
    acquire/renew_lease      node identity (NodeName): NodeConflict, LeaseLost, a lost create answer
    wanted_state             duplicate and own VTEP MACs, members, a stable skipped list
    FileStore                unreadable records skipped with one warning, TTLs enforced

No root needed; the same entries written into a real etcd are in
tests/integration/test_store_entries_etcd.py.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time

import pytest

from cni_plugins.spec import boundedjson
from ipam.cluster import (
    ClusterConfig,
    Entry,
    LeaseLost,
    NodeConflict,
    NodeLease,
    RejectedLease,
    StoreError,
    acquire_lease,
    init_cluster,
    list_leases,
    open_store,
    read_config,
    renew_lease,
    scan_leases,
)
from ipam.cluster import filestore
from pycni.overlay.reconcile import wanted_state

NET = "10.244.0.0/16"
MAC_A = "0a:58:0a:00:00:0a"
MAC_B = "0a:58:0a:00:00:0b"
MAC_C = "0a:58:0a:00:00:0c"
DEEP = b"[" * 5000 + b"]" * 5000


def lease_value(public_ip="192.168.1.10", mac=MAC_A, **extra) -> bytes:
    doc = {"PublicIP": public_ip, "BackendType": "vxlan", "BackendData": {"VtepMAC": mac}, **extra}
    return json.dumps(doc).encode()


@pytest.fixture
def store(tmp_path):
    s = open_store(f"file://{tmp_path / 'store'}")
    yield s
    s.close()


@pytest.fixture
def cfg(store):
    c = ClusterConfig(NET)
    init_cluster(store, c)
    return c


# ---- the bounded decoder -------------------------------------------------------------------


@pytest.mark.parametrize(
    "data", [DEEP, b'{"a": ' * 5000 + b"1" + b"}" * 5000, b"[{" * 2500, b'{"PublicIP": ' + b"[" * 5000, "[" * 5000]
)
def test_deep_nesting_is_refused_without_recursion(data):
    start = time.monotonic()
    with pytest.raises(ValueError, match="nests deeper than 8 levels"):
        boundedjson.loads(data, max_bytes=1 << 20, max_depth=8)
    assert time.monotonic() - start < 0.5


def test_the_depth_limit_is_exact_and_counts_arrays_and_objects():
    eight = b"[" * 8 + b"]" * 8
    assert boundedjson.loads(eight, max_bytes=100, max_depth=8) == json.loads(eight)
    with pytest.raises(ValueError, match="deeper than 7 levels"):
        boundedjson.loads(eight, max_bytes=100, max_depth=7)
    nested = boundedjson.loads(b'{"a": [{"b": [[[[[]]]]]}]}', max_bytes=100, max_depth=8)
    assert nested == {"a": [{"b": [[[[[]]]]]}]}
    with pytest.raises(ValueError, match="deeper than 7"):
        boundedjson.loads(b'{"a": [{"b": [[[[[]]]]]}]}', max_bytes=100, max_depth=7)
    assert boundedjson.loads(b"5", max_bytes=10, max_depth=0) == 5
    with pytest.raises(ValueError, match="deeper than 0"):
        boundedjson.loads(b"[]", max_bytes=10, max_depth=0)


def test_brackets_inside_strings_do_not_count():
    text = json.dumps({"a": "[[[[[[[[[[{{{{{{{{{{", "b": ['\\"[[[[[[[[[["', "x\\"]})
    assert boundedjson.loads(text, max_bytes=1000, max_depth=2) == json.loads(text)
    # An unterminated string is the parser's to report, not a depth problem.
    with pytest.raises(ValueError, match="not JSON"):
        boundedjson.loads('["' + "[" * 100, max_bytes=1000, max_depth=2)


def test_size_is_checked_first_and_in_bytes():
    big = b" " * (10 * 1024 * 1024) + b"1"
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"10485761 bytes is larger than the 4096 bytes allowed"):
        boundedjson.loads(big, max_bytes=4096, max_depth=8)
    assert time.monotonic() - start < 0.1
    assert boundedjson.loads('"' + "é" * 10 + '"', max_bytes=22, max_depth=1) == "é" * 10
    with pytest.raises(ValueError, match="22 bytes is larger than the 21"):
        boundedjson.loads('"' + "é" * 10 + '"', max_bytes=21, max_depth=1)


def test_a_large_wide_document_costs_linear_time():
    doc = ("[" + ",".join(['{"k": "v[", "n": [1, 2]}'] * 100_000) + "]").encode()  # 2.4 MB, 3 levels
    start = time.monotonic()
    assert len(boundedjson.loads(doc, max_bytes=len(doc), max_depth=3)) == 100_000
    assert time.monotonic() - start < 5
    deep = b"[" * (10 * 1024 * 1024)
    start = time.monotonic()
    with pytest.raises(ValueError, match="deeper than 8"):
        boundedjson.loads(deep, max_bytes=len(deep), max_depth=8)
    assert time.monotonic() - start < 2


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\xff\xfe{}", "not UTF-8"),
        ("\ud800", "not UTF-8"),
        (b"\xef\xbb\xbf{}", "byte-order mark"),
        (b"[1, NaN]", "NaN"),
        (b'{"a": Infinity}', "Infinity"),
        (b"-Infinity", "Infinity"),
        (b"garbage", "not JSON"),
        (b"{} {}", "not JSON"),
        (b"", "not JSON"),
        (12, "bytes or str"),
    ],
)
def test_other_refusals_are_value_errors_that_say_why(data, message):
    with pytest.raises(ValueError, match=message):
        boundedjson.loads(data, max_bytes=100, max_depth=8)


# ---- the cluster configuration ---------------------------------------------------------------


@pytest.mark.parametrize(
    "data, message",
    [
        (DEEP, "nests deeper than 8"),
        (b'{"Network": "10.244.0.0/16", "pad": "' + b"x" * 70000 + b'"}', "larger than the 65536"),
        (b'{"Network": 167772160}', '"Network" must be a string'),
        (b'{"Network": "10.244.0.0/16", "SubnetLen": "24"}', '"SubnetLen" must be a whole number'),
        (b'{"Network": "10.244.0.0/16", "SubnetLen": true}', '"SubnetLen" must be a whole number'),
        (b'{"Network": "10.244.0.0/16", "SubnetLen": 24.0}', '"SubnetLen" must be a whole number'),
        (b'{"Network": "10.244.0.0/16", "Backend": {"VNI": false}}', '"Backend.VNI" must be a whole number'),
        (b'{"Network": "10.244.0.0/16", "Backend": {"Port": "8472"}}', '"Backend.Port" must be a whole number'),
        (b'{"Network": "10.244.0.0/16", "Backend": []}', '"Backend" must be an object'),
        (b'["Network"]', "must be a JSON object"),
        (b'{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": NaN}}', "NaN"),
    ],
)
def test_bad_cluster_configurations_are_value_errors(data, message):
    with pytest.raises(ValueError, match=message):
        ClusterConfig.from_json(data)


def test_a_deep_stored_configuration_is_a_store_error_not_a_crash(store):
    store.put("config", DEEP)
    with pytest.raises(StoreError, match="cluster configuration is invalid.*nests deeper"):
        read_config(store)


def test_configuration_nulls_mean_the_defaults():
    cfg = ClusterConfig.from_json(b'{"Network": "10.1.0.0/16", "SubnetLen": null, "Backend": null}')
    assert cfg == ClusterConfig("10.1.0.0/16")


# ---- leases: every bad kind is rejected with a reason -------------------------------------------

KEY = "subnets/10.244.1.0-24"

BAD_VALUES = [
    ("not JSON", b"garbage", "the value cannot be decoded: not JSON"),
    ("deep nesting", b'{"PublicIP": ' + b"[" * 3000, "nests deeper than 8"),  # RecursionError in json
    ("5000-deep nesting", b"[" * 5000 + b"]" * 5000, "larger than the 4096"),  # refused by its size first
    ("too large", lease_value(pad="x" * 5000), "larger than the 4096"),
    ("not an object", b'["192.168.1.10"]', "must be a JSON object"),
    ("no PublicIP", b'{"BackendData": {"VtepMAC": "0a:58:0a:00:00:0a"}}', "PublicIP is missing"),
    ("PublicIP a number", lease_value(public_ip=3232235786), "PublicIP must be a string"),
    ("PublicIP a list", lease_value(public_ip=["192.168.1.10"]), "PublicIP must be a string"),
    ("IPv4 zone", lease_value(public_ip="192.0.2.77%eth0"), "PublicIP '192.0.2.77%eth0' carries a zone"),
    ("IPv6 zone", lease_value(public_ip="fd00::77%eth0"), "PublicIP 'fd00::77%eth0' carries a zone"),
    ("not an address", lease_value(public_ip="node-a"), "PublicIP 'node-a' is not an IPv4 or IPv6 address"),
    ("multicast", lease_value(public_ip="224.0.0.1"), "PublicIP '224.0.0.1' is a multicast address"),
    ("IPv6 multicast", lease_value(public_ip="ff02::1"), "is a multicast address"),
    ("unspecified", lease_value(public_ip="0.0.0.0"), "is the unspecified address"),
    ("IPv6 unspecified", lease_value(public_ip="::"), "is the unspecified address"),
    ("broadcast", lease_value(public_ip="255.255.255.255"), "is the broadcast address"),
    ("loopback", lease_value(public_ip="127.0.0.1"), "is a loopback address"),
    ("IPv6 loopback", lease_value(public_ip="::1"), "is a loopback address"),
    ("no BackendData", b'{"PublicIP": "192.168.1.10"}', "BackendData must be an object"),
    ("BackendData a string", lease_value(BackendData="0a:58:0a:00:00:0a"), "BackendData must be an object"),
    ("no VtepMAC", lease_value(BackendData={}), "BackendData.VtepMAC is missing"),
    ("VtepMAC a number", lease_value(mac=42), "BackendData.VtepMAC must be a string"),
    ("VtepMAC not a MAC", lease_value(mac="0a:58:0a:00:00"), "is not a MAC address"),
    ("multicast MAC", lease_value(mac="01:00:5e:00:00:01"), "is a multicast MAC"),
    ("broadcast MAC", lease_value(mac="ff:ff:ff:ff:ff:ff"), "is a multicast MAC"),
    ("zero MAC", lease_value(mac="00:00:00:00:00:00"), "is all zeros"),
    ("NodeName a number", lease_value(NodeName=7), "NodeName must be a string"),
    ("NodeName too long", lease_value(NodeName="n" * 254), "NodeName .* is 254 characters long"),
    ("NodeName with a newline", lease_value(NodeName="a\nb"), "NodeName 'a\\\\nb' contains control characters"),
    ("NodeName with C1 control", lease_value(NodeName="a\u0085b"), "contains control characters"),
    ("BackendType host-gw", lease_value(BackendType="host-gw"), "BackendType 'host-gw' is not 'vxlan'"),
    ("BackendType a number", lease_value(BackendType=1), "BackendType 1 is not 'vxlan'"),
    (
        "Subnet of another key",
        lease_value(Subnet="10.244.2.0/24"),
        "Subnet '10.244.2.0/24' does not match the key's subnet 10.244.1.0/24",
    ),
    ("subnet, lower case", lease_value(subnet="10.244.1.0/25"), "subnet '10.244.1.0/25' does not match"),
    ("Subnet a number", lease_value(Subnet=24), "Subnet must be a string"),
]


@pytest.mark.parametrize("value, reason", [(v, r) for _n, v, r in BAD_VALUES], ids=[n for n, _v, _r in BAD_VALUES])
def test_bad_lease_values_are_rejected_with_the_key_and_the_field(store, cfg, value, reason):
    store.put(KEY, value)
    store.put("subnets/10.244.2.0-24", lease_value("192.168.1.11", MAC_B, NodeName="good"))
    scan = scan_leases(store, cfg)
    assert [lease.subnet for lease in scan.leases] == ["10.244.2.0/24"]
    assert len(scan.rejected) == 1
    rejected = scan.rejected[0]
    assert rejected.key == KEY and rejected.mod_revision == store.get(KEY).mod_revision
    assert rejected.reason.startswith(f"{KEY}: ")
    assert re.search(reason, rejected.reason), rejected.reason
    assert scan.revision == store.list("subnets/")[1]
    # The listing the existing callers use is not broken by it either.
    assert [lease.subnet for lease in list_leases(store)[0]] == ["10.244.2.0/24"]


BAD_KEYS = [
    ("subnets/10.244.1.0-024", "not the canonical key of the subnet 10.244.1.0/24 \\(that is subnets/10.244.1.0-24\\)"),
    ("subnets/garbage", "not a subnet lease key"),
    ("subnets/10.244.1.5-24", "not a subnet lease key"),  # host bits set
    ("subnets/10.99.0.0-24", "the subnet 10.99.0.0/24 is outside the cluster network 10.244.0.0/16"),
    ("subnets/10.244.1.0-25", "the subnet 10.244.1.0/25 is a /25; this cluster leases /24 subnets"),
    ("subnets/fd00:10::-64", "the subnet fd00:10::/64 is IPv6, the cluster network 10.244.0.0/16 is IPv4"),
]


@pytest.mark.parametrize("key, reason", BAD_KEYS)
def test_bad_lease_keys_are_rejected(store, cfg, key, reason):
    store.put(key, lease_value("192.168.1.20", MAC_C))
    scan = scan_leases(store, cfg)
    assert scan.leases == []
    assert [r.key for r in scan.rejected] == [key]
    assert scan.rejected[0].reason.startswith(f"{key}: ") and re.search(reason, scan.rejected[0].reason)


def test_a_public_ip_inside_the_cluster_network_is_a_pod_address(store, cfg):
    store.put(KEY, lease_value("10.244.7.7", MAC_A))
    scan = scan_leases(store, cfg)
    assert scan.leases == [] and scan.rejected == [
        RejectedLease(
            KEY,
            store.get(KEY).mod_revision,
            (
                f"{KEY}: PublicIP 10.244.7.7 is inside the cluster network 10.244.0.0/16 (a pod address, not a node's "
                f"underlay address)"
            ),
        )
    ]
    with pytest.raises(ValueError, match="inside the cluster network"):
        acquire_lease(store, cfg, "10.244.7.8", MAC_B)


def test_without_a_configuration_only_the_configuration_free_checks_apply(store, cfg):
    store.put("subnets/10.99.0.0-24", lease_value("192.168.1.20", MAC_C))  # outside 10.244.0.0/16
    store.put("subnets/10.244.1.0-24", lease_value("192.0.2.77%eth0", MAC_A))
    scan = scan_leases(store, None)
    assert [lease.subnet for lease in scan.leases] == ["10.99.0.0/24"]
    assert [r.key for r in scan.rejected] == ["subnets/10.244.1.0-24"]
    assert [lease.subnet for lease in list_leases(store, cfg)[0]] == []


def test_good_leases_are_normalised_and_sorted(store, cfg):
    store.put("subnets/10.244.10.0-24", lease_value("192.168.1.12", "0A-58-0A-00-00-0C"))
    store.put("subnets/10.244.2.0-24", lease_value("fd00::0:12", MAC_B, NodeName="b", Subnet="10.244.2.0/24"))
    store.put(
        "subnets/10.244.3.0-24",
        b'{"PublicIP": "192.168.1.13", "BackendData": {"VtepMAC": "'
        + MAC_A.encode()
        + b'"}, "NodeName": null, "BackendType": null, "Extra": {"x": 1}}',
    )
    scan = scan_leases(store, cfg)
    assert scan.rejected == []
    assert [(l.subnet, l.public_ip, l.vtep_mac, l.node_name) for l in scan.leases] == [
        ("10.244.2.0/24", "fd00::12", MAC_B, "b"),
        ("10.244.3.0/24", "192.168.1.13", MAC_A, ""),
        ("10.244.10.0/24", "192.168.1.12", MAC_C, ""),
    ]


def test_from_entry_checks_the_same_things():
    entry = Entry(KEY, lease_value(public_ip="192.0.2.77%eth0"), 3, 1)
    with pytest.raises(ValueError, match=f"^{KEY}: PublicIP .* carries a zone"):
        NodeLease.from_entry(entry)
    with pytest.raises(ValueError, match="outside the cluster network"):
        NodeLease.from_entry(Entry("subnets/10.99.0.0-24", lease_value(), 3, 1), ClusterConfig(NET))
    assert NodeLease.from_entry(Entry(KEY, lease_value(), 3, 1)).mod_revision == 3


def test_a_deep_lease_does_not_break_the_listing_or_the_allocator(store, cfg):
    """The issue's case: one 5000-deep value under subnets/ made every agent's reconcile fail."""
    store.put("subnets/10.244.0.0-24", b'{"PublicIP": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    store.put("subnets/10.244.1.0-24", lease_value("192.168.1.11", MAC_B))
    assert [lease.subnet for lease in list_leases(store)[0]] == ["10.244.1.0/24"]
    lease = acquire_lease(store, cfg, "192.168.1.12", MAC_C)
    assert lease.subnet == "10.244.2.0/24"  # the unreadable key's subnet stays taken


def test_acquire_never_hands_out_a_subnet_whose_key_exists(store, cfg):
    for key, value in [
        ("subnets/10.244.0.0-24", b"garbage"),
        ("subnets/10.244.1.0-24", DEEP),
        ("subnets/10.244.2.0-24", lease_value("192.0.2.77%eth0")),
        ("subnets/10.244.3.0-24", lease_value("10.244.9.9")),
        ("subnets/10.244.4.0-024", lease_value("192.168.1.50", MAC_C)),
    ]:
        store.put(key, value)
    lease = acquire_lease(store, cfg, "192.168.1.12", MAC_C)
    assert lease.subnet == "10.244.5.0/24"


# ---- node identity ---------------------------------------------------------------------------


def test_a_public_ip_held_by_another_node_name_is_a_conflict(store, cfg):
    a = acquire_lease(store, cfg, "192.168.1.10", MAC_A, node_name="node-a")
    with pytest.raises(NodeConflict) as exc:
        acquire_lease(store, cfg, "192.168.1.10", MAC_B, node_name="node-b")
    message = str(exc.value)
    for part in (
        "'node-a'",
        "'node-b'",
        "192.168.1.10",
        a.subnet,
        "stop its agent",
        "pycni agent leave --store URL --public-ip 192.168.1.10",
        "its own --public-ip",
    ):
        assert part in message, (part, message)
    assert isinstance(exc.value, StoreError)
    assert store.get(a.key).value == a.to_json().encode()  # untouched
    # The same node, or a caller that names no node, still gets it back.
    assert acquire_lease(store, cfg, "192.168.1.10", MAC_A, node_name="node-a") == a
    assert acquire_lease(store, cfg, "192.168.1.10", MAC_A).subnet == a.subnet


def test_an_unnamed_lease_is_adopted(store, cfg):
    store.put("subnets/10.244.4.0-24", lease_value("192.168.1.10", MAC_A))  # flannel or an older pycni
    lease = acquire_lease(store, cfg, "192.168.1.10", MAC_B, node_name="node-a")
    assert (lease.subnet, lease.node_name, lease.vtep_mac) == ("10.244.4.0/24", "node-a", MAC_B)
    assert json.loads(store.get(lease.key).value)["NodeName"] == "node-a"


def test_a_renumbering_takeover_needs_the_same_node_name(store, cfg):
    old = acquire_lease(store, cfg, "192.168.1.10", MAC_A, node_name="node-a")
    previous = NodeLease(old.subnet, old.public_ip, old.vtep_mac, "node-a")
    other = acquire_lease(store, cfg, "192.168.1.20", MAC_B, node_name="node-b", previous=previous)
    assert other.subnet != old.subnet
    assert store.get(old.key).value == old.to_json().encode()
    moved = acquire_lease(store, cfg, "192.168.1.30", MAC_C, node_name="node-a", previous=previous)
    assert moved.subnet == old.subnet and moved.public_ip == "192.168.1.30"


def test_renewing_a_lease_now_named_for_another_node_is_lost(store, cfg):
    a = acquire_lease(store, cfg, "192.168.1.10", MAC_A, node_name="node-a", ttl=30)
    store.put(a.key, lease_value("192.168.1.10", MAC_A, NodeName="node-z"))
    with pytest.raises(LeaseLost, match="node-z"):
        renew_lease(store, a, ttl=30)
    store.put(a.key, lease_value("192.168.1.10", MAC_A))  # unnamed: still this node's
    assert renew_lease(store, a, ttl=30).subnet == a.subnet


def test_invalid_node_names_are_refused_before_anything_is_written(store, cfg):
    for name in ("a\nb", "x" * 254):
        with pytest.raises(ValueError, match="invalid node name"):
            acquire_lease(store, cfg, "192.168.1.10", MAC_A, node_name=name)
    with pytest.raises(ValueError, match="public IP '192.0.2.77%eth0'"):
        acquire_lease(store, cfg, "192.0.2.77%eth0", MAC_A)
    with pytest.raises(ValueError, match="multicast MAC"):
        acquire_lease(store, cfg, "192.168.1.10", "01:00:5e:00:00:01")
    assert store.list("subnets/")[0] == []


class LostAnswers:
    """A store whose create() reports "taken" although it did the work (an answer lost and retried), or
    whose key is taken by someone else just before our create lands."""

    def __init__(self, inner, intruder: bytes | None = None) -> None:
        self.inner, self.intruder = inner, intruder

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def create(self, key, value, ttl=None):
        if self.intruder is not None:
            self.inner.create(key, self.intruder, ttl=ttl)
            self.intruder = None
            return self.inner.create(key, value, ttl=ttl)
        self.inner.create(key, value, ttl=ttl)
        return False


def test_a_create_whose_answer_was_lost_is_recognised_as_ours(store, cfg):
    lease = acquire_lease(LostAnswers(store), cfg, "192.168.1.10", MAC_A, node_name="node-a")
    assert (lease.subnet, lease.node_name) == ("10.244.0.0/24", "node-a")
    assert len(store.list("subnets/")[0]) == 1


def test_a_key_taken_by_another_node_name_with_our_address_and_mac_is_not_ours(store, cfg):
    intruder = lease_value("192.168.1.10", MAC_A, NodeName="node-z")
    lease = acquire_lease(LostAnswers(store, intruder), cfg, "192.168.1.10", MAC_A, node_name="node-a")
    assert (lease.subnet, lease.node_name) == ("10.244.1.0/24", "node-a")
    assert json.loads(store.get("subnets/10.244.0.0-24").value)["NodeName"] == "node-z"


# ---- wanted_state -----------------------------------------------------------------------------


class Lease:
    def __init__(self, subnet, public_ip, vtep_mac, node_name=""):
        self.subnet, self.public_ip, self.vtep_mac, self.node_name = subnet, public_ip, vtep_mac, node_name


ME = Lease("10.244.0.0/24", "192.168.100.10", "0a:00:00:00:00:0a", "me")
B = Lease("10.244.1.0/24", "192.168.100.11", "0a:00:00:00:00:0b", "b")
C = Lease("10.244.2.0/24", "192.168.100.12", "0a:00:00:00:00:0c", "c")
D = Lease("10.244.3.0/24", "192.168.100.13", "0a:00:00:00:00:0d", "d")


def wanted(leases, **kwargs):
    return wanted_state(leases, ME.public_ip, ME.subnet, NET, **kwargs)


def test_leases_sharing_a_vtep_mac_are_none_of_them_programmed():
    twin = Lease("10.244.5.0/24", "192.168.100.15", B.vtep_mac.upper(), "twin")
    triplet = Lease("10.244.6.0/24", "192.168.100.16", B.vtep_mac, "triplet")
    w = wanted([ME, B, C, twin, triplet])
    assert [r.subnet for r in w.remotes] == [C.subnet]
    assert w.members == {C.public_ip}
    assert {f.mac for f in w.fdb} == {C.vtep_mac}
    assert w.skipped == [
        f"10.244.1.0/24: VTEP MAC {B.vtep_mac} is also claimed by 10.244.5.0/24, 10.244.6.0/24; none of them is "
        f"programmed",
        f"10.244.5.0/24: VTEP MAC {B.vtep_mac} is also claimed by 10.244.1.0/24, 10.244.6.0/24; none of them is "
        f"programmed",
        f"10.244.6.0/24: VTEP MAC {B.vtep_mac} is also claimed by 10.244.1.0/24, 10.244.5.0/24; none of them is "
        f"programmed",
    ]


def test_a_remote_claiming_this_nodes_vtep_mac_is_skipped():
    impostor = Lease("10.244.4.0/24", "192.168.100.14", ME.vtep_mac)
    w = wanted([ME, B, impostor], own_vtep_mac=ME.vtep_mac)
    assert [r.subnet for r in w.remotes] == [B.subnet]
    assert w.skipped == [f"10.244.4.0/24: VTEP MAC {ME.vtep_mac} is this node's own"]
    assert impostor.public_ip not in w.members


def test_members_are_the_accepted_remotes_only():
    zone = Lease("10.244.7.0/24", "fd00::7%eth0", "0a:00:00:00:00:17")
    pod_address = Lease("10.244.8.0/24", "10.244.200.1", "0a:00:00:00:00:18")
    bad_mac = Lease("10.244.9.0/24", "192.168.100.19", "01:00:5e:00:00:19")
    outside = Lease("10.99.0.0/24", "192.168.100.20", "0a:00:00:00:00:20")
    w = wanted([ME, B, zone, pod_address, bad_mac, outside])
    assert [r.subnet for r in w.remotes] == [B.subnet]
    assert w.members == {B.public_ip}  # neither this node nor any skipped lease
    assert len(w.skipped) == 4
    assert any(s.startswith("10.244.7.0/24: underlay address 'fd00::7%eth0'") for s in w.skipped)
    assert any(s.startswith("10.244.8.0/24: underlay 10.244.200.1 is inside the cluster network") for s in w.skipped)
    assert any(s.startswith("10.244.9.0/24: VTEP MAC '01:00:5e:00:00:19' is not a unicast MAC") for s in w.skipped)
    assert any(s.startswith("10.99.0.0/24: outside the cluster network") for s in w.skipped)


def test_skipped_is_sorted_and_the_same_for_the_same_leases_in_any_order():
    leases = [
        ME,
        B,
        C,
        D,
        Lease("10.244.5.0/24", "192.168.100.15", C.vtep_mac),
        Lease("10.99.0.0/24", "192.168.100.20", "0a:00:00:00:00:20"),
        Lease("10.244.4.0/24", "fd00::14", "0a:00:00:00:00:14"),
        Lease("bogus", "x", "y"),
    ]
    first = wanted(leases)
    assert first.skipped == sorted(first.skipped) and len(first.skipped) == 5
    rng = random.Random(7)
    for _ in range(10):
        shuffled = leases[:]
        rng.shuffle(shuffled)
        again = wanted(shuffled)
        assert again.skipped == first.skipped and again.remotes == first.remotes


def test_scanned_leases_with_one_mac_reach_no_kernel_entry(store, cfg):
    """Each lease is well-formed on its own (scan accepts both); the overlay programs neither."""
    store.put("subnets/10.244.1.0-24", lease_value("192.168.1.11", MAC_B, NodeName="b"))
    store.put("subnets/10.244.2.0-24", lease_value("192.168.1.12", MAC_B, NodeName="impostor"))
    store.put("subnets/10.244.3.0-24", lease_value("192.168.1.13", MAC_C, NodeName="c"))
    scan = scan_leases(store, cfg)
    w = wanted_state(scan.leases, "192.168.1.10", "10.244.0.0/24", NET, own_vtep_mac=MAC_A)
    assert [r.subnet for r in w.remotes] == ["10.244.3.0/24"]
    assert [s.split(":")[0] for s in w.skipped] == ["10.244.1.0/24", "10.244.2.0/24"]


# ---- the file store: unreadable records ---------------------------------------------------------


BAD_RECORDS = [
    ("bad JSON", b"not json"),
    ("deep nesting", b'{"value": ' + DEEP + b"}"),
    ("wrong field types", json.dumps({"value": "x", "mod_revision": "1", "create_revision": 1, "version": 1}).encode()),
    (
        "a boolean revision",
        json.dumps({"value": "x", "mod_revision": True, "create_revision": 1, "version": 1}).encode(),
    ),
    (
        "a value that is not text",
        json.dumps({"value": 5, "mod_revision": 1, "create_revision": 1, "version": 1}).encode(),
    ),
    ("bad base64", json.dumps({"value_base64": "@@", "mod_revision": 1, "create_revision": 1, "version": 1}).encode()),
    ("missing fields", b'{"value": "x"}'),
    (
        "a bad expiry",
        json.dumps({"value": "x", "mod_revision": 1, "create_revision": 1, "version": 1, "expires": "soon"}).encode(),
    ),
    ("too big", b'{"value": "' + b"x" * (filestore.MAX_RECORD_BYTES + 10) + b'"}'),
]


@pytest.mark.parametrize("content", [c for _n, c in BAD_RECORDS], ids=[n for n, _c in BAD_RECORDS])
def test_list_skips_an_unreadable_record_with_one_warning(store, cfg, tmp_path, caplog, content):
    good = acquire_lease(store, cfg, "192.168.1.11", MAC_B)
    path = tmp_path / "store" / "subnets" / "10.244.7.0-24"
    path.write_bytes(content)
    caplog.set_level(logging.WARNING, logger="pycni.store")
    for _ in range(3):
        entries, _rev = store.list("subnets/")
        assert [e.key for e in entries] == [good.key]
    warnings = [r for r in caplog.records if r.name == "pycni.store"]
    assert len(warnings) == 1 and "subnets/10.244.7.0-24" in warnings[0].getMessage()
    # get() of that key keeps reporting it, and the allocator keeps away from it.
    with pytest.raises(StoreError, match="not a valid store record"):
        store.get("subnets/10.244.7.0-24")
    assert store.create("subnets/10.244.7.0-24", b"x") is False
    # Another version of the broken file: one more warning.
    path.write_bytes(content + b" ")
    store.list("subnets/")
    store.list("subnets/")
    assert len([r for r in caplog.records if r.name == "pycni.store"]) == 2


def test_an_unreadable_record_does_not_stop_the_allocator(store, cfg, tmp_path):
    (tmp_path / "store" / "subnets").mkdir(exist_ok=True)
    (tmp_path / "store" / "subnets" / "10.244.0.0-24").write_bytes(b"not json")
    lease = acquire_lease(store, cfg, "192.168.1.11", MAC_B)
    assert lease.subnet == "10.244.1.0/24"
    assert [l.subnet for l in list_leases(store)[0]] == ["10.244.1.0/24"]


def test_renewing_over_an_unreadable_record_is_lost(store, cfg, tmp_path):
    lease = acquire_lease(store, cfg, "192.168.1.11", MAC_B, ttl=30)
    (tmp_path / "store" / "subnets" / "10.244.0.0-24").write_bytes(b"not json")
    with pytest.raises(LeaseLost, match="unreadable"):
        renew_lease(store, lease, ttl=30)


def test_values_too_large_for_a_record_are_refused_when_written(store):
    with pytest.raises(StoreError, match="more than the .* allowed; store a smaller value"):
        store.put("big", b"x" * filestore.MAX_RECORD_BYTES)
    assert store.get("big") is None and store.list("")[1] == 0


# ---- the file store: TTLs ------------------------------------------------------------------------


def test_an_expired_lease_frees_its_subnet_for_another_node(store, cfg, clock):
    a = acquire_lease(store, cfg, "192.168.1.10", MAC_A, node_name="a", ttl=30)
    clock.now += 31
    assert list_leases(store)[0] == []
    b = acquire_lease(store, cfg, "192.168.1.11", MAC_B, node_name="b", ttl=30)
    assert b.subnet == a.subnet
    with pytest.raises(LeaseLost, match="192.168.1.11"):
        renew_lease(store, a, ttl=30)


def test_renewal_keeps_a_lease_alive_past_its_ttl(store, cfg, clock):
    a = acquire_lease(store, cfg, "192.168.1.10", MAC_A, ttl=30)
    for _ in range(5):
        clock.now += 20
        assert renew_lease(store, a, ttl=30) == a
    assert [l.public_ip for l in list_leases(store)[0]] == ["192.168.1.10"]


def test_deleting_or_replacing_an_expired_key_commits_its_deletion(store, clock):
    store.put("k", b"v", ttl=5)
    store.put("j", b"v", ttl=5)
    _, rev = store.list("")
    clock.now += 6
    assert store.delete("k") is False
    assert store.replace("j", b"w", rev) is False
    assert store.list("")[1] == rev + 2
    assert store.wait("", rev, timeout=0) == rev + 2


def test_wait_only_stats_the_index_while_nothing_changes(store, clock, monkeypatch):
    store.put("subnets/a", b"v", ttl=100)
    _, rev = store.list("")
    reads = {"record": 0, "index": 0}
    real_record, real_index = filestore.FileStore._read_record, filestore.FileStore._read_expiry

    def count_record(self, *args):
        reads["record"] += 1
        return real_record(self, *args)

    def count_index(self):
        reads["index"] += 1
        return real_index(self)

    monkeypatch.setattr(filestore.FileStore, "_read_record", count_record)
    monkeypatch.setattr(filestore.FileStore, "_read_expiry", count_index)
    assert store.wait("subnets/", rev, timeout=0.4) is None
    assert reads == {"record": 0, "index": 1}  # read once, then only stat()ed
    clock.now += 101
    assert store.wait("subnets/", rev, timeout=1) == rev + 1
    assert reads["record"] == 1  # the reaper re-checked the one due record


def test_a_broken_index_is_rebuilt_from_the_records(store, tmp_path, clock, caplog):
    store.put("a", b"1", ttl=10)
    store.put("b", b"2", ttl=100)
    _, rev = store.list("")
    (tmp_path / "store" / filestore.EXPIRY_FILE).write_text("garbage\n")
    clock.now += 11
    caplog.set_level(logging.WARNING, logger="pycni.store")
    assert store.wait("", rev, timeout=1) == rev + 1
    assert [e.key for e in store.list("")[0]] == ["b"]
    lines = (tmp_path / "store" / filestore.EXPIRY_FILE).read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["b"]
    assert any("rebuilding it from the records" in r.getMessage() for r in caplog.records)


def test_records_of_older_versions_with_a_ttl_but_no_expiry_live_until_refreshed(store, tmp_path, clock):
    (tmp_path / "store" / "old").write_text(
        json.dumps({"key": "old", "value": "x", "mod_revision": 1, "create_revision": 1, "version": 1, "ttl": 5})
    )
    clock.now += 1000
    assert store.get("old").value == b"x"
    assert store.refresh("old") is True  # now it has an expiry
    clock.now += 6
    assert store.get("old") is None
