"""Handing out addresses from one range set, round-robin, as the reference does.

The search starts after the address last reserved from the set (file
`last_reserved_ip.<index>`), walks to the end of its range, continues with the
next range of the set (wrapping around) and gives up when it is back where it
started. The gateway is never handed out. A crash-looping container so sees a
fresh address each time rather than the one it just released.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from cni_plugins.spec.errors import ERR_INTERNAL, CNIError

from .ranges import IPAddress, Range, RangeError, RangeSet, parse_ip
from .store import DiskStore


class AllocationError(CNIError):
    """No address could be reserved (exhausted set, taken or invalid request)."""

    def __init__(self, msg: str, details: str = "") -> None:
        super().__init__(ERR_INTERNAL, msg, details)


@dataclass(frozen=True)
class Allocation:
    ip: IPAddress
    range: Range

    @property
    def cidr(self) -> str:
        return f"{self.ip}/{self.range.subnet.prefixlen}"


def candidates(range_set: RangeSet, last_reserved: IPAddress | None) -> Iterator[tuple[IPAddress, Range]]:
    """Every allocatable address of the set once, starting after ``last_reserved``."""
    ranges = range_set.ranges
    if last_reserved is not None and range_set.contains(last_reserved):
        index = next(i for i, r in enumerate(ranges) if r.contains(last_reserved))
        current: IPAddress | None = last_reserved
        start: IPAddress | None = None
    else:
        index, current, start = 0, None, ranges[0].range_start
    while True:
        rng = ranges[index]
        if current is None:
            current = start = rng.range_start
        else:
            if current == rng.range_end:
                index = (index + 1) % len(ranges)
                rng = ranges[index]
                current = rng.range_start
            else:
                current = current + 1
            if start is None:
                start = current
            elif current == start:
                return
        if current != rng.gateway:
            yield current, rng


class Allocator:
    """Reserve addresses of one range set (the caller holds the store's lock)."""

    def __init__(self, range_set: RangeSet, store: DiskStore, index: int) -> None:
        self.range_set = range_set
        self.store = store
        self.index = index

    def get(self, container_id: str, ifname: str, requested: IPAddress | None = None) -> Allocation:
        if requested is not None:
            return self._get_requested(container_id, ifname, requested)
        for held in self.store.get_by_id(container_id, ifname):
            held_ip = _as_ip(held)
            if held_ip is not None and self.range_set.contains(held_ip):
                raise AllocationError(
                    f"{held} has been allocated to {container_id}, duplicate allocation is not allowed",
                    "run DEL for this container and interface first",
                )
        for ip, rng in candidates(self.range_set, self._last_reserved()):
            if self.store.reserve(container_id, ifname, str(ip), self.index):
                return Allocation(ip, rng)
        raise AllocationError(
            f"no IP addresses available in range set: {self.range_set}",
            "release addresses (DEL or GC) or widen the range",
        )

    def _get_requested(self, container_id: str, ifname: str, ip: IPAddress) -> Allocation:
        rng = self.range_set.range_for(ip)
        if rng is None:
            raise AllocationError(f"{ip} not in range set {self.range_set}")
        if ip == rng.gateway:
            raise AllocationError(f"requested ip {ip} is subnet's gateway", "request an address other than the gateway")
        if not self.store.reserve(container_id, ifname, str(ip), self.index):
            raise AllocationError(
                f"requested IP address {ip} is not available in range set {self.range_set}",
                _holder(self.store, str(ip)),
            )
        return Allocation(ip, rng)

    def _last_reserved(self) -> IPAddress | None:
        raw = self.store.last_reserved_ip(self.index)
        return _as_ip(raw) if raw else None


def _as_ip(text: str) -> IPAddress | None:
    try:
        return parse_ip(text, "address")
    except RangeError:
        return None


def _holder(store: DiskStore, ip: str) -> str:
    owner = store.owner_of(ip)
    if owner is None:
        return ""
    if owner.ifname is None:
        return f"it is held by container {owner.container_id}"
    return f"it is held by container {owner.container_id} interface {owner.ifname}"
