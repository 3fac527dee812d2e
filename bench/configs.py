"""Network configurations the benchmark uses, identical for both sides.

cniVersion is 1.0.0, the newest the reference (v1.1.1) speaks. Each side runs
in its own node namespace with its own host-local dataDir, so both can use
the same bridge name, subnet and host ports.
"""

from __future__ import annotations

import copy
from typing import Any

CNI_VERSION = "1.0.0"
BRIDGE = "pbr0"
SUBNET = "10.88.0.0/16"


def host_local_ipam(data_dir: str, subnet: str = SUBNET) -> dict[str, Any]:
    return {"type": "host-local", "subnet": subnet, "dataDir": data_dir, "routes": [{"dst": "0.0.0.0/0"}]}


def loopback(name: str) -> dict[str, Any]:
    return {"cniVersion": CNI_VERSION, "name": name, "type": "loopback"}


def host_local(name: str, data_dir: str) -> dict[str, Any]:
    # What a runtime hands an IPAM plugin: the network's config with its ipam section.
    return {"cniVersion": CNI_VERSION, "name": name, "type": "host-local", "ipam": host_local_ipam(data_dir)}


def bridge(name: str, data_dir: str, ip_masq: bool = False) -> dict[str, Any]:
    return {
        "cniVersion": CNI_VERSION,
        "name": name,
        "type": "bridge",
        "bridge": BRIDGE,
        "isGateway": True,
        "ipMasq": ip_masq,
        "ipam": host_local_ipam(data_dir),
    }


def portmap(name: str) -> dict[str, Any]:
    return {
        "cniVersion": CNI_VERSION,
        "name": name,
        "type": "portmap",
        "capabilities": {"portMappings": True},
        "snat": True,
    }


def bandwidth(name: str) -> dict[str, Any]:
    return {"cniVersion": CNI_VERSION, "name": name, "type": "bandwidth", "capabilities": {"bandwidth": True}}


def port_mappings(host_port: int) -> dict[str, Any]:
    return {"portMappings": [{"hostPort": host_port, "containerPort": 80, "protocol": "tcp"}]}


def burst_bits(rate_bits: int) -> int:
    # 40 ms worth of the rate, at least 256 kbit: above what tbf needs at HZ=250,
    # small enough that it barely lifts a short measurement above the rate.
    return max(rate_bits // 25, 262144)


def shaping(rate_bits: int) -> dict[str, Any]:
    burst = burst_bits(rate_bits)
    return {
        "bandwidth": {"ingressRate": rate_bits, "ingressBurst": burst, "egressRate": rate_bits, "egressBurst": burst}
    }


def with_runtime(conf: dict[str, Any], runtime: dict[str, Any] | None) -> dict[str, Any]:
    """Add runtimeConfig for the capabilities the plugin declares, as libcni does."""
    out = copy.deepcopy(conf)
    caps = out.get("capabilities") or {}
    picked = {k: v for k, v in (runtime or {}).items() if caps.get(k)}
    if picked:
        out["runtimeConfig"] = picked
    return out


def chained(conf: dict[str, Any], prev: dict[str, Any] | None, runtime: dict[str, Any] | None = None) -> dict[str, Any]:
    out = with_runtime(conf, runtime)
    if prev is not None:
        out["prevResult"] = prev
    return out
