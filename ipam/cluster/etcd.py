"""The etcd v3 store: a small client for etcd's JSON gateway (stdlib http.client).

etcd 3.4 serves the gateway under /v3: POST JSON with base64 keys and values,
int64 fields as decimal strings, fields equal to their default left out of
answers. This client uses:

    /v3/kv/range, /v3/kv/put, /v3/kv/deleterange   reads and plain writes
    /v3/kv/txn         create-if-absent (compare version == 0),
                       compare-and-swap (compare mod_revision), and
                       create-the-first-absent-of-several (nested txns)
    /v3/lease/grant, /v3/lease/keepalive, /v3/lease/revoke, /v3/lease/timetolive   TTLs
    /v3/watch          a streaming POST answered with newline-delimited JSON
    /v3/auth/authenticate   {"name", "password"} -> {"token"}, with a StoreAuth

An etcd with authentication enabled (etcd's RBAC) is reached as the user a
StoreAuth names: the store authenticates before its first request, sends the
token in the Authorization header of every request and of every watch
request (an open watch stream keeps working after its token expires; etcd
checks the token when the watch is created), and when etcd calls the token
invalid (etcd's "invalid auth token", a simple token's --auth-token-ttl
passed, say) or outdated ("revision of auth store is old": a user or role
changed) it authenticates again, once per request, and sends the request
again. A wrong password or an unknown user is a StoreError saying so (etcd
does not tell the two apart); an etcd without authentication answers
"authentication is not enabled": the store logs that once and goes on
without a token (and authenticates if etcd later asks for a user).

Endpoints are tried in order; the client stays on the one that answered and
moves to the next on a connection error (or when a member has lost its
leader). Unary requests share one kept-alive connection; a Watch owns one
long-lived connection of its own:

    watch("subnets/", rev)   one POST /v3/watch, answered by a chunked stream:
      {"result": {"created": true, ...}}                    the watch is set up
      {"result": {"events": [{"type": "DELETE"?, "kv": {"key": B64, "value": B64,
                  "mod_revision": "N", "version": "N", "lease": "ID"}}], ...}}
      {"result": {"header": {"revision": "N"}}}             progress: nothing under the
                                                            prefix changed up to N
      {"result": {"canceled": true, "compact_revision": "N"}}  -> Compacted
      {"result": {"canceled": true, "cancel_reason": ...}}    -> reconnect elsewhere
      {"error": {"message": "etcdserver: no leader", ...}}    -> reconnect elsewhere

    The request asks for progress_notify (an idle stream still advances the
    watch's revision), fragment (etcd splits a huge batch; no message may
    exceed MAX_WATCH_MESSAGE, no reassembled batch MAX_RESPONSE_BYTES) and carries the gateway header
    Grpc-Metadata-hasleader: true, which etcd's gateway passes on as the gRPC
    metadata clientv3.WithRequireLeader sends: a member that loses its leader
    cancels the stream ("etcdserver: no leader", within about three election
    timeouts) instead of feeding stale data, and the watch moves to the next
    endpoint, resuming from its revision + 1. A peer that dies silently (power
    loss, a cut link) is noticed by TCP keep-alive on the stream's socket
    (KEEPALIVE: probes after 10 s idle, every 5 s, 3 unanswered: ~25 s), and a
    stream that sends nothing for WATCH_SILENCE_LIMIT (well above etcd's 10
    minute progress interval) is dropped too. An idle, healthy watch sends
    nothing at all.

A request whose answer was lost may be retried on another member (or on a
fresh connection to the same one), as any etcd client does. For create and
replace that retry can meet the first attempt's own committed write and fail
its compare, so their txn reads the key in its failure branch and the client
recognises its own write:

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
returns False. Claims (claims(ttl).create_first(keys, value)) grant one lease
for all their attempts; their txn is guarded by "no candidate carries our
lease yet", so a retried attempt that meets its own earlier write reports
that key instead of taking a second one.

refresh(key) costs one keep-alive: the store remembers the lease of every key
it wrote or read (and its watches keep that memory up to date); it reads the
key only when it knows no lease for it or the keep-alive finds the lease gone.

Sockets are opened in the network namespace of the thread that constructed
the store, whichever thread uses it later: agents and tests build a store in
one namespace and use it from other threads.

Sizes are bounded: one unary answer at MAX_RESPONSE_BYTES (64 MiB, far above
a listing of thousands of leases, which take a few hundred bytes each),
checked against Content-Length before reading and while reading; one message
of a watch stream at MAX_WATCH_MESSAGE (4 MiB: etcd fragments larger batches
into messages of at most its --max-request-bytes, 1.5 MiB by default); and the
events of one batch reassembled from its fragments at MAX_RESPONSE_BYTES too,
the bound of a listing of the same keys. Beyond a bound the call fails with
ResponseTooLarge (a StoreError) that says which bound and what to do; nothing
larger is ever buffered.

Without TLS files the store talks plain http: anyone who can reach etcd's
client port can read and rewrite the leases (which decide where every node
sends pod traffic). The first such store of a process logs one warning on the
"pycni.store" logger naming --etcd-cafile/--etcd-certfile/--etcd-keyfile
(and, with a StoreAuth, that the password crosses the network in clear).

The URL forms (see open_store): etcd://HOST:PORT[,...] (https iff TLS files
are given) and flannel's --etcd-endpoints form, http://HOST:PORT[,...] or
https://HOST:PORT[,...] (https without TLS files: the system's trusted CAs).
"""

from __future__ import annotations

import base64
import errno
import http.client
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager, Sequence

from cni_plugins.spec import boundedjson

from .errors import Compacted, ResponseTooLarge, StoreError, StoreUnavailable
from .store import (
    ACCEPTED_URLS,
    Backoff,
    Claims,
    Entry,
    Event,
    Store,
    StoreAuth,
    TLSFiles,
    Watch,
    check_claim_keys,
    check_ttl,
    check_value,
    validate_key,
    validate_prefix,
)

DEFAULT_CLIENT_PORT = 2379

# gRPC status codes the gateway reports in {"code": N}; these mean "this member
# cannot serve right now" (no leader, shutting down, timed out): try another.
_GRPC_UNAVAILABLE = 14
_GRPC_DEADLINE_EXCEEDED = 4
_RETRY_CODES = {_GRPC_UNAVAILABLE, _GRPC_DEADLINE_EXCEEDED}
_GRPC_PERMISSION_DENIED = 7
_GRPC_FAILED_PRECONDITION = 9
_GRPC_UNAUTHENTICATED = 16

AUTHENTICATE = "/v3/auth/authenticate"
# etcd's answers that mean "authenticate (again), then send the request again": the token expired or is
# unknown to the member, a user or role changed since it was issued, or no token was sent to an etcd
# that has authentication enabled (it was turned on after this store found it off).
_TOKEN_ERRORS = ("invalid auth token", "revision of auth store is old", "user name is empty")
MAX_TOKEN_LEN = 4096
_RETRY_PAUSE = 0.2

_CONNECTION_ERRORS = (OSError, http.client.HTTPException)

