"""One pod's shaping on the host side: the root qdisc and ingress redirect on its host veth, its ifb.

Everything acts in the calling thread's network namespace (the node's, where
the plugin runs), except the look at the container's end of the veth, which
enters the pod's namespace to learn its peer. The ifb is named and marked
the way the reference names it (see ``ifb_name``), so either implementation
finds the other's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from cni_plugins.bandwidth.config import Bandwidth
from cni_plugins.kernel import ip, rtnl, tc
from cni_plugins.kernel.ip import find_link, open_rtnl
from cni_plugins.kernel.names import hashed_name
from cni_plugins.kernel.nsutil import in_netns, netns_gone
from cni_plugins.kernel.tc import TcError, TokenBucket
from cni_plugins.spec.errors import ERR_INTERNAL, ERR_INVALID_CONFIG, CNIError
from cni_plugins.spec.types import Result

IFB_PREFIX = "bwp"
IFB_NAME_LENGTH = 15


def token_buckets(
    bw: Bandwidth, warn: Callable[[str], None] | None = None
) -> tuple[TokenBucket | None, TokenBucket | None]:
    """(ingress, egress) TokenBucket or None each; a value the kernel cannot take is a config error.

    A burst too long for the kernel's buffer field at that rate is clamped to
    the most it holds, and ``warn`` says so.
    """
    out = []
    for direction, on, rate, burst in (
        ("ingress", bw.shapes_ingress, bw.ingress_rate, bw.ingress_burst),
        ("egress", bw.shapes_egress, bw.egress_rate, bw.egress_burst),
    ):
        if not on:
            out.append(None)
            continue
        try:
            bucket = TokenBucket.from_bits(rate, burst, bw.latency_ms)
        except ValueError as exc:
            raise CNIError(ERR_INVALID_CONFIG, f"invalid {direction} limits", str(exc)) from None
        if bucket.clamped and warn is not None:
            warn(
                f"bandwidth: {direction}Burst {burst} bits is more than tbf can hold at {rate} bit/s; "
                f"using the largest burst it can: {bucket.burst_bytes * 8} bits"
            )
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


def stale_ifbs(ipr: rtnl.Rtnl, network: str, keep: set[str]) -> list[ip.Link]:
    """The ifbs this plugin made for pods of ``network`` whose names are not in ``keep``."""
    return [link for link in ip.list_links(ipr) if is_ifb_of(link, network) and link.name not in keep]


def is_ifb_of(link: ip.Link, network: str) -> bool:
    """Whether ``link`` is an ifb made for a pod of ``network`` (its alias and its name agree)."""
    owner = parse_ifb_alias(link.alias) if link.kind == "ifb" else None
    return owner is not None and owner[0] == network and link.name == ifb_name(network, owner[1])


# ---- the host side of the pod's veth ------------------------------------------------------


def _container_link(ifname: str) -> ip.Link | None:
    with open_rtnl() as ipr:
        return find_link(ipr, ifname)


def _container_end(netns: str, ifname: str) -> ip.Link:
    inside = in_netns(netns, _container_link, ifname)
    if inside is None or inside.kind != "veth" or inside.peer_index <= 0:
        raise CNIError(
            ERR_INTERNAL,
            f"container interface {ifname} has no veth peer",
            "bandwidth chains after a plugin that connects the pod with a veth pair (bridge, ptp)",
        )
    return inside


def _check_peer(host: ip.Link | None, inside: ip.Link) -> ip.Link:
    if host is None or host.kind != "veth" or host.peer_index != inside.index:
        raise CNIError(
            ERR_INTERNAL,
            f"veth peer with index {inside.peer_index} is not in host ns",
            "run the plugin in the namespace that holds the host end of the pod's veth",
        )
    return host


def _check_listed(host: ip.Link, result: Result) -> None:
    """prevResult must list ``host`` as a host interface."""
    if not any(i.name == host.name and not i.sandbox for i in result.interfaces):
        raise CNIError(
            ERR_INVALID_CONFIG,
            "no veth peer of container interface found in host ns",
            f"prevResult has no host interface named {host.name}",
        )


def _check_interfaces(result: Result) -> None:
    if not result.interfaces:
        raise CNIError(
            ERR_INVALID_CONFIG, "no interfaces provided", "prevResult must list the interfaces of the previous plugin"
        )


def host_interface(ipr: rtnl.Rtnl, netns: str, ifname: str, result: Result) -> ip.Link:
    """The host veth of the container's ``ifname``, which prevResult must list as a host interface."""
    _check_interfaces(result)
    inside = _container_end(netns, ifname)
    host = _check_peer(ip.link_by_index(ipr, inside.peer_index), inside)
    _check_listed(host, result)
    return host


# ---- what is there: one look (plain rtnetlink socket) -------------------------------------


