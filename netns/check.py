"""Telling a network namespace file from anything else."""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from . import _sys
from .errors import NetnsError, NetnsNotFoundError, NotNetnsError

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK


def namespace_type(fd: int) -> str | None:
    """'net', 'mnt', ... for a namespace file descriptor; None for any other file."""
    try:
        return _sys.NAMESPACE_TYPES.get(fcntl.ioctl(fd, _sys.NS_GET_NSTYPE), "unknown")
    except OSError as err:
        # ENOTTY: not an nsfs file, or a kernel older than 4.11 without the ioctl.
        if err.errno not in (errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
            raise
    return _namespace_type_without_ioctl(fd)


def _namespace_type_without_ioctl(fd: int) -> str | None:
    # Namespace files live on nsfs (or procfs before 3.19); the magic link of
    # an open one reads "<type>:[<inode>]", which tells net from mnt apart.
    if _sys.fstatfs_type(fd) not in (_sys.NSFS_MAGIC, _sys.PROC_SUPER_MAGIC):
        return None
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    kind, sep, rest = target.partition(":[")
    if sep and rest.endswith("]") and kind in _sys.NAMESPACE_TYPES.values():
        return kind
    return None


def open_netns(path: str) -> int:
    """Open path and return its fd if it is a network namespace; raise otherwise.

    Checking the open descriptor (not the path) means the file we checked is
    the file a later setns() uses.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NetnsNotFoundError(
            f"network namespace {path} does not exist; create it first "
            f"(netns.create or `ip netns add`) or check the path"
        ) from None
    except OSError as err:
        raise NetnsError(f"cannot inspect network namespace {path}: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        # Namespace files are regular files; never open a FIFO or a device to check.
        raise NotNetnsError(f"{path} is not a network namespace: it is a {_file_kind(st.st_mode)}")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise NetnsNotFoundError(f"network namespace {path} does not exist") from None
    except OSError as err:
        raise NetnsError(f"cannot open network namespace {path}: {err.strerror}") from None
    try:
        kind = namespace_type(fd)
    except OSError as err:
        os.close(fd)
        raise NetnsError(f"cannot inspect network namespace {path}: {err.strerror}") from None
    if kind == "net":
        return fd
    os.close(fd)
    if kind is None:
        hint = (
            " (an empty file: a namespace that was deleted or never finished being created?)" if st.st_size == 0 else ""
        )
        raise NotNetnsError(f"{path} is not a network namespace: it is an ordinary file{hint}")
    raise NotNetnsError(
        f"{path} is a {kind} namespace, not a network namespace; give a net namespace such as /proc/<pid>/ns/net"
    )


def validate(path: str) -> None:
    """Raise NotNetnsError (NetnsNotFoundError if missing) unless path is a network namespace."""
    os.close(open_netns(os.fspath(path)))


def is_netns(path: str) -> bool:
    """True only if path names a network namespace file."""
    try:
        validate(path)
    except NetnsError:
        return False
    return True


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return kind
    return "special file"
