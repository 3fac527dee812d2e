"""One pod's shaping on the host side: the root qdisc and ingress redirect on its host veth, its ifb.

Everything acts in the calling thread's network namespace (the node's, where
the plugin runs), except the look at the container's end of the veth, which
enters the pod's namespace to learn its peer. The ifb is named and marked
the way the reference names it (see ``ifb_name``), so either implementation
finds the other's.
"""
from __future__ import annotations

from typing import Any, Callable

from cni_plugins.bandwidth.config import Bandwidth
from cni_plugins.kernel import ip, tc
from cni_plugins.kernel.ip import find_link, open_netlink  # noqa: F401  (the plugin's netlink, through here)
from cni_plugins.kernel.names import hashed_name
from cni_plugins.kernel.nsutil import in_netns, netns_gone
from cni_plugins.kernel.tc import TcError, TokenBucket, create_ifb  # noqa: F401  (likewise)
from cni_plugins.spec.errors import ERR_INTERNAL, ERR_INVALID_CONFIG, CNIError
from cni_plugins.spec.types import Result

IFB_PREFIX = "bwp"
IFB_NAME_LENGTH = 15


def token_buckets(bw: Bandwidth, warn: Callable[[str], None] | None = None
                  ) -> tuple[TokenBucket | None, TokenBucket | None]:
    """(ingress, egress) TokenBucket or None each; a value the kernel cannot take is a config error.

    A burst too long for the kernel's buffer field at that rate is clamped to
    the most it holds, and ``warn`` says so.
    """
    out = []
    for direction, on, rate, burst in (("ingress", bw.shapes_ingress, bw.ingress_rate, bw.ingress_burst),
                                       ("egress", bw.shapes_egress, bw.egress_rate, bw.egress_burst)):
        if not on:
            out.append(None)
            continue
        try:
            bucket = TokenBucket.from_bits(rate, burst, bw.latency_ms)
        except ValueError as exc:
            raise CNIError(ERR_INVALID_CONFIG, f"invalid {direction} limits", str(exc)) from None
        if bucket.clamped and warn is not None:
            warn(f"bandwidth: {direction}Burst {burst} bits is more than tbf can hold at {rate} bit/s; "
                 f"using the largest burst it can: {bucket.burst_bytes * 8} bits")
        out.append(bucket)
    return out[0], out[1]


# ---- the names of a pod's ifb -------------------------------------------------------------

def ifb_name(network: str, container_id: str) -> str:
    """``bwp`` + sha512(network name + container ID), 15 characters: the reference's name."""
    return hashed_name(IFB_PREFIX, network + container_id, IFB_NAME_LENGTH)


def ifb_alias(network: str, container_id: str, ifname: str) -> str:
    return f"{network}/{container_id}/{ifname}"


def parse_ifb_alias(alias: str) -> tuple[str, str, str] | None:
    parts = alias.split("/")
    if len(parts) != 3 or not all(parts):
        return None
    return parts[0], parts[1], parts[2]


def stale_ifbs(ipr: Any, network: str, keep: set[str]) -> list[ip.Link]:
    """The ifbs this plugin made for pods of ``network`` whose names are not in ``keep``."""
    return [link for link in ip.list_links(ipr) if is_ifb_of(link, network) and link.name not in keep]


def is_ifb_of(link: ip.Link, network: str) -> bool:
    """Whether ``link`` is an ifb made for a pod of ``network`` (its alias and its name agree)."""
    owner = parse_ifb_alias(link.alias) if link.kind == "ifb" else None
    return owner is not None and owner[0] == network and link.name == ifb_name(network, owner[1])


# ---- the host side of the pod's veth ------------------------------------------------------

def _container_link(ifname: str) -> ip.Link | None:
    with open_netlink() as ipr:
        return find_link(ipr, ifname)


def find_host_veth(ipr: Any, netns: str, ifname: str) -> ip.Link:
    """The host-side peer of the container's ``ifname``, or raise CNIError."""
    inside = in_netns(netns, _container_link, ifname)
    if inside is None or inside.kind != "veth" or inside.peer_index <= 0:
        raise CNIError(ERR_INTERNAL, f"container interface {ifname} has no veth peer",
                       "bandwidth chains after a plugin that connects the pod with a veth pair (bridge, ptp)")
    host = ip.link_by_index(ipr, inside.peer_index)
    if host is None or host.kind != "veth" or host.peer_index != inside.index:
        raise CNIError(ERR_INTERNAL, f"veth peer with index {inside.peer_index} is not in host ns",
                       "run the plugin in the namespace that holds the host end of the pod's veth")
    return host


