"""Network namespace library: create, pin, list, enter, run-in, delete.

Compatible with `ip netns` (namespaces pinned under RUN_DIR). Namespace
switches are per thread. Uses only the standard library (ctypes for the
system calls), so importing it is cheap and does not pull in pyroute2.
"""

from .check import is_netns, validate
from .errors import (
    InvalidNetnsNameError,
    NetnsError,
    NetnsExistsError,
    NetnsNotFoundError,
    NetnsRestoreError,
    NotNetnsError,
)
from .lifecycle import Namespace, create, delete, exists, list_names, temporary
from .paths import RUN_DIR, current_path, path_of, validate_name
from .switch import enter, run_in

__all__ = [
    "RUN_DIR",
    "InvalidNetnsNameError",
    "Namespace",
    "NetnsError",
    "NetnsExistsError",
    "NetnsNotFoundError",
    "NetnsRestoreError",
    "NotNetnsError",
    "create",
    "current_path",
    "delete",
    "enter",
    "exists",
    "is_netns",
    "list_names",
    "path_of",
    "run_in",
    "temporary",
    "validate",
    "validate_name",
]