# The gateway turns Grpc-Metadata-* headers into gRPC metadata; "hasleader: true" is what
# clientv3.WithRequireLeader sends: the member cancels the stream when it loses its leader.
REQUIRE_LEADER_HEADER = ("Grpc-Metadata-hasleader", "true")
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # one unary answer, and one watch batch reassembled from its fragments
_READ_PIECE = 1024 * 1024  # a unary answer is read in pieces this large (never one 64 MiB buffer)
MAX_WATCH_MESSAGE = 4 * 1024 * 1024  # one message of the watch stream (etcd fragments bigger batches)
MAX_WATCH_HEAD = 64 * 1024  # the HTTP status line and headers of the watch answer
MAX_WATCH_DEPTH = 16
WATCH_SILENCE_LIMIT = 1800.0  # seconds without a byte before a stream counts as dead (3x etcd's
# default progress interval; TCP keep-alive notices dead peers sooner)
KEEPALIVE = (10, 5, 3)  # TCP keep-alive of a watch socket: idle s, interval s, probes
HEALTHY_STREAM_AGE = 5.0  # a stream that lived this long had been fine: reconnect without back-off
MAX_LEASE_CACHE = 4096  # keys whose lease the store remembers (for one-request refresh)
_EVENT_OVERHEAD = 64  # bytes an event costs beyond its key and value (for the batch bound)

_OPERATIONS = {
    "/v3/kv/range": "range",
    "/v3/kv/put": "put",
    "/v3/kv/txn": "txn",
    "/v3/kv/deleterange": "deleterange",
    "/v3/lease/grant": "lease_grant",
    "/v3/lease/keepalive": "lease_keepalive",
    "/v3/lease/revoke": "lease_revoke",
    "/v3/lease/timetolive": "lease_timetolive",
    "/v3/watch": "watch_open",
    "/v3/maintenance/status": "status",
    AUTHENTICATE: "authenticate",
}


log = logging.getLogger("pycni.store")
_plaintext_warned = False  # the plain-http warning is logged once per process
_plaintext_lock = threading.Lock()


def _warn_plaintext(url: str, auth: StoreAuth | None = None) -> None:
    """Log, once per process, that the etcd store url is used without TLS."""
    global _plaintext_warned
    with _plaintext_lock:
        if _plaintext_warned:
            return
        _plaintext_warned = True
    password = (
        f"; the password of etcd user {auth.username!r} and its token cross the network in clear too"
        if auth is not None
        else ""
    )
    log.warning(
        "the etcd store %s is used without TLS: lease traffic is unauthenticated and unencrypted, so "
        "anyone who can reach etcd's client port can read the leases and rewrite them (and with them "
        "where every node sends pod traffic)%s; serve etcd over TLS with client certificates and give "
        "--etcd-cafile, --etcd-certfile and --etcd-keyfile (or an https:// store URL)",
        url,
        password,
    )


def _too_large(what: str) -> ResponseTooLarge:
    return ResponseTooLarge(
        f"{what} is larger than {MAX_RESPONSE_BYTES} bytes ({MAX_RESPONSE_BYTES >> 20} MiB), the most this "
        f"client reads at once; pycni's own keys take a few hundred bytes per node, so something else fills "
        f"its key prefix: give each cluster its own --etcd-prefix, or remove the keys that do not belong there"
    )


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoints(url: str, rest: str, scheme: str = "etcd") -> list[Endpoint]:
    """HOST:PORT[,HOST:PORT...] (IPv6 as [ADDR]:PORT; PORT defaults to 2379).

    rest is what follows url's first SCHEME://. The later endpoints may name
    the scheme again, as flannel's --etcd-endpoints does
    (http://A:2379,http://B:2379); another scheme is refused: one store
    reaches all its members the same way. A trailing "/" is allowed.
    """
    if not rest.strip().rstrip("/"):
        raise StoreError(f"invalid store URL {url!r}: use {ACCEPTED_URLS}")
    if "@" in rest:
        shown = re.sub(r"[^/,@]*@", "***@", url)  # never echo a password
        raise StoreError(
            f"invalid store URL {shown!r}: user names and passwords do not belong in the URL; "
            f"give --etcd-username and --etcd-password-file"
        )
    endpoints = []
    for item in rest.split(","):
        item = item.strip()
        item_scheme, sep, tail = item.partition("://")
        if sep:
            other = item_scheme.lower()
            if other != scheme:
                raise StoreError(
                    f"invalid store URL {url!r}: it mixes {scheme}:// and {other}:// endpoints; "
                    f"one store reaches all its members the same way: give every endpoint the same "
                    f"scheme (https:// for TLS, http:// for plain http)"
                )
            item = tail.strip()
        item = item.rstrip("/")
        if "/" in item or "?" in item or "#" in item:
            raise StoreError(f"invalid store URL {url!r}: use {ACCEPTED_URLS}")
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
            raise StoreError(f"invalid etcd endpoint {item!r} in {url!r}: the host is missing; use {ACCEPTED_URLS}")
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


_NEEDS_USER = "etcd has authentication enabled: give an etcd user with --etcd-username and --etcd-password-file"


class _TokenRefused(StoreError):
    """etcd refused the request's token (expired, unknown, outdated) or asked for one: authenticate again."""


class _AuthNotEnabled(StoreError):
    """etcd answered /v3/auth/authenticate with "authentication is not enabled"."""


