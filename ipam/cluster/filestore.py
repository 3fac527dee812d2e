"""The local file store: one file per key under a directory.

    DIR/
      .lock        flock()ed: exclusive around every change, shared around list()
      .revision    the store revision, bumped by every change (decimal text)
      .changes     change log, one "REVISION KEY" line per change, so wait() can
                   tell changes under its prefix from others (and see deletions)
      .expiry      expiry index, one "EXPIRES KEY" line per key that has a TTL
                   (EXPIRES: wall-clock seconds, time.time()); rewritten under the
                   exclusive lock whenever such a key is written, refreshed or
                   deleted, so wait() learns the earliest expiry from a stat()
      config       one file per key: a JSON record of at most 1 MiB,
      subnets/10.244.1.0-24     {"key": ..., "value": TEXT | "value_base64": B64,
                                 "mod_revision": N, "create_revision": N, "version": N,
                                 "ttl": SECONDS, "expires": WALL-CLOCK SECONDS}   (ttl, expires: with a TTL)

Values are written atomically (a temporary file, then rename; create-if-absent
links the temporary file into place, which fails if the key exists). Nothing
inside DIR is opened through a symbolic link; DIR itself may be reached
through one (it is the administrator's choice, like /var/run -> /run).

TTLs are enforced, as etcd's leases are. A key written with a TTL expires TTL
seconds after it was written or last refreshed (refresh() extends it by the
recorded TTL, without a new revision). An expired key is absent at once for
get(), list(), create(), replace(), delete() and refresh(); it becomes a real
deletion (a revision bump and a change-log line, which wake every watcher)
when it is reaped: by a write that meets it, and by wait(), whose 50 ms poll
only stat()s .expiry (re-reading it when it changed) and, once the earliest
expiry has passed, reaps under the exclusive lock, re-checking each record.
The index is a hint kept never later than the records: written before a
record gains an expiry, corrected from the records by the reaper.

A watch (watch()) follows the change log: each 50 ms poll reads only the
small .revision file (and stat()s .expiry, reaping what is due); when the
revision moved it reads, under the shared lock, the log lines after its
revision and the records of just the keys they name, and reports them as
events (a key gone, expired or unreadable is a delete; a key changed several
times between two polls is reported once, at its last change). It raises
Compacted when the log was trimmed past its revision, or when the store is
behind it (the directory was re-created).

claims(ttl).create_first(keys, value) tries the keys in order under one
exclusive lock and creates the first that is absent: one lock, one write.

Records are bounded and decoded with bounded nesting; list() skips a record
it cannot read or parse (one warning per file version on the "pycni.store"
logger) instead of failing the whole listing, and get() of it raises
StoreError.

Several processes (and threads) can share one directory: all changes are
serialised by the lock, which makes this store fit for one machine or for
nodes that share a filesystem with working flock().

Only root may use it. The store creates its directory (and the directories
under it) 0700 and every file in it 0600, the lock included: a lock file that
anyone can open is a lock anyone can flock() and freeze every node with. An
existing directory must belong to root (to this process's euid) and not be
writable by group or others; the lock and the bookkeeping files must belong to
root too (a lock of an older version, 0644, is tightened to 0600). Nodes that
share the directory on a network filesystem therefore all write as root: export
it with no_root_squash (with root_squash root's files would belong to nobody,
and the store refuses them), or use etcd. The lock is taken with a deadline
(the store's timeout, 5 s by default, counted from the last committed change:
a busy lock is waited for longer, up to six timeouts): on timeout
StoreUnavailable names the process(es) holding it, from /proc/locks.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import logging
import math
import os
import stat
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from cni_plugins.kernel.files import lock_holders, trust_problem
from cni_plugins.spec import boundedjson

from .errors import Compacted, StoreError, StoreUnavailable, UnreadableEntry
from .store import (
    Backoff,
    Claims,
    Entry,
    Event,
    Store,
    Watch,
    check_claim_keys,
    check_ttl,
    check_value,
    validate_key,
    validate_prefix,
)

LOCK_FILE = ".lock"
REVISION_FILE = ".revision"
CHANGES_FILE = ".changes"
EXPIRY_FILE = ".expiry"
TMP_PREFIX = ".tmp-"

POLL_INTERVAL = 0.05
# The change log is cut back to its newest half when it grows past this size.
MAX_CHANGES_BYTES = 256 * 1024
# A record holds one value; larger records are refused when written and skipped when listed.
MAX_RECORD_BYTES = 1024 * 1024
MAX_RECORD_DEPTH = 4  # a record is one flat object
MAX_EXPIRY_BYTES = 64 * 1024 * 1024
DIR_MODE = 0o700  # the store's directory (when the store creates it) and the directories in it
FILE_MODE = 0o600  # every file: the lock, the bookkeeping files, the records
DEFAULT_LOCK_TIMEOUT = 5.0  # seconds to wait for the lock before StoreUnavailable
_LOCK_POLL_MAX = 0.002  # the longest pause between two attempts at a busy lock (when polled)
_LOCK_BUSY_FACTOR = 6  # a lock that changes hands all along is waited for up to this many timeouts
_MAX_LOCK_WAITERS = 16  # helper threads per store in a blocking flock() (see _flock)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

log = logging.getLogger("pycni.store")
_wall_clock = time.time  # expiry times are wall-clock seconds, shared by every process (a seam for tests)


class _BadRecord(UnreadableEntry):
    """A record file that cannot be read or parsed; identity names the file version (for warning once)."""

    def __init__(self, message: str, identity: tuple[int, ...] | None) -> None:
        super().__init__(message)
        self.identity = identity


class FileStore(Store):
    """A Store in a local directory; see the module docstring for the layout."""

    def __init__(self, directory: str, timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.directory = os.path.normpath(directory)
        if timeout is None or not timeout > 0:
            raise StoreError(f"invalid file store timeout {timeout!r}: give seconds > 0")
        self.timeout = float(timeout)  # how long to wait for the lock
        try:
            if not os.path.isdir(self.directory):
                try:
                    os.makedirs(self.directory, mode=DIR_MODE)
                    os.chmod(self.directory, DIR_MODE)  # not narrowed by the umask
                except FileExistsError:
                    pass
            self._dir_fd: int | None = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (NotADirectoryError, FileExistsError):
            raise StoreError(f"cannot open the file store {self.directory}: it is not a directory") from None
        except OSError as err:
            raise StoreUnavailable(f"cannot open the file store {self.directory}: {err.strerror}") from None
        problem = trust_problem(os.fstat(self._dir_fd))
        if problem:
            os.close(self._dir_fd)
            self._dir_fd = None
            raise StoreError(
                f"refusing the file store {self.directory}: it {problem}; only root may change the "
                f"cluster's leases: `chown root {self.directory} && chmod go-w {self.directory}` "
                f"(on a network filesystem, export it with no_root_squash) or use etcd"
            )
        self._tightened = False
        self._waiters_lock = threading.Lock()
        self._waiters = 0  # _LockWaiter threads still in flock()
        self._warned: dict[str, tuple[int, ...] | None] = {}  # key -> the file version warned about
        self._expiry_lock = threading.Lock()
        self._expiry_seen: tuple[int, ...] | None = None  # stat identity of .expiry when last read
        self._earliest: float | None = None  # its earliest expiry (None: no TTL key)
        self._stats_lock = threading.Lock()
        self._requests: dict[str, int] = {}
        self._counters: dict[str, int] = {
            "errors": 0,
            "watch_reconnects": 0,
            "watch_polls": 0,
            "record_reads": 0,
            "watch_events": 0,
        }

    def __repr__(self) -> str:
        return f"FileStore({self.directory!r})"

    # -- the Store interface ------------------------------------------------

    def get(self, key: str) -> Entry | None:
        self._count("range")
        record = self._live_record(key)
        return None if record is None else _entry(key, record)

    def list(self, prefix: str) -> tuple[list[Entry], int]:
        validate_prefix(prefix)
        self._count("range")
        parts = prefix.split("/") if prefix else []
        dir_parts = parts[:-1]  # "subnets/" -> ["subnets"]; "subnets/10." -> ["subnets"]
        found: list[tuple[str, dict[str, Any]]] = []
        with self._io(f"list {prefix or '(everything)'}"), self._locked(exclusive=False):
            revision = self._read_revision()
            now = _wall_clock()
            start = self._open_dir(dir_parts, create=False)
            if start is not None:
                try:
                    base = "/".join(dir_parts) + "/" if dir_parts else ""
                    self._walk(start, base, prefix, found)
                finally:
                    os.close(start)
        entries = [_entry(key, record) for key, record in found if not _expired(record, now)]
        entries.sort(key=lambda e: e.key)
        return entries, revision

    def create(self, key: str, value: bytes, ttl: int | None = None) -> bool:
        validate_key(key)
        value, ttl = check_value(value), check_ttl(ttl)
        self._count("txn")
        with self._io(f"create {key}"), self._locked(exclusive=True):
            return self._create_locked(key, value, ttl) is not None

    def claims(self, ttl: int | None = None) -> Claims:
        return _FileClaims(self, check_ttl(ttl))

    def _create_first(self, keys: Sequence[str], value: bytes, ttl: int | None) -> Entry | None:
        """Create the first absent key of keys, all under one exclusive lock (one "txn")."""
        keys = check_claim_keys(keys)
        value = check_value(value)
        self._count("txn")
        with self._io(f"create one of {', '.join(keys)}"), self._locked(exclusive=True):
            for key in keys:
                entry = self._create_locked(key, value, ttl)
                if entry is not None:
                    return entry
        return None

    def _create_locked(self, key: str, value: bytes, ttl: int | None) -> Entry | None:
        """create() under the exclusive lock: the new entry, or None if key exists (readable or not)."""
        parent, leaf = self._open_parent(key, create=True)
        assert parent is not None
        try:
            now = _wall_clock()
            try:
                old = self._read_record(parent, leaf, key)
            except _BadRecord:
                return None  # the key exists, readable or not
            if old is not None and not _expired(old, now):
                return None
            revision = self._read_revision() + 1
            record = _record(key, value, revision, revision, 1, ttl, now)
            data = self._encode(key, record)
            self._expiry_before(key, record)
            if old is not None:
                os.unlink(leaf, dir_fd=parent)  # an expired key makes way: its deletion is part of this change
            if not self._write_record(parent, leaf, key, data, exclusive=True):
                if old is not None:
                    self._commit(revision, key)
                    self._expiry_after(key, None, old)
                return None
            self._commit(revision, key)
            self._expiry_after(key, record, old)
            return Entry(key=key, value=value, mod_revision=revision, version=1)
        finally:
            os.close(parent)

    def put(self, key: str, value: bytes, ttl: int | None = None) -> int:
        validate_key(key)
        value, ttl = check_value(value), check_ttl(ttl)
        self._count("put")
        with self._io(f"write {key}"), self._locked(exclusive=True):
            parent, leaf = self._open_parent(key, create=True)
            assert parent is not None
            try:
                now = _wall_clock()
                old = self._read_record(parent, leaf, key)
                live = old if old is not None and not _expired(old, now) else None  # an expired key's deletion
                revision = self._read_revision() + 1  # is part of this change
                if live is None:
                    record = _record(key, value, revision, revision, 1, ttl, now)
                else:
                    record = _record(key, value, revision, live["create_revision"], live["version"] + 1, ttl, now)
                data = self._encode(key, record)
                self._expiry_before(key, record)
                self._write_record(parent, leaf, key, data, exclusive=False)
                self._commit(revision, key)
                self._expiry_after(key, record, old)
                return revision
            finally:
                os.close(parent)

    def replace(self, key: str, value: bytes, expected_mod_revision: int, ttl: int | None = None) -> bool:
        validate_key(key)
        value, ttl = check_value(value), check_ttl(ttl)
        self._count("txn")
        with self._io(f"replace {key}"), self._locked(exclusive=True):
            parent, leaf = self._open_parent(key, create=False)
            if parent is None:
                return False
            try:
                now = _wall_clock()
                old = self._read_record(parent, leaf, key)
                if old is not None and _expired(old, now):
                    self._delete_record(parent, leaf, key, old)  # gone, as far as anyone can tell: make it real
                    return False
                if old is None or old["mod_revision"] != expected_mod_revision:
                    return False
                revision = self._read_revision() + 1
                record = _record(key, value, revision, old["create_revision"], old["version"] + 1, ttl, now)
                data = self._encode(key, record)
                self._expiry_before(key, record)
                self._write_record(parent, leaf, key, data, exclusive=False)
                self._commit(revision, key)
                self._expiry_after(key, record, old)
                return True
            finally:
                os.close(parent)

    def delete(self, key: str) -> bool:
        validate_key(key)
        self._count("deleterange")
        with self._io(f"delete {key}"), self._locked(exclusive=True):
            parent, leaf = self._open_parent(key, create=False)
            if parent is None:
                return False
            try:
                try:
                    old = self._read_record(parent, leaf, key)
                except _BadRecord:
                    # Deleting is how a damaged record is cleaned up: it goes, and watchers see it go.
                    self._delete_record(parent, leaf, key, {"expires": 0})
                    return True
                if old is None:
                    return False
                self._delete_record(parent, leaf, key, old)
                return not _expired(old, _wall_clock())  # an expired key was not there any more
            finally:
                os.close(parent)

    def ttl(self, key: str) -> int | None:
        self._count("range")
        record = self._live_record(key)
        return None if record is None else record.get("ttl")

    def _live_record(self, key: str) -> dict[str, Any] | None:
        """key's record unless it is missing or expired (read without the lock: records are replaced whole)."""
        validate_key(key)
        with self._io(f"read {key}"):
            parent, leaf = self._open_parent(key, create=False)
            if parent is None:
                return None
            try:
                record = self._read_record(parent, leaf, key)
            finally:
                os.close(parent)
        if record is None or _expired(record, _wall_clock()):
            return None
        return record

    def refresh(self, key: str) -> bool:
        """Extend key's expiry by its recorded TTL (no new revision); False if it is gone or expired."""
        validate_key(key)
        self._count("lease_keepalive")
        with self._io(f"refresh {key}"), self._locked(exclusive=True):
            parent, leaf = self._open_parent(key, create=False)
            if parent is None:
                return False
            try:
                now = _wall_clock()
                old = self._read_record(parent, leaf, key)
                if old is None:
                    return False
                if _expired(old, now):
                    self._delete_record(parent, leaf, key, old)
                    return False
                ttl = old.get("ttl")
                if ttl is None:
                    return True  # no TTL: nothing to renew, and it does not expire
                record = _record(key, old["raw"], old["mod_revision"], old["create_revision"], old["version"], ttl, now)
                self._write_record(parent, leaf, key, self._encode(key, record), exclusive=False)
                self._expiry_after(key, record, old)  # later than before: the index may follow the record
                return True
            finally:
                os.close(parent)

    def wait(self, prefix: str, after_revision: int, timeout: float) -> int | None:
        validate_prefix(prefix)
        deadline = time.monotonic() + max(0.0, timeout)
        checked = after_revision  # changes up to here are known not to concern prefix
        while True:
            with self._io("reap expired keys"):
                self._reap_if_due()
            with self._io("read the store revision"):
                current = self._read_revision()
            if current < after_revision:
                raise Compacted(
                    f"the file store {self.directory} is at revision {current}, behind the "
                    f"revision {after_revision} being watched from (was it re-created?): "
                    f"list again",
                    compact_revision=current,
                )
            if current > checked:
                found = self._changes_since(prefix, after_revision)
                if found is not None:
                    return found
                checked = current
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(POLL_INTERVAL, remaining))

    def watch(self, prefix: str, after_revision: int) -> Watch:
        validate_prefix(prefix)
        return _FileWatch(self, prefix, int(after_revision))

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            return {"requests": dict(self._requests), **self._counters}

    def close(self) -> None:
        fd, self._dir_fd = self._dir_fd, None
        if fd is not None:
            os.close(fd)

    def _count(self, operation: str, counter: str = "") -> None:
        with self._stats_lock:
            if counter:
                self._counters[counter] = self._counters.get(counter, 0) + 1
            else:
                self._requests[operation] = self._requests.get(operation, 0) + 1

    # -- watch ------------------------------------------------------------------

    def _events_since(self, prefix: str, after_revision: int) -> tuple[list[Event], int]:
        """The changes under prefix after after_revision as events, and the revision they bring the watch to.

        Read under the shared lock, so the log, the revision and the records agree.
        """
        with self._io("read the change log"), self._locked(exclusive=False):
            current = self._read_revision()
            compacted, changes = self._read_changes()
            if after_revision < compacted:
                raise Compacted(
                    f"revision {after_revision} of the file store {self.directory} is compacted "
                    f"(changes up to {compacted} are no longer logged): list again",
                    compact_revision=compacted,
                )
            last: dict[str, int] = {}
            for revision, key in changes:
                if after_revision < revision <= current and key.startswith(prefix):
                    last[key] = max(revision, last.get(key, 0))
            events = [
                event
                for event in (self._event(key, revision) for key, revision in last.items())
                if event is not None and event.mod_revision > after_revision
            ]
        events.sort(key=lambda e: (e.mod_revision, e.key))
        return events, current

    def _event(self, key: str, revision: int) -> Event | None:
        """What key's log line at revision means now: a put with its record, or a delete."""
        try:
            validate_key(key)
        except StoreError:
            return None  # not a key this store writes
        try:
            parent, leaf = self._open_parent(key, create=False)
            if parent is None:
                return Event("delete", key, b"", revision)
            try:
                record = self._read_record(parent, leaf, key)
            finally:
                os.close(parent)
        except _BadRecord as err:
            self._skip(key, err.identity, str(err))  # list() skips it too: gone, as far as a reader can tell
            return Event("delete", key, b"", revision)
        except StoreError as err:
            self._skip(key, None, str(err))
            return Event("delete", key, b"", revision)
        self._count("", "record_reads")
        if record is None:
            return Event("delete", key, b"", revision)
        if record["mod_revision"] > revision:
            return None  # changed again after this log line: a later line reports it
        return Event("put", key, record["raw"], record["mod_revision"], record["version"])

    # -- expiry ---------------------------------------------------------------

    def _delete_record(self, parent: int, leaf: str, key: str, old: dict[str, Any]) -> None:
        """Remove key's record and commit the deletion (under the exclusive lock)."""
        os.unlink(leaf, dir_fd=parent)
        os.fsync(parent)
        self._commit(self._read_revision() + 1, key)
        self._expiry_after(key, None, old)

    def _expiry_before(self, key: str, record: dict[str, Any]) -> None:
        """Before a record with an expiry is written: the index learns it (never later than the record)."""
        expires = record.get("expires")
        if expires is None:
            return
        index = self._read_expiry_locked()
        if key not in index or index[key] > expires:
            index[key] = expires
            self._write_expiry(index)

    def _expiry_after(self, key: str, record: dict[str, Any] | None, old: dict[str, Any] | None) -> None:
        """After key's record was written (or deleted, record None): the index says what the record says.

        old is the record before the change: when neither has an expiry, the index is not even read.
        """
        expires = record.get("expires") if record is not None else None
        if expires is None and (old is None or old.get("expires") is None):
            return
        index = self._read_expiry_locked()
        if index.get(key) == expires:
            return
        if expires is None:
            index.pop(key, None)
        else:
            index[key] = expires
        self._write_expiry(index)

    def _reap_if_due(self) -> None:
        """wait()'s poll: a stat() of the index; reap when its earliest expiry has passed."""
        try:
            st = os.stat(EXPIRY_FILE, dir_fd=self._fd, follow_symlinks=False)
        except FileNotFoundError:
            with self._expiry_lock:
                self._expiry_seen, self._earliest = None, None
            return
        seen = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._expiry_lock:
            if seen != self._expiry_seen:
                try:
                    earliest = min(self._read_expiry().values(), default=None)
                except StoreError:
                    earliest = 0.0  # unreadable: the reaper rebuilds it from the records
                self._expiry_seen, self._earliest = seen, earliest
            earliest = self._earliest
        if earliest is not None and earliest <= _wall_clock():
            self._reap()

    def _reap(self) -> None:
        """Delete every key whose expiry has passed and commit the deletions (one revision)."""
        with self._locked(exclusive=True):
            now = _wall_clock()
            try:
                index = self._read_expiry()
            except StoreError as err:
                log.warning("%s; rebuilding it from the records", err)
                index = self._rebuild_expiry()
            changed, reaped = False, []
            for key in sorted(k for k, expires in index.items() if expires <= now):
                expires = self._reap_one(key, now)
                if expires is None:
                    reaped.append(key)
                    del index[key]
                    changed = True
                elif expires is False:
                    del index[key]
                    changed = True
                elif expires != index[key]:
                    index[key] = expires
                    changed = True
            if reaped:
                self._commit(self._read_revision() + 1, *reaped)
            if changed:
                self._write_expiry(index)

    def _reap_one(self, key: str, now: float) -> float | bool | None:
        """Delete key if its record has expired: None if deleted, its expiry if it lives, False if not indexable."""
        parent, leaf = self._open_parent(key, create=False)
        if parent is None:
            return False
        try:
            try:
                record = self._read_record(parent, leaf, key)
            except StoreError:
                return False  # list() skips it, get() reports it; nothing for the index
            if record is None or record.get("expires") is None:
                return False
            if not _expired(record, now):
                return record["expires"]
            os.unlink(leaf, dir_fd=parent)
            os.fsync(parent)
            return None
        finally:
            os.close(parent)

    def _rebuild_expiry(self) -> dict[str, float]:
        found: list[tuple[str, dict[str, Any]]] = []
        top = self._open_dir([], create=False)
        assert top is not None
        try:
            self._walk(top, "", "", found)
        finally:
            os.close(top)
        return {key: record["expires"] for key, record in found if record.get("expires") is not None}

    def _read_expiry(self) -> dict[str, float]:
        """{key: expiry} from the index; {} if there is none; StoreError if it is unreadable."""
        try:
            fd = os.open(EXPIRY_FILE, _READ_FLAGS, dir_fd=self._fd)
        except FileNotFoundError:
            return {}
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise StoreError(f"{self.directory}/{EXPIRY_FILE} is not a regular file")
            self._check_owner(info, EXPIRY_FILE)
            data = _read_bounded(fd, MAX_EXPIRY_BYTES)
        finally:
            os.close(fd)
        if data is None:
            raise StoreError(f"{self.directory}/{EXPIRY_FILE} is larger than {MAX_EXPIRY_BYTES} bytes")
        index: dict[str, float] = {}
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            head, _, key = line.partition(" ")
            try:
                expires = float(head)
                if not math.isfinite(expires):
                    raise ValueError(head)
                validate_key(key)
            except (ValueError, StoreError):
                raise StoreError(
                    f'{self.directory}/{EXPIRY_FILE} line {number} is not "EXPIRES KEY": {line[:80]!r}'
                ) from None
            index[key] = expires
        return index

    def _read_expiry_locked(self) -> dict[str, float]:
        """The index for an update under the exclusive lock (rebuilt from the records if unreadable)."""
        try:
            return self._read_expiry()
        except StoreError as err:
            log.warning("%s; rebuilding it from the records", err)
            return self._rebuild_expiry()

    def _write_expiry(self, index: dict[str, float]) -> None:
        data = "".join(f"{index[key]:.3f} {key}\n" for key in sorted(index)).encode()
        tmp = self._write_temp(self._fd, data)
        try:
            os.rename(tmp, EXPIRY_FILE, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except BaseException:
            _unlink_quietly(tmp, self._fd)
            raise

    # -- locking and I/O helpers --------------------------------------------

    @property
    def _fd(self) -> int:
        if self._dir_fd is None:
            raise StoreError(f"the file store {self.directory} is closed")
        return self._dir_fd

    @contextmanager
    def _io(self, action: str) -> Iterator[None]:
        """Turn an OSError into StoreUnavailable that names the action and the directory."""
        try:
            yield
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise StoreError(
                    f"cannot {action} in the file store {self.directory}: refusing to follow a "
                    f"symbolic link{_name(err)}"
                ) from None
            raise StoreUnavailable(
                f"cannot {action} in the file store {self.directory}: {err.strerror or err}{_name(err)}"
            ) from None

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        # A fresh open file description per call: flock() then excludes other
        # threads of this process as well as other processes.
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE, dir_fd=self._fd)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise StoreError(f"{self.directory}/{LOCK_FILE} is not a regular file")
            self._check_owner(info, LOCK_FILE)
            if info.st_mode & 0o077:
                os.fchmod(fd, FILE_MODE)  # an older version's 0644: anyone could open it and hold it
                if not self._tightened:
                    self._tightened = True
                    log.warning(
                        "tightened the lock file %s/%s to mode %04o (it was %04o: any local user "
                        "could open it and hold the lock)",
                        self.directory,
                        LOCK_FILE,
                        FILE_MODE,
                        stat.S_IMODE(info.st_mode),
                    )
            self._flock(fd, exclusive)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _flock(self, fd: int, exclusive: bool) -> None:
        """flock() fd with a deadline; StoreUnavailable naming the holders when it passes.

        The deadline is the store's timeout without progress: while other writers commit
        changes (the revision file is replaced), the lock is busy, not stuck, and the wait
        goes on, up to _LOCK_BUSY_FACTOR timeouts in all. Linux has no flock() with a
        timeout: a helper thread waits in a blocking flock() on a duplicate of fd (the
        same open file description, so the lock it gets is the caller's), which the
        kernel wakes as soon as the lock is free. After the deadline the caller gives up
        and closes its fd; the helper, still waiting, releases the lock the moment it gets
        it (closing the duplicate, the description's last descriptor). At most
        _MAX_LOCK_WAITERS helpers wait per store; beyond that (a holder stuck for long),
        the lock is polled.
        """
        operation = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        start = last_progress = time.monotonic()
        mark, changes = self._progress_mark(), 0
        waiter = self._lock_waiter(fd, operation)
        pause = 0.001
        while True:
            now = time.monotonic()
            left = min(self.timeout - (now - last_progress), self.timeout * _LOCK_BUSY_FACTOR - (now - start))
            if left <= 0:
                break
            if waiter is not None:
                if waiter.wait(min(left, 0.1)):
                    waiter.result()
                    return
            else:
                time.sleep(min(pause, left))
                pause = min(pause * 2, _LOCK_POLL_MAX)
                try:
                    fcntl.flock(fd, operation | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    pass
            current = self._progress_mark()
            if current != mark:
                mark, changes, last_progress = current, changes + 1, time.monotonic()
        waited = time.monotonic() - start
        if changes:
            raise StoreUnavailable(
                f"timed out after {waited:.0f} s waiting for the lock {self.directory}/"
                f"{LOCK_FILE} of the file store: it is busy, not stuck ({changes} changes "
                f"were committed meanwhile); too many nodes write to this store at once: "
                f"try again, and use etcd for a cluster this busy"
            )
        holders = lock_holders(fd)
        if holders:
            who = ", ".join(f"PID {pid} ({command})" for pid, command in holders)
            advice = (
                f"held by {who}; pycni holds it for milliseconds at a time, so that process is stuck "
                f"or is not pycni: stop it (kill {' '.join(str(pid) for pid, _ in holders)}; a process "
                f"it started may have inherited the lock and hold it too) and try again"
            )
        else:
            advice = (
                "no process on this machine holds it according to /proc/locks: on a shared filesystem "
                "another node holds it; find the stuck process there and stop it, then try again"
            )
        raise StoreUnavailable(
            f"timed out after {self.timeout:g} s waiting for the lock "
            f"{self.directory}/{LOCK_FILE} of the file store: {advice}"
        )

    def _lock_waiter(self, fd: int, operation: int) -> "_LockWaiter | None":
        """A helper thread in a blocking flock() on a duplicate of fd; None when too many wait already."""
        with self._waiters_lock:
            if self._waiters >= _MAX_LOCK_WAITERS:
                return None
            self._waiters += 1
        duplicate = -1
        try:
            duplicate = os.dup(fd)
            return _LockWaiter(duplicate, operation, self._waiter_done)
        except BaseException:  # no thread was started: nothing else closes it or counts it down
            if duplicate >= 0:
                os.close(duplicate)
            self._waiter_done()
            raise

    def _waiter_done(self) -> None:
        with self._waiters_lock:
            self._waiters -= 1

    def _progress_mark(self) -> tuple[int, int] | None:
        """The identity of the revision file: every committed change replaces it."""
        try:
            info = os.stat(REVISION_FILE, dir_fd=self._fd, follow_symlinks=False)
        except OSError:
            return None
        return info.st_ino, info.st_mtime_ns

    def _check_owner(self, info: os.stat_result, name: str) -> None:
        """StoreError unless the store's file name (stat info) belongs to root (this process's euid)."""
        if info.st_uid not in (0, os.geteuid()):
            raise StoreError(
                f"refusing {self.directory}/{name}: it is owned by uid {info.st_uid}, not by root; "
                f"only root may use the file store: remove it (the store makes it again, mode "
                f"{FILE_MODE:04o}); on a network filesystem, export the store with no_root_squash"
            )

    def _open_dir(self, parts: list[str], create: bool) -> int | None:
        """An fd for DIR/parts..., never through a symlink; None if missing and not create."""
        # A new open file description (not a dup, which shares the directory offset): concurrent
        # walks of the top directory in several threads must not move each other's position.
        fd = os.open(".", _DIR_FLAGS, dir_fd=self._fd)
        try:
            for part in parts:
                try:
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    try:
                        os.mkdir(part, DIR_MODE, dir_fd=fd)
                    except FileExistsError:
                        pass
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except NotADirectoryError:
                    # O_NOFOLLOW|O_DIRECTORY on a symlink fails with ENOTDIR, not ELOOP: tell them apart.
                    if stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode):
                        raise StoreError(
                            f"cannot use {'/'.join(parts)} in the file store {self.directory}: "
                            f"refusing to follow the symbolic link {part}"
                        ) from None
                    raise StoreError(
                        f"cannot use {'/'.join(parts)} in the file store {self.directory}: "
                        f"{part} is a key, not a directory (the file store cannot hold both "
                        f"a key and keys under it)"
                    ) from None
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_parent(self, key: str, create: bool) -> tuple[int | None, str]:
        parts = key.split("/")
        return self._open_dir(parts[:-1], create), parts[-1]

    def _read_record(self, parent: int, leaf: str, key: str) -> dict[str, Any] | None:
        """key's record (expired or not), None if there is none; _BadRecord if it cannot be read or parsed."""
        try:
            fd = os.open(leaf, _READ_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise StoreError(f"key {key} in the file store {self.directory} is a directory of keys") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise StoreError(f"key {key} in the file store {self.directory} is a directory of keys")
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{self.directory}/{key} is not a regular file; refusing to read it")
            identity = (st.st_ino, st.st_size, st.st_mtime_ns)
            data = _read_bounded(fd, MAX_RECORD_BYTES) if st.st_size <= MAX_RECORD_BYTES else None
        finally:
            os.close(fd)
        try:
            if data is None:
                raise ValueError(f"it is larger than {MAX_RECORD_BYTES} bytes")
            return _parse_record(data)
        except (ValueError, KeyError, TypeError) as err:
            raise _BadRecord(
                f"{self.directory}/{key} is not a valid store record ({err}); remove it or restore it from a backup",
                identity,
            ) from None

    def _encode(self, key: str, record: dict[str, Any]) -> bytes:
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        if len(data) > MAX_RECORD_BYTES:
            raise StoreError(
                f"cannot store {key} in the file store {self.directory}: its record would be "
                f"{len(data)} bytes, more than the {MAX_RECORD_BYTES} allowed; store a smaller value"
            )
        return data

    def _write_record(self, parent: int, leaf: str, key: str, data: bytes, exclusive: bool) -> bool:
        tmp = self._write_temp(parent, data)
        try:
            if exclusive:
                try:
                    os.link(tmp, leaf, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=False)
                except FileExistsError:
                    return False
            else:
                try:
                    os.rename(tmp, leaf, src_dir_fd=parent, dst_dir_fd=parent)
                except IsADirectoryError:
                    raise StoreError(f"key {key} in the file store {self.directory} is a directory of keys") from None
                tmp = None
            os.fsync(parent)
            return True
        finally:
            if tmp is not None:
                _unlink_quietly(tmp, parent)

    def _write_temp(self, parent: int, data: bytes) -> str:
        for _ in range(8):
            name = f"{TMP_PREFIX}{os.urandom(6).hex()}"
            try:
                fd = os.open(name, _NEW_FLAGS, FILE_MODE, dir_fd=parent)
                break
            except FileExistsError:
                continue
        else:
            raise StoreError(f"cannot find a free temporary file name in the file store {self.directory}")
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(name, parent)
            raise
        os.close(fd)
        return name

    def _read_revision(self) -> int:
        try:
            fd = os.open(REVISION_FILE, _READ_FLAGS, dir_fd=self._fd)
        except FileNotFoundError:
            return 0
        try:
            self._check_owner(os.fstat(fd), REVISION_FILE)
            text = _read_all(fd).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
        if not text.isdigit():
            raise StoreError(f"{self.directory}/{REVISION_FILE} holds {text[:20]!r}, not a revision number")
        return int(text)

    def _commit(self, revision: int, *keys: str) -> None:
        """Record a change of keys: append it to the change log, then publish the new revision."""
        fd = os.open(
            CHANGES_FILE,
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
            FILE_MODE,
            dir_fd=self._fd,
        )
        try:
            info = os.fstat(fd)
            self._check_owner(info, CHANGES_FILE)
            if info.st_mode & 0o077:
                os.fchmod(fd, FILE_MODE)  # an older version's 0644
            os.write(fd, "".join(f"{revision} {key}\n" for key in keys).encode())
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > MAX_CHANGES_BYTES:
            self._trim_changes()
        tmp = self._write_temp(self._fd, f"{revision}\n".encode())
        try:
            os.rename(tmp, REVISION_FILE, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except BaseException:
            _unlink_quietly(tmp, self._fd)
            raise

    def _read_changes(self) -> tuple[int, list[tuple[int, str]]]:
        """(compacted revision, [(revision, key)]) from the change log."""
        try:
            fd = os.open(CHANGES_FILE, _READ_FLAGS, dir_fd=self._fd)
        except FileNotFoundError:
            return 0, []
        try:
            self._check_owner(os.fstat(fd), CHANGES_FILE)
            text = _read_all(fd).decode("utf-8", "replace")
        finally:
            os.close(fd)
        compacted, changes = 0, []
        for line in text.splitlines():
            head, _, rest = line.partition(" ")
            if head == "#compacted":
                compacted = int(rest) if rest.isdigit() else compacted
            elif head.isdigit() and rest:
                changes.append((int(head), rest))
        return compacted, changes

    def _trim_changes(self) -> None:
        compacted, changes = self._read_changes()
        keep = changes[len(changes) // 2 :]
        dropped = changes[: len(changes) // 2]
        if dropped:
            compacted = max(compacted, dropped[-1][0])
        lines = [f"#compacted {compacted}\n"] + [f"{rev} {key}\n" for rev, key in keep]
        tmp = self._write_temp(self._fd, "".join(lines).encode())
        os.rename(tmp, CHANGES_FILE, src_dir_fd=self._fd, dst_dir_fd=self._fd)

    def _changes_since(self, prefix: str, after_revision: int) -> int | None:
        with self._io("read the change log"), self._locked(exclusive=False):
            compacted, changes = self._read_changes()
        if after_revision < compacted:
            raise Compacted(
                f"revision {after_revision} of the file store {self.directory} is compacted "
                f"(changes up to {compacted} are no longer logged): list again",
                compact_revision=compacted,
            )
        newest = [rev for rev, key in changes if rev > after_revision and key.startswith(prefix)]
        return max(newest) if newest else None

    def _walk(self, fd: int, base: str, prefix: str, out: list[tuple[str, dict[str, Any]]]) -> None:
        """(key, record) of every readable record under fd whose key starts with prefix (expired ones too).

        A record that cannot be read or parsed is skipped with one warning per version of its file.
        """
        with os.scandir(fd) as it:
            names = [(e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False)) for e in it]
        for name, is_dir, is_file in names:
            if name.startswith("."):
                continue  # bookkeeping and temporary files
            key = base + name
            if is_dir:
                sub = key + "/"
                if not (sub.startswith(prefix) or prefix.startswith(sub)):
                    continue
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except (FileNotFoundError, NotADirectoryError, OSError) as err:
                    if isinstance(err, (FileNotFoundError, NotADirectoryError)) or err.errno == errno.ELOOP:
                        continue  # removed meanwhile, or replaced by a symlink: skip
                    raise
                try:
                    self._walk(child, sub, prefix, out)
                finally:
                    os.close(child)
            elif is_file and key.startswith(prefix):
                try:
                    validate_key(key)
                except StoreError:
                    continue  # not a name this store writes
                try:
                    record = self._read_record(fd, name, key)
                except _BadRecord as err:
                    self._skip(key, err.identity, str(err))
                    continue
                except (StoreError, OSError) as err:
                    if isinstance(err, OSError) and err.errno not in (
                        errno.ELOOP,
                        errno.EACCES,
                        errno.EPERM,
                        errno.EIO,
                        errno.EISDIR,
                    ):
                        raise
                    self._skip(
                        key,
                        _identity(fd, name),
                        f"cannot read {self.directory}/{key}: {err.strerror if isinstance(err, OSError) else err}",
                    )
                    continue
                if record is not None:
                    self._warned.pop(key, None)
                    out.append((key, record))
            # symlinks and special files are never followed or read

    def _skip(self, key: str, identity: tuple[int, ...] | None, why: str) -> None:
        """Warn about a record list() skips, once per version of its file."""
        if key in self._warned and self._warned[key] == identity:
            return
        self._warned[key] = identity
        log.warning("the file store skips %s: %s", key, why)


class _LockWaiter:
    """One blocking flock() in a daemon thread, on a descriptor it owns and closes when it returns.

    The descriptor is a duplicate of the caller's: whoever of the two still has it open
    holds the lock the thread got, and the thread's close() releases it once the
    caller's descriptor is closed too (or at once, if the caller gave up and closed it).
    """

    def __init__(self, fd: int, operation: int, done: Any) -> None:
        self._fd = fd
        self._operation = operation
        self._done = done
        self._event = threading.Event()
        self._error: OSError | None = None
        threading.Thread(target=self._run, name="pycni-store-lock", daemon=True).start()

    def _run(self) -> None:
        try:
            fcntl.flock(self._fd, self._operation)
        except OSError as err:
            self._error = err
        finally:
            self._event.set()
            os.close(self._fd)
            self._done()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def result(self) -> None:
        if self._error is not None:
            raise self._error


class _FileClaims(Claims):
    """create_first() attempts of the file store: one exclusive lock each; nothing to give back."""

    def __init__(self, store: FileStore, ttl: int | None) -> None:
        self._store, self._ttl = store, ttl

    def create_first(self, keys: Sequence[str], value: bytes) -> Entry | None:
        return self._store._create_first(keys, value, self._ttl)

    def close(self) -> None:
        pass


class _FileWatch(Watch):
    """A Watch on the file store's change log; see the module docstring."""

    def __init__(self, store: FileStore, prefix: str, after_revision: int) -> None:
        self._store = store
        self._prefix = prefix
        self.revision = after_revision
        self._backoff = Backoff()
        self._last_error = ""
        self._compacted: Compacted | None = None
        self._closed = False
        store._count("watch_open")

    def __repr__(self) -> str:
        return f"<watch of {self._prefix or '(everything)'} in {self._store.directory} at revision {self.revision}>"

    def next(self, timeout: float) -> list[Event]:
        store = self._store
        if self._closed:
            raise StoreError(f"this watch of {self._prefix or 'the whole store'} in {store.directory} is closed")
        if self._compacted is not None:
            raise Compacted(str(self._compacted), compact_revision=self._compacted.compact_revision)
        deadline = time.monotonic() + max(0.0, timeout)
        wait = self._backoff.remaining()
        if wait > 0:  # the last poll failed: not again before the back-off
            if time.monotonic() + wait > deadline:
                time.sleep(max(0.0, deadline - time.monotonic()))
                raise StoreUnavailable(
                    f"{self._last_error} (the watch tries again in {self._backoff.remaining():.1f} s)"
                )
            time.sleep(wait)
        while True:
            try:
                events = self._poll()
            except Compacted as err:
                self._compacted = err
                raise
            except StoreUnavailable as err:
                store._count("", "errors")
                self._last_error = str(err)
                self._backoff.failed()
                raise
            self._backoff.reset()
            if events:
                store._count("", "watch_events")
                return events
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            time.sleep(min(POLL_INTERVAL, remaining))

    def _poll(self) -> list[Event]:
        """One poll: the revision file (and the expiry index's stat); the log and records only on a change."""
        store = self._store
        store._count("", "watch_polls")
        with store._io("reap expired keys"):
            store._reap_if_due()
        with store._io("read the store revision"):
            current = store._read_revision()
        if current < self.revision:
            raise Compacted(
                f"the file store {store.directory} is at revision {current}, behind the revision "
                f"{self.revision} being watched from (was it re-created?): list again",
                compact_revision=current,
            )
        if current == self.revision:
            return []
        events, seen = store._events_since(self._prefix, self.revision)
        self.revision = max(self.revision, seen)
        return events

    def close(self) -> None:
        self._closed = True


def _record(
    key: str, value: bytes, mod_revision: int, create_revision: int, version: int, ttl: int | None, now: float = 0.0
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "key": key,
        "mod_revision": mod_revision,
        "create_revision": create_revision,
        "version": version,
    }
    try:
        record["value"] = value.decode("utf-8")  # readable when it is text (it is JSON for leases)
    except UnicodeDecodeError:
        record["value_base64"] = base64.b64encode(value).decode("ascii")
    if ttl is not None:
        record["ttl"] = ttl
        record["expires"] = float(f"{now + ttl:.3f}")  # as the expiry index writes it
    return record


def _parse_record(data: bytes) -> dict[str, Any]:
    record = boundedjson.loads(data, max_bytes=MAX_RECORD_BYTES, max_depth=MAX_RECORD_DEPTH)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if "value" in record:
        if not isinstance(record["value"], str):
            raise ValueError("value is not a string")
        value = record["value"].encode("utf-8")
    else:
        if not isinstance(record["value_base64"], str):
            raise ValueError("value_base64 is not a string")
        value = base64.b64decode(record["value_base64"], validate=True)
    for field in ("mod_revision", "create_revision", "version"):
        number = record[field]
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise ValueError(f"{field} is not a revision number")
    ttl = record.get("ttl")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0):
        raise ValueError("ttl is not a whole number of seconds")
    expires = record.get("expires")
    if expires is not None and (
        isinstance(expires, bool) or not isinstance(expires, (int, float)) or not math.isfinite(expires)
    ):
        raise ValueError("expires is not a time")
    record["raw"] = value
    return record


def _expired(record: dict[str, Any], now: float) -> bool:
    expires = record.get("expires")
    return expires is not None and expires <= now


def _entry(key: str, record: dict[str, Any]) -> Entry:
    return Entry(key=key, value=record["raw"], mod_revision=record["mod_revision"], version=record["version"])


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _read_bounded(fd: int, limit: int) -> bytes | None:
    """Everything fd holds; None if that is more than limit bytes (reading stops there)."""
    chunks, size = [], 0
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)


def _identity(dir_fd: int, name: str) -> tuple[int, ...] | None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _name(err: OSError) -> str:
    return f" ({err.filename})" if err.filename else ""
