"""The Store interface shared by the file store and the etcd store, and open_store().

Keys are relative to the store's prefix ("config", "subnets/10.244.1.0-24"):
slash-separated components, each non-empty, not starting with "." (names that
start with a dot are the file store's own bookkeeping), without control
characters. Both stores enforce the same rules, so code that works against
one works against the other.

What a store offers, and what each part costs on etcd:

    get / list / ttl            reads (one range each; ttl adds a lease look-up)
    create / put / replace      writes (one txn or put; a TTL adds a lease grant)
    delete                      one deleterange
    refresh                     one lease keep-alive (the lease ID is remembered
                                from the write or read that last saw the key)
    claims(ttl).create_first    one txn that creates the first absent key of a list,
                                all attempts of one Claims sharing one lease grant
    watch(prefix, rev)          one long-lived stream: Watch.next() returns the
                                events after rev, in revision order; idle costs nothing
    wait(prefix, rev, timeout)  a short-lived watch (kept for simple callers)
    stats()                     what this store object has sent so far
"""

from __future__ import annotations

import abc
import random
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import StoreError

ACCEPTED_URLS = (
    "file:///DIR (a local directory, created if missing), "
    "etcd://HOST:PORT[,HOST:PORT...] (etcd v3; https when TLS files are given), or flannel's "
    "--etcd-endpoints form http://HOST:PORT[,http://HOST:PORT...] (etcd v3, plain http) and "
    "https://HOST:PORT[,https://HOST:PORT...] (etcd v3 over TLS)"
)

