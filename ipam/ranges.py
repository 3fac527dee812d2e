"""Address ranges and range sets of the host-local IPAM, validated and filled in.

A *range* is a subnet with an inclusive allocation window (rangeStart..rangeEnd)
and a gateway that is never handed out. A *range set* is a list of ranges of
one address family; host-local hands out one address per range set.

Defaults follow the reference host-local: gateway = network + 1, rangeStart =
network + 1 (the gateway is skipped when allocating), rangeEnd = the last
address before the IPv4 broadcast, or the last address of an IPv6 subnet.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class RangeError(ValueError):
    """A range or range set is invalid; the message says why."""


def parse_ip(value: Any, what: str) -> IPAddress:
    """Parse one IP address; an IPv4-mapped IPv6 address counts as IPv4 (like Go's To4)."""
    if not isinstance(value, str):
        raise RangeError(f"{what}: expected an IP address string, got {value!r}")
    text = value  # no trimming: Go's net.ParseIP refuses " 10.0.0.1" too
    if "%" in text:
        raise RangeError(f"{what}: invalid IP address {value!r} (zones are not allowed)")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise RangeError(f"{what}: invalid IP address {value!r}") from None
    return canonical(addr)


def parse_ip_or_cidr(value: Any, what: str) -> IPAddress:
    """Parse 'IP' or 'IP/prefix' (the forms a requested address may take) to the IP."""
    if isinstance(value, str) and "/" in value:
        try:
            ipaddress.ip_interface(value)
        except ValueError:
            raise RangeError(f"{what}: invalid IP address {value!r}") from None
        value = value.split("/", 1)[0]
    return parse_ip(value, what)


def canonical(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def parse_subnet(value: Any, what: str) -> tuple[IPAddress, IPNetwork]:
    """Parse 'IP/prefix' to (the IP as written, its network)."""
    if not isinstance(value, str) or "/" not in value:
        raise RangeError(f"{what}: invalid CIDR address {value!r}; write it as ADDRESS/PREFIX, e.g. 10.22.0.0/16")
    addr_text, _, prefix = value.partition("/")  # untrimmed, as Go's net.ParseCIDR reads it
    if not prefix.isdigit() or "%" in addr_text:
        raise RangeError(f"{what}: invalid CIDR address {value!r}")
    try:
        iface = ipaddress.ip_interface(f"{addr_text}/{prefix}")
    except ValueError:
        raise RangeError(f"{what}: invalid CIDR address {value!r}") from None
    return iface.ip, iface.network


@dataclass(frozen=True)
class Range:
    subnet: IPNetwork
    range_start: IPAddress
    range_end: IPAddress
    gateway: IPAddress

    @property
    def version(self) -> int:
        return self.subnet.version

    def contains(self, addr: IPAddress) -> bool:
        """True if ``addr`` lies in the subnet and inside rangeStart..rangeEnd."""
        addr = canonical(addr)
        return addr.version == self.version and addr in self.subnet and self.range_start <= addr <= self.range_end

    def overlaps(self, other: "Range") -> bool:
        if self.version != other.version:
            return False
        return (
            self.contains(other.range_start)
            or self.contains(other.range_end)
            or other.contains(self.range_start)
            or other.contains(self.range_end)
        )

    def __str__(self) -> str:
        return f"{self.range_start}-{self.range_end}"


def _last_usable(subnet: IPNetwork) -> IPAddress:
    if subnet.version == 4:
        return subnet.broadcast_address - 1
    return subnet.broadcast_address


def parse_range(raw: Any, what: str = "range") -> Range:
    """Validate one range object and fill in its defaults."""
    if not isinstance(raw, dict):
        raise RangeError(f"{what}: expected an object with a 'subnet'")
    if raw.get("subnet") in (None, ""):
        raise RangeError(f"{what}: missing 'subnet'")
    written, subnet = parse_subnet(raw["subnet"], f"{what}.subnet")
    if subnet.prefixlen > subnet.max_prefixlen - 2:
        raise RangeError(
            f"Network {subnet} too small to allocate from; use a prefix of /{subnet.max_prefixlen - 2} or shorter"
        )
    if written != subnet.network_address:
        raise RangeError(
            f"Network has host bits set. For a subnet mask of length {subnet.prefixlen} "
            f"the network address is {subnet.network_address}"
        )

    def optional_ip(key: str) -> IPAddress | None:
        value = raw.get(key)
        return None if value in (None, "") else parse_ip(value, f"{what}.{key}")

    gateway = optional_ip("gateway")
    start = optional_ip("rangeStart")
    end = optional_ip("rangeEnd")
    if gateway is None:
        gateway = subnet.network_address + 1
    elif gateway.version != subnet.version or gateway not in subnet:
        raise RangeError(f"gateway {gateway} not in network {subnet}")
    for key, addr in (("rangeStart", start), ("rangeEnd", end)):
        if addr is not None and (addr.version != subnet.version or addr not in subnet):
            raise RangeError(f"{key} {addr} not in network {subnet}")
    start = start if start is not None else subnet.network_address + 1
    end = end if end is not None else _last_usable(subnet)
    if start > end:
        raise RangeError(f"rangeStart {start} is after rangeEnd {end} in network {subnet}")
    return Range(subnet=subnet, range_start=start, range_end=end, gateway=gateway)


@dataclass(frozen=True)
class RangeSet:
    ranges: tuple[Range, ...]

    @property
    def version(self) -> int:
        return self.ranges[0].version

    def range_for(self, addr: IPAddress) -> Range | None:
        for rng in self.ranges:
            if rng.contains(addr):
                return rng
        return None

    def contains(self, addr: IPAddress) -> bool:
        return self.range_for(addr) is not None

    def overlaps(self, other: "RangeSet") -> bool:
        return any(a.overlaps(b) for a in self.ranges for b in other.ranges)

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.ranges)


def parse_range_set(raw: Any, what: str = "range set") -> RangeSet:
    """Validate a range set: non-empty, one family, no overlapping ranges."""
    if not isinstance(raw, list):
        raise RangeError(f"{what}: expected a list of ranges")
    if not raw:
        raise RangeError("empty range set")
    ranges = tuple(parse_range(item, f"{what}[{n}]") for n, item in enumerate(raw))
    if len({r.version for r in ranges}) > 1:
        raise RangeError("mixed address families")
    for i, first in enumerate(ranges):
        for second in ranges[i + 1 :]:
            if first.overlaps(second):
                raise RangeError(f"subnets {first} and {second} overlap")
    return RangeSet(ranges)
