"""The delegate cache: the bridge configuration each attachment was added with.

ADD writes the derived delegate configuration to
``<stateDir>/vxlan/<network>-<containerID>-<ifname>.json`` (flannel keeps the
same in its dataDir) so that DEL and CHECK use exactly what ADD used, even
after the node's lease changed or the agent's state file is gone. Each file
carries the (network, containerID, ifname) it belongs to: the name alone is
ambiguous when names contain '-', so a file whose content names another
attachment is never used for this one, and such a clash (or a name too long
for the filesystem) moves this attachment to a hashed file name instead.

Files are written atomically (temp file, fsync, rename), mode 0600 in a 0700
directory, and read without following symlinks. A cached delegate tells DEL
which bridge, IPAM directory and network to tear down as root, so it is used
only if root alone could have written it: an entry, the cache directory or the
state directory owned by anyone but root (the plugin's euid) or writable by
group or others is refused with an I/O error (code 5) that names it and what
to do. A root-owned cache directory left at 0755 by an older version is
tightened to 0700 when the plugin next writes to it. Standard library only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

from cni_plugins.kernel.files import (
    NotRegularFile,
    UntrustedPath,
    ensure_private_dir,
    open_trusted_dir,
    read_regular_file,
    remove_orphaned_temps,
    write_atomically,
)
from cni_plugins.spec.errors import ERR_IO, CNIError

SUBDIR = "vxlan"
SUFFIX = ".json"
DIR_MODE = 0o700
FILE_MODE = 0o600
TMP_PREFIX = ".vxlan-"
MAX_BYTES = 256 * 1024
_NAME_MAX = 255


@dataclass
class CachedDelegate:
    network: str
    container_id: str
    ifname: str
    delegate: dict[str, Any]
    path: str

    @property
    def attachment(self) -> tuple[str, str]:
        return self.container_id, self.ifname


def cache_dir(state_dir: str) -> str:
    return os.path.join(state_dir, SUBDIR)


def _candidates(network: str, container_id: str, ifname: str) -> list[str]:
    """The plain file name (when it fits and is a plain name), then the hashed one."""
    names = []
    plain = f"{network}-{container_id}-{ifname}{SUFFIX}"
    if len(plain.encode()) <= _NAME_MAX and "/" not in plain and not plain.startswith("."):
        names.append(plain)
    digest = hashlib.sha256("\x00".join((network, container_id, ifname)).encode()).hexdigest()[:32]
    names.append(f"{network[:64]}-h{digest}{SUFFIX}")
    return names


def _refused(exc: UntrustedPath) -> CNIError:
    return CNIError(ERR_IO, f"refusing the vxlan plugin's delegate cache: {exc.path} {exc.problem}", exc.fix)


def _open_dir(state_dir: str) -> int | None:
    """A descriptor of the cache directory, after checking it and the state directory; None if absent."""
    directory = cache_dir(state_dir)
    try:
        fd = open_trusted_dir(
            state_dir,
            f"only root may write the node's state: check what is in it, then "
            f"`chown root:root {state_dir} && chmod 0700 {state_dir}`",
        )
        if fd is None:
            return None
        os.close(fd)
        return open_trusted_dir(
            directory,
            f"only root may write the delegate cache: remove {directory} (DEL "
            f"then uses the node's current configuration) or check its contents "
            f"and run `chown root:root {directory} && chmod 0700 {directory}`",
        )
    except UntrustedPath as exc:
        raise _refused(exc) from None
    except OSError as exc:
        raise CNIError(ERR_IO, f"cannot open the delegate cache {directory}: {exc.strerror}") from None


def _read(dir_fd: int, directory: str, name: str) -> CachedDelegate | None:
    """The entry ``name`` of the cache directory; None if absent or not a cache entry at all."""
    path = os.path.join(directory, name)
    try:
        raw = read_regular_file(
            name,
            MAX_BYTES,
            dir_fd=dir_fd,
            trusted=f"only root may write a cached delegate: remove {path} (DEL then uses "
            f"the node's current configuration)",
        )
    except UntrustedPath as exc:
        exc.path = path
        raise _refused(exc) from None
    except NotRegularFile:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None  # a symlink is nothing this plugin wrote
        raise CNIError(ERR_IO, f"cannot read the cached delegate {path}: {exc.strerror}") from None
    if raw is None:
        return None
    try:
        data = json.loads(raw.decode()) if len(raw) <= MAX_BYTES else None
    except (UnicodeDecodeError, ValueError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("delegate"), dict):
        return None
    fields = [data.get(k) for k in ("network", "containerID", "ifname")]
    if not all(isinstance(f, str) for f in fields):
        return None
    return CachedDelegate(fields[0], fields[1], fields[2], data["delegate"], path)


def load(state_dir: str, network: str, container_id: str, ifname: str) -> CachedDelegate | None:
    """The cached delegate of this attachment, or None."""
    dir_fd = _open_dir(state_dir)
    if dir_fd is None:
        return None
    try:
        for name in _candidates(network, container_id, ifname):
            entry = _read(dir_fd, cache_dir(state_dir), name)
            if entry is not None and (entry.network, entry.container_id, entry.ifname) == (
                network,
                container_id,
                ifname,
            ):
                return entry
        return None
    finally:
        os.close(dir_fd)


def _ensure_dirs(state_dir: str) -> None:
    """The state directory and the cache directory in it: created 0700, or checked (and tightened)."""
    for path in (state_dir, cache_dir(state_dir)):
        try:
            tightened = ensure_private_dir(path, DIR_MODE)
        except UntrustedPath as exc:
            raise _refused(exc) from None
        except OSError as exc:
            raise CNIError(
                ERR_IO,
                f"cannot create the delegate cache directory {path}: {exc.strerror}",
                "stateDir must be a writable directory (the node agent's --state-dir)",
            ) from None
        if tightened:
            import logging  # rare (once after an upgrade): not on the cold path otherwise

            logging.getLogger("pycni.state").warning(
                "tightened %s to mode %04o: only root may read or write the vxlan delegate cache (older "
                "versions made it 0755)",
                path,
                DIR_MODE,
            )


def save(state_dir: str, network: str, container_id: str, ifname: str, delegate: dict[str, Any]) -> str:
    """Write this attachment's delegate; returns the file's path."""
    directory = cache_dir(state_dir)
    _ensure_dirs(state_dir)
    dir_fd = _open_dir(state_dir)
    if dir_fd is None:
        raise CNIError(ERR_IO, f"the delegate cache directory {directory} vanished while it was written to")
    path = None
    try:
        for name in _candidates(network, container_id, ifname):
            entry = _read(dir_fd, directory, name)
            if not _lexists(dir_fd, name) or (
                entry is not None
                and (entry.network, entry.container_id, entry.ifname) == (network, container_id, ifname)
            ):
                path = os.path.join(directory, name)
                break
    finally:
        os.close(dir_fd)
    if path is None:
        raise CNIError(
            ERR_IO,
            f"cannot cache the delegate of {network}/{container_id}/{ifname}",
            f"files in {directory} that belong to other attachments are in the way",
        )
    body = {"network": network, "containerID": container_id, "ifname": ifname, "delegate": delegate}
    data = (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
    try:
        write_atomically(path, data, FILE_MODE, prefix=TMP_PREFIX)
    except OSError as exc:
        raise CNIError(ERR_IO, f"cannot write the cached delegate {path}: {exc.strerror}") from None
    return path


def _lexists(dir_fd: int, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False


def remove(state_dir: str, network: str, container_id: str, ifname: str) -> bool:
    """Remove this attachment's cached delegate (and what killed writers left); True if there was one."""
    _remove_orphans(state_dir)
    entry = load(state_dir, network, container_id, ifname)
    if entry is None:
        return False
    return _unlink(entry.path)