@dataclass
class Survey:
    """The pod's host veth and the shaping found on it: its root qdisc, whether it has an ingress qdisc,
    and the pod's ifb (None when there is none, or the name belongs to a device that is not an ifb)."""

    host: ip.Link
    root: tc.Qdisc | None
    ingress: bool
    ifb: ip.Link | None

    @property
    def shaped(self) -> bool:
        return self.ifb is not None or self.ingress or (self.root is not None and is_our_root(self.root))


def _look_requests(host_index: int, ifb: str) -> list[rtnl.Request]:
    """The pod's ifb, the root and the ingress qdisc of its host veth: read them with ``_survey_from``."""
    return [
        rtnl.get_link(name=ifb),
        tc.get_qdisc_request(host_index, tc.TC_H_ROOT),
        tc.get_qdisc_request(host_index, tc.TC_H_INGRESS),
    ]


def _survey_from(host: ip.Link, answers: list[rtnl.Answer]) -> Survey:
    link, root, ingress = answers
    ifb = ip.link_from(link)
    ingress_qdisc = tc.qdisc_at(ingress)
    return Survey(
        host=host,
        root=tc.qdisc_at(root),
        ingress=ingress_qdisc is not None and ingress_qdisc.kind == "ingress",
        ifb=ifb if ifb is not None and ifb.kind == "ifb" else None,
    )


def survey(ipr: rtnl.Rtnl, netns: str, ifname: str, ifb: str, result: Result | None = None) -> Survey:
    """The host veth of the container's ``ifname`` and the shaping there (one round trip in the pod's
    namespace, one here). With ``result`` (ADD), prevResult must list that veth as ``host_interface`` checks."""
    if result is not None:
        _check_interfaces(result)
    inside = _container_end(netns, ifname)
    answers = ipr.run([rtnl.get_link(index=inside.peer_index)] + _look_requests(inside.peer_index, ifb))
    host = _check_peer(ip.link_from(answers[0]), inside)
    if result is not None:
        _check_listed(host, result)
    return _survey_from(host, answers[1:])


def survey_at(ipr: rtnl.Rtnl, host: ip.Link, ifb: str) -> Survey:
    """The shaping on a host veth already known."""
    return _survey_from(host, ipr.run(_look_requests(host.index, ifb)))


# ---- building and removing the shaping ---------------------------------------------------


def clear(ipr: rtnl.Rtnl, found: Survey) -> None:
    """Remove what ``survey`` found: our root qdisc, our ingress redirect and the ifb (in one round trip)."""
    index = found.host.index
    requests = []
    if found.root is not None and is_our_root(found.root):
        requests.append(tc.delete_qdisc_request(index, found.root.handle, found.root.parent))
    if found.ingress and our_redirects(ipr, index, found.ifb.index if found.ifb else None):
        requests.append(tc.delete_qdisc_request(index, tc.INGRESS_HANDLE, tc.TC_H_INGRESS))
    if found.ifb is not None:
        requests.append(rtnl.delete_link(found.ifb.index))
    for request, answer in zip(requests, ipr.run(requests)):
        if not answer.error:
            continue
        if request.kind == tc.RTM_DELQDISC:
            if not tc.qdisc_gone(answer.error):
                raise TcError(answer.what, answer.error)
        elif answer.error != ip.ENODEV:
            answer.check()


def teardown(ipr: rtnl.Rtnl, ifb: str, host: ip.Link | None) -> None:
    """Remove the pod's shaping: the host veth's qdiscs (when it is known) and the ifb."""
    if host is not None:
        clear(ipr, survey_at(ipr, host, ifb))
        return
    link = find_link(ipr, ifb)
    if link is not None and link.kind == "ifb":  # a device that merely has the name is left alone
        ip.delete_link_by_name(ipr, ifb)


def remove(ipr: rtnl.Rtnl, netns: str, ifname: str, ifb: str) -> None:
    """DEL: the pod's shaping, found through its veth while the pod's namespace and interface are there
    (else only its ifb: the host veth and its qdiscs went with the pod's namespace)."""
    found = None
    if not netns_gone(netns):
        try:
            found = survey(ipr, netns, ifname, ifb)
        except CNIError:
            found = None  # the pod's interface is gone, and its qdiscs with it
    if found is not None:
        clear(ipr, found)
    else:
        teardown(ipr, ifb, None)


def shape_requests(
    index: int, bucket: tc.TokenBucket, bw: Bandwidth, match_source: bool, mtu: int
) -> list[rtnl.Request]:
    """The root qdisc of ``index``: htb (with its classes and filters) when subnets are listed, else tbf."""
    if bw.subnets:
        return tc.htb_requests(index, bucket, bw.subnets, bw.subnets_are_shaped, match_source, mtu)
    return [tc.tbf_request(index, bucket)]


