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
from typing import Any

import netns
from cni_plugins.kernel import ip
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
            with ip.open_netlink() as cipr:
                return ip.create_veth_in_container(cipr, req.ifname, host_fd, mtu, mac)
        return netns.run_in(req.netns, create)
    finally:
        os.close(host_fd)


def delete_host_link(name: str) -> None:
    with ip.open_netlink() as ipr:
        ip.delete_link_by_name(ipr, name)


def set_container_up(ifname: str) -> None:
    """Inside the container: bring ``ifname`` up (a layer-2 only attachment)."""
    with ip.open_netlink() as ipr:
        link = ip.find_link(ipr, ifname)
        if link is None:
            raise CNIError(ERR_INTERNAL, f"failed to retrieve link: {ifname!r} not found in the container")
        ip.set_up(ipr, link.index)


def delete_container_link(req: CmdArgs) -> None:
    """Remove the request's interface from its container (gone already: nothing to do)."""
    def delete() -> None:
        with ip.open_netlink() as ipr:
            ip.delete_link_by_name(ipr, req.ifname)

    try:
        netns.run_in(req.netns, delete)
    except netns.NetnsNotFoundError:
        pass  # gone between our look and our entry: nothing left to delete there
    except netns.NetnsError as exc:
        raise CNIError(ERR_INVALID_NETNS, f"failed to open netns {req.netns!r}", exc.msg) from None


def configure_container(ifname: str, result: Result, enable_dad: bool) -> None:
    """Inside the container: DAD/ARP sysctls, then addresses, link up and routes (ConfigureIface)."""
    if enable_dad:
        ip.write_sysctl(f"net/ipv6/conf/{ifname}/enhanced_dad", "1", ignore_errors=True)
        ip.write_sysctl(f"net/ipv6/conf/{ifname}/accept_dad", "1", ignore_errors=True)
    else:
        ip.write_sysctl(f"net/ipv6/conf/{ifname}/accept_dad", "0", ignore_errors=True)
    ip.write_sysctl(f"net/ipv4/conf/{ifname}/arp_notify", "1", ignore_errors=True)

    with ip.open_netlink() as ipr:
        link = ip.find_link(ipr, ifname)
        if link is None:
            raise CNIError(ERR_INTERNAL, f"failed to lookup {ifname!r} in the container")
        gateway_of: dict[int, str] = {}
        ipv6_enabled = False
        for ipc in result.ips:
            if ipc.interface is None:
                continue
            if not 0 <= ipc.interface < len(result.interfaces) or result.interfaces[ipc.interface].name != ifname:
                raise CNIError(ERR_INTERNAL, f"failed to add IP addr {ipc.address} to {ifname!r}: "
                               "invalid interface index")
            if ipc.family == 6 and not ipv6_enabled:
                enable_ipv6(ifname)
                ipv6_enabled = True
            try:
                ip.add_address(ipr, link.index, ipc.address)
            except Exception as exc:
                raise CNIError(ERR_INTERNAL, f"failed to add IP addr {ipc.address} to {ifname!r}: "
                               f"{ip.describe(exc)}") from None
            if ipc.gateway:
                gateway_of.setdefault(ipaddress.ip_address(ipc.gateway).version, ipc.gateway)
        ip.set_up(ipr, link.index)
        if 6 in gateway_of:
            ip.settle_addresses(ipr, link)
        for route in result.routes:
            gw = route.gw or gateway_of.get(route.family)
            try:
                ip.add_route(ipr, link.index, ip.RouteSpec(route.dst, gw, route.priority, route.table, route.scope))
            except Exception as exc:
                raise CNIError(ERR_INTERNAL, f"failed to add route '{route.dst} via {gw} dev {ifname}': "
                               f"{ip.describe(exc)}",
                               "check the routes that IPAM returned") from None


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
                raise CNIError(ERR_INTERNAL, f"failed to enable IPv6 for interface {dev!r} ({key}={current}): "
                               f"{exc.strerror}") from None
    ip.write_sysctl(f"net/ipv6/conf/{ifname}/keep_addr_on_down", "1", ignore_errors=True)
