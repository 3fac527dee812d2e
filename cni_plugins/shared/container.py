"""Container-interface setup shared by the plugins that attach a pod through a veth pair.

The pair is created from inside the container's namespace with its host end
placed straight into the node's namespace (moving a device between namespaces
is slow and serialises concurrent ADDs under the kernel's rtnl lock). Inside
the container: the sysctls, addresses, link up and routes of a CNI result,
as the reference's ipam.ConfigureIface does.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Any

import netns
from cni_plugins.kernel import ip, rtnl
from cni_plugins.spec.errors import ERR_INTERNAL, ERR_INVALID_NETNS, CNIError
from cni_plugins.spec.skel import CmdArgs
from cni_plugins.spec.types import Result


def create_veth(req: CmdArgs, mtu: int = 0, mac: str = "") -> tuple[str, Any]:
    """Create the pair from inside the container; the host end lands in this (the node) namespace.

    Returns the host end's name and the container end's Link.
    """
    host_fd = os.open(netns.current_path(), os.O_RDONLY | os.O_CLOEXEC)
    try:

        def create() -> tuple[str, Any]:
            with ip.open_rtnl() as cipr:
                return ip.create_veth_in_container(cipr, req.ifname, host_fd, mtu, mac)

        return netns.run_in(req.netns, create)
    finally:
        os.close(host_fd)


def delete_host_link(name: str) -> None:
    with ip.open_rtnl() as ipr:
        ip.delete_link_by_name(ipr, name)


def set_container_up(ifname: str) -> None:
    """Inside the container: bring ``ifname`` up (a layer-2 only attachment)."""
    with ip.open_rtnl() as ipr:
        link = ip.find_link(ipr, ifname)
        if link is None:
            raise CNIError(ERR_INTERNAL, f"failed to retrieve link: {ifname!r} not found in the container")
        ip.set_up(ipr, link.index)


def delete_container_link(req: CmdArgs) -> None:
    """Remove the request's interface from its container (gone already: nothing to do)."""

    def delete() -> None:
        with ip.open_rtnl() as ipr:
            ip.delete_link_by_name(ipr, req.ifname)

    try:
        netns.run_in(req.netns, delete)
    except netns.NetnsNotFoundError:
        pass  # gone between our look and our entry: nothing left to delete there
    except netns.NetnsError as exc:
        raise CNIError(ERR_INVALID_NETNS, f"failed to open netns {req.netns!r}", exc.msg) from None


def configure_container(ifname: str, result: Result, enable_dad: bool, index: int = 0) -> None:
    """Inside the container: DAD/ARP sysctls, then addresses, link up and routes (ConfigureIface).

    ``index``: the interface's ifindex when the caller knows it (saves a lookup).
    The addresses, the link going up and the routes go out together, in that
    order: one round trip, two when an IPv6 gateway makes the routes wait for
    DAD. The first refusal is reported as if they had gone one at a time
    (those after it ran too, but a failed ADD deletes the interface anyway).
    """
    if enable_dad:
        ip.write_sysctl(f"net/ipv6/conf/{ifname}/enhanced_dad", "1", ignore_errors=True)
        ip.write_sysctl(f"net/ipv6/conf/{ifname}/accept_dad", "1", ignore_errors=True)
    else:
        ip.write_sysctl(f"net/ipv6/conf/{ifname}/accept_dad", "0", ignore_errors=True)
    ip.write_sysctl(f"net/ipv4/conf/{ifname}/arp_notify", "1", ignore_errors=True)

    mine = [ipc for ipc in result.ips if ipc.interface is not None]
    for ipc in mine:  # every address checked before any is added
        if not 0 <= ipc.interface < len(result.interfaces) or result.interfaces[ipc.interface].name != ifname:
            raise CNIError(ERR_INTERNAL, f"failed to add IP addr {ipc.address} to {ifname!r}: invalid interface index")
    if any(ipc.family == 6 for ipc in mine):
        enable_ipv6(ifname)

    with ip.open_rtnl() as ipr:
        if not index:
            link = ip.find_link(ipr, ifname)
            if link is None:
                raise CNIError(ERR_INTERNAL, f"failed to lookup {ifname!r} in the container")
            index = link.index
        gateway_of: dict[int, str] = {}
        steps = []
        for ipc in mine:
            steps.append(
                _Step(rtnl.add_address(index, ipc.address), f"failed to add IP addr {ipc.address} to {ifname!r}")
            )
            if ipc.gateway:
                gateway_of.setdefault(ipaddress.ip_address(ipc.gateway).version, ipc.gateway)
        steps.append(_Step(rtnl.set_link(index, up=True)))
        if 6 in gateway_of:
            _run(ipr, steps)
            steps = []
            ip.settle_addresses(ipr, ip.get_link(ipr, ifname, "container interface"))
        for route in result.routes:
            gw = route.gw or gateway_of.get(route.family)
            steps.append(
                _Step(
                    ip.route_request(index, ip.RouteSpec(route.dst, gw, route.priority, route.table, route.scope)),
                    f"failed to add route '{route.dst} via {gw} dev {ifname}'",
                    "check the routes that IPAM returned",
                )
            )
        _run(ipr, steps)


@dataclass(frozen=True)
class _Step:
    """One request of configure_container and how its refusal reads: a CNI error with ``failure`` as its
    head (and ``hint`` as details), or with no ``failure`` the netlink error itself."""

    request: rtnl.Request
    failure: str = ""
    hint: str = ""


def _run(ipr: rtnl.Rtnl, steps: list[_Step]) -> None:
    """Send the steps' requests in one round trip; raise for the first one the kernel refused."""
    for step, answer in zip(steps, ipr.run([step.request for step in steps])):
        if not answer.error:
            continue
        exc = rtnl.NetlinkError(answer.error, what=answer.what)
        if not step.failure:
            raise exc
        raise CNIError(ERR_INTERNAL, f"{step.failure}: {ip.describe(exc)}", step.hint) from None


def enable_ipv6(ifname: str) -> None:
    """IPv6 addresses need disable_ipv6=0 on lo and the interface; keep them across link down."""
    for dev in ("lo", ifname):
        key = f"net/ipv6/conf/{dev}/disable_ipv6"
        try:
            current = ip.read_sysctl(key)
        except OSError:
            continue
        if current != "0":
            try:
                ip.write_sysctl(key, "0")
            except OSError as exc:
                raise CNIError(
                    ERR_INTERNAL, f"failed to enable IPv6 for interface {dev!r} ({key}={current}): {exc.strerror}"
                ) from None
    ip.write_sysctl(f"net/ipv6/conf/{ifname}/keep_addr_on_down", "1", ignore_errors=True)
