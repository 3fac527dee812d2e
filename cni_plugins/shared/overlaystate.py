"""The node's overlay state file: what the overlay agent leased and built, for the vxlan plugin.

The node agent (``pycni agent`` with a cluster store) writes ``<state-dir>/overlay.json``
after it has leased the node's pod subnet and created the bridge and the VXLAN
device; the ``vxlan`` CNI plugin reads it on every ADD to learn the node's subnet,
gateway, MTU and bridge. It plays the part of flannel's ``/run/flannel/subnet.env``::

    {"network": "10.244.0.0/16", "subnet": "10.244.3.0/24", "gateway": "10.244.3.1",
     "mtu": 1450, "bridge": "pycni0", "vxlanDevice": "pycni.1", "vni": 1,
     "port": 8472, "publicIP": "192.168.100.11", "vtepMAC": "0a:..", "nodeName": "n1",
     "leaseExpires": 1796000000.0, "leaseLost": ""}

``leaseExpires`` (wall clock, seconds) is when the store drops the lease unless
the agent renews it; the agent rewrites it at every renewal, so a value in the
past means the agent stopped renewing (paused, dead, cut off from the store).
``leaseLost`` is non-empty when another node holds the subnet now. Either way
``lease_problem`` says the node must not give out addresses.

Written atomically (temp file in the same directory, fsync, rename), mode 0600 in
a 0700 directory; never read or written through a symlink. The file decides which
subnet, gateway and bridge a root process gives pods, so it is trusted only if
root alone could have written it: a state file or directory owned by anyone but
root (the reader's euid) or writable by group or others is refused with an
OverlayStateError that names it and what to do. The writer tightens a root-owned
state directory that an older version left at 0755 to 0700 (one warning on the
"pycni.state" logger) instead of refusing it; a 0644 file of an older version is
still read (nobody else can write it) and replaced by a 0600 one at the next
write. Standard library only: this module sits on the plugin's cold path.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from cni_plugins.kernel.files import (
    NotRegularFile,
    UntrustedPath,
    ensure_private_dir,
    open_trusted_dir,
    read_regular_file,
    write_atomically,
)

STATE_FILE = "overlay.json"
FILE_MODE = 0o600
DIR_MODE = 0o700
MAX_STATE_BYTES = 64 * 1024
DEFAULT_VXLAN_PORT = 8472

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,15}$")


class OverlayStateError(ValueError):
    """The state file exists but cannot be read or does not describe a valid overlay."""


@dataclass(frozen=True)
class OverlayState:
    network: str  # the cluster pod CIDR, e.g. "10.244.0.0/16"
    subnet: str  # this node's leased pod subnet, e.g. "10.244.3.0/24"
    gateway: str  # the bridge address in the subnet, e.g. "10.244.3.1"
    mtu: int  # pod MTU (underlay MTU minus the VXLAN overhead)
    bridge: str  # the node bridge pods attach to
    vxlan_device: str  # the node's VXLAN device
    vni: int
    public_ip: str  # the node's underlay (VTEP) address
    vtep_mac: str  # the VXLAN device's MAC
    port: int = DEFAULT_VXLAN_PORT
    node_name: str = ""
    lease_expires: float = 0.0  # 0: unknown (a state file of an older agent)
    lease_lost: str = ""  # why the node lost its subnet ("" while it holds it)
    # A dual-stack cluster's IPv6 pods (network/subnet/gateway above are then the IPv4 ones; in an IPv6-only
    # cluster they are the IPv6 ones and these stay empty).
    network6: str = ""
    subnet6: str = ""
    gateway6: str = ""
    # A second VXLAN device, on the node's IPv6 underlay (--public-ipv6), when it has one.
    vxlan_device6: str = ""
    public_ipv6: str = ""
    vtep_mac6: str = ""
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        validate_state(self)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = dict(self.extra)
        data.update(
            {
                "network": self.network,
                "subnet": self.subnet,
                "gateway": self.gateway,
                "mtu": self.mtu,
                "bridge": self.bridge,
                "vxlanDevice": self.vxlan_device,
                "vni": self.vni,
                "port": self.port,
                "publicIP": self.public_ip,
                "vtepMAC": self.vtep_mac,
                "nodeName": self.node_name,
                "leaseExpires": self.lease_expires,
                "leaseLost": self.lease_lost,
            }
        )
        for key, value in (
            ("ipv6Network", self.network6),
            ("ipv6Subnet", self.subnet6),
            ("ipv6Gateway", self.gateway6),
            ("ipv6VxlanDevice", self.vxlan_device6),
            ("publicIPv6", self.public_ipv6),
            ("ipv6VtepMAC", self.vtep_mac6),
        ):
            if value:
                data[key] = value
        return data

    def pools(self) -> list[tuple[str, str, str]]:
        """(network, subnet, gateway) of every pod family this node serves, the primary one first."""
        out = [(self.network, self.subnet, self.gateway)]
        if self.subnet6:
            out.append((self.network6, self.subnet6, self.gateway6))
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "OverlayState":
        if not isinstance(data, dict):
            raise OverlayStateError("overlay state must be a JSON object")
        known = {
            "network",
            "subnet",
            "gateway",
            "mtu",
            "bridge",
            "vxlanDevice",
            "vni",
            "port",
            "publicIP",
            "vtepMAC",
            "nodeName",
            "leaseExpires",
            "leaseLost",
            *_SECOND,
        }
        missing = [
            k
            for k in ("network", "subnet", "gateway", "mtu", "bridge", "vxlanDevice", "vni", "publicIP", "vtepMAC")
            if k not in data
        ]
        if missing:
            raise OverlayStateError(f"overlay state lacks {', '.join(missing)}")
        try:
            return cls(
                network=data["network"],
                subnet=data["subnet"],
                gateway=data["gateway"],
                mtu=data["mtu"],
                bridge=data["bridge"],
                vxlan_device=data["vxlanDevice"],
                vni=data["vni"],
                port=data.get("port", DEFAULT_VXLAN_PORT),
                public_ip=data["publicIP"],
                vtep_mac=data["vtepMAC"],
                node_name=data.get("nodeName", ""),
                lease_expires=data.get("leaseExpires", 0.0),
                lease_lost=data.get("leaseLost", ""),
                **{name: data.get(key, "") for key, name in _SECOND.items()},
                extra={k: v for k, v in data.items() if k not in known},
            )
        except OverlayStateError:
            raise
        except (TypeError, ValueError) as exc:
            raise OverlayStateError(f"invalid overlay state: {exc}") from None


_SECOND = {
    "ipv6Network": "network6",
    "ipv6Subnet": "subnet6",
    "ipv6Gateway": "gateway6",
    "ipv6VxlanDevice": "vxlan_device6",
    "publicIPv6": "public_ipv6",
    "ipv6VtepMAC": "vtep_mac6",
}


def validate_state(state: OverlayState) -> None:
    """Raise OverlayStateError unless every field is well formed and consistent."""

    def fail(msg: str) -> None:
        raise OverlayStateError(f"invalid overlay state: {msg}")

    for name in (
        "network",
        "subnet",
        "gateway",
        "bridge",
        "vxlan_device",
        "public_ip",
        "vtep_mac",
        "node_name",
        "lease_lost",
        *_SECOND.values(),
    ):
        if not isinstance(getattr(state, name), str):
            fail(f"{name} must be a string")
    for name in ("mtu", "vni", "port"):
        value = getattr(state, name)
        if not isinstance(value, int) or isinstance(value, bool):
            fail(f"{name} must be an integer")
    if (
        isinstance(state.lease_expires, bool)
        or not isinstance(state.lease_expires, (int, float))
        or not 0 <= state.lease_expires < 1e11
    ):
        fail("leaseExpires must be a time in seconds since the epoch")
    if len(state.lease_lost) > 4096:
        fail("leaseLost is too long")
    try:
        network = ipaddress.ip_network(state.network, strict=True)
        subnet = ipaddress.ip_network(state.subnet, strict=True)
        gateway = ipaddress.ip_address(state.gateway)
        ipaddress.ip_address(state.public_ip)
    except ValueError as exc:
        fail(str(exc))
    if subnet.version != network.version or not subnet.subnet_of(network):  # type: ignore[arg-type]
        fail(f"subnet {subnet} is not inside network {network}")
    if gateway not in subnet:
        fail(f"gateway {gateway} is not inside subnet {subnet}")
    if not 68 <= state.mtu <= 65535:
        fail(f"mtu {state.mtu} out of range")
    if not 0 <= state.vni < 1 << 24:
        fail(f"vni {state.vni} out of range")
    if not 1 <= state.port <= 65535:
        fail(f"port {state.port} out of range")
    for name in ("bridge", "vxlan_device"):
        if not _IFNAME_RE.match(getattr(state, name)):
            fail(f"{name} {getattr(state, name)!r} is not a valid interface name")
    if not _MAC_RE.match(state.vtep_mac):
        fail(f"vtepMAC {state.vtep_mac!r} is not a lower-case MAC address")
    if len(state.node_name) > 253 or any(ord(c) < 0x20 for c in state.node_name):
        fail("nodeName is too long or holds control characters")
    if state.subnet6 or state.network6 or state.gateway6:
        try:
            network6 = ipaddress.ip_network(state.network6, strict=True)
            subnet6 = ipaddress.ip_network(state.subnet6, strict=True)
            gateway6 = ipaddress.ip_address(state.gateway6)
        except ValueError as exc:
            fail(f"IPv6 pool: {exc}")
        if network6.version != 6 or network.version != 4:
            fail("ipv6Network/ipv6Subnet hold the IPv6 pods of a dual-stack node: network must be IPv4, they IPv6")
        if not subnet6.subnet_of(network6) or gateway6 not in subnet6:  # type: ignore[arg-type]
            fail(f"ipv6Subnet {subnet6} (gateway {gateway6}) is not inside ipv6Network {network6}")
    if state.vxlan_device6 and not _IFNAME_RE.match(state.vxlan_device6):
        fail(f"ipv6VxlanDevice {state.vxlan_device6!r} is not a valid interface name")
    if state.public_ipv6:
        try:
            if ipaddress.ip_address(state.public_ipv6).version != 6:
                fail("publicIPv6 must be an IPv6 address")
        except ValueError as exc:
            fail(str(exc))
    if state.vtep_mac6 and not _MAC_RE.match(state.vtep_mac6):
        fail(f"ipv6VtepMAC {state.vtep_mac6!r} is not a lower-case MAC address")


def lease_problem(state: OverlayState, now: float | None = None) -> str:
    """Why this node must not give addresses to new pods now ("" when its lease is valid)."""
    subnets = " and ".join(subnet for _net, subnet, _gw in state.pools())
    if state.lease_lost:
        return f"this node lost its pod subnet {subnets}: {state.lease_lost}"
    now = time.time() if now is None else now
    if state.lease_expires and now > state.lease_expires:
        ago = now - state.lease_expires
        return (
            f"this node's lease of {subnets} lapsed {ago:.0f} s ago: the node agent has not renewed it "
            f"(is it running, and can it reach the cluster store?)"
        )
    return ""


def state_path(state_dir: str) -> str:
    return os.path.join(state_dir, STATE_FILE)


def _ensure_dir(state_dir: str) -> None:
    """The state directory, created 0700; an existing one checked (and tightened from 0755)."""
    try:
        tightened = ensure_private_dir(state_dir, DIR_MODE)
    except UntrustedPath as exc:
        raise OverlayStateError(f"refusing the state directory: {exc}") from None
    except OSError as exc:
        raise OverlayStateError(f"cannot create the state directory {state_dir}: {exc.strerror}") from None
    if tightened:
        import logging  # rare (once after an upgrade): not on the cold path otherwise

        logging.getLogger("pycni.state").warning(
            "tightened the state directory %s to mode %04o: only root may read or write the node's overlay "
            "state (older versions made it 0755)",
            state_dir,
            DIR_MODE,
        )


def write_state(state_dir: str, state: OverlayState) -> str:
    """Write the state file atomically; returns its path."""
    validate_state(state)
    _ensure_dir(state_dir)
    path = state_path(state_dir)
    data = (json.dumps(state.to_dict(), indent=2, sort_keys=True) + "\n").encode()
    write_atomically(path, data, FILE_MODE, prefix=".overlay-", sync_dir=True)
    return path


def read_state(state_dir: str) -> Optional[OverlayState]:
    """The node's overlay state, or None when no agent has written one (yet)."""
    path = state_path(state_dir)
    try:
        dir_fd = open_trusted_dir(
            state_dir,
            f"only root may write the node's overlay state: check what is in "
            f"it, then `chown root:root {state_dir} && chmod 0700 {state_dir}`",
        )
    except UntrustedPath as exc:
        raise OverlayStateError(f"refusing the state directory: {exc}") from None
    except OSError as exc:
        raise OverlayStateError(f"cannot open the state directory {state_dir}: {exc.strerror}") from None
    if dir_fd is None:
        return None
    try:
        raw = read_regular_file(
            STATE_FILE,
            MAX_STATE_BYTES,
            dir_fd=dir_fd,
            trusted=f"only root may write it: remove {path} and restart the node agent, "
            f"which writes it again (mode 0600)",
        )
    except UntrustedPath as exc:
        raise OverlayStateError(f"refusing the overlay state: {path} {exc.problem}: {exc.fix}") from None
    except NotRegularFile:
        raise OverlayStateError(f"{path} is not a regular file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OverlayStateError(f"{path} is a symlink; refusing to follow it") from None
        raise OverlayStateError(f"cannot open {path}: {exc.strerror}") from None
    finally:
        os.close(dir_fd)
    if raw is None:
        return None
    if len(raw) > MAX_STATE_BYTES:
        raise OverlayStateError(f"{path} is larger than {MAX_STATE_BYTES} bytes")
    try:
        data = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise OverlayStateError(f"{path} is not valid JSON: {exc}") from None
    return OverlayState.from_dict(data)


def remove_state(state_dir: str) -> bool:
    """Remove the state file; True if it existed."""
    try:
        os.unlink(state_path(state_dir))
        return True
    except FileNotFoundError:
        return False