def build(
    ipr: rtnl.Rtnl,
    host: ip.Link,
    ifb: str,
    alias: str,
    ingress: tc.TokenBucket | None,
    egress: tc.TokenBucket | None,
    bw: Bandwidth,
) -> ip.Link | None:
    """The pod's shaping in two round trips (one without egress shaping); the new ifb, if any.

    First the shaping toward the pod (the host veth's root qdisc) and the ifb;
    then the ifb's alias, the host veth's ingress qdisc with its redirect to
    the ifb, and the ifb's root qdisc. TcError for the first request the kernel
    refused; the ones after it ran all the same, so the caller tears down.
    """
    first = shape_requests(host.index, ingress, bw, True, host.mtu) if ingress is not None else []
    if egress is None:
        tc.run(ipr, first)
        return None
    answers = ipr.run(first + tc.ifb_requests(ifb, host.mtu, txqlen=max(host.txqlen, 1000) if bw.subnets else 0))
    failed = rtnl.first_failure(answers[:-2])
    if failed is not None:
        raise TcError(failed.what, failed.error)
    link = tc.ifb_created(answers[-2:], ifb)
    second = [replace(rtnl.set_link(link.index, alias=alias), what=f"create ifb {ifb}")] if alias else []
    second += [tc.ingress_request(host.index), tc.redirect_request(host.index, link.index)]
    second += shape_requests(link.index, egress, bw, False, host.mtu)
    tc.run(ipr, second)
    link.alias = alias or link.alias
    return link


def is_our_root(qdisc: tc.Qdisc) -> bool:
    return qdisc.is_root and qdisc.handle == tc.ROOT_HANDLE and qdisc.kind in ("tbf", "htb")


def our_redirects(ipr: rtnl.Rtnl, index: int, ifb_index: int | None) -> list[tc.U32Filter]:
    """The ingress filters on ``index`` that redirect to our ifb (any ifb when its index is unknown)."""
    found = []
    for flt in tc.list_u32_filters(ipr, index, tc.INGRESS_HANDLE):
        if flt.redirect_to and (ifb_index is None or ifb_index in flt.redirect_to):
            found.append(flt)
    return found


def remove_ifbs(ipr: rtnl.Rtnl, ifbs: list[ip.Link]) -> None:
    """Delete these ifb devices, after clearing any host veth that still redirects to one."""
    ingress_links = {q.index for q in tc.list_qdiscs(ipr) if q.kind == "ingress"}
    for ifb in ifbs:
        for index in ingress_links:
            if our_redirects(ipr, index, ifb.index):
                host = ip.link_by_index(ipr, index)
                if host is not None:
                    clear(ipr, survey_at(ipr, host, ifb.name))
        ip.delete_link_by_name(ipr, ifb.name)


# ---- checking ---------------------------------------------------------------------------


def check_root(ipr: rtnl.Rtnl, link: ip.Link, bucket: tc.TokenBucket | None, bw: Bandwidth | None, what: str) -> None:
    """The root qdisc of ``link`` shapes as configured (and none is there when nothing is)."""
    roots = [q for q in tc.list_qdiscs(ipr, link.index) if is_our_root(q)]
    if bucket is None:
        if roots:
            raise CNIError(
                ERR_INTERNAL, f"{what} shaping found on {link.name} but none is configured", "run DEL and ADD again"
            )
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
            raise CNIError(
                ERR_INTERNAL,
                f"{key.capitalize()} doesn't match",
                f"{what} tbf on {link.name} has {key} {root.options.get(key)}, config wants {want}",
            )


def _check_htb(ipr: rtnl.Rtnl, link: ip.Link, root: tc.Qdisc, bucket: tc.TokenBucket, bw: Bandwidth, what: str) -> None:
    if root.kind != "htb":
        raise CNIError(ERR_INTERNAL, f"{what} qdisc on {link.name} is {root.kind}, expected htb for subnets")
    default = tc.UNSHAPED_CLASS if bw.subnets_are_shaped else tc.SHAPED_CLASS
    if root.options.get("default") != default & 0xFFFF:
        raise CNIError(
            ERR_INTERNAL,
            "Default class does not match",
            f"{what} htb on {link.name} defaults to 1:{root.options.get('default'):x}",
        )
    classes = {c.handle: c for c in tc.list_htb_classes(ipr, link.index)}
    shaped = classes.get(tc.SHAPED_CLASS)
    if shaped is None or tc.UNSHAPED_CLASS not in classes:
        raise CNIError(ERR_INTERNAL, f"htb classes missing on {link.name}", "expected 1:1 (unshaped) and 1:30 (shaped)")
    if shaped.rate != bucket.rate or shaped.buffer != bucket.buffer:
        raise CNIError(
            ERR_INTERNAL,
            "Rate or burst does not match for the shaped class",
            f"{link.name}: rate {shaped.rate} buffer {shaped.buffer}, config wants {bucket.rate} and {bucket.buffer}",
        )
    filters = tc.list_u32_filters(ipr, link.index, tc.ROOT_HANDLE)
    if len(filters) != len(bw.subnets):
        raise CNIError(
            ERR_INTERNAL,
            f"subnet filters on {link.name} do not match the configuration",
            f"{len(filters)} filters for {len(bw.subnets)} subnets",
        )
