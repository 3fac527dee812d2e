"""bandwidth: shape a pod's traffic with token buckets on the host side of its veth.

A chained plugin (after `bridge` or `ptp`), option for option the reference
plugin's:

* ``ingressRate`` / ``ingressBurst`` (bit/s, bits): traffic toward the pod,
  a tbf qdisc (handle 1:) at the root of the host-side veth;
* ``egressRate`` / ``egressBurst``: traffic from the pod. The host veth gets an
  ingress qdisc whose u32 match-all filter redirects every packet to an ifb
  device (``bwp`` + 12 hex digits of sha512(network name + container ID), as
  the reference names it), and a tbf at the ifb's root shapes it. ADD reports
  the ifb as an extra interface in the result.
* The values come from the top level of the configuration or, when none of
  them is there, from ``runtimeConfig.bandwidth`` (capability ``bandwidth``,
  same units). Rate and burst go together; a burst must stay under 4 GB.
* tbf parameters follow the reference: rate/8 bytes per second, buffer = the
  time to send burst/8 bytes at that rate, limit = rate x latency + burst.

Beyond the reference:

* ``latencyMs`` (top level, a positive number, default 25): the tbf latency
  that sizes its queue limit.
* ``unshapedSubnets`` / ``shapedSubnets`` (mutually exclusive CIDR lists, at
  the top level or in ``runtimeConfig.bandwidth`` with the rates): upstream
  added them with an htb layout and later reverted it. When one is given, the
  root qdisc is htb with class 1:30 (tc's hex: minor 48) at the configured
  rate (ceil = rate) and class 1:1 at 100 Gbit/s; u32 filters send the listed subnets to 1:1
  (unshaped) or to 1:30 (shaped), everything else goes to the default class.
  Traffic toward the pod is matched on its source address, traffic from the
  pod on its destination address: the remote end of the conversation.
* CHECK also reports shaping that is present but not configured.
* DEL also removes the qdiscs from the host veth while it still exists, and
  needs only the network name and container ID (a configuration whose rates
  do not validate can still be deleted).
* GC (cniVersion 1.1.0): every ifb this plugin creates carries the alias
  ``<network>/<containerID>/<ifname>``; GC deletes those of its network whose
  container is not among the valid attachments, after removing the qdiscs of
  any host veth still redirecting to them. Ingress-only shaping has no ifb and
  lives on the host veth, which disappears with the pod's namespace.
* Validation errors are the spec's code 7 (the reference reports 999).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cni_plugins.spec.errors import ERR_INTERNAL, ERR_INVALID_CONFIG, CNIError
from cni_plugins.spec.skel import CmdArgs, gc_attachments, prev_result

# Loaded where used, so that VERSION pays for none of them: hashlib, ipaddress, .types,
# and .tc / .netlink (which load pyroute2; .netlink is imported before any pyroute2 module).
if TYPE_CHECKING:
    from cni_plugins.kernel.tc import Link, TokenBucket
    from cni_plugins.spec.types import Result

IFB_PREFIX = "bwp"
IFB_NAME_LENGTH = 15
DEFAULT_LATENCY_MS = 25.0
MAX_BURST_BYTES = 0xFFFFFFFF
ENTRY_KEYS = ("ingressRate", "ingressBurst", "egressRate", "egressBurst", "unshapedSubnets", "shapedSubnets")


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
        raise CNIError(ERR_INVALID_CONFIG, f"failed to parse network configuration: {where}{key} must be "
                       "a non-negative integer", f"got {value!r}; rates are in bit/s, bursts in bits")
    return value


def _subnet_list(entry: dict, key: str, where: str) -> list[str]:
    value = entry.get(key) or []
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise CNIError(ERR_INVALID_CONFIG, f"failed to parse network configuration: {where}{key} must be "
                       "a list of CIDR strings", f"got {value!r}")
    return value


def _latency(conf: dict) -> float:
    value = conf.get("latencyMs", DEFAULT_LATENCY_MS)
    if value is None:
        return DEFAULT_LATENCY_MS
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 60_000:
        raise CNIError(ERR_INVALID_CONFIG, "latencyMs must be a number of milliseconds above 0 and at most 60000",
                       f"got {value!r}")
    return float(value)


def validate_rate_and_burst(direction: str, rate: int, burst: int) -> None:
    if burst == 0 and rate != 0:
        raise CNIError(ERR_INVALID_CONFIG, "if rate is set, burst must also be set",
                       f"{direction}Rate is {rate} but {direction}Burst is 0; set {direction}Burst (bits)")
    if rate == 0 and burst != 0:
        raise CNIError(ERR_INVALID_CONFIG, "if burst is set, rate must also be set",
                       f"{direction}Burst is {burst} but {direction}Rate is 0; set {direction}Rate (bit/s)")
    if burst // 8 >= MAX_BURST_BYTES:
        raise CNIError(ERR_INVALID_CONFIG, "burst cannot be more than 4GB",
                       f"{direction}Burst is {burst} bits; keep it below {MAX_BURST_BYTES * 8}")


def parse_bandwidth(conf: dict) -> Bandwidth | None:
    """The bandwidth entry in force: the top level if it names any limit, else runtimeConfig."""
    latency_ms = _latency(conf)
    if any(key in conf for key in ENTRY_KEYS):
        entry, where = conf, ""
    else:
        runtime = conf.get("runtimeConfig") or {}
        if not isinstance(runtime, dict):
            raise CNIError(ERR_INVALID_CONFIG, "failed to parse network configuration: runtimeConfig must be "
                           "an object")
        entry, where = runtime.get("bandwidth"), "runtimeConfig.bandwidth."
        if entry is None:
            return None
        if not isinstance(entry, dict):
            raise CNIError(ERR_INVALID_CONFIG, "failed to parse network configuration: runtimeConfig.bandwidth "
                           "must be an object", f"got {entry!r}")
    bw = Bandwidth(
        ingress_rate=_uint(entry, "ingressRate", where), ingress_burst=_uint(entry, "ingressBurst", where),
        egress_rate=_uint(entry, "egressRate", where), egress_burst=_uint(entry, "egressBurst", where),
        unshaped_subnets=_subnet_list(entry, "unshapedSubnets", where),
        shaped_subnets=_subnet_list(entry, "shapedSubnets", where),
        latency_ms=latency_ms,
    )
    validate_rate_and_burst("ingress", bw.ingress_rate, bw.ingress_burst)
    validate_rate_and_burst("egress", bw.egress_rate, bw.egress_burst)
    return bw


def validate_subnets(bw: Bandwidth) -> None:
    import ipaddress

    if bw.unshaped_subnets and bw.shaped_subnets:
        raise CNIError(ERR_INVALID_CONFIG, "unshapedSubnets and shapedSubnets cannot be both specified, "
                       "one of them should be discarded")
    for subnet in bw.subnets:
        try:
            ipaddress.ip_network(subnet, strict=False)
        except ValueError as exc:
            raise CNIError(ERR_INVALID_CONFIG, f"bad subnet {subnet!r} provided", str(exc)) from None
        if "/" not in subnet:
            raise CNIError(ERR_INVALID_CONFIG, f"bad subnet {subnet!r} provided",
                           "give a CIDR with a prefix length, e.g. 10.0.0.0/8")


def token_buckets(bw: Bandwidth) -> tuple[TokenBucket | None, TokenBucket | None]:
    """(ingress, egress) TokenBucket or None each; a value the kernel cannot take is a config error."""
    from cni_plugins.kernel.tc import TokenBucket

    out = []
    for direction, on, rate, burst in (("ingress", bw.shapes_ingress, bw.ingress_rate, bw.ingress_burst),
                                       ("egress", bw.shapes_egress, bw.egress_rate, bw.egress_burst)):
        if not on:
            out.append(None)
            continue
        try:
            out.append(TokenBucket.from_bits(rate, burst, bw.latency_ms))
        except ValueError as exc:
            raise CNIError(ERR_INVALID_CONFIG, f"invalid {direction} limits", str(exc)) from None
    return out[0], out[1]


# ---- naming -----------------------------------------------------------------------

def ifb_name(network: str, container_id: str) -> str:
    import hashlib

    digest = hashlib.sha512((network + container_id).encode()).hexdigest()
    return (IFB_PREFIX + digest)[:IFB_NAME_LENGTH]


def ifb_alias(network: str, container_id: str, ifname: str) -> str:
    return f"{network}/{container_id}/{ifname}"


def parse_ifb_alias(alias: str) -> tuple[str, str, str] | None:
    parts = alias.split("/")
    if len(parts) != 3 or not all(parts):
        return None
    return parts[0], parts[1], parts[2]


# ---- host side of the pod's veth ------------------------------------------------------

def _container_link(ifname: str) -> Link | None:
    from cni_plugins.kernel.netlink import IPRoute

    from cni_plugins.kernel import tc

    with IPRoute() as ipr:
        return tc.get_link(ipr, name=ifname)


def find_host_veth(ipr: Any, netns: str, ifname: str) -> Link:
    """The host-side peer of the container's ``ifname`` (a tc.Link), or raise CNIError."""
    from cni_plugins.kernel import tc
    from cni_plugins.kernel.nsutil import in_netns

    inside = in_netns(netns, _container_link, ifname)
    if inside is None or inside.kind != "veth" or inside.peer_index <= 0:
        raise CNIError(ERR_INTERNAL, f"container interface {ifname} has no veth peer",
                       "bandwidth chains after a plugin that connects the pod with a veth pair (bridge, ptp)")
    host = tc.get_link(ipr, index=inside.peer_index)
    if host is None or host.kind != "veth" or host.peer_index != inside.index:
        raise CNIError(ERR_INTERNAL, f"veth peer with index {inside.peer_index} is not in host ns",
                       "run the plugin in the namespace that holds the host end of the pod's veth")
    return host


