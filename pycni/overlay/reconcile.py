"""What the kernel should hold for the other nodes, and the difference to what it holds.

Pure functions of the cluster's leases and of listings of kernel entries, so
the decisions of the reconcile loop are testable without root. The node
agent (``node.py``) lists, calls ``plan()`` and applies the result.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Generic, Iterable, Protocol, TypeVar

from cni_plugins.kernel.vxlan import FdbEntry, NeighEntry, OnlinkRoute

T = TypeVar("T")


class LeaseLike(Protocol):
    subnet: str
    public_ip: str
    vtep_mac: str
    node_name: str


@dataclass(frozen=True, order=True)
class Remote:
    """Another node as this node's data path needs it."""

    subnet: str
    public_ip: str
    vtep_mac: str
    node_name: str = ""

    @property
    def vtep_address(self) -> str:
        """The remote VXLAN device's address: its subnet's network address (flannel's layout)."""
        return str(ipaddress.ip_network(self.subnet).network_address)

    @property
    def fdb(self) -> FdbEntry:
        return FdbEntry(self.vtep_mac, self.public_ip)

    @property
    def neigh(self) -> NeighEntry:
        return NeighEntry(self.vtep_address, self.vtep_mac)

    @property
    def route(self) -> OnlinkRoute:
        return OnlinkRoute(self.subnet, self.vtep_address)


@dataclass
class Wanted:
    remotes: list[Remote] = field(default_factory=list)
    fdb: set[FdbEntry] = field(default_factory=set)
    neigh: set[NeighEntry] = field(default_factory=set)
    routes: set[OnlinkRoute] = field(default_factory=set)
    members: set[str] = field(default_factory=set)     # underlay addresses of the accepted remotes (not this node)
    skipped: list[str] = field(default_factory=list)   # why a lease was not turned into entries (sorted)


_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def wanted_state(leases: Iterable[LeaseLike], own_public_ip: str, own_subnet: str, network: str, *,
                 own_vtep_mac: str = "") -> Wanted:
    """The entries this node wants for ``leases`` (its own lease excluded).

    A lease with this node's public IP or subnet is this node's (skipped
    silently). Any other lease is skipped, with a reason in ``skipped``, when
    it is unusable here: an unreadable subnet or underlay address (a zone, not
    unicast, inside the cluster network), a VTEP MAC that is not a unicast
    MAC, a subnet outside the cluster network or overlapping this node's, an
    underlay of the other family than this node's, this node's own VTEP MAC
    (``own_vtep_mac``), or a VTEP MAC that another lease claims too: an FDB
    entry maps one MAC to one VTEP, so none of the claimants is programmed
    (which one is genuine cannot be told from here).

    ``members`` holds the underlay addresses of the accepted remotes only;
    the caller adds its own. ``skipped`` is sorted, so the same leases give
    the same list on every call (warn when it changes).
    """
    own_ip = ipaddress.ip_address(own_public_ip)
    own_net = ipaddress.ip_network(own_subnet)
    cluster = ipaddress.ip_network(network)
    own_mac = own_vtep_mac.strip().lower()
    out = Wanted()
    skipped: set[str] = set()
    usable: list[tuple[ipaddress._BaseNetwork, ipaddress._BaseAddress, str, LeaseLike]] = []
    claims: dict[str, set[str]] = {}    # VTEP MAC -> subnets of the other leases that claim it
    for lease in leases:
        try:
            subnet = ipaddress.ip_network(str(lease.subnet), strict=True)
        except ValueError:
            skipped.add(f"{_short(lease.subnet)}: unreadable lease (the subnet is not a network)")
            continue
        public_ip = _underlay(lease.public_ip)
        if public_ip == own_ip or subnet == own_net:
            continue
        mac = str(lease.vtep_mac).strip().lower()
        if public_ip is None:
            skipped.add(f"{subnet}: underlay address {_short(lease.public_ip)} is not a unicast IP address "
                        f"without a zone")
            continue
        if not _MAC_RE.match(mac) or int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
            skipped.add(f"{subnet}: VTEP MAC {_short(lease.vtep_mac)} is not a unicast MAC")
            continue
        claims.setdefault(mac, set()).add(str(subnet))
        usable.append((subnet, public_ip, mac, lease))
    usable.sort(key=lambda u: (u[0].version, int(u[0].network_address), u[0].prefixlen))
    for subnet, public_ip, mac, lease in usable:
        if subnet.version != cluster.version or not subnet.subnet_of(cluster):  # type: ignore[arg-type]
            skipped.add(f"{subnet}: outside the cluster network {cluster}")
            continue
        if subnet.overlaps(own_net):
            skipped.add(f"{subnet}: overlaps this node's subnet {own_net}")
            continue
        if public_ip.version != own_ip.version:
            skipped.add(f"{subnet}: underlay {public_ip} is IPv{public_ip.version}, this node's is "
                        f"IPv{own_ip.version}")
            continue
        if public_ip.version == cluster.version and public_ip in cluster:
            skipped.add(f"{subnet}: underlay {public_ip} is inside the cluster network {cluster} (a pod address)")
            continue
        if own_mac and mac == own_mac:
            skipped.add(f"{subnet}: VTEP MAC {mac} is this node's own")
            continue
        others = sorted(claims[mac] - {str(subnet)})
        if others:
            skipped.add(f"{subnet}: VTEP MAC {mac} is also claimed by {', '.join(others)}; none of them is "
                        f"programmed")
            continue
        remote = Remote(str(subnet), str(public_ip), mac, lease.node_name or "")
        out.remotes.append(remote)
        out.fdb.add(remote.fdb)
        out.neigh.add(remote.neigh)
        out.routes.add(remote.route)
        out.members.add(remote.public_ip)
    out.skipped = sorted(skipped)
    return out


