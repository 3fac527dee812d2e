"""Writing files so that readers see the old content or the new, never a partial one."""
from __future__ import annotations

import os
import tempfile


def write_atomically(path: str, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` through a synced temp file in the same directory and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=".pycni-tmp-", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
