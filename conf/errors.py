"""The error raised for a network configuration that cannot be used."""

from __future__ import annotations

from cni_plugins.spec.errors import ERR_INVALID_CONFIG, CNIError


class ConfError(CNIError):
    """A configuration file is missing, unreadable or invalid.

    The message names the file and the field, e.g.
    ``/etc/cni/net.d/10-x.conflist: field 'plugins': must be a non-empty list``.
    ``code`` is a CNI error code: 7 (invalid config) unless said otherwise,
    6 when the file is not JSON, 1 when the cniVersion is not supported.
    """

    def __init__(
        self,
        msg: str,
        path: str | None = None,
        field: str | None = None,
        code: int = ERR_INVALID_CONFIG,
        details: str = "",
    ) -> None:
        self.reason = msg
        self.path = path
        self.field = field
        prefix = ""
        if path:
            prefix += f"{path}: "
        if field:
            prefix += f"field {field!r}: "
        super().__init__(code, prefix + msg, details)


class NetworkNotFoundError(ConfError):
    """No configuration file declares the network asked for."""
