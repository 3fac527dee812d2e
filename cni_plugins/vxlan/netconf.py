"""The vxlan plugin's configuration, and the bridge configuration it derives from the node's lease.

Like flannel's CNI plugin, this plugin does no link work of its own: it turns
the node's overlay state (leased subnet, gateway, MTU, bridge; written by the
node agent) into a ``bridge`` network configuration with ``host-local`` IPAM
and hands that to the bridge plugin. ``derive_delegate`` is that translation;
``fallback_delegate`` is what DEL and GC can still build when neither the
state nor a cached delegate survives (a reboot wiped /run): enough for the
bridge to delete the container interface and for host-local to release the
container's addresses, which it finds by container ID whatever the range.

Options (all optional)::

    stateDir          the node agent's --state-dir (default /run/pycni); delegates are cached
                      under <stateDir>/vxlan/
    dataDir           host-local's data directory (default /var/lib/cni/networks; ipam.dataDir
                      is read too)
    mtu               pod MTU (default: the overlay's, from the node state)
    hairpinMode       default true
    isDefaultGateway  default true: a default route via the node's bridge; false leaves only
                      the route to the cluster network
    bridge            the bridge to attach to (default: the node state's)
    ipam              extra IPAM keys: type (default host-local), routes (added before the
                      cluster route), resolvConf...; never the range, which is the node's lease
    delegate          more bridge options, as flannel's "delegate" (e.g. ipMasq, macspoofchk);
                      they override the derived ones
    dns               passed to the bridge
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cni_plugins.spec.decode import COMMON, ListOf, Schema, get_field
from cni_plugins.spec.errors import ERR_DECODE, ERR_INVALID_CONFIG, CNIError
from cni_plugins.spec.skel import validate_link_name

if TYPE_CHECKING:
    from cni_plugins.shared.overlaystate import OverlayState

DEFAULT_STATE_DIR = "/run/pycni"
DEFAULT_DATA_DIR = "/var/lib/cni/networks"
DEFAULT_BRIDGE = "pycni0"  # the agent's default; only used when nothing better is known (DEL, GC)
DEFAULT_IPAM = "host-local"
DELEGATE_TYPE = "bridge"
# host-local releases and collects by container ID: any well-formed range serves when
# the real one is unknown. TEST-NET-1, so it can never be mistaken for a pod subnet.
PLACEHOLDER_SUBNET = "192.0.2.0/24"
# Keys of the request's configuration that travel to the delegate as they are.
REQUEST_KEYS = ("runtimeConfig", "args", "prevResult", "cni.dev/valid-attachments", "cni.dev/attachments")
# Keys of "delegate" that the plugin owns; the rest are bridge options and override the derived ones.
_OWNED_KEYS = ("name", "cniVersion", "ipam")
_IPAM_DERIVED_KEYS = ("ranges", "subnet", "rangeStart", "rangeEnd", "gateway", "dataDir")


# The plugin's own options with their JSON types, decoded by the skeleton (any letter case,
# null = absent, a wrong type is error 7); "delegate" holds bridge options, checked by the bridge.
SCHEMA = COMMON.extend(
    stateDir=str,
    dataDir=str,
    mtu=int,
    hairpinMode=bool,
    isDefaultGateway=bool,
    bridge=str,
    ipam=Schema({"type": str, "routes": ListOf(dict), "dataDir": str, "resolvConf": str}),
    delegate=dict,
)


@dataclass
class VxlanConf:
    name: str
    cni_version: str
    state_dir: str = DEFAULT_STATE_DIR
    data_dir: str = DEFAULT_DATA_DIR
    mtu: int = 0  # 0: the overlay's MTU from the node state
    hairpin_mode: bool = True
    is_default_gateway: bool = True
    bridge: str = ""  # "": the node state's bridge
    ipam: dict[str, Any] = field(default_factory=dict)  # extra IPAM keys (type, routes, resolvConf...)
    delegate: dict[str, Any] = field(default_factory=dict)  # extra bridge options, as flannel's "delegate"
    dns: dict[str, Any] | None = None

    @property
    def ipam_type(self) -> str:
        return self.ipam.get("type") or DEFAULT_IPAM


def _get(conf: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    return get_field(conf, key, kind, default)


def _directory(conf: dict[str, Any], key: str, default: str) -> str:
    value = _get(conf, key, str, "") or default
    if not os.path.isabs(value) or "\x00" in value:
        raise CNIError(
            ERR_INVALID_CONFIG,
            f"{key} must be an absolute path, got {value!r}",
            "a plugin's working directory is whatever the runtime left it; give the full path",
        )
    return os.path.normpath(value)


def load_conf(conf: dict[str, Any], cni_version: str) -> VxlanConf:
    """Read and validate the vxlan plugin's own keys."""
    n = VxlanConf(name=conf.get("name", ""), cni_version=cni_version)
    n.state_dir = _directory(conf, "stateDir", DEFAULT_STATE_DIR)
    ipam = _get(conf, "ipam", dict, {})
    n.data_dir = _directory(conf if conf.get("dataDir") else ipam, "dataDir", DEFAULT_DATA_DIR)
    n.mtu = _get(conf, "mtu", int, 0)
    if n.mtu and not 68 <= n.mtu <= 65535:
        raise CNIError(
            ERR_INVALID_CONFIG,
            f"invalid MTU {n.mtu}",
            "an MTU is between 68 and 65535; leave mtu out to use the overlay's MTU from the node agent",
        )
    n.hairpin_mode = _get(conf, "hairpinMode", bool, True)
    n.is_default_gateway = _get(conf, "isDefaultGateway", bool, True)
    n.bridge = _get(conf, "bridge", str, "")
    if n.bridge:
        validate_link_name(n.bridge, "bridge name")

    n.ipam = {k: v for k, v in ipam.items() if k not in _IPAM_DERIVED_KEYS}
    ipam_type = n.ipam.get("type", DEFAULT_IPAM)
    if not isinstance(ipam_type, str) or not ipam_type:
        raise CNIError(ERR_INVALID_CONFIG, "ipam.type must be a plugin name", f"got {ipam_type!r}")
    if n.ipam.get("routes") is not None and not isinstance(n.ipam["routes"], list):
        raise CNIError(ERR_DECODE, "failed to load netconf: ipam.routes must be a list of routes")
    derived = sorted(k for k in ipam if k in _IPAM_DERIVED_KEYS and k != "dataDir")
    if derived:
        raise CNIError(
            ERR_INVALID_CONFIG,
            f"ipam.{derived[0]} cannot be set for a vxlan network",
            "the pod range is the node's leased subnet, which the node agent assigns",
        )

    delegate = _get(conf, "delegate", dict, {})
    if delegate.get("type", DELEGATE_TYPE) != DELEGATE_TYPE:
        raise CNIError(
            ERR_INVALID_CONFIG,
            f"delegate type {delegate.get('type')!r} is not supported",
            "pods of a vxlan network attach to the node's bridge: leave delegate.type out",
        )
    owned = sorted(k for k in delegate if k in _OWNED_KEYS)
    if owned:
        raise CNIError(
            ERR_INVALID_CONFIG,
            f"delegate.{owned[0]} cannot be set",
            "name and cniVersion come from the network configuration, ipam from the node's lease",
        )
    n.delegate = {k: v for k, v in delegate.items() if k != "type"}
    n.dns = _get(conf, "dns", dict, None)
    return n


