"""Bad entries written straight into a real etcd: scanned, rejected with reasons, never handed out. Root only.

Each entry is written the way anything outside pycni could write it: a plain
HTTP POST to etcd's JSON gateway (/v3/kv/put, base64 key and value), from
inside the test namespace etcd runs in. Then the leases are read through
pycni's etcd store:

    subnets/10.244.0.0-24   not JSON                          rejected: not JSON
    subnets/10.244.1.0-24   5000-deep nesting (10 KB)         rejected: too large (never a RecursionError)
    subnets/10.244.2.0-24   3000-deep nesting (3 KB)          rejected: nests deeper than 8
    subnets/10.244.3.0-24   wrong types                       rejected: PublicIP must be a string
    subnets/10.244.4.0-24   "PublicIP": "192.0.2.77%eth0"     rejected: carries a zone
    subnets/10.244.5.0-24   "PublicIP": "fd00::77%eth0"       rejected: carries a zone
    subnets/10.99.0.0-24    outside the cluster network        rejected: outside the cluster network
    subnets/10.244.6.0-24   a public IP inside the network     rejected: a pod address
    subnets/10.244.10/11    two leases with one VTEP MAC       each well-formed (accepted); the overlay
                                                               programs neither
"""

from __future__ import annotations

import base64
import http.client
import json
import os

import pytest

import netns
from ipam.cluster import (
    ClusterConfig,
    LeaseExhausted,
    NodeConflict,
    StoreError,
    acquire_lease,
    init_cluster,
    list_leases,
    open_store,
    read_config,
    scan_leases,
)
from pycni.overlay.reconcile import wanted_state
from tests.cluster_helpers import etcd_in_netns, etcd_skip_reason

pytestmark = [
    pytest.mark.integration,
    pytest.mark.etcd,
    pytest.mark.skipif(etcd_skip_reason() is not None, reason=etcd_skip_reason() or ""),
    pytest.mark.usefixtures("stays_in_its_namespace"),
]

NET = "10.244.0.0/16"
MAC_A = "0a:58:0a:00:00:0a"
MAC_B = "0a:58:0a:00:00:0b"
MAC_C = "0a:58:0a:00:00:0c"
MAC_D = "0a:58:0a:00:00:0d"


def lease_value(public_ip: object, mac: object, **extra: object) -> bytes:
    return json.dumps(
        {"PublicIP": public_ip, "BackendType": "vxlan", "BackendData": {"VtepMAC": mac}, **extra}
    ).encode()


# key -> (value, what the rejection says)
BAD = {
    "subnets/10.244.0.0-24": (b"{not json", "not JSON"),
    "subnets/10.244.1.0-24": (b"[" * 5000 + b"]" * 5000, "larger than the 4096 bytes allowed"),
    "subnets/10.244.2.0-24": (b'{"PublicIP": ' + b"[" * 3000, "nests deeper than 8 levels"),
    "subnets/10.244.3.0-24": (
        b'{"PublicIP": 3232235786, "BackendData": {"VtepMAC": ["0a"]}, "NodeName": 7}',
        "PublicIP must be a string",
    ),
    "subnets/10.244.4.0-24": (lease_value("192.0.2.77%eth0", MAC_C), "PublicIP '192.0.2.77%eth0' carries a zone"),
    "subnets/10.244.5.0-24": (lease_value("fd00::77%eth0", MAC_C), "PublicIP 'fd00::77%eth0' carries a zone"),
    "subnets/10.99.0.0-24": (lease_value("192.168.1.30", MAC_C), "outside the cluster network 10.244.0.0/16"),
    "subnets/10.244.6.0-24": (lease_value("10.244.77.7", MAC_C), "PublicIP 10.244.77.7 is inside the cluster network"),
}
GOOD = {
    "subnets/10.244.8.0-24": lease_value("192.168.1.8", MAC_A, NodeName="node-8"),
    "subnets/10.244.9.0-24": lease_value("192.168.1.9", MAC_B),
}
SAME_MAC = {
    "subnets/10.244.10.0-24": lease_value("192.168.1.10", MAC_D, NodeName="node-10"),
    "subnets/10.244.11.0-24": lease_value("192.168.1.11", MAC_D, NodeName="impostor"),
}


@pytest.fixture(scope="module")
def etcd():
    with etcd_in_netns("etcdbad") as member:
        yield member


@pytest.fixture
def prefix() -> str:
    return f"/t-{os.urandom(4).hex()}"


@pytest.fixture
def store(etcd, prefix):
    with netns.enter(etcd.netns):
        s = open_store(etcd.url, prefix=prefix)
    yield s
    s.close()


