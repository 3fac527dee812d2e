"""A few ethtool settings through the SIOCETHTOOL ioctl, without the ethtool binary.

The overlay turns transmit checksum offload off on its VXLAN device where the
kernel or NIC computes wrong checksums for encapsulated packets (flannel #1279,
the ``ethtool -K flannel.1 tx-checksum-ip-generic off`` workaround). Acts on
the network namespace of the calling thread.
"""

from __future__ import annotations

import array
import errno
import fcntl
import socket
import struct

SIOCETHTOOL = 0x8946
ETHTOOL_GTXCSUM = 0x00000016
ETHTOOL_STXCSUM = 0x00000017
IFNAMSIZ = 16
_IFREQ_SIZE = 40  # struct ifreq: 16-byte name + a 24-byte union (ifr_data is a pointer in it)


class EthtoolError(OSError):
    """The ioctl failed; errno says why (ENODEV: no such device, EOPNOTSUPP: not supported)."""


def _ethtool_value(ifname: str, cmd: int, data: int = 0) -> int:
    name = ifname.encode()
    if not name or len(name) >= IFNAMSIZ:
        raise ValueError(f"invalid interface name {ifname!r}")
    value = array.array("I", [cmd, data])  # struct ethtool_value {__u32 cmd; __u32 data;}
    address, _count = value.buffer_info()
    ifreq = struct.pack(f"{IFNAMSIZ}sP", name, address)
    ifreq += b"\0" * (_IFREQ_SIZE - len(ifreq))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
        except OSError as exc:
            what = {errno.ENODEV: "no such interface", errno.EOPNOTSUPP: "not supported by the driver"}
            raise EthtoolError(
                exc.errno, f"ethtool ioctl 0x{cmd:x} on {ifname}: {what.get(exc.errno, exc.strerror)}"
            ) from None
    return value[1]


def get_tx_checksum(ifname: str) -> bool:
    """Whether transmit checksum offload is on for ``ifname``."""
    return bool(_ethtool_value(ifname, ETHTOOL_GTXCSUM))


def set_tx_checksum(ifname: str, on: bool) -> None:
    """Turn transmit checksum offload on or off (``ethtool -K IFNAME tx on|off``)."""
    if get_tx_checksum(ifname) == on:
        return
    _ethtool_value(ifname, ETHTOOL_STXCSUM, 1 if on else 0)
