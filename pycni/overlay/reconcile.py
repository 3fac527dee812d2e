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
    """Another node's subnet of one family as this node's data path needs it.

    Through the VXLAN device (an FDB entry, a neighbour and an onlink route),
    or, with direct routing, a plain route via ``direct`` (the remote node's
    underlay address of that family, on this node's underlay subnet).
    """

    subnet: str
    public_ip: str
    vtep_mac: str
    node_name: str = ""
    direct: str = ""  # the next hop on the underlay when routed directly ("": through VXLAN)

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
        return OnlinkRoute(self.subnet, self.direct or self.vtep_address)


@dataclass
class Wanted:
    remotes: list[Remote] = field(default_factory=list)
    fdb: set[FdbEntry] = field(default_factory=set)
    neigh: set[NeighEntry] = field(default_factory=set)
    routes: set[OnlinkRoute] = field(default_factory=set)
    direct_routes: set[OnlinkRoute] = field(default_factory=set)  # via the underlay, without VXLAN
    members: set[str] = field(default_factory=set)  # underlay addresses of the accepted remotes (not this node)
    skipped: list[str] = field(default_factory=list)  # why a lease was not turned into entries (sorted)


_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


MAIN, V6 = "main", "v6"  # the VXLAN device on --public-ip's underlay; the one on --public-ipv6's


@dataclass(frozen=True)
class Own:
    """This node as one of its VXLAN devices (a lane) judges other leases.

    A lane is the device on one underlay: ``MAIN`` on --public-ip (IPv4 or
    IPv6), ``V6`` on --public-ipv6 when the node has one. The main lane carries
    every pod family, except that IPv6 pods of a remote that has an IPv6
    underlay too go through the V6 lane when this node has one (``v6_lane``).
    """

    public_ip: ipaddress._BaseAddress  # this lane's local underlay address
    subnets: tuple[ipaddress._BaseNetwork, ...]  # this node's pod subnets, one per family
    networks: tuple[ipaddress._BaseNetwork, ...]  # the cluster's pod networks, one per family
    vtep_mac: str = ""  # this lane's VTEP MAC
    lane: str = MAIN
    v6_lane: bool = False  # (main lane) the node has a V6 lane too
    node_ips: frozenset = frozenset()  # every underlay address of this node
    direct_nets: tuple[ipaddress._BaseNetwork, ...] = ()  # direct routing: the underlay's own subnets

    @classmethod
    def of(cls, own_public_ip: str, own_subnet: str, network: str, own_vtep_mac: str = "") -> "Own":
        """One family on one lane (the IPv4-only overlay)."""
        ip = ipaddress.ip_address(own_public_ip)
        return cls(
            ip,
            (ipaddress.ip_network(own_subnet),),
            (ipaddress.ip_network(network),),
            own_vtep_mac.strip().lower(),
            node_ips=frozenset({ip}),
        )

    def own_subnet(self, version: int) -> ipaddress._BaseNetwork | None:
        return next((s for s in self.subnets if s.version == version), None)


def _lease_subnet(lease: LeaseLike, version: int) -> str:
    """The subnet of one family a lease holds ("" when none): IPv6 in ``ipv6_subnet`` when the lease is dual-stack."""
    subnet = str(lease.subnet or "")
    ipv6 = str(getattr(lease, "ipv6_subnet", "") or "")
    if version == 6:
        if ipv6:
            return ipv6
        return subnet if ":" in subnet else ""
    return subnet if subnet and ":" not in subnet else ""


def _lane_of(lease: LeaseLike, own: Own) -> tuple[object, str, list[int]]:
    """(the remote's underlay address on this lane, its VTEP MAC there, the pod families carried here)."""
    ipv6_public = str(getattr(lease, "public_ipv6", "") or "")
    ipv6_mac = str(getattr(lease, "vtep_mac6", "") or "")
    families = [net.version for net in own.networks]
    if own.lane == V6:
        return ipv6_public, ipv6_mac, [6] if ipv6_public and ipv6_mac and 6 in families else []
    if own.v6_lane and ipv6_public and ipv6_mac:
        families = [v for v in families if v != 6]  # its IPv6 pods go through the V6 lane
    return lease.public_ip, lease.vtep_mac, families


def _direct_hop(lease: LeaseLike, version: int, own: Own) -> str:
    """With direct routing: the remote's underlay address of the pod family ``version`` when it is on one of
    this node's underlay subnets (a route via it needs no encapsulation); "" otherwise."""
    if not own.direct_nets:
        return ""
    for text in (lease.public_ip, getattr(lease, "public_ipv6", "") or ""):
        address = _underlay(text)
        if (
            address is not None
            and address.version == version
            and address not in own.node_ips
            and any(address.version == net.version and address in net for net in own.direct_nets)
        ):
            return str(address)
    return ""


