"""Plugin-side use of the netns library: CNI errors instead of library errors."""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Any, Callable, TypeVar

from cni_plugins.spec.errors import ERR_INVALID_NETNS, CNIError

T = TypeVar("T")


def _netns_error(path: str, exc: Exception) -> CNIError:
    return CNIError(
        ERR_INVALID_NETNS,
        f"failed to open netns {path!r}",
        f"{exc}; CNI_NETNS must be a network namespace path such as /var/run/netns/NAME",
    )


def check_netns(path: str) -> None:
    """Raise the spec's error unless ``path`` names a network namespace."""
    import netns

    try:
        netns.validate(path)
    except netns.NetnsError as exc:
        raise _netns_error(path, exc) from None


def in_netns(path: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` inside the network namespace at ``path`` and come back."""
    import netns

    with ExitStack() as stack:
        try:
            stack.enter_context(netns.enter(path))  # checks that path is a network namespace
        except netns.NetnsError as exc:
            raise _netns_error(path, exc) from None
        return fn(*args, **kwargs)


def netns_gone(path: str) -> bool:
    """True when a DEL's namespace no longer exists (DEL then has nothing to do there)."""
    return not path or not os.path.exists(path)