class _EndpointFailed(Exception):
    """One endpoint could not serve a request; the message says why."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable  # the member is alive but cannot serve right now


class EtcdStore(Store):
    """A Store backed by an etcd v3 cluster; see the module docstring."""

    def __init__(
        self,
        endpoints: list[Endpoint],
        *,
        prefix: str = "/pycni",
        tls: TLSFiles | None = None,
        auth: StoreAuth | None = None,
        timeout: float = 5.0,
        scheme: str = "etcd",
    ) -> None:
        """scheme is the URL's: "etcd" (https iff tls), "https" (TLS; tls None: the system's CAs) or "http"."""
        if not endpoints:
            raise StoreError(f"no etcd endpoints given: use {ACCEPTED_URLS}")
        if not isinstance(prefix, str) or "\0" in prefix:
            raise StoreError(f"invalid etcd key prefix {prefix!r}")
        if scheme not in ("etcd", "http", "https"):
            raise StoreError(f"unsupported etcd URL scheme {scheme!r}: use {ACCEPTED_URLS}")
        if auth is not None and not isinstance(auth, StoreAuth):
            raise StoreError(f"auth must be a StoreAuth, not {type(auth).__name__}")
        self.endpoints = list(endpoints)
        self._url_scheme = scheme
        if scheme == "http" and tls is not None and any((tls.cafile, tls.certfile, tls.keyfile)):
            raise StoreError(
                f"TLS files were given for the plain-http store {self.url()}: write its endpoints as "
                f"https://HOST:PORT to use TLS (or drop the TLS files)"
            )
        if scheme == "https" and tls is None:
            tls = TLSFiles()  # the system's trusted CAs verify the server
        if scheme == "http":
            tls = None
        self.prefix = prefix
        self._base = prefix if prefix in ("", "/") else prefix.rstrip("/") + "/"
        self.timeout = float(timeout)
        self._ssl = _ssl_context(tls) if tls is not None else None
        self._scheme = "https" if self._ssl is not None else "http"
        if self._ssl is None:
            _warn_plaintext(self.url(), auth)
        self._client_cert = bool(tls and tls.certfile)
        # etcd authentication: the token of the last /v3/auth/authenticate (None: none yet, or etcd has
        # authentication off, see _auth_off). Changed under _lock; watches read it without the lock.
        self._auth = auth
        self._token: str | None = None
        self._auth_off = False
        # Knobs of the watch streams (tests shorten them): TCP keep-alive (idle s, interval s, probes)
        # and how long a stream may stay silent before it counts as dead.
        self.keepalive: tuple[int, int, int] = KEEPALIVE
        self.watch_silence_limit = WATCH_SILENCE_LIMIT
        try:
            self._ns_fd: int | None = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise StoreError(
                f"cannot open this thread's network namespace: {err.strerror} (is /proc mounted?)"
            ) from None
        st = os.fstat(self._ns_fd)
        self._ns_id = (st.st_dev, st.st_ino)
        self._lock = threading.Lock()  # guards the shared connection used by unary requests
        self._conn: http.client.HTTPConnection | None = None
        self._conn_index = 0
        self._preferred = 0
        self._leases: OrderedDict[str, int] = OrderedDict()  # key -> the lease it was last seen with
        self._leases_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._requests: dict[str, int] = {}
        self._counters: dict[str, int] = {
            "watch_reconnects": 0,
            "watch_events": 0,
            "errors": 0,
            "connections": 0,
            "bytes_sent": 0,
            "bytes_received": 0,
        }

    def __repr__(self) -> str:
        return f"EtcdStore({self.url()!r}, prefix={self.prefix!r})"

    def url(self) -> str:
        """The store URL in the form it was given: etcd://A,B or flannel's http(s)://A,http(s)://B."""
        if self._url_scheme == "etcd":
            return "etcd://" + ",".join(ep.netloc() for ep in self.endpoints)
        return ",".join(f"{self._url_scheme}://{ep.netloc()}" for ep in self.endpoints)

    @property
    def current_endpoint(self) -> Endpoint:
        """The endpoint tried first: the one that answered last."""
        return self.endpoints[self._preferred]

    # -- the Store interface ------------------------------------------------

    def get(self, key: str) -> Entry | None:
        validate_key(key)
        answer = self._call("/v3/kv/range", {"key": _b64(self._full(key))})
        kvs = answer.get("kvs") or []
        self._learn_lease(key, kvs[0] if kvs else None)
        return self._entry(kvs[0]) if kvs else None

    def list(self, prefix: str) -> tuple[list[Entry], int]:
        validate_prefix(prefix)
        full = self._full(prefix)
        if full:
            body = {"key": _b64(full), "range_end": _b64(_prefix_end(full))}
        else:
            body = {"key": _b64(b"\0"), "range_end": _b64(b"\0")}  # every key
        answer = self._call("/v3/kv/range", body)
        kvs = answer.get("kvs") or []
        entries = [self._entry(kv) for kv in kvs]
        self._learn_leases(prefix, [(entry.key, kv) for entry, kv in zip(entries, kvs) if entry is not None])
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
        answer = self._call(
            "/v3/kv/txn",
            {
                "compare": [{"key": full, "target": "VERSION", "result": "EQUAL", "version": "0"}],
                "success": [{"request_put": put}],
                "failure": [{"request_range": {"key": full}}],
            },
            sends,
        )
        if answer.get("succeeded", False):
            self._remember_lease(key, lease)
            return True
        found = _failure_kv(answer)
        if (
            found is not None
            and found.value == value
            and found.lease == lease
            and (lease or (sends.count > 1 and found.version == 1))
        ):
            self._remember_lease(key, lease)
            return True  # our first attempt committed; its answer was lost and the retry met our own key
        if lease:
            self._revoke(lease)
        return False

    def put(self, key: str, value: bytes, ttl: int | None = None) -> int:
        validate_key(key)
        value, ttl = check_value(value), check_ttl(ttl)
        body: dict[str, Any] = {"key": _b64(self._full(key)), "value": _b64(value)}
        lease = self._grant(ttl) if ttl is not None else 0
        if lease:
            body["lease"] = str(lease)
        revision = _revision(self._call("/v3/kv/put", body))
        self._remember_lease(key, lease)
        return revision

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
        answer = self._call(
            "/v3/kv/txn",
            {
                "compare": [
                    {"key": full, "target": "MOD", "result": "EQUAL", "mod_revision": str(int(expected_mod_revision))}
                ],
                "success": [{"request_put": put}],
                "failure": [{"request_range": {"key": full}}],
            },
            sends,
        )
        if answer.get("succeeded", False):
            self._remember_lease(key, lease)
            return True
        found = _failure_kv(answer)
        if (
            found is not None
            and found.value == value
            and found.lease == lease
            and (lease or (sends.count > 1 and found.create_revision <= expected_mod_revision < found.mod_revision))
        ):
            self._remember_lease(key, lease)
            return True  # our first attempt committed; its answer was lost and the retry met our own write
        if lease:
            self._revoke(lease)
        return False

    def delete(self, key: str) -> bool:
        validate_key(key)
        answer = self._call("/v3/kv/deleterange", {"key": _b64(self._full(key))})
        self._remember_lease(key, 0)
        return int(answer.get("deleted", 0)) > 0

    def ttl(self, key: str) -> int | None:
        validate_key(key)
        kvs = self._call("/v3/kv/range", {"key": _b64(self._full(key))}).get("kvs") or []
        self._learn_lease(key, kvs[0] if kvs else None)
        lease = int(kvs[0].get("lease", 0)) if kvs else 0
        if not lease:
            return None
        granted = int(self._call("/v3/lease/timetolive", {"ID": str(lease)}).get("grantedTTL", 0))
        return granted or None

    def refresh(self, key: str) -> bool:
        """Renew the lease of key: one keep-alive when the store knows the key's lease (steady state).

        The lease is known from the write or read that last saw the key here,
        kept up to date by this store's watches. A keep-alive proves the lease
        alive, not that the key still carries it: a key deleted by another
        client while its lease lives on reads as refreshed until a watch or a
        read of this store sees it go (renew_lease() reads the key first).
        """
        validate_key(key)
        lease = self._known_lease(key)
        if lease and self._keepalive(lease) > 0:
            return True
        answer = self._call("/v3/kv/range", {"key": _b64(self._full(key))})
        kvs = answer.get("kvs") or []
        self._learn_lease(key, kvs[0] if kvs else None)
        if not kvs:
            return False
        lease = int(kvs[0].get("lease", 0))
        if not lease:
            return True  # no TTL: nothing to renew, and it does not expire
        if self._keepalive(lease) > 0:
            return True
        self._remember_lease(key, 0)
        return False

    def claims(self, ttl: int | None = None) -> Claims:
        return _EtcdClaims(self, check_ttl(ttl))

    def watch(self, prefix: str, after_revision: int) -> Watch:
        validate_prefix(prefix)
        return _EtcdWatch(self, prefix, int(after_revision))

    def wait(self, prefix: str, after_revision: int, timeout: float) -> int | None:
        validate_prefix(prefix)
        watch = _EtcdWatch(self, prefix, int(after_revision))
        try:
            events = watch.next(timeout)
        finally:
            watch.close()
        return max(event.mod_revision for event in events) if events else None

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            return {"requests": dict(self._requests), **self._counters}

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

    def _keepalive(self, lease: int) -> int:
        """The lease's TTL after a keep-alive (0: it is gone)."""
        result = self._call("/v3/lease/keepalive", {"ID": str(lease)}).get("result") or {}
        return int(result.get("TTL", 0))

    def _known_lease(self, key: str) -> int:
        with self._leases_lock:
            return self._leases.get(key, 0)

    def _remember_lease(self, key: str, lease: int) -> None:
        """key carries lease now (0: no lease, or gone: forget it)."""
        with self._leases_lock:
            if not lease:
                self._leases.pop(key, None)
                return
            self._leases[key] = lease
            self._leases.move_to_end(key)
            while len(self._leases) > MAX_LEASE_CACHE:
                self._leases.popitem(last=False)

    def _learn_lease(self, key: str, kv: dict[str, Any] | None) -> None:
        self._remember_lease(key, _int(kv.get("lease", 0)) if kv else 0)

    def _learn_leases(self, prefix: str, seen: list[tuple[str, dict[str, Any]]]) -> None:
        """After a listing: update the keys already remembered; forget those under prefix that are gone."""
        with self._leases_lock:
            if not self._leases:
                return
            listed = {key: _int(kv.get("lease", 0)) for key, kv in seen}
            for key in [k for k in self._leases if k.startswith(prefix)]:
                lease = listed.get(key, 0)
                if lease:
                    self._leases[key] = lease
                else:
                    del self._leases[key]

    # -- claims ---------------------------------------------------------------

    def _create_first(self, keys: Sequence[str], value: bytes, lease: int) -> Entry | None:
        """One txn: create the first absent key of keys (with lease, if any); see _EtcdClaims."""
        keys = check_claim_keys(keys)
        value = check_value(value)
        fulls = [_b64(self._full(key)) for key in keys]
        encoded = _b64(value)

        def level(i: int) -> dict[str, Any]:
            put: dict[str, Any] = {"key": fulls[i], "value": encoded}
            if lease:
                put["lease"] = str(lease)
            txn: dict[str, Any] = {
                "compare": [{"key": fulls[i], "target": "VERSION", "result": "EQUAL", "version": "0"}],
                "success": [{"request_put": put}],
                "failure": [{"request_range": {"key": fulls[i]}}],
            }
            if i + 1 < len(fulls):
                txn["failure"].append({"request_txn": level(i + 1)})
            return txn

        if lease:
            # Guarded: if a candidate already carries our lease, an earlier send of this txn created it.
            body: dict[str, Any] = {
                "compare": [
                    {"key": full, "target": "LEASE", "result": "NOT_EQUAL", "lease": str(lease)} for full in fulls
                ],
                "success": [{"request_txn": level(0)}],
                "failure": [{"request_range": {"key": full}} for full in fulls],
            }
        else:
            body = level(0)
        sends = _Sends()
        answer = self._call("/v3/kv/txn", body, sends)
        revision = _revision(answer)
        if lease:
            if not answer.get("succeeded", False):
                for key, response in zip(keys, answer.get("responses") or []):
                    found = _range_kv(response)
                    if found is not None and found.lease == lease:
                        self._remember_lease(key, lease)
                        return Entry(key, found.value, found.mod_revision, found.version)
                return None
            chain = _sub_txn(answer)
        else:
            chain = answer
        created, earlier = _walk_claim(keys, chain, value)
        if created is not None:
            if earlier is not None and sends.count > 1:
                # Without a lease to tell writers apart: a lost first send created `earlier` (our value,
                # version 1), and this send created another key. Keep the first, give the second back.
                self._delete_if_unchanged(created, revision)
                return earlier
            self._remember_lease(created, lease)
            return Entry(created, value, revision, 1)
        if earlier is not None and sends.count > 1:
            return earlier
        return None

    def _delete_if_unchanged(self, key: str, mod_revision: int) -> None:
        full = _b64(self._full(key))
        try:
            self._call(
                "/v3/kv/txn",
                {
                    "compare": [{"key": full, "target": "MOD", "result": "EQUAL", "mod_revision": str(mod_revision)}],
                    "success": [{"request_delete_range": {"key": full}}],
                },
            )
        except StoreError:
            pass  # it stays taken; the node that holds it is us, and release_lease frees it

    # -- keys -------------------------------------------------------------------

    def _full(self, key: str) -> bytes:
        return (self._base + key).encode("utf-8")

    def _relative(self, raw_key: bytes) -> str | None:
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if not key.startswith(self._base):
            return None
        return key[len(self._base) :]

    def _entry(self, kv: dict[str, Any]) -> Entry | None:
        key = self._relative(base64.b64decode(kv.get("key", "")))
        if key is None:
            return None
        return Entry(
            key=key,
            value=base64.b64decode(kv.get("value", "")),
            mod_revision=int(kv.get("mod_revision", 0)),
            version=int(kv.get("version", 0)),
        )

    # -- statistics ---------------------------------------------------------------

    def _count(self, operation: str = "", **counters: int) -> None:
        with self._stats_lock:
            if operation:
                self._requests[operation] = self._requests.get(operation, 0) + 1
            for name, amount in counters.items():
                self._counters[name] = self._counters.get(name, 0) + amount

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
            conn = http.client.HTTPSConnection(endpoint.host, endpoint.port, timeout=self.timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=self.timeout)
        conn.auto_open = 0  # never reconnect behind our back (that could be in the wrong namespace)
        self._count(connections=1)
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
                first = self._preferred  # a watch may move it meanwhile: try each endpoint once all the same
                for step in range(count):
                    index = (first + step) % count
                    try:
                        answer = self._call_endpoint(index, path, payload, sends)
                    except _EndpointFailed as failure:
                        self._count(errors=1)
                        failures.append(f"{self._endpoint_url(index)}: {failure}")
                        any_retryable = any_retryable or failure.retryable
                        continue
                    self._preferred = index
                    return answer
                if not any_retryable or time.monotonic() + _RETRY_PAUSE >= deadline:
                    raise StoreUnavailable(self._unavailable_message(failures))
                time.sleep(_RETRY_PAUSE)  # a member is up but has no leader (yet): election under way

    def _call_endpoint(self, index: int, path: str, payload: bytes, sends: _Sends) -> dict[str, Any]:
        """One request to one endpoint, with the auth token; a token etcd refuses is renewed once per request."""
        renewed = False
        if self._auth is not None and self._token is None and not self._auth_off:
            self._authenticate(index)
            renewed = True
        while True:
            try:
                return self._post(index, path, payload, sends, self._token)
            except _TokenRefused as refused:
                sends.count -= 1  # etcd refused it for its token before carrying it out: it was not a send
                if self._auth is None:
                    raise StoreError(f"etcd refused {path}: {refused}: {_NEEDS_USER}") from None
                if renewed:
                    raise StoreError(
                        f"etcd refused {path} for user {self._auth.username!r} although it has just "
                        f"authenticated: {refused}"
                    ) from None
                self._token, self._auth_off = None, False
                self._authenticate(index)
                renewed = True

    def _post(self, index: int, path: str, payload: bytes, sends: _Sends, token: str | None) -> dict[str, Any]:
        """POST payload to path on the endpoint at index (the shared connection); the decoded answer."""
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = token
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
                self._count(_OPERATIONS.get(path, path), bytes_sent=len(payload))
                conn.request("POST", path, body=payload, headers=headers)
                response = conn.getresponse()
                data = self._read_body(response, index, path)
            except _CONNECTION_ERRORS as err:
                self._drop_connection()
                if reused and attempt == 0 and _is_stale_connection(err):
                    continue  # the member closed an idle kept-alive connection: reconnect once
                raise _EndpointFailed(self._describe(err)) from None
            self._count(bytes_received=len(data))
            if response.will_close:
                self._drop_connection()
            return self._decode(response.status, data, path)
        raise AssertionError("unreachable")

    def _read_body(self, response: http.client.HTTPResponse, index: int, path: str) -> bytes:
        """The body of a unary answer; ResponseTooLarge (connection dropped) beyond MAX_RESPONSE_BYTES."""
        what = f"etcd's answer to {path} from {self._endpoint_url(index)}"
        length = (response.getheader("Content-Length") or "").strip()
        if length.isdigit() and int(length) > MAX_RESPONSE_BYTES:
            self._drop_connection()
            raise _too_large(f"{what} ({length} bytes by its Content-Length)")
        pieces, size = [], 0
        while True:
            piece = response.read(_READ_PIECE)
            if not piece:
                return b"".join(pieces)
            size += len(piece)
            if size > MAX_RESPONSE_BYTES:
                self._drop_connection()  # the rest is never read
                raise _too_large(what)
            pieces.append(piece)

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _decode(self, status: int, data: bytes, path: str) -> dict[str, Any]:
        try:
            answer = json.loads(data) if data else {}
        except (ValueError, RecursionError):
            text = data[:200].decode("utf-8", "replace").strip()
            if "HTTPS" in text:
                raise _EndpointFailed(
                    f"the server speaks TLS ({text!r}): use TLS files "
                    f"(--etcd-cafile, and a client certificate if it asks for one)"
                ) from None
            raise _EndpointFailed(
                f"HTTP {status} from {path} with a non-JSON body {text!r}: is this an etcd v3 (>= 3.4) client URL?"
            ) from None
        if not isinstance(answer, dict):
            raise _EndpointFailed(f"unexpected answer from {path}: {str(answer)[:200]}")
        if status == 200:
            return answer
        message = answer.get("message") or answer.get("error") or f"HTTP {status}"
        code = answer.get("code")
        text = str(message)
        if path == AUTHENTICATE:
            if code == _GRPC_FAILED_PRECONDITION or "authentication is not enabled" in text:
                raise _AuthNotEnabled(text)
            if "authentication failed" in text:
                name = self._auth.username if self._auth is not None else "?"
                raise StoreError(
                    f"etcd refused user {name!r}: wrong password, or no such user ({text}); check "
                    f"--etcd-username and the file --etcd-password-file names"
                )
        if code == _GRPC_UNAUTHENTICATED or any(marker in text for marker in _TOKEN_ERRORS):
            raise _TokenRefused(text)
        if code == _GRPC_PERMISSION_DENIED:
            raise StoreError(f"etcd refused {path}: {text}: {self._permission_hint()}")
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

    # -- authentication ---------------------------------------------------------

    def _authenticate(self, index: int) -> None:
        """Trade the StoreAuth for a token at the endpoint at index (under _lock).

        etcd replicates the token to every member, so one token serves every
        endpoint. Raises StoreError for a wrong password or unknown user,
        _EndpointFailed if the member cannot serve.
        """
        auth = self._auth
        assert auth is not None
        self._token = None
        payload = json.dumps({"name": auth.username, "password": auth.password}).encode()
        try:
            answer = self._post(index, AUTHENTICATE, payload, _Sends(), None)
        except _AuthNotEnabled:
            if not self._auth_off:
                log.warning(
                    "etcd at %s does not have authentication enabled: going on without a token (etcd "
                    "user %r is not needed there, and anyone who reaches etcd can change the leases)",
                    self._endpoint_url(index),
                    auth.username,
                )
            self._auth_off = True
            return
        token = answer.get("token")
        if (
            not isinstance(token, str)
            or not token
            or len(token) > MAX_TOKEN_LEN
            or not token.isascii()
            or not token.isprintable()
        ):
            raise StoreError(
                f"etcd at {self._endpoint_url(index)} authenticated user {auth.username!r} but "
                f"answered without a usable token: {str(answer)[:200]}"
            )
        self._auth_off = False
        self._token = token

    def _renew_token(self, stale: str | None) -> None:
        """Authenticate again unless another thread already replaced the token stale; endpoints in order.

        For watches (unary requests authenticate in _call_endpoint, under the lock already).
        """
        if self._auth is None:
            return
        with self._lock:
            if self._token != stale:
                return
            self._auth_off = False  # etcd refused the request without a token: ask again even if it was off
            failures: list[str] = []
            count = len(self.endpoints)
            first = self._preferred
            for step in range(count):
                index = (first + step) % count
                try:
                    self._authenticate(index)
                except _EndpointFailed as failure:
                    self._count(errors=1)
                    failures.append(f"{self._endpoint_url(index)}: {failure}")
                    continue
                self._preferred = index
                return
            raise StoreUnavailable(self._unavailable_message(failures))

    def _permission_hint(self) -> str:
        if self._auth is None:
            return _NEEDS_USER
        where = self._base or "every key"
        return (
            f"the roles of etcd user {self._auth.username!r} do not grant it {where}: grant one of them "
            f"readwrite on the prefix (etcdctl role grant-permission ROLE --prefix=true readwrite {where})"
        )

    # -- watch streams ----------------------------------------------------------

    def _open_stream(self, body: dict[str, Any], first: int) -> "_WatchStream":
        """A watch stream on the first endpoint, from index first on, that sets the watch up.

        Raises StoreUnavailable naming every endpoint's failure, Compacted if
        the start revision is gone, StoreError if authenticating again fails.
        """
        payload = json.dumps(body).encode()
        failures: list[str] = []
        count = len(self.endpoints)
        if self._auth is not None and self._token is None and not self._auth_off:
            self._renew_token(None)
        for step in range(count):
            index = (first + step) % count
            try:
                stream = self._start_stream(index, payload)
            except _EndpointFailed as failure:
                self._count(errors=1)
                failures.append(f"{self._endpoint_url(index)}: {failure}")
                continue
            self._preferred = index  # unary requests follow the member that serves the watch
            return stream
        raise StoreUnavailable(self._unavailable_message(failures))

    def _start_stream(self, index: int, payload: bytes) -> "_WatchStream":
        """A watch stream on the endpoint at index, set up; a token etcd refuses is renewed once."""
        renewed = False
        while True:
            try:
                conn = self._connect(index)
            except _CONNECTION_ERRORS as err:
                raise _EndpointFailed(self._describe(err)) from None
            sock = conn.sock
            conn.sock = None  # the stream owns the socket from here on
            stream = _WatchStream(self, sock, index, self._endpoint_url(index))
            try:
                stream.start(payload, time.monotonic() + self.timeout)
                return stream
            except _StreamTokenRefused as refused:
                stream.close()
                if self._auth is None:
                    raise _EndpointFailed(f"{refused}: {_NEEDS_USER}") from None
                if renewed:
                    raise _EndpointFailed(
                        f"{refused} (for user {self._auth.username!r}, although it has just authenticated)"
                    ) from None
                self._renew_token(stream.token)
                renewed = True
            except _EndpointFailed as failure:
                stream.close()
                if "permission denied" in str(failure).lower():
                    raise _EndpointFailed(f"{failure}: {self._permission_hint()}") from None
                raise
            except BaseException:
                stream.close()
                raise