MAX_KEY_LEN = 1024


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for talking to etcd over TLS.

    cafile verifies the server (None: the system's trusted CAs); certfile and
    keyfile are the client certificate and its key, for servers started with
    --client-cert-auth.
    """

    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None


@dataclass(frozen=True)
class StoreAuth:
    """An etcd user and its password, for an etcd with authentication enabled (etcd's RBAC).

    The store trades them for a token (/v3/auth/authenticate) and sends the
    token with every request and watch. The password never shows: not in
    repr(), not in any message.
    """

    username: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.username, str) or not self.username:
            raise StoreError("an etcd user name must be a non-empty string")
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in self.username):
            raise StoreError(f"invalid etcd user name {self.username!r}: it must not contain control characters")
        if not isinstance(self.password, str) or not self.password:
            raise StoreError(f"the password of etcd user {self.username!r} is empty")


@dataclass(frozen=True)
class Entry:
    """One key of the store, its value and the revisions it carries.

    mod_revision is the store revision of the key's last change; version
    counts changes since the key was created (1 right after create).
    """

    key: str
    value: bytes
    mod_revision: int
    version: int


@dataclass(frozen=True)
class Event:
    """One change a Watch reports.

    kind is "put" or "delete"; key is relative to the store's prefix, like
    Entry.key; value is b"" for a delete; mod_revision is the revision of the
    change; version is the key's version after a put (0 for a delete).
    """

    kind: str
    key: str
    value: bytes
    mod_revision: int
    version: int = 0


class Watch(abc.ABC):
    """A stream of the changes under one prefix, after a revision; see Store.watch().

    revision is the newest revision this watch has seen (through events, or
    through the store telling it that nothing under the prefix changed up to
    a revision): a caller that re-lists or opens a new watch can resume from it.
    """

    revision: int

    @abc.abstractmethod
    def next(self, timeout: float) -> list[Event]:
        """The next events (in revision order), or [] after timeout seconds without any.

        Raises Compacted when the revision to resume from is gone: list again,
        then open a new watch from the listed revision (this one keeps raising
        Compacted). Raises StoreUnavailable when the stream was lost and could
        not be re-established within this call; the watch stays usable: the
        next call tries again (no earlier than a bounded back-off, 0.2 s
        doubling to 5 s, +-20 % jitter), resuming from revision + 1, so no
        change is lost or repeated.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the stream; next() raises StoreError afterwards."""

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Claims(abc.ABC):
    """Create-if-absent attempts that share one TTL; see Store.claims().

    On etcd the first attempt grants one lease for the TTL and every later
    attempt reuses it; close() revokes it unless an attempt created a key
    with it (then the key keeps it, and refresh() renews it).
    """

    @abc.abstractmethod
    def create_first(self, keys: Sequence[str], value: bytes) -> Entry | None:
        """Create the first of keys (in order) that does not exist, atomically; None if all exist.

        Returns the created entry (version 1, with its mod_revision). At most
        MAX_CLAIM_KEYS keys per call.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Give back what the attempts held and did not use (etcd: revoke the unused lease)."""

    def __enter__(self) -> "Claims":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


MAX_CLAIM_KEYS = 16  # keys one create_first() may try (one nested txn level each on etcd)

# A watch whose stream is lost waits this long before it tries again, doubling up to the maximum.
WATCH_BACKOFF_MIN = 0.2
WATCH_BACKOFF_MAX = 5.0
WATCH_BACKOFF_JITTER = 0.2


class Backoff:
    """When a watch may try its lost stream again: 0.2 s after a failure, doubling to 5 s, +-20 % jitter.

    The jitter keeps a thousand watchers that lost one member from coming back in one burst.
    """

    def __init__(self) -> None:
        self.delay = 0.0  # the last back-off (0: none, the next attempt may go at once)
        self.until = 0.0  # monotonic time before which no attempt is made

    def failed(self) -> None:
        self.delay = WATCH_BACKOFF_MIN if self.delay <= 0 else min(self.delay * 2, WATCH_BACKOFF_MAX)
        jitter = random.uniform(1 - WATCH_BACKOFF_JITTER, 1 + WATCH_BACKOFF_JITTER)
        self.until = time.monotonic() + self.delay * jitter

    def reset(self) -> None:
        self.delay = self.until = 0.0

    def remaining(self) -> float:
        """Seconds until the next attempt may go (0: now)."""
        return max(0.0, self.until - time.monotonic())


def validate_key(key: str) -> str:
    """Return key if it is a valid relative key, else raise StoreError saying why."""
    if not isinstance(key, str) or not key:
        raise StoreError(f"invalid store key {key!r}: it must be a non-empty string")
    if len(key) > MAX_KEY_LEN:
        raise StoreError(f"invalid store key {key[:40]!r}...: longer than {MAX_KEY_LEN} characters")
    if key.startswith("/"):
        raise StoreError(f"invalid store key {key!r}: keys are relative to the store prefix, drop the leading '/'")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key):
        raise StoreError(f"invalid store key {key!r}: it must not contain NUL or other control characters")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise StoreError(f"invalid store key {key!r}: empty, '.' and '..' components are not allowed")
        if part.startswith("."):
            raise StoreError(
                f"invalid store key {key!r}: components must not start with '.' (reserved for the store's own files)"
            )
    return key


def validate_prefix(prefix: str) -> str:
    """A list/wait prefix: "" (everything) or the start of a key ("subnets/")."""
    if prefix == "":
        return prefix
    if not isinstance(prefix, str):
        raise StoreError(f"invalid store key prefix {prefix!r}: it must be a string")
    # "subnets/" is a valid prefix although "subnets/" is not a valid key.
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


class Store(abc.ABC):
    """A small key-value store with revisions, compare-and-swap, TTLs and watches.

    All keys are relative to the store's prefix. Every change bumps the
    store's revision; list() reports the revision its answer was read at, and
    a watch from that revision reports every later change, which is how a
    watcher follows the store without missing one and without re-listing:

        entries, rev = store.list("subnets/")
        state = {e.key: e for e in entries}
        watch = store.watch("subnets/", rev)
        while True:
            try:
                for event in watch.next(timeout=30):        # one stream; idle costs nothing
                    if event.kind == "put":
                        state[event.key] = Entry(event.key, event.value, event.mod_revision, event.version)
                    else:
                        state.pop(event.key, None)
            except Compacted:
                entries, rev = store.list("subnets/")      # history is gone: re-list, watch again
                state = {e.key: e for e in entries}
                watch.close()
                watch = store.watch("subnets/", rev)
            except StoreUnavailable:
                ...                                         # keep what we have; next() reconnects
    """

    @abc.abstractmethod
    def get(self, key: str) -> Entry | None:
        """The entry at key, or None if there is none."""

    @abc.abstractmethod
    def list(self, prefix: str) -> tuple[list[Entry], int]:
        """Entries whose key starts with prefix (sorted by key), and the revision they were read at."""

    @abc.abstractmethod
    def create(self, key: str, value: bytes, ttl: int | None = None) -> bool:
        """Store value at key only if key does not exist; False if it does (atomic)."""

    @abc.abstractmethod
    def put(self, key: str, value: bytes, ttl: int | None = None) -> int:
        """Store value at key unconditionally; return the new revision."""

    @abc.abstractmethod
    def replace(self, key: str, value: bytes, expected_mod_revision: int, ttl: int | None = None) -> bool:
        """Store value at key only if its mod_revision is still expected_mod_revision (compare-and-swap)."""

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Remove key; False if it was not there."""

    @abc.abstractmethod
    def refresh(self, key: str) -> bool:
        """Renew the TTL of key's lease; False if the key is gone (for instance expired)."""

    @abc.abstractmethod
    def ttl(self, key: str) -> int | None:
        """The TTL key was written with (seconds); None if it has none or is gone."""

    @abc.abstractmethod
    def wait(self, prefix: str, after_revision: int, timeout: float) -> int | None:
        """Block until a key under prefix changed at a revision > after_revision.

        Returns the newest such revision seen, or None after timeout seconds.
        Raises Compacted if after_revision is too old to follow (re-list),
        StoreUnavailable if the connection to the store is lost.
        """

    @abc.abstractmethod
    def watch(self, prefix: str, after_revision: int) -> Watch:
        """A Watch of the keys under prefix that reports every change at a revision > after_revision.

        Opening costs nothing until the first next(); errors (Compacted,
        StoreUnavailable) are raised by next().
        """

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """What this store object did so far: {"requests": {operation: count}, "watch_reconnects": N,
        "errors": N, "connections": N, "bytes_sent": N, "bytes_received": N, ...}.

        Operations are named as etcd names them: range, txn, put, deleterange,
        lease_grant, lease_keepalive, lease_revoke, lease_timetolive,
        watch_open, status, authenticate (an etcd user's token, first and
        renewed). The file store counts its own operations under the
        same names (create and replace are txn, refresh is lease_keepalive).
        """

    def claims(self, ttl: int | None = None) -> Claims:
        """Create-if-absent attempts sharing one TTL (and on etcd one lease); use as a context manager."""
        return _PlainClaims(self, check_ttl(ttl))

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and file descriptors; the store is unusable afterwards."""

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PlainClaims(Claims):
    """Claims by one create() per key: for stores without a cheaper way."""

    def __init__(self, store: Store, ttl: int | None) -> None:
        self._store, self._ttl = store, ttl

    def create_first(self, keys: Sequence[str], value: bytes) -> Entry | None:
        check_claim_keys(keys)
        for key in keys:
            if self._store.create(key, value, ttl=self._ttl):
                entry = self._store.get(key)
                return entry if entry is not None else Entry(key, check_value(value), 0, 1)
        return None

    def close(self) -> None:
        pass


def check_claim_keys(keys: Sequence[str]) -> list[str]:
    """keys for create_first(): 1..MAX_CLAIM_KEYS valid keys, no duplicates."""
    if isinstance(keys, str):
        raise StoreError("create_first() takes a list of keys, not one string")
    keys = list(keys)
    if not 1 <= len(keys) <= MAX_CLAIM_KEYS:
        raise StoreError(f"create_first() takes 1..{MAX_CLAIM_KEYS} keys, got {len(keys)}")
    if len(set(keys)) != len(keys):
        raise StoreError(f"create_first() got the same key twice in {keys}")
    for key in keys:
        validate_key(key)
    return keys


def check_ttl(ttl: int | None) -> int | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
        raise StoreError(f"invalid TTL {ttl!r}: give a whole number of seconds > 0, or None for no expiry")
    return ttl


def check_value(value: bytes) -> bytes:
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, bytes):
        raise StoreError(f"store values are bytes, got {type(value).__name__}")
    return value
