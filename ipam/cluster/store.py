"""The Store interface shared by the file store and the etcd store, and open_store().

Keys are relative to the store's prefix ("config", "subnets/10.244.1.0-24"):
slash-separated components, each non-empty, not starting with "." (names that
start with a dot are the file store's own bookkeeping), without control
characters. Both stores enforce the same rules, so code that works against
one works against the other.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

from .errors import StoreError

ACCEPTED_URLS = ("file:///DIR (a local directory, created if missing) or "
                 "etcd://HOST:PORT[,HOST:PORT...] (etcd v3; https when TLS files are given)")

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
class Entry:
    """One key of the store, its value and the revisions it carries.

    mod_revision is the store revision of the key's last change; version
    counts changes since the key was created (1 right after create).
    """

    key: str
    value: bytes
    mod_revision: int
    version: int


def validate_key(key: str) -> str:
    """Return key if it is a valid relative key, else raise StoreError saying why."""
    if not isinstance(key, str) or not key:
        raise StoreError(f"invalid store key {key!r}: it must be a non-empty string")
    if len(key) > MAX_KEY_LEN:
        raise StoreError(f"invalid store key {key[:40]!r}...: longer than {MAX_KEY_LEN} characters")
    if key.startswith("/"):
        raise StoreError(f"invalid store key {key!r}: keys are relative to the store prefix, "
                         f"drop the leading '/'")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key):
        raise StoreError(f"invalid store key {key!r}: it must not contain NUL or other control characters")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise StoreError(f"invalid store key {key!r}: empty, '.' and '..' components are not allowed")
        if part.startswith("."):
            raise StoreError(f"invalid store key {key!r}: components must not start with '.' "
                             f"(reserved for the store's own files)")
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
    wait() blocks until something changed after a given revision, which is
    how a watcher follows the store without missing a change:

        entries, rev = store.list("subnets/")
        while True:
            if store.wait("subnets/", rev, timeout=30) is not None:
                entries, rev = store.list("subnets/")   # re-list on every wake-up
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
    def close(self) -> None:
        """Release connections and file descriptors; the store is unusable afterwards."""

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