def judge(lease: LeaseLike, own: Own) -> tuple[Remote, ...] | str | None:
    """One lease on one lane: the Remotes to program (one per pod family carried), the reason it is skipped, or
    None for this node's own lease (or a lease with nothing for this lane).

    What a lease cannot tell on its own (another lease claiming the same VTEP
    MAC) is left to the caller: ``wanted_state`` and ``RemoteTable``.
    """
    subnets: list[ipaddress._BaseNetwork] = []
    for version in (4, 6):
        text = _lease_subnet(lease, version)
        if not text:
            continue
        try:
            subnets.append(ipaddress.ip_network(text, strict=True))
        except ValueError:
            return f"{_short(text)}: unreadable lease (the subnet is not a network)"
    if not subnets:
        return f"{_short(lease.subnet)}: unreadable lease (no subnet)"
    label = "+".join(str(s) for s in subnets)
    ips = {_underlay(lease.public_ip), _underlay(getattr(lease, "public_ipv6", "") or "")} - {None}
    if ips & own.node_ips or any(s in own.subnets for s in subnets):
        return None
    public_text, mac, families = _lane_of(lease, own)
    if not families:
        return None
    public_ip = _underlay(public_text)
    mac = str(mac).strip().lower()
    if public_ip is None:
        return f"{label}: underlay address {_short(public_text)} is not a unicast IP address without a zone"
    if not _MAC_RE.match(mac) or int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        return f"{label}: VTEP MAC {_short(mac)} is not a unicast MAC"
    if public_ip.version != own.public_ip.version:
        return f"{label}: underlay {public_ip} is IPv{public_ip.version}, this node's is IPv{own.public_ip.version}"
    remotes = []
    for version in families:
        subnet = next((s for s in subnets if s.version == version), None)
        cluster = next((n for n in own.networks if n.version == version), None)
        if subnet is None or cluster is None:
            return f"{label}: no IPv{version} subnet, though the cluster has an IPv{version} network"
        if not subnet.subnet_of(cluster):  # type: ignore[arg-type]
            return f"{subnet}: outside the cluster network {cluster}"
        mine = own.own_subnet(version)
        if mine is not None and subnet.overlaps(mine):
            return f"{subnet}: overlaps this node's subnet {mine}"
        if public_ip.version == cluster.version and public_ip in cluster:
            return f"{subnet}: underlay {public_ip} is inside the cluster network {cluster} (a pod address)"
        remotes.append(
            Remote(str(subnet), str(public_ip), mac, lease.node_name or "", direct=_direct_hop(lease, version, own))
        )
    if own.vtep_mac and mac == own.vtep_mac:
        return f"{label}: VTEP MAC {mac} is this node's own"
    return tuple(remotes)


def _claimed_twice(remote: Remote, others: Iterable[str]) -> str:
    return (
        f"{remote.subnet}: VTEP MAC {remote.vtep_mac} is also claimed by {', '.join(sorted(others))}; none of "
        f"them is programmed"
    )


def wanted_state(
    leases: Iterable[LeaseLike], own_public_ip: str, own_subnet: str, network: str, *, own_vtep_mac: str = ""
) -> Wanted:
    """The entries this node wants for ``leases`` (its own lease excluded).

    A lease with this node's public IP or subnet is this node's (skipped
    silently). Any other lease is skipped, with a reason in ``skipped``, when
    it is unusable here (``judge``): an unreadable subnet or underlay address
    (a zone, not unicast, inside the cluster network), a VTEP MAC that is not
    a unicast MAC, a subnet outside the cluster network or overlapping this
    node's, an underlay of the other family than this node's, this node's own
    VTEP MAC (``own_vtep_mac``), or a VTEP MAC that another lease claims too:
    an FDB entry maps one MAC to one VTEP, so none of the claimants is
    programmed (which one is genuine cannot be told from here).

    ``members`` holds the underlay addresses of the accepted remotes only;
    the caller adds its own. ``skipped`` is sorted, so the same leases give
    the same list on every call (warn when it changes).
    """
    table = RemoteTable(Own.of(own_public_ip, own_subnet, network, own_vtep_mac))
    for index, lease in enumerate(leases):
        table.update(f"#{index}", lease)
    return table.wanted()


@dataclass
class Delta:
    """What one change to the leases changes in the kernel: remotes to remove, then remotes to add."""

    remove: list[Remote] = field(default_factory=list)
    add: list[Remote] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.remove or self.add)


