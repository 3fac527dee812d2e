"""flannel's ``subnet.env``: the node's lease as shell variables, for tools written for flannel.

flannel's daemon writes ``/run/flannel/subnet.env`` and its CNI plugin, scripts and
other tools source it. The agent writes the same keys for its lease (by default
``<state-dir>/subnet.env``, beside the JSON state the vxlan plugin reads)::

    FLANNEL_NETWORK=10.244.0.0/16         # the cluster's IPv4 pod network   (IPv4 or dual-stack)
    FLANNEL_SUBNET=10.244.3.1/24          # this node's subnet, as its gateway address
    FLANNEL_IPV6_NETWORK=fd00:10:244::/56 # the IPv6 pod network             (IPv6 or dual-stack)
    FLANNEL_IPV6_SUBNET=fd00:10:244:3::1/64
    FLANNEL_MTU=1450                      # the pods' MTU
    FLANNEL_IPMASQ=true                   # traffic leaving the cluster network is masqueraded

Written atomically (a temp file and a rename, mode 0644) whenever its content
changes, removed when the node leaves the cluster.
"""

from __future__ import annotations

import ipaddress
import os

from cni_plugins.kernel.files import write_atomically

FILE_NAME = "subnet.env"
TEMP_PREFIX = ".subnet-env-"


def default_path(state_dir: str) -> str:
    return os.path.join(state_dir, FILE_NAME)


def render(pools: list[tuple[str, str]], mtu: int, ip_masq: bool) -> str:
    """The file's text for ``pools``: (cluster network, this node's subnet) per family, IPv4 first."""
    lines = []
    for network, subnet in pools:
        net = ipaddress.ip_network(subnet)
        key = "FLANNEL" if net.version == 4 else "FLANNEL_IPV6"
        lines += [
            f"{key}_NETWORK={ipaddress.ip_network(network)}",
            f"{key}_SUBNET={net.network_address + 1}/{net.prefixlen}",
        ]
    lines += [f"FLANNEL_MTU={int(mtu)}", f"FLANNEL_IPMASQ={'true' if ip_masq else 'false'}"]
    return "\n".join(lines) + "\n"


def write(path: str, text: str) -> None:
    """Replace the file with ``text`` (its directory is created, mode 0755, if missing)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    write_atomically(path, text.encode(), 0o644, prefix=TEMP_PREFIX)


def remove(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
