"""Writing files so that readers see the old content or the new, never a partial one; reading
small state files without following a planted link.

The data goes to a synced temporary file in the same directory (created with
O_EXCL by mkstemp, so never through a planted link) and is renamed over the
target: a rename replaces a symlink at the target itself instead of writing
through it. The temporary file is removed on every path out, also on an
interrupt.
"""
from __future__ import annotations

import os
import stat
import tempfile


def write_atomically(path: str, data: bytes, mode: int, prefix: str = ".pycni-tmp-", sync_dir: bool = False) -> None:
    """Write ``data`` to ``path`` (file mode ``mode``) through a temp file and a rename."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if sync_dir:  # the rename itself survives a crash
        try:
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass


class NotRegularFile(Exception):
    """The path is there but is not a regular file (a directory, a FIFO, a device)."""


def read_regular_file(path: str, max_bytes: int) -> bytes | None:
    """At most ``max_bytes + 1`` bytes of ``path`` (more than ``max_bytes``: the caller's "too large").

    None if there is no such file. Never follows a symlink at ``path`` (OSError with errno ELOOP);
    NotRegularFile for anything but a regular file; other OSErrors as os.open raises them.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(path)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(max_bytes + 1)
    finally:
        os.close(fd)