def _underlay(value: object) -> ipaddress._BaseAddress | None:
    """The unicast underlay address in value, or None (a zone, not an address, not unicast)."""
    if not isinstance(value, str) or "%" in value:
        return None
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if address.is_unspecified or address.is_loopback or address.is_multicast or address == _BROADCAST:
        return None
    return address


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class Diff(Generic[T]):
    add: list[T] = field(default_factory=list)
    remove: list[T] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)


def diff(wanted: Iterable[T], present: Iterable[T]) -> Diff[T]:
    """What to add and what to remove so that ``present`` becomes ``wanted`` (sorted, deterministic)."""
    wanted_set, present_set = set(wanted), set(present)
    return Diff(add=sorted(wanted_set - present_set), remove=sorted(present_set - wanted_set))  # type: ignore[type-var]


@dataclass
class Plan:
    fdb: Diff[FdbEntry]
    neigh: Diff[NeighEntry]
    routes: Diff[OnlinkRoute]

    def __bool__(self) -> bool:
        return bool(self.fdb or self.neigh or self.routes)

    def summary(self) -> str:
        parts = []
        for name, d in (("fdb", self.fdb), ("neigh", self.neigh), ("route", self.routes)):
            if d.add:
                parts.append(f"+{len(d.add)} {name}")
            if d.remove:
                parts.append(f"-{len(d.remove)} {name}")
        return ", ".join(parts) or "no change"


def plan(wanted: Wanted, fdb: Iterable[FdbEntry], neigh: Iterable[NeighEntry],
         routes: Iterable[OnlinkRoute]) -> Plan:
    """The changes that make the VXLAN device's entries match ``wanted``.

    Every permanent entry on the device is the agent's own (the device is),
    so anything not wanted is removed: stale nodes, changed MACs, entries
    written by hand.
    """
    return Plan(fdb=diff(wanted.fdb, fdb), neigh=diff(wanted.neigh, neigh), routes=diff(wanted.routes, routes))