class _StreamTokenRefused(_EndpointFailed):
    """etcd canceled the watch for its token (expired, unknown, outdated, or none sent)."""


class _StreamLost(Exception):
    """The watch stream ended or failed; the message says why (the watch reconnects)."""


class _WatchStream:
    """One POST /v3/watch: the socket, the HTTP/1.1 chunked framing, the newline-delimited messages.

    Read with plain recv() and socket timeouts (never through http.client's
    buffered reader, which a timeout leaves unusable), so one stream serves
    any number of next() calls.
    """

    def __init__(self, store: EtcdStore, sock: socket.socket, index: int, url: str) -> None:
        self.store = store
        self.sock = sock
        self.index = index
        self.url = url
        self.opened_at = time.monotonic()
        self.last_data = self.opened_at
        self.delivered = False  # events or a progress notification came: the stream was useful
        self.token: str | None = None  # the auth token the watch request carried
        self._raw = b""  # bytes read, not yet de-chunked
        self._data = b""  # de-chunked bytes, not yet a complete message
        self._chunk_left = 0
        self._chunk_crlf = False
        self._ended = False  # the server sent the last chunk: deliver what came, then report the end
        self._messages: list[dict[str, Any]] = []

    def start(self, payload: bytes, deadline: float) -> None:
        """Send the request, read the answer's head and the "created" message; _EndpointFailed if refused."""
        store = self.store
        host = store.endpoints[self.index].netloc()
        name, value = REQUIRE_LEADER_HEADER
        self.token = token = store._token
        auth = f"Authorization: {token}\r\n" if token else ""
        head = (
            f"POST /v3/watch HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n{name}: {value}\r\n{auth}\r\n"
        ).encode("ascii")
        try:
            _set_keepalive(self.sock, *store.keepalive)
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            self.sock.sendall(head + payload)
        except OSError as err:
            raise _EndpointFailed(store._describe(err)) from None
        store._count("watch_open", bytes_sent=len(head) + len(payload))
        try:
            status, headers = self._read_head(deadline)
            if status != 200:
                body = self._read_error_body(headers, deadline)
                try:
                    store._decode(status, body, "/v3/watch")  # raises what the status means
                except _TokenRefused as refused:
                    raise _StreamTokenRefused(f"etcd refused the watch: {refused}", retryable=True) from None
                raise _EndpointFailed(f"HTTP {status} from /v3/watch")
            if "chunked" not in headers.get("transfer-encoding", "").lower():
                raise _EndpointFailed("the watch answer is not a chunked stream: is this an etcd v3 client URL?")
            while True:
                messages = self.messages(deadline)
                for i, message in enumerate(messages):
                    result = _watch_result(message, self.url)  # errors: no leader, compacted, canceled
                    if result.get("created"):
                        self._messages = messages[i + 1 :] + self._messages  # events may follow at once
                        return
                if time.monotonic() >= deadline:
                    raise _EndpointFailed("timed out waiting for the watch to be created")
        except _StreamLost as lost:
            raise _EndpointFailed(str(lost)) from None

    def messages(self, deadline: float) -> list[dict[str, Any]]:
        """The complete messages received by deadline (at least one unless the deadline passed)."""
        self._dechunk()
        self._split()
        while not self._messages:
            if self._ended:
                raise _StreamLost("the server ended the watch")
            now = time.monotonic()
            silent = now - self.last_data
            limit = self.store.watch_silence_limit
            if silent >= limit:
                raise _StreamLost(f"nothing received for {silent:.0f} s (not even a progress notification)")
            if now >= deadline:
                return []
            data = self._recv(min(deadline - now, limit - silent))
            if data is None:
                continue
            self._raw += data
            self._dechunk()
            self._split()
        messages, self._messages = self._messages, []
        return messages

    def close(self) -> None:
        sock, self.sock = self.sock, None  # type: ignore[assignment]
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes a recv() blocked in another thread
        except OSError:
            pass
        sock.close()

    # -- HTTP framing ---------------------------------------------------------------

    def _recv(self, wait: float) -> bytes | None:
        """Up to 64 KiB from the socket; None when wait seconds passed without any."""
        sock = self.sock
        if sock is None:
            raise _StreamLost("the watch was closed")
        try:
            sock.settimeout(max(0.001, wait))
            data = sock.recv(65536)
        except TimeoutError as err:  # socket.timeout is TimeoutError, and so is ETIMEDOUT
            if err.errno == errno.ETIMEDOUT:
                raise _StreamLost("connection timed out: the member stopped answering TCP keep-alive probes") from None
            return None  # our own read timeout: nothing arrived in time
        except OSError as err:
            raise _StreamLost(self.store._describe(err)) from None
        if not data:
            raise _StreamLost("the server closed it")
        self.last_data = time.monotonic()
        self.store._count(bytes_received=len(data))
        return data

    def _read_head(self, deadline: float) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self._raw:
            if len(self._raw) > MAX_WATCH_HEAD:
                raise _EndpointFailed(f"the watch answer's HTTP head is larger than {MAX_WATCH_HEAD} bytes")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _EndpointFailed("timed out waiting for the answer to the watch request")
            data = self._recv(remaining)
            if data is not None:
                self._raw += data
        head, self._raw = self._raw.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise _EndpointFailed(f"not an HTTP answer: {lines[0][:80]!r} (is this an etcd client URL?)")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    def _read_error_body(self, headers: dict[str, str], deadline: float) -> bytes:
        """The (small) body of a non-200 answer."""
        length = headers.get("content-length", "")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        while time.monotonic() < deadline and len(self._raw) < 65536:
            if length.isdigit() and len(self._raw) >= int(length):
                break
            if chunked:
                self._dechunk()
                if b"\n" in self._data or self._ended:
                    return self._data
            try:
                data = self._recv(deadline - time.monotonic())
            except _StreamLost:
                break
            if data is not None:
                self._raw += data
        if chunked:
            self._dechunk()
            return self._data
        return self._raw[: int(length)] if length.isdigit() else self._raw

    def _dechunk(self) -> None:
        """Move the payload of complete chunks from _raw to _data (HTTP/1.1 chunked transfer coding)."""
        while not self._ended:
            if self._chunk_left:
                take = min(self._chunk_left, len(self._raw))
                if not take:
                    return
                self._data += self._raw[:take]
                self._raw = self._raw[take:]
                self._chunk_left -= take
                self._chunk_crlf = self._chunk_left == 0
                self._check_size()
                continue
            if self._chunk_crlf:
                if len(self._raw) < 2:
                    return
                if self._raw[:2] != b"\r\n":
                    raise _StreamLost("a malformed chunk in the watch stream")
                self._raw = self._raw[2:]
                self._chunk_crlf = False
                continue
            end = self._raw.find(b"\r\n")
            if end < 0:
                if len(self._raw) > 1024:
                    raise _StreamLost("a malformed chunk header in the watch stream")
                return
            size_text = self._raw[:end].split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _StreamLost(f"a malformed chunk size {size_text[:20]!r} in the watch stream") from None
            self._raw = self._raw[end + 2 :]
            if size == 0:
                self._ended = True  # its last messages (an error, say) are still to be read
                return
            self._chunk_left = size

    def _check_size(self) -> None:
        if len(self._data) > MAX_WATCH_MESSAGE and b"\n" not in self._data:
            # Not "unavailable": reconnecting meets the same message. A StoreError makes the caller list
            # again (bounded by MAX_RESPONSE_BYTES) and watch on from the listed revision.
            raise ResponseTooLarge(
                f"a message of the watch stream from {self.url} is larger than {MAX_WATCH_MESSAGE} bytes, "
                f"the most this client reads at once; etcd splits larger batches itself unless its "
                f"--max-request-bytes is set above {MAX_WATCH_MESSAGE // 2} bytes: lower it"
            )

    def _split(self) -> None:
        """Decode every complete (newline-terminated) message in _data."""
        while True:
            end = self._data.find(b"\n")
            if end < 0:
                if not self._ended:
                    self._check_size()
                    return
                end = len(self._data)  # the last message may come without a newline (an error, say)
                if not self._data.strip():
                    self._data = b""
                    return
            line, self._data = self._data[:end].strip(), self._data[end + 1 :]
            if not line:
                continue
            try:
                message = boundedjson.loads(line, max_bytes=MAX_WATCH_MESSAGE, max_depth=MAX_WATCH_DEPTH)
            except ValueError as err:
                raise _StreamLost(f"an undecodable watch message ({err})") from None
            if not isinstance(message, dict):
                raise _StreamLost(f"an unexpected watch message {str(message)[:200]}")
            self._messages.append(message)


