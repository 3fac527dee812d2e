"""What the kernel should hold for the other nodes, and the difference to what it holds.

Pure functions of the cluster's leases and of listings of kernel entries, so
the decisions of the reconcile loop are testable without root. The node
agent (``node.py``) lists, calls ``plan()`` and applies the result.
"""
from __future__ import annotations

import ipaddress
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
    members: set[str] = field(default_factory=set)     # underlay addresses of every leased node, this one too
    skipped: list[str] = field(default_factory=list)   # why a lease was not turned into entries


def wanted_state(leases: Iterable[LeaseLike], own_public_ip: str, own_subnet: str, network: str) -> Wanted:
    """The entries this node wants for ``leases`` (its own lease excluded).

    A lease is skipped (with a reason in ``skipped``) when it is unusable here:
    outside the cluster network, of the other underlay family than this node,
    overlapping this node's subnet, or sharing a VTEP MAC with a lease that
    sorts earlier (an FDB entry maps one MAC to one VTEP, so two would flap).
    """
    own_ip = ipaddress.ip_address(own_public_ip)
    own_net = ipaddress.ip_network(own_subnet)
    cluster = ipaddress.ip_network(network)
    out = Wanted()
    seen_macs: dict[str, str] = {}
    candidates = []
    for lease in leases:
        try:
            public_ip = ipaddress.ip_address(lease.public_ip)
            subnet = ipaddress.ip_network(lease.subnet, strict=True)
        except ValueError:
            out.skipped.append(f"{lease.subnet}: unreadable lease")
            continue
        out.members.add(str(public_ip))
        candidates.append((subnet.version, int(subnet.network_address), subnet.prefixlen, subnet, public_ip, lease))
    for _v, _a, _p, subnet, public_ip, lease in sorted(candidates, key=lambda c: c[:3]):
        if public_ip == own_ip or subnet == own_net:
            continue
        if subnet.version != cluster.version or not subnet.subnet_of(cluster):  # type: ignore[arg-type]
            out.skipped.append(f"{subnet}: outside the cluster network {cluster}")
            continue
        if subnet.overlaps(own_net):
            out.skipped.append(f"{subnet}: overlaps this node's subnet {own_net}")
            continue
        if public_ip.version != own_ip.version:
            out.skipped.append(f"{subnet}: underlay {public_ip} is IPv{public_ip.version}, this node's is "
                               f"IPv{own_ip.version}")
            continue
        mac = lease.vtep_mac.lower()
        if mac in seen_macs:
            out.skipped.append(f"{subnet}: VTEP MAC {mac} is already used by {seen_macs[mac]}")
            continue
        seen_macs[mac] = str(subnet)
        remote = Remote(str(subnet), str(public_ip), mac, lease.node_name or "")
        out.remotes.append(remote)
        out.fdb.add(remote.fdb)
        out.neigh.add(remote.neigh)
        out.routes.add(remote.route)
    return out


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