def host_interface(ipr: Any, req: CmdArgs, result: Result) -> Link:
    if not result.interfaces:
        raise CNIError(ERR_INVALID_CONFIG, "no interfaces provided",
                       "prevResult must list the interfaces of the previous plugin")
    host = find_host_veth(ipr, req.netns, req.ifname)
    if not any(i.name == host.name and not i.sandbox for i in result.interfaces):
        raise CNIError(ERR_INVALID_CONFIG, "no veth peer of container interface found in host ns",
                       f"prevResult has no host interface named {host.name}")
    return host


# ---- building and removing the shaping ---------------------------------------------------

def _shape(index: int, bucket: TokenBucket, bw: Bandwidth, match_source: bool, mtu: int) -> None:
    from cni_plugins.kernel import tc

    if bw.subnets:
        tc.add_htb(index, bucket, bw.subnets, bw.subnets_are_shaped, match_source, mtu)
    else:
        tc.add_tbf(index, bucket)


def _is_our_root(qdisc) -> bool:
    from cni_plugins.kernel import tc

    return qdisc.is_root and qdisc.handle == tc.ROOT_HANDLE and qdisc.kind in ("tbf", "htb")


def _our_redirects(ipr: Any, index: int, ifb_index: int | None) -> list:
    """The ingress filters on ``index`` that redirect to our ifb (any ifb when its index is unknown)."""
    from cni_plugins.kernel import tc

    found = []
    for flt in tc.list_u32_filters(ipr, index, tc.INGRESS_HANDLE):
        if flt.redirect_to and (ifb_index is None or ifb_index in flt.redirect_to):
            found.append(flt)
    return found