def derive_delegate(n: VxlanConf, state: OverlayState) -> dict[str, Any]:
    """The bridge configuration for a pod on this node: flannel's delegate, from the overlay state.

    On a dual-stack node the pod gets an address of each family (host-local, one range per family), a
    route to each cluster network and, with isDefaultGateway, a default route of each family.
    """
    pools = state.pools()  # a dual-stack node: one range per family, and a route to each cluster network
    routes = list(n.ipam.get("routes") or []) + [{"dst": network} for network, _subnet, _gw in pools]
    ipam = dict(n.ipam)
    ipam.update(
        {
            "type": n.ipam_type,
            "dataDir": n.data_dir,
            "ranges": [[{"subnet": subnet, "gateway": gateway}] for _network, subnet, gateway in pools],
            "routes": routes,
        }
    )
    conf: dict[str, Any] = {
        "cniVersion": n.cni_version,
        "name": n.name,
        "type": DELEGATE_TYPE,
        "bridge": n.bridge or state.bridge,
        "isGateway": True,
        "isDefaultGateway": n.is_default_gateway,
        # The node agent masquerades what leaves the cluster network; pod<->pod and
        # pod<->node traffic keeps the pod's own address.
        "ipMasq": False,
        "mtu": n.mtu or state.mtu,
        "hairpinMode": n.hairpin_mode,
        "ipam": ipam,
    }
    if n.dns:
        conf["dns"] = n.dns
    conf.update(n.delegate)
    return conf


def fallback_delegate(n: VxlanConf) -> dict[str, Any]:
    """What DEL and GC can build without the node state or a cached delegate."""
    ipam = dict(n.ipam)
    ipam.update({"type": n.ipam_type, "dataDir": n.data_dir, "ranges": [[{"subnet": PLACEHOLDER_SUBNET}]]})
    ipam.pop("routes", None)
    conf: dict[str, Any] = {
        "cniVersion": n.cni_version,
        "name": n.name,
        "type": DELEGATE_TYPE,
        "bridge": n.bridge or DEFAULT_BRIDGE,
        "ipMasq": False,
        "ipam": ipam,
    }
    conf.update({k: v for k, v in n.delegate.items() if k in ("ipMasq", "ipMasqBackend", "macspoofchk")})
    return conf


def delegate_request(delegate: dict[str, Any], request_conf: dict[str, Any], cni_version: str) -> dict[str, Any]:
    """A delegate configuration with this request's runtime keys (runtimeConfig, prevResult...) added."""
    conf = dict(delegate)
    conf["cniVersion"] = cni_version
    for key in REQUEST_KEYS:
        if key in request_conf:
            conf[key] = request_conf[key]
    return conf


def delegate_subnet(delegate: dict[str, Any]) -> str | None:
    """The pod subnet a (cached) delegate configuration allocates from."""
    try:
        return delegate["ipam"]["ranges"][0][0]["subnet"]
    except (KeyError, IndexError, TypeError):
        return None
