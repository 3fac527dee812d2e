"""The cluster stores and the host tools at their trust boundaries. Root only.

* The file store: its directory 0700 (when the store makes it), every file in
  it 0600, the lock included (a lock anyone can open is a lock anyone can hold
  and freeze every node with); files of another uid refused; the lock taken
  with a deadline, after which StoreUnavailable names the PID and command of
  the process that holds it.
* etcd: a plain-http store warns once per process that its lease traffic is
  unauthenticated, naming the TLS flags; a TLS store does not. An answer larger
  than MAX_RESPONSE_BYTES (by Content-Length or as it streams), and a watch
  batch whose fragments add up to more, fail with ResponseTooLarge; a listing
  of many leases fits. The etcd here is a tiny HTTP server in a test
  namespace that answers as the gateway would, only bigger.
* Host tools: found with an empty or unset PATH, never through a relative
  PATH entry, only in root-owned directories nobody else can write.

Another uid is simulated with os.chown to 65534 (nobody); no user is added.
Every process a test starts is stopped by its PID; every namespace is deleted.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import pytest

import netns
from cni_plugins.kernel import hostcmd
from ipam.cluster import StoreError, StoreUnavailable, open_store
from ipam.cluster import errors as store_errors
from ipam.cluster import etcd as etcd_module
from ipam.cluster.filestore import FileStore
from tests.cluster_helpers import fresh_netns, make_tls_certs

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stays_in_its_namespace")]

NOBODY = 65534
MiB = 1024 * 1024


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# ---- the file store ------------------------------------------------------------------------------


def test_the_file_store_keeps_its_directory_and_files_to_root(tmp_path):
    directory = tmp_path / "store"
    store = open_store(f"file://{directory}")
    try:
        assert store.create("config", b'{"Network": "10.244.0.0/16"}')
        store.put("subnets/10.244.1.0-24", b"{}", ttl=60)
        store.delete("config")
    finally:
        store.close()
    assert mode(directory) == 0o700
    assert mode(directory / "subnets") == 0o700
    for name in (".lock", ".revision", ".changes", ".expiry", "subnets/10.244.1.0-24"):
        assert mode(directory / name) == 0o600, name


def test_an_older_world_readable_lock_is_tightened(tmp_path, caplog):
    directory = tmp_path / "store"
    directory.mkdir(mode=0o755)
    lock = directory / ".lock"
    lock.touch()
    os.chmod(lock, 0o644)
    store = FileStore(str(directory))
    try:
        with caplog.at_level(logging.WARNING, logger="pycni.store"):
            store.put("config", b"{}")
            store.put("config", b"{}")
    finally:
        store.close()
    assert mode(lock) == 0o600
    assert mode(directory) == 0o755  # an existing directory is the administrator's (not writable by others)
    tightened = [r for r in caplog.records if "tightened the lock file" in r.getMessage()]
    assert len(tightened) == 1


@pytest.mark.parametrize("name", [".lock", ".revision", ".changes"])
def test_a_lock_or_bookkeeping_file_of_another_uid_is_refused(tmp_path, name):
    directory = tmp_path / "store"
    store = open_store(f"file://{directory}")
    try:
        store.put("config", b"{}")
        os.chown(directory / name, NOBODY, -1)
        with pytest.raises(StoreError) as info:
            store.put("config", b"{}")
        message = str(info.value)
        assert f"{directory}/{name}" in message and f"owned by uid {NOBODY}, not by root" in message
        assert "remove it" in message and "no_root_squash" in message
    finally:
        store.close()


@pytest.mark.parametrize(
    "tamper, problem",
    [
        (lambda p: os.chown(p, NOBODY, -1), f"is owned by uid {NOBODY}"),
        (lambda p: os.chmod(p, 0o777), "is writable by group and others"),
    ],
)
def test_a_store_directory_someone_else_could_write_is_refused(tmp_path, tamper, problem):
    directory = tmp_path / "store"
    directory.mkdir()
    tamper(directory)
    with pytest.raises(StoreError, match=re.escape(f"refusing the file store {directory}: it {problem}")):
        open_store(f"file://{directory}")


HOLDER = r"""
import ctypes, fcntl, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(15, b"lockholder", 0, 0, 0)          # PR_SET_NAME: what /proc/PID/comm says
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
for _ in range(600):                              # at most 60 s; the test stops it by PID long before
    time.sleep(0.1)
