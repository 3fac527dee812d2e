"""Dual-stack and IPv6-only clusters: the configuration, the keys, pair allocation, validation, the CLI. No root.

A dual-stack cluster stores both pod networks in flannel's field names, and
each node's lease holds subnet i of the IPv4 pool with subnet i of the IPv6
pool under one key (subnets/10.244.1.0-24&fd00:10:244:1::-64), taken and
released together. IPv4-only clusters serialise exactly as before (checked
here byte for byte). The same claims against a real etcd are in
tests/integration/test_dual_stack_leases_etcd.py.
"""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from ipam.cluster import (
    ClusterConfig,
    ConfigConflict,
    Entry,
    LeaseExhausted,
    LeaseLost,
    NodeConflict,
    NodeLease,
    Pool,
    acquire_lease,
    init_cluster,
    lease_key,
    list_leases,
    open_store,
    read_config,
    release_lease,
    renew_lease,
    scan_leases,
    subnet_from_key,
    subnet_key,
    subnets_from_key,
)
from pycni.cluster_cmd import cluster
from tests.cluster_helpers import race_acquire_leases

NET4 = "10.244.0.0/16"
NET6 = "fd00:10:244::/56"
MAC_A = "0a:58:0a:00:00:0a"
MAC_B = "0a:58:0a:00:00:0b"
MAC_C = "0a:58:0a:00:00:0c"
MAC_6A = "0a:58:0a:00:06:0a"
MAC_6B = "0a:58:0a:00:06:0b"


def lease_value(public_ip="192.168.1.10", mac=MAC_A, **extra) -> bytes:
    doc = {"PublicIP": public_ip, "BackendType": "vxlan", "BackendData": {"VtepMAC": mac}, **extra}
    return json.dumps(doc).encode()


def dual_value(public_ip="192.168.1.10", mac=MAC_A, public_ipv6="fd01::10", mac6=MAC_6A, **extra) -> bytes:
    return lease_value(public_ip, mac, PublicIPv6=public_ipv6, BackendV6Data={"VtepMAC": mac6}, **extra)


@pytest.fixture
def store(tmp_path):
    s = open_store(f"file://{tmp_path / 'store'}")
    yield s
    s.close()


@pytest.fixture
def dual(store):
    c = ClusterConfig(NET4, ipv6_network=NET6)
    init_cluster(store, c)
    return c


@pytest.fixture
def v6only(store):
    c = ClusterConfig(ipv6_network=NET6)
    init_cluster(store, c)
    return c


# -- the configuration ----------------------------------------------------------------------


def test_an_ipv4_only_configuration_serialises_exactly_as_before():
    assert (
        ClusterConfig("10.244.0.0/16").to_json()
        == '{"Backend": {"Port": 8472, "Type": "vxlan", "VNI": 1}, "Network": "10.244.0.0/16", "SubnetLen": 24}'
    )
    c = ClusterConfig("10.244.0.0/16", 26, 42, 4789)  # positional: network, subnet_len, vni, port
    assert (c.network, c.subnet_len, c.vni, c.port, c.ipv6_network) == ("10.244.0.0/16", 26, 42, 4789, "")
    assert c.pools == [Pool(4, "10.244.0.0/16", 26)] and c.pool(6) is None and not c.dual_stack
    assert c.describe() == "network 10.244.0.0/16, /26 per node, VNI 42, UDP port 4789"
    assert (c.subnet_count, c.lease_count, str(c.ip_network)) == (1024, 1024, "10.244.0.0/16")


def test_a_dual_stack_configuration_uses_flannels_fields():
    c = ClusterConfig(NET4, ipv6_network=NET6, ipv6_subnet_len=64, vni=7)
    assert json.loads(c.to_json()) == {
        "Network": NET4,
        "SubnetLen": 24,
        "EnableIPv6": True,
        "IPv6Network": NET6,
        "IPv6SubnetLen": 64,
        "Backend": {"Type": "vxlan", "VNI": 7, "Port": 8472},
    }
    assert ClusterConfig.from_json(c.to_json()) == c
    assert c.pools == [Pool(4, NET4, 24), Pool(6, NET6, 64)] and c.dual_stack and c.versions == [4, 6]
    assert c.pool(6) == Pool(6, NET6, 64) and c.pool(4).subnet_count == 256 and c.pool(6).subnet_count == 256
    assert c.describe() == (f"network {NET4}, /24 per node, IPv6 network {NET6}, /64 per node, VNI 7, UDP port 8472")
    # The IPv4 names keep meaning the IPv4 pool.
    assert str(c.ip_network) == NET4 and c.subnet_count == 256 and str(next(c.subnets())) == "10.244.0.0/24"


def test_an_ipv6_only_configuration():
    c = ClusterConfig(ipv6_network=NET6, ipv6_subnet_len=60)
    assert json.loads(c.to_json()) == {
        "EnableIPv4": False,
        "EnableIPv6": True,
        "IPv6Network": NET6,
        "IPv6SubnetLen": 60,
        "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472},
    }
    assert ClusterConfig.from_json(c.to_json()) == c
    assert c.network == "" and c.pools == [Pool(6, NET6, 60)] and c.lease_count == 16
    assert c.describe() == f"IPv6 network {NET6}, /60 per node, VNI 1, UDP port 8472"
    for name in ("ip_network", "subnet_count"):
        with pytest.raises(ValueError, match="IPv6-only.*use pools or pool\\(6\\)"):
            getattr(c, name)
    with pytest.raises(ValueError, match="IPv6-only"):
        c.subnets()


def test_pools():
    pool = Pool(6, NET6, 64)
    assert pool.subnet_count == 256 and [str(n) for n in list(pool.subnets())[:2]] == [
        "fd00:10:244::/64",
        "fd00:10:244:1::/64",
    ]
    assert str(pool.subnet_at(255)) == "fd00:10:244:ff::/64"
    assert pool.index_of("fd00:10:244:ff::/64") == 255 and pool.index_of("fd00:10:244:ff::/65") is None
    assert pool.index_of("10.244.1.0/24") is None and pool.fits("fd00:10:244:7::/64")
    with pytest.raises(IndexError):
        pool.subnet_at(256)


