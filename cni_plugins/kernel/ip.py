"""Netlink and sysctl mechanics shared by the plugins (the reference's pkg/ip).

Every function acts in the network namespace of the calling thread: a
netlink socket belongs to the namespace it was opened in, so open one after
entering the namespace you mean and pass it in. Two kinds of socket work
with every function here:

- ``open_rtnl()``: a plain rtnetlink socket (``kernel.rtnl``), what the
  plugins' ADD and DEL use: no pyroute2 import, no event loop per request,
  and several requests pipelined into one round trip where the order allows;
- ``open_netlink()``: a pyroute2 IPRoute, for callers that also use
  pyroute2's own API on it (the overlay, bridge VLANs, the bridge's CHECK).
  The few functions that need that API (bridge VLANs) say so with a
  TypeError when handed a plain socket.

pyroute2 is imported on first use; importing this module costs nothing.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any, Iterable

from cni_plugins.spec.errors import ERR_INTERNAL, CNIError
from cni_plugins.kernel.netlink import IPRoute  # before any pyroute2 import: it skips pyroute2's package __init__
from cni_plugins.kernel import rtnl
from cni_plugins.kernel.rtnl import Rtnl

IFF_UP = 0x1
IFF_PROMISC = 0x100
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
ENODEV = 19
EEXIST = 17
ENOENT = 2
EADDRNOTAVAIL = 99
ESRCH = 3
RTPROT_BOOT = 3  # what `ip route add` and the reference use; pyroute2 would say "static"

# Bridge VLAN entry flags (linux/if_bridge.h).
BRIDGE_VLAN_INFO_PVID = 0x2
BRIDGE_VLAN_INFO_UNTAGGED = 0x4

# How long the reference waits between looks at a new bridge port (ms).
PORT_UP_DELAYS_MS = (0, 50, 500, 1000, 1000)
DAD_SETTLE_TIMEOUT = 5.0
DAD_SETTLE_INTERVAL = 0.05


def open_netlink() -> Any:
    """An IPRoute socket in the calling thread's network namespace (close it when done)."""
    return IPRoute()


def open_rtnl() -> Rtnl:
    """A plain rtnetlink socket in the calling thread's network namespace (close it when done)."""
    return Rtnl()


def _lean(ipr: Any) -> bool:
    return isinstance(ipr, Rtnl)


def _no_pyroute2_api(what: str) -> TypeError:
    return TypeError(f"{what} needs a pyroute2 socket: use open_netlink()")


def netlink_errno(exc: BaseException) -> int | None:
    """The errno of a pyroute2 NetlinkError (or OSError), None for anything else."""
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    if isinstance(exc, OSError):
        return exc.errno
    return None


def describe(exc: BaseException) -> str:
    """A netlink failure as a short message ("invalid argument"), like the reference prints it."""
    code = netlink_errno(exc)
    if code:
        return os.strerror(code)[:1].lower() + os.strerror(code)[1:]
    return str(exc)


def random_veth_name() -> str:
    """ "veth" + 8 hex digits, the reference's host-side name (NetworkManager ignores veth*)."""
    return "veth" + secrets.token_hex(4)


# ---- links ----------------------------------------------------------------


@dataclass
class Link:
    """What the plugins need to know about one network interface."""

    name: str
    index: int
    mac: str
    mtu: int
    kind: str
    master: int
    peer_index: int  # IFLA_LINK: for a veth, the peer's index in the peer's namespace
    oper_state: str
    flags: int
    promiscuity: int
    alias: str = ""  # IFLA_IFALIAS (bandwidth marks its ifb devices with it)
    txqlen: int = 0

    @property
    def is_up(self) -> bool:
        return bool(self.flags & IFF_UP)

    @property
    def promisc(self) -> bool:
        return bool(self.flags & IFF_PROMISC)


