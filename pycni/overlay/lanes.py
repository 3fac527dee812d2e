"""A node's VXLAN devices, one per underlay it uses: the lanes its pods' traffic takes to other nodes.

    MAIN  pycni.<VNI>   on --public-ip's underlay (IPv4 or IPv6); carries every pod family, except that
    V6    pycni6.<VNI>  on --public-ipv6's underlay (a dual-stack node with an IPv4 --public-ip and an IPv6 one)
                        carries the IPv6 pods' traffic to the nodes that have an IPv6 underlay too

(flannel keeps flannel.1 and flannel-v6.1 the same way). Each lane has its own
VTEP MAC (derived from the node's identity and that underlay address, so it never
changes), MTU (its underlay's MTU minus the VXLAN overhead of that underlay
family), and holds this node's VTEP address of each pod family it carries for
the node: the network address of the node's subnet of that family, as a host
address (/32, /128), which the other nodes' neighbour and route entries point at.

``ensure`` creates or repairs a lane's device; ``drift`` lists what differs from
what the node owns. Both act through the caller's netlink socket, in its
namespace.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from cni_plugins.kernel import ip as kip
from cni_plugins.kernel import vxlan as kvx
from pycni.overlay.entries import Entries
from pycni.overlay.reconcile import MAIN, V6


@dataclass
class Lane:
    kind: str  # MAIN or V6
    name: str  # the VXLAN device
    public_ip: str  # the local underlay address
    vtep_mac: str
    underlay_device: str = ""  # a link the operator named (--underlay-device, main lane only)
    families: list[int] = field(default_factory=list)  # pod families whose VTEP address of this node lives here
    index: int = 0
    mtu: int = 0
    underlay: kip.Link | None = None
    missing: bool = False  # its underlay link is gone (the device went with it)
    entries: Entries | None = None
    direct_nets: tuple = ()  # direct routing: the underlay link's own subnets (remotes there skip VXLAN)

    @property
    def underlay_version(self) -> int:
        return ipaddress.ip_address(self.public_ip).version


def find_underlay(ipr: Any, lane: Lane) -> kip.Link | None:
    """The lane's underlay link as it is now: the one the operator named, else the holder of its address."""
    if lane.underlay_device:
        return kip.find_link(ipr, lane.underlay_device)
    return kvx.underlay_link_for(ipr, lane.public_ip)


def connected_networks(ipr: Any, underlay: kip.Link) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """The subnets the underlay link is on, each family (not host prefixes, not IPv6 link-local): a node whose
    underlay address is inside one is a neighbour on the wire, reachable without a gateway."""
    nets = set()
    for address, _flags in kip.addresses(ipr, underlay.index):
        iface = ipaddress.ip_interface(str(address))
        if iface.network.prefixlen < iface.max_prefixlen and not iface.ip.is_link_local:
            nets.add(iface.network)
    return tuple(sorted(nets, key=lambda n: (n.version, n)))


def lane_mtu(lane: Lane, underlay: kip.Link) -> int:
    """ValueError when the underlay's MTU leaves too little for the overlay."""
    return kvx.overlay_mtu(underlay.mtu, lane.underlay_version == 6)


def vtep_addresses(lane: Lane, subnets: list[str]) -> list[str]:
    """This node's VTEP address of each family the lane carries for it, as host addresses."""
    out = []
    for text in subnets:
        net = ipaddress.ip_network(text)
        if net.version in lane.families:
            out.append(f"{net.network_address}/{net.max_prefixlen}")
    return out


def ensure(ipr: Any, lane: Lane, vni: int, port: int, underlay: kip.Link, mtu: int) -> kvx.VxlanDevice:
    """Create the lane's device, or set it right (kvx.ensure_vxlan re-creates what cannot change in place)."""
    device = kvx.ensure_vxlan(
        ipr, lane.name, vni, port, lane.public_ip, underlay.index, mtu, lane.vtep_mac, learning=False
    )
    lane.index, lane.mtu, lane.underlay = device.index, mtu, underlay
    return device


def drift(ipr: Any, lane: Lane, vni: int, port: int, underlay: kip.Link, mtu: int, addresses: list[str]) -> list[str]:
    """What differs between the lane's device and what the node owns (empty: nothing)."""
    name = lane.name
    device = kvx.vxlan_device(ipr, name)
    if device is None:
        return [f"{name} is missing"]
    out = []
    local = ipaddress.ip_address(device.local) if device.local else None
    for what, have, want in (
        ("VNI", device.vni, vni),
        ("port", device.port, port),
        ("local address", local, ipaddress.ip_address(lane.public_ip)),
        ("underlay link", device.underlay_index, underlay.index),
        ("learning", device.learning, False),
        ("MAC", device.mac, lane.vtep_mac),
        ("MTU", device.mtu, mtu),
        ("up", device.up, True),
    ):
        if have != want:
            out.append(f"{name} {what} is {have}, not {want}")
    for text in addresses:
        address = ipaddress.ip_interface(text)
        if not any(a == address for a, _f in kip.addresses(ipr, device.index, address.version)):
            out.append(f"{name} lacks its address {address}")
    return out


__all__ = ["MAIN", "V6", "Lane", "drift", "ensure", "find_underlay", "lane_mtu", "vtep_addresses"]
