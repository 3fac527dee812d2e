"""Exceptions raised by the netns package.

Each carries `msg` (what went wrong and what to do) and `code`, the CNI
specification error code a plugin should report for it, so a plugin can turn
one into its error object with `CNIError(err.code, err.msg)` without this
package depending on the plugin code.
"""

from __future__ import annotations

# CNI spec error codes (same values as cni_plugins.spec.errors; repeated here so
# that the namespace library stays independent of the plugin framework).
_CNI_ERR_IO = 5
_CNI_ERR_INVALID_NETNS = 8


class NetnsError(Exception):
    """Base class: a namespace operation failed."""

    code = _CNI_ERR_IO

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.msg = msg


class InvalidNetnsNameError(NetnsError, ValueError):
    """The name cannot be used for a namespace under RUN_DIR."""

    code = _CNI_ERR_INVALID_NETNS


class NetnsExistsError(NetnsError):
    """A namespace (or a leftover file) already has that name."""


class NotNetnsError(NetnsError):
    """The path exists but is not a network namespace."""

    code = _CNI_ERR_INVALID_NETNS


class NetnsNotFoundError(NotNetnsError):
    """Nothing exists at the path."""


class NetnsRestoreError(NetnsError):
    """Fatal: a thread could not switch back to its own network namespace.

    The thread keeps running in the namespace it entered, so every socket or
    netlink request it makes afterwards lands there. Stop using the thread
    (in a short-lived plugin: exit the process).
    """
