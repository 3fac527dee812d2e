"""The etcd store's streaming Watch and its request economy against a real etcd. Root only.

A Watch is one long-lived POST /v3/watch: many events and long idle spells
over one connection and no request at all while idle; it survives a member
restart (resuming from its revision, nothing lost or repeated), reports
compaction, leaves a member that lost its leader (the gateway header
Grpc-Metadata-hasleader) and notices a peer that fell silent (TCP
keep-alive). refresh() is one keep-alive request.

etcd runs in namespaces these tests create (tests/cluster_helpers.py); every
member is stopped by PID and every partition undone on exit.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import threading
import time

import pytest

import netns
from ipam.cluster import Compacted, StoreError, StoreUnavailable, open_store
from ipam.cluster import etcd as etcd_module
from ipam.cluster.store import Event
from tests.cluster_helpers import (
    cut_member_link,
    etcd_cluster,
    etcd_in_netns,
    etcd_skip_reason,
    make_tls_certs,
    partition_member,
    restart_etcd,
    tcp_connections,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.etcd,
    pytest.mark.skipif(etcd_skip_reason() is not None, reason=etcd_skip_reason() or ""),
    pytest.mark.usefixtures("stays_in_its_namespace"),
]


@pytest.fixture(scope="module")
def etcd():
    with etcd_in_netns("etcdw") as member:
        yield member


@pytest.fixture
def prefix() -> str:
    return f"/w-{os.urandom(4).hex()}"


def _open(netns_path, url, prefix="/pycni", **kwargs):
    with netns.enter(netns_path):
        return open_store(url, prefix=prefix, **kwargs)


@pytest.fixture
def pair(etcd, prefix):
    """(watcher, writer): two stores on the module's member, under one fresh prefix."""
    watcher = _open(etcd.netns, etcd.url, prefix)
    writer = _open(etcd.netns, etcd.url, prefix)
    yield watcher, writer
    watcher.close()
    writer.close()


def _collect(watch, count, timeout=10.0, errors=None):
    """next() until count events arrived or timeout (bounded); StoreUnavailable is counted in errors."""
    events = []
    deadline = time.monotonic() + timeout
    while len(events) < count and time.monotonic() < deadline:
        try:
            events += watch.next(timeout=min(1.0, max(0.05, deadline - time.monotonic())))
        except StoreUnavailable as err:
            if errors is None:
                raise
            errors.append(str(err))
    return events


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


def test_puts_and_deletes_arrive_in_order_with_values(pair):
    watcher, writer = pair
    writer.put("outside", b"x")
    _, rev = watcher.list("subnets/")
    watch = watcher.watch("subnets/", rev)
    try:
        r1 = writer.put("subnets/a", b"one")
        writer.put("outside", b"y")
        assert writer.create("subnets/b", bytes(range(256)), ttl=60) is True
        r3 = writer.put("subnets/a", b"")
        assert writer.delete("subnets/b") is True
        events = _collect(watch, 4)
        b = writer.list("")[1] - 1  # the create of subnets/b came right before the put of a
        assert events == [
            Event("put", "subnets/a", b"one", r1, 1),
            Event("put", "subnets/b", bytes(range(256)), r1 + 2, 1),
            Event("put", "subnets/a", b"", r3, 2),
            Event("delete", "subnets/b", b"", r3 + 1, 0),
        ], b
        assert watch.revision == r3 + 1
        assert watch.next(timeout=0.2) == []
    finally:
        watch.close()
    with pytest.raises(StoreError, match="closed"):
        watch.next(timeout=0)