class _EtcdWatch(Watch):
    """A Watch on one long-lived etcd watch stream; see the module docstring."""

    def __init__(self, store: EtcdStore, prefix: str, after_revision: int) -> None:
        self._store = store
        self._prefix = prefix
        full = store._full(prefix)
        self._key = full or b"\0"
        self._range_end = _prefix_end(full) if full else b"\0"
        self.revision = after_revision
        self._stream: _WatchStream | None = None
        self._next_index: int | None = None  # where to reconnect: after the endpoint that failed
        self._opened = 0
        self._backoff = Backoff()
        self._last_error = ""
        self._compacted: Compacted | None = None
        self._fragments: list[Event | None] = []
        self._fragment_bytes = 0  # decoded keys and values in _fragments
        self._closed = False

    def __repr__(self) -> str:
        return f"<watch of {self._prefix or '(everything)'} at revision {self.revision}, {self.url or 'not connected'}>"

    @property
    def url(self) -> str | None:
        """The endpoint the stream is open to now (None while not connected)."""
        stream = self._stream
        return stream.url if stream is not None else None

    @property
    def last_error(self) -> str:
        """Why the stream was last lost or could not be opened ("" if that never happened)."""
        return self._last_error

    def next(self, timeout: float) -> list[Event]:
        if self._closed:
            raise StoreError(f"this watch of {self._prefix or 'the whole store'} on {self._store.url()} is closed")
        if self._compacted is not None:
            raise Compacted(str(self._compacted), compact_revision=self._compacted.compact_revision)
        deadline = time.monotonic() + max(0.0, timeout)
        reopened = False
        lost_message = ""  # set when this call lost the stream and reconnects at once
        while True:
            if self._stream is None:
                try:
                    self._open(deadline)
                except StoreUnavailable as err:
                    if not lost_message:
                        raise
                    raise StoreUnavailable(
                        f"{lost_message}; reconnecting failed: {err} (the watch tries "
                        f"again from revision {self.revision + 1} on the next call)"
                    ) from None
            stream = self._stream
            assert stream is not None
            try:
                events = self._read(stream, deadline)
            except _StreamLost as lost:
                if self._closed:
                    return []  # close() from another thread ended the stream
                healthy = stream.delivered or time.monotonic() - stream.opened_at >= HEALTHY_STREAM_AGE
                self._drop(stream)
                self._last_error = f"lost the watch connection to {stream.url}: {lost}"
                self._store._count(errors=1)
                if healthy:
                    self._backoff.reset()  # it had worked: fail over at once
                else:
                    self._backoff.failed()
                if reopened or self._backoff.remaining() > 0 or self._closed:
                    raise StoreUnavailable(
                        f"{self._last_error}; the watch reconnects from revision {self.revision + 1} on the next call"
                    ) from None
                reopened = True
                lost_message = self._last_error
                continue
            except StoreUnavailable as err:
                self._drop(stream)
                self._last_error = str(err)
                self._store._count(errors=1)
                self._backoff.failed()
                raise
            except ResponseTooLarge as err:
                self._drop(stream)  # the same message or batch would come again: the caller lists instead
                self._last_error = str(err)
                self._store._count(errors=1)
                raise
            except Compacted as err:
                self._drop(stream)
                self._compacted = err
                raise
            if events or time.monotonic() >= deadline:
                return events

    def close(self) -> None:
        self._closed = True
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    # -- internals -------------------------------------------------------------------

    def _open(self, deadline: float) -> None:
        """Open the stream, from revision + 1, after the back-off; StoreUnavailable if no member will serve."""
        wait = self._backoff.remaining()
        if wait > 0:
            if time.monotonic() + wait > deadline:
                time.sleep(max(0.0, deadline - time.monotonic()))
                raise StoreUnavailable(
                    f"{self._last_error} (the watch tries again in {self._backoff.remaining():.1f} s)"
                )
            time.sleep(wait)
        store = self._store
        request: dict[str, Any] = {
            "key": _b64(self._key),
            "range_end": _b64(self._range_end),
            "start_revision": str(self.revision + 1),
            "progress_notify": True,
            "fragment": True,
        }
        first = self._next_index
        if first is None:
            first = store._preferred  # an int read: no need to wait for the unary lock
        try:
            stream = store._open_stream({"create_request": request}, first)
        except StoreUnavailable as err:
            self._last_error = f"cannot watch {self._prefix or 'the store'}: {err}"
            self._backoff.failed()
            raise StoreUnavailable(self._last_error) from None
        except Compacted as err:
            self._compacted = err
            raise
        if self._closed:
            stream.close()
            raise StoreError("the watch was closed while it connected")
        if self._opened:
            store._count(watch_reconnects=1)
        self._opened += 1
        self._fragments, self._fragment_bytes = [], 0
        self._stream = stream

    def _drop(self, stream: _WatchStream) -> None:
        stream.close()
        self._next_index = (stream.index + 1) % len(self._store.endpoints)
        if self._stream is stream:
            self._stream = None

    def _read(self, stream: _WatchStream, deadline: float) -> list[Event]:
        """The events of the messages that arrive by deadline (stops at the first message with events)."""
        out: list[Event] = []
        while not out:
            messages = stream.messages(deadline)
            if not messages:
                return out
            for message in messages:
                out.extend(self._take(stream, message))
        return out

    def _take(self, stream: _WatchStream, message: dict[str, Any]) -> list[Event]:
        """The new events of one message; the revision moves on."""
        try:
            result = _watch_result(message, stream.url)
        except _EndpointFailed as failure:
            raise _StreamLost(str(failure)) from None
        if result.get("created"):
            return []
        raw_events = result.get("events") or []
        if not raw_events:  # a progress notification: everything up to its revision has been sent
            stream.delivered = True
            self.revision = max(self.revision, _revision(result))
            return []
        if not isinstance(raw_events, list):
            raise _StreamLost(f"an unexpected watch message {str(message)[:200]}")
        batch = [event for event in map(self._event, raw_events) if event is not None]
        self._fragments.extend(batch)
        # Every item counts (one outside the prefix too), so no stream of fragments grows without bound.
        self._fragment_bytes += len(raw_events) * _EVENT_OVERHEAD + sum(len(e.key) + len(e.value) for e in batch)
        if self._fragment_bytes > MAX_RESPONSE_BYTES:
            self._fragments, self._fragment_bytes = [], 0
            raise _too_large(f"one batch of watch events from {stream.url} (reassembled from its fragments)")
        if result.get("fragment"):
            return []  # the rest of this batch follows
        events = [event for event in self._fragments if event is not None and event.mod_revision > self.revision]
        self._fragments, self._fragment_bytes = [], 0
        stream.delivered = True
        if events:
            self.revision = max(self.revision, events[-1].mod_revision)
            self._store._count(watch_events=len(events))
        return events

    def _event(self, item: Any) -> Event | None:
        """One decoded event; None for a key outside the prefix or undecodable (never raised to the caller)."""
        if not isinstance(item, dict) or not isinstance(item.get("kv"), dict):
            return None
        kv = item["kv"]
        try:
            key = self._store._relative(base64.b64decode(kv.get("key", ""), validate=True))
            value = base64.b64decode(kv.get("value", ""), validate=True)
            mod_revision, version, lease = (
                _int(kv.get("mod_revision", 0)),
                _int(kv.get("version", 0)),
                _int(kv.get("lease", 0)),
            )
        except (TypeError, ValueError):
            return None
        if key is None or not key.startswith(self._prefix):
            return None
        if item.get("type") == "DELETE":
            self._store._remember_lease(key, 0)
            return Event("delete", key, b"", mod_revision, 0)
        if self._store._known_lease(key):
            self._store._remember_lease(key, lease)
        return Event("put", key, value, mod_revision, version)


