"""The etcd v3 store: a small client for etcd's JSON gateway (stdlib http.client).

etcd 3.4 serves the gateway under /v3: POST JSON with base64 keys and values,
int64 fields as decimal strings, fields equal to their default left out of
answers. This client uses:

    /v3/kv/range, /v3/kv/put, /v3/kv/deleterange   reads and plain writes
    /v3/kv/txn         create-if-absent (compare version == 0) and
                       compare-and-swap (compare mod_revision)
    /v3/lease/grant, /v3/lease/keepalive, /v3/lease/revoke   TTLs
    /v3/watch          a streaming POST answered with newline-delimited JSON

Endpoints are tried in order; the client stays on the one that answered and
moves to the next on a connection error (or when a member has lost its
leader). A request whose answer was lost may be retried on another member
(or on a fresh connection to the same one), as any etcd client does. For
create and replace that retry can meet the first attempt's own committed
write and fail its compare, so their txn reads the key in its failure branch
and the client recognises its own write:

    create   the key carries the lease granted for this call and our value;
             without a TTL (no lease to tell writers apart): the txn was
             sent more than once, the key has our value, no lease and
             version 1 (created once, unchanged since)
    replace  the key carries the lease granted for this call and our value;
             without a TTL: the txn was sent more than once, the key has our
             value, no lease, and it is the same key (create_revision <=
             the expected mod_revision) changed since (mod_revision greater)

Then the call reports success and keeps its lease. Any other failure is a
genuine conflict: the lease granted for the call is revoked and the call
returns False.

Sockets are opened in the network namespace of the thread that constructed
the store, whichever thread uses it later: agents and tests build a store in
one namespace and use it from other threads.
"""
from __future__ import annotations

import base64
import errno
import http.client
import json
import os
import socket
import ssl
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager

from .errors import Compacted, StoreError, StoreUnavailable
from .store import (ACCEPTED_URLS, Entry, Store, TLSFiles, check_ttl, check_value, validate_key,
                    validate_prefix)

DEFAULT_CLIENT_PORT = 2379

# gRPC status codes the gateway reports in {"code": N}; these mean "this member
# cannot serve right now" (no leader, shutting down, timed out): try another.
_GRPC_UNAVAILABLE = 14
_GRPC_DEADLINE_EXCEEDED = 4
_RETRY_CODES = {_GRPC_UNAVAILABLE, _GRPC_DEADLINE_EXCEEDED}
_RETRY_PAUSE = 0.2

_CONNECTION_ERRORS = (OSError, http.client.HTTPException)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoints(url: str, rest: str) -> list[Endpoint]:
    """HOST:PORT[,HOST:PORT...] (IPv6 as [ADDR]:PORT; PORT defaults to 2379)."""
    rest = rest.rstrip("/")
    if not rest or "/" in rest or "?" in rest or "#" in rest or "@" in rest:
        raise StoreError(f"invalid store URL {url!r}: use {ACCEPTED_URLS}")
    endpoints = []
    for item in rest.split(","):
        item = item.strip()
        if item.startswith("["):
            host, sep, tail = item[1:].partition("]")
            if not sep or (tail and not tail.startswith(":")):
                raise StoreError(f"invalid etcd endpoint {item!r} in {url!r}: write IPv6 as [ADDR]:PORT")
            port_text = tail[1:] if tail else ""
        else:
            host, _, port_text = item.partition(":")
            if ":" in port_text:
                raise StoreError(f"invalid etcd endpoint {item!r} in {url!r}: write IPv6 as [ADDR]:PORT")
        if not host:
            raise StoreError(f"invalid etcd endpoint {item!r} in {url!r}: the host is missing; "
                             f"use {ACCEPTED_URLS}")
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise StoreError(f"invalid etcd endpoint {item!r} in {url!r}: the port must be 1..65535")
            port = int(port_text)
        else:
            port = DEFAULT_CLIENT_PORT
        endpoints.append(Endpoint(host, port))
    return endpoints


@dataclass
class _Sends:
    """How many times one request was sent (to any member, over any connection)."""

    count: int = 0