def clear_host_veth(ipr: Any, host_index: int, ifb_index: int | None) -> None:
    """Remove our root qdisc and our ingress redirect from the host veth."""
    from cni_plugins.kernel import tc

    qdiscs = tc.list_qdiscs(ipr, host_index)
    for qdisc in qdiscs:
        if _is_our_root(qdisc):
            tc.delete_qdisc(host_index, qdisc.handle, qdisc.parent)
    if any(q.kind == "ingress" for q in qdiscs) and _our_redirects(ipr, host_index, ifb_index):
        tc.delete_qdisc(host_index, tc.INGRESS_HANDLE, tc.TC_H_INGRESS)


def teardown(ipr: Any, ifb: str, host_index: int | None) -> None:
    from cni_plugins.kernel import tc

    link = tc.get_link(ipr, name=ifb)
    if link is not None and link.kind != "ifb":
        link = None  # not ours: a device that merely has the name is left alone
    if host_index is not None:
        clear_host_veth(ipr, host_index, link.index if link else None)
    if link is not None:
        tc.delete_link(ipr, ifb)


# ---- commands -----------------------------------------------------------------------

def cmd_add(req: CmdArgs) -> Result:
    from cni_plugins.spec.types import Interface, Result

    bw = parse_bandwidth(req.conf)
    previous = prev_result(req)
    if bw is None or bw.is_zero():
        return previous if previous is not None else Result(cni_version=req.cni_version)
    validate_subnets(bw)
    if previous is None:
        raise CNIError(ERR_INVALID_CONFIG, "must be called as chained plugin",
                       "list bandwidth after bridge (or ptp) in a .conflist so it receives prevResult")
    ingress, egress = token_buckets(bw)

    from cni_plugins.kernel.netlink import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    from cni_plugins.kernel import tc

    name = ifb_name(req.network_name, req.container_id)
    with IPRoute() as ipr:
        host = host_interface(ipr, req, previous)
        teardown(ipr, name, host.index)  # a repeated ADD starts from a clean slate
        try:
            if ingress is not None:
                _shape(host.index, ingress, bw, match_source=True, mtu=host.mtu)
            if egress is not None:
                ifb = tc.create_ifb(ipr, name, host.mtu,
                                    ifb_alias(req.network_name, req.container_id, req.ifname),
                                    txqlen=max(host.txqlen, 1000) if bw.subnets else 0)
                previous.interfaces.append(Interface(name=ifb.name, mac=ifb.mac))
                tc.add_ingress_qdisc(host.index)
                tc.add_redirect_filter(host.index, ifb.index)
                _shape(ifb.index, egress, bw, match_source=False, mtu=host.mtu)
        except (tc.TcError, NetlinkError) as exc:
            teardown(ipr, name, host.index)
            raise CNIError(ERR_INTERNAL, f"shaping {host.name} failed: {exc}",
                           f"the ifb device is {name}; everything this ADD created was removed") from None
        except BaseException:
            teardown(ipr, name, host.index)
            raise
    return previous