def _remove_orphans(state_dir: str) -> None:
    """Temporary files of ADDs killed while writing their entry (a crash must leave nothing behind)."""
    try:
        remove_orphaned_temps(cache_dir(state_dir), TMP_PREFIX)
    except OSError:
        pass  # best effort: DEL and GC never fail for it


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise CNIError(ERR_IO, f"cannot remove the cached delegate {path}: {exc.strerror}") from None


def entries(state_dir: str, network: str) -> Iterator[CachedDelegate]:
    """Every cached delegate of ``network``."""
    directory = cache_dir(state_dir)
    dir_fd = _open_dir(state_dir)
    if dir_fd is None:
        return
    found = []
    try:
        try:
            names = sorted(os.listdir(dir_fd))
        except OSError as exc:
            raise CNIError(ERR_IO, f"cannot list the delegate cache {directory}: {exc.strerror}") from None
        for name in names:
            if not name.endswith(SUFFIX) or name.startswith("."):
                continue
            entry = _read(dir_fd, directory, name)
            if entry is not None and entry.network == network:
                found.append(entry)
    finally:
        os.close(dir_fd)
    yield from found


def remove_stale(state_dir: str, network: str, valid: list[tuple[str, str]]) -> list[CachedDelegate]:
    """Remove the cached delegates of ``network`` whose attachment is not in ``valid``; returns them."""
    keep = set(valid)
    removed = []
    _remove_orphans(state_dir)
    for entry in list(entries(state_dir, network)):
        if entry.attachment not in keep and _unlink(entry.path):
            removed.append(entry)
    return removed
