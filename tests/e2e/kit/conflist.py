"""The network every suite runs: bridge + portmap + bandwidth, host-local IPAM with a private dataDir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

NETWORK = "e2enet"
BRIDGE = "e2ebr0"
SUBNET = "10.88.7.0/24"
GATEWAY = "10.88.7.1"
CNI_VERSION = "1.0.0"  # what containerd 1.6, podman 4.3 (libcni 1.1) and the reference v1.1.1 all speak


def conflist(data_dir: str | Path, *, name: str = NETWORK, cni_version: str = CNI_VERSION) -> dict[str, Any]:
    return {
        "cniVersion": cni_version,
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(data_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
            {"type": "bandwidth", "capabilities": {"bandwidth": True}},
        ],
    }


def write(conf_dir: str | Path, data_dir: str | Path, **kwargs: Any) -> Path:
    """Write the conflist as <conf_dir>/10-<name>.conflist (created if missing); its path."""
    raw = conflist(data_dir, **kwargs)
    conf_dir = Path(conf_dir)
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / f"10-{raw['name']}.conflist"
    path.write_text(json.dumps(raw, indent=2) + "\n")
    return path


def in_subnet(address: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(address) in ipaddress.ip_network(SUBNET) and address != GATEWAY
