"""Many nodes leasing subnets at once, against the file store and a real etcd. Root only (etcd in a namespace).

60 processes call acquire_lease() at the same moment in a network of 256
subnets: every one gets a subnet, no subnet twice, and the writes each node
makes (txn + lease_grant + lease_revoke + put, from its store's stats()) stay
O(1): one claim request that tries the lowest free subnets and then random
ones, and on etcd one lease grant for all of a call's claims. The claims'
lease handling is checked on its own: granted once, revoked when no claim
wins, and a claim whose answer was lost keeps the key it created (and only
that one).
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
from ipam.cluster import ClusterConfig, init_cluster, list_leases, open_store
from tests.cluster_helpers import etcd_in_netns, etcd_skip_reason
from tests.integration.test_etcd_lost_answer import LosingProxy

pytestmark = [
    pytest.mark.integration,
    pytest.mark.etcd,
    pytest.mark.skipif(etcd_skip_reason() is not None, reason=etcd_skip_reason() or ""),
    pytest.mark.usefixtures("stays_in_its_namespace"),
]

NODES = 60
TTL = 60
WRITES = ("txn", "lease_grant", "lease_revoke", "put")


@pytest.fixture(scope="module")
def etcd():
    with etcd_in_netns("etcdcl") as member:
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
    return Backend(member.url, f"/c-{os.urandom(4).hex()}", member.netns)


def _claimer(backend: Backend, cfg_json: str, public_ip: str, mac: str, barrier, results) -> None:
    try:
        from ipam.cluster import ClusterConfig, acquire_lease

        store = backend.open(timeout=30)
        cfg = ClusterConfig.from_json(cfg_json)
        barrier.wait(timeout=60)
        lease = acquire_lease(store, cfg, public_ip, mac, node_name=f"node-{public_ip}", ttl=TTL)
        requests = store.stats()["requests"]
        store.close()
        results.put((public_ip, lease.subnet, requests))
    except BaseException as err:  # report, never hang the parent
        results.put((public_ip, f"ERROR {type(err).__name__}: {err}", {}))


def _race(backend: Backend, cfg: ClusterConfig, count: int, timeout: float = 120.0) -> dict[str, tuple[str, dict]]:
    """acquire_lease() in count processes released together; {public_ip: (subnet or "ERROR ...", requests)}."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(count)
    results = ctx.Queue()
    ips = [f"192.168.{10 + i // 200}.{1 + i % 200}" for i in range(count)]
    procs = [
        ctx.Process(
            target=_claimer,
            args=(backend, cfg.to_json(), address, f"0a:58:00:00:{i // 256:02x}:{i % 256:02x}", barrier, results),
            daemon=True,
        )
        for i, address in enumerate(ips)
    ]
    found: dict[str, tuple[str, dict]] = {}
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        while len(found) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                address, subnet, requests = results.get(timeout=remaining)
            except queue.Empty:
                break
            found[address] = (subnet, requests)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(timeout=5)
        results.close()
    return found


def test_sixty_nodes_at_once_get_distinct_subnets_with_few_writes(backend):
    cfg = ClusterConfig("10.244.0.0/16")  # 256 subnets of /24
    with backend.open() as store:
        init_cluster(store, cfg)
    results = _race(backend, cfg, NODES)
    assert len(results) == NODES, f"{NODES - len(results)} claimers did not answer"
    errors = {ip_: subnet for ip_, (subnet, _) in results.items() if subnet.startswith("ERROR")}
    assert not errors, errors
    subnets = [subnet for subnet, _ in results.values()]
    assert len(set(subnets)) == NODES, "a subnet was leased twice"
    with backend.open() as store:
        assert {(l.public_ip, l.subnet) for l in list_leases(store, cfg)[0]} == {
            (ip_, subnet) for ip_, (subnet, _) in results.items()
        }
    writes = [sum(requests.get(op, 0) for op in WRITES) for _, requests in results.values()]
    average = sum(writes) / len(writes)
    totals = {op: sum(requests.get(op, 0) for _, requests in results.values()) for op in WRITES + ("range",)}
    print(
        f"\n{backend.url.split(':')[0]}: {NODES} nodes, writes per node: average {average:.2f}, max {max(writes)}; "
        f"totals {totals}"
    )
    assert average <= 3, (average, totals)
    assert max(writes) <= 6, writes
    if backend.url.startswith("etcd"):
        # one lease per acquire_lease() call, whatever the conflicts; none granted in vain
        assert {requests.get("lease_grant", 0) for _, requests in results.values()} == {1}
        assert totals["lease_revoke"] == 0