"""


@contextmanager
def lock_held_by_another_process(lock_path: str) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, lock_path], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()  # by its PID
        proc.wait(timeout=10)


def test_a_lock_held_elsewhere_fails_after_the_deadline_naming_the_holder(tmp_path):
    directory = tmp_path / "store"
    store = FileStore(str(directory), timeout=0.5)
    try:
        store.put("config", b"{}")
        with lock_held_by_another_process(str(directory / ".lock")) as holder:
            for operation in (lambda: store.put("config", b"{}"), lambda: store.list("")):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable) as info:
                    operation()
                waited = time.monotonic() - started
                assert 0.5 <= waited < 3.0
                message = str(info.value)
                assert f"timed out after 0.5 s waiting for the lock {directory}/.lock" in message
                assert f"PID {holder.pid} (lockholder)" in message and f"kill {holder.pid}" in message
            assert store.get("config") is not None  # reading one key takes no lock
            # open_store passes its timeout on to the file store's lock
            other = open_store(f"file://{directory}", timeout=0.3)
            try:
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match=f"PID {holder.pid}"):
                    other.create("subnets/10.244.2.0-24", b"{}")
                assert time.monotonic() - started < 2.5
            finally:
                other.close()
        store.put("config", b"{}")  # free again once the holder is gone
    finally:
        store.close()


# ---- etcd: the plain-http warning -------------------------------------------------------------------


def _store_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pycni.store" and "without TLS" in r.getMessage()]


def test_a_plain_etcd_store_warns_once_per_process(monkeypatch, caplog):
    monkeypatch.setattr(etcd_module, "_plaintext_warned", False, raising=False)
    stores = []
    with caplog.at_level(logging.WARNING, logger="pycni.store"):
        for url in ("etcd://127.0.0.1:2379", "etcd://127.0.0.1:2379,127.0.0.2:2379", "etcd://127.0.0.3"):
            stores.append(open_store(url))
    for store in stores:
        store.close()
    [warning] = _store_warnings(caplog)
    assert "etcd://127.0.0.1:2379" in warning and "unauthenticated" in warning
    for flag in ("--etcd-cafile", "--etcd-certfile", "--etcd-keyfile"):
        assert flag in warning


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates")
def test_a_tls_etcd_store_does_not_warn(tmp_path, monkeypatch, caplog):
    certs = make_tls_certs(str(tmp_path / "pki"), ["127.0.0.1"])
    monkeypatch.setattr(etcd_module, "_plaintext_warned", False, raising=False)
    with caplog.at_level(logging.WARNING, logger="pycni.store"):
        for tls in (certs.client_files(), certs.client_files(with_client_cert=False)):
            open_store("etcd://127.0.0.1:2379", tls=tls).close()
    assert _store_warnings(caplog) == []
    with caplog.at_level(logging.WARNING, logger="pycni.store"):
        open_store("etcd://127.0.0.1:2379").close()  # a later plain store still warns
    assert len(_store_warnings(caplog)) == 1


# ---- etcd: bounded answers (a tiny gateway in a test namespace) -------------------------------------


Handler = Callable[[str, bytes, socket.socket], None]


@contextmanager
def tiny_gateway(handler: Handler) -> Iterator[tuple[str, str]]:
    """An HTTP/1.1 server on 127.0.0.1 of a fresh namespace: (namespace path, etcd:// URL); one request per
    connection, answered by handler(path, body, connection)."""
    with fresh_netns("trust") as ns:
        with netns.enter(ns):
            server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(0.2)
        stop = threading.Event()

        def serve_one(conn: socket.socket) -> None:
            with conn:
                conn.settimeout(10)
                data = b""
                while b"\r\n\r\n" not in data and len(data) < 65536:
                    piece = conn.recv(65536)
                    if not piece:
                        return
                    data += piece
                head, _, body = data.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                while len(body) < length:
                    piece = conn.recv(65536)
                    if not piece:
                        return
                    body += piece
                try:
                    handler(lines[0].split(" ")[1], body[:length], conn)
                except OSError:
                    pass  # the client hung up (as it should, for an answer too large)

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except socket.timeout:
                    continue
                except OSError:
                    return
                threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield ns, f"etcd://127.0.0.1:{server.getsockname()[1]}"
        finally:
            stop.set()
            thread.join(5)
            server.close()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _open_in(ns: str, url: str, **kwargs):
    with netns.enter(ns):
        return open_store(url, **kwargs)


def _lease_kv(i: int) -> dict:
    subnet = f"10.{i >> 8}.{i & 255}.0-24"
    value = json.dumps(
        {
            "PublicIP": f"192.168.{i >> 8}.{i & 255}",
            "BackendType": "vxlan",
            "BackendData": {"VtepMAC": "0a:58:0a:f4:01:01"},
            "NodeName": f"node-{i:06d}",
        }
    )
    return {
        "key": base64.b64encode(f"/pycni/subnets/{subnet}".encode()).decode(),
        "value": base64.b64encode(value.encode()).decode(),
        "mod_revision": str(i + 2),
        "create_revision": str(i + 2),
        "version": "1",
    }


def test_a_listing_of_many_leases_fits_and_an_oversized_answer_is_refused(monkeypatch):
    too_large = store_errors.ResponseTooLarge
    bound = etcd_module.MAX_RESPONSE_BYTES
    assert bound == 64 * MiB
    leases = 20000
    listing = json.dumps(
        {"header": {"revision": str(leases + 2)}, "kvs": [_lease_kv(i) for i in range(leases)], "count": str(leases)}
    ).encode()
    assert 4 * MiB < len(listing) < bound  # far beyond one watch message, far inside the bound
    sent = {"chunked": 0}

    def answer(path: str, body: bytes, conn: socket.socket) -> None:
        request = json.loads(body)
        key = base64.b64decode(request["key"]).decode()
        if key.startswith("/pycni/subnets/"):  # the listing, chunked as the gateway sends it
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(0, len(listing), MiB):
                conn.sendall(_chunk(listing[i : i + MiB]))
            conn.sendall(b"0\r\n\r\n")
        elif key == "/pycni/by-length":  # too large by its Content-Length: nothing is read
            conn.sendall(
                f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {bound + 1}\r\n\r\n".encode()
                + b'{"kvs": ['
            )
            conn.recv(1)  # until the client hangs up (or 10 s)
        else:  # too large as it streams: the client stops reading
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            piece = _chunk(b" " * MiB)
            for _ in range(bound // MiB + 8):  # bounded: a little more than the bound
                conn.sendall(piece)
                sent["chunked"] += MiB
            conn.sendall(b"0\r\n\r\n")

    with tiny_gateway(answer) as (ns, url):
        store = _open_in(ns, url, timeout=20)
        try:
            entries, revision = store.list("subnets/")
            assert len(entries) == leases and revision == leases + 2
            with pytest.raises(too_large) as info:
                store.get("by-length")
            assert f"{bound + 1} bytes by its Content-Length" in str(info.value)
            assert "larger than 67108864 bytes (64 MiB)" in str(info.value) and "--etcd-prefix" in str(info.value)
            with pytest.raises(too_large, match=r"answer to /v3/kv/range .* is larger than 67108864 bytes"):
                store.get("streamed")
            assert sent["chunked"] <= bound + 8 * MiB
            # The connection of the refused answer was dropped; the store goes on working.
            assert len(store.list("subnets/")[0]) == leases
        finally:
            store.close()


def test_a_watch_batch_larger_than_the_bound_is_refused(monkeypatch):
    too_large = store_errors.ResponseTooLarge
    monkeypatch.setattr(etcd_module, "MAX_RESPONSE_BYTES", MiB)  # the bound, scaled down for the test
    value = base64.b64encode(b"v" * (100 * 1024)).decode()

    def answer(path: str, body: bytes, conn: socket.socket) -> None:
        assert path == "/v3/watch"
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.sendall(_chunk(json.dumps({"result": {"header": {"revision": "5"}, "created": True}}).encode() + b"\n"))
        for i in range(20):  # 20 fragments of 100 KiB each: 2 MiB in one batch
            message = {
                "result": {
                    "header": {"revision": "7"},
                    "fragment": i < 19,
                    "events": [
                        {
                            "kv": {
                                "key": base64.b64encode(f"/pycni/subnets/10.244.{i}.0-24".encode()).decode(),
                                "value": value,
                                "mod_revision": "7",
                                "version": "1",
                            }
                        }
                    ],
                }
            }
            conn.sendall(_chunk(json.dumps(message).encode() + b"\n"))
        time.sleep(2)
        conn.sendall(b"0\r\n\r\n")

    with tiny_gateway(answer) as (ns, url):
        store = _open_in(ns, url)
        watch = store.watch("subnets/", 5)
        try:
            with pytest.raises(too_large, match="one batch of watch events .* larger than 1048576 bytes"):
                for _ in range(20):  # bounded; the first batch is the oversized one
                    watch.next(2.0)
            assert watch.revision == 5  # nothing of the refused batch was applied
        finally:
            watch.close()
            store.close()


# ---- host tools ---------------------------------------------------------------------------------------


@contextmanager
def path_set_to(value: str | None) -> Iterator[None]:
    """PATH set to value (None: unset) for the body only (namespaces are made and removed with the real one)."""
    saved = os.environ.get("PATH")
    try:
        if value is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = value
        yield
    finally:
        if saved is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = saved


@pytest.mark.parametrize("path", ["", None], ids=["empty PATH", "no PATH"])
def test_host_tools_are_found_without_a_path(path):
    with fresh_netns("trust") as ns, netns.enter(ns), path_set_to(path):
        assert hostcmd.run(["nft", "list", "tables"]).strip() == ""
        hostcmd.run(["nft", "add", "table", "inet", "pycni_trust"])
        assert "table inet pycni_trust" in hostcmd.run(["nft", "list", "tables"])
        assert "-P INPUT ACCEPT" in hostcmd.run(["iptables", "-S"])


def test_a_relative_path_entry_is_never_used(tmp_path, monkeypatch):
    planted = tmp_path / "nft"
    planted.write_text('#!/bin/sh\n: > "$0.ran"\n')
    os.chmod(planted, 0o755)
    monkeypatch.chdir(tmp_path)
    with fresh_netns("trust") as ns, netns.enter(ns):
        for path in (".", "", ":bin", "./"):
            with path_set_to(path):
                assert hostcmd.find_tool("nft") in (
                    "/usr/sbin/nft",
                    "/sbin/nft",
                    "/usr/bin/nft",
                    "/bin/nft",
                    "/usr/local/sbin/nft",
                    "/usr/local/bin/nft",
                )
                hostcmd.run(["nft", "list", "tables"])
            assert not (tmp_path / "nft.ran").exists(), f"PATH={path!r} ran ./nft"


def test_the_fallback_directories_must_be_roots_alone(tmp_path, monkeypatch):
    safe = tmp_path / "sbin"
    safe.mkdir()
    tool = safe / "pycni-trust-tool"
    tool.write_text("#!/bin/sh\necho fallback\n")
    os.chmod(tool, 0o755)
    monkeypatch.setattr(hostcmd, "SAFE_DIRS", (str(safe),))
    monkeypatch.setenv("PATH", "")  # nothing here needs another program from PATH
    os.chmod(safe, 0o755)
    assert hostcmd.find_tool("pycni-trust-tool") == str(tool)
    assert hostcmd.run(["pycni-trust-tool"]).strip() == "fallback"
    for tamper in (
        lambda: os.chmod(safe, 0o777),
        lambda: os.chmod(safe, 0o775),
        lambda: os.chown(safe, NOBODY, -1),
        lambda: os.chmod(tool, 0o757),
    ):
        os.chown(safe, 0, -1)
        os.chmod(safe, 0o755)
        os.chmod(tool, 0o755)
        tamper()
        assert hostcmd.find_tool("pycni-trust-tool") is None
        with pytest.raises(hostcmd.HostToolError, match="not found") as info:
            hostcmd.run(["pycni-trust-tool"])
        assert info.value.missing
    # The inherited PATH is the administrator's: an absolute entry is used as it is.
    monkeypatch.setenv("PATH", str(safe))
    assert hostcmd.find_tool("pycni-trust-tool") == str(tool)