def _link_from_msg(msg: Any) -> Link:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else ""
    return Link(
        name=msg.get_attr("IFLA_IFNAME"),
        index=msg["index"],
        mac=msg.get_attr("IFLA_ADDRESS") or "",
        mtu=msg.get_attr("IFLA_MTU") or 0,
        kind=kind or "",
        master=msg.get_attr("IFLA_MASTER") or 0,
        peer_index=msg.get_attr("IFLA_LINK") or 0,
        oper_state=msg.get_attr("IFLA_OPERSTATE") or "UNKNOWN",
        flags=msg["flags"],
        promiscuity=msg.get_attr("IFLA_PROMISCUITY") or 0,
        alias=msg.get_attr("IFLA_IFALIAS") or "",
        txqlen=msg.get_attr("IFLA_TXQLEN") or 0,
    )


def _lookup_link(ipr: Any, **key: Any) -> Link | None:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        msgs = ipr.link("get", **key)
    except NetlinkError as exc:
        if exc.code == ENODEV:
            return None
        raise
    return _link_from_msg(msgs[0]) if msgs else None


def link_from(answer: rtnl.Answer) -> Link | None:
    """The Link of a GETLINK answer (``rtnl.get_link``); None when there is no such link."""
    info = rtnl.link_of(answer)
    return Link(**vars(info)) if info is not None else None


def find_link(ipr: Any, name: str) -> Link | None:
    """The link called ``name``, or None when there is none."""
    if _lean(ipr):
        return link_from(ipr.run([rtnl.get_link(name=name)])[0])
    return _lookup_link(ipr, ifname=name)


def link_by_index(ipr: Any, index: int) -> Link | None:
    """The link with ifindex ``index``, or None when there is none."""
    if _lean(ipr):
        return link_from(ipr.run([rtnl.get_link(index=index)])[0])
    return _lookup_link(ipr, index=index)


def get_link(ipr: Any, name: str, what: str = "interface") -> Link:
    """The link called ``name``; a CNI error naming ``what`` when it is missing."""
    link = find_link(ipr, name)
    if link is None:
        raise CNIError(ERR_INTERNAL, f"{what} {name!r} not found")
    return link


def set_up(ipr: Any, index: int) -> None:
    if _lean(ipr):
        ipr.call(rtnl.set_link(index, up=True))
        return
    ipr.link("set", index=index, state="up")


def set_promisc(ipr: Any, index: int, on: bool = True) -> None:
    if _lean(ipr):
        ipr.call(rtnl.set_link(index, promisc=on))
        return
    ipr.link("set", index=index, flags=IFF_PROMISC if on else 0, mask=IFF_PROMISC)


def set_mac(ipr: Any, index: int, mac: str) -> None:
    if _lean(ipr):
        ipr.call(rtnl.set_link(index, mac=mac))
        return
    ipr.link("set", index=index, address=mac)


def delete_link_by_name(ipr: Any, name: str) -> None:
    """Delete a link; one that does not exist is success."""
    if _lean(ipr):
        answer = ipr.run([rtnl.delete_link_by_name(name)])[0]
        if answer.error != ENODEV:
            answer.check()
        return
    from pyroute2.netlink.exceptions import NetlinkError

    link = find_link(ipr, name)
    if link is None:
        return
    try:
        ipr.link("del", index=link.index)
    except NetlinkError as exc:
        if exc.code != ENODEV:
            raise


# ---- veth -----------------------------------------------------------------


def create_veth_in_container(
    ipr: Any, container_ifname: str, host_ns_fd: int, mtu: int = 0, mac: str = "", host_ifname: str = ""
) -> tuple[str, Link]:
    """Create a veth pair from inside the container's namespace, host end in ``host_ns_fd``.

    Returns the host end's name and the container end. A random host name
    that collides with an existing interface is retried, as the reference does.
    """
    if _lean(ipr):
        return _create_veth_lean(ipr, container_ifname, host_ns_fd, mtu, mac, host_ifname)
    from pyroute2.netlink.exceptions import NetlinkError

    for _attempt in range(10):
        peer_name = host_ifname or random_veth_name()
        peer: dict[str, Any] = {"ifname": peer_name, "net_ns_fd": host_ns_fd}
        spec: dict[str, Any] = {"ifname": container_ifname, "kind": "veth", "peer": peer}
        if mtu:
            spec["mtu"] = mtu
            peer["mtu"] = mtu
        if mac:
            spec["address"] = mac
        try:
            ipr.link("add", **spec)
        except NetlinkError as exc:
            if exc.code == EEXIST:
                if find_link(ipr, container_ifname) is not None:
                    raise CNIError(
                        ERR_INTERNAL,
                        f"container veth name {container_ifname!r} already exists",
                        "an interface of that name is already in the container; "
                        "use another CNI_IFNAME or remove it (DEL)",
                    ) from None
                if host_ifname:
                    raise CNIError(ERR_INTERNAL, f"host veth name {host_ifname!r} already exists") from None
                continue  # the random host name is taken on the host: draw another one
            raise CNIError(
                ERR_INTERNAL,
                f"failed to make veth pair: {describe(exc)}",
                f"creating {container_ifname} (mtu {mtu or 'default'}, mac {mac or 'random'})",
            ) from None
        return peer_name, get_link(ipr, container_ifname, "container veth")
    raise CNIError(ERR_INTERNAL, "failed to find a unique veth name", "10 random names were all taken")


