"""The cluster store against a real etcd (Debian's etcd-server 3.4) in test namespaces. Root only.

The lease tests run against both stores (file and etcd). etcd runs inside a
namespace these tests create, listening on 127.0.0.1 there (or on veth
addresses for the 3-member cluster); clients are built inside that namespace
and used from the test thread, which stays in its own namespace.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

import netns
from ipam.cluster import (
    ClusterConfig,
    Compacted,
    ConfigConflict,
    LeaseExhausted,
    LeaseLost,
    StoreUnavailable,
    acquire_lease,
    init_cluster,
    list_leases,
    open_store,
    read_config,
    release_lease,
    renew_lease,
)
from tests.cluster_helpers import (
    etcd_cluster,
    etcd_in_netns,
    etcd_skip_reason,
    fresh_netns,
    make_tls_certs,
    race_acquire_leases,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.etcd,
    pytest.mark.skipif(etcd_skip_reason() is not None, reason=etcd_skip_reason() or ""),
    pytest.mark.usefixtures("stays_in_its_namespace"),
]

MAC_A = "0a:58:0a:00:00:0a"
MAC_B = "0a:58:0a:00:00:0b"


@pytest.fixture(scope="module")
def etcd():
    with etcd_in_netns("etcdt") as member:
        yield member


def _open_etcd(member, prefix, **kwargs):
    with netns.enter(member.netns):
        return open_store(member.url, prefix=prefix, **kwargs)


class Backend:
    """How a test reaches one store: its URL, prefix and namespace (for other processes)."""

    def __init__(self, kind, url, prefix, netns_path):
        self.kind, self.url, self.prefix, self.netns_path = kind, url, prefix, netns_path

    def open(self):
        if self.netns_path is None:
            return open_store(self.url, prefix=self.prefix)
        with netns.enter(self.netns_path):
            return open_store(self.url, prefix=self.prefix)


@pytest.fixture(params=["file", "etcd"])
def backend(request, tmp_path):
    if request.param == "file":
        return Backend("file", f"file://{tmp_path / 'store'}", "/pycni", None)
    member = request.getfixturevalue("etcd")
    return Backend("etcd", member.url, f"/t-{os.urandom(4).hex()}", member.netns)


@pytest.fixture
def store(backend):
    s = backend.open()
    yield s
    s.close()


@pytest.fixture
def cfg(store):
    c = ClusterConfig("10.244.0.0/16")
    assert init_cluster(store, c) is True
    return c


# -- the Store contract, both backends ----------------------------------------------------


def test_create_put_replace_delete_and_revisions(store):
    _, rev0 = store.list("")
    assert store.create("a/b", b"one") is True
    assert store.create("a/b", b"two") is False
    e1 = store.get("a/b")
    assert (e1.value, e1.version) == (b"one", 1) and e1.mod_revision > rev0
    rev2 = store.put("a/b", bytes(range(256)))
    e2 = store.get("a/b")
    assert (e2.value, e2.version, e2.mod_revision) == (bytes(range(256)), 2, rev2)
    assert store.replace("a/b", b"three", e1.mod_revision) is False
    assert store.replace("a/b", b"three", e2.mod_revision) is True
    store.put("a/c", b"")
    store.put("ab", b"x")
    entries, rev = store.list("a/")
    assert [(e.key, e.value) for e in entries] == [("a/b", b"three"), ("a/c", b"")]
    assert rev == max(e.mod_revision for e in entries) + 1  # "ab" came last
    assert store.delete("a/b") is True and store.delete("a/b") is False
    assert store.get("a/b") is None
    assert store.list("")[1] == rev + 1
    assert store.refresh("a/c") is True and store.refresh("a/b") is False


def test_wait_times_out_and_wakes(store, backend):
    _, rev = store.list("w/")
    start = time.monotonic()
    assert store.wait("w/", rev, timeout=0.3) is None
    assert 0.25 <= time.monotonic() - start < 2
    other = backend.open()  # a second client makes the change
    writers = [
        threading.Timer(0.1, lambda: other.put("x/outside", b"1")),
        threading.Timer(0.3, lambda: other.put("w/inside", b"1")),
    ]
    for w in writers:
        w.start()
    try:
        start = time.monotonic()
        woke = store.wait("w/", rev, timeout=5)
        elapsed = time.monotonic() - start
    finally:
        for w in writers:
            w.join()
        other.close()
    assert woke == store.get("w/inside").mod_revision
    assert 0.25 <= elapsed < 3


def test_lease_lifecycle(store, cfg):
    a = acquire_lease(store, cfg, "192.168.1.10", MAC_A, node_name="a")
    b = acquire_lease(store, cfg, "192.168.1.11", MAC_B, node_name="b", preferred_subnet="10.244.9.0/24")
    assert (a.subnet, b.subnet) == ("10.244.0.0/24", "10.244.9.0/24")
    assert acquire_lease(store, cfg, "192.168.1.10", "0a:58:0a:00:00:99").subnet == a.subnet
    leases, _ = list_leases(store)
    assert [(l.subnet, l.public_ip, l.vtep_mac) for l in leases] == [
        ("10.244.0.0/24", "192.168.1.10", "0a:58:0a:00:00:99"),
        ("10.244.9.0/24", "192.168.1.11", MAC_B),
    ]
    assert release_lease(store, "192.168.1.10") is True
    c = acquire_lease(store, cfg, "192.168.1.12", MAC_A)
    assert c.subnet == a.subnet
    assert read_config(store) == cfg
    assert init_cluster(store, ClusterConfig("10.244.0.0/16")) is False
    with pytest.raises(ConfigConflict, match="10.244.0.0/16.*10.250.0.0/16"):
        init_cluster(store, ClusterConfig("10.250.0.0/16"))


def test_lease_exhaustion(store):
    small = ClusterConfig("10.9.0.0/28", subnet_len=30)
    for i in range(4):
        acquire_lease(store, small, f"192.168.1.{i + 1}", MAC_A)
    with pytest.raises(LeaseExhausted, match="all 4 /30 subnets of 10.9.0.0/28"):
        acquire_lease(store, small, "192.168.1.99", MAC_B)


def test_eight_processes_racing_get_different_subnets(backend, store, cfg):
    ips = [f"192.168.2.{i + 10}" for i in range(8)]
    results = race_acquire_leases(backend.url, cfg, ips, prefix=backend.prefix, netns_path=backend.netns_path)
    assert sorted(results) == sorted(ips), results
    assert not [r for r in results.values() if r.startswith("ERROR")], results
    assert set(results.values()) == {f"10.244.{i}.0/24" for i in range(8)}
    assert {(l.public_ip, l.subnet) for l in list_leases(store)[0]} == set(results.items())
    # Racing again, the same nodes get the same subnets back.
    assert race_acquire_leases(backend.url, cfg, ips, prefix=backend.prefix, netns_path=backend.netns_path) == results


# -- etcd specifics -------------------------------------------------------------------------


def _compact(member, revision: int) -> None:
    with netns.enter(member.netns):
        conn = http.client.HTTPConnection(member.ip, member.client_port, timeout=5)
        try:
            conn.request("POST", "/v3/kv/compaction", body=json.dumps({"revision": str(revision), "physical": True}))
            response = conn.getresponse()
            assert response.status == 200, response.read()
            response.read()
        finally:
            conn.close()


def test_store_built_in_a_namespace_works_from_other_threads(etcd):
    store = _open_etcd(etcd, f"/t-{os.urandom(4).hex()}")
    errors = []

    def use():
        try:
            store.put("k", b"from a thread in the root namespace")
            assert store.get("k").value == b"from a thread in the root namespace"
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    try:
        threads = [threading.Thread(target=use) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        assert errors == []
        # The same URL from another namespace reaches nothing there: the store is bound to its namespace.
        with fresh_netns("etcdo") as elsewhere:
            with netns.enter(elsewhere):
                outside = open_store(etcd.url, timeout=1)
            try:
                with pytest.raises(StoreUnavailable, match="connection refused"):
                    outside.get("k")
                assert store.get("k") is not None
            finally:
                outside.close()
    finally:
        store.close()


def test_compacted_watch_makes_the_caller_relist(etcd):
    store = _open_etcd(etcd, f"/t-{os.urandom(4).hex()}")
    try:
        store.put("subnets/a", b"1")
        _, old = store.list("subnets/")
        store.put("subnets/a", b"2")
        store.put("subnets/b", b"3")
        _, now = store.list("subnets/")
        _compact(etcd, now)
        with pytest.raises(Compacted, match="list again") as exc:
            store.wait("subnets/", old, timeout=2)
        assert exc.value.compact_revision == now
        entries, rev = store.list("subnets/")  # re-list: everything is there
        assert [(e.key, e.value) for e in entries] == [("subnets/a", b"2"), ("subnets/b", b"3")]
        assert store.wait("subnets/", rev, timeout=0.2) is None
        store.delete("subnets/b")
        assert store.wait("subnets/", rev, timeout=2) == rev + 1
    finally:
        store.close()


def test_ttl_expires_unless_refreshed(etcd):
    store = _open_etcd(etcd, f"/t-{os.urandom(4).hex()}")
    cfg = ClusterConfig("10.244.0.0/16")
    try:
        store.put("ttl/forgotten", b"x", ttl=2)
        store.put("ttl/kept", b"x", ttl=2)
        store.put("ttl/forever", b"x")
        gone_lease = acquire_lease(store, cfg, "192.168.3.1", MAC_A, ttl=2)
        kept_lease = acquire_lease(store, cfg, "192.168.3.2", MAC_B, ttl=2)
        deadline = time.monotonic() + 8
        for _ in range(80):
            assert store.refresh("ttl/kept") is True
            kept_lease = renew_lease(store, kept_lease, ttl=2)
            if store.get("ttl/forgotten") is None and store.get(gone_lease.key) is None:
                break
            assert time.monotonic() < deadline, "the unrefreshed keys did not expire"
            time.sleep(0.5)
        assert store.get("ttl/kept") is not None and store.get("ttl/forever") is not None
        assert store.refresh("ttl/forgotten") is False
        assert [l.public_ip for l in list_leases(store)[0]] == ["192.168.3.2"]
        # The expired node's subnet went to another node: renewing the old lease is refused.
        taker = acquire_lease(store, cfg, "192.168.3.3", MAC_B)
        assert taker.subnet == gone_lease.subnet
        with pytest.raises(LeaseLost, match="192.168.3.3"):
            renew_lease(store, gone_lease, ttl=2)
    finally:
        store.close()


def test_endpoints_are_tried_in_order(etcd):
    with netns.enter(etcd.netns):
        store = open_store(f"etcd://127.0.0.1:1,127.0.0.2:1,{etcd.endpoint}", prefix="/t-order", timeout=2)
        down = open_store("etcd://127.0.0.1:1,127.0.0.1:2", timeout=1)
    try:
        assert store.put("k", b"v") > 0
        assert store.get("k").value == b"v"
        assert store.current_endpoint == store.endpoints[2]  # remembered: later requests go straight there
        _, rev = store.list("")
        assert store.wait("", rev, timeout=0.1) is None
        with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1:1: connection refused; .*127\.0\.0\.1:2"):
            down.get("k")
        with pytest.raises(StoreUnavailable):
            down.wait("", 0, timeout=0.5)
    finally:
        store.close()
        down.close()


def test_wait_reports_a_lost_connection(etcd, tmp_path):
    """A member that goes away during a watch: StoreUnavailable, not a hang."""
    from tests.cluster_helpers import etcd_member

    with etcd_member(etcd.netns, "127.0.0.2", name="short", workdir=str(tmp_path)) as member:
        with netns.enter(etcd.netns):
            store = open_store(member.url)
        try:
            _, rev = store.list("")
            stopper = threading.Timer(0.3, member.stop)
            stopper.start()
            try:
                with pytest.raises(StoreUnavailable, match="lost the watch connection"):
                    store.wait("", rev, timeout=10)
            finally:
                stopper.join()
        finally:
            store.close()


def test_three_member_cluster_survives_a_member_stopping():
    with etcd_cluster(3, prefix="etcdc") as cluster:
        with netns.enter(cluster.client_netns):
            store = open_store(cluster.url, timeout=5)
            watcher = open_store(cluster.url, timeout=5)
        try:
            cfg = ClusterConfig("10.244.0.0/16")
            assert init_cluster(store, cfg)
            a = acquire_lease(store, cfg, "192.168.4.1", MAC_A)
            assert store.current_endpoint == store.endpoints[0]
            cluster.members[0].stop()  # the member the client is using
            b = acquire_lease(store, cfg, "192.168.4.2", MAC_B)
            assert (a.subnet, b.subnet) == ("10.244.0.0/24", "10.244.1.0/24")
            assert [l.public_ip for l in list_leases(store)[0]] == ["192.168.4.1", "192.168.4.2"]
            assert store.current_endpoint != store.endpoints[0]
            # Watching still works through the remaining members.
            _, rev = watcher.list("subnets/")
            writer = threading.Timer(0.2, lambda: release_lease(store, "192.168.4.1"))
            writer.start()
            try:
                assert watcher.wait("subnets/", rev, timeout=5) == rev + 1
            finally:
                writer.join()
            # With two of three members gone there is no quorum: a clear error, not a hang.
            cluster.members[1].stop()
            with netns.enter(cluster.client_netns):
                no_quorum = open_store(cluster.url, timeout=1.5)
            try:
                start = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    no_quorum.put("k", b"v")
                assert time.monotonic() - start < 6
            finally:
                no_quorum.close()
        finally:
            store.close()
            watcher.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates")
def test_tls_with_client_certificates(tmp_path):
    certs = make_tls_certs(str(tmp_path / "pki"), ["127.0.0.1"])
    with etcd_in_netns("etcds", tls=certs) as member:
        with netns.enter(member.netns):
            good = open_store(member.url, tls=certs.client_files())
            no_cert = open_store(member.url, tls=certs.client_files(with_client_cert=False), timeout=2)
            plain = open_store(member.url, timeout=2)
        try:
            cfg = ClusterConfig("10.244.0.0/16")
            assert init_cluster(good, cfg)
            assert acquire_lease(good, cfg, "192.168.5.1", MAC_A).subnet == "10.244.0.0/24"
            _, rev = good.list("")
            assert good.wait("", rev, timeout=0.2) is None
            with pytest.raises(StoreUnavailable, match="client certificate"):
                no_cert.get("config")
            with pytest.raises(StoreUnavailable, match="TLS"):
                plain.get("config")
        finally:
            for s in (good, no_cert, plain):
                s.close()
        # The command line with TLS options, as a real process in the namespace.
        url = member.url
        args = [
            "--store",
            url,
            "--etcd-cafile",
            certs.ca,
            "--etcd-certfile",
            certs.client_cert,
            "--etcd-keyfile",
            certs.client_key,
        ]
        done = _cli(member.netns, "leases", *args, "--json")
        assert done.returncode == 0, done.stderr
        assert [l["publicIP"] for l in json.loads(done.stdout)["leases"]] == ["192.168.5.1"]
        refused = _cli(member.netns, "leases", "--store", url, "--etcd-cafile", certs.ca, "--timeout", "2")
        assert refused.returncode == 1 and "client certificate" in refused.stderr
        assert refused.stderr.count("\n") == 1


# A plain etcd:// store warns once per process on stderr (tests/integration/test_store_trust.py); the
# error that ends a command is still one line.
_PLAIN_HTTP_WARNING = "is used without TLS: lease traffic is unauthenticated"


def _error_lines(stderr: str) -> int:
    return sum(1 for line in stderr.splitlines(keepends=True) if _PLAIN_HTTP_WARNING not in line)


def _cli(netns_path: str, *args: str) -> subprocess.CompletedProcess[str]:
    code = "from pycni.cluster_cmd import cluster; cluster(prog_name='pycni cluster')"
    return subprocess.run(
        ["nsenter", f"--net={netns_path}", "--", sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_init_against_etcd(etcd):
    prefix = f"/t-{os.urandom(4).hex()}"
    base = ["--store", etcd.url, "--etcd-prefix", prefix]
    first = _cli(etcd.netns, "init", *base, "--network", "10.50.0.0/16", "--subnet-len", "26", "--vni", "9")
    assert first.returncode == 0, first.stderr
    assert "room for 1024 nodes" in first.stdout
    again = _cli(etcd.netns, "init", *base, "--network", "10.50.0.0/16", "--subnet-len", "26", "--vni", "9")
    assert again.returncode == 0 and "already initialised" in again.stdout
    conflict = _cli(etcd.netns, "init", *base, "--network", "10.50.0.0/16")
    assert conflict.returncode == 1 and _error_lines(conflict.stderr) == 1 and "VNI 9" in conflict.stderr
    store = _open_etcd(etcd, prefix)
    try:
        assert read_config(store) == ClusterConfig("10.50.0.0/16", subnet_len=26, vni=9)
        raw = store.get("config").value
        assert json.loads(raw)["Backend"] == {"Type": "vxlan", "VNI": 9, "Port": 8472}
    finally:
        store.close()
    # The key really lives at PREFIX/config in etcd.
    with netns.enter(etcd.netns):
        conn = http.client.HTTPConnection(etcd.ip, etcd.client_port, timeout=5)
        conn.request(
            "POST", "/v3/kv/range", body=json.dumps({"key": base64.b64encode(f"{prefix}/config".encode()).decode()})
        )
        answer = json.loads(conn.getresponse().read())
        conn.close()
    assert answer["count"] == "1"


def test_cli_unreachable_etcd_is_one_line_exit_1(etcd):
    done = _cli(etcd.netns, "init", "--store", "etcd://127.0.0.1:1", "--network", "10.244.0.0/16", "--timeout", "1")
    assert done.returncode == 1
    error = done.stderr.split("\n", 1)[1] if _PLAIN_HTTP_WARNING in done.stderr else done.stderr
    assert error.startswith("Error: no etcd endpoint") and "connection refused" in error
    assert _error_lines(done.stderr) == 1