class _EtcdClaims(Claims):
    """create_first() attempts on etcd: one lease granted at the first attempt, reused by every later one.

    close() revokes the lease unless an attempt created a key with it.
    """

    def __init__(self, store: EtcdStore, ttl: int | None) -> None:
        self._store = store
        self._ttl = ttl
        self._lease = 0
        self._used = False

    def create_first(self, keys: Sequence[str], value: bytes) -> Entry | None:
        keys = check_claim_keys(keys)
        if self._ttl is not None and not self._lease:
            self._lease = self._store._grant(self._ttl)
        entry = self._store._create_first(keys, value, self._lease)
        if entry is not None:
            self._used = True
        return entry

    def close(self) -> None:
        lease, self._lease = self._lease, 0
        if lease and not self._used:
            self._store._revoke(lease)


def _watch_result(message: dict[str, Any], url: str) -> dict[str, Any]:
    """The "result" of a watch message; _EndpointFailed for errors and cancels, Compacted for compaction."""
    if "error" in message:
        error = message["error"]
        text = error.get("message", error) if isinstance(error, dict) else error
        raise _EndpointFailed(f"{text}", retryable=True)
    result = message.get("result")
    if not isinstance(result, dict):
        raise _EndpointFailed(f"an unexpected watch message {str(message)[:200]}")
    compact = _int(result.get("compact_revision", 0))
    if compact:
        raise Compacted(
            f"the watched revision is compacted (etcd keeps history from revision {compact}): "
            f"list again, then watch from the listed revision",
            compact_revision=compact,
        )
    if result.get("canceled"):
        reason = str(result.get("cancel_reason") or "no reason given")
        if any(marker in reason for marker in _TOKEN_ERRORS):
            raise _StreamTokenRefused(f"etcd canceled the watch: {reason}", retryable=True)
        raise _EndpointFailed(f"etcd canceled the watch: {reason}", retryable=True)
    return result


