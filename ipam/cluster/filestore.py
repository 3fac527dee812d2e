"""The local file store: one file per key under a directory.

    DIR/
      .lock        flock()ed: exclusive around every change, shared around list()
      .revision    the store revision, bumped by every change (decimal text)
      .changes     change log, one "REVISION KEY" line per change, so wait() can
                   tell changes under its prefix from others (and see deletions)
      config       one file per key: JSON holding the value and its revisions
      subnets/10.244.1.0-24

Values are written atomically (a temporary file, then rename; create-if-absent
links the temporary file into place, which fails if the key exists). Nothing
inside DIR is opened through a symbolic link; DIR itself may be reached
through one (it is the administrator's choice, like /var/run -> /run).

TTLs are recorded but not enforced: a key written with a TTL lives until it is
deleted (a node's subnet lease lasts until the node releases it). refresh()
only reports whether the key still exists.

Several processes (and threads) can share one directory: all changes are
serialised by the lock, which makes this store fit for one machine or for
nodes that share a filesystem with working flock().
"""
from __future__ import annotations

import base64
import errno
import fcntl
import json
import os
import stat
import time
from contextlib import contextmanager
from typing import Any, Iterator

from .errors import Compacted, StoreError, StoreUnavailable
from .store import Entry, Store, check_ttl, check_value, validate_key, validate_prefix

LOCK_FILE = ".lock"
REVISION_FILE = ".revision"
CHANGES_FILE = ".changes"
TMP_PREFIX = ".tmp-"