@pytest.mark.parametrize(
    "data, expected",
    [
        # absent EnableIPv6 is on when IPv6Network is there; EnableIPv4 absent is on when Network is there
        ({"Network": NET4, "IPv6Network": NET6}, ClusterConfig(NET4, ipv6_network=NET6)),
        ({"Network": NET4, "IPv6Network": NET6, "EnableIPv6": False}, ClusterConfig(NET4)),  # off: ignored (flannel)
        ({"Network": NET4, "EnableIPv4": False, "IPv6Network": NET6}, ClusterConfig(ipv6_network=NET6)),
        (
            {"Network": NET4, "EnableIPv4": None, "EnableIPv6": None, "IPv6SubnetLen": None, "IPv6Network": NET6},
            ClusterConfig(NET4, ipv6_network=NET6),
        ),
        (
            {"IPv6Network": NET6, "IPv6SubnetLen": 62, "SubnetLen": 20},
            ClusterConfig(ipv6_network=NET6, ipv6_subnet_len=62),
        ),
        ({"Network": NET4, "IPv6SubnetLen": 80}, ClusterConfig(NET4)),  # no IPv6: its length ignored
        # pycni before dual-stack kept an IPv6-only cluster's network in "Network"
        ({"Network": "fd00:10::/48", "SubnetLen": 64}, ClusterConfig(ipv6_network="fd00:10::/48")),
        ({"Network": "fd00:10::/48", "SubnetLen": 60}, ClusterConfig(ipv6_network="fd00:10::/48", ipv6_subnet_len=60)),
    ],
)
def test_reading_the_configuration(data, expected):
    assert ClusterConfig.from_json(json.dumps(data)) == expected