def _set_keepalive(sock: socket.socket, idle: int, interval: int, count: int) -> None:
    """TCP keep-alive: a peer that vanished without a word is noticed after idle + interval * count seconds."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _sub_txn(answer: dict[str, Any]) -> dict[str, Any]:
    """responses[0].response_txn of a txn answer ({} if absent)."""
    responses = answer.get("responses")
    if isinstance(responses, list) and responses and isinstance(responses[0], dict):
        sub = responses[0].get("response_txn")
        if isinstance(sub, dict):
            return sub
    return {}


def _walk_claim(keys: list[str], chain: dict[str, Any], value: bytes) -> tuple[str | None, Entry | None]:
    """(the key the nested create txn created, the first candidate that already held our value at version 1).

    Level i succeeded: keys[i] was created. Else its responses are
    [range of keys[i], the txn of level i + 1].
    """
    earlier: Entry | None = None
    for key in keys:
        if chain.get("succeeded", False):
            return key, earlier
        responses = chain.get("responses")
        if not isinstance(responses, list) or not responses:
            break
        found = _range_kv(responses[0])
        if earlier is None and found is not None and found.value == value and found.version == 1 and found.lease == 0:
            earlier = Entry(key, found.value, found.mod_revision, found.version)
        if len(responses) < 2 or not isinstance(responses[1], dict):
            break
        chain = responses[1].get("response_txn") or {}
    return None, earlier


def _range_kv(response: Any) -> _FoundKey | None:
    """The first kv of a {"response_range": ...} response, decoded; None if absent or malformed."""
    if not isinstance(response, dict):
        return None
    return _failure_kv({"responses": [response]})


def _int(value: Any) -> int:
    """An int64 of the gateway (a decimal string) or 0; ValueError if it is not a number."""
    if isinstance(value, bool):
        raise ValueError(f"not a number: {value!r}")
    return int(value or 0)


def _ssl_context(tls: TLSFiles) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=tls.cafile)
        if tls.certfile:
            context.load_cert_chain(tls.certfile, tls.keyfile)
        elif tls.keyfile:
            raise StoreError("an etcd client key was given without its certificate: give --etcd-certfile too")
    except (OSError, ssl.SSLError) as err:
        files = ", ".join(f for f in (tls.cafile, tls.certfile, tls.keyfile) if f)
        raise StoreError(f"cannot load the etcd TLS files ({files}): {getattr(err, 'strerror', None) or err}") from None
    return context


def _describe(err: BaseException, tls: bool = False, client_cert: bool = False) -> str:
    """A short, actionable reason for a failed connection or request."""
    if not client_cert:
        cert_hint = "the server may require a client certificate: give one it trusts (and its key)"
    else:
        cert_hint = "the server did not accept the client certificate: is it signed by a CA the server trusts?"
    if isinstance(err, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate verification failed: {err.verify_message or err} "
            f"(is the CA file the one that signed the server certificate, and does the certificate "
            f"name this host or IP?)"
        )
    if isinstance(err, ssl.SSLEOFError):
        return f"the server closed the TLS connection ({cert_hint})"
    if isinstance(err, ssl.SSLError):
        reason = (err.reason or str(err)).lower()
        if any(
            word in reason
            for word in (
                "certificate_required",
                "certificate required",
                "bad_certificate",
                "unknown_ca",
                "handshake_failure",
            )
        ):
            return f"TLS handshake refused ({err.reason or err}): {cert_hint}"
        if "wrong_version_number" in reason or "wrong version number" in reason:
            return f"TLS failed ({err.reason or err}): the server does not speak TLS; use it without TLS files"
        return f"TLS error: {err.reason or err}"
    if isinstance(err, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(err, (ConnectionResetError, BrokenPipeError)) or (
        tls and isinstance(err, http.client.RemoteDisconnected)
    ):
        if tls:
            return f"connection reset by the server during TLS ({cert_hint})"
        return (
            "connection reset by the server (if it serves TLS, give TLS files: a CA file, and a client "
            "certificate if it asks for one)"
        )
    if isinstance(err, OSError) and err.errno is not None:
        return os.strerror(err.errno).lower() if err.errno != errno.ECONNREFUSED else "connection refused"
    if isinstance(err, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    return str(err) or type(err).__name__


def _is_stale_connection(err: BaseException) -> bool:
    return isinstance(
        err, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, http.client.BadStatusLine)
    )


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
        return _FoundKey(
            value=base64.b64decode(kv.get("value", ""), validate=True),
            lease=int(kv.get("lease", 0)),
            version=int(kv.get("version", 0)),
            create_revision=int(kv.get("create_revision", 0)),
            mod_revision=int(kv.get("mod_revision", 0)),
        )
    except (TypeError, ValueError):  # binascii.Error is a ValueError
        return None


def _revision(answer: dict[str, Any]) -> int:
    return int((answer.get("header") or {}).get("revision", 0))
