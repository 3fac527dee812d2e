"""This node's subnet lease over its life: taken, renewed, lapsed, lost, taken back.

A node's pods live on its subnet, so the subnet must never move under them
and never be shared with another node::

                 renewal fails past the TTL                 the store answers, the subnet is free
      valid ───────────────────────────────▶ lapsed ───────────────────────────────▶ valid (same subnet)
        │                                      │
        │ another node holds the subnet        │ another node holds the subnet
        ▼                                      ▼
      lost ──the subnet is free again──▶ valid (same subnet)
        └────no pod left on the node────▶ valid (a free subnet: nothing running is renumbered)

While lapsed or lost the node keeps its devices, addresses and entries (its
running pods keep working as far as the cluster lets them), and the vxlan
plugin answers ADD "try again later" and STATUS "not ready" (the state file
says why: ``leaseExpires`` in the past, or ``leaseLost``). Nothing here
touches the kernel: ``OverlayNode`` asks ``has_pods`` and reconfigures the
node when ``subnet`` changed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Callable

from ipam.cluster import (
    ClusterConfig,
    LeaseExhausted,
    LeaseLost,
    NodeConflict,
    NodeLease,
    Store,
    acquire_lease,
    renew_lease,
)

VALID, LAPSED, LOST = "valid", "lapsed", "lost"


@dataclass(frozen=True)
class Identity:
    """What this node publishes about itself."""

    public_ip: str
    vtep_mac: str
    node_name: str
    public_ipv6: str = ""  # a second, IPv6 underlay (dual-stack), and the VTEP MAC of the device there
    vtep_mac6: str = ""


class LeaseKeeper:
    """Holds this node's lease; every method may raise StoreError when the store cannot be reached."""

    def __init__(
        self,
        store: Store,
        cfg: ClusterConfig,
        me: Identity,
        ttl: int,
        log: logging.Logger,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.cfg, self.me, self.ttl, self.log = store, cfg, me, ttl, log
        self.clock = clock
        self.lease: NodeLease | None = None  # the lease held, or (lapsed, lost) the subnet the pods are on
        self.state = VALID
        self.valid_until = 0.0  # wall clock: the store drops the lease after this unless renewed
        self.problem = ""  # lost: why, and what the operator can do
        self._exhausted_logged = False

    @property
    def subnets(self) -> list[str]:
        """The subnets the node's pods are on, one per family (IPv4 first)."""
        return list(self.lease.subnets) if self.lease is not None else []

    @property
    def subnet(self) -> str:
        """For messages and status: the node's subnets ("10.244.1.0/24 and fd00:10:244:1::/64")."""
        return _label(self.lease) if self.lease is not None else ""

    # ---- start --------------------------------------------------------------------

    def take(self, previous: NodeLease | None, has_pods: bool) -> None:
        """Lease a subnet at start: this node's own lease, else the one of its previous run if free, else any.

        With pods on the node the previous subnet is the only acceptable one:
        if another node holds it, the node starts lost instead of renumbering
        them. Raises NodeConflict (another node name holds this public IP) and
        LeaseExhausted.
        """
        preferred = previous.subnets[0] if previous is not None and previous.subnets else None
        preferred6 = previous.ipv6_subnet or None if previous is not None else None
        if has_pods and previous is not None:
            holder = self._holder(previous)
            if holder is not None and not self._mine(holder) and not _same(holder, previous):
                self._lose(previous, holder)
                return
        renumbered = previous if previous is not None and previous.public_ip != self.me.public_ip else None
        began = self.clock()
        lease = self._acquire(preferred_subnet=preferred, preferred_ipv6_subnet=preferred6, previous=renumbered)
        if has_pods and previous is not None and lease.subnets != previous.subnets:
            # Someone took the old subnet between our look and our claim: give the new one back.
            self.store.delete(lease.key)
            self._lose(previous, self._holder(previous))
            return
        if preferred and preferred not in lease.subnets:
            self.log.warning(
                "the subnet %s of the previous run is taken and no pod was left on it; leased %s",
                _label(previous),
                _label(lease),
            )
        elif renumbered is not None:
            self.log.warning(
                "this node's underlay address changed from %s to %s: its lease of %s moved with it",
                renumbered.public_ip,
                self.me.public_ip,
                _label(lease),
            )
        self._hold(lease, began)

    # ---- while running ----------------------------------------------------------------

    def renew(self, has_pods: bool) -> bool:
        """Keep the lease alive (or win it back); True if the node's subnet changed."""
        if self.lease is None:
            return False
        if self.state == LOST:
            return self._recover(has_pods)
        began = self.clock()
        was = self.state
        try:
            current = renew_lease(self.store, self.lease, self.ttl)
        except LeaseLost as exc:
            self._lose(self.lease, None, str(exc))
            return self._recover(has_pods) if not has_pods else False
        self._hold(current, began)
        if was == LAPSED:
            self.log.warning("this node's lease of %s is valid again (taken back after it lapsed)", _label(current))
        return False

    def keep_alive(self) -> bool:
        """The periodic renewal while the store's watch shows the lease unchanged: one keep-alive request.

        False when that is not enough (the lease is not valid, or the store no
        longer has it): then call renew().
        """
        if self.lease is None or self.state != VALID:
            return False
        began = self.clock()
        if not self.store.refresh(self.lease.key):
            return False
        self.valid_until = began + self.ttl
        return True

    def check_lapsed(self) -> bool:
        """True the moment a valid lease has passed its TTL without a renewal (the store dropped it)."""
        if self.state == VALID and self.lease is not None and self.clock() > self.valid_until:
            self.state = LAPSED
            self.log.error(
                "this node's lease of %s lapsed %s ago (not renewed within its TTL of %d s: is the "
                "cluster store reachable?); pods keep their addresses, new pods wait ('try again later') "
                "until the lease is renewed",
                _label(self.lease),
                _ago(self.clock() - self.valid_until),
                self.ttl,
            )
            return True
        return False

    # ---- internals -------------------------------------------------------------------

    def _recover(self, has_pods: bool) -> bool:
        """Lost: take the subnet back if it is free; with no pod left, lease any free subnet."""
        assert self.lease is not None
        began = self.clock()
        try:
            current = renew_lease(self.store, self.lease, self.ttl)
        except LeaseLost:
            current = None
        if current is not None:
            self._hold(current, began)
            self.log.warning("took this node's subnet %s back: no other node holds it any more", _label(current))
            return False
        if has_pods:
            return False
        try:
            lease = self._acquire()
        except (LeaseExhausted, NodeConflict) as exc:
            if not self._exhausted_logged:
                self.log.error("cannot lease a new subnet for this node: %s", exc)
                self._exhausted_logged = True
            return False
        old = self.lease.subnets
        self._hold(lease, began)
        self.log.warning(
            "no pod was left on the lost subnet %s: this node now leases %s", " and ".join(old), _label(lease)
        )
        return lease.subnets != old

    def _hold(self, lease: NodeLease, began: float) -> None:
        self.lease = lease
        self.state = VALID
        self.problem = ""
        self.valid_until = began + self.ttl
        self._exhausted_logged = False

    def _lose(self, lost: NodeLease, holder: NodeLease | None, detail: str = "") -> None:
        who = (
            (f"{holder.public_ip}" + (f" ({holder.node_name})" if holder.node_name else ""))
            if holder
            else "another node"
        )
        subnets = _label(lost)
        self.problem = (
            f"the subnet {subnets} is now leased to {who}{': ' + detail if detail and not holder else ''}"
            f". Pods on this node keep their addresses but new pods cannot start. Drain this node's "
            f"pods: once none is left the agent leases a free subnet (or takes {subnets} back as "
            f"soon as it is free)"
        )
        if self.state != LOST:
            self.log.error("this node lost its subnet lease: %s", self.problem)
        self.lease = replace(lost, mod_revision=0)
        self.state = LOST

    def _acquire(self, **where: object) -> NodeLease:
        me = self.me
        return acquire_lease(
            self.store,
            self.cfg,
            me.public_ip,
            me.vtep_mac,
            node_name=me.node_name,
            ttl=self.ttl,
            public_ipv6=me.public_ipv6,
            vtep_mac6=me.vtep_mac6,
            **where,
        )  # type: ignore[arg-type]

    def _holder(self, lease: NodeLease) -> NodeLease | None:
        """Who holds ``lease``'s key in the store now (None: nobody)."""
        entry = self.store.get(lease.key)
        if entry is None:
            return None
        try:
            return NodeLease.from_entry(entry)
        except (ValueError, TypeError):
            return replace(lease, public_ip="?", vtep_mac="", node_name="an unreadable entry")

    def _mine(self, lease: NodeLease) -> bool:
        if lease.public_ip != self.me.public_ip:
            return False
        return not (lease.node_name and self.me.node_name and lease.node_name != self.me.node_name)


def _same(stored: NodeLease, previous: NodeLease) -> bool:
    """The stored lease is exactly the one this node held before (its underlay address may have changed since)."""
    return (stored.public_ip, stored.vtep_mac, stored.node_name) == (
        previous.public_ip,
        previous.vtep_mac,
        previous.node_name,
    )


def _label(lease: NodeLease) -> str:
    return " and ".join(lease.subnets)


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
