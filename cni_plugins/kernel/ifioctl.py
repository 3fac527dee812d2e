"""Interface flags and addresses through ioctl and /proc, without netlink.

Used where a plugin only needs to flip a link up or down and read its
addresses (loopback): it keeps pyroute2's ~90 ms import off that path.
All calls act on the network namespace of the calling thread.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFADDR = 0x8915
SIOCGIFNETMASK = 0x891B
IFF_UP = 0x1


def _ifreq_flags(ifname: str, flags: int = 0) -> bytes:
    return struct.pack("16sH", ifname.encode(), flags) + b"\0" * 22


def get_flags(ifname: str) -> int:
    """Interface flags; raises FileNotFoundError when no such interface exists."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            out = fcntl.ioctl(sock, SIOCGIFFLAGS, _ifreq_flags(ifname))
        except OSError as exc:
            if exc.errno == 19:  # ENODEV
                raise FileNotFoundError(f"no interface named {ifname!r}") from None
            raise
    return struct.unpack("16sH", out[:18])[1]


def is_up(ifname: str) -> bool:
    return bool(get_flags(ifname) & IFF_UP)


def set_up(ifname: str, up: bool = True) -> None:
    flags = get_flags(ifname)
    wanted = flags | IFF_UP if up else flags & ~IFF_UP
    if wanted == flags:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, SIOCSIFFLAGS, _ifreq_flags(ifname, wanted))


def ipv4_address(ifname: str) -> ipaddress.IPv4Interface | None:
    """The primary IPv4 address of an interface, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        req = struct.pack("16s16s", ifname.encode(), b"")
        try:
            addr = fcntl.ioctl(sock, SIOCGIFADDR, req)[20:24]
            mask = fcntl.ioctl(sock, SIOCGIFNETMASK, req)[20:24]
        except OSError as exc:
            if exc.errno in (99, 19):  # EADDRNOTAVAIL, ENODEV
                return None
            raise
    prefix = bin(int.from_bytes(mask, "big")).count("1")
    return ipaddress.IPv4Interface((socket.inet_ntoa(addr), prefix))


def ipv6_addresses(ifname: str) -> list[ipaddress.IPv6Interface]:
    """IPv6 addresses of an interface, read from the calling thread's /proc view."""
    path = "/proc/thread-self/net/if_inet6"
    out = []
    try:
        with open(path) as fh:
            for line in fh:
                fields = line.split()
                if len(fields) == 6 and fields[5] == ifname:
                    raw = bytes.fromhex(fields[0])
                    out.append(ipaddress.IPv6Interface((ipaddress.IPv6Address(raw), int(fields[2], 16))))
    except FileNotFoundError:  # IPv6 disabled
        pass
    return out