def _host_index_for_del(ipr: Any, req: CmdArgs) -> int | None:
    from cni_plugins.kernel.nsutil import netns_gone

    if netns_gone(req.netns):
        return None
    try:
        return find_host_veth(ipr, req.netns, req.ifname).index
    except CNIError:
        return None  # the pod's interface is gone: its veth and qdiscs went with it


def cmd_del(req: CmdArgs) -> None:
    from cni_plugins.kernel.netlink import IPRoute

    with IPRoute() as ipr:
        teardown(ipr, ifb_name(req.network_name, req.container_id), _host_index_for_del(ipr, req))
    return None


def _check_root(ipr: Any, link: Link, bucket: TokenBucket | None, bw: Bandwidth | None, what: str) -> None:
    from cni_plugins.kernel import tc

    roots = [q for q in tc.list_qdiscs(ipr, link.index) if _is_our_root(q)]
    if bucket is None:
        if roots:
            raise CNIError(ERR_INTERNAL, f"{what} shaping found on {link.name} but none is configured",
                           "run DEL and ADD again")
        return
    if not roots:
        raise CNIError(ERR_INTERNAL, f"Failed to find qdisc for {what} shaping on {link.name}")
    root = roots[0]
    if bw is not None and bw.subnets:
        _check_htb(ipr, link, root, bucket, bw, what)
        return
    if root.kind != "tbf":
        raise CNIError(ERR_INTERNAL, f"{what} qdisc on {link.name} is {root.kind}, expected tbf")
    for key, want in (("rate", bucket.rate), ("limit", bucket.limit), ("buffer", bucket.buffer)):
        if root.options.get(key) != want:
            raise CNIError(ERR_INTERNAL, f"{key.capitalize()} doesn't match",
                           f"{what} tbf on {link.name} has {key} {root.options.get(key)}, config wants {want}")


