"""What portmap changes on the node: the configured firewall backend, and the host tools around it.

Both backends offer ``add(cfg, owner, targets)``, ``delete(cfg, owner)``,
``check(cfg, owner, targets)`` and ``gc(cfg, valid_owners)``. After an ADD
has installed its mappings, stale UDP conntrack entries for the mapped ports
are dropped (so new datagrams take the DNAT) and route_localnet is set where
localhost traffic must reach the container.
"""

from __future__ import annotations

import ipaddress
from types import ModuleType
from typing import Callable

from cni_plugins.kernel import hostcmd
from cni_plugins.portmap.config import IPTABLES, PortMapConfig
from cni_plugins.portmap.owner import Owner
from cni_plugins.spec.errors import ERR_INTERNAL, CNIError

__all__ = ["Owner", "backend", "enable_route_localnet", "flush_udp_conntrack"]

TOOL_TIMEOUT = 5.0  # conntrack and `ip route get` answer at once or not at all


def backend(cfg: PortMapConfig) -> ModuleType:
    """The module of the backend the configuration chose.

    Only that one is imported: a request never needs the other backend's runner,
    lock and listing parser (3-7 ms of imports, a tenth of a call).
    """
    if cfg.backend == IPTABLES:
        from cni_plugins.portmap import ipt

        return ipt
    from cni_plugins.portmap import nft

    return nft


def flush_udp_conntrack(cfg: PortMapConfig, family: int, warn: Callable[[str], None]) -> None:
    """Drop stale UDP conntrack entries for the mapped ports, so new traffic takes the DNAT.

    Failures are only reported as the request's diagnostics (``warn``), as in the reference.
    """
    ports = sorted({m.host_port for m in cfg.mappings_for(family) if m.protocol == "udp"})
    for port in ports:
        try:
            hostcmd.run(
                ["conntrack", "-D", "-f", "ipv4" if family == 4 else "ipv6", "-p", "udp", "--orig-port-dst", str(port)],
                timeout=TOOL_TIMEOUT,
            )
        except hostcmd.HostToolError as err:
            if err.returncode == 1:  # nothing to delete
                continue
            if err.returncode is None:  # conntrack is missing or hangs: the other ports would fare no better
                warn(f"portmap: could not flush UDP conntrack entries for port {port}: {err}")
                return
            warn(f"portmap: conntrack -D for UDP port {port} failed: {err.stderr}")


def enable_route_localnet(container_ip: ipaddress.IPv4Address) -> None:
    """Let 127/8 sources cross to the container: set route_localnet on the interface
    that routes to it (in the node's namespace, where this plugin runs), as the reference does."""
    try:
        words = hostcmd.run(["ip", "-o", "route", "get", str(container_ip)], timeout=TOOL_TIMEOUT).split()
    except hostcmd.HostToolError as err:
        if err.returncode is not None:
            return  # no route: nothing to enable
        raise
    if "dev" not in words:
        return
    dev = words[words.index("dev") + 1]
    if not dev or "/" in dev or dev in (".", ".."):
        return
    # One sysctl file, read and written directly: kernel.ip.ensure_sysctl does the same, but
    # importing kernel.ip for it costs more (~2.5 ms) than everything else this ADD loads here.
    path = f"/proc/sys/net/ipv4/conf/{dev}/route_localnet"
    try:
        with open(path) as fh:
            if fh.read().strip() == "1":
                return
        with open(path, "w") as fh:
            fh.write("1")
    except OSError as exc:
        raise CNIError(ERR_INTERNAL, f"unable to enable route_localnet on {dev}: {exc}") from None
