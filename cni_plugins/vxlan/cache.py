"""The delegate cache: the bridge configuration each attachment was added with.

ADD writes the derived delegate configuration to
``<stateDir>/vxlan/<network>-<containerID>-<ifname>.json`` (flannel keeps the
same in its dataDir) so that DEL and CHECK use exactly what ADD used, even
after the node's lease changed or the agent's state file is gone. Each file
carries the (network, containerID, ifname) it belongs to: the name alone is
ambiguous when names contain '-', so a file whose content names another
attachment is never used for this one, and such a clash (or a name too long
for the filesystem) moves this attachment to a hashed file name instead.

Files are written atomically (temp file, fsync, rename) and read without
following symlinks. Standard library only.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

from cni_plugins.kernel.files import NotRegularFile, read_regular_file, write_atomically
from cni_plugins.spec.errors import ERR_IO, CNIError

SUBDIR = "vxlan"
SUFFIX = ".json"
DIR_MODE = 0o755
FILE_MODE = 0o644
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


def _candidates(state_dir: str, network: str, container_id: str, ifname: str) -> list[str]:
    """The plain file name (when it fits and is a plain name), then the hashed one."""
    names = []
    plain = f"{network}-{container_id}-{ifname}{SUFFIX}"
    if len(plain.encode()) <= _NAME_MAX and "/" not in plain and not plain.startswith("."):
        names.append(plain)
    digest = hashlib.sha256("\x00".join((network, container_id, ifname)).encode()).hexdigest()[:32]
    names.append(f"{network[:64]}-h{digest}{SUFFIX}")
    return [os.path.join(cache_dir(state_dir), name) for name in names]


def _read(path: str) -> CachedDelegate | None:
    """The entry at ``path``; None if absent or not a cache entry at all."""
    try:
        raw = read_regular_file(path, MAX_BYTES)
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
    for path in _candidates(state_dir, network, container_id, ifname):
        entry = _read(path)
        if entry is not None and (entry.network, entry.container_id, entry.ifname) == (network, container_id, ifname):
            return entry
    return None


def save(state_dir: str, network: str, container_id: str, ifname: str, delegate: dict[str, Any]) -> str:
    """Write this attachment's delegate; returns the file's path."""
    directory = cache_dir(state_dir)
    try:
        os.makedirs(directory, mode=DIR_MODE, exist_ok=True)
    except OSError as exc:
        raise CNIError(ERR_IO, f"cannot create the delegate cache directory {directory}: {exc.strerror}",
                       "stateDir must be a writable directory (the node agent's --state-dir)") from None
    path = None
    for candidate in _candidates(state_dir, network, container_id, ifname):
        entry = _read(candidate)
        if not os.path.lexists(candidate) or (
                entry is not None and (entry.network, entry.container_id, entry.ifname)
                == (network, container_id, ifname)):
            path = candidate
            break
    if path is None:
        raise CNIError(ERR_IO, f"cannot cache the delegate of {network}/{container_id}/{ifname}",
                       f"files in {directory} that belong to other attachments are in the way")
    body = {"network": network, "containerID": container_id, "ifname": ifname, "delegate": delegate}
    data = (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
    try:
        write_atomically(path, data, FILE_MODE, prefix=".vxlan-")
    except OSError as exc:
        raise CNIError(ERR_IO, f"cannot write the cached delegate {path}: {exc.strerror}") from None
    return path


def remove(state_dir: str, network: str, container_id: str, ifname: str) -> bool:
    """Remove this attachment's cached delegate; True if there was one."""
    entry = load(state_dir, network, container_id, ifname)
    if entry is None:
        return False
    return _unlink(entry.path)


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
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CNIError(ERR_IO, f"cannot list the delegate cache {directory}: {exc.strerror}") from None
    for name in names:
        if not name.endswith(SUFFIX) or name.startswith("."):
            continue
        entry = _read(os.path.join(directory, name))
        if entry is not None and entry.network == network:
            yield entry


def remove_stale(state_dir: str, network: str, valid: list[tuple[str, str]]) -> list[CachedDelegate]:
    """Remove the cached delegates of ``network`` whose attachment is not in ``valid``; returns them."""
    keep = set(valid)
    removed = []
    for entry in list(entries(state_dir, network)):
        if entry.attachment not in keep and _unlink(entry.path):
            removed.append(entry)
    return removed