def _check_htb(ipr: Any, link: Link, root: Any, bucket: TokenBucket, bw: Bandwidth, what: str) -> None:
    from cni_plugins.kernel import tc

    if root.kind != "htb":
        raise CNIError(ERR_INTERNAL, f"{what} qdisc on {link.name} is {root.kind}, expected htb for subnets")
    default = tc.UNSHAPED_CLASS if bw.subnets_are_shaped else tc.SHAPED_CLASS
    if root.options.get("default") != default & 0xFFFF:
        raise CNIError(ERR_INTERNAL, "Default class does not match",
                       f"{what} htb on {link.name} defaults to 1:{root.options.get('default'):x}")
    classes = {c.handle: c for c in tc.list_htb_classes(ipr, link.index)}
    shaped = classes.get(tc.SHAPED_CLASS)
    if shaped is None or tc.UNSHAPED_CLASS not in classes:
        raise CNIError(ERR_INTERNAL, f"htb classes missing on {link.name}", "expected 1:1 (unshaped) and 1:30 (shaped)")
    if shaped.rate != bucket.rate or shaped.buffer != bucket.buffer:
        raise CNIError(ERR_INTERNAL, "Rate or burst does not match for the shaped class",
                       f"{link.name}: rate {shaped.rate} buffer {shaped.buffer}, config wants "
                       f"{bucket.rate} and {bucket.buffer}")
    filters = tc.list_u32_filters(ipr, link.index, tc.ROOT_HANDLE)
    if len(filters) != len(bw.subnets):
        raise CNIError(ERR_INTERNAL, f"subnet filters on {link.name} do not match the configuration",
                       f"{len(filters)} filters for {len(bw.subnets)} subnets")


def cmd_check(req: CmdArgs) -> None:
    bw = parse_bandwidth(req.conf)
    previous = prev_result(req)
    if previous is None:
        raise CNIError(ERR_INVALID_CONFIG, "must be called as a chained plugin",
                       "CHECK needs the prevResult of the ADD it checks")
    if bw is not None:
        validate_subnets(bw)
    ingress, egress = token_buckets(bw) if bw is not None else (None, None)

    from cni_plugins.kernel.netlink import IPRoute

    from cni_plugins.kernel import tc

    name = ifb_name(req.network_name, req.container_id)
    with IPRoute() as ipr:
        host = host_interface(ipr, req, previous)
        _check_root(ipr, host, ingress, bw, "ingress")
        ifb = tc.get_link(ipr, name=name)
        if egress is None:
            if ifb is not None:
                raise CNIError(ERR_INTERNAL, f"ifb device {name} exists but no egress shaping is configured",
                               "run DEL and ADD again")
            return None
        if ifb is None:
            raise CNIError(ERR_INTERNAL, f"get ifb device: {name} not found", "run DEL and ADD again")
        if not _our_redirects(ipr, host.index, ifb.index):
            raise CNIError(ERR_INTERNAL, f"no filter on {host.name} redirects its traffic to {name}",
                           "run DEL and ADD again")
        _check_root(ipr, ifb, egress, bw, "egress")
    return None


def cmd_gc(req: CmdArgs) -> None:
    from cni_plugins.kernel.netlink import IPRoute

    from cni_plugins.kernel import tc

    from cni_plugins.spec.skel import GC_ATTACHMENT_KEYS

    if not any(key in req.conf for key in GC_ATTACHMENT_KEYS):
        return None  # no list of valid attachments: nothing can be judged stale
    network = req.network_name
    keep = {ifb_name(network, container_id) for container_id, _ifname in gc_attachments(req.conf)}
    with IPRoute() as ipr:
        links = tc.list_links(ipr)
        stale = []
        for link in links:
            owner = parse_ifb_alias(link.alias) if link.kind == "ifb" else None
            if owner is None or owner[0] != network or link.name != ifb_name(network, owner[1]):
                continue
            if link.name not in keep:
                stale.append(link)
        if not stale:
            return None
        ingress_links = {q.index for q in tc.list_qdiscs(ipr) if q.kind == "ingress"}
        for ifb in stale:
            for index in ingress_links:
                if _our_redirects(ipr, index, ifb.index):
                    clear_host_veth(ipr, index, ifb.index)
            tc.delete_link(ipr, ifb.name)
    return None

