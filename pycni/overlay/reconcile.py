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


@dataclass(frozen=True)
class Own:
    """This node, as the judgement of other leases needs it."""

    public_ip: ipaddress._BaseAddress
    subnet: ipaddress._BaseNetwork
    network: ipaddress._BaseNetwork
    vtep_mac: str = ""

    @classmethod
    def of(cls, own_public_ip: str, own_subnet: str, network: str, own_vtep_mac: str = "") -> "Own":
        return cls(ipaddress.ip_address(own_public_ip), ipaddress.ip_network(own_subnet),
                   ipaddress.ip_network(network), own_vtep_mac.strip().lower())


def judge(lease: LeaseLike, own: Own) -> Remote | str | None:
    """One lease on its own: the Remote to program, the reason it is skipped, or None for this node's own.

    What a lease cannot tell on its own (another lease claiming the same VTEP
    MAC) is left to the caller: ``wanted_state`` and ``RemoteTable``.
    """
    try:
        subnet = ipaddress.ip_network(str(lease.subnet), strict=True)
    except ValueError:
        return f"{_short(lease.subnet)}: unreadable lease (the subnet is not a network)"
    public_ip = _underlay(lease.public_ip)
    if public_ip == own.public_ip or subnet == own.subnet:
        return None
    mac = str(lease.vtep_mac).strip().lower()
    cluster = own.network
    if public_ip is None:
        return f"{subnet}: underlay address {_short(lease.public_ip)} is not a unicast IP address without a zone"
    if not _MAC_RE.match(mac) or int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        return f"{subnet}: VTEP MAC {_short(lease.vtep_mac)} is not a unicast MAC"
    if subnet.version != cluster.version or not subnet.subnet_of(cluster):  # type: ignore[arg-type]
        return f"{subnet}: outside the cluster network {cluster}"
    if subnet.overlaps(own.subnet):
        return f"{subnet}: overlaps this node's subnet {own.subnet}"
    if public_ip.version != own.public_ip.version:
        return f"{subnet}: underlay {public_ip} is IPv{public_ip.version}, this node's is IPv{own.public_ip.version}"
    if public_ip.version == cluster.version and public_ip in cluster:
        return f"{subnet}: underlay {public_ip} is inside the cluster network {cluster} (a pod address)"
    if own.vtep_mac and mac == own.vtep_mac:
        return f"{subnet}: VTEP MAC {mac} is this node's own"
    return Remote(str(subnet), str(public_ip), mac, lease.node_name or "")


def _claimed_twice(remote: Remote, others: Iterable[str]) -> str:
    return (f"{remote.subnet}: VTEP MAC {remote.vtep_mac} is also claimed by {', '.join(sorted(others))}; none of "
            f"them is programmed")


def wanted_state(leases: Iterable[LeaseLike], own_public_ip: str, own_subnet: str, network: str, *,
                 own_vtep_mac: str = "") -> Wanted:
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
    """The remote nodes this node programs, kept one lease at a time (the incremental reconcile).

    ``update(key, lease)`` (``None``: the key is gone) returns the ``Delta``
    for that one change: O(1) in the number of nodes, apart from the other
    leases that share its VTEP MAC (they become programmable again, or stop
    being). ``wanted()`` is the whole picture, for a full reconcile.
    """

    def __init__(self, own: Own) -> None:
        self.own = own
        self._candidates: dict[str, Remote] = {}   # key -> a lease that passed judge()
        self._skipped: dict[str, str] = {}         # key -> why it is not programmed (judge, or its MAC)
        self._by_mac: dict[str, set[str]] = {}     # VTEP MAC -> keys of the candidates claiming it
        self._members: dict[str, int] = {}         # underlay address -> programmed remotes there
        # The programmed remotes by what identifies each of their kernel entries (for the netlink monitor).
        self.by_fdb_mac: dict[str, Remote] = {}
        self.by_vtep_address: dict[str, Remote] = {}
        self.by_subnet: dict[str, Remote] = {}

    def programmed(self, key: str) -> Remote | None:
        remote = self._candidates.get(key)
        return remote if remote is not None and len(self._by_mac.get(remote.vtep_mac, ())) == 1 else None

    @property
    def members(self) -> set[str]:
        return set(self._members)

    def update(self, key: str, lease: LeaseLike | None) -> Delta:
        old = self._candidates.get(key)
        judged = judge(lease, self.own) if lease is not None else None
        new = judged if isinstance(judged, Remote) else None
        # Only the claimants of the old and the new VTEP MAC can change state: compare them before and after.
        macs = {r.vtep_mac for r in (old, new) if r is not None}
        before = self._programmed_among(macs, key)
        if old is not None:
            claimants = self._by_mac[old.vtep_mac]
            claimants.discard(key)
            if not claimants:
                del self._by_mac[old.vtep_mac]
            del self._candidates[key]
        self._skipped.pop(key, None)
        if isinstance(judged, str):
            self._skipped[key] = judged
        elif new is not None:
            self._candidates[key] = new
            self._by_mac.setdefault(new.vtep_mac, set()).add(key)
        after = self._programmed_among(macs, key)
        delta = Delta(remove=[r for k, r in before.items() if after.get(k) != r],
                      add=[r for k, r in after.items() if before.get(k) != r])
        for remote in delta.remove:
            self._count(remote, -1)
        for remote in delta.add:
            self._count(remote, +1)
        return delta

    def _programmed_among(self, macs: set[str], key: str) -> dict[str, Remote]:
        """key -> programmed remote, for ``key`` and every claimant of ``macs``."""
        keys = {key}.union(*(self._by_mac.get(mac, set()) for mac in macs))
        out = {}
        for k in keys:
            remote = self.programmed(k)
            if remote is not None:
                out[k] = remote
        return out

    def _count(self, remote: Remote, step: int) -> None:
        """``remote`` is programmed (+1) or not any more (-1): the member count and the entry indexes follow."""
        count = self._members.get(remote.public_ip, 0) + step
        if count > 0:
            self._members[remote.public_ip] = count
        else:
            self._members.pop(remote.public_ip, None)
        indexes = ((self.by_fdb_mac, remote.vtep_mac), (self.by_vtep_address, remote.vtep_address),
                   (self.by_subnet, remote.subnet))
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
                    remote = self._candidates[key]
                    reasons.add(_claimed_twice(remote, {self._candidates[k].subnet for k in claimants} - {remote.subnet}))
        return sorted(reasons)

    def wanted(self) -> Wanted:
        out = Wanted()
        for key in self._candidates:
            remote = self.programmed(key)
            if remote is not None:
                out.remotes.append(remote)
                out.fdb.add(remote.fdb)
                out.neigh.add(remote.neigh)
                out.routes.add(remote.route)
                out.members.add(remote.public_ip)
        out.remotes.sort(key=lambda r: _net_key(r.subnet))
        out.skipped = self.skipped()
        return out


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


def plan(wanted: Wanted, fdb: Iterable[FdbEntry], neigh: Iterable[NeighEntry],
         routes: Iterable[OnlinkRoute]) -> Plan:
    """The changes that make the VXLAN device's entries match ``wanted``.

    Every permanent entry on the device is the agent's own (the device is),
    so anything not wanted is removed: stale nodes, changed MACs, entries
    written by hand.
    """
    return Plan(fdb=diff(wanted.fdb, fdb), neigh=diff(wanted.neigh, neigh), routes=diff(wanted.routes, routes))
