"""VXLAN devices and their static forwarding state: FDB, neighbour and onlink-route entries.

The overlay's data path, flannel's VXLAN backend style. Each node has one VXLAN
device (learning off, a stable MAC); for every remote node it holds three
permanent entries, all keyed by what the remote node published in the store::

    bridge fdb replace  <remote VTEP MAC> dev pycni.1 dst <remote public IP> self permanent
    ip neigh replace    <remote subnet .0> lladdr <remote VTEP MAC> dev pycni.1 nud permanent
    ip route replace    <remote subnet> via <remote subnet .0> dev pycni.1 onlink

so a packet for a remote pod subnet is routed to the remote VXLAN device's
address (the subnet's network address), resolved without ARP to the remote
VTEP MAC, and encapsulated to the remote node's underlay address without a
flood. Listings return exactly these kinds of entries so a reconcile can diff
them against what the cluster store wants.

Every function acts in the network namespace of the calling thread, through an
IPRoute socket from ``cni_plugins.kernel.ip.open_netlink()``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from cni_plugins.kernel import netlink as _netlink  # noqa: F401  (before any pyroute2 import)
from cni_plugins.kernel.ip import EEXIST, ENODEV, ENOENT, ESRCH, RTPROT_BOOT, Link, describe, get_link, set_up
from cni_plugins.kernel.names import stable_mac
from cni_plugins.spec.errors import ERR_INTERNAL, CNIError

AF_INET = 2
AF_INET6 = 10
AF_BRIDGE = 7
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x04
RT_TABLE_MAIN = 254

# Encapsulation overhead: outer IPv4 (20) or IPv6 (40) + UDP (8) + VXLAN (8) + inner Ethernet (14).
VXLAN_OVERHEAD_V4 = 50
VXLAN_OVERHEAD_V6 = 70
MIN_MTU = 68


@dataclass(frozen=True)
class VxlanDevice:
    """A VXLAN link as the kernel reports it."""

    name: str
    index: int
    vni: int
    port: int
    local: str | None
    underlay_index: int
    learning: bool
    mac: str
    mtu: int
    up: bool


@dataclass(frozen=True, order=True)
class FdbEntry:
    """A permanent FDB entry: frames for ``mac`` are sent to the VTEP at ``dst``."""

    mac: str
    dst: str


@dataclass(frozen=True, order=True)
class NeighEntry:
    """A permanent neighbour entry: ``ip`` resolves to ``mac`` without ARP."""

    ip: str
    mac: str


@dataclass(frozen=True, order=True)
class OnlinkRoute:
    """``dst via gw dev <vxlan> onlink`` in the main table."""

    dst: str
    gw: str


# ---- pure helpers ------------------------------------------------------------------


def stable_vtep_mac(seed: str) -> str:
    """A locally administered unicast MAC derived from ``seed`` (a stable node identity).

    The same seed gives the same MAC on every start, so other nodes' FDB and
    neighbour entries stay valid across agent restarts and reboots (flannel
    #1155, #1330, #1795: a random MAC per start breaks the data path until
    every peer has caught up).
    """
    return stable_mac(seed)


def is_local_unicast_mac(mac: str) -> bool:
    first = int(mac.split(":")[0], 16)
    return bool(first & 0x02) and not first & 0x01


def overlay_mtu(underlay_mtu: int, underlay_ipv6: bool = False) -> int:
    """The MTU a VXLAN device (and the pods behind it) can use over an underlay of ``underlay_mtu``."""
    mtu = underlay_mtu - (VXLAN_OVERHEAD_V6 if underlay_ipv6 else VXLAN_OVERHEAD_V4)
    if mtu < MIN_MTU:
        raise ValueError(
            f"underlay MTU {underlay_mtu} leaves {mtu} bytes for the overlay; at least {MIN_MTU} are needed"
        )
    return mtu


def _norm_mac(mac: str) -> str:
    return mac.lower()


# ---- the device ------------------------------------------------------------------


def vxlan_device(ipr: Any, name: str) -> VxlanDevice | None:
    """The VXLAN device called ``name``; None if there is no link of that name.

    Raises CNIError if a link of that name exists but is not a VXLAN device.
    """
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        msgs = ipr.link("get", ifname=name)
    except NetlinkError as exc:
        if exc.code == ENODEV:
            return None
        raise
    if not msgs:
        return None
    msg = msgs[0]
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    if kind != "vxlan":
        raise CNIError(
            ERR_INTERNAL,
            f"{name!r} exists but is a {kind or 'non-VXLAN'} device, not vxlan",
            "pick another VXLAN device name or remove that interface",
        )
    data = info.get_attr("IFLA_INFO_DATA")

    def attr(key: str, default: Any = None) -> Any:
        value = data.get_attr(key) if data is not None else None
        return default if value is None else value

    return VxlanDevice(
        name=name,
        index=msg["index"],
        vni=attr("IFLA_VXLAN_ID", 0),
        port=attr("IFLA_VXLAN_PORT", 0),
        local=attr("IFLA_VXLAN_LOCAL") or attr("IFLA_VXLAN_LOCAL6"),
        underlay_index=attr("IFLA_VXLAN_LINK", 0),
        learning=bool(attr("IFLA_VXLAN_LEARNING", 1)),
        mac=_norm_mac(msg.get_attr("IFLA_ADDRESS") or ""),
        mtu=msg.get_attr("IFLA_MTU") or 0,
        up=bool(msg["flags"] & 0x1),
    )


def ensure_vxlan(
    ipr: Any,
    name: str,
    vni: int,
    port: int,
    local_ip: str,
    underlay_index: int,
    mtu: int,
    mac: str,
    learning: bool = False,
) -> VxlanDevice:
    """Make ``name`` a VXLAN device with exactly these settings, up.

    A device whose VNI, port, local address, underlay link or learning flag
    differ is deleted and created again (the kernel cannot change those in
    place); MAC and MTU are changed in place. Returns the device as it is now.
    """
    from pyroute2.netlink.exceptions import NetlinkError

    local = ipaddress.ip_address(local_ip)
    mac = _norm_mac(mac)
    current = vxlan_device(ipr, name)
    if current is not None:
        same = (
            current.vni == vni
            and current.port == port
            and current.learning == learning
            and current.local is not None
            and ipaddress.ip_address(current.local) == local
            and (not underlay_index or current.underlay_index == underlay_index)
        )
        if not same:
            try:
                ipr.link("del", index=current.index)
            except NetlinkError as exc:
                if exc.code != ENODEV:
                    raise CNIError(ERR_INTERNAL, f"cannot replace VXLAN device {name!r}: {describe(exc)}") from None
            current = None
    if current is None:
        spec: dict[str, Any] = {
            "ifname": name,
            "kind": "vxlan",
            "vxlan_id": vni,
            "vxlan_port": port,
            "vxlan_learning": 1 if learning else 0,
            "address": mac,
            "mtu": mtu,
        }
        spec["vxlan_local6" if local.version == 6 else "vxlan_local"] = str(local)
        if underlay_index:
            spec["vxlan_link"] = underlay_index
        try:
            ipr.link("add", **spec)
        except NetlinkError as exc:
            hint = ""
            if exc.code == EEXIST:
                hint = (
                    f"another VXLAN device may already use VNI {vni} on UDP port {port}; "
                    f"remove it or use another VNI/port"
                )
            raise CNIError(
                ERR_INTERNAL,
                f"cannot create VXLAN device {name!r} (VNI {vni}, port {port}, local {local}): {describe(exc)}",
                hint,
            ) from None
    else:
        if current.mac != mac:
            ipr.link("set", index=current.index, address=mac)
        if current.mtu != mtu:
            ipr.link("set", index=current.index, mtu=mtu)
    link = get_link(ipr, name, "VXLAN device")
    if not link.is_up:
        set_up(ipr, link.index)
    device = vxlan_device(ipr, name)
    assert device is not None
    return device


def underlay_link_for(ipr: Any, address: str) -> Link | None:
    """The link that holds ``address`` (the node's public IP), or None."""
    wanted = ipaddress.ip_address(address)
    family = AF_INET6 if wanted.version == 6 else AF_INET
    for msg in ipr.get_addr(family=family):
        held = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if held is not None and ipaddress.ip_address(held) == wanted:
            return _link_by_index(ipr, msg["index"])
    return None


def _link_by_index(ipr: Any, index: int) -> Link | None:
    from cni_plugins.kernel.ip import link_by_index

    return link_by_index(ipr, index)


# ---- FDB ---------------------------------------------------------------------------


def fdb_entries(ipr: Any, index: int) -> list[FdbEntry]:
    """The permanent unicast FDB entries with a remote VTEP on the VXLAN device ``index``."""
    out = []
    for msg in ipr.neigh("dump", family=AF_BRIDGE, ifindex=index):
        if msg["ifindex"] != index or not msg["state"] & NUD_PERMANENT:
            continue
        mac, dst = msg.get_attr("NDA_LLADDR"), msg.get_attr("NDA_DST")
        if not mac or not dst or int(mac.split(":")[0], 16) & 0x01:
            continue  # the all-zeros default / multicast entries are not per-node entries
        out.append(FdbEntry(_norm_mac(mac), str(ipaddress.ip_address(dst))))
    return sorted(out)


def set_fdb(ipr: Any, index: int, entry: FdbEntry) -> None:
    """`bridge fdb replace MAC dev DEV dst IP self permanent`: one VTEP per MAC."""
    ipr.neigh(
        "replace", family=AF_BRIDGE, ifindex=index, lladdr=entry.mac, dst=entry.dst, state=NUD_PERMANENT, flags=NTF_SELF
    )


def del_fdb(ipr: Any, index: int, entry: FdbEntry) -> bool:
    """Delete one FDB entry; False if it was not there."""
    return _ignore_missing(
        lambda: ipr.neigh(
            "del", family=AF_BRIDGE, ifindex=index, lladdr=entry.mac, dst=entry.dst, state=NUD_PERMANENT, flags=NTF_SELF
        )
    )


# ---- neighbours ----------------------------------------------------------------------


def neigh_entries(ipr: Any, index: int, family: int = 4) -> list[NeighEntry]:
    """The permanent neighbour entries of one family (4/6) on the device ``index``."""
    out = []
    for msg in ipr.neigh("dump", family=AF_INET if family == 4 else AF_INET6, ifindex=index):
        if msg["ifindex"] != index or not msg["state"] & NUD_PERMANENT:
            continue
        dst, mac = msg.get_attr("NDA_DST"), msg.get_attr("NDA_LLADDR")
        if dst and mac:
            out.append(NeighEntry(str(ipaddress.ip_address(dst)), _norm_mac(mac)))
    return sorted(out)


def set_neigh(ipr: Any, index: int, entry: NeighEntry) -> None:
    """`ip neigh replace IP lladdr MAC dev DEV nud permanent`."""
    ipr.neigh(
        "replace",
        ifindex=index,
        dst=entry.ip,
        lladdr=entry.mac,
        state=NUD_PERMANENT,
        family=AF_INET6 if ipaddress.ip_address(entry.ip).version == 6 else AF_INET,
    )


def del_neigh(ipr: Any, index: int, entry: NeighEntry) -> bool:
    return _ignore_missing(
        lambda: ipr.neigh(
            "del",
            ifindex=index,
            dst=entry.ip,
            family=AF_INET6 if ipaddress.ip_address(entry.ip).version == 6 else AF_INET,
        )
    )


# ---- onlink routes ----------------------------------------------------------------------


def onlink_routes(ipr: Any, index: int, family: int = 4) -> list[OnlinkRoute]:
    """Routes in the main table through the device ``index`` that have a gateway."""
    out = []
    for msg in ipr.route("dump", family=AF_INET if family == 4 else AF_INET6):
        table = msg.get_attr("RTA_TABLE") or msg["table"]
        if table != RT_TABLE_MAIN or msg.get_attr("RTA_OIF") != index:
            continue
        gw = msg.get_attr("RTA_GATEWAY")
        if not gw:
            continue
        dst = msg.get_attr("RTA_DST") or ("0.0.0.0" if family == 4 else "::")
        net = ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)
        out.append(OnlinkRoute(str(net), str(ipaddress.ip_address(gw))))
    return sorted(out)


def set_onlink_route(ipr: Any, index: int, route: OnlinkRoute) -> None:
    """`ip route replace DST via GW dev DEV onlink` (the device must be up)."""
    net = ipaddress.ip_network(route.dst)
    ipr.route(
        "replace",
        dst=str(net.network_address),
        dst_len=net.prefixlen,
        gateway=route.gw,
        oif=index,
        flags=RTNH_F_ONLINK,
        proto=RTPROT_BOOT,
        table=RT_TABLE_MAIN,
        family=AF_INET6 if net.version == 6 else AF_INET,
    )


def del_onlink_route(ipr: Any, index: int, route: OnlinkRoute) -> bool:
    net = ipaddress.ip_network(route.dst)
    return _ignore_missing(
        lambda: ipr.route(
            "del",
            dst=str(net.network_address),
            dst_len=net.prefixlen,
            gateway=route.gw,
            oif=index,
            table=RT_TABLE_MAIN,
            family=AF_INET6 if net.version == 6 else AF_INET,
        )
    )


def _ignore_missing(call: Any) -> bool:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        call()
    except NetlinkError as exc:
        if exc.code in (ENOENT, ESRCH, ENODEV):
            return False
        raise
    return True
