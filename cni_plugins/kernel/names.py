"""Names derived by hashing, in the reference plugins' format.

The reference plugins name per-container objects ``PREFIX + hex(sha512(text))``
cut to a length (iptables chains ``CNI-…`` and ``CNI-DN-…``, the bandwidth
ifb device ``bwp…``); cnitool derives container IDs the same way. Using the
same function keeps pycni's objects interchangeable with theirs. pycni's own
tags (nftables comments and set names) use the same helper with sha256.

Stable MACs come from the same kind of hash: sha256 of a seed naming the
device's owner (a node and a bridge name, a node's VTEP identity), so a device
re-created after a restart or a reboot gets the address its neighbours know.
"""

from __future__ import annotations

import hashlib

MACHINE_ID_PATH = "/etc/machine-id"


def hashed_name(prefix: str, text: str, length: int, algorithm: str = "sha512") -> str:
    """``(prefix + hexdigest(text))[:length]``, e.g. hashed_name("CNI-", net + cid, 28)."""
    digest = hashlib.new(algorithm, text.encode()).hexdigest()
    return (prefix + digest)[:length]


def short_hash(text: str, length: int = 16) -> str:
    """A short sha256 tag for pycni's own nftables names and comments."""
    return hashed_name("", text, length, "sha256")


def stable_mac(seed: str) -> str:
    """A locally administered unicast MAC derived from ``seed``: the same seed gives the same MAC.

    The first six bytes of sha256(seed), with bit 0 of the first octet cleared
    (unicast) and bit 1 set (locally administered), in lower-case colon form.
    """
    octets = bytearray(hashlib.sha256(seed.encode("utf-8")).digest()[:6])
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def node_identity(machine_id_path: str = MACHINE_ID_PATH) -> str:
    """This node's identity, the same across restarts and reboots: /etc/machine-id, else the host name.

    An empty machine-id, or systemd's "uninitialized" of a first boot, is no
    identity yet (machine-id(5)): the host name stands in.
    """
    try:
        with open(machine_id_path, encoding="ascii", errors="replace") as fh:
            machine_id = fh.read(256).strip()
    except OSError:
        machine_id = ""
    if machine_id and machine_id != "uninitialized":
        return machine_id
    import socket

    return socket.gethostname()


def bridge_mac_seed(bridge: str, node_id: str) -> str:
    """The seed of a bridge's MAC: one node and bridge name, one MAC."""
    return f"pycni-bridge|{node_id}|{bridge}"


def stable_bridge_mac(bridge: str, node_id: str | None = None) -> str:
    """The MAC pycni gives a bridge it creates (``node_id`` defaults to ``node_identity()``)."""
    return stable_mac(bridge_mac_seed(bridge, node_identity() if node_id is None else node_id))
