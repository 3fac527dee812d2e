"""ctypes wrappers for the system calls that Python 3.11's os module lacks.

Each wrapper raises OSError (with errno set) on failure; callers turn that
into a NetnsError that says what they were trying to do. libc and ctypes are
loaded on first use so that importing netns stays cheap.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 0x2

# ioctl(2) on a namespace file (linux/nsfs.h), kernel >= 4.11.
NS_GET_NSTYPE = 0xB703

NSFS_MAGIC = 0x6E736673
PROC_SUPER_MAGIC = 0x9FA0

# CLONE_NEW* flag -> the short name the kernel uses in "net:[4026531840]".
NAMESPACE_TYPES = {
    0x00000080: "time",
    0x00020000: "mnt",
    0x02000000: "cgroup",
    0x04000000: "uts",
    0x08000000: "ipc",
    0x10000000: "user",
    0x20000000: "pid",
    CLONE_NEWNET: "net",
}


@functools.cache
def _libc() -> Any:
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.setns  # noqa: B018 - probe: a static or odd build may not export it
    except (OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    c_int, c_ulong, c_char_p = ctypes.c_int, ctypes.c_ulong, ctypes.c_char_p
    libc.setns.argtypes = [c_int, c_int]
    libc.unshare.argtypes = [c_int]
    libc.mount.argtypes = [c_char_p, c_char_p, c_char_p, c_ulong, ctypes.c_void_p]
    libc.umount2.argtypes = [c_char_p, c_int]
    libc.fstatfs.argtypes = [c_int, ctypes.c_void_p]
    for fn in (libc.setns, libc.unshare, libc.mount, libc.umount2, libc.fstatfs):
        fn.restype = c_int
    return libc


def _check(ret: int, filename: str | None = None) -> None:
    if ret != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), filename)


def setns(fd: int, nstype: int) -> None:
    _check(_libc().setns(fd, nstype))


def unshare(flags: int) -> None:
    _check(_libc().unshare(flags))


def mount(source: str, target: str, fstype: str, flags: int) -> None:
    _check(_libc().mount(os.fsencode(source), os.fsencode(target), os.fsencode(fstype), flags, None), target)


def umount2(target: str, flags: int) -> None:
    _check(_libc().umount2(os.fsencode(target), flags), target)


def fstatfs_type(fd: int) -> int:
    """f_type of the filesystem holding fd (the first field of struct statfs)."""
    import ctypes

    buf = ctypes.create_string_buffer(256)  # larger than struct statfs on every arch
    _check(_libc().fstatfs(fd, buf))
    # f_type is a machine word (__fsword_t), except on s390x where it is 32 bits.
    width = 4 if os.uname().machine.startswith("s390") else ctypes.sizeof(ctypes.c_long)
    return int.from_bytes(buf.raw[:width], sys.byteorder)
