"""Entering a network namespace from the calling thread, and always coming back.

setns() moves only the calling thread, so these work from any thread and leave
the others where they are. Nesting works: each level remembers its own origin.
"""

from __future__ import annotations

import os
import threading
from types import TracebackType
from typing import Any, Callable, TypeVar

from . import _sys
from .check import open_netns
from .errors import NetnsError, NetnsRestoreError
from .paths import current_path, path_of

T = TypeVar("T")


class enter:  # noqa: N801 - used like a function: `with netns.enter(path):`
    """Context manager: run the body in the network namespace at path_or_name.

    `with enter("blue") as path:` switches the calling thread into the
    namespace and back on exit, also when the body raises. If switching back
    fails, NetnsRestoreError (fatal for this thread) is raised.
    """

    def __init__(self, path_or_name: str | os.PathLike[str]) -> None:
        self.path = path_of(path_or_name)
        self._origin_fd: int | None = None
        self._thread_id: int | None = None

    def __enter__(self) -> str:
        if self._origin_fd is not None:
            raise NetnsError(f"this enter({self.path!r}) is already active; create a new one to nest")
        try:
            origin_fd = os.open(current_path(), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise NetnsError(
                f"cannot open this thread's network namespace {current_path()}: {err.strerror} (is /proc mounted?)"
            ) from None
        try:
            target_fd = open_netns(self.path)
            try:
                _sys.setns(target_fd, _sys.CLONE_NEWNET)
            except OSError as err:
                raise NetnsError(
                    f"cannot enter network namespace {self.path}: setns failed: {err.strerror} (needs CAP_SYS_ADMIN)"
                ) from None
            finally:
                os.close(target_fd)
        except BaseException:
            os.close(origin_fd)
            raise
        self._origin_fd = origin_fd
        self._thread_id = threading.get_native_id()
        return self.path

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        origin_fd, self._origin_fd = self._origin_fd, None
        if origin_fd is None:
            return
        try:
            if threading.get_native_id() != self._thread_id:
                _restore_failed(
                    self.path,
                    "the context was left from a different thread than it was entered "
                    f"from (thread {self._thread_id} is still inside)",
                )
            try:
                _sys.setns(origin_fd, _sys.CLONE_NEWNET)
            except OSError as err:
                _restore_failed(self.path, f"setns failed: {err.strerror}")
        finally:
            os.close(origin_fd)


def _restore_failed(path: str, reason: str) -> None:
    import logging

    msg = (
        f"FATAL: thread {threading.get_native_id()} could not return to its own network namespace after "
        f"entering {path}: {reason}. The thread is now in the WRONG network namespace: every socket or "
        f"netlink request it makes lands in {path}. Stop using this thread (in a plugin: exit the process)."
    )
    logging.getLogger("netns").critical(msg)
    raise NetnsRestoreError(msg)


def run_in(path_or_name: str | os.PathLike[str], fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call fn(*args, **kwargs) in the network namespace and return its result."""
    with enter(path_or_name):
        return fn(*args, **kwargs)
