"""Creating, pinning, listing and deleting named network namespaces.

Compatible with `ip netns`: namespaces are bind mounts of a namespace file onto
an empty file under RUN_DIR, which is itself a shared mount so that the pins
propagate to (and unmount from) other mount namespaces.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

from . import _sys
from .check import is_netns
from .errors import NetnsError, NetnsExistsError, NotNetnsError
from .paths import RUN_DIR, current_path, path_of, validate_name
from .switch import enter, run_in

T = TypeVar("T")

_Enter = enter  # the context manager class, named apart from Namespace.enter

_MAX_STACKED_MOUNTS = 16  # delete unmounts pins mounted more than once, up to this many
_TEMPORARY_ATTEMPTS = 8


@dataclass(frozen=True)
class Namespace:
    """A named network namespace pinned at path; usable wherever a path is."""

    name: str
    path: str

    def __fspath__(self) -> str:
        return self.path

    def enter(self) -> _Enter:
        return enter(self.path)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return run_in(self.path, fn, *args, **kwargs)


def create(name: str) -> str:
    """Create a new network namespace pinned at RUN_DIR/name and return that path.

    Like `ip netns add`: the namespace starts with only a loopback, which is down.
    """
    validate_name(name)
    _prepare_run_dir()
    path = os.path.join(RUN_DIR, name)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
    except FileExistsError:
        raise NetnsExistsError(
            f"network namespace {name!r} already exists ({path}); pick another name or delete it first"
        ) from None
    except OSError as err:
        raise NetnsError(f"cannot create {path}: {err.strerror}") from None
    try:
        _pin_new_netns(path)
    except BaseException:
        _discard(path)
        raise
    return path


def delete(name_or_path: str | os.PathLike[str]) -> None:
    """Unpin and remove a namespace file; a missing one is not an error.

    The namespace itself goes away once no process, socket or other mount
    still holds it.
    """
    path = path_of(name_or_path)
    for _ in range(_MAX_STACKED_MOUNTS):
        if not is_netns(path):
            break
        try:
            _sys.umount2(path, _sys.MNT_DETACH)
        except OSError as err:
            if err.errno == errno.ENOENT:
                return
            if err.errno == errno.EINVAL:  # a namespace file, but not one mounted here
                raise NotNetnsError(
                    f"{path} is a network namespace but not a pinned one (a bind mount); "
                    f"only pins such as {RUN_DIR}/<name> can be deleted"
                ) from None
            raise NetnsError(f"cannot unmount network namespace {path}: {err.strerror}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    # What remains must be the empty placeholder create() made; never remove anything else.
    if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
        raise NotNetnsError(f"refusing to delete {path}: it is not a network namespace pin")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise NetnsError(f"cannot remove {path}: {err.strerror}") from None


def list_names() -> list[str]:
    """Names of the namespaces pinned under RUN_DIR, sorted (like `ip netns list`)."""
    try:
        return sorted(os.listdir(RUN_DIR))
    except FileNotFoundError:
        return []


def exists(name_or_path: str | os.PathLike[str]) -> bool:
    """True if the name is taken under RUN_DIR (or the path exists).

    A leftover empty file counts, as it does for `ip netns list` and for
    create(); use is_netns() to ask whether a live namespace is pinned there.
    """
    return os.path.lexists(path_of(name_or_path))


@contextmanager
def temporary(prefix: str = "pycni") -> Iterator[Namespace]:
    """Create a uniquely named namespace `<prefix>-<8 hex>`, yield it, delete it on exit."""
    validate_name(f"{prefix}-00000000")
    for _ in range(_TEMPORARY_ATTEMPTS):
        name = f"{prefix}-{os.urandom(4).hex()}"
        try:
            path = create(name)
            break
        except NetnsExistsError:
            continue
    else:
        raise NetnsError(
            f"could not find a free namespace name with prefix {prefix!r} after {_TEMPORARY_ATTEMPTS} attempts"
        )
    try:
        yield Namespace(name, path)
    finally:
        delete(path)


def _prepare_run_dir() -> None:
    """Make RUN_DIR a shared mount point, as `ip netns add` does."""
    try:
        os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
        dir_fd = os.open(RUN_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise NetnsError(f"cannot create {RUN_DIR}: {err.strerror}") from None
    try:
        # Serialise with concurrent creators so RUN_DIR is bind-mounted once, not twice.
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        try:
            _sys.mount("", RUN_DIR, "none", _sys.MS_SHARED | _sys.MS_REC)
        except OSError as err:
            if err.errno != errno.EINVAL:  # EINVAL: not a mount point yet
                raise
            _sys.mount(RUN_DIR, RUN_DIR, "none", _sys.MS_BIND | _sys.MS_REC)
            _sys.mount("", RUN_DIR, "none", _sys.MS_SHARED | _sys.MS_REC)
    except OSError as err:
        raise NetnsError(
            f"cannot make {RUN_DIR} a shared mount point: {err.strerror} (needs root / CAP_SYS_ADMIN)"
        ) from None
    finally:
        os.close(dir_fd)  # also releases the lock


def _pin_new_netns(path: str) -> None:
    # unshare() moves the calling thread for good, so do it in a throwaway
    # thread; the bind mount keeps the namespace alive after the thread ends.
    failure: list[NetnsError] = []

    def unshare_and_pin() -> None:
        try:
            _sys.unshare(_sys.CLONE_NEWNET)
        except OSError as err:
            failure.append(
                NetnsError(
                    f"cannot create a network namespace: unshare(CLONE_NEWNET) failed: "
                    f"{err.strerror} (needs root / CAP_SYS_ADMIN)"
                )
            )
            return
        try:
            _sys.mount(current_path(), path, "none", _sys.MS_BIND)
        except OSError as err:
            failure.append(
                NetnsError(f"cannot pin the new network namespace at {path}: bind mount failed: {err.strerror}")
            )
        except BaseException as err:  # never let the thread die silently
            failure.append(NetnsError(f"cannot pin the new network namespace at {path}: {err!r}"))

    worker = threading.Thread(target=unshare_and_pin, name="netns-create", daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]


def _discard(path: str) -> None:
    """Best-effort cleanup of a half-created pin."""
    try:
        if is_netns(path):
            _sys.umount2(path, _sys.MNT_DETACH)
    except OSError:
        pass
    try:
        os.unlink(path)
    except OSError:
        pass
