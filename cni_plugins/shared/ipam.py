"""Delegating to the IPAM plugin a configuration names (the reference's pkg/ipam).

The plugin named by ``ipam.type`` gets the calling plugin's request with only
the command changed (``delegate``): found in CNI_PATH and executed, or served
in-process when that executable is this suite's own. Its result is read in the
configuration's cniVersion; an error object it prints is passed on with its code.
"""

from __future__ import annotations

from typing import Any

from cni_plugins.shared.delegate import delegate
from cni_plugins.spec.errors import ERR_INTERNAL, ERR_INVALID_CONFIG, CNIError
from cni_plugins.spec.skel import CmdArgs
from cni_plugins.spec.types import Result


def ipam_type(conf: dict[str, Any]) -> str:
    """``ipam.type`` of a network configuration ("" when it has no IPAM: a layer-2 attachment)."""
    ipam = conf.get("ipam")
    if ipam is None:
        return ""
    if not isinstance(ipam, dict):
        raise CNIError(ERR_INVALID_CONFIG, "ipam must be an object", f"got {type(ipam).__name__}")
    value = ipam.get("type", "") or ""
    if not isinstance(value, str):
        raise CNIError(ERR_INVALID_CONFIG, "ipam.type must be a string", f"got {value!r}")
    return value


def exec_add(req: CmdArgs) -> Result:
    result = delegate(req, ipam_type(req.conf), "ADD")
    if result is None:
        raise CNIError(ERR_INTERNAL, "IPAM plugin returned no result")
    return result


def exec_del(req: CmdArgs) -> None:
    delegate(req, ipam_type(req.conf), "DEL")


def exec_check(req: CmdArgs) -> None:
    delegate(req, ipam_type(req.conf), "CHECK")


def exec_gc(req: CmdArgs) -> None:
    """GC: the request's configuration carries the attachments the runtime still uses."""
    delegate(req, ipam_type(req.conf), "GC")


def exec_status(req: CmdArgs) -> None:
    delegate(req, ipam_type(req.conf), "STATUS")
