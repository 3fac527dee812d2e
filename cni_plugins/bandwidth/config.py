"""bandwidth's configuration: the limits in force and their validation.

Rates and bursts are in bits per second and bits, as the CNI options give
them (``shaping.token_buckets`` turns them into the kernel's tbf parameters).
This is all that the most common call needs (an ADD for a pod without limits
passes prevResult through), so it stays free of netlink, tc and hashing.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from cni_plugins.spec.decode import COMMON, ListOf, Schema
from cni_plugins.spec.errors import ERR_INVALID_CONFIG, CNIError

DEFAULT_LATENCY_MS = 25.0
MAX_BURST_BYTES = 0xFFFFFFFF
ENTRY_KEYS = ("ingressRate", "ingressBurst", "egressRate", "egressBurst", "unshapedSubnets", "shapedSubnets")

_ENTRY = {
    "ingressRate": int,
    "ingressBurst": int,
    "egressRate": int,
    "egressBurst": int,
    "unshapedSubnets": ListOf(str),
    "shapedSubnets": ListOf(str),
}
# The options with their JSON types, decoded by the skeleton (any letter case, null = absent).
SCHEMA = COMMON.extend(latencyMs=float, runtimeConfig=Schema({"bandwidth": Schema(_ENTRY)}), **_ENTRY)


# ---- configuration ------------------------------------------------------------------


@dataclass
class Bandwidth:
    ingress_rate: int = 0
    ingress_burst: int = 0
    egress_rate: int = 0
    egress_burst: int = 0
    unshaped_subnets: list[str] = field(default_factory=list)
    shaped_subnets: list[str] = field(default_factory=list)
    latency_ms: float = DEFAULT_LATENCY_MS

    def is_zero(self) -> bool:
        return not (self.ingress_rate or self.ingress_burst or self.egress_rate or self.egress_burst)

    @property
    def shapes_ingress(self) -> bool:
        return self.ingress_rate > 0 and self.ingress_burst > 0

    @property
    def shapes_egress(self) -> bool:
        return self.egress_rate > 0 and self.egress_burst > 0

    @property
    def subnets(self) -> list[str]:
        return self.shaped_subnets or self.unshaped_subnets

    @property
    def subnets_are_shaped(self) -> bool:
        return bool(self.shaped_subnets)


def _uint(entry: dict, key: str, where: str) -> int:
    value = entry.get(key, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 1 << 64:
        raise CNIError(
            ERR_INVALID_CONFIG,
            f"failed to parse network configuration: {where}{key} must be a non-negative integer",
            f"got {value!r}; rates are in bit/s, bursts in bits",
        )
    return value


def _subnet_list(entry: dict, key: str, where: str) -> list[str]:
    value = entry.get(key) or []
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise CNIError(
            ERR_INVALID_CONFIG,
            f"failed to parse network configuration: {where}{key} must be a list of CIDR strings",
            f"got {value!r}",
        )
    return value


def _latency(conf: dict) -> float:
    value = conf.get("latencyMs", DEFAULT_LATENCY_MS)
    if value is None:
        return DEFAULT_LATENCY_MS
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 60_000:
        raise CNIError(
            ERR_INVALID_CONFIG, "latencyMs must be a number of milliseconds above 0 and at most 60000", f"got {value!r}"
        )
    return float(value)


def validate_rate_and_burst(direction: str, rate: int, burst: int) -> None:
    if burst == 0 and rate != 0:
        raise CNIError(
            ERR_INVALID_CONFIG,
            "if rate is set, burst must also be set",
            f"{direction}Rate is {rate} but {direction}Burst is 0; set {direction}Burst (bits)",
        )
    if rate == 0 and burst != 0:
        raise CNIError(
            ERR_INVALID_CONFIG,
            "if burst is set, rate must also be set",
            f"{direction}Burst is {burst} but {direction}Rate is 0; set {direction}Rate (bit/s)",
        )
    if burst // 8 >= MAX_BURST_BYTES:
        raise CNIError(
            ERR_INVALID_CONFIG,
            "burst cannot be more than 4GB",
            f"{direction}Burst is {burst} bits; keep it below {MAX_BURST_BYTES * 8}",
        )


def parse_bandwidth(conf: dict) -> Bandwidth | None:
    """The bandwidth entry in force: the top level if it names any limit, else runtimeConfig."""
    latency_ms = _latency(conf)
    if any(key in conf for key in ENTRY_KEYS):
        entry, where = conf, ""
    else:
        runtime = conf.get("runtimeConfig") or {}
        if not isinstance(runtime, dict):
            raise CNIError(ERR_INVALID_CONFIG, "failed to parse network configuration: runtimeConfig must be an object")
        entry, where = runtime.get("bandwidth"), "runtimeConfig.bandwidth."
        if entry is None:
            return None
        if not isinstance(entry, dict):
            raise CNIError(
                ERR_INVALID_CONFIG,
                "failed to parse network configuration: runtimeConfig.bandwidth must be an object",
                f"got {entry!r}",
            )
    bw = Bandwidth(
        ingress_rate=_uint(entry, "ingressRate", where),
        ingress_burst=_uint(entry, "ingressBurst", where),
        egress_rate=_uint(entry, "egressRate", where),
        egress_burst=_uint(entry, "egressBurst", where),
        unshaped_subnets=_subnet_list(entry, "unshapedSubnets", where),
        shaped_subnets=_subnet_list(entry, "shapedSubnets", where),
        latency_ms=latency_ms,
    )
    validate_rate_and_burst("ingress", bw.ingress_rate, bw.ingress_burst)
    validate_rate_and_burst("egress", bw.egress_rate, bw.egress_burst)
    return bw


def validate_subnets(bw: Bandwidth) -> None:
    if bw.unshaped_subnets and bw.shaped_subnets:
        raise CNIError(
            ERR_INVALID_CONFIG,
            "unshapedSubnets and shapedSubnets cannot be both specified, one of them should be discarded",
        )
    for subnet in bw.subnets:
        try:
            ipaddress.ip_network(subnet, strict=False)
        except ValueError as exc:
            raise CNIError(ERR_INVALID_CONFIG, f"bad subnet {subnet!r} provided", str(exc)) from None
        if "/" not in subnet:
            raise CNIError(
                ERR_INVALID_CONFIG,
                f"bad subnet {subnet!r} provided",
                "give a CIDR with a prefix length, e.g. 10.0.0.0/8",
            )