def test_one_connection_carries_many_events_and_idle_seconds(pair, etcd):
    watcher, writer = pair
    _, rev = watcher.list("k/")
    writer.get("k/0")  # both stores have their kept-alive unary connection now
    before = tcp_connections(etcd.netns, etcd.client_port, pid=os.getpid())
    watch = watcher.watch("k/", rev)
    try:
        seen = []
        for round_ in range(3):
            for i in range(20):
                writer.put(f"k/{i}", b"%d" % round_)
            seen += _collect(watch, 20)
            assert watch.next(timeout=1.2) == []  # idle between the bursts
        assert len(seen) == 60 and len({e.mod_revision for e in seen}) == 60
        assert [e.mod_revision for e in seen] == sorted(e.mod_revision for e in seen)
        stats = watcher.stats()
        assert stats["requests"]["watch_open"] == 1 and stats["watch_reconnects"] == 0
        assert stats["connections"] == 2  # one for list(), one for the stream
        after = tcp_connections(etcd.netns, etcd.client_port, pid=os.getpid())
        # ours: writer's and watcher's kept-alive unary connections were there before; one stream more.
        # A connection is its addresses: the rest of an `ss` line (timers) changes from one look to the next.
        known = {tuple(line.split()[2:4]) for line in before}
        assert len(after) == len(before) + 1, (before, after)
        stream = [line for line in after if tuple(line.split()[2:4]) not in known]
        assert len(stream) == 1 and "timer:(keepalive," in stream[0], stream  # the stream has TCP keep-alive
    finally:
        watch.close()


def test_an_idle_watch_sends_and_receives_nothing(pair):
    watcher, writer = pair
    _, rev = watcher.list("")
    watch = watcher.watch("idle/", rev)
    try:
        writer.put("idle/x", b"1")
        assert len(_collect(watch, 1)) == 1
        writer.put("elsewhere", b"not under the prefix")  # etcd filters it server-side: no bytes
        quiet = watcher.stats()
        start = time.monotonic()
        assert watch.next(timeout=3.5) == []
        assert time.monotonic() - start >= 3.4
        assert watcher.stats() == quiet
    finally:
        watch.close()


def test_a_member_restart_loses_and_repeats_nothing(tmp_path):
    with etcd_in_netns("etcdr") as member:
        watcher = _open(member.netns, member.url, timeout=2)
        writer = _open(member.netns, member.url, timeout=2)
        watch = None
        try:
            writer.put("subnets/a", b"1")
            _, rev = watcher.list("subnets/")
            watch = watcher.watch("subnets/", rev)
            first = writer.put("subnets/b", b"2")
            assert [e.mod_revision for e in _collect(watch, 1)] == [first]
            member.stop()
            with pytest.raises(StoreUnavailable, match="lost the watch connection"):
                watch.next(timeout=3)
            with pytest.raises(StoreUnavailable):  # still down: reconnecting fails (after the back-off)
                watch.next(timeout=1)
            restart_etcd(member)
            # Written through the restarted member while the watch is not connected.
            changes = [writer.put("subnets/c", b"3"), writer.put("subnets/b", b"2'")]
            assert writer.delete("subnets/a")
            changes.append(writer.list("")[1])
            events = _collect(watch, 3, errors=[])
            assert [(e.kind, e.key, e.mod_revision) for e in events] == [
                ("put", "subnets/c", changes[0]),
                ("put", "subnets/b", changes[1]),
                ("delete", "subnets/a", changes[2]),
            ]
            assert watch.next(timeout=0.3) == []  # nothing twice
            assert watcher.stats()["watch_reconnects"] >= 1
        finally:
            if watch is not None:
                watch.close()
            watcher.close()
            writer.close()


def test_compaction_past_the_watch_raises_compacted(pair, etcd):
    watcher, writer = pair
    writer.put("c/a", b"1")
    _, old = watcher.list("c/")
    writer.put("c/a", b"2")
    writer.put("c/b", b"3")
    _, now = watcher.list("c/")
    _compact(etcd, now)
    watch = watcher.watch("c/", old)
    try:
        with pytest.raises(Compacted, match="list again") as exc:
            watch.next(timeout=2)
        assert exc.value.compact_revision == now
        with pytest.raises(Compacted):
            watch.next(timeout=0)
    finally:
        watch.close()
    entries, rev = watcher.list("c/")
    with watcher.watch("c/", rev) as fresh:
        writer.delete("c/b")
        assert [(e.kind, e.key) for e in _collect(fresh, 1)] == [("delete", "c/b")]