@dataclass(frozen=True)
class _FoundKey:
    """The key a txn's failure branch read, decoded from the gateway's answer."""

    value: bytes
    lease: int
    version: int
    create_revision: int
    mod_revision: int


class _EndpointFailed(Exception):
    """One endpoint could not serve a request; the message says why."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable  # the member is alive but cannot serve right now


class EtcdStore(Store):
    """A Store backed by an etcd v3 cluster; see the module docstring."""

    def __init__(self, endpoints: list[Endpoint], *, prefix: str = "/pycni", tls: TLSFiles | None = None,
                 timeout: float = 5.0) -> None:
        if not endpoints:
            raise StoreError(f"no etcd endpoints given: use {ACCEPTED_URLS}")
        if not isinstance(prefix, str) or "\0" in prefix:
            raise StoreError(f"invalid etcd key prefix {prefix!r}")
        self.endpoints = list(endpoints)
        self.prefix = prefix
        self._base = prefix if prefix in ("", "/") else prefix.rstrip("/") + "/"
        self.timeout = float(timeout)
        self._ssl = _ssl_context(tls) if tls is not None else None
        self._scheme = "https" if self._ssl is not None else "http"
        self._client_cert = bool(tls and tls.certfile)
        try:
            self._ns_fd: int | None = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise StoreError(f"cannot open this thread's network namespace: {err.strerror} "
                             f"(is /proc mounted?)") from None
        st = os.fstat(self._ns_fd)
        self._ns_id = (st.st_dev, st.st_ino)
        self._lock = threading.Lock()  # guards the shared connection used by unary requests
        self._conn: http.client.HTTPConnection | None = None
        self._conn_index = 0
        self._preferred = 0

    def __repr__(self) -> str:
        return f"EtcdStore({self.url()!r}, prefix={self.prefix!r})"

    def url(self) -> str:
        return "etcd://" + ",".join(ep.netloc() for ep in self.endpoints)

    @property
    def current_endpoint(self) -> Endpoint:
        """The endpoint tried first: the one that answered last."""
        return self.endpoints[self._preferred]

    # -- the Store interface ------------------------------------------------

    def get(self, key: str) -> Entry | None:
        validate_key(key)
        answer = self._call("/v3/kv/range", {"key": _b64(self._full(key))})
        kvs = answer.get("kvs") or []
        return self._entry(kvs[0]) if kvs else None

    def list(self, prefix: str) -> tuple[list[Entry], int]:
        validate_prefix(prefix)
        full = self._full(prefix)
        if full:
            body = {"key": _b64(full), "range_end": _b64(_prefix_end(full))}
        else:
            body = {"key": _b64(b"\0"), "range_end": _b64(b"\0")}  # every key
        answer = self._call("/v3/kv/range", body)
        entries = [self._entry(kv) for kv in answer.get("kvs") or []]
        entries = [e for e in entries if e is not None]
        entries.sort(key=lambda e: e.key)
        return entries, _revision(answer)

    def create(self, key: str, value: bytes, ttl: int | None = None) -> bool:
        validate_key(key)
        value, ttl = check_value(value), check_ttl(ttl)
        full = _b64(self._full(key))
        lease = self._grant(ttl) if ttl is not None else 0
        put: dict[str, Any] = {"key": full, "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        sends = _Sends()
        answer = self._call("/v3/kv/txn", {
            "compare": [{"key": full, "target": "VERSION", "result": "EQUAL", "version": "0"}],
            "success": [{"request_put": put}],
            "failure": [{"request_range": {"key": full}}],
        }, sends)
        if answer.get("succeeded", False):
            return True
        found = _failure_kv(answer)
        if found is not None and found.value == value and found.lease == lease and (
                lease or (sends.count > 1 and found.version == 1)):
            return True  # our first attempt committed; its answer was lost and the retry met our own key
        if lease:
            self._revoke(lease)
        return False

    def put(self, key: str, value: bytes, ttl: int | None = None) -> int:
        validate_key(key)
        value, ttl = check_value(value), check_ttl(ttl)
        body: dict[str, Any] = {"key": _b64(self._full(key)), "value": _b64(value)}
        if ttl is not None:
            body["lease"] = str(self._grant(ttl))
        return _revision(self._call("/v3/kv/put", body))

    def replace(self, key: str, value: bytes, expected_mod_revision: int, ttl: int | None = None) -> bool:
        validate_key(key)
        value, ttl = check_value(value), check_ttl(ttl)
        if expected_mod_revision <= 0:
            return False  # a key that exists has a positive mod_revision
        full = _b64(self._full(key))
        lease = self._grant(ttl) if ttl is not None else 0
        put: dict[str, Any] = {"key": full, "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        sends = _Sends()
        answer = self._call("/v3/kv/txn", {
            "compare": [{"key": full, "target": "MOD", "result": "EQUAL",
                         "mod_revision": str(int(expected_mod_revision))}],
            "success": [{"request_put": put}],
            "failure": [{"request_range": {"key": full}}],
        }, sends)
        if answer.get("succeeded", False):
            return True
        found = _failure_kv(answer)
        if found is not None and found.value == value and found.lease == lease and (
                lease or (sends.count > 1
                          and found.create_revision <= expected_mod_revision < found.mod_revision)):
            return True  # our first attempt committed; its answer was lost and the retry met our own write
        if lease:
            self._revoke(lease)
        return False

    def delete(self, key: str) -> bool:
        validate_key(key)
        answer = self._call("/v3/kv/deleterange", {"key": _b64(self._full(key))})
        return int(answer.get("deleted", 0)) > 0

    def ttl(self, key: str) -> int | None:
        validate_key(key)
        kvs = self._call("/v3/kv/range", {"key": _b64(self._full(key))}).get("kvs") or []
        lease = int(kvs[0].get("lease", 0)) if kvs else 0
        if not lease:
            return None
        granted = int(self._call("/v3/lease/timetolive", {"ID": str(lease)}).get("grantedTTL", 0))
        return granted or None

    def refresh(self, key: str) -> bool:
        validate_key(key)
        answer = self._call("/v3/kv/range", {"key": _b64(self._full(key))})
        kvs = answer.get("kvs") or []
        if not kvs:
            return False
        lease = int(kvs[0].get("lease", 0))
        if not lease:
            return True  # no TTL: nothing to renew, and it does not expire
        result = self._call("/v3/lease/keepalive", {"ID": str(lease)}).get("result") or {}
        return int(result.get("TTL", 0)) > 0

    def wait(self, prefix: str, after_revision: int, timeout: float) -> int | None:
        validate_prefix(prefix)
        deadline = time.monotonic() + max(0.0, timeout)
        full = self._full(prefix)
        request: dict[str, Any] = {
            "key": _b64(full or b"\0"),
            "range_end": _b64(_prefix_end(full) if full else b"\0"),
            "start_revision": str(int(after_revision) + 1),
        }
        conn, sock, response, endpoint = self._open_watch({"create_request": request})
        try:
            return self._follow_watch(sock, response, endpoint, deadline)
        finally:
            response.close()
            conn.close()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            fd, self._ns_fd = self._ns_fd, None
            if fd is not None:
                os.close(fd)

    # -- leases ---------------------------------------------------------------

    def _grant(self, ttl: int) -> int:
        answer = self._call("/v3/lease/grant", {"TTL": str(ttl)})
        if answer.get("error"):
            raise StoreError(f"etcd refused a lease of {ttl} s: {answer['error']}")
        lease = int(answer.get("ID", 0))
        if not lease:
            raise StoreError(f"etcd granted no lease for a TTL of {ttl} s (answer: {answer})")
        return lease

    def _revoke(self, lease: int) -> None:
        try:
            self._call("/v3/lease/revoke", {"ID": str(lease)})
        except StoreError:
            pass  # it expires on its own

    # -- keys -------------------------------------------------------------------

    def _full(self, key: str) -> bytes:
        return (self._base + key).encode("utf-8")

    def _entry(self, kv: dict[str, Any]) -> Entry | None:
        raw_key = base64.b64decode(kv.get("key", ""))
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if not key.startswith(self._base):
            return None
        return Entry(key=key[len(self._base):], value=base64.b64decode(kv.get("value", "")),
                     mod_revision=int(kv.get("mod_revision", 0)), version=int(kv.get("version", 0)))

    # -- connections ------------------------------------------------------------

    def _in_home_netns(self) -> ContextManager[Any]:
        """Enter the namespace the store was built in, unless this thread is already there."""
        fd = self._ns_fd
        if fd is None:
            raise StoreError(f"the etcd store {self.url()} is closed")
        try:
            st = os.stat("/proc/thread-self/ns/net")
            if (st.st_dev, st.st_ino) == self._ns_id:
                return nullcontext()
        except OSError:
            pass
        import netns

        return netns.enter(f"/proc/self/fd/{fd}")

    def _connect(self, index: int) -> http.client.HTTPConnection:
        endpoint = self.endpoints[index]
        conn: http.client.HTTPConnection
        if self._ssl is not None:
            conn = http.client.HTTPSConnection(endpoint.host, endpoint.port, timeout=self.timeout,
                                               context=self._ssl)
        else:
            conn = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=self.timeout)
        conn.auto_open = 0  # never reconnect behind our back (that could be in the wrong namespace)
        try:
            with self._in_home_netns():
                conn.connect()
        except BaseException:
            conn.close()
            raise
        return conn

    def _call(self, path: str, body: dict[str, Any], sends: _Sends | None = None) -> dict[str, Any]:
        """POST body to path on the first endpoint that can answer; return the decoded answer.

        sends, if given, counts how often the request went out (more than once:
        an earlier attempt may have been carried out although its answer was lost).
        """
        payload = json.dumps(body).encode()
        sends = sends if sends is not None else _Sends()
        deadline = time.monotonic() + self.timeout
        with self._lock:
            while True:
                failures: list[str] = []
                any_retryable = False
                count = len(self.endpoints)
                for step in range(count):
                    index = (self._preferred + step) % count
                    try:
                        answer = self._call_endpoint(index, path, payload, sends)
                    except _EndpointFailed as failure:
                        failures.append(f"{self._endpoint_url(index)}: {failure}")
                        any_retryable = any_retryable or failure.retryable
                        continue
                    self._preferred = index
                    return answer
                if not any_retryable or time.monotonic() + _RETRY_PAUSE >= deadline:
                    raise StoreUnavailable(self._unavailable_message(failures))
                time.sleep(_RETRY_PAUSE)  # a member is up but has no leader (yet): election under way

    def _call_endpoint(self, index: int, path: str, payload: bytes, sends: _Sends) -> dict[str, Any]:
        for attempt in range(2):
            reused = self._conn is not None and self._conn_index == index and self._conn.sock is not None
            if not reused:
                self._drop_connection()
                try:
                    self._conn = self._connect(index)
                except _CONNECTION_ERRORS as err:
                    raise _EndpointFailed(self._describe(err)) from None
                self._conn_index = index
            conn = self._conn
            assert conn is not None
            try:
                sends.count += 1
                conn.request("POST", path, body=payload, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
            except _CONNECTION_ERRORS as err:
                self._drop_connection()
                if reused and attempt == 0 and _is_stale_connection(err):
                    continue  # the member closed an idle kept-alive connection: reconnect once
                raise _EndpointFailed(self._describe(err)) from None
            if response.will_close:
                self._drop_connection()
            return self._decode(response.status, data, path)
        raise AssertionError("unreachable")

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _decode(self, status: int, data: bytes, path: str) -> dict[str, Any]:
        try:
            answer = json.loads(data) if data else {}
        except ValueError:
            text = data[:200].decode("utf-8", "replace").strip()
            if "HTTPS" in text:
                raise _EndpointFailed(f"the server speaks TLS ({text!r}): use TLS files "
                                      f"(--etcd-cafile, and a client certificate if it asks for one)") from None
            raise _EndpointFailed(f"HTTP {status} from {path} with a non-JSON body {text!r}: "
                                  f"is this an etcd v3 (>= 3.4) client URL?") from None
        if not isinstance(answer, dict):
            raise _EndpointFailed(f"unexpected answer from {path}: {str(answer)[:200]}")
        if status == 200:
            return answer
        message = answer.get("message") or answer.get("error") or f"HTTP {status}"
        code = answer.get("code")
        if code in _RETRY_CODES or status in (502, 503, 504):
            raise _EndpointFailed(str(message), retryable=True)
        if status == 404:
            raise StoreError(f"etcd has no {path}: this client needs etcd >= 3.4 (the /v3 JSON gateway)")
        raise StoreError(f"etcd refused {path}: {message}")

    def _describe(self, err: BaseException) -> str:
        return _describe(err, tls=self._ssl is not None, client_cert=self._client_cert)

    def _endpoint_url(self, index: int) -> str:
        return f"{self._scheme}://{self.endpoints[index].netloc()}"

    def _unavailable_message(self, failures: list[str]) -> str:
        return "no etcd endpoint could serve the request: " + "; ".join(failures)

    # -- watch -------------------------------------------------------------------

    def _open_watch(self, body: dict[str, Any]) -> tuple[http.client.HTTPConnection, socket.socket,
                                                         http.client.HTTPResponse, str]:
        payload = json.dumps(body).encode()
        failures: list[str] = []
        count = len(self.endpoints)
        with self._lock:
            first = self._preferred
        for step in range(count):
            index = (first + step) % count
            url = self._endpoint_url(index)
            try:
                conn = self._connect(index)
            except _CONNECTION_ERRORS as err:
                failures.append(f"{url}: {self._describe(err)}")
                continue
            sock = conn.sock  # the response reads from it even if conn lets go of it
            try:
                conn.request("POST", "/v3/watch", body=payload, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
            except _CONNECTION_ERRORS as err:
                conn.close()
                failures.append(f"{url}: {self._describe(err)}")
                continue
            if response.status != 200:
                data = response.read()
                conn.close()
                try:
                    self._decode(response.status, data, "/v3/watch")
                except _EndpointFailed as failure:
                    failures.append(f"{url}: {failure}")
                    continue
                failures.append(f"{url}: HTTP {response.status}")
                continue
            with self._lock:
                self._preferred = index
            return conn, sock, response, url
        raise StoreUnavailable(self._unavailable_message(failures))

    def _follow_watch(self, sock: socket.socket, response: http.client.HTTPResponse, url: str,
                      deadline: float) -> int | None:
        decoder = json.JSONDecoder()
        buffer = ""
        pending = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            sock.settimeout(max(0.01, remaining))
            try:
                chunk = response.read1(65536)
            except (socket.timeout, TimeoutError):
                return None
            except _CONNECTION_ERRORS as err:
                raise StoreUnavailable(f"lost the watch connection to {url}: {self._describe(err)}") from None
            if not chunk:
                raise StoreUnavailable(f"lost the watch connection to {url}: the server closed it")
            pending += chunk
            try:
                buffer += pending.decode("utf-8")
                pending = b""
            except UnicodeDecodeError:
                continue  # a multi-byte character split across chunks: wait for the rest
            while True:
                buffer = buffer.lstrip()
                if not buffer:
                    break
                try:
                    message, end = decoder.raw_decode(buffer)
                except ValueError:
                    break  # incomplete: read more
                buffer = buffer[end:]
                found = _watch_message(message, url)
                if found is not None:
                    return found


def _watch_message(message: Any, url: str) -> int | None:
    """The revision a watch message reports a change at, None for bookkeeping messages."""
    if not isinstance(message, dict):
        raise StoreError(f"unexpected watch message from {url}: {str(message)[:200]}")
    if "error" in message:
        error = message["error"]
        text = error.get("message", error) if isinstance(error, dict) else error
        raise StoreUnavailable(f"lost the watch connection to {url}: {text}")
    result = message.get("result") or {}
    compact = int(result.get("compact_revision", 0))
    if compact:
        raise Compacted(f"the watched revision is compacted (etcd keeps history from revision {compact}): "
                        f"list again, then watch from the listed revision", compact_revision=compact)
    if result.get("canceled"):
        raise StoreError(f"etcd canceled the watch on {url}: {result.get('cancel_reason') or 'no reason given'}")
    events = result.get("events") or []
    if not events:
        return None  # "created" or a progress notification
    revisions = [int((event.get("kv") or {}).get("mod_revision", 0)) for event in events]
    return max(revisions) or _revision(result)


def _ssl_context(tls: TLSFiles) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=tls.cafile)
        if tls.certfile:
            context.load_cert_chain(tls.certfile, tls.keyfile)
        elif tls.keyfile:
            raise StoreError("an etcd client key was given without its certificate: give --etcd-certfile too")
    except (OSError, ssl.SSLError) as err:
        files = ", ".join(f for f in (tls.cafile, tls.certfile, tls.keyfile) if f)
        raise StoreError(f"cannot load the etcd TLS files ({files}): {getattr(err, 'strerror', None) or err}") \
            from None
    return context


def _describe(err: BaseException, tls: bool = False, client_cert: bool = False) -> str:
    """A short, actionable reason for a failed connection or request."""
    if not client_cert:
        cert_hint = "the server may require a client certificate: give one it trusts (and its key)"
    else:
        cert_hint = "the server did not accept the client certificate: is it signed by a CA the server trusts?"
    if isinstance(err, ssl.SSLCertVerificationError):
        return (f"TLS certificate verification failed: {err.verify_message or err} "
                f"(is the CA file the one that signed the server certificate, and does the certificate "
                f"name this host or IP?)")
    if isinstance(err, ssl.SSLEOFError):
        return f"the server closed the TLS connection ({cert_hint})"
    if isinstance(err, ssl.SSLError):
        reason = (err.reason or str(err)).lower()
        if any(word in reason for word in ("certificate_required", "certificate required", "bad_certificate",
                                           "unknown_ca", "handshake_failure")):
            return f"TLS handshake refused ({err.reason or err}): {cert_hint}"
        if "wrong_version_number" in reason or "wrong version number" in reason:
            return f"TLS failed ({err.reason or err}): the server does not speak TLS; use it without TLS files"
        return f"TLS error: {err.reason or err}"
    if isinstance(err, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(err, (ConnectionResetError, BrokenPipeError)) or (
            tls and isinstance(err, http.client.RemoteDisconnected)):
        if tls:
            return f"connection reset by the server during TLS ({cert_hint})"
        return ("connection reset by the server (if it serves TLS, give TLS files: a CA file, and a client "
                "certificate if it asks for one)")
    if isinstance(err, OSError) and err.errno is not None:
        return os.strerror(err.errno).lower() if err.errno != errno.ECONNREFUSED else "connection refused"
    if isinstance(err, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    return str(err) or type(err).__name__


def _is_stale_connection(err: BaseException) -> bool:
    return isinstance(err, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                            http.client.BadStatusLine))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _prefix_end(prefix: bytes) -> bytes:
    """The smallest key after every key that starts with prefix (etcd's range_end for a prefix)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # prefix was all 0xff: to the end of the key space


def _failure_kv(answer: dict[str, Any]) -> _FoundKey | None:
    """The key read by a failed txn's request_range (responses[0].response_range.kvs[0]).

    The gateway writes bytes as base64 and int64 fields as decimal strings, and
    leaves out fields equal to their default (an empty value, lease 0). None when
    the key is absent or the answer is not of that shape.
    """
    responses = answer.get("responses")
    if not isinstance(responses, list) or not responses or not isinstance(responses[0], dict):
        return None
    found = responses[0].get("response_range")
    kvs = found.get("kvs") if isinstance(found, dict) else None
    if not isinstance(kvs, list) or not kvs or not isinstance(kvs[0], dict):
        return None
    kv = kvs[0]
    try:
        return _FoundKey(value=base64.b64decode(kv.get("value", ""), validate=True),
                         lease=int(kv.get("lease", 0)), version=int(kv.get("version", 0)),
                         create_revision=int(kv.get("create_revision", 0)),
                         mod_revision=int(kv.get("mod_revision", 0)))
    except (TypeError, ValueError):  # binascii.Error is a ValueError
        return None


def _revision(answer: dict[str, Any]) -> int:
    return int((answer.get("header") or {}).get("revision", 0))