POLL_INTERVAL = 0.05
# The change log is cut back to its newest half when it grows past this size.
MAX_CHANGES_BYTES = 256 * 1024

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class FileStore(Store):
    """A Store in a local directory; see the module docstring for the layout."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.normpath(directory)
        try:
            if not os.path.isdir(self.directory):
                os.makedirs(self.directory, mode=0o755, exist_ok=True)
            self._dir_fd: int | None = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (NotADirectoryError, FileExistsError):
            raise StoreError(f"cannot open the file store {self.directory}: it is not a directory") from None
        except OSError as err:
            raise StoreUnavailable(f"cannot open the file store {self.directory}: {err.strerror}") from None

    def __repr__(self) -> str:
        return f"FileStore({self.directory!r})"

    # -- the Store interface ------------------------------------------------

    def get(self, key: str) -> Entry | None:
        validate_key(key)
        with self._io(f"read {key}"):
            parent, leaf = self._open_parent(key, create=False)
            if parent is None:
                return None
            try:
                record = self._read_record(parent, leaf, key)
            finally:
                os.close(parent)
        return None if record is None else _entry(key, record)

    def list(self, prefix: str) -> tuple[list[Entry], int]:
        validate_prefix(prefix)
        parts = prefix.split("/") if prefix else []
        dir_parts = parts[:-1]  # "subnets/" -> ["subnets"]; "subnets/10." -> ["subnets"]
        entries: list[Entry] = []
        with self._io(f"list {prefix or '(everything)'}"), self._locked(exclusive=False):
            revision = self._read_revision()
            start = self._open_dir(dir_parts, create=False)
            if start is not None:
                try:
                    base = "/".join(dir_parts) + "/" if dir_parts else ""
                    self._walk(start, base, prefix, entries)
                finally:
                    os.close(start)
        entries.sort(key=lambda e: e.key)
        return entries, revision

    def create(self, key: str, value: bytes, ttl: int | None = None) -> bool:
        validate_key(key)
        value, ttl = check_value(value), check_ttl(ttl)
        with self._io(f"create {key}"), self._locked(exclusive=True):
            parent, leaf = self._open_parent(key, create=True)
            assert parent is not None
            try:
                if self._read_record(parent, leaf, key) is not None:
                    return False
                revision = self._read_revision() + 1
                record = _record(key, value, revision, revision, 1, ttl)
                if not self._write_record(parent, leaf, key, record, exclusive=True):
                    return False
                self._commit(revision, key)
                return True
            finally:
                os.close(parent)

    def put(self, key: str, value: bytes, ttl: int | None = None) -> int:
        validate_key(key)
        value, ttl = check_value(value), check_ttl(ttl)
        with self._io(f"write {key}"), self._locked(exclusive=True):
            parent, leaf = self._open_parent(key, create=True)
            assert parent is not None
            try:
                old = self._read_record(parent, leaf, key)
                revision = self._read_revision() + 1
                if old is None:
                    record = _record(key, value, revision, revision, 1, ttl)
                else:
                    record = _record(key, value, revision, old["create_revision"], old["version"] + 1, ttl)
                self._write_record(parent, leaf, key, record, exclusive=False)
                self._commit(revision, key)
                return revision
            finally:
                os.close(parent)

    def replace(self, key: str, value: bytes, expected_mod_revision: int, ttl: int | None = None) -> bool:
        validate_key(key)
        value, ttl = check_value(value), check_ttl(ttl)
        with self._io(f"replace {key}"), self._locked(exclusive=True):
            parent, leaf = self._open_parent(key, create=False)
            if parent is None:
                return False
            try:
                old = self._read_record(parent, leaf, key)
                if old is None or old["mod_revision"] != expected_mod_revision:
                    return False
                revision = self._read_revision() + 1
                record = _record(key, value, revision, old["create_revision"], old["version"] + 1, ttl)
                self._write_record(parent, leaf, key, record, exclusive=False)
                self._commit(revision, key)
                return True
            finally:
                os.close(parent)

    def delete(self, key: str) -> bool:
        validate_key(key)
        with self._io(f"delete {key}"), self._locked(exclusive=True):
            parent, leaf = self._open_parent(key, create=False)
            if parent is None:
                return False
            try:
                if self._read_record(parent, leaf, key) is None:
                    return False
                os.unlink(leaf, dir_fd=parent)
                os.fsync(parent)
                self._commit(self._read_revision() + 1, key)
                return True
            finally:
                os.close(parent)

    def refresh(self, key: str) -> bool:
        # TTLs are not enforced here, so there is nothing to renew: report whether the key is still there.
        return self.get(key) is not None

    def wait(self, prefix: str, after_revision: int, timeout: float) -> int | None:
        validate_prefix(prefix)
        deadline = time.monotonic() + max(0.0, timeout)
        checked = after_revision  # changes up to here are known not to concern prefix
        while True:
            with self._io("read the store revision"):
                current = self._read_revision()
            if current < after_revision:
                raise Compacted(f"the file store {self.directory} is at revision {current}, behind the "
                                f"revision {after_revision} being watched from (was it re-created?): "
                                f"list again", compact_revision=current)
            if current > checked:
                found = self._changes_since(prefix, after_revision)
                if found is not None:
                    return found
                checked = current
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(POLL_INTERVAL, remaining))

    def close(self) -> None:
        fd, self._dir_fd = self._dir_fd, None
        if fd is not None:
            os.close(fd)

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
                raise StoreError(f"cannot {action} in the file store {self.directory}: refusing to follow a "
                                 f"symbolic link{_name(err)}") from None
            raise StoreUnavailable(f"cannot {action} in the file store {self.directory}: "
                                   f"{err.strerror or err}{_name(err)}") from None

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        # A fresh open file description per call: flock() then excludes other
        # threads of this process as well as other processes.
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=self._fd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StoreError(f"{self.directory}/{LOCK_FILE} is not a regular file")
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _open_dir(self, parts: list[str], create: bool) -> int | None:
        """An fd for DIR/parts..., never through a symlink; None if missing and not create."""
        fd = os.dup(self._fd)
        try:
            for part in parts:
                try:
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except NotADirectoryError:
                    # O_NOFOLLOW|O_DIRECTORY on a symlink fails with ENOTDIR, not ELOOP: tell them apart.
                    if stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode):
                        raise StoreError(f"cannot use {'/'.join(parts)} in the file store {self.directory}: "
                                         f"refusing to follow the symbolic link {part}") from None
                    raise StoreError(f"cannot use {'/'.join(parts)} in the file store {self.directory}: "
                                     f"{part} is a key, not a directory (the file store cannot hold both "
                                     f"a key and keys under it)") from None
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
            data = _read_all(fd)
        finally:
            os.close(fd)
        try:
            return _parse_record(data)
        except (ValueError, KeyError, TypeError) as err:
            raise StoreError(f"{self.directory}/{key} is not a valid store record ({err}); "
                             f"remove it or restore it from a backup") from None

    def _write_record(self, parent: int, leaf: str, key: str, record: dict[str, Any], exclusive: bool) -> bool:
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
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
                    raise StoreError(f"key {key} in the file store {self.directory} is a directory of keys") \
                        from None
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
                fd = os.open(name, _NEW_FLAGS, 0o644, dir_fd=parent)
                break
            except FileExistsError:
                continue
        else:
            raise StoreError(f"cannot find a free temporary file name in the file store {self.directory}")
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
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
            text = _read_all(fd).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
        if not text.isdigit():
            raise StoreError(f"{self.directory}/{REVISION_FILE} holds {text[:20]!r}, not a revision number")
        return int(text)

    def _commit(self, revision: int, key: str) -> None:
        """Record a change: append it to the change log, then publish the new revision."""
        fd = os.open(CHANGES_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644, dir_fd=self._fd)
        try:
            os.write(fd, f"{revision} {key}\n".encode())
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
        keep = changes[len(changes) // 2:]
        dropped = changes[:len(changes) // 2]
        if dropped:
            compacted = max(compacted, dropped[-1][0])
        lines = [f"#compacted {compacted}\n"] + [f"{rev} {key}\n" for rev, key in keep]
        tmp = self._write_temp(self._fd, "".join(lines).encode())
        os.rename(tmp, CHANGES_FILE, src_dir_fd=self._fd, dst_dir_fd=self._fd)

    def _changes_since(self, prefix: str, after_revision: int) -> int | None:
        with self._io("read the change log"), self._locked(exclusive=False):
            compacted, changes = self._read_changes()
        if after_revision < compacted:
            raise Compacted(f"revision {after_revision} of the file store {self.directory} is compacted "
                            f"(changes up to {compacted} are no longer logged): list again",
                            compact_revision=compacted)
        newest = [rev for rev, key in changes if rev > after_revision and key.startswith(prefix)]
        return max(newest) if newest else None

    def _walk(self, fd: int, base: str, prefix: str, out: list[Entry]) -> None:
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
                record = self._read_record(fd, name, key)
                if record is not None:
                    out.append(_entry(key, record))
            # symlinks and special files are never followed or read


def _record(key: str, value: bytes, mod_revision: int, create_revision: int, version: int,
            ttl: int | None) -> dict[str, Any]:
    record: dict[str, Any] = {"key": key, "mod_revision": mod_revision, "create_revision": create_revision,
                              "version": version}
    try:
        record["value"] = value.decode("utf-8")  # readable when it is text (it is JSON for leases)
    except UnicodeDecodeError:
        record["value_base64"] = base64.b64encode(value).decode("ascii")
    if ttl is not None:
        record["ttl"] = ttl  # recorded, not enforced
    return record


def _parse_record(data: bytes) -> dict[str, Any]:
    record = json.loads(data)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if "value" in record:
        value = record["value"].encode("utf-8")
    else:
        value = base64.b64decode(record["value_base64"], validate=True)
    for field in ("mod_revision", "create_revision", "version"):
        if not isinstance(record[field], int):
            raise ValueError(f"{field} is not a number")
    record["raw"] = value
    return record


def _entry(key: str, record: dict[str, Any]) -> Entry:
    return Entry(key=key, value=record["raw"], mod_revision=record["mod_revision"], version=record["version"])


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _name(err: OSError) -> str:
    return f" ({err.filename})" if err.filename else ""