def test_a_watch_leaves_a_member_that_lost_its_leader():
    """The watched member is cut off from its peers: its stream is canceled ("no leader"), the watch moves
    to a member with a leader and delivers every change written meanwhile. A watch without the
    require-leader header stays on the stale member and sees nothing."""
    with etcd_cluster(3, prefix="etcdp") as cluster:
        m0, m1, m2 = cluster.members
        watcher = _open(cluster.client_netns, cluster.url, timeout=3)
        writer = _open(cluster.client_netns, f"etcd://{m1.endpoint},{m2.endpoint}", timeout=10)
        watch = control = None
        try:
            writer.put("subnets/seed", b"0")
            _, rev = watcher.list("subnets/")
            assert watcher.current_endpoint == watcher.endpoints[0]
            watch = watcher.watch("subnets/", rev)
            assert watch.next(timeout=0.3) == [] and watch.url == f"http://{m0.endpoint}"
            real_header = etcd_module.REQUIRE_LEADER_HEADER
            etcd_module.REQUIRE_LEADER_HEADER = ("X-Pycni-Control", "1")
            try:
                control = watcher.watch("subnets/", rev)
                assert control.next(timeout=0.3) == [] and control.url == f"http://{m0.endpoint}"
            finally:
                etcd_module.REQUIRE_LEADER_HEADER = real_header
            with partition_member(cluster, 0):
                start = time.monotonic()
                written = [writer.put(f"subnets/k{i}", b"%d" % i) for i in range(5)]
                errors: list[str] = []
                events = _collect(watch, 5, timeout=15, errors=errors)
                elapsed = time.monotonic() - start
                assert [e.mod_revision for e in events] == written, (events, errors)
                assert elapsed < 15
                assert watch.url in (f"http://{m1.endpoint}", f"http://{m2.endpoint}"), (errors, events)
                assert "etcdserver: no leader" in watch.last_error, (watch.last_error, errors)
                assert watch.next(timeout=0.3) == []
                # Without the header the stale member keeps the stream open and says nothing.
                assert control.next(timeout=3) == []
                assert control.url == f"http://{m0.endpoint}"
        finally:
            for w in (watch, control):
                if w is not None:
                    w.close()
            watcher.close()
            writer.close()


def test_tcp_keepalive_notices_a_member_that_fell_silent():
    """The watched member's link is cut (no RST, no FIN): TCP keep-alive ends the stream, the watch
    fails over. The probes are shortened here (1 s idle, 1 s apart, 2 of them); the default is 10/5/3."""
    with etcd_cluster(3, prefix="etcdk") as cluster:
        m0, m1, m2 = cluster.members
        watcher = _open(cluster.client_netns, cluster.url, timeout=3)
        writer = _open(cluster.client_netns, f"etcd://{m1.endpoint},{m2.endpoint}", timeout=10)
        watcher.keepalive = (1, 1, 2)
        watch = None
        try:
            _, rev = watcher.list("subnets/")
            watch = watcher.watch("subnets/", rev)
            assert watch.next(timeout=0.3) == [] and watch.url == f"http://{m0.endpoint}"
            with cut_member_link(cluster, 0):
                start = time.monotonic()
                written = [writer.put(f"subnets/k{i}", b"x") for i in range(3)]
                errors: list[str] = []
                events = _collect(watch, 3, timeout=20, errors=errors)
                elapsed = time.monotonic() - start
                assert [e.mod_revision for e in events] == written, (events, errors)
                assert "connection timed out" in watch.last_error, (watch.last_error, errors)
                assert watcher.stats()["watch_reconnects"] >= 1
                assert 2 <= elapsed < 15
                assert watch.url != f"http://{m0.endpoint}"
        finally:
            if watch is not None:
                watch.close()
            watcher.close()
            writer.close()


