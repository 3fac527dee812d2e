"""Dual-stack leases on a real etcd (and the file store): racing claims, raw bad entries, renew and release. Root only.

30 processes call acquire_lease() at the same moment in a dual-stack cluster
(256 pairs): every one gets one IPv4 and one IPv6 subnet, the same index of
each pool, under one key; no subnet of either family twice; and the writes
each node makes (txn + lease_grant + lease_revoke + put, from its store's
stats()) stay O(1), as for IPv4-only clusters (tests/integration/
test_lease_contention.py). Entries written straight into etcd with its JSON
gateway, the way any tool could, are rejected with a reason naming the key
and the field, and their subnets are never handed out.
"""

from __future__ import annotations

import base64
import http.client
import json
import multiprocessing
import os
import queue
import signal
import time

import pytest

import netns
from ipam.cluster import (
    ClusterConfig,
    LeaseExhausted,
    LeaseLost,
    acquire_lease,
    init_cluster,
    list_leases,
    open_store,
    release_lease,
    renew_lease,
    scan_leases,
)
from tests.cluster_helpers import etcd_in_netns, etcd_skip_reason

pytestmark = [
    pytest.mark.integration,
    pytest.mark.etcd,
    pytest.mark.skipif(etcd_skip_reason() is not None, reason=etcd_skip_reason() or ""),
    pytest.mark.usefixtures("stays_in_its_namespace"),
]

NODES = 30
TTL = 60
WRITES = ("txn", "lease_grant", "lease_revoke", "put")
NET4 = "10.244.0.0/16"
NET6 = "fd00:10:244::/56"
MAC_A = "0a:58:0a:00:00:0a"
MAC_B = "0a:58:0a:00:00:0b"
MAC_C = "0a:58:0a:00:00:0c"
MAC_6A = "0a:58:0a:00:06:0a"


@pytest.fixture(scope="module")
def etcd():
    with etcd_in_netns("etcdds") as member:
        yield member


class Backend:
    def __init__(self, url: str, prefix: str, netns_path: str | None) -> None:
        self.url, self.prefix, self.netns_path = url, prefix, netns_path

    def open(self, **kwargs):
        if self.netns_path is None:
            return open_store(self.url, prefix=self.prefix, **kwargs)
        with netns.enter(self.netns_path):
            return open_store(self.url, prefix=self.prefix, **kwargs)


@pytest.fixture(params=["file", "etcd"])
def backend(request, tmp_path):
    if request.param == "file":
        return Backend(f"file://{tmp_path / 'store'}", "/pycni", None)
    member = request.getfixturevalue("etcd")
    return Backend(member.url, f"/ds-{os.urandom(4).hex()}", member.netns)


def _claimer(backend: Backend, cfg_json: str, i: int, barrier, results) -> None:
    public_ip = f"192.168.10.{i + 1}"
    try:
        store = backend.open(timeout=30)
        cfg = ClusterConfig.from_json(cfg_json)
        barrier.wait(timeout=60)
        lease = acquire_lease(
            store,
            cfg,
            public_ip,
            f"0a:58:00:00:04:{i:02x}",
            node_name=f"node-{i}",
            ttl=TTL,
            public_ipv6=f"fd01::{i + 1:x}",
            vtep_mac6=f"0a:58:00:00:06:{i:02x}",
        )
        requests = store.stats()["requests"]
        store.close()
        results.put((public_ip, (lease.subnet, lease.ipv6_subnet, lease.key), requests))
    except BaseException as err:  # report, never hang the parent
        results.put((public_ip, f"ERROR {type(err).__name__}: {err}", {}))


