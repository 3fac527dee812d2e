"""The file store's Watch and Claims, and the etcd watch stream's framing, without root.

A Watch follows the change log: every 50 ms poll reads the small revision
file and nothing else while nothing changed; on a change it reads the log and
the records of just the changed keys. Expiries, deletions and unreadable
records are delete events; a trimmed log or a re-created store is Compacted.
The etcd stream's HTTP chunking, message bound and silence limit are checked
over a socketpair (the real thing: tests/integration/test_etcd_watch.py).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from ipam.cluster import Compacted, Entry, StoreError, StoreUnavailable, open_store
from ipam.cluster import etcd as etcd_module
from ipam.cluster import filestore
from ipam.cluster.errors import ResponseTooLarge
from ipam.cluster.store import Event


@pytest.fixture
def store_dir(tmp_path):
    return tmp_path / "store"


@pytest.fixture
def store(store_dir):
    s = open_store(f"file://{store_dir}")
    yield s
    s.close()


def _drain(watch, until_revision, timeout=5.0):
    """Events until the watch has seen until_revision (bounded)."""
    events = []
    deadline = time.monotonic() + timeout
    while watch.revision < until_revision and time.monotonic() < deadline:
        events += watch.next(timeout=0.5)
    return events


def test_puts_and_deletes_arrive_in_order_with_values(store):
    store.put("other", b"outside the prefix")
    _, rev = store.list("subnets/")
    watch = store.watch("subnets/", rev)
    assert watch.revision == rev
    assert watch.next(timeout=0.1) == []
    r1 = store.put("subnets/a", b"one")
    store.put("elsewhere", b"x")
    assert store.create("subnets/b", b"two", ttl=60) is True
    r3 = store.put("subnets/a", bytes(range(256)))
    store.delete("subnets/b")
    last = store.list("")[1]
    events = _drain(watch, last)
    # a changed twice between polls is reported once, at its last change (its state is what counts)
    assert [(e.kind, e.key, e.value, e.version) for e in events if e.key == "subnets/a"][-1] == (
        "put",
        "subnets/a",
        bytes(range(256)),
        2,
    )
    assert [e.mod_revision for e in events] == sorted(e.mod_revision for e in events)
    assert events[-1] == Event("delete", "subnets/b", b"", last, 0)
    assert all(e.key.startswith("subnets/") for e in events)
    assert watch.revision == last and r3 > r1
    # Step by step, every change is its own event.
    r4 = store.put("subnets/c", b"c")
    assert watch.next(timeout=2) == [Event("put", "subnets/c", b"c", r4, 1)]
    store.delete("subnets/c")
    assert watch.next(timeout=2) == [Event("delete", "subnets/c", b"", r4 + 1, 0)]
    watch.close()
    with pytest.raises(StoreError, match="closed"):
        watch.next(timeout=0)


def test_state_from_list_plus_events_equals_a_fresh_list(store):
    for i in range(5):
        store.put(f"subnets/k{i}", b"%d" % i)
    entries, rev = store.list("subnets/")
    state = {e.key: e for e in entries}
    watch = store.watch("subnets/", rev)
    store.delete("subnets/k1")
    store.put("subnets/k2", b"changed")
    store.put("subnets/k9", b"new")
    store.delete("subnets/k9")
    store.put("subnets/k9", b"again")
    for event in _drain(watch, store.list("")[1]):
        if event.kind == "put":
            state[event.key] = Entry(event.key, event.value, event.mod_revision, event.version)
        else:
            state.pop(event.key, None)
    assert sorted(state.values(), key=lambda e: e.key) == store.list("subnets/")[0]


def test_an_expired_key_is_a_delete_event(store, clock):
    store.put("subnets/lease", b"x", ttl=10)
    store.put("subnets/kept", b"y", ttl=100)
    _, rev = store.list("subnets/")
    watch = store.watch("subnets/", rev)
    assert watch.next(timeout=0.1) == []
    clock.now += 11
    events = watch.next(timeout=2)
    assert events == [Event("delete", "subnets/lease", b"", rev + 1, 0)]
    assert store.get("subnets/lease") is None and store.get("subnets/kept") is not None


def test_an_unreadable_record_is_a_delete_event_as_list_skips_it(store, store_dir):
    _, rev = store.list("")
    watch = store.watch("", rev)
    store.put("k", b"fine")
    store.put("k", b"fine again")
    (store_dir / "k").write_text("{ not json")  # damaged behind the store's back, after the change
    events = _drain(watch, store.list("")[1])
    assert events == [Event("delete", "k", b"", rev + 2, 0)]
    assert store.list("")[0] == []


def test_compacted_after_the_log_was_trimmed(store, monkeypatch):
    monkeypatch.setattr(filestore, "MAX_CHANGES_BYTES", 64)
    _, rev = store.list("")
    watch = store.watch("", rev)
    for i in range(30):
        store.put(f"k{i}", b"x")
    with pytest.raises(Compacted, match="list again") as exc:
        watch.next(timeout=1)
    assert exc.value.compact_revision > rev
    with pytest.raises(Compacted):  # it stays compacted: the caller re-lists and opens a new watch
        watch.next(timeout=0)
    entries, rev2 = store.list("")
    assert len(entries) == 30
    fresh = store.watch("", rev2)
    store.put("k0", b"y")
    assert [(e.key, e.mod_revision) for e in fresh.next(timeout=2)] == [("k0", rev2 + 1)]


def test_a_recreated_store_is_compacted(store_dir):
    with open_store(f"file://{store_dir}") as s:
        for i in range(3):
            s.put(f"k{i}", b"x")
        _, rev = s.list("")
    for name in os.listdir(store_dir):
        os.unlink(store_dir / name)
    with open_store(f"file://{store_dir}") as s:
        with pytest.raises(Compacted):
            s.watch("", rev).next(timeout=1)


def test_idle_costs_one_revision_read_per_poll_and_no_record_or_log_read(store, monkeypatch):
    for i in range(50):
        store.put(f"subnets/k{i}", b"x" * 100)
    _, rev = store.list("subnets/")
    watch = store.watch("subnets/", rev)
    calls = {"record": 0, "log": 0, "revision": 0, "walk": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(store, "_read_record", counting("record", store._read_record))
    monkeypatch.setattr(store, "_read_changes", counting("log", store._read_changes))
    monkeypatch.setattr(store, "_read_revision", counting("revision", store._read_revision))
    monkeypatch.setattr(store, "_walk", counting("walk", store._walk))
    start = time.monotonic()
    assert watch.next(timeout=0.5) == []
    polls = calls["revision"]
    assert 5 <= polls <= 0.5 / filestore.POLL_INTERVAL + 2
    assert (calls["record"], calls["log"], calls["walk"]) == (0, 0, 0)
    assert time.monotonic() - start < 1.5
    # One change: the log once and the one changed key's record, no walk of the 50 others.
    revision = store.put("subnets/k7", b"new")
    calls.update(record=0, log=0, walk=0)
    assert [e.key for e in watch.next(timeout=2)] == ["subnets/k7"]
    assert watch.revision == revision
    assert (calls["record"], calls["log"], calls["walk"]) == (1, 1, 0)


def test_a_change_wakes_a_watch_in_another_thread_quickly(store):
    _, rev = store.list("")
    watch = store.watch("w/", rev)
    writer = threading.Timer(0.2, lambda: store.put("w/x", b"1"))
    writer.start()
    try:
        start = time.monotonic()
        events = watch.next(timeout=5)
        elapsed = time.monotonic() - start
    finally:
        writer.join()
    assert [e.key for e in events] == ["w/x"] and 0.15 <= elapsed < 1


def test_an_unavailable_store_backs_off_then_recovers(store, store_dir, monkeypatch):
    _, rev = store.list("")
    watch = store.watch("", rev)
    real = store._read_revision
    broken = {"on": True}

    def flaky():
        if broken["on"]:
            raise OSError(5, "Input/output error")
        return real()

    monkeypatch.setattr(store, "_read_revision", flaky)
    with pytest.raises(StoreUnavailable, match="Input/output error"):
        watch.next(timeout=1)
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):  # the back-off (0.2 s +-20 %) is waited out first
        watch.next(timeout=1)
    assert time.monotonic() - start >= 0.15
    broken["on"] = False
    store.put("k", b"v")
    assert [e.key for e in watch.next(timeout=2)] == ["k"]
    assert store.stats()["errors"] == 2


def test_claims_create_the_first_absent_key_in_one_lock(store):
    store.put("subnets/a", b"taken")
    with store.claims(ttl=30) as claims:
        entry = claims.create_first(["subnets/a", "subnets/b", "subnets/c"], b"mine")
        assert entry is not None and (entry.key, entry.value, entry.version) == ("subnets/b", b"mine", 1)
        assert store.get("subnets/b") == entry and store.ttl("subnets/b") == 30
        assert claims.create_first(["subnets/a", "subnets/b"], b"mine") is None
    assert store.stats()["requests"]["txn"] == 2
    with pytest.raises(StoreError, match="1..16 keys"):
        store.claims().create_first([f"k{i}" for i in range(17)], b"x")
    with pytest.raises(StoreError, match="same key twice"):
        store.claims().create_first(["k", "k"], b"x")


def test_stats_count_operations(store):
    store.put("a", b"1")
    store.get("a")
    store.list("")
    store.create("b", b"2")
    store.delete("a")
    store.refresh("b")
    store.watch("", 0).close()
    requests = store.stats()["requests"]
    assert requests == {"put": 1, "range": 2, "txn": 1, "deleterange": 1, "lease_keepalive": 1, "watch_open": 1}


# -- the etcd watch stream's framing (a socketpair stands in for the member) ---------------------


@pytest.fixture
def stream():
    store = etcd_module.EtcdStore([etcd_module.Endpoint("192.0.2.1", 2379)])
    ours, theirs = socket.socketpair()
    stream = etcd_module._WatchStream(store, ours, 0, "http://192.0.2.1:2379")
    yield stream, theirs, store
    stream.close()
    theirs.close()
    store.close()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


def test_stream_messages_survive_any_chunking(stream):
    s, peer, _ = stream
    messages = [
        {"result": {"created": True}},
        {"result": {"events": [{"kv": {"key": "YQ==", "mod_revision": "5"}}]}},
        {"result": {"header": {"revision": "9"}}},
    ]
    body = b"".join(json.dumps(m).encode() + b"\n" for m in messages)
    framed = _chunk(body[:7]) + _chunk(body[7:50]) + _chunk(body[50:])
    for i in range(0, len(framed), 3):  # three bytes at a time
        peer.sendall(framed[i : i + 3])
    got = []
    deadline = time.monotonic() + 5
    while len(got) < 3 and time.monotonic() < deadline:
        got += s.messages(time.monotonic() + 0.5)
    assert got == messages


def test_stream_reports_the_last_message_of_an_ended_stream_then_the_end(stream):
    s, peer, _ = stream
    peer.sendall(_chunk(b'{"error":{"grpc_code":14,"message":"etcdserver: no leader"}}') + b"0\r\n\r\n")
    [message] = s.messages(time.monotonic() + 2)
    with pytest.raises(etcd_module._EndpointFailed, match="no leader"):
        etcd_module._watch_result(message, s.url)
    with pytest.raises(etcd_module._StreamLost, match="ended the watch"):
        s.messages(time.monotonic() + 2)


def test_stream_refuses_a_message_larger_than_its_bound(stream, monkeypatch):
    s, peer, _ = stream
    monkeypatch.setattr(etcd_module, "MAX_WATCH_MESSAGE", 1000)
    peer.sendall(_chunk(b'{"result": "' + b"x" * 2000))
    with pytest.raises(ResponseTooLarge, match="larger than 1000 bytes.*--max-request-bytes"):
        s.messages(time.monotonic() + 2)


def test_stream_silent_for_too_long_counts_as_lost(stream):
    s, _, store = stream
    store.watch_silence_limit = 0.3
    start = time.monotonic()
    with pytest.raises(etcd_module._StreamLost, match="nothing received"):
        s.messages(time.monotonic() + 5)
    assert 0.25 <= time.monotonic() - start < 2