def test_alone_a_node_still_gets_the_lowest_free_subnet(backend):
    from ipam.cluster import acquire_lease

    cfg = ClusterConfig("10.244.0.0/16")
    with backend.open() as store:
        init_cluster(store, cfg)
        store.put("subnets/10.244.0.0-24", b"taken by anything")
        before = store.stats()["requests"]
        lease = acquire_lease(store, cfg, "192.168.1.10", "0a:58:0a:00:00:0a", ttl=TTL)
        assert lease.subnet == "10.244.1.0/24"
        after = store.stats()["requests"]
        writes = {op: after[op] - before.get(op, 0) for op in WRITES if after.get(op, 0) != before.get(op, 0)}
        assert writes == ({"txn": 1, "lease_grant": 1} if backend.url.startswith("etcd") else {"txn": 1})


# -- the claims' lease on etcd ------------------------------------------------------------------


def _lease_ttl(member, lease_id: int) -> int:
    with netns.enter(member.netns):
        conn = http.client.HTTPConnection(member.ip, member.client_port, timeout=5)
        try:
            conn.request("POST", "/v3/lease/timetolive", body=json.dumps({"ID": str(lease_id)}))
            answer = json.loads(conn.getresponse().read())
        finally:
            conn.close()
    return int(answer.get("TTL", -1))


def _raw_kv(member, prefix: str, key: str) -> dict:
    with netns.enter(member.netns):
        conn = http.client.HTTPConnection(member.ip, member.client_port, timeout=5)
        try:
            full = base64.b64encode(f"{prefix}/{key}".encode()).decode()
            conn.request("POST", "/v3/kv/range", body=json.dumps({"key": full}))
            answer = json.loads(conn.getresponse().read())
        finally:
            conn.close()
    kvs = answer.get("kvs") or []
    return kvs[0] if kvs else {}


def test_claims_grant_one_lease_and_revoke_it_when_no_claim_wins(etcd):
    prefix = f"/c-{os.urandom(4).hex()}"
    backend = Backend(etcd.url, prefix, etcd.netns)
    with backend.open() as store:
        for i in range(4):
            store.put(f"subnets/s{i}", b"taken")
        claims = store.claims(ttl=TTL)
        with claims:
            assert claims.create_first(["subnets/s0", "subnets/s1"], b"mine") is None
            assert claims.create_first(["subnets/s2", "subnets/s3"], b"mine") is None
            lease_id = claims._lease
            assert _lease_ttl(etcd, lease_id) > 0
        requests = store.stats()["requests"]
        assert (requests.get("lease_grant"), requests.get("txn"), requests.get("lease_revoke")) == (1, 2, 1)
        assert _lease_ttl(etcd, lease_id) == -1  # revoked
        with store.claims(ttl=TTL) as claims:
            entry = claims.create_first(["subnets/s0", "subnets/s9", "subnets/s8"], b"mine")
            lease_id = claims._lease
        assert entry is not None and (entry.key, entry.value, entry.version) == ("subnets/s9", b"mine", 1)
        assert entry == store.get("subnets/s9") and store.get("subnets/s8") is None
        assert _lease_ttl(etcd, lease_id) > 0 and int(_raw_kv(etcd, prefix, "subnets/s9")["lease"]) == lease_id
        assert store.ttl("subnets/s9") == TTL


@pytest.mark.parametrize("keep_alive", [True, False], ids=["reconnect", "failover"])
@pytest.mark.parametrize("ttl", [TTL, None], ids=["lease", "no-ttl"])
def test_a_claim_whose_answer_was_lost_keeps_only_the_key_it_created(etcd, keep_alive, ttl):
    prefix = f"/lost-{os.urandom(4).hex()}"
    proxy = LosingProxy(etcd.netns, (etcd.ip, etcd.client_port), keep_alive=keep_alive)
    try:
        with netns.enter(etcd.netns):
            store = open_store(f"etcd://{proxy.endpoint},{etcd.endpoint}", prefix=prefix, timeout=5)
            other = open_store(etcd.url, prefix=prefix)
        try:
            assert store.get("nothing") is None
            other.put("subnets/a", b"theirs")
            with store.claims(ttl=ttl) as claims:
                proxy.arm()
                entry = claims.create_first(["subnets/a", "subnets/b", "subnets/c"], b"mine")
            assert len(proxy.lost) == 1 and proxy.txns() >= 1
            assert entry is not None and (entry.key, entry.value) == ("subnets/b", b"mine")
            entries, _ = other.list("subnets/")
            assert [(e.key, e.value) for e in entries] == [("subnets/a", b"theirs"), ("subnets/b", b"mine")]
            assert entry.mod_revision == other.get("subnets/b").mod_revision
            if ttl is not None:
                assert other.ttl("subnets/b") == ttl  # the claims' lease stayed with the key
        finally:
            store.close()
            other.close()
    finally:
        proxy.close()