def _create_veth_lean(
    ipr: Rtnl, container_ifname: str, host_ns_fd: int, mtu: int, mac: str, host_ifname: str
) -> tuple[str, Link]:
    """create_veth_in_container in one round trip per attempt: the add and the look at the new end together."""
    for _attempt in range(10):
        peer_name = host_ifname or random_veth_name()
        added, got = ipr.run(
            [rtnl.add_veth(container_ifname, peer_name, host_ns_fd, mtu, mac), rtnl.get_link(name=container_ifname)]
        )
        if added.error == EEXIST:
            if link_from(got) is not None:
                raise CNIError(
                    ERR_INTERNAL,
                    f"container veth name {container_ifname!r} already exists",
                    "an interface of that name is already in the container; use another CNI_IFNAME or remove it (DEL)",
                ) from None
            if host_ifname:
                raise CNIError(ERR_INTERNAL, f"host veth name {host_ifname!r} already exists") from None
            continue  # the random host name is taken on the host: draw another one
        if added.error:
            raise CNIError(
                ERR_INTERNAL,
                f"failed to make veth pair: {describe(rtnl.NetlinkError(added.error))}",
                f"creating {container_ifname} (mtu {mtu or 'default'}, mac {mac or 'random'})",
            )
        link = link_from(got)
        if link is None:
            raise CNIError(ERR_INTERNAL, f"container veth {container_ifname!r} not found")
        return peer_name, link
    raise CNIError(ERR_INTERNAL, "failed to find a unique veth name", "10 random names were all taken")


# ---- bridges ----------------------------------------------------------------


@dataclass
class Bridge(Link):
    """A bridge as ``ensure_bridge`` leaves it; ``created``: that call made it."""

    created: bool = False


def ensure_bridge(
    ipr: Any,
    name: str,
    mtu: int = 0,
    promisc: bool = False,
    vlan_filtering: bool = False,
    *,
    mac: str | None = None,
    dad: bool = True,
) -> Bridge:
    """Create the bridge unless it exists; make sure it is a bridge and up.

    A bridge this call creates gets ``mac`` as its address in the request that
    creates it: the kernel then never recalculates it, whereas a bridge left
    to the kernel takes the lowest MAC of its ports and moves under every pod
    as ports come and go. An existing bridge is adopted as it is (its address
    untouched); ``created`` on the answer tells which happened. ``dad=False``
    lets its IPv6 addresses, the link-local one included, skip duplicate
    address detection (for a bridge whose addresses are its own by lease).
    """
    if _lean(ipr):
        return _ensure_bridge_lean(ipr, name, mtu, promisc, vlan_filtering, mac, dad)
    from pyroute2.netlink.exceptions import NetlinkError

    created = _add_bridge(ipr, name, mtu, vlan_filtering, mac)
    bridge = get_link(ipr, name, "bridge")
    if bridge.kind != "bridge":
        raise CNIError(
            ERR_INTERNAL,
            f"failed to create bridge {name!r}: {name!r} already exists but is not a bridge",
            "pick another 'bridge' name or remove that interface",
        )
    if vlan_filtering and not bridge_vlan_filtering(ipr, bridge.index):
        try:
            ipr.link("set", index=bridge.index, kind="bridge", br_vlan_filtering=1)
        except NetlinkError as exc:
            raise CNIError(
                ERR_INTERNAL, f"failed to enable vlan filtering on bridge {name!r}: {describe(exc)}"
            ) from None
    if promisc and not bridge.promisc:
        set_promisc(ipr, bridge.index)
    # We own the routes on this interface, so router advertisements must not add any.
    write_sysctl(f"net/ipv6/conf/{name}/accept_ra", "0", ignore_errors=True)
    if not dad:
        # Before it comes up: its link-local address is then usable at once, not after a second of DAD.
        write_sysctl(f"net/ipv6/conf/{name}/accept_dad", "0", ignore_errors=True)
    if not bridge.is_up:
        set_up(ipr, bridge.index)
    return Bridge(**vars(get_link(ipr, name, "bridge")), created=created)


