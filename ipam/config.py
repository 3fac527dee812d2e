"""Reading the host-local section of a network configuration.

host-local receives the calling plugin's whole configuration. Its `ipam`
section holds `ranges` (a list of range sets) and/or the legacy single range
(`subnet`, `rangeStart`, `rangeEnd`, `gateway`), `routes`, `dataDir` and
`resolvConf`. Requested addresses come from CNI_ARGS `IP=`, `args.cni.ips` and
`runtimeConfig.ips`; `runtimeConfig.ipRanges` adds range sets in front of the
configured ones, as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cni_plugins.spec.args import load_args
from cni_plugins.spec.errors import ERR_INVALID_CONFIG, ERR_INVALID_ENV, CNIError
from cni_plugins.spec.types import Route
from cni_plugins.spec.version import at_least, config_version

from .ranges import IPAddress, RangeError, RangeSet, parse_ip_or_cidr, parse_range_set

DEFAULT_DATA_DIR = "/var/lib/cni/networks"


@dataclass
class IPAMConfig:
    name: str
    cni_version: str
    range_sets: list[RangeSet]
    routes: list[Route] = field(default_factory=list)
    data_dir: str = DEFAULT_DATA_DIR
    resolv_conf: str = ""
    requested_ips: list[IPAddress] = field(default_factory=list)


def _invalid(msg: str, details: str = "") -> CNIError:
    return CNIError(ERR_INVALID_CONFIG, msg, details)


def _string(ipam: dict, key: str) -> str:
    value = ipam.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _invalid(f"ipam.{key} must be a string, got {value!r}")
    return value


def _requested_from_env(cni_args: str) -> list[IPAddress]:
    raw = load_args(cni_args, {"IP"}).get("IP", "")
    out = []
    for part in raw.split(","):
        if part.strip():
            try:
                out.append(parse_ip_or_cidr(part.strip(), "CNI_ARGS IP"))  # the reference trims these
            except RangeError as exc:
                raise CNIError(
                    ERR_INVALID_ENV, str(exc), "IP= takes addresses separated by commas, e.g. IP=10.1.0.5,fd00::5"
                ) from None
    return out


def _requested_list(value: Any, what: str) -> list[IPAddress]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _invalid(f"{what} must be a list of IP addresses", f"got {value!r}")
    try:
        return [parse_ip_or_cidr(item, f"{what}[{n}]") for n, item in enumerate(value)]
    except RangeError as exc:
        raise _invalid(f"cannot understand requested ip: {exc}") from None


def _object(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid(f"{what} must be a JSON object, got {value!r}")
    return value


def _routes(raw: Any) -> list[Route]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _invalid("ipam.routes must be a list of routes", 'e.g. [{"dst": "0.0.0.0/0"}]')
    try:
        return [Route.from_dict(item, f"ipam.routes[{n}]") for n, item in enumerate(raw)]
    except CNIError as exc:
        raise _invalid(exc.msg, exc.details) from None


def load_ipam_config(conf: dict[str, Any], cni_args: str = "") -> IPAMConfig:
    """Validate the configuration and requested addresses; raise CNIError when invalid."""
    ipam = conf.get("ipam")
    if ipam is None:
        raise _invalid(
            "IPAM config missing 'ipam' key",
            'add an "ipam" section such as {"type": "host-local", "subnet": "10.22.0.0/16"}',
        )
    if not isinstance(ipam, dict):
        raise _invalid("'ipam' must be a JSON object")
    version = config_version(conf)

    requested = _requested_from_env(cni_args)
    args = _object(_object(conf.get("args"), "args").get("cni"), "args.cni")
    requested += _requested_list(args.get("ips"), "args.cni.ips")
    runtime = _object(conf.get("runtimeConfig"), "runtimeConfig")
    requested += _requested_list(runtime.get("ips"), "runtimeConfig.ips")

    raw_sets: list[Any] = []
    if runtime.get("ipRanges"):
        if not isinstance(runtime["ipRanges"], list):
            raise _invalid("runtimeConfig.ipRanges must be a list of range sets")
        raw_sets += runtime["ipRanges"]
    if ipam.get("subnet") not in (None, ""):
        raw_sets.append([{key: ipam.get(key) for key in ("subnet", "rangeStart", "rangeEnd", "gateway")}])
    configured = ipam.get("ranges")
    if configured is not None and not isinstance(configured, list):
        raise _invalid("ipam.ranges must be a list of range sets", 'e.g. [[{"subnet": "10.22.0.0/16"}]]')
    raw_sets += configured or []
    if not raw_sets:
        raise _invalid("no IP ranges specified", "set ipam.ranges (a list of range sets) or ipam.subnet")

    range_sets = []
    for n, raw in enumerate(raw_sets):
        try:
            range_sets.append(parse_range_set(raw, f"range set {n}"))
        except RangeError as exc:
            raise _invalid(f"invalid range set {n}: {exc}") from None

    per_family = [sum(1 for s in range_sets if s.version == fam) for fam in (4, 6)]
    if max(per_family) > 1 and not at_least(version, "0.3.0"):
        raise _invalid(
            f"CNI version {version} does not support more than 1 address per family",
            "use cniVersion 0.3.0 or later for several range sets of one family",
        )
    for i, first in enumerate(range_sets):
        for j in range(i + 1, len(range_sets)):
            if first.overlaps(range_sets[j]):
                raise _invalid(f"range set {i} overlaps with {j}", "each range set must use its own addresses")

    return IPAMConfig(
        name=conf.get("name", ""),
        cni_version=version,
        range_sets=range_sets,
        routes=_routes(ipam.get("routes")),
        data_dir=_string(ipam, "dataDir") or DEFAULT_DATA_DIR,
        resolv_conf=_string(ipam, "resolvConf"),
        requested_ips=requested,
    )
