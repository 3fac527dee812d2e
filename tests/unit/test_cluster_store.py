"""The cluster store's file backend, the subnet leases and `pycni cluster`, without root.

Everything runs against a real file store in a temporary directory; the etcd
backend runs the same lease tests in tests/integration/test_cluster_etcd.py.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from click.testing import CliRunner

from ipam.cluster import (
    ClusterConfig,
    Compacted,
    ConfigConflict,
    Entry,
    LeaseExhausted,
    LeaseLost,
    NodeLease,
    StoreError,
    StoreAuth,
    StoreUnavailable,
    TLSFiles,
    acquire_lease,
    init_cluster,
    list_leases,
    open_store,
    read_config,
    release_lease,
    renew_lease,
    subnet_from_key,
    subnet_key,
)
from ipam.cluster import filestore
from pycni.cluster_cmd import cluster
from tests.cluster_helpers import race_acquire_leases

MAC_A = "0a:58:0a:00:00:0a"
MAC_B = "0a:58:0a:00:00:0b"


@pytest.fixture
def store_dir(tmp_path):
    return tmp_path / "store"


@pytest.fixture
def store(store_dir):
    s = open_store(f"file://{store_dir}")
    yield s
    s.close()


@pytest.fixture
def cfg(store):
    c = ClusterConfig("10.244.0.0/16")
    init_cluster(store, c)
    return c


# -- open_store ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://10.0.0.1:2379",
        "10.0.0.1:2379",
        "",
        "file://relative/dir",
        "etcd://",
        "etcd://host:notaport",
        "etcd://host:70000",
        "etcd://h:1/path",
        "etcd://::1:2379",
    ],
)
def test_open_store_rejects_bad_urls(url):
    with pytest.raises(StoreError) as exc:
        open_store(url)
    assert "file:///" in str(exc.value) or "port" in str(exc.value) or "IPv6" in str(exc.value)


def test_open_store_error_lists_the_accepted_forms():
    with pytest.raises(StoreError, match=r"file:///DIR .* etcd://HOST:PORT\[,HOST:PORT\.\.\.\]"):
        open_store("consul://x:8500")


def test_open_store_parses_etcd_endpoints():
    store = open_store("etcd://10.0.0.1:2379,[fd00::1]:3379,node-c", prefix="/x")
    try:
        assert [(e.host, e.port) for e in store.endpoints] == [("10.0.0.1", 2379), ("fd00::1", 3379), ("node-c", 2379)]
        assert store.url() == "etcd://10.0.0.1:2379,[fd00::1]:3379,node-c:2379"
    finally:
        store.close()


@pytest.mark.parametrize(
    "url, scheme, endpoints",
    [
        ("http://10.0.0.1:2379", "http", [("10.0.0.1", 2379)]),
        ("http://10.0.0.1:2379,http://10.0.0.2:2379", "http", [("10.0.0.1", 2379), ("10.0.0.2", 2379)]),
        ("HTTPS://10.0.0.1:2379/, https://[fd00::2]:3379/", "https", [("10.0.0.1", 2379), ("fd00::2", 3379)]),
        ("https://node-a,node-b:2381", "https", [("node-a", 2379), ("node-b", 2381)]),
        ("etcd://10.0.0.1:2379,etcd://10.0.0.2", "http", [("10.0.0.1", 2379), ("10.0.0.2", 2379)]),
    ],
)
def test_open_store_takes_flannels_endpoint_lists(url, scheme, endpoints):
    store = open_store(url)
    try:
        assert [(e.host, e.port) for e in store.endpoints] == endpoints
        assert store._scheme == scheme  # https: TLS with the system's CAs (no TLS files given)
        assert (store._ssl is not None) == (scheme == "https")
    finally:
        store.close()


def test_an_endpoint_list_keeps_its_form_in_messages():
    for url, shown in [
        ("http://a:2379,http://b", "http://a:2379,http://b:2379"),
        ("https://a,b", "https://a:2379,https://b:2379"),
        ("etcd://a,b:1", "etcd://a:2379,b:1"),
    ]:
        with open_store(url) as store:
            assert store.url() == shown


@pytest.mark.parametrize(
    "url, other",
    [
        ("http://10.0.0.1:2379,https://10.0.0.2:2379", "https"),
        ("https://a:2379,http://b:2379", "http"),
        ("etcd://a:2379,http://b:2379", "http"),
        ("http://a:2379,etcd://b:2379", "etcd"),
        ("http://a:2379,b:2379,file:///x", "file"),
        ("file:///var/lib/pycni,http://b:2379", "http"),
    ],
)
def test_open_store_refuses_mixed_schemes(url, other):
    with pytest.raises(StoreError, match=rf"invalid store URL .*: it mixes \w+:// and {other}:// endpoints"):
        open_store(url)


@pytest.mark.parametrize(
    "url, words",
    [
        ("http://", "file:///DIR"),
        ("http://a:2379,", "the host is missing"),
        ("https://a:99999", "port"),
        ("http://a:2379/v3", "file:///DIR"),
        ("http://root:secret@a:2379", "--etcd-username and --etcd-password-file"),
        ("https://a:2379?x=1", "file:///DIR"),
        ("http://::1:2379", "IPv6"),
        ("https://a:2379/v3,https://pycni:secret@b:2379", "'https://a:2379/v3,https://***@b:2379'"),
    ],
)
def test_open_store_rejects_bad_endpoint_lists(url, words):
    with pytest.raises(StoreError) as exc:
        open_store(url)
    assert words in str(exc.value) and "secret" not in str(exc.value)


def test_accepted_urls_name_every_form():
    with pytest.raises(StoreError) as exc:
        open_store("consul://x:8500")
    for form in (
        "file:///DIR",
        "etcd://HOST:PORT[,HOST:PORT...]",
        "http://HOST:PORT[,http://HOST:PORT...]",
        "https://HOST:PORT[,https://HOST:PORT...]",
        "--etcd-endpoints",
    ):
        assert form in str(exc.value)


def test_tls_files_for_a_plain_http_url_are_refused(tmp_path):
    with pytest.raises(StoreError, match="plain-http store http://a:2379: write its endpoints as https://"):
        open_store("http://a:2379", tls=TLSFiles(cafile=str(tmp_path / "ca.pem")))


def test_an_etcd_user_for_a_file_store_is_refused(store_dir):
    with pytest.raises(StoreError, match="an etcd user was given for the file store"):
        open_store(f"file://{store_dir}", auth=StoreAuth("pycni", "pw"))


def test_store_auth_never_shows_the_password():
    auth = StoreAuth("pycni", "s3cret-pw")
    assert "s3cret" not in repr(auth) and "pycni" in repr(auth)
    with pytest.raises(StoreError, match="empty"):
        StoreAuth("pycni", "")
    with pytest.raises(StoreError, match="control characters"):
        StoreAuth("py\ncni", "pw")


def test_file_store_refuses_tls_files(store_dir):
    with pytest.raises(StoreError, match="only apply to etcd"):
        open_store(f"file://{store_dir}", tls=TLSFiles(cafile="/ca.pem", certfile=None, keyfile=None))


def test_file_store_creates_its_directory(store_dir):
    assert not store_dir.exists()
    open_store(f"file://{store_dir}").close()
    assert store_dir.is_dir()


def test_file_store_on_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        open_store(f"file://{tmp_path / 'f'}")


# -- basic operations and revisions -----------------------------------------------------


def test_create_is_create_if_absent(store):
    assert store.create("a/b", b"one") is True
    assert store.create("a/b", b"two") is False
    entry = store.get("a/b")
    assert entry == Entry("a/b", b"one", entry.mod_revision, 1)


def test_every_change_bumps_the_revision(store):
    entries, rev0 = store.list("")
    assert entries == [] and rev0 == 0
    rev1 = store.put("k", b"1")
    assert rev1 == rev0 + 1
    assert store.get("k").mod_revision == rev1
    assert store.create("k2", b"x")
    rev2 = store.get("k2").mod_revision
    assert rev2 == rev1 + 1
    rev3 = store.put("k", b"2")
    assert rev3 == rev2 + 1
    assert store.get("k") == Entry("k", b"2", rev3, 2)
    assert store.delete("k") is True
    assert store.list("")[1] == rev3 + 1
    # Failed operations change nothing.
    assert store.delete("k") is False
    assert store.create("k2", b"y") is False
    assert store.replace("k2", b"y", 12345) is False
    assert store.list("")[1] == rev3 + 1


def test_replace_is_compare_and_swap(store):
    store.put("k", b"v1")
    entry = store.get("k")
    assert store.replace("k", b"v2", entry.mod_revision) is True
    assert store.replace("k", b"v3", entry.mod_revision) is False  # stale revision
    assert store.get("k").value == b"v2"
    assert store.replace("missing", b"x", 1) is False
    assert store.get("missing") is None


def test_list_by_prefix_is_sorted_and_reports_the_revision(store):
    for key in ("subnets/10.244.2.0-24", "subnets/10.244.1.0-24", "config", "subnetsx", "other/deep/key"):
        store.put(key, key.encode())
    entries, rev = store.list("subnets/")
    assert [e.key for e in entries] == ["subnets/10.244.1.0-24", "subnets/10.244.2.0-24"]
    assert rev == 5
    assert [e.key for e in store.list("subnets")[0]] == ["subnets/10.244.1.0-24", "subnets/10.244.2.0-24", "subnetsx"]
    assert [e.key for e in store.list("subnets/10.244.1")[0]] == ["subnets/10.244.1.0-24"]
    assert [e.key for e in store.list("")[0]] == [
        "config",
        "other/deep/key",
        "subnets/10.244.1.0-24",
        "subnets/10.244.2.0-24",
        "subnetsx",
    ]
    assert store.list("nothing/")[0] == []


def test_values_are_bytes_and_any_bytes_round_trip(store, store_dir):
    store.put("bin", bytes(range(256)))
    store.put("text", b'{"PublicIP": "10.0.0.1"}')
    assert store.get("bin").value == bytes(range(256))
    # Text values stay readable on disk.
    on_disk = json.loads((store_dir / "text").read_text())
    assert on_disk["value"] == '{"PublicIP": "10.0.0.1"}' and on_disk["mod_revision"] == 2
    with pytest.raises(StoreError, match="bytes"):
        store.put("k", "a str")  # type: ignore[arg-type]


def test_ttl_keys_expire(store, store_dir, clock):
    store.put("lease", b"x", ttl=10)
    record = json.loads((store_dir / "lease").read_text())
    assert record["ttl"] == 10 and record["expires"] == pytest.approx(clock.now + 10, abs=0.01)
    store.put("forever", b"y")
    assert "expires" not in json.loads((store_dir / "forever").read_text())
    clock.now += 9.9
    assert store.get("lease").value == b"x"
    clock.now += 0.2
    assert store.get("lease") is None
    assert [e.key for e in store.list("")[0]] == ["forever"]
    assert store.refresh("lease") is False
    assert store.replace("lease", b"z", 1) is False
    assert store.refresh("forever") is True  # no TTL: nothing to renew, and it does not expire
    with pytest.raises(StoreError, match="TTL"):
        store.put("lease", b"x", ttl=0)


def test_refresh_extends_by_the_recorded_ttl_without_a_new_revision(store, clock):
    store.put("lease", b"x", ttl=10)
    before = store.get("lease")
    clock.now += 8
    assert store.refresh("lease") is True
    clock.now += 8  # 16 s after the write, 8 s after the refresh
    assert store.get("lease") == before
    assert store.list("")[1] == before.mod_revision  # a refresh wakes nobody
    clock.now += 2.1
    assert store.get("lease") is None


def test_create_over_an_expired_key_succeeds(store, clock):
    assert store.create("lease", b"old", ttl=5) is True
    assert store.create("lease", b"new", ttl=5) is False
    clock.now += 6
    assert store.create("lease", b"new", ttl=5) is True
    entry = store.get("lease")
    assert (entry.value, entry.version) == (b"new", 1)
    assert store.list("")[1] == entry.mod_revision == 2


def test_an_expired_key_wakes_watchers_in_other_threads_and_processes(store, store_dir):
    """The expiry becomes a real deletion (revision bump, change-log line) that every watcher sees."""
    import multiprocessing
    import queue

    store.put("subnets/10.244.1.0-24", b"{}", ttl=1)
    _, rev = store.list("subnets/")
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()

    def watch_in_process() -> None:
        with open_store(f"file://{store_dir}") as other:
            results.put(other.wait("subnets/", rev, timeout=10))

    def watch_in_thread() -> None:
        with open_store(f"file://{store_dir}") as other:
            woke.append(other.wait("subnets/", rev, timeout=10))

    proc = ctx.Process(target=watch_in_process, daemon=True)
    woke: list[int | None] = []
    thread = threading.Thread(target=watch_in_thread)
    start = time.monotonic()
    proc.start()
    thread.start()
    try:
        from_process = results.get(timeout=15)
    except queue.Empty:
        from_process = "no answer"
    finally:
        proc.join(timeout=5)
        if proc.is_alive():
            os.kill(proc.pid, 9)
            proc.join(timeout=5)
        thread.join(timeout=15)
    elapsed = time.monotonic() - start
    assert from_process == rev + 1 and woke == [rev + 1]
    assert 0.5 <= elapsed < 5
    assert store.get("subnets/10.244.1.0-24") is None
    assert f"{rev + 1} subnets/10.244.1.0-24" in (store_dir / filestore.CHANGES_FILE).read_text().splitlines()
    assert (store_dir / filestore.EXPIRY_FILE).read_text() == ""
    assert not (store_dir / "subnets" / "10.244.1.0-24").exists()


def test_the_expiry_index_survives_reopening(store_dir, clock):
    with open_store(f"file://{store_dir}") as s:
        s.put("a", b"1", ttl=30)
        s.put("b", b"2", ttl=60)
        s.put("c", b"3")
        _, rev = s.list("")
    lines = (store_dir / filestore.EXPIRY_FILE).read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["a", "b"]
    clock.now += 31
    with open_store(f"file://{store_dir}") as s:
        assert s.wait("", rev, timeout=1) == rev + 1  # reaped by the reopened store's watcher
        assert [e.key for e in s.list("")[0]] == ["b", "c"]
    assert [line.split(" ", 1)[1] for line in (store_dir / filestore.EXPIRY_FILE).read_text().splitlines()] == ["b"]


def test_state_survives_reopening(store_dir):
    with open_store(f"file://{store_dir}") as s:
        s.put("k", b"v")
        s.put("k", b"w")
    with open_store(f"file://{store_dir}") as s:
        assert s.get("k") == Entry("k", b"w", 2, 2)
        assert s.list("")[1] == 2


def test_threads_racing_create_get_one_winner(store):
    results = []
    barrier = threading.Barrier(8)

    def racer(i):
        barrier.wait(timeout=10)
        results.append(store.create("contended", str(i).encode()))

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert sorted(results) == [False] * 7 + [True]
    assert store.list("")[1] == 1


def test_no_temporary_files_are_left_behind(store, store_dir):
    store.create("a/b", b"1")
    store.create("a/b", b"2")
    store.put("a/b", b"3")
    store.delete("a/b")
    leftovers = [n for _, _, files in os.walk(store_dir) for n in files if n.startswith(filestore.TMP_PREFIX)]
    assert leftovers == []


# -- wait ---------------------------------------------------------------------------------


def test_wait_times_out_with_none(store):
    _, rev = store.list("")
    start = time.monotonic()
    assert store.wait("subnets/", rev, timeout=0.3) is None
    assert 0.25 <= time.monotonic() - start < 1.5


def test_wait_wakes_on_a_change_from_another_thread(store):
    _, rev = store.list("subnets/")
    writer = threading.Timer(0.2, lambda: store.put("subnets/10.244.3.0-24", b"{}"))
    writer.start()
    try:
        start = time.monotonic()
        woke = store.wait("subnets/", rev, timeout=5)
        elapsed = time.monotonic() - start
    finally:
        writer.join()
    assert woke == store.get("subnets/10.244.3.0-24").mod_revision
    assert 0.15 <= elapsed < 2


def test_wait_ignores_changes_outside_its_prefix(store):
    _, rev = store.list("subnets/")
    writers = [
        threading.Timer(0.1, lambda: store.put("config", b"{}")),
        threading.Timer(0.4, lambda: store.put("subnets/a", b"{}")),
    ]
    for w in writers:
        w.start()
    try:
        start = time.monotonic()
        woke = store.wait("subnets/", rev, timeout=5)
        elapsed = time.monotonic() - start
    finally:
        for w in writers:
            w.join()
    assert woke == rev + 2 and elapsed >= 0.35


def test_wait_sees_deletions_and_earlier_changes(store):
    store.put("subnets/a", b"{}")
    _, rev = store.list("subnets/")
    store.delete("subnets/a")
    # The change is already there: no waiting.
    start = time.monotonic()
    assert store.wait("subnets/", rev, timeout=5) == rev + 1
    assert time.monotonic() - start < 0.5


def test_wait_raises_compacted_when_the_log_was_trimmed(store, monkeypatch):
    monkeypatch.setattr(filestore, "MAX_CHANGES_BYTES", 64)
    _, rev = store.list("")
    for i in range(30):
        store.put(f"k{i}", b"x")
    with pytest.raises(Compacted, match="list again") as exc:
        store.wait("", rev, timeout=1)
    assert exc.value.compact_revision > rev
    entries, rev2 = store.list("")  # re-list, then follow from there
    assert len(entries) == 30
    assert store.wait("", rev2, timeout=0.1) is None
    store.put("k0", b"y")
    assert store.wait("", rev2, timeout=1) == rev2 + 1


def test_wait_on_a_recreated_store_raises_compacted(store_dir):
    with open_store(f"file://{store_dir}") as s:
        for i in range(3):
            s.put(f"k{i}", b"x")
        _, rev = s.list("")
    for name in os.listdir(store_dir):
        os.unlink(store_dir / name)
    with open_store(f"file://{store_dir}") as s:
        with pytest.raises(Compacted):
            s.wait("", rev, timeout=1)


# -- key safety and symlinks ----------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["", "/abs", "../x", "a/../b", "a//b", "a/", ".lock", ".revision", "a/.tmp-1", "a\0b", "a\nb", "./a", "x" * 2000],
)
def test_unsafe_keys_are_refused(store, tmp_path, key):
    for op in (
        lambda: store.put(key, b"x"),
        lambda: store.get(key),
        lambda: store.create(key, b"x"),
        lambda: store.delete(key),
    ):
        with pytest.raises(StoreError, match="invalid store key"):
            op()
    assert sorted(os.listdir(tmp_path)) == ["store"]


def test_leaf_symlink_is_never_followed(store, store_dir, tmp_path):
    target = tmp_path / "outside"
    target.write_text("precious")
    os.symlink(target, store_dir / "config")
    for op in (
        lambda: store.get("config"),
        lambda: store.put("config", b"x"),
        lambda: store.create("config", b"x"),
        lambda: store.replace("config", b"x", 1),
        lambda: store.delete("config"),
    ):
        with pytest.raises(StoreError, match="symbolic link"):
            op()
    assert target.read_text() == "precious"
    assert store.list("")[0] == []  # listing skips it


def test_directory_symlink_is_never_followed(store, store_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, store_dir / "subnets")
    with pytest.raises(StoreError, match="symbolic link"):
        store.create("subnets/10.244.0.0-24", b"x")
    with pytest.raises(StoreError, match="symbolic link"):
        store.get("subnets/10.244.0.0-24")
    assert store.list("")[0] == []
    assert os.listdir(outside) == []


@pytest.mark.parametrize("name", [filestore.LOCK_FILE, filestore.REVISION_FILE])
def test_bookkeeping_symlinks_are_refused(store, store_dir, tmp_path, name):
    target = tmp_path / "outside"
    target.write_text("7\n")
    os.symlink(target, store_dir / name)
    with pytest.raises(StoreError, match="symbolic link"):
        store.put("k", b"x")
    assert target.read_text() == "7\n"


def test_fifo_is_not_read(store, store_dir):
    os.mkfifo(store_dir / "config")
    with pytest.raises(StoreError, match="not a regular file"):
        store.get("config")


def test_key_and_keys_under_it_conflict_clearly(store):
    store.put("a", b"x")
    with pytest.raises(StoreError, match="is a key, not a directory"):
        store.put("a/b", b"y")


def test_corrupt_record_is_reported(store, store_dir):
    (store_dir / "config").write_text("not json")
    with pytest.raises(StoreError, match="not a valid store record"):
        store.get("config")


def test_a_corrupt_record_can_be_deleted_and_watchers_see_it_go(store, store_dir):
    store.put("subnets/10.244.1.0-24", b"{}")
    (store_dir / "subnets" / "10.244.1.0-24").write_text("not json")
    _entries, revision = store.list("subnets/")
    assert store.delete("subnets/10.244.1.0-24")
    assert not (store_dir / "subnets" / "10.244.1.0-24").exists()
    assert store.wait("subnets/", revision, timeout=1) is not None


def test_vanished_directory_is_unavailable(store, store_dir):
    import shutil

    shutil.rmtree(store_dir)
    with pytest.raises(StoreUnavailable, match="cannot write k in the file store"):
        store.put("k", b"x")


# -- cluster configuration ------------------------------------------------------------------


def test_cluster_config_json_is_flannels_layout():
    c = ClusterConfig("10.244.0.0/16", subnet_len=26, vni=42, port=4789)
    assert json.loads(c.to_json()) == {
        "Network": "10.244.0.0/16",
        "SubnetLen": 26,
        "Backend": {"Type": "vxlan", "VNI": 42, "Port": 4789},
    }
    assert ClusterConfig.from_json(c.to_json()) == c
    assert ClusterConfig.from_json(b'{"Network": "10.1.0.0/16"}') == ClusterConfig("10.1.0.0/16")
    with pytest.raises(ValueError, match="backend 'host-gw'"):
        ClusterConfig.from_json('{"Network": "10.1.0.0/16", "Backend": {"Type": "host-gw"}}')


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"network": "10.244.0.0"}, None),  # a bare address is a /32: no room for node subnets
        ({"network": "nonsense"}, "CIDR"),
        ({"network": "10.244.1.0/16"}, "did you mean 10.244.0.0/16"),
        ({"network": "10.244.0.0/16", "subnet_len": 16}, "longer than /16"),
        ({"network": "10.244.0.0/16", "subnet_len": 31}, "at most /30"),
        ({"network": "10.244.0.0/16", "vni": 0}, "VNI"),
        ({"network": "10.244.0.0/16", "vni": 2**24}, "VNI"),
        ({"network": "10.244.0.0/16", "port": 0}, "port"),
        ({"network": "10.244.0.0/16", "port": 65536}, "port"),
    ],
)
def test_cluster_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClusterConfig(**kwargs)


def test_init_cluster_identical_and_conflicting(store):
    c = ClusterConfig("10.244.0.0/16")
    assert init_cluster(store, c) is True
    assert init_cluster(store, ClusterConfig("10.244.0.0/16")) is False
    with pytest.raises(ConfigConflict) as exc:
        init_cluster(store, ClusterConfig("10.244.0.0/16", vni=2))
    assert "VNI 1" in str(exc.value) and "VNI 2" in str(exc.value)
    assert read_config(store) == c


def test_read_config_without_init_says_what_to_do(store):
    with pytest.raises(StoreError, match="run `pycni cluster init"):
        read_config(store)


# -- leases ---------------------------------------------------------------------------------


def test_lease_keys_follow_flannel():
    assert subnet_key("10.244.1.0/24") == "subnets/10.244.1.0-24"
    assert subnet_from_key("subnets/10.244.1.0-24") == "10.244.1.0/24"
    assert subnet_key("fd00:10::/64") == "subnets/fd00:10::-64"
    assert subnet_from_key("subnets/fd00:10::-64") == "fd00:10::/64"
    assert subnet_from_key("subnets/garbage") is None
    assert subnet_from_key("config") is None


def test_lease_json_round_trip():
    lease = NodeLease("10.244.1.0/24", "192.168.1.10", MAC_A, "node-a")
    assert json.loads(lease.to_json()) == {
        "PublicIP": "192.168.1.10",
        "BackendType": "vxlan",
        "BackendData": {"VtepMAC": MAC_A},
        "NodeName": "node-a",
    }
    assert NodeLease.from_json("10.244.1.0/24", lease.to_json()) == lease


def test_first_free_subnets_in_order(store, cfg):
    a = acquire_lease(store, cfg, "192.168.1.10", MAC_A, node_name="a")
    b = acquire_lease(store, cfg, "192.168.1.11", MAC_B, node_name="b")
    assert (a.subnet, b.subnet) == ("10.244.0.0/24", "10.244.1.0/24")
    leases, rev = list_leases(store)
    assert leases == [a, b]
    assert rev == b.mod_revision


def test_same_node_gets_its_subnet_back_with_the_new_mac(store, cfg):
    first = acquire_lease(store, cfg, "192.168.1.10", MAC_A)
    acquire_lease(store, cfg, "192.168.1.11", MAC_B)
    again = acquire_lease(store, cfg, "192.168.1.10", MAC_A)
    assert again == first and again.mod_revision == first.mod_revision  # unchanged: no write
    moved = acquire_lease(store, cfg, "192.168.1.10", "0A-58-0A-00-00-99", node_name="renamed")
    assert moved.subnet == first.subnet
    assert store.get(first.key).value == moved.to_json().encode()
    assert moved.vtep_mac == "0a:58:0a:00:00:99" and moved.node_name == "renamed"
    assert len(list_leases(store)[0]) == 2


def test_a_renumbered_node_takes_its_own_lease_over(store, cfg):
    old = acquire_lease(store, cfg, "192.168.1.10", MAC_A, node_name="a")
    other = acquire_lease(store, cfg, "192.168.1.11", MAC_B, node_name="b")
    previous = NodeLease(old.subnet, old.public_ip, old.vtep_mac, old.node_name)
    moved = acquire_lease(
        store, cfg, "192.168.1.20", MAC_B, node_name="a", preferred_subnet=old.subnet, previous=previous
    )
    assert (moved.subnet, moved.public_ip, moved.vtep_mac) == (old.subnet, "192.168.1.20", MAC_B)
    leases = list_leases(store)[0]
    assert [(l.subnet, l.public_ip) for l in leases] == [(old.subnet, "192.168.1.20"), (other.subnet, other.public_ip)]
    # Only the exact lease it held: a previous lease whose MAC or address the store does not hold is no claim.
    impostor = NodeLease(other.subnet, other.public_ip, MAC_A, "b")
    third = acquire_lease(store, cfg, "192.168.1.30", MAC_A, previous=impostor)
    assert third.subnet not in (old.subnet, other.subnet)
    assert any(l.public_ip == other.public_ip and l.subnet == other.subnet for l in list_leases(store)[0])


def test_preferred_subnet(store, cfg):
    a = acquire_lease(store, cfg, "192.168.1.10", MAC_A, preferred_subnet="10.244.7.0/24")
    assert a.subnet == "10.244.7.0/24"
    # Taken by a: b gets the first free one instead.
    b = acquire_lease(store, cfg, "192.168.1.11", MAC_B, preferred_subnet="10.244.7.0/24")
    assert b.subnet == "10.244.0.0/24"
    # Not a subnet of this cluster: ignored.
    c = acquire_lease(store, cfg, "192.168.1.12", MAC_B, preferred_subnet="10.99.0.0/24")
    assert c.subnet == "10.244.1.0/24"
    with pytest.raises(ValueError, match="preferred subnet"):
        acquire_lease(store, cfg, "192.168.1.13", MAC_B, preferred_subnet="bogus")


def test_release_frees_the_subnet_for_another_node(store, cfg):
    a = acquire_lease(store, cfg, "192.168.1.10", MAC_A)
    assert release_lease(store, "192.168.1.10") is True
    assert release_lease(store, "192.168.1.10") is False
    b = acquire_lease(store, cfg, "192.168.1.11", MAC_B)
    assert b.subnet == a.subnet


def test_exhaustion_says_how_many_and_how_to_grow(store):
    small = ClusterConfig("10.9.0.0/28", subnet_len=30)
    for i in range(4):
        acquire_lease(store, small, f"192.168.1.{i + 1}", MAC_A)
    with pytest.raises(LeaseExhausted) as exc:
        acquire_lease(store, small, "192.168.1.99", MAC_B)
    message = str(exc.value)
    assert "all 4 /30 subnets of 10.9.0.0/28" in message
    assert "larger network" in message and "/27" in message
    # The existing nodes still get theirs back.
    assert acquire_lease(store, small, "192.168.1.3", MAC_A).subnet == "10.9.0.8/30"


def test_malformed_and_foreign_leases_keep_their_subnets(store, cfg):
    store.put("subnets/10.244.0.0-24", b"garbage")
    store.put(
        "subnets/10.244.1.0-25", b'{"PublicIP": "192.168.9.9", "BackendData": {"VtepMAC": "' + MAC_B.encode() + b'"}}'
    )  # an odd length overlapping 10.244.1.0/24
    lease = acquire_lease(store, cfg, "192.168.1.10", MAC_A)
    assert lease.subnet == "10.244.2.0/24"
    assert [l.subnet for l in list_leases(store)[0]] == ["10.244.1.0/25", "10.244.2.0/24"]


def test_invalid_node_identity_is_refused(store, cfg):
    with pytest.raises(ValueError, match="public IP"):
        acquire_lease(store, cfg, "not-an-ip", MAC_A)
    with pytest.raises(ValueError, match="VTEP MAC"):
        acquire_lease(store, cfg, "192.168.1.10", "zz:zz")


def test_renew_lease(store, cfg):
    a = acquire_lease(store, cfg, "192.168.1.10", MAC_A, ttl=30)
    assert renew_lease(store, a, ttl=30) == a
    # Gone (an expired TTL elsewhere): renewing writes it back.
    store.delete(a.key)
    assert renew_lease(store, a, ttl=30).subnet == a.subnet
    # Taken over by another node: lost.
    store.delete(a.key)
    other = acquire_lease(store, cfg, "192.168.1.11", MAC_B)
    assert other.subnet == a.subnet
    with pytest.raises(LeaseLost, match="192.168.1.11"):
        renew_lease(store, a, ttl=30)


def test_a_restart_with_another_ttl_rewrites_the_lease_with_it(store, cfg):
    a = acquire_lease(store, cfg, "192.168.1.10", MAC_A, ttl=86400)
    assert store.ttl(a.key) == 86400
    same = acquire_lease(store, cfg, "192.168.1.10", MAC_A, ttl=86400)
    assert same.mod_revision == a.mod_revision  # unchanged and alive: no write
    short = acquire_lease(store, cfg, "192.168.1.10", MAC_A, ttl=3)
    assert short.subnet == a.subnet and store.ttl(a.key) == 3
    assert short.mod_revision > a.mod_revision


def test_processes_racing_for_leases_get_different_subnets(store_dir, cfg):
    ips = [f"192.168.1.{i + 10}" for i in range(8)]
    results = race_acquire_leases(f"file://{store_dir}", cfg, ips)
    assert sorted(results) == sorted(ips), results
    assert not [r for r in results.values() if r.startswith("ERROR")], results
    assert len(set(results.values())) == 8
    assert set(results.values()) == {f"10.244.{i}.0/24" for i in range(8)}
    with open_store(f"file://{store_dir}") as s:
        assert {(l.public_ip, l.subnet) for l in list_leases(s)[0]} == set(results.items())


def test_processes_racing_for_the_last_subnets(store_dir):
    small = ClusterConfig("10.9.0.0/28", subnet_len=30)  # 4 subnets, 8 nodes
    with open_store(f"file://{store_dir}") as s:
        init_cluster(s, small)
    results = race_acquire_leases(f"file://{store_dir}", small, [f"192.168.1.{i + 10}" for i in range(8)])
    won = [r for r in results.values() if not r.startswith("ERROR")]
    lost = [r for r in results.values() if r.startswith("ERROR")]
    assert len(won) == 4 and len(set(won)) == 4
    assert len(lost) == 4 and all("LeaseExhausted" in r for r in lost)


# -- pycni cluster ------------------------------------------------------------------------------


def _run(*args):
    return CliRunner().invoke(cluster, list(args), catch_exceptions=False)


def test_cli_init_is_idempotent_and_refuses_a_conflict(store_dir):
    url = f"file://{store_dir}"
    first = _run("init", "--store", url, "--network", "10.244.0.0/16", "--vni", "7")
    assert first.exit_code == 0 and "cluster initialised" in first.output and "VNI 7" in first.output
    again = _run("init", "--store", url, "--network", "10.244.0.0/16", "--vni", "7")
    assert again.exit_code == 0 and "already initialised" in again.output
    conflict = _run("init", "--store", url, "--network", "10.245.0.0/16")
    assert conflict.exit_code == 1
    assert (
        conflict.output.count("\n") == 1 and "10.244.0.0/16" in conflict.output and "10.245.0.0/16" in conflict.output
    )
    with open_store(url) as s:
        assert read_config(s) == ClusterConfig("10.244.0.0/16", vni=7)


def test_cli_init_output_for_an_ipv4_only_cluster_is_unchanged(store_dir):
    url = f"file://{store_dir}"
    assert _run("init", "--store", url, "--network", "10.244.0.0/16", "--vni", "7").output == (
        f"cluster initialised in {url}: network 10.244.0.0/16, /24 per node, VNI 7, UDP port 8472 "
        f"(room for 256 nodes)\n"
    )
    with open_store(url) as s:
        assert s.get("config").value == (
            b'{"Backend": {"Port": 8472, "Type": "vxlan", "VNI": 7}, "Network": "10.244.0.0/16", "SubnetLen": 24}'
        )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--network", "10.244.0.0/33"], "--network"),
        (["--network", "10.244.0.5/16"], "did you mean 10.244.0.0/16"),
        (["--network", "10.244.0.0/16", "--subnet-len", "12"], "--subnet-len"),
        (["--network", "10.244.0.0/16", "--vni", "16777216"], "--vni"),
        (["--network", "10.244.0.0/16", "--port", "0"], "--port"),
    ],
)
def test_cli_init_validates(store_dir, args, message):
    result = _run("init", "--store", f"file://{store_dir}", *args)
    assert result.exit_code == 2 and message in result.output
    assert not store_dir.exists() or not (store_dir / "config").exists()


def test_cli_bad_store_url():
    result = _run("init", "--store", "consul://10.0.0.1:8500", "--network", "10.244.0.0/16")
    assert result.exit_code == 2 and "etcd://HOST:PORT" in result.output


def test_cli_mixed_endpoint_list_is_a_usage_error():
    result = _run("leases", "--store", "http://10.0.0.1:2379,https://10.0.0.2:2379")
    assert result.exit_code == 2 and "mixes http:// and https:// endpoints" in result.output


def test_cli_store_from_pycni_store(store_dir, monkeypatch):
    monkeypatch.setenv("PYCNI_STORE", f"file://{store_dir}")
    first = _run("init", "--network", "10.244.0.0/16")
    assert first.exit_code == 0 and f"cluster initialised in file://{store_dir}" in first.output
    assert "10.244.0.0/16" in _run("leases").output
    # The flag wins over the variable.
    other = store_dir.parent / "other"
    assert _run("init", "--store", f"file://{other}", "--network", "10.245.0.0/16").exit_code == 0
    with open_store(f"file://{store_dir}") as s:
        assert read_config(s) == ClusterConfig("10.244.0.0/16")


def test_cli_help_names_the_environment_variables():
    output = _run("leases", "--help").output
    for name in (
        "PYCNI_STORE",
        "PYCNI_ETCD_PREFIX",
        "PYCNI_ETCD_CAFILE",
        "PYCNI_ETCD_CERTFILE",
        "PYCNI_ETCD_KEYFILE",
        "PYCNI_ETCD_USERNAME",
        "PYCNI_ETCD_PASSWORD_FILE",
    ):
        assert name in output, name
    assert "--etcd-username" in output and "--etcd-password-file" in output and "https://" in output


def _password_file(tmp_path, text="s3cret\n", mode=0o600):
    path = tmp_path / "etcd-password"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize(
    "text, mode, words",
    [
        ("s3cret\n", 0o644, "readable by group or others (mode 0644)"),
        ("s3cret\n", 0o640, "chmod 600"),
        ("\n", 0o600, "holds no password"),
        ("s3cret\nmore\n", 0o600, "more than one line"),
    ],
)
def test_cli_password_file_is_checked(tmp_path, store_dir, text, mode, words):
    result = _run(
        "leases",
        "--store",
        "etcd://127.0.0.1:1",
        "--etcd-username",
        "pycni",
        "--etcd-password-file",
        _password_file(tmp_path, text, mode),
    )
    assert result.exit_code == 2 and "--etcd-password-file" in result.output and words in result.output
    assert "s3cret" not in result.output


@pytest.mark.parametrize(
    "args, words",
    [
        (["--etcd-username", "pycni"], "an etcd user needs its password: give --etcd-password-file"),
        (["--etcd-password-file", "PW"], "needs its user: give --etcd-username"),
    ],
)
def test_cli_user_and_password_come_together(tmp_path, store_dir, args, words):
    args = [_password_file(tmp_path) if arg == "PW" else arg for arg in args]
    result = _run("leases", "--store", f"file://{store_dir}", *args)
    assert result.exit_code == 2 and words in result.output


def test_cli_etcd_user_for_a_file_store_is_refused(tmp_path, store_dir, monkeypatch):
    monkeypatch.setenv("PYCNI_ETCD_USERNAME", "pycni")
    monkeypatch.setenv("PYCNI_ETCD_PASSWORD_FILE", _password_file(tmp_path))
    result = _run("leases", "--store", f"file://{store_dir}")
    assert result.exit_code == 2 and "an etcd user was given for the file store" in result.output


def test_cli_leases_table_and_json(store_dir, cfg):
    url = f"file://{store_dir}"
    with open_store(url) as s:
        acquire_lease(s, cfg, "192.168.1.10", MAC_A, node_name="node-a")
        acquire_lease(s, cfg, "192.168.1.11", MAC_B)
    table = _run("leases", "--store", url)
    assert table.exit_code == 0
    lines = table.output.splitlines()
    assert "2 of 256 subnets leased" in lines[0]
    assert lines[1].split() == ["SUBNET", "PUBLIC-IP", "VTEP-MAC", "NODE"]
    assert lines[2].split() == ["10.244.0.0/24", "192.168.1.10", MAC_A, "node-a"]
    assert lines[3].split() == ["10.244.1.0/24", "192.168.1.11", MAC_B, "-"]
    doc = json.loads(_run("leases", "--store", url, "--json").output)
    assert doc["config"]["Network"] == "10.244.0.0/16"
    assert [l["subnet"] for l in doc["leases"]] == ["10.244.0.0/24", "10.244.1.0/24"]
    assert doc["leases"][0]["nodeName"] == "node-a" and doc["revision"] >= 3


def test_cli_help_explains_the_store_url():
    result = _run("init", "--help")
    assert result.exit_code == 0 and "file:///DIR" in result.output and "etcd://HOST:PORT" in result.output


def test_leases_carry_the_vni_in_backend_data_as_newer_flannel_writes(store, cfg):
    lease = acquire_lease(store, cfg, "192.168.1.10", MAC_A, node_name="a")
    value = json.loads(store.get(lease.key).value)
    assert value["BackendData"] == {"VtepMAC": MAC_A, "VNI": cfg.vni}
    bad = dict(value, BackendData={"VtepMAC": MAC_A, "VNI": "one"})
    with pytest.raises(ValueError, match="BackendData.VNI"):
        NodeLease.from_json(lease.subnet, json.dumps(bad))


def test_direct_routing_round_trips_in_flannels_backend_field():
    cfg = ClusterConfig("10.244.0.0/16", direct_routing=True)
    doc = json.loads(cfg.to_json())
    assert doc["Backend"]["DirectRouting"] is True
    assert ClusterConfig.from_json(cfg.to_json()) == cfg
    assert "DirectRouting" not in json.loads(ClusterConfig("10.244.0.0/16").to_json())["Backend"]
    with pytest.raises(ValueError, match="DirectRouting"):
        ClusterConfig.from_json(json.dumps({"Network": "10.244.0.0/16", "Backend": {"DirectRouting": "yes"}}))