def _ensure_bridge_lean(
    ipr: Rtnl, name: str, mtu: int, promisc: bool, vlan_filtering: bool, mac: str | None, dad: bool
) -> Bridge:
    """ensure_bridge in one round trip for a bridge that is there and up (two when it is new)."""
    if vlan_filtering:
        raise _no_pyroute2_api("a bridge with VLAN filtering")
    added, got = ipr.run([rtnl.add_bridge(name, mtu, mac), rtnl.get_link(name=name)])
    if added.error and added.error != EEXIST:
        raise CNIError(
            ERR_INTERNAL,
            f"failed to create bridge {name!r}: could not add {name!r}: {describe(rtnl.NetlinkError(added.error))}",
            _bridge_add_hint(added.error, vlan_filtering, mac),
        )
    bridge = link_from(got)
    if bridge is None:
        raise CNIError(ERR_INTERNAL, f"bridge {name!r} not found")
    if bridge.kind != "bridge":
        raise CNIError(
            ERR_INTERNAL,
            f"failed to create bridge {name!r}: {name!r} already exists but is not a bridge",
            "pick another 'bridge' name or remove that interface",
        )
    # We own the routes on this interface, so router advertisements must not add any.
    write_sysctl(f"net/ipv6/conf/{name}/accept_ra", "0", ignore_errors=True)
    if not dad:
        # Before it comes up: its link-local address is then usable at once, not after a second of DAD.
        write_sysctl(f"net/ipv6/conf/{name}/accept_dad", "0", ignore_errors=True)
    changes = []
    if promisc and not bridge.promisc:
        changes.append(rtnl.set_link(bridge.index, promisc=True))
    if not bridge.is_up:
        changes.append(rtnl.set_link(bridge.index, up=True))
    if changes:
        *done, got = ipr.run(changes + [rtnl.get_link(name=name)])
        failed = rtnl.first_failure(done)
        if failed is not None:
            failed.check()
        bridge = get_link_from(got, name, "bridge")
    return Bridge(**vars(bridge), created=not added.error)


def get_link_from(answer: rtnl.Answer, name: str, what: str = "interface") -> Link:
    """The Link of a GETLINK answer; a CNI error naming ``what`` when it is missing (as get_link)."""
    link = link_from(answer)
    if link is None:
        raise CNIError(ERR_INTERNAL, f"{what} {name!r} not found")
    return link


def _add_bridge(ipr: Any, name: str, mtu: int, vlan_filtering: bool, mac: str | None) -> bool:
    """Add the bridge; False when a link of that name exists already."""
    from pyroute2.netlink.exceptions import NetlinkError

    spec: dict[str, Any] = {"ifname": name, "kind": "bridge"}
    if mtu:
        spec["mtu"] = mtu
    if vlan_filtering:
        spec["br_vlan_filtering"] = 1
    if mac:
        spec["address"] = mac
    try:
        ipr.link("add", **spec)
    except NetlinkError as exc:
        if exc.code == EEXIST:
            return False
        raise CNIError(
            ERR_INTERNAL,
            f"failed to create bridge {name!r}: could not add {name!r}: {describe(exc)}",
            _bridge_add_hint(exc.code, vlan_filtering, mac),
        ) from None
    return True


