"""The VXLAN device's entries for the other nodes: in full, one lease at a time, and one notification at a time.

Three ways the same entries are kept, from the most to the least work::

    reconcile()   the whole picture: dump FDB, neighbours and onlink routes, diff against every wanted
                  remote, write the difference. At start, after a re-list, on a periodic check, and when
                  netlink notifications were lost. With direct routing, the routes via remote nodes on
                  the underlay subnet live on the underlay link: only those into a cluster network there
                  are this module's.
    update()      one lease changed (a store event): the RemoteTable says which remotes appear and go,
    + apply()     and only their three entries are written (O(1) per event, whatever the cluster's size).
    repair()      one entry changed under us (a netlink notification): compared with what the table
                  wants for that MAC, address or subnet, and set right if it differs. The agent's own
                  writes notify too; they match and cost a lookup.

Every write goes through one ``nlbatch.BatchSocket``: many requests pipelined,
acknowledged together. Nothing here locks or switches namespaces: the node
agent calls it under its lock, in its home namespace.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Iterable

from cni_plugins.kernel import nlbatch
from cni_plugins.kernel import vxlan as kvx
from cni_plugins.kernel.ip import RTPROT_BOOT
from pycni.overlay.monitor import Change
from pycni.overlay.reconcile import Delta, Diff, Own, Plan, Remote, RemoteTable, diff, plan

ENOENT, ESRCH = 2, 3
MAIN_TABLE = 254


@dataclass
class Outcome:
    """What one write did: how many requests succeeded, and what failed (with the kernel's reason)."""

    done: int = 0
    failures: list[str] = field(default_factory=list)


def _adds(index: int, remote: Remote) -> list[nlbatch.Request]:
    """A remote's entries in the order a packet needs them: FDB, then neighbour, then the route through them."""
    return [
        nlbatch.fdb(True, index, remote.vtep_mac, remote.public_ip),
        nlbatch.neigh(True, index, remote.vtep_address, remote.vtep_mac),
        nlbatch.onlink_route(True, index, remote.subnet, remote.vtep_address, RTPROT_BOOT),
    ]


class Entries:
    """The remote nodes' kernel entries on one VXLAN device."""

    def __init__(self, own: Own) -> None:
        self.table = RemoteTable(own)

    def rebuild(self, own: Own, leases: dict[str, Any]) -> None:
        """A fresh table for ``leases`` (key -> lease), e.g. after a re-list or when this node's subnet changed."""
        table = RemoteTable(own)
        for key, lease in leases.items():
            table.update(key, lease)
        self.table = table

    def update(self, key: str, lease: Any) -> Delta:
        return self.table.update(key, lease)

    # ---- writing -----------------------------------------------------------------------

    def reconcile(
        self, ipr: Any, batch: nlbatch.BatchSocket, index: int, underlay_index: int = 0
    ) -> tuple[Plan, Outcome]:
        """Make the device (and, direct routing, the underlay link) hold exactly what the table wants (dump,
        diff, write the difference), every family."""
        wanted = self.table.wanted()
        neighbours = [e for family in (4, 6) for e in kvx.neigh_entries(ipr, index, family)]
        routes = [r for family in (4, 6) for r in kvx.onlink_routes(ipr, index, family)]
        todo = plan(wanted, kvx.fdb_entries(ipr, index), neighbours, routes)
        direct = diff(wanted.direct_routes, self._direct_routes(ipr, underlay_index)) if underlay_index else Diff()
        todo.routes.add += direct.add
        todo.routes.remove += direct.remove
        requests = (
            [nlbatch.onlink_route(False, underlay_index, r.dst, r.gw, 0, onlink=False) for r in direct.remove]
            + [nlbatch.onlink_route(True, underlay_index, r.dst, r.gw, RTPROT_BOOT, onlink=False) for r in direct.add]
            + [nlbatch.onlink_route(False, index, r.dst, r.gw, 0) for r in todo.routes.remove if r not in direct.remove]
            + [nlbatch.neigh(False, index, n.ip, n.mac) for n in todo.neigh.remove]
            + [nlbatch.fdb(False, index, f.mac, f.dst) for f in todo.fdb.remove]
            + [nlbatch.fdb(True, index, f.mac, f.dst) for f in todo.fdb.add]
            + [nlbatch.neigh(True, index, n.ip, n.mac) for n in todo.neigh.add]
            + [
                nlbatch.onlink_route(True, index, r.dst, r.gw, RTPROT_BOOT)
                for r in todo.routes.add
                if r not in direct.add
            ]
        )
        return todo, _run(batch, requests)

    def _direct_routes(self, ipr: Any, underlay_index: int) -> list[Any]:
        """The routes with a gateway on the underlay link to a part of a cluster network (a route to the whole
        network, say via a router, is the operator's and stays)."""
        networks = self.table.own.networks
        return [
            r
            for family in (4, 6)
            for r in kvx.onlink_routes(ipr, underlay_index, family)
            if any(_inside(r.dst, net) and r.dst != str(net) for net in networks)
        ]

    def withdraw_direct(self, batch: nlbatch.BatchSocket, underlay_index: int) -> Outcome:
        """Delete the direct routes on the underlay link (leaving: the VXLAN device's entries go with it)."""
        if not underlay_index:
            return Outcome()
        return _run(
            batch,
            [
                nlbatch.onlink_route(False, underlay_index, r.dst, r.gw, 0, onlink=False)
                for r in sorted(self.table.wanted().direct_routes)
            ],
        )

    def apply(self, batch: nlbatch.BatchSocket, index: int, delta: Delta, underlay_index: int = 0) -> Outcome:
        """Write one Delta: the entries of removed remotes go (unless an added one takes them over), then the
        added remotes' entries are written (replace: a changed MAC or address is one request, not two)."""
        vxlan = [r for r in delta.add if not r.direct]
        kept_macs = {r.vtep_mac for r in vxlan}
        kept_addresses = {r.vtep_address for r in vxlan}
        kept_subnets = {(r.subnet, bool(r.direct)) for r in delta.add}
        requests: list[nlbatch.Request] = []
        gone_fdb: dict[tuple[str, str], nlbatch.Request] = {}  # one FDB entry per VTEP, whatever its families
        for remote in delta.remove:
            if remote.direct:
                if (remote.subnet, True) not in kept_subnets:
                    requests.append(
                        nlbatch.onlink_route(False, underlay_index, remote.subnet, remote.direct, 0, onlink=False)
                    )
                continue
            if (remote.subnet, False) not in kept_subnets:
                requests.append(nlbatch.onlink_route(False, index, remote.subnet, remote.vtep_address, 0))
            if remote.vtep_address not in kept_addresses:
                requests.append(nlbatch.neigh(False, index, remote.vtep_address, remote.vtep_mac))
            if remote.vtep_mac not in kept_macs:
                gone_fdb[(remote.vtep_mac, remote.public_ip)] = nlbatch.fdb(
                    False, index, remote.vtep_mac, remote.public_ip
                )
        requests += gone_fdb.values()
        written_fdb: set[tuple[str, str]] = set()
        for remote in delta.add:
            if remote.direct:
                requests.append(
                    nlbatch.onlink_route(True, underlay_index, remote.subnet, remote.direct, RTPROT_BOOT, onlink=False)
                )
                continue
            if (remote.vtep_mac, remote.public_ip) not in written_fdb:
                written_fdb.add((remote.vtep_mac, remote.public_ip))
                requests.append(nlbatch.fdb(True, index, remote.vtep_mac, remote.public_ip))
            requests += _adds(index, remote)[1:]
        return _run(batch, requests)

    def repair(
        self, batch: nlbatch.BatchSocket, index: int, changes: Iterable[Change], underlay_index: int = 0
    ) -> Outcome:
        """Set right each entry on the device (and each direct route on the underlay link) that a notification
        shows differing from the table."""
        requests: list[nlbatch.Request] = []
        table = self.table
        for change in changes:
            if (
                underlay_index
                and change.index == underlay_index
                and change.kind == "route"
                and change.gateway
                and change.table == MAIN_TABLE
            ):
                want = table.by_subnet.get(change.dst)
                if want is not None and want.direct:
                    if change.deleted and want.direct == change.gateway:
                        requests.append(
                            nlbatch.onlink_route(
                                True, underlay_index, want.subnet, want.direct, RTPROT_BOOT, onlink=False
                            )
                        )
                    elif not change.deleted and want.direct != change.gateway:
                        requests.append(
                            nlbatch.onlink_route(
                                True, underlay_index, want.subnet, want.direct, RTPROT_BOOT, onlink=False
                            )
                        )
                continue
            if change.index != index:
                continue
            if change.kind == "fdb" and change.mac:
                want = table.by_fdb_mac.get(change.mac)
                if change.deleted:
                    if want is not None and want.public_ip == change.ip:
                        requests.append(nlbatch.fdb(True, index, want.vtep_mac, want.public_ip))
                elif change.permanent and change.ip and (want is None or want.public_ip != change.ip):
                    requests.append(nlbatch.fdb(False, index, change.mac, change.ip))
                    if want is not None:
                        requests.append(nlbatch.fdb(True, index, want.vtep_mac, want.public_ip))
            elif change.kind == "neigh" and change.ip:
                want = table.by_vtep_address.get(change.ip)
                if change.deleted:
                    if want is not None:
                        requests.append(nlbatch.neigh(True, index, want.vtep_address, want.vtep_mac))
                elif change.permanent and (want is None or want.vtep_mac != change.mac):
                    requests.append(
                        nlbatch.neigh(True, index, want.vtep_address, want.vtep_mac)
                        if want is not None
                        else nlbatch.neigh(False, index, change.ip, change.mac)
                    )
            elif change.kind == "route" and change.gateway and change.table == MAIN_TABLE:
                want = table.by_subnet.get(change.dst)
                if want is not None and want.direct:
                    want = None  # routed on the underlay link: nothing of it belongs on the VXLAN device
                if change.deleted:
                    if want is not None and want.vtep_address == change.gateway:
                        requests.append(nlbatch.onlink_route(True, index, want.subnet, want.vtep_address, RTPROT_BOOT))
                elif want is None or want.vtep_address != change.gateway:
                    requests.append(nlbatch.onlink_route(False, index, change.dst, change.gateway, 0))
                    if want is not None:
                        requests.append(nlbatch.onlink_route(True, index, want.subnet, want.vtep_address, RTPROT_BOOT))
        return _run(batch, requests)


def _inside(dst: str, network: Any) -> bool:
    net = ipaddress.ip_network(dst)
    return net.version == network.version and net.subnet_of(network)


def _run(batch: nlbatch.BatchSocket, requests: list[nlbatch.Request]) -> Outcome:
    outcome = Outcome()
    if not requests:
        return outcome
    for request, code in zip(requests, batch.run(requests)):
        deleting = request.kind in (nlbatch.RTM_DELNEIGH, nlbatch.RTM_DELROUTE)
        if code == 0 or (deleting and code in (ENOENT, ESRCH)):
            outcome.done += int(code == 0)
        else:
            outcome.failures.append(f"{request.what}: {nlbatch.describe_errno(code)}")
    return outcome