def test_refresh_is_one_keepalive_request(pair):
    watcher, writer = pair
    watcher.put("lease/mine", b"x", ttl=30)
    before = watcher.stats()["requests"]
    for _ in range(5):
        assert watcher.refresh("lease/mine") is True
    after = watcher.stats()["requests"]
    assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)} == {"lease_keepalive": 5}
    # A store that never saw the key learns its lease from one range, then refreshes with one request.
    writer.get("lease/mine")
    start = writer.stats()["requests"]
    assert writer.refresh("lease/mine") is True
    end = writer.stats()["requests"]
    assert {k: end[k] - start.get(k, 0) for k in end if end[k] != start.get(k, 0)} == {"lease_keepalive": 1}
    # The lease gone (the key expired): the keep-alive says so, a range confirms the key is gone.
    watcher.put("lease/short", b"y", ttl=1)
    deadline = time.monotonic() + 10
    while watcher.get("lease/short") is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    watcher.put("lease/short2", b"y", ttl=1)
    time.sleep(2.5)
    assert watcher.refresh("lease/short2") is False
    # Deleted by someone else while its lease lives on: a watch of this store tells the refresh.
    _, rev = watcher.list("lease/")
    with watcher.watch("lease/", rev) as watch:
        writer.delete("lease/mine")
        assert [e.kind for e in _collect(watch, 1)] == ["delete"]
    assert watcher.refresh("lease/mine") is False


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates")
def test_a_tls_watch_keeps_one_handshake(tmp_path):
    certs = make_tls_certs(str(tmp_path / "pki"), ["127.0.0.1"])
    with etcd_in_netns("etcdwt", tls=certs) as member:
        watcher = _open(member.netns, member.url, tls=certs.client_files())
        writer = _open(member.netns, member.url, tls=certs.client_files())
        try:
            watcher.put("t/lease", b"x", ttl=30)
            _, rev = watcher.list("t/")
            with watcher.watch("t/", rev) as watch:
                for round_ in range(3):
                    for i in range(10):
                        writer.put(f"t/{i}", b"%d" % round_)
                    assert len(_collect(watch, 10)) == 10
                    assert watcher.refresh("t/lease") is True
                    assert watch.next(timeout=1) == []
                stats = watcher.stats()
                assert stats["connections"] == 2  # two TLS handshakes in all: unary requests, the stream
                assert stats["requests"]["watch_open"] == 1
                ours = tcp_connections(member.netns, member.client_port, pid=os.getpid())
                assert len(ours) == 3, ours  # the watcher's two and the writer's one
        finally:
            watcher.close()
            writer.close()


def test_wait_still_works_on_a_short_lived_watch(pair):
    watcher, writer = pair
    _, rev = watcher.list("w/")
    assert watcher.wait("w/", rev, timeout=0.3) is None
    timer = threading.Timer(0.2, lambda: writer.put("w/x", b"1"))
    timer.start()
    try:
        woke = watcher.wait("w/", rev, timeout=5)
    finally:
        timer.join()
    assert woke == writer.get("w/x").mod_revision
    assert watcher.stats()["requests"]["watch_open"] == 2


def test_progress_notifications_move_an_idle_watch_past_other_changes():
    """With etcd's progress interval at 1 s, a watch whose prefix stays quiet still learns the revision
    (so a reconnect resumes after changes elsewhere), and still sends nothing."""
    with etcd_in_netns("etcdpn", extra_args=["--experimental-watch-progress-notify-interval", "1s"]) as member:
        watcher = _open(member.netns, member.url)
        writer = _open(member.netns, member.url)
        try:
            _, rev = watcher.list("")
            with watcher.watch("quiet/", rev) as watch:
                assert watch.next(timeout=0.2) == []
                latest = max(writer.put(f"busy/{i}", b"x") for i in range(5))
                sent = watcher.stats()["requests"]
                deadline = time.monotonic() + 10
                while watch.revision < latest and time.monotonic() < deadline:
                    assert watch.next(timeout=0.5) == []
                assert watch.revision == latest
                assert watcher.stats()["requests"] == sent
        finally:
            watcher.close()
            writer.close()
