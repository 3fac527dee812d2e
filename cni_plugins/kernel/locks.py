"""Short exclusive locks around a read-modify-write of shared kernel or file state.

Two kinds, one waiting loop:

* ``file_lock(path)``: flock on a file; every process (and every thread with its
  own open) that uses the same path is serialised, whatever namespace it runs in.
* ``netns_lock(name)``: an abstract unix socket name, which the kernel scopes to
  the network namespace the socket is made in: one lock per namespace (per
  "node"), no file, released when the holder dies.

Both wait with a bounded deadline and then raise the spec's "try again" error.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from cni_plugins.spec.errors import ERR_IO, ERR_TRY_AGAIN, CNIError

DEFAULT_TIMEOUT = 30.0
_POLL = 0.005


def _wait(try_once: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not try_once():
        if time.monotonic() > deadline:
            raise CNIError(
                ERR_TRY_AGAIN,
                f"timed out after {timeout:g}s waiting for {what}",
                "another pycni call holds it; try again",
            )
        time.sleep(_POLL)


@contextmanager
def file_lock(path: str, what: str = "", timeout: float = DEFAULT_TIMEOUT, mode: int = 0o600) -> Iterator[None]:
    """Hold flock(LOCK_EX) on ``path`` (created if missing; never through a symlink)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise CNIError(
            ERR_IO,
            f"lock file {path} is a symbolic link; refusing to follow it",
            "remove the link (and check who planted it); the lock is created on first use",
        ) from None
    try:

        def attempt() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                return False

        _wait(attempt, timeout, what or f"the lock {path}")
        yield
    finally:
        os.close(fd)


@contextmanager
def netns_lock(name: str, what: str = "", timeout: float = DEFAULT_TIMEOUT) -> Iterator[None]:
    """Hold the abstract socket ``name`` of the calling thread's network namespace."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:

        def attempt() -> bool:
            try:
                sock.bind("\0" + name)
                return True
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                return False

        _wait(attempt, timeout, what or f"the lock {name}")
        yield
    finally:
        sock.close()