def _bridge_add_hint(code: int, vlan_filtering: bool, mac: str | None) -> str:
    if vlan_filtering and code == 95:  # EOPNOTSUPP
        return "vlan filtering needs a kernel with CONFIG_BRIDGE_VLAN_FILTERING"
    if mac and code == EADDRNOTAVAIL:
        return f"{mac} is not a usable bridge address: give a non-zero unicast MAC"
    return ""


def bridge_vlan_filtering(ipr: Any, index: int) -> bool:
    if _lean(ipr):
        raise _no_pyroute2_api("reading a bridge's VLAN filtering")
    msg = ipr.link("get", index=index)[0]
    info = msg.get_attr("IFLA_LINKINFO")
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
    return bool(data.get_attr("IFLA_BR_VLAN_FILTERING")) if data is not None else False


def attach_port(ipr: Any, port: int, bridge: int, hairpin: bool = False, isolated: bool = False) -> None:
    """Enslave ``port`` to ``bridge`` and set its hairpin and isolation flags."""
    if _lean(ipr):
        failed = rtnl.first_failure(
            ipr.run([rtnl.set_link(port, master=bridge), rtnl.set_bridge_port(port, hairpin, isolated)])
        )
        if failed is not None:
            failed.check()
        return
    ipr.link("set", index=port, master=bridge)
    ipr.brport("set", index=port, mode=int(hairpin), isolated=int(isolated))