def _race(backend: Backend, cfg: ClusterConfig, count: int, timeout: float = 120.0) -> dict[str, tuple]:
    """acquire_lease() in count processes released together; {public_ip: ((v4, v6, key) or "ERROR ...", requests)}."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(count)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_claimer, args=(backend, cfg.to_json(), i, barrier, results), daemon=True)
        for i in range(count)
    ]
    found: dict[str, tuple] = {}
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        while len(found) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                address, lease, requests = results.get(timeout=remaining)
            except queue.Empty:
                break
            found[address] = (lease, requests)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(timeout=5)
        results.close()
    return found


def test_thirty_dual_stack_nodes_at_once_share_no_subnet_with_few_writes(backend):
    cfg = ClusterConfig(NET4, ipv6_network=NET6)  # 256 pairs
    with backend.open() as store:
        init_cluster(store, cfg)
    results = _race(backend, cfg, NODES)
    assert len(results) == NODES, f"{NODES - len(results)} claimers did not answer"
    errors = {ip_: lease for ip_, (lease, _) in results.items() if isinstance(lease, str)}
    assert not errors, errors
    leases = [lease for lease, _ in results.values()]
    assert len({v4 for v4, _v6, _key in leases}) == NODES, "an IPv4 subnet was leased twice"
    assert len({v6 for _v4, v6, _key in leases}) == NODES, "an IPv6 subnet was leased twice"
    assert all(cfg.pool(4).index_of(v4) == cfg.pool(6).index_of(v6) for v4, v6, _key in leases)
    with backend.open() as store:
        scan = scan_leases(store, cfg)
        assert scan.rejected == []
        assert {(l.public_ip, (l.subnet, l.ipv6_subnet, l.key)) for l in scan.leases} == {
            (ip_, lease) for ip_, (lease, _) in results.items()
        }
        assert all(l.public_ipv6 and l.vtep_mac6 for l in scan.leases)
        assert len(store.list("subnets/")[0]) == NODES  # one key per node
    writes = [sum(requests.get(op, 0) for op in WRITES) for _, requests in results.values()]
    average = sum(writes) / len(writes)
    totals = {op: sum(requests.get(op, 0) for _, requests in results.values()) for op in WRITES + ("range",)}
    print(
        f"\n{backend.url.split(':')[0]}: {NODES} dual-stack nodes, writes per node: average {average:.2f}, "
        f"max {max(writes)}; totals {totals}"
    )
    assert average <= 3, (average, totals)
    assert max(writes) <= 6, writes
    if backend.url.startswith("etcd"):
        assert {requests.get("lease_grant", 0) for _, requests in results.values()} == {1}
        assert totals["lease_revoke"] == 0


def test_renew_and_release_the_pair(backend):
    cfg = ClusterConfig(NET4, ipv6_network=NET6)
    with backend.open() as store:
        init_cluster(store, cfg)
        a = acquire_lease(
            store, cfg, "192.168.1.10", MAC_A, node_name="a", ttl=TTL, public_ipv6="fd01::10", vtep_mac6=MAC_6A
        )
        assert a.key == "subnets/10.244.0.0-24&fd00:10:244::-64" and store.ttl(a.key) == TTL
        assert renew_lease(store, a, ttl=TTL) == a
        store.delete(a.key)  # lapsed
        assert renew_lease(store, a, ttl=TTL).key == a.key and store.ttl(a.key) == TTL
        assert release_lease(store, "192.168.1.10") is True
        assert store.list("subnets/")[0] == []
        b = acquire_lease(store, cfg, "192.168.1.11", MAC_B, node_name="b")
        assert b.key == a.key
        with pytest.raises(LeaseLost, match="192.168.1.11"):
            renew_lease(store, a, ttl=TTL)


# -- entries written by anything -------------------------------------------------------------------


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


def dual_value(
    public_ip: object = "192.168.1.20",
    mac: object = MAC_C,
    public_ipv6: object = "fd01::20",
    mac6: object = MAC_6A,
    **extra: object,
) -> bytes:
    return json.dumps(
        {
            "PublicIP": public_ip,
            "PublicIPv6": public_ipv6,
            "BackendType": "vxlan",
            "BackendData": {"VtepMAC": mac},
            "BackendV6Data": {"VtepMAC": mac6},
            **extra,
        }
    ).encode()


BAD = {  # in a /28 + /124 dual-stack cluster of 4 pairs: index i is 10.9.0.{4i}/30 with fd00::{4i}/126
    "subnets/10.9.0.0-30&fd00::-126": (
        dual_value(public_ipv6="fd01::20%eth0"),
        "PublicIPv6 'fd01::20%eth0' carries a zone",
    ),
    "subnets/fd00::4-126": (dual_value(), "the key holds only the IPv6 subnet fd00::4/126"),
    "subnets/10.9.0.8-30&fd00:0::8-126": (dual_value(), "not the canonical key"),
}
GOOD = {
    "subnets/10.9.0.12-30&fd00::c-126": dual_value("192.168.1.23", MAC_B, "fd01::23", MAC_6A, NodeName="node-23"),
}


def test_bad_dual_entries_are_rejected_and_their_subnets_stay_taken(etcd):
    prefix = f"/dsbad-{os.urandom(4).hex()}"
    cfg = ClusterConfig("10.9.0.0/28", 30, ipv6_network="fd00::/124", ipv6_subnet_len=126)
    with netns.enter(etcd.netns):
        store = open_store(etcd.url, prefix=prefix)
    try:
        init_cluster(store, cfg)
        for key, value in {**{k: v for k, (v, _why) in BAD.items()}, **GOOD}.items():
            etcd_put(etcd, f"{prefix}/{key}", value)
        scan = scan_leases(store, cfg)
        assert [lease.key for lease in scan.leases] == list(GOOD)
        assert (scan.leases[0].public_ipv6, scan.leases[0].vtep_mac6) == ("fd01::23", MAC_6A)
        assert sorted(r.key for r in scan.rejected) == sorted(BAD)
        for rejected in scan.rejected:
            assert rejected.reason.startswith(f"{rejected.key}: ") and BAD[rejected.key][1] in rejected.reason, rejected
        # Every index is touched by some key, readable or not: nothing is left to hand out.
        with pytest.raises(LeaseExhausted, match="room for 4 leases"):
            acquire_lease(store, cfg, "192.168.1.30", MAC_A, node_name="node-30")
        assert [lease.key for lease in list_leases(store, cfg)[0]] == list(GOOD)
    finally:
        store.close()