@pytest.mark.parametrize(
    "data, message",
    [
        ({"Network": NET4, "EnableIPv6": True}, '"EnableIPv6": true but no "IPv6Network"'),
        ({"IPv6Network": NET6, "EnableIPv4": True}, '"EnableIPv4": true but no "Network"'),
        ({"Network": NET4, "EnableIPv4": False}, '"EnableIPv4": false and no "IPv6Network"'),
        ({}, 'has no "Network"'),
        ({"Network": NET4, "IPv6Network": 7}, '"IPv6Network" must be a string'),
        ({"Network": NET4, "EnableIPv6": "yes", "IPv6Network": NET6}, '"EnableIPv6" must be true or false'),
        ({"Network": NET4, "EnableIPv4": 1}, '"EnableIPv4" must be true or false'),
        ({"Network": NET4, "IPv6Network": NET6, "IPv6SubnetLen": "64"}, '"IPv6SubnetLen" must be a whole number'),
        ({"Network": NET4, "IPv6Network": "10.245.0.0/16"}, "it is an IPv4 network"),
        (
            {"Network": NET6, "IPv6Network": "fd00:20::/48"},
            "it is an IPv6 network; the IPv6 pod network is given as ipv6_network",
        ),
        ({"Network": NET4, "IPv6Network": NET6, "IPv6SubnetLen": 56}, "longer than /56"),
        ({"Network": NET4, "IPv6Network": "fd00:10:244:1::/56"}, "did you mean fd00:10:244::/56"),
    ],
)
def test_bad_configurations(data, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ClusterConfig.from_json(json.dumps(data))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"network": NET6}, "is an IPv6 network; the IPv6 pod network is given as ipv6_network (--ipv6-network)"),
        ({"ipv6_network": NET4}, "is an IPv4 network; the IPv4 pod network is given as network (--network)"),
        ({}, "a cluster needs a pod network"),
        ({"network": "", "ipv6_network": ""}, "a cluster needs a pod network"),
        ({"ipv6_network": "fd00:10:244:1::/56"}, "has host bits set; did you mean fd00:10:244::/56?"),
        ({"ipv6_network": "nonsense"}, "give a CIDR such as fd00:10:244::/56"),
        ({"ipv6_network": NET6, "ipv6_subnet_len": 56}, "must be longer than /56"),
        ({"ipv6_network": NET6, "ipv6_subnet_len": 127}, "at most /126"),
        ({"ipv6_network": NET6, "ipv6_subnet_len": True}, "ipv6_subnet_len True: it must be a whole number"),
        ({"ipv6_network": NET6, "subnet_len": 64}, "subnet_len (--subnet-len) is the length of the IPv4 subnets"),
        ({"network": NET4, "ipv6_subnet_len": 80}, "this cluster has no IPv6 network"),
    ],
)
def test_configuration_validation(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ClusterConfig(**kwargs)


def test_the_longest_ipv6_subnets_are_126():
    assert ClusterConfig(ipv6_network="fd00::/120", ipv6_subnet_len=126).lease_count == 64


def test_init_compares_both_families(store):
    assert init_cluster(store, ClusterConfig(NET4, ipv6_network=NET6)) is True
    assert init_cluster(store, ClusterConfig(NET4, ipv6_network=NET6)) is False
    with pytest.raises(ConfigConflict, match="IPv6 network fd00:10:244::/56.*refusing.*IPv6 network fd00:20::/56"):
        init_cluster(store, ClusterConfig(NET4, ipv6_network="fd00:20::/56"))
    with pytest.raises(ConfigConflict):
        init_cluster(store, ClusterConfig(NET4))
    assert read_config(store) == ClusterConfig(NET4, ipv6_network=NET6)


# -- keys and values --------------------------------------------------------------------------


def test_lease_keys_follow_flannel():
    assert lease_key("10.244.1.0/24") == subnet_key("10.244.1.0/24") == "subnets/10.244.1.0-24"
    assert lease_key("10.244.1.0/24", "fd00:10:244:1::/64") == "subnets/10.244.1.0-24&fd00:10:244:1::-64"
    assert lease_key("", "fd00:10:244:1::/64") == "subnets/fd00:10:244:1::-64"
    assert lease_key("10.244.1.0/24", "FD00:0010:0244:0001:0000::/64") == "subnets/10.244.1.0-24&fd00:10:244:1::-64"
    assert subnets_from_key("subnets/10.244.1.0-24") == ("10.244.1.0/24", "")
    assert subnets_from_key("subnets/10.244.1.0-24&fd00:10:244:1::-64") == ("10.244.1.0/24", "fd00:10:244:1::/64")
    assert subnets_from_key("subnets/fd00:10:244:1::-64") == ("", "fd00:10:244:1::/64")
    assert subnets_from_key("subnets/10.244.1.0-024&fd00:10:244:0001::-64") == ("10.244.1.0/24", "fd00:10:244:1::/64")
    for bad in (
        "subnets/fd00:10:244:1::-64&10.244.1.0-24",
        "subnets/10.244.1.0-24&10.244.2.0-24",
        "subnets/10.244.1.0-24&fd00::-64&fd01::-64",
        "subnets/10.244.1.0-24&",
        "subnets/10.244.1.5-24",
        "subnets/10.244.1.0-24&fd00::1-64",
        "config",
        "subnets/garbage",
    ):
        assert subnets_from_key(bad) is None, bad
    # The single-subnet function is for single-subnet keys.
    assert subnet_from_key("subnets/10.244.1.0-24&fd00:10:244:1::-64") is None
    assert subnet_from_key("subnets/10.244.1.0-24") == "10.244.1.0/24"
    with pytest.raises(ValueError, match="not an IPv4 subnet"):
        lease_key("fd00:10:244:1::/64", "fd00:10:244:2::/64")
    with pytest.raises(ValueError, match="not an IPv6 subnet"):
        lease_key("10.244.1.0/24", "10.244.2.0/24")
    with pytest.raises(ValueError, match="needs a subnet"):
        lease_key("", "")


def test_lease_values_use_flannels_fields():
    plain = NodeLease("10.244.1.0/24", "192.168.1.10", MAC_A, "node-a")
    assert plain.to_json() == (
        '{"BackendData": {"VtepMAC": "0a:58:0a:00:00:0a"}, "BackendType": "vxlan", '
        '"NodeName": "node-a", "PublicIP": "192.168.1.10"}'
    )  # as before
    lease = NodeLease(
        "10.244.1.0/24",
        "192.168.1.10",
        MAC_A,
        "node-a",
        ipv6_subnet="fd00:10:244:1::/64",
        public_ipv6="fd01::10",
        vtep_mac6=MAC_6A,
    )
    assert json.loads(lease.to_json()) == {
        "PublicIP": "192.168.1.10",
        "PublicIPv6": "fd01::10",
        "BackendType": "vxlan",
        "BackendData": {"VtepMAC": MAC_A},
        "BackendV6Data": {"VtepMAC": MAC_6A},
        "NodeName": "node-a",
    }
    assert lease.key == "subnets/10.244.1.0-24&fd00:10:244:1::-64"
    assert lease.subnets == ["10.244.1.0/24", "fd00:10:244:1::/64"]
    assert (lease.subnet_of(4), lease.subnet_of(6)) == ("10.244.1.0/24", "fd00:10:244:1::/64")
    assert NodeLease.from_json("10.244.1.0/24", lease.to_json(), ipv6_subnet="fd00:10:244:1::/64") == lease
    assert NodeLease.from_entry(Entry(lease.key, lease.to_json().encode(), 5, 1)) == lease
    v6 = NodeLease("", "fd01::10", MAC_A, ipv6_subnet="fd00:10:244:1::/64")
    assert v6.key == "subnets/fd00:10:244:1::-64" and v6.subnets == ["fd00:10:244:1::/64"] and v6.subnet_of(4) == ""
    assert NodeLease.from_json("fd00:10:244:1::/64", v6.to_json()) == v6  # an IPv6 subnet given alone is the IPv6 one


# -- pair allocation ---------------------------------------------------------------------------


def test_a_node_gets_subnet_i_of_each_pool_under_one_key(store, dual):
    a = acquire_lease(store, dual, "192.168.1.10", MAC_A, node_name="a", public_ipv6="fd01::10", vtep_mac6=MAC_6A)
    b = acquire_lease(store, dual, "192.168.1.11", MAC_B, node_name="b")
    assert (a.subnet, a.ipv6_subnet) == ("10.244.0.0/24", "fd00:10:244::/64")
    assert (b.subnet, b.ipv6_subnet) == ("10.244.1.0/24", "fd00:10:244:1::/64")
    assert (a.public_ipv6, a.vtep_mac6, b.public_ipv6, b.vtep_mac6) == ("fd01::10", MAC_6A, "", "")
    assert [e.key for e in store.list("subnets/")[0]] == [
        "subnets/10.244.0.0-24&fd00:10:244::-64",
        "subnets/10.244.1.0-24&fd00:10:244:1::-64",
    ]
    assert list_leases(store, dual)[0] == [a, b]
    # The same node gets the pair back, with what it passes now.
    again = acquire_lease(store, dual, "192.168.1.10", MAC_A, node_name="a", public_ipv6="fd01::10", vtep_mac6=MAC_6A)
    assert again == a and again.mod_revision == a.mod_revision  # unchanged: no write
    moved = acquire_lease(store, dual, "192.168.1.10", MAC_A, node_name="a", public_ipv6="fd01::99", vtep_mac6=MAC_6B)
    assert (moved.subnet, moved.ipv6_subnet, moved.public_ipv6, moved.vtep_mac6) == (
        a.subnet,
        a.ipv6_subnet,
        "fd01::99",
        MAC_6B,
    )
    assert len(store.list("subnets/")[0]) == 2


def test_one_claim_one_write(store, dual):
    before = store.stats()["requests"]
    acquire_lease(store, dual, "192.168.1.10", MAC_A, ttl=30)
    after = store.stats()["requests"]
    assert {op: after[op] - before.get(op, 0) for op in ("txn", "put", "deleterange") if op in after} == {"txn": 1}


def test_a_taken_subnet_of_either_family_takes_its_index(store, dual):
    # Written by something else: unaligned pairs, a lone IPv6 key, garbage values. Each subnet they name is taken.
    store.put("subnets/10.244.0.0-24&fd00:10:244:3::-64", dual_value("192.168.9.1", MAC_C))  # indices 0 and 3
    store.put("subnets/fd00:10:244:1::-64", b"garbage")  # index 1
    store.put("subnets/10.244.2.0-25", b"garbage")  # index 2 (overlap)
    store.put("subnets/10.244.4.0-24&bogus", b"{}")  # index 4, still
    lease = acquire_lease(store, dual, "192.168.1.10", MAC_A)
    assert (lease.subnet, lease.ipv6_subnet) == ("10.244.5.0/24", "fd00:10:244:5::/64")


def test_preferred_subnets(store, dual):
    a = acquire_lease(store, dual, "192.168.1.10", MAC_A, preferred_subnet="10.244.7.0/24")
    assert (a.subnet, a.ipv6_subnet) == ("10.244.7.0/24", "fd00:10:244:7::/64")
    b = acquire_lease(store, dual, "192.168.1.11", MAC_B, preferred_ipv6_subnet="fd00:10:244:9::/64")
    assert (b.subnet, b.ipv6_subnet) == ("10.244.9.0/24", "fd00:10:244:9::/64")
    c = acquire_lease(store, dual, "192.168.1.12", MAC_C, preferred_subnet="fd00:10:244:a::/64")  # either family
    assert (c.subnet, c.ipv6_subnet) == ("10.244.10.0/24", "fd00:10:244:a::/64")
    # Taken (by a): the lowest free index instead. Not of this cluster: ignored.
    d = acquire_lease(store, dual, "192.168.1.13", MAC_A, preferred_subnet="10.244.7.0/24")
    assert d.subnet == "10.244.0.0/24"
    e = acquire_lease(store, dual, "192.168.1.14", MAC_A, preferred_ipv6_subnet="fd99::/64")
    assert e.subnet == "10.244.1.0/24"
    with pytest.raises(ValueError, match="preferred IPv6 subnet '10.244.1.0/24': it is IPv4"):
        acquire_lease(store, dual, "192.168.1.15", MAC_A, preferred_ipv6_subnet="10.244.1.0/24")
    with pytest.raises(ValueError, match="invalid preferred subnet"):
        acquire_lease(store, dual, "192.168.1.15", MAC_A, preferred_subnet="bogus")


def test_an_unaligned_pair_is_taken_back_when_both_are_free(store, dual):
    """A lease another tool wrote with subnets of two indices: its node, restarting after it expired, gets it back."""
    lease = acquire_lease(
        store, dual, "192.168.1.10", MAC_A, preferred_subnet="10.244.3.0/24", preferred_ipv6_subnet="fd00:10:244:5::/64"
    )
    assert lease.key == "subnets/10.244.3.0-24&fd00:10:244:5::-64"
    # The crossed pair is free in each family: no subnet is shared.
    crossed = acquire_lease(
        store, dual, "192.168.1.11", MAC_B, preferred_subnet="10.244.5.0/24", preferred_ipv6_subnet="fd00:10:244:3::/64"
    )
    assert crossed.key == "subnets/10.244.5.0-24&fd00:10:244:3::-64"
    # One half held (10.244.3.0/24): the lowest free index instead.
    other = acquire_lease(
        store, dual, "192.168.1.12", MAC_C, preferred_subnet="10.244.3.0/24", preferred_ipv6_subnet="fd00:10:244:6::/64"
    )
    assert other.key == "subnets/10.244.0.0-24&fd00:10:244::-64"
    # Indices 3 and 5 are taken in both families now; 1 is the next free one.
    assert acquire_lease(store, dual, "192.168.1.13", MAC_C).key == "subnets/10.244.1.0-24&fd00:10:244:1::-64"


@pytest.mark.parametrize(
    "net4, len4, net6, len6, count",
    [
        ("10.9.0.0/28", 30, "fd00::/120", 123, 4),  # 4 IPv4 subnets, 8 IPv6 ones
        ("10.9.0.0/24", 26, "fd00::/122", 124, 4),  # 4 of each
        ("10.9.0.0/24", 27, "fd00::/122", 124, 4),  # 8 IPv4, 4 IPv6
    ],
)
def test_exhaustion_counts_the_smaller_pool(store, net4, len4, net6, len6, count):
    cfg = ClusterConfig(net4, len4, ipv6_network=net6, ipv6_subnet_len=len6)
    assert cfg.lease_count == count
    leases = [acquire_lease(store, cfg, f"192.168.1.{i + 1}", MAC_A) for i in range(count)]
    assert len({l.subnet for l in leases}) == len({l.ipv6_subnet for l in leases}) == count
    with pytest.raises(LeaseExhausted) as exc:
        acquire_lease(store, cfg, "192.168.1.99", MAC_B)
    message = str(exc.value)
    assert f"room for {count} leases" in message and "every index is taken" in message, message
    smaller = min(cfg.pools, key=lambda pool: pool.subnet_count)
    assert f"the smaller pool, {smaller.subnet_count} /{smaller.subnet_len} subnets of {smaller.network}" in message
    # The existing nodes still get theirs back.
    assert acquire_lease(store, cfg, "192.168.1.2", MAC_A) == leases[1]


def test_processes_racing_share_no_subnet_of_either_family(tmp_path):
    url = f"file://{tmp_path / 'race'}"
    cfg = ClusterConfig(NET4, ipv6_network=NET6)
    with open_store(url) as s:
        init_cluster(s, cfg)
    ips = [f"192.168.1.{i + 10}" for i in range(10)]
    results = race_acquire_leases(url, cfg, ips)
    assert sorted(results) == sorted(ips) and not [r for r in results.values() if r.startswith("ERROR")], results
    with open_store(url) as s:
        scan = scan_leases(s, cfg)
    assert scan.rejected == [] and len(scan.leases) == 10
    assert len({l.subnet for l in scan.leases}) == len({l.ipv6_subnet for l in scan.leases}) == 10
    assert all(cfg.pool(4).index_of(l.subnet) == cfg.pool(6).index_of(l.ipv6_subnet) for l in scan.leases)


# -- renew and release -------------------------------------------------------------------------


def test_renew_and_release_the_pair(store, dual):
    a = acquire_lease(
        store, dual, "192.168.1.10", MAC_A, node_name="a", ttl=30, public_ipv6="fd01::10", vtep_mac6=MAC_6A
    )
    assert renew_lease(store, a, ttl=30) == a
    store.delete(a.key)  # expired
    back = renew_lease(store, a, ttl=30)
    assert back == a and store.get(a.key) is not None
    store.delete(a.key)
    b = acquire_lease(store, dual, "192.168.1.11", MAC_B, node_name="b")
    assert b.key == a.key
    with pytest.raises(
        LeaseLost, match="the subnets 10.244.0.0/24 and fd00:10:244::/64 are now leased to 192.168.1.11 \\(b\\)"
    ):
        renew_lease(store, a, ttl=30)
    assert release_lease(store, "192.168.1.11") is True
    assert store.list("subnets/")[0] == []
    assert release_lease(store, "192.168.1.11") is False


def test_renewing_an_expired_pair_whose_half_is_held_elsewhere_is_lost(store, dual):
    a = acquire_lease(store, dual, "192.168.1.10", MAC_A, node_name="a", ttl=30)
    store.delete(a.key)
    store.put(
        "subnets/10.244.5.0-24&fd00:10:244::-64", dual_value("192.168.1.20", MAC_C, "fd01::20", MAC_6B, NodeName="z")
    )
    with pytest.raises(
        LeaseLost,
        match=r"fd00:10:244::/64 is now held under subnets/10\.244\.5\.0-24&fd00:10:244::-64 "
        r"\(the node at 192\.168\.1\.20, z\)",
    ):
        renew_lease(store, a, ttl=30)
    assert store.get(a.key) is None  # not written: no subnet on two keys


# -- node identity and the second underlay --------------------------------------------------------


def test_the_second_underlay_is_checked(store, dual):
    for kwargs, message in [
        ({"public_ipv6": "fd01::10"}, "needs the MAC of the VXLAN device on it"),
        ({"vtep_mac6": MAC_6A}, "needs its underlay address"),
        ({"public_ipv6": "192.168.2.10", "vtep_mac6": MAC_6A}, "it is an IPv4 address"),
        ({"public_ipv6": "fd01::10%eth0", "vtep_mac6": MAC_6A}, "carries a zone"),
        ({"public_ipv6": "ff02::1", "vtep_mac6": MAC_6A}, "multicast"),
        ({"public_ipv6": "fd00:10:244:7::5", "vtep_mac6": MAC_6A}, "inside the cluster network fd00:10:244::/56"),
        ({"public_ipv6": "fd01::10", "vtep_mac6": "01:00:5e:00:00:01"}, "IPv6-underlay VTEP MAC .* multicast"),
    ]:
        with pytest.raises(ValueError, match=message):
            acquire_lease(store, dual, "192.168.1.10", MAC_A, **kwargs)
    with pytest.raises(ValueError, match="it is the node's public IP already"):
        acquire_lease(store, dual, "fd01::10", MAC_A, public_ipv6="fd01::10", vtep_mac6=MAC_6A)
    with pytest.raises(ValueError, match="inside the cluster network fd00:10:244::/56"):
        acquire_lease(store, dual, "fd00:10:244:1::7", MAC_A)
    v4 = ClusterConfig("10.9.0.0/16")
    with pytest.raises(ValueError, match="this cluster has no IPv6 pod network"):
        acquire_lease(store, v4, "192.168.1.10", MAC_A, public_ipv6="fd01::10", vtep_mac6=MAC_6A)
    assert store.list("subnets/")[0] == []


def test_another_node_on_our_ipv6_underlay_address_is_a_conflict(store, dual):
    a = acquire_lease(store, dual, "192.168.1.10", MAC_A, node_name="a", public_ipv6="fd01::10", vtep_mac6=MAC_6A)
    with pytest.raises(NodeConflict) as exc:
        acquire_lease(store, dual, "192.168.1.20", MAC_B, node_name="b", public_ipv6="fd01::10", vtep_mac6=MAC_6B)
    message = str(exc.value)
    for part in (
        "public IP fd01::10",
        "10.244.0.0/24 and fd00:10:244::/64",
        "'a'",
        "'b'",
        "its own --public-ipv6",
        "pycni agent leave --store URL --public-ip 192.168.1.10",
    ):
        assert part in message, (part, message)
    with pytest.raises(NodeConflict, match="its own --public-ip;"):  # our main address is its second one
        acquire_lease(store, dual, "fd01::10", MAC_B, node_name="b")
    assert scan_leases(store, dual).leases == [a]


def test_a_renumbered_node_takes_its_pair_over(store, dual):
    old = acquire_lease(store, dual, "192.168.1.10", MAC_A, node_name="a", public_ipv6="fd01::10", vtep_mac6=MAC_6A)
    other = acquire_lease(store, dual, "192.168.1.11", MAC_B, node_name="b")
    moved = acquire_lease(
        store,
        dual,
        "192.168.1.20",
        MAC_A,
        node_name="a",
        public_ipv6="fd01::20",
        vtep_mac6=MAC_6A,
        previous=NodeLease(**{**old.__dict__}),
    )
    assert (moved.key, moved.public_ip, moved.public_ipv6) == (old.key, "192.168.1.20", "fd01::20")
    # A previous lease that is not exactly what the store holds (another IPv6 VTEP MAC) is no claim.
    stale = NodeLease(**{**other.__dict__, "public_ipv6": "fd01::11", "vtep_mac6": MAC_6B})
    third = acquire_lease(store, dual, "192.168.1.30", MAC_C, previous=stale)
    assert third.key not in (old.key, other.key)


class LostAnswers:
    """A store wrapper whose create() does the work but answers "taken" (a lost answer)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def create(self, key, value, ttl=None):
        self.inner.create(key, value, ttl=ttl)
        return False


def test_a_dual_claim_whose_answer_was_lost_is_recognised_as_ours(store, dual):
    lease = acquire_lease(
        LostAnswers(store), dual, "192.168.1.10", MAC_A, node_name="a", public_ipv6="fd01::10", vtep_mac6=MAC_6A
    )
    assert lease.key == "subnets/10.244.0.0-24&fd00:10:244::-64" and len(store.list("subnets/")[0]) == 1


# -- validation of what the store holds ------------------------------------------------------------

DUAL_KEY = "subnets/10.244.1.0-24&fd00:10:244:1::-64"

BAD_DUAL_VALUES = [
    ("PublicIPv6 a number", dual_value(public_ipv6=7), "PublicIPv6 must be a string"),
    ("PublicIPv6 zone", dual_value(public_ipv6="fd01::10%eth0"), "PublicIPv6 'fd01::10%eth0' carries a zone"),
    ("PublicIPv6 IPv4", dual_value(public_ipv6="192.168.2.10"), "PublicIPv6 '192.168.2.10' is an IPv4 address"),
    ("PublicIPv6 multicast", dual_value(public_ipv6="ff02::1"), "PublicIPv6 'ff02::1' is a multicast address"),
    ("PublicIPv6 loopback", dual_value(public_ipv6="::1"), "PublicIPv6 '::1' is a loopback address"),
    ("PublicIPv6 not an address", dual_value(public_ipv6="node-a"), "PublicIPv6 'node-a' is not an IPv4 or IPv6"),
    (
        "PublicIPv6 is PublicIP",
        dual_value(public_ip="fd01::10", public_ipv6="fd01::10"),
        "PublicIPv6 fd01::10 is PublicIP itself",
    ),
    (
        "PublicIPv6 a pod address",
        dual_value(public_ipv6="fd00:10:244:9::9"),
        "PublicIPv6 fd00:10:244:9::9 is inside the cluster network fd00:10:244::/56",
    ),
    (
        "PublicIP a pod address",
        dual_value(public_ip="fd00:10:244:9::9"),
        "PublicIP fd00:10:244:9::9 is inside the cluster network fd00:10:244::/56",
    ),
    (
        "BackendV6Data a string",
        lease_value(PublicIPv6="fd01::10", BackendV6Data=MAC_6A),
        "BackendV6Data must be an object",
    ),
    (
        "no BackendV6Data.VtepMAC",
        lease_value(PublicIPv6="fd01::10", BackendV6Data={}),
        "BackendV6Data.VtepMAC is missing",
    ),
    (
        "VtepMAC6 multicast",
        dual_value(mac6="01:00:5e:00:00:01"),
        "BackendV6Data.VtepMAC '01:00:5e:00:00:01' is a multicast MAC",
    ),
    ("VtepMAC6 zero", dual_value(mac6="00:00:00:00:00:00"), "BackendV6Data.VtepMAC .* is all zeros"),
    ("VtepMAC6 not a MAC", dual_value(mac6="zz"), "BackendV6Data.VtepMAC 'zz' is not a MAC address"),
    (
        "PublicIPv6 without its MAC",
        lease_value(PublicIPv6="fd01::10"),
        "PublicIPv6 fd01::10 comes without BackendV6Data.VtepMAC",
    ),
    ("VtepMAC6 without its address", lease_value(BackendV6Data={"VtepMAC": MAC_6A}), "comes without PublicIPv6"),
    (
        "IPv6Subnet of another key",
        dual_value(IPv6Subnet="fd00:10:244:2::/64"),
        "IPv6Subnet 'fd00:10:244:2::/64' does not match the key's subnet fd00:10:244:1::/64",
    ),
    ("Subnet of another key", dual_value(Subnet="10.244.2.0/24"), "Subnet '10.244.2.0/24' does not match"),
]


@pytest.mark.parametrize(
    "value, reason", [(v, r) for _n, v, r in BAD_DUAL_VALUES], ids=[n for n, _v, _r in BAD_DUAL_VALUES]
)
def test_bad_dual_values_are_rejected_with_the_key_and_the_field(store, dual, value, reason):
    store.put(DUAL_KEY, value)
    store.put("subnets/10.244.2.0-24&fd00:10:244:2::-64", dual_value("192.168.1.11", MAC_B, "fd01::11", MAC_6B))
    scan = scan_leases(store, dual)
    assert [lease.key for lease in scan.leases] == ["subnets/10.244.2.0-24&fd00:10:244:2::-64"]
    assert [r.key for r in scan.rejected] == [DUAL_KEY]
    assert scan.rejected[0].reason.startswith(f"{DUAL_KEY}: ") and re.search(reason, scan.rejected[0].reason), (
        scan.rejected[0].reason
    )
    # Its subnets stay taken.
    assert acquire_lease(store, dual, "192.168.1.30", MAC_C).key == "subnets/10.244.0.0-24&fd00:10:244::-64"
    assert acquire_lease(store, dual, "192.168.1.31", MAC_C).key == "subnets/10.244.3.0-24&fd00:10:244:3::-64"


BAD_DUAL_KEYS = [
    (
        "subnets/10.244.1.0-24",
        "the key holds only the IPv4 subnet 10.244.1.0/24; this dual-stack cluster leases an "
        "IPv4 and an IPv6 subnet together",
    ),
    ("subnets/fd00:10:244:1::-64", "the key holds only the IPv6 subnet fd00:10:244:1::/64"),
    (
        "subnets/10.244.1.0-24&fd00:10:244:0001::-64",
        "not the canonical key of the subnets 10.244.1.0/24 and "
        "fd00:10:244:1::/64 \\(that is " + re.escape(DUAL_KEY) + "\\)",
    ),
    ("subnets/10.244.1.0-24&FD00:10:244:1::-64", "not the canonical key"),
    ("subnets/fd00:10:244:1::-64&10.244.1.0-24", "not a subnet lease key"),
    (
        "subnets/10.244.1.0-24&fd00:10:245::-64",
        "the subnet fd00:10:245::/64 is outside the cluster network fd00:10:244::/56",
    ),
    (
        "subnets/10.244.1.0-24&fd00:10:244:1::-80",
        "the subnet fd00:10:244:1::/80 is a /80; this cluster leases /64 subnets of fd00:10:244::/56",
    ),
    ("subnets/10.99.1.0-24&fd00:10:244:1::-64", "the subnet 10.99.1.0/24 is outside the cluster network 10.244.0.0/16"),
]


@pytest.mark.parametrize("key, reason", BAD_DUAL_KEYS)
def test_bad_dual_keys_are_rejected(store, dual, key, reason):
    store.put(key, dual_value("192.168.1.20", MAC_C))
    scan = scan_leases(store, dual)
    assert scan.leases == [] and [r.key for r in scan.rejected] == [key]
    assert scan.rejected[0].reason.startswith(f"{key}: ") and re.search(reason, scan.rejected[0].reason), scan.rejected[
        0
    ].reason


def test_an_ipv4_only_cluster_takes_only_ipv4_keys(store):
    cfg = ClusterConfig(NET4)
    store.put(DUAL_KEY, dual_value())
    store.put("subnets/10.244.2.0-24", dual_value("192.168.1.11", MAC_B, "fd01::11", MAC_6B))  # IPv6 underlay: fine
    scan = scan_leases(store, cfg)
    assert [(l.subnet, l.public_ipv6, l.vtep_mac6) for l in scan.leases] == [("10.244.2.0/24", "fd01::11", MAC_6B)]
    assert scan.rejected[0].reason == (
        f"{DUAL_KEY}: the key holds the IPv6 subnet fd00:10:244:1::/64 too, and this "
        f"cluster is IPv4-only (its network is 10.244.0.0/16)"
    )
    # Without a configuration only the configuration-free checks apply: the dual lease is well-formed.
    assert [l.key for l in scan_leases(store, None).leases] == [DUAL_KEY, "subnets/10.244.2.0-24"]


# -- an IPv6-only cluster ----------------------------------------------------------------------------


def test_an_ipv6_only_cluster(store, v6only):
    a = acquire_lease(store, v6only, "fd01::10", MAC_A, node_name="a")
    b = acquire_lease(store, v6only, "192.168.1.11", MAC_B, node_name="b")  # an IPv4 underlay is fine
    assert (a.subnet, a.ipv6_subnet, a.key) == ("", "fd00:10:244::/64", "subnets/fd00:10:244::-64")
    assert (b.subnet, b.ipv6_subnet) == ("", "fd00:10:244:1::/64")
    store.put("subnets/10.244.1.0-24", lease_value("192.168.1.12", MAC_C))
    store.put(DUAL_KEY, dual_value("192.168.1.13", MAC_C))
    scan = scan_leases(store, v6only)
    assert scan.leases == [a, b]
    assert [r.reason for r in scan.rejected] == [
        "subnets/10.244.1.0-24: the subnet 10.244.1.0/24 is IPv4, the cluster network fd00:10:244::/56 is IPv6",
        f"{DUAL_KEY}: the key holds the IPv4 subnet 10.244.1.0/24 too, and this cluster is IPv6-only (its network "
        f"is fd00:10:244::/56)",
    ]
    c = acquire_lease(store, v6only, "fd01::12", MAC_C)  # index 1 is taken by the dual key's IPv6 subnet too
    assert c.ipv6_subnet == "fd00:10:244:2::/64"
    assert renew_lease(store, a, ttl=None) == a
    assert release_lease(store, "fd01::10") is True and store.get(a.key) is None


def test_a_store_of_pycni_before_dual_stack_with_an_ipv6_network_keeps_working(store):
    store.put(
        "config", b'{"Network": "fd00:10::/48", "SubnetLen": 64, "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472}}'
    )
    store.put("subnets/fd00:10::-64", lease_value("192.168.1.10", MAC_A))
    cfg = read_config(store)
    assert cfg == ClusterConfig(ipv6_network="fd00:10::/48")
    assert init_cluster(store, ClusterConfig(ipv6_network="fd00:10::/48")) is False  # the same cluster
    lease = acquire_lease(store, cfg, "192.168.1.10", MAC_A, node_name="a")
    assert (lease.key, lease.ipv6_subnet, lease.node_name) == ("subnets/fd00:10::-64", "fd00:10::/64", "a")


def test_an_ipv6_only_cluster_runs_out_with_a_message(store):
    small = ClusterConfig(ipv6_network="fd00::/124", ipv6_subnet_len=126)
    for i in range(4):
        acquire_lease(store, small, f"192.168.1.{i + 1}", MAC_A)
    with pytest.raises(
        LeaseExhausted,
        match=r"all 4 /126 subnets of fd00::/124 are leased.*\(for example /123 "
        r"instead of /124\)",
    ):
        acquire_lease(store, small, "192.168.1.99", MAC_B)


# -- pycni cluster ---------------------------------------------------------------------------------


def _run(*args):
    return CliRunner().invoke(cluster, list(args), catch_exceptions=False)


def test_cli_init_dual_stack_and_ipv6_only(tmp_path):
    url = f"file://{tmp_path / 'dual'}"
    first = _run("init", "--store", url, "--network", NET4, "--ipv6-network", NET6, "--ipv6-subnet-len", "64")
    assert first.exit_code == 0, first.output
    assert first.output == (
        f"cluster initialised in {url}: network {NET4}, /24 per node, IPv6 network {NET6}, "
        f"/64 per node, VNI 1, UDP port 8472 (room for 256 nodes)\n"
    )
    assert "already initialised" in _run("init", "--store", url, "--network", NET4, "--ipv6-network", NET6).output
    conflict = _run("init", "--store", url, "--network", NET4)
    assert conflict.exit_code == 1 and "different cluster configuration" in conflict.output
    with open_store(url) as s:
        assert read_config(s) == ClusterConfig(NET4, ipv6_network=NET6)
    url6 = f"file://{tmp_path / 'v6'}"
    only = _run("init", "--store", url6, "--ipv6-network", "fd00:10:244::/60", "--ipv6-subnet-len", "64")
    assert (
        only.exit_code == 0
        and "IPv6 network fd00:10:244::/60, /64 per node" in only.output
        and "room for 16 nodes" in only.output
    )
    with open_store(url6) as s:
        assert json.loads(s.get("config").value)["EnableIPv4"] is False


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give the pod network: --network CIDR (IPv4), --ipv6-network CIDR (IPv6), or both"),
        (["--network", NET6], "Invalid value for --network: fd00:10:244::/56 is an IPv6 network"),
        (["--ipv6-network", NET4], "Invalid value for --ipv6-network: 10.244.0.0/16 is an IPv4 network"),
        (["--ipv6-network", "fd00:10:244:1::/56"], "did you mean fd00:10:244::/56"),
        (["--ipv6-network", "nonsense"], "--ipv6-network"),
        (["--ipv6-network", NET6, "--ipv6-subnet-len", "127"], "--ipv6-subnet-len: /127 does not fit"),
        (["--ipv6-network", NET6, "--ipv6-subnet-len", "48"], "--ipv6-subnet-len: /48 does not fit"),
        (["--ipv6-network", NET6, "--subnet-len", "64"], "--subnet-len: it sets the length of the IPv4 subnets"),
        (["--network", NET4, "--ipv6-subnet-len", "64"], "--ipv6-subnet-len: it sets the length of the IPv6 subnets"),
    ],
)
def test_cli_init_usage_errors(tmp_path, args, message):
    store_dir = tmp_path / "s"
    result = _run("init", "--store", f"file://{store_dir}", *args)
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (store_dir / "config").exists()


def test_cli_leases_dual_stack(tmp_path):
    url = f"file://{tmp_path / 's'}"
    cfg = ClusterConfig(NET4, ipv6_network=NET6)
    with open_store(url) as s:
        init_cluster(s, cfg)
        acquire_lease(s, cfg, "192.168.1.10", MAC_A, node_name="node-a", public_ipv6="fd01::10", vtep_mac6=MAC_6A)
        acquire_lease(s, cfg, "192.168.1.11", MAC_B)
    lines = _run("leases", "--store", url).output.splitlines()
    assert lines[0].endswith("; 2 of 256 subnet pairs leased")
    assert lines[1].split() == ["SUBNET", "IPV6-SUBNET", "PUBLIC-IP", "PUBLIC-IPV6", "VTEP-MAC", "VTEP-MAC6", "NODE"]
    assert lines[2].split() == [
        "10.244.0.0/24",
        "fd00:10:244::/64",
        "192.168.1.10",
        "fd01::10",
        MAC_A,
        MAC_6A,
        "node-a",
    ]
    assert lines[3].split() == ["10.244.1.0/24", "fd00:10:244:1::/64", "192.168.1.11", "-", MAC_B, "-", "-"]
    doc = json.loads(_run("leases", "--store", url, "--json").output)
    assert doc["config"]["IPv6Network"] == NET6
    assert [(l["subnet"], l["ipv6Subnet"], l["publicIP"], l["publicIPv6"], l["vtepMAC6"]) for l in doc["leases"]] == [
        ("10.244.0.0/24", "fd00:10:244::/64", "192.168.1.10", "fd01::10", MAC_6A),
        ("10.244.1.0/24", "fd00:10:244:1::/64", "192.168.1.11", "", ""),
    ]


def test_cli_leases_ipv6_only_and_ipv4_only(tmp_path):
    url = f"file://{tmp_path / 's'}"
    cfg = ClusterConfig(ipv6_network=NET6)
    with open_store(url) as s:
        init_cluster(s, cfg)
        acquire_lease(s, cfg, "fd01::10", MAC_A, node_name="node-a")
    lines = _run("leases", "--store", url).output.splitlines()
    assert lines[0] == f"IPv6 network {NET6}, /64 per node, VNI 1, UDP port 8472; 1 of 256 subnets leased"
    assert lines[1].split() == ["IPV6-SUBNET", "PUBLIC-IP", "VTEP-MAC", "NODE"]
    assert lines[2].split() == ["fd00:10:244::/64", "fd01::10", MAC_A, "node-a"]
    # IPv4-only: today's output, byte for byte.
    url4 = f"file://{tmp_path / 's4'}"
    cfg4 = ClusterConfig(NET4)
    with open_store(url4) as s:
        init_cluster(s, cfg4)
        acquire_lease(s, cfg4, "192.168.1.10", MAC_A, node_name="node-a")
        acquire_lease(s, cfg4, "192.168.100.111", MAC_B)
    assert _run("leases", "--store", url4).output == (
        "network 10.244.0.0/16, /24 per node, VNI 1, UDP port 8472; 2 of 256 subnets leased\n"
        "SUBNET         PUBLIC-IP        VTEP-MAC           NODE\n"
        "10.244.0.0/24  192.168.1.10     0a:58:0a:00:00:0a  node-a\n"
        "10.244.1.0/24  192.168.100.111  0a:58:0a:00:00:0b  -\n"
    )