def etcd_put(member, key: str, value: bytes) -> None:
    """Write key=value with etcd's own JSON gateway (POST /v3/kv/put), as any tool could."""
    body = json.dumps({"key": base64.b64encode(key.encode()).decode(), "value": base64.b64encode(value).decode()})
    with netns.enter(member.netns):
        conn = http.client.HTTPConnection(member.ip, member.client_port, timeout=5)
        try:
            conn.request("POST", "/v3/kv/put", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = response.read()
        finally:
            conn.close()
    assert response.status == 200, answer


def write_all(member, prefix: str, entries: dict[str, bytes]) -> None:
    for key, value in entries.items():
        etcd_put(member, f"{prefix}/{key}", value)


def test_scan_accepts_the_good_entries_and_rejects_each_bad_one_with_a_reason(etcd, prefix, store):
    cfg = ClusterConfig(NET)
    init_cluster(store, cfg)
    write_all(etcd, prefix, {**{key: value for key, (value, _why) in BAD.items()}, **GOOD, **SAME_MAC})

    scan = scan_leases(store, cfg)

    assert scan.revision == store.list("subnets/")[1]
    assert [lease.key for lease in scan.leases] == [*GOOD, *SAME_MAC]
    assert [(l.public_ip, l.vtep_mac, l.node_name) for l in scan.leases[:2]] == [
        ("192.168.1.8", MAC_A, "node-8"),
        ("192.168.1.9", MAC_B, ""),
    ]
    assert sorted(r.key for r in scan.rejected) == sorted(BAD)
    for rejected in scan.rejected:
        _value, why = BAD[rejected.key]
        assert rejected.reason.startswith(f"{rejected.key}: ") and why in rejected.reason, rejected
        assert rejected.mod_revision == store.get(rejected.key).mod_revision
    # The listing existing callers use is not broken by any of them (it raised RecursionError before).
    assert [lease.key for lease in list_leases(store, cfg)[0]] == [*GOOD, *SAME_MAC]

    # The two leases that claim one VTEP MAC reach no kernel entry on any node.
    wanted = wanted_state(scan.leases, "192.168.1.200", "10.244.200.0/24", NET, own_vtep_mac="0a:58:0a:00:00:ff")
    assert [r.subnet for r in wanted.remotes] == ["10.244.8.0/24", "10.244.9.0/24"]
    assert wanted.members == {"192.168.1.8", "192.168.1.9"}
    assert [reason.split(":")[0] for reason in wanted.skipped] == ["10.244.10.0/24", "10.244.11.0/24"]
    assert all(f"VTEP MAC {MAC_D} is also claimed by" in reason for reason in wanted.skipped)


def test_acquire_never_hands_out_a_subnet_whose_key_exists(etcd, prefix, store):
    small = ClusterConfig("10.9.0.0/28", subnet_len=30)  # four subnets: .0, .4, .8, .12
    init_cluster(store, small)
    write_all(
        etcd,
        prefix,
        {
            "subnets/10.9.0.0-30": b"[" * 5000 + b"]" * 5000,
            "subnets/10.9.0.4-030": lease_value("192.168.1.4", MAC_A),  # not canonical, still taken
            "subnets/10.9.0.8-30": lease_value("192.0.2.77%eth0", MAC_B),
        },
    )
    assert scan_leases(store, small).leases == []
    lease = acquire_lease(store, small, "192.168.1.20", MAC_C, node_name="node-20")
    assert lease.subnet == "10.9.0.12/30"
    with pytest.raises(LeaseExhausted, match="all 4 /30 subnets"):
        acquire_lease(store, small, "192.168.1.21", MAC_D, node_name="node-21")
    assert acquire_lease(store, small, "192.168.1.20", MAC_C, node_name="node-20") == lease


def test_a_deep_cluster_configuration_is_a_store_error(etcd, prefix, store):
    etcd_put(etcd, f"{prefix}/config", b'{"Network": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    with pytest.raises(StoreError, match="cluster configuration is invalid.*nests deeper than 8 levels"):
        read_config(store)
    etcd_put(etcd, f"{prefix}/config", b'{"Network": "10.244.0.0/16", "SubnetLen": "24"}')
    with pytest.raises(StoreError, match='"SubnetLen" must be a whole number'):
        read_config(store)


def test_another_node_name_on_a_held_public_ip_is_a_conflict(etcd, prefix, store):
    cfg = ClusterConfig(NET)
    init_cluster(store, cfg)
    etcd_put(etcd, f"{prefix}/subnets/10.244.3.0-24", lease_value("192.168.1.3", MAC_A, NodeName="node-a"))
    with pytest.raises(
        NodeConflict,
        match=r"'node-a'.*'node-b'.*pycni agent leave --store URL --public-ip "
        r"192\.168\.1\.3",
    ):
        acquire_lease(store, cfg, "192.168.1.3", MAC_B, node_name="node-b")
    # Written by an older agent or flannel (no NodeName): adopted.
    etcd_put(etcd, f"{prefix}/subnets/10.244.4.0-24", lease_value("192.168.1.4", MAC_C))
    adopted = acquire_lease(store, cfg, "192.168.1.4", MAC_C, node_name="node-c")
    assert (adopted.subnet, adopted.node_name) == ("10.244.4.0/24", "node-c")
