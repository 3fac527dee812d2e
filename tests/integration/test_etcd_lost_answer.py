"""create() and replace() against a real etcd when the answer to their txn is lost. Root only.

A small HTTP proxy in front of the member forwards every request, but for the
txn it is armed for it reads etcd's whole answer (the write is committed) and
then closes the client's connection without relaying it. The store is opened
as etcd://PROXY,ETCD, so the client retries the txn: on a fresh connection to
the proxy when the lost answer came over a kept-alive connection, else on the
next endpoint (etcd itself). The retried txn meets the first attempt's own
write; the store must recognise it, report success and keep its lease. A key
written by someone else is still a conflict: False, and the lease granted for
the call is revoked.

etcd and the proxy run inside a namespace these tests create, both on
127.0.0.1 there; the proxy's threads are bounded by socket timeouts and the
server is shut down by the fixture.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import netns
from ipam.cluster import open_store
from tests.cluster_helpers import etcd_in_netns, etcd_skip_reason

pytestmark = [
    pytest.mark.integration,
    pytest.mark.etcd,
    pytest.mark.skipif(etcd_skip_reason() is not None, reason=etcd_skip_reason() or ""),
]

TTL = 60
TIMEOUT = 5.0


class LosingProxy:
    """Forwards POSTs to one etcd member; loses the answer of the next txn once armed.

    keep_alive=False answers every request with "Connection: close", so the
    client's txn goes out on a fresh connection and, when its answer is lost,
    fails over to the next endpoint; with keep_alive the client reconnects to
    the proxy and retries there.
    """

    def __init__(self, netns_path: str, upstream: tuple[str, int], keep_alive: bool = True) -> None:
        self.netns_path = netns_path
        self.upstream = upstream
        self.keep_alive = keep_alive
        self.paths: list[str] = []  # every request forwarded, in order
        self.lost: list[bytes] = []  # the answers it kept from the client
        self._armed = False
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10  # an idle kept-alive connection cannot hold a thread for long

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, content_type, data = proxy._forward(self.path, body)
                if proxy._lose(self.path, data):
                    self.close_connection = True  # the member has done it; the client never hears
                    return
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                if not proxy.keep_alive:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
                pass

        with netns.enter(netns_path):  # the listening socket, and the threads started from here, live there
            self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            self.thread = threading.Thread(
                target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name="losing-proxy", daemon=True
            )
            self.thread.start()

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{host}:{port}"

    def arm(self) -> None:
        """Lose the answer to the next /v3/kv/txn."""
        with self._lock:
            self._armed = True

    def txns(self) -> int:
        with self._lock:
            return self.paths.count("/v3/kv/txn")

    def _forward(self, path: str, body: bytes) -> tuple[int, str, bytes]:
        with netns.enter(self.netns_path):
            conn = http.client.HTTPConnection(*self.upstream, timeout=TIMEOUT)
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
            finally:
                conn.close()
        with self._lock:
            self.paths.append(path)
        return response.status, response.getheader("Content-Type", "application/json"), data

    def _lose(self, path: str, data: bytes) -> bool:
        with self._lock:
            if path != "/v3/kv/txn" or not self._armed:
                return False
            self._armed = False
            self.lost.append(data)
            return True

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def etcd():
    with etcd_in_netns("etcdl") as member:
        yield member


@pytest.fixture(params=["reconnect", "failover"])
def proxy(request, etcd):
    p = LosingProxy(etcd.netns, (etcd.ip, etcd.client_port), keep_alive=request.param == "reconnect")
    yield p
    p.close()


@pytest.fixture
def prefix() -> str:
    return f"/lost-{os.urandom(4).hex()}"


@pytest.fixture
def store(etcd, proxy, prefix):
    """Our store: the proxy first, etcd itself second; it has talked to the proxy once."""
    with netns.enter(etcd.netns):
        s = open_store(f"etcd://{proxy.endpoint},{etcd.endpoint}", prefix=prefix, timeout=TIMEOUT)
    assert s.get("nothing-here") is None  # with keep_alive the txn reuses this connection
    assert s.current_endpoint == s.endpoints[0]
    yield s
    s.close()


@pytest.fixture
def other(etcd, prefix):
    """Another writer, straight to etcd."""
    with netns.enter(etcd.netns):
        s = open_store(etcd.url, prefix=prefix, timeout=TIMEOUT)
    yield s
    s.close()


def _gateway(member, path: str, body: dict) -> dict:
    with netns.enter(member.netns):
        conn = http.client.HTTPConnection(member.ip, member.client_port, timeout=TIMEOUT)
        try:
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
    assert response.status == 200, data
    return json.loads(data)


def _raw_kv(member, prefix: str, key: str) -> dict:
    answer = _gateway(member, "/v3/kv/range", {"key": base64.b64encode(f"{prefix}/{key}".encode()).decode()})
    kvs = answer.get("kvs") or []
    assert len(kvs) == 1, answer
    return kvs[0]


def _lease_ttl(member, lease: int) -> int:
    """Seconds the lease has left; -1 when etcd does not know it (revoked or expired)."""
    return int(_gateway(member, "/v3/lease/timetolive", {"ID": str(lease)}).get("TTL", -1))


def _leases(member) -> set[int]:
    return {int(item["ID"]) for item in _gateway(member, "/v3/lease/leases", {}).get("leases") or []}


def _check_lost_and_retried(proxy) -> None:
    assert len(proxy.lost) == 1
    lost = json.loads(proxy.lost[0])
    assert lost.get("succeeded") is True  # the member did carry out the first attempt
    # reconnect: the retry went to the proxy again; failover: to etcd itself.
    assert proxy.txns() == (2 if proxy.keep_alive else 1)


def _assert_ours_with_a_live_lease(member, prefix: str, key: str, value: bytes) -> None:
    kv = _raw_kv(member, prefix, key)
    assert base64.b64decode(kv["value"]) == value
    lease = int(kv.get("lease", 0))
    assert lease != 0
    assert 0 < _lease_ttl(member, lease) <= TTL


# -- create ---------------------------------------------------------------------------------


def test_create_with_ttl_keeps_its_key_when_the_answer_is_lost(etcd, proxy, store, prefix):
    proxy.arm()
    assert store.create("subnets/10.244.1.0-24", b"ours", ttl=TTL) is True
    _check_lost_and_retried(proxy)
    entry = store.get("subnets/10.244.1.0-24")
    assert entry is not None and entry.value == b"ours" and entry.version == 1
    _assert_ours_with_a_live_lease(etcd, prefix, "subnets/10.244.1.0-24", b"ours")
    assert store.refresh("subnets/10.244.1.0-24") is True


def test_create_without_ttl_keeps_its_key_when_the_answer_is_lost(proxy, store):
    proxy.arm()
    assert store.create("config", b"ours") is True
    _check_lost_and_retried(proxy)
    entry = store.get("config")
    assert entry is not None and entry.value == b"ours" and entry.version == 1


def test_create_against_another_writers_key_is_still_a_conflict(etcd, proxy, store, other):
    assert other.create("subnets/10.244.2.0-24", b"theirs", ttl=TTL) is True
    before = _leases(etcd)
    proxy.arm()  # the answer of the failed txn is lost too: the retry must not mistake their key for ours
    assert store.create("subnets/10.244.2.0-24", b"ours", ttl=TTL) is False
    assert len(proxy.lost) == 1 and json.loads(proxy.lost[0]).get("succeeded", False) is False
    assert store.get("subnets/10.244.2.0-24").value == b"theirs"
    assert _leases(etcd) == before  # the lease granted for our call is revoked again
    # Same without a lost answer.
    assert store.create("subnets/10.244.2.0-24", b"ours", ttl=TTL) is False
    assert _leases(etcd) == before


def test_create_of_an_equal_value_by_someone_else_is_a_conflict_without_a_retry(proxy, store, other):
    # Without a TTL there is no lease to tell writers apart: only a retried txn may claim the key.
    assert other.create("config", b"same") is True
    assert store.create("config", b"same") is False
    assert proxy.lost == []


# -- replace --------------------------------------------------------------------------------


def test_replace_with_ttl_succeeds_when_the_answer_is_lost(etcd, proxy, store, other, prefix):
    other.put("subnets/10.244.3.0-24", b"old")
    before = store.get("subnets/10.244.3.0-24")
    proxy.arm()
    assert store.replace("subnets/10.244.3.0-24", b"renewed", before.mod_revision, ttl=TTL) is True
    _check_lost_and_retried(proxy)
    entry = store.get("subnets/10.244.3.0-24")
    assert entry.value == b"renewed" and entry.mod_revision > before.mod_revision
    _assert_ours_with_a_live_lease(etcd, prefix, "subnets/10.244.3.0-24", b"renewed")


def test_replace_without_ttl_succeeds_when_the_answer_is_lost(proxy, store, other):
    other.put("config", b"old")
    before = store.get("config")
    proxy.arm()
    assert store.replace("config", b"new", before.mod_revision) is True
    _check_lost_and_retried(proxy)
    entry = store.get("config")
    assert entry.value == b"new" and entry.version == before.version + 1


def test_replace_after_another_writer_is_still_a_conflict(etcd, proxy, store, other):
    other.put("subnets/10.244.4.0-24", b"old")
    seen = store.get("subnets/10.244.4.0-24")
    other.put("subnets/10.244.4.0-24", b"theirs")  # someone else got there first
    before = _leases(etcd)
    proxy.arm()
    assert store.replace("subnets/10.244.4.0-24", b"ours", seen.mod_revision, ttl=TTL) is False
    assert len(proxy.lost) == 1
    assert store.get("subnets/10.244.4.0-24").value == b"theirs"
    assert _leases(etcd) == before
    # Without a TTL, and without a lost answer.
    assert store.replace("subnets/10.244.4.0-24", b"ours", seen.mod_revision) is False
    assert store.get("subnets/10.244.4.0-24").value == b"theirs"


def test_replace_of_a_recreated_key_is_a_conflict_even_after_a_retry(proxy, store, other):
    other.put("config", b"old")
    seen = store.get("config")
    other.delete("config")
    other.put("config", b"new")  # deleted and made again by someone else, with our value
    proxy.arm()
    assert store.replace("config", b"new", seen.mod_revision) is False