class AttachError(Exception):
    """Enslaving a port to a bridge (or setting its port flags) failed; ``cause`` is the netlink error."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def bring_up_port(ipr: Any, port: int, bridge: int, hairpin: bool = False, isolated: bool = False) -> Link:
    """Bring ``port`` up, enslave it to ``bridge`` with its hairpin and isolation flags; the port afterwards.

    A refused link-up raises the netlink error itself, a refused enslaving
    ``AttachError``. On a plain rtnetlink socket the four requests go out
    together (one round trip).
    """
    if _lean(ipr):
        up, master, flags, got = ipr.run(
            [
                rtnl.set_link(port, up=True),
                rtnl.set_link(port, master=bridge),
                rtnl.set_bridge_port(port, hairpin, isolated),
                rtnl.get_link(index=port),
            ]
        )
        up.check()
        failed = rtnl.first_failure([master, flags])
        if failed is not None:
            raise AttachError(rtnl.NetlinkError(failed.error, what=failed.what))
        return get_link_from(got, str(port), "bridge port")
    set_up(ipr, port)
    try:
        attach_port(ipr, port, bridge, hairpin, isolated)
    except Exception as exc:
        raise AttachError(exc) from None
    link = link_by_index(ipr, port)
    if link is None:
        raise CNIError(ERR_INTERNAL, f"bridge port {port} not found")
    return link


def bridge_vlan_add(ipr: Any, port: int, vid: int, pvid: bool = False, untagged: bool = False) -> None:
    if _lean(ipr):
        raise _no_pyroute2_api("bridge VLANs")
    flags = (BRIDGE_VLAN_INFO_PVID if pvid else 0) | (BRIDGE_VLAN_INFO_UNTAGGED if untagged else 0)
    ipr.vlan_filter("add", index=port, vlan_info={"vid": vid, "flags": flags})


def bridge_vlan_del(ipr: Any, port: int, vid: int) -> None:
    if _lean(ipr):
        raise _no_pyroute2_api("bridge VLANs")
    ipr.vlan_filter("del", index=port, vlan_info={"vid": vid})


def bridge_vlans(ipr: Any, port: int) -> list[int]:
    """The VLAN IDs configured on one bridge port."""
    if _lean(ipr):
        raise _no_pyroute2_api("bridge VLANs")
    out: list[int] = []
    for msg in ipr.get_vlans(index=port):
        if msg["index"] != port:
            continue
        spec = msg.get_attr("IFLA_AF_SPEC")
        if spec is None:
            continue
        for name, value in spec["attrs"]:
            if name == "IFLA_BRIDGE_VLAN_INFO":
                out.append(value["vid"])
    return out


def remove_port_vlans(ipr: Any, port: int) -> None:
    """Drop every VLAN entry of a port (the default VLAN 1 included)."""
    for vid in bridge_vlans(ipr, port):
        bridge_vlan_del(ipr, port, vid)


# ---- addresses ----------------------------------------------------------------

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def addresses(ipr: Any, index: int, family: int = 0) -> list[tuple[IPInterface, int]]:
    """(address, flags) of a link; family 0 for both, 4 or 6 for one."""
    if _lean(ipr):
        found = []
        for kind, payload in ipr.call(rtnl.dump_addresses(family)):
            entry = rtnl.parse_address(payload) if kind == rtnl.RTM_NEWADDR else None
            if entry is not None and entry[0] == index:
                found.append((entry[1], entry[2]))
        return found
    kwargs: dict[str, Any] = {"index": index}
    if family:
        kwargs["family"] = 2 if family == 4 else 10
    out = []
    for msg in ipr.get_addr(**kwargs):
        if msg["index"] != index:
            continue
        address = msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL")
        if address is None:
            continue
        flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
        out.append((ipaddress.ip_interface(f"{address}/{msg['prefixlen']}"), flags))
    return out


IFA_F_NODAD = 0x02


def add_address(ipr: Any, index: int, cidr: str, nodad: bool = False) -> None:
    """Add an address; IPv4 ones get their subnet's broadcast address, as `ip addr add ... brd +` does.

    ``nodad``: an IPv6 address is usable at once, without duplicate address detection (`ip addr add ... nodad`).
    """
    if _lean(ipr):
        ipr.call(rtnl.add_address(index, cidr, nodad))
        return
    iface = ipaddress.ip_interface(cidr)
    spec: dict[str, Any] = {"index": index, "address": str(iface.ip), "prefixlen": iface.network.prefixlen}
    if iface.version == 4 and iface.network.prefixlen < 31:
        spec["broadcast"] = str(iface.network.broadcast_address)
    if nodad and iface.version == 6:
        spec["flags"] = IFA_F_NODAD
    ipr.addr("add", **spec)


def del_address(ipr: Any, index: int, cidr: str) -> None:
    if _lean(ipr):
        ipr.call(rtnl.delete_address(index, cidr))
        return
    iface = ipaddress.ip_interface(cidr)
    ipr.addr("del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)


def settle_addresses(ipr: Any, link: Link, timeout: float = DAD_SETTLE_TIMEOUT) -> None:
    """Wait until no IPv6 address of ``link`` is tentative (DAD done); fail on DADFAILED."""
    deadline = time.monotonic() + timeout
    while True:
        tentative = False
        for address, flags in addresses(ipr, link.index, 6):
            if flags & IFA_F_DADFAILED:
                raise CNIError(
                    ERR_INTERNAL,
                    f"failed to settle addresses for {link.name!r}: "
                    f"link {link.name} has address {address.ip} in DADFAILED state",
                    "another host on the link already uses this address",
                )
            if flags & IFA_F_TENTATIVE:
                tentative = True
        if not tentative:
            return
        if time.monotonic() >= deadline:
            current = link_by_index(ipr, link.index)
            if current is not None and current.oper_state == "UP":
                raise CNIError(
                    ERR_INTERNAL,
                    f"failed to settle addresses for {link.name!r}: link "
                    f"{link.name} still has tentative addresses after {timeout:g} seconds",
                )
            return
        time.sleep(DAD_SETTLE_INTERVAL)


# ---- routes ---------------------------------------------------------------


@dataclass
class RouteSpec:
    dst: str  # CIDR
    gw: str | None = None
    priority: int | None = None
    table: int | None = None
    scope: int | None = None


def add_route(ipr: Any, index: int, route: RouteSpec) -> None:
    """Add a route through ``index``; a route to the same destination gets appended (ECMP-style)."""
    if _lean(ipr):
        ipr.call(route_request(index, route))
        return
    net = ipaddress.ip_network(route.dst, strict=False)
    spec: dict[str, Any] = {
        "dst": f"{net.network_address}/{net.prefixlen}",
        "oif": index,
        "family": 2 if net.version == 4 else 10,
        "proto": RTPROT_BOOT,
    }
    if route.gw:
        spec["gateway"] = route.gw
    if route.priority is not None:
        spec["priority"] = route.priority
    if route.table is not None:
        spec["table"] = route.table
    if route.scope is not None:
        spec["scope"] = route.scope
    ipr.route("append", **spec)


def route_request(index: int, route: RouteSpec) -> rtnl.Request:
    """``add_route`` as a request for a plain rtnetlink socket (to pipeline it with others)."""
    return rtnl.append_route(index, route.dst, route.gw, route.priority, route.table, route.scope, RTPROT_BOOT)


@dataclass
class RouteEntry:
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    gw: str | None
    oif: int | None
    table: int


def routes(ipr: Any, family: int) -> list[RouteEntry]:
    """Every route of a family (4 or 6) in every table, multipath gateways flattened."""
    if _lean(ipr):
        return [
            RouteEntry(*hop)
            for kind, payload in ipr.call(rtnl.dump_routes(family))
            if kind == rtnl.RTM_NEWROUTE
            for hop in rtnl.parse_route(payload)
        ]
    out = []
    for msg in ipr.get_routes(family=2 if family == 4 else 10):
        dst = msg.get_attr("RTA_DST") or ("0.0.0.0" if family == 4 else "::")
        net = ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)
        table = msg.get_attr("RTA_TABLE") or msg["table"]
        hops = msg.get_attr("RTA_MULTIPATH")
        if hops:
            for hop in hops:
                out.append(RouteEntry(net, hop.get_attr("RTA_GATEWAY"), hop["oif"], table))
        else:
            out.append(RouteEntry(net, msg.get_attr("RTA_GATEWAY"), msg.get_attr("RTA_OIF"), table))
    return out


# ---- sysctl -----------------------------------------------------------------


def _sysctl_path(name: str) -> str:
    # Slash-separated keys keep interface names with dots (VLANs) intact.
    return "/proc/sys/" + name.strip("/")


def read_sysctl(name: str) -> str:
    with open(_sysctl_path(name)) as fh:
        return fh.read().strip()


def write_sysctl(name: str, value: str, ignore_errors: bool = False) -> None:
    """Write a sysctl of the calling thread's network namespace (net/...)."""
    try:
        fd = os.open(_sysctl_path(name), os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError:
        if not ignore_errors:
            raise


def ensure_sysctl(name: str, value: str) -> None:
    """Write only when the value differs (a read is cheaper and keeps audit logs quiet)."""
    try:
        if read_sysctl(name) == value:
            return
    except OSError:
        pass
    write_sysctl(name, value)


def enable_forwarding(families: Iterable[int]) -> None:
    """Turn on IP forwarding for each family (4/6) in the calling thread's namespace."""
    for family in sorted(set(families)):
        if family == 4:
            ensure_sysctl("net/ipv4/ip_forward", "1")
        else:
            ensure_sysctl("net/ipv6/conf/all/forwarding", "1")


# ---- waits -----------------------------------------------------------------


def wait_oper_up(ipr: Any, name: str, delays_ms: Iterable[int] = PORT_UP_DELAYS_MS) -> Link:
    """Wait (bounded) until ``name`` is operationally up, as a new bridge port becomes."""
    link: Link | None = None
    for delay in delays_ms:
        if delay:
            time.sleep(delay / 1000)
        link = get_link(ipr, name, "host veth")
        if link.oper_state == "UP":
            return link
    state = link.oper_state if link else "missing"
    raise CNIError(
        ERR_INTERNAL,
        f"bridge port in error state: {state}",
        f"host veth {name} did not come up; is the container end up?",
    )


# ---- listing links (added for kernel/tc.py and the bandwidth plugin, issue 9) ----


def list_links(ipr: Any) -> list[Link]:
    """Every link of the calling thread's network namespace."""
    if _lean(ipr):
        return [
            Link(**vars(rtnl.parse_link(payload)))
            for kind, payload in ipr.call(rtnl.dump_links())
            if kind == rtnl.RTM_NEWLINK
        ]
    return [_link_from_msg(msg) for msg in ipr.get_links()]
