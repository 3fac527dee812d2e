"""The bridge plugin's configuration: every option of the reference bridge, read and validated.

Same option names, defaults and refusals as the reference; a value of the
wrong JSON type is a decode error naming the option.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cni_plugins.shared.ipam import ipam_type
from cni_plugins.spec.args import load_args
from cni_plugins.spec.decode import COMMON, ListOf, Schema, get_field
from cni_plugins.spec.errors import ERR_DECODE, ERR_INVALID_CONFIG, CNIError
from cni_plugins.spec.skel import validate_link_name
from cni_plugins.spec.types import DNS

DEFAULT_BRIDGE = "cni0"
MASQ_BACKENDS = ("nftables", "iptables")  # masq.BACKENDS
DEFAULT_MASQ_BACKEND = "nftables"

# Every option the reference bridge reads, with its JSON type: the skeleton decodes with this
# (any letter case, null = absent, wrong type = error 7 naming the option; lenient on DEL).
SCHEMA = COMMON.extend(
    bridge=str,
    isGateway=bool,
    isDefaultGateway=bool,
    forceAddress=bool,
    ipMasq=bool,
    ipMasqBackend=str,
    mtu=int,
    hairpinMode=bool,
    promiscMode=bool,
    vlan=int,
    vlanTrunk=ListOf(Schema({"minID": int, "maxID": int, "id": int})),
    preserveDefaultVlan=bool,
    enabledad=bool,
    macspoofchk=bool,
    disableContainerInterface=bool,
    portIsolation=bool,
    ipam=Schema({"type": str}),
    runtimeConfig=Schema({"mac": str}),
    args=Schema({"cni": Schema({"mac": str})}),
)
BRIDGE_INDEX, HOST_INDEX, CONTAINER_INDEX = 0, 1, 2


@dataclass
class BridgeConf:
    name: str
    bridge: str = DEFAULT_BRIDGE
    is_gateway: bool = False
    is_default_gateway: bool = False
    force_address: bool = False
    ip_masq: bool = False
    ip_masq_backend: str = DEFAULT_MASQ_BACKEND
    ip_masq_backend_chosen: bool = False  # ipMasqBackend given in the config
    mtu: int = 0
    hairpin_mode: bool = False
    promisc_mode: bool = False
    vlan: int = 0
    vlans: list[int] = field(default_factory=list)  # the expanded vlanTrunk
    vlan_trunk_set: bool = False
    preserve_default_vlan: bool = False
    enable_dad: bool = False
    mac_spoof_check: bool = False
    disable_container_interface: bool = False
    port_isolation: bool = False
    ipam_type: str = ""
    dns: DNS = field(default_factory=DNS)
    mac: str = ""

    @property
    def is_layer3(self) -> bool:
        return bool(self.ipam_type)

    @property
    def vlan_filtering(self) -> bool:
        return self.vlan != 0 or self.vlan_trunk_set


def _get(conf: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    return get_field(conf, key, kind, default)


def _trunk_vlans(trunk: Any) -> list[int]:
    """Expand vlanTrunk ([{id}, {minID, maxID}]) into a sorted list of VLAN IDs."""
    if not isinstance(trunk, list):
        raise CNIError(ERR_DECODE, "failed to load netconf: vlanTrunk must be a list of objects")
    found: set[int] = set()
    for item in trunk:
        if not isinstance(item, dict):
            raise CNIError(ERR_DECODE, "failed to load netconf: vlanTrunk entries must be objects")
        low, high, single = (_get(item, k, int, None) for k in ("minID", "maxID", "id"))
        if low is not None and high is not None:
            if not 0 < low <= 4094:
                raise CNIError(ERR_INVALID_CONFIG, "incorrect trunk minID parameter", "VLAN IDs are 1..4094")
            if not 0 < high <= 4094:
                raise CNIError(ERR_INVALID_CONFIG, "incorrect trunk maxID parameter", "VLAN IDs are 1..4094")
            if high < low:
                raise CNIError(ERR_INVALID_CONFIG, "minID is greater than maxID in trunk parameter")
            found.update(range(low, high + 1))
        elif low is None and high is not None:
            raise CNIError(ERR_INVALID_CONFIG, "minID and maxID should be configured simultaneously, minID is missing")
        elif low is not None and high is None:
            raise CNIError(ERR_INVALID_CONFIG, "minID and maxID should be configured simultaneously, maxID is missing")
        if single is not None:
            if not 0 < single <= 4094:
                raise CNIError(ERR_INVALID_CONFIG, "incorrect trunk id parameter", "VLAN IDs are 1..4094")
            found.add(single)
    return sorted(found)


def _mac(value: str, where: str) -> str:
    parts = value.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts):
        raise CNIError(
            ERR_INVALID_CONFIG,
            f"invalid MAC address {value!r} in {where}",
            "write it as six hex pairs, e.g. 0a:58:0a:f4:00:05",
        )
    if int(parts[0], 16) & 1:
        raise CNIError(
            ERR_INVALID_CONFIG,
            f"MAC address {value!r} in {where} is a multicast address",
            "the first octet must be even",
        )
    return value.lower()


def load_conf(conf: dict[str, Any], cni_args: str) -> BridgeConf:
    """Read and validate the bridge options of a network configuration."""
    n = BridgeConf(name=conf.get("name", ""))
    n.bridge = _get(conf, "bridge", str, DEFAULT_BRIDGE) or DEFAULT_BRIDGE
    n.is_gateway = _get(conf, "isGateway", bool, False)
    n.is_default_gateway = _get(conf, "isDefaultGateway", bool, False)
    n.force_address = _get(conf, "forceAddress", bool, False)
    n.ip_masq = _get(conf, "ipMasq", bool, False)
    n.ip_masq_backend = _get(conf, "ipMasqBackend", str, DEFAULT_MASQ_BACKEND) or DEFAULT_MASQ_BACKEND
    n.ip_masq_backend_chosen = bool(conf.get("ipMasqBackend"))
    n.mtu = _get(conf, "mtu", int, 0)
    n.hairpin_mode = _get(conf, "hairpinMode", bool, False)
    n.promisc_mode = _get(conf, "promiscMode", bool, False)
    n.vlan = _get(conf, "vlan", int, 0)
    n.preserve_default_vlan = _get(conf, "preserveDefaultVlan", bool, False)
    n.enable_dad = _get(conf, "enabledad", bool, False)
    n.mac_spoof_check = _get(conf, "macspoofchk", bool, False)
    n.disable_container_interface = _get(conf, "disableContainerInterface", bool, False)
    n.port_isolation = _get(conf, "portIsolation", bool, False)
    n.ipam_type = ipam_type(conf)
    n.dns = DNS.from_dict(conf.get("dns"))

    validate_link_name(n.bridge, "bridge name")
    if not 0 <= n.vlan <= 4094:
        raise CNIError(ERR_INVALID_CONFIG, f"invalid VLAN ID {n.vlan} (must be between 0 and 4094)")
    if conf.get("vlanTrunk") is not None:
        n.vlans = _trunk_vlans(conf["vlanTrunk"])
        n.vlan_trunk_set = True
    if n.vlan and n.vlans:
        raise CNIError(
            ERR_INVALID_CONFIG,
            "cannot set vlan and vlanTrunk at the same time",
            "a port is either an access port (vlan) or a trunk (vlanTrunk)",
        )
    if n.mtu and not 68 <= n.mtu <= 65535:
        raise CNIError(ERR_INVALID_CONFIG, f"invalid MTU {n.mtu}", "an MTU is between 68 and 65535")
    if n.ip_masq_backend not in MASQ_BACKENDS:
        raise CNIError(
            ERR_INVALID_CONFIG,
            f"unknown ipmasq backend {n.ip_masq_backend!r}",
            f"ipMasqBackend must be one of {', '.join(MASQ_BACKENDS)}",
        )

    # MAC precedence as in the reference: CNI_ARGS MAC < args.cni.mac < runtimeConfig.mac.
    if cni_args:
        env_mac = load_args(cni_args, {"MAC"}).get("MAC", "")
        if env_mac:
            n.mac = _mac(env_mac, "CNI_ARGS MAC")
    args_cni = (conf.get("args") or {}).get("cni") if isinstance(conf.get("args"), dict) else None
    if isinstance(args_cni, dict) and args_cni.get("mac"):
        n.mac = _mac(_get(args_cni, "mac", str, ""), "args.cni.mac")
    runtime = conf.get("runtimeConfig")
    if isinstance(runtime, dict) and runtime.get("mac"):
        n.mac = _mac(_get(runtime, "mac", str, ""), "runtimeConfig.mac")

    if n.is_default_gateway:
        n.is_gateway = True
    return n


def validate_for_add(n: BridgeConf) -> None:
    if n.is_layer3 and n.disable_container_interface:
        raise CNIError(
            ERR_INVALID_CONFIG,
            "cannot use IPAM when DisableContainerInterface flag is set",
            "drop 'ipam' for a layer-2 only attachment, or enable the container interface",
        )
    if n.hairpin_mode and n.promisc_mode:
        raise CNIError(
            ERR_INVALID_CONFIG,
            "cannot set hairpin mode and promiscuous mode at the same time",
            "choose hairpinMode or promiscMode",
        )