def host_interface(ipr: Any, netns: str, ifname: str, result: Result) -> ip.Link:
    """The host veth of the container's ``ifname``, which prevResult must list as a host interface."""
    if not result.interfaces:
        raise CNIError(ERR_INVALID_CONFIG, "no interfaces provided",
                       "prevResult must list the interfaces of the previous plugin")
    host = find_host_veth(ipr, netns, ifname)
    if not any(i.name == host.name and not i.sandbox for i in result.interfaces):
        raise CNIError(ERR_INVALID_CONFIG, "no veth peer of container interface found in host ns",
                       f"prevResult has no host interface named {host.name}")
    return host


def host_index_for_del(ipr: Any, netns: str, ifname: str) -> int | None:
    """The host veth's index, or None when the pod's namespace or interface is gone (and its qdiscs with it)."""
    if netns_gone(netns):
        return None
    try:
        return find_host_veth(ipr, netns, ifname).index
    except CNIError:
        return None


# ---- building and removing the shaping ---------------------------------------------------

def shape(index: int, bucket: tc.TokenBucket, bw: Bandwidth, match_source: bool, mtu: int) -> None:
    """The root qdisc of ``index``: htb when subnets are listed, else tbf."""
    if bw.subnets:
        tc.add_htb(index, bucket, bw.subnets, bw.subnets_are_shaped, match_source, mtu)
    else:
        tc.add_tbf(index, bucket)


def redirect_to_ifb(host_index: int, ifb_index: int) -> None:
    """Send everything the pod sends (the host veth's ingress) through the ifb."""
    tc.add_ingress_qdisc(host_index)
    tc.add_redirect_filter(host_index, ifb_index)


def is_our_root(qdisc: tc.Qdisc) -> bool:
    return qdisc.is_root and qdisc.handle == tc.ROOT_HANDLE and qdisc.kind in ("tbf", "htb")


def our_redirects(ipr: Any, index: int, ifb_index: int | None) -> list[tc.U32Filter]:
    """The ingress filters on ``index`` that redirect to our ifb (any ifb when its index is unknown)."""
    found = []
    for flt in tc.list_u32_filters(ipr, index, tc.INGRESS_HANDLE):
        if flt.redirect_to and (ifb_index is None or ifb_index in flt.redirect_to):
            found.append(flt)
    return found


def clear_host_veth(ipr: Any, host_index: int, ifb_index: int | None) -> None:
    """Remove our root qdisc and our ingress redirect from the host veth."""
    qdiscs = tc.list_qdiscs(ipr, host_index)
    for qdisc in qdiscs:
        if is_our_root(qdisc):
            tc.delete_qdisc(host_index, qdisc.handle, qdisc.parent)
    if any(q.kind == "ingress" for q in qdiscs) and our_redirects(ipr, host_index, ifb_index):
        tc.delete_qdisc(host_index, tc.INGRESS_HANDLE, tc.TC_H_INGRESS)


def teardown(ipr: Any, ifb: str, host_index: int | None) -> None:
    """Remove the pod's shaping: the host veth's qdiscs (when its index is known) and the ifb."""
    link = find_link(ipr, ifb)
    if link is not None and link.kind != "ifb":
        link = None  # not ours: a device that merely has the name is left alone
    if host_index is not None:
        clear_host_veth(ipr, host_index, link.index if link else None)
    if link is not None:
        ip.delete_link_by_name(ipr, ifb)


def remove_ifbs(ipr: Any, ifbs: list[ip.Link]) -> None:
    """Delete these ifb devices, after clearing any host veth that still redirects to one."""
    ingress_links = {q.index for q in tc.list_qdiscs(ipr) if q.kind == "ingress"}
    for ifb in ifbs:
        for index in ingress_links:
            if our_redirects(ipr, index, ifb.index):
                clear_host_veth(ipr, index, ifb.index)
        ip.delete_link_by_name(ipr, ifb.name)


# ---- checking ---------------------------------------------------------------------------

def check_root(ipr: Any, link: ip.Link, bucket: tc.TokenBucket | None, bw: Bandwidth | None, what: str) -> None:
    """The root qdisc of ``link`` shapes as configured (and none is there when nothing is)."""
    roots = [q for q in tc.list_qdiscs(ipr, link.index) if is_our_root(q)]
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


def _check_htb(ipr: Any, link: ip.Link, root: tc.Qdisc, bucket: tc.TokenBucket, bw: Bandwidth, what: str) -> None:
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