class RemoteTable:
    """The remote nodes one lane programs, kept one lease at a time (the incremental reconcile).

    ``update(key, lease)`` (``None``: the key is gone) returns the ``Delta``
    for that one change: O(1) in the number of nodes, apart from the other
    leases that share its VTEP MAC (they become programmable again, or stop
    being). ``wanted()`` is the whole picture, for a full reconcile. A lease
    gives one Remote per pod family the lane carries; they share its VTEP.
    """

    def __init__(self, own: Own) -> None:
        self.own = own
        self._candidates: dict[str, tuple[Remote, ...]] = {}  # key -> a lease's remotes that passed judge()
        self._skipped: dict[str, str] = {}  # key -> why it is not programmed (judge, or its MAC)
        self._by_mac: dict[str, set[str]] = {}  # VTEP MAC -> keys of the candidates claiming it
        self._members: dict[str, int] = {}  # underlay address -> programmed remotes there
        # The programmed remotes by what identifies each of their kernel entries (for the netlink monitor).
        self.by_fdb_mac: dict[str, Remote] = {}
        self.by_vtep_address: dict[str, Remote] = {}
        self.by_subnet: dict[str, Remote] = {}

    def programmed(self, key: str) -> tuple[Remote, ...]:
        remotes = self._candidates.get(key, ())
        return remotes if remotes and len(self._by_mac.get(remotes[0].vtep_mac, ())) == 1 else ()

    @property
    def members(self) -> set[str]:
        return set(self._members)

    def update(self, key: str, lease: LeaseLike | None) -> Delta:
        old = self._candidates.get(key, ())
        judged = judge(lease, self.own) if lease is not None else None
        new = judged if isinstance(judged, tuple) else ()
        # Only the claimants of the old and the new VTEP MAC can change state: compare them before and after.
        macs = {remotes[0].vtep_mac for remotes in (old, new) if remotes}
        before = self._programmed_among(macs, key)
        if old:
            claimants = self._by_mac[old[0].vtep_mac]
            claimants.discard(key)
            if not claimants:
                del self._by_mac[old[0].vtep_mac]
            del self._candidates[key]
        self._skipped.pop(key, None)
        if isinstance(judged, str):
            self._skipped[key] = judged
        elif new:
            self._candidates[key] = new
            self._by_mac.setdefault(new[0].vtep_mac, set()).add(key)
        after = self._programmed_among(macs, key)
        delta = Delta(remove=[r for r in before - after], add=[r for r in after - before])
        delta.remove.sort(key=_remote_key)
        delta.add.sort(key=_remote_key)
        for remote in delta.remove:
            self._count(remote, -1)
        for remote in delta.add:
            self._count(remote, +1)
        return delta

    def _programmed_among(self, macs: set[str], key: str) -> set[Remote]:
        """The programmed remotes of ``key`` and of every claimant of ``macs``."""
        keys = {key}.union(*(self._by_mac.get(mac, set()) for mac in macs))
        return {remote for k in keys for remote in self.programmed(k)}

    def _count(self, remote: Remote, step: int) -> None:
        """``remote`` is programmed (+1) or not any more (-1): the member count and the entry indexes follow."""
        count = self._members.get(remote.public_ip, 0) + step
        if count > 0:
            self._members[remote.public_ip] = count
        else:
            self._members.pop(remote.public_ip, None)
        indexes = (
            ((self.by_subnet, remote.subnet),)
            if remote.direct
            else (
                (self.by_fdb_mac, remote.vtep_mac),
                (self.by_vtep_address, remote.vtep_address),
                (self.by_subnet, remote.subnet),
            )
        )
        for index, name in indexes:
            if step > 0:
                index[name] = remote
            elif index.get(name) == remote:
                del index[name]

    def skipped(self) -> list[str]:
        reasons = set(self._skipped.values())
        for claimants in self._by_mac.values():
            if len(claimants) > 1:
                for key in claimants:
                    remote = self._candidates[key][0]
                    others = {self._candidates[k][0].subnet for k in claimants} - {remote.subnet}
                    reasons.add(_claimed_twice(remote, others))
        return sorted(reasons)

    def wanted(self) -> Wanted:
        out = Wanted()
        for key in self._candidates:
            for remote in self.programmed(key):
                out.remotes.append(remote)
                out.members.add(remote.public_ip)
                if remote.direct:
                    out.direct_routes.add(remote.route)
                    continue
                out.fdb.add(remote.fdb)
                out.neigh.add(remote.neigh)
                out.routes.add(remote.route)
        out.remotes.sort(key=_remote_key)
        out.skipped = self.skipped()
        return out


def _remote_key(remote: Remote) -> tuple[int, int, int]:
    return _net_key(remote.subnet)


def _net_key(subnet: str) -> tuple[int, int, int]:
    net = ipaddress.ip_network(subnet)
    return net.version, int(net.network_address), net.prefixlen


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


def plan(wanted: Wanted, fdb: Iterable[FdbEntry], neigh: Iterable[NeighEntry], routes: Iterable[OnlinkRoute]) -> Plan:
    """The changes that make the VXLAN device's entries match ``wanted``.

    Every permanent entry on the device is the agent's own (the device is),
    so anything not wanted is removed: stale nodes, changed MACs, entries
    written by hand.
    """
    return Plan(fdb=diff(wanted.fdb, fdb), neigh=diff(wanted.neigh, neigh), routes=diff(wanted.routes, routes))
