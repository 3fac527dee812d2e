"""Where namespaces live: names, their pin files under RUN_DIR, thread paths."""

from __future__ import annotations

import os
import threading

from .errors import InvalidNetnsNameError

# Where `ip netns` pins named namespaces; sharing it makes ours visible to it.
RUN_DIR = "/var/run/netns"

_MAX_NAME_LEN = 255  # NAME_MAX: the name is one path component


def validate_name(name: str) -> str:
    """Return name if `ip netns add` would accept it, else raise InvalidNetnsNameError."""
    if not isinstance(name, str) or not name:
        raise InvalidNetnsNameError(f"invalid network namespace name {name!r}: it must be a non-empty string")
    if "/" in name:
        raise InvalidNetnsNameError(f"invalid network namespace name {name!r}: it must not contain '/'")
    if name in (".", ".."):
        raise InvalidNetnsNameError(f"invalid network namespace name {name!r}: '.' and '..' are reserved")
    if "\0" in name:
        raise InvalidNetnsNameError(f"invalid network namespace name {name!r}: it must not contain a NUL byte")
    if len(os.fsencode(name)) > _MAX_NAME_LEN:
        raise InvalidNetnsNameError(
            f"invalid network namespace name {name[:20]!r}...: longer than {_MAX_NAME_LEN} bytes"
        )
    return name


def path_of(name_or_path: str | os.PathLike[str]) -> str:
    """The namespace file for a bare name (under RUN_DIR) or an absolute path (as given)."""
    value = os.fspath(name_or_path)
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if value.startswith("/"):
        return value
    if "/" in value:
        raise InvalidNetnsNameError(
            f"{value!r} is neither a namespace name nor an absolute path; give a name such as 'blue' "
            f"(meaning {RUN_DIR}/blue) or a full path such as /proc/1234/ns/net"
        )
    return os.path.join(RUN_DIR, validate_name(value))


def current_path() -> str:
    """The network namespace file of the calling thread (namespaces are per thread)."""
    return f"/proc/self/task/{threading.get_native_id()}/ns/net"
