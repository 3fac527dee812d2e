"""Traffic-control mechanics for the bandwidth plugin.

Queueing disciplines, classes and filters are built here as rtnetlink
messages (``*_request``: the same bytes pyroute2's ``tcmsg`` encodes for the
same parameters, which the unit tests check) and sent on a plain rtnetlink
socket (``kernel.rtnl``) of the calling thread's network namespace, several
in one round trip (``run``). We encode the parameters ourselves instead of
going through ``IPRoute.tc()`` because that helper recomputes tbf/htb buffers
(with its own rounding and rate tables) from rate and burst, while the plugin
must program exactly the values the reference plugin programs, so that ``tc``
shows the same qdiscs for the same configuration.

Units: rates in bytes per second, buffers in psched ticks, limits in bytes,
as the kernel takes them. ``TokenBucket.from_bits`` converts the CNI options
(bits per second, bits) with the reference plugin's arithmetic.

Links (the ifb devices included) are ``kernel.ip.Link``s, looked up with
``ip.find_link`` / ``ip.link_by_index`` (None when missing), like everywhere
else. Nothing here imports pyroute2.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable

from cni_plugins.kernel import ip, rtnl

TC_H_ROOT = 0xFFFFFFFF
TC_H_INGRESS = 0xFFFFFFF1
INGRESS_HANDLE = 0xFFFF0000
ROOT_HANDLE = 0x00010000  # "1:"
TIME_UNITS_PER_SEC = 1_000_000
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
U32_MAX = 0xFFFFFFFF

# htb layout for shaped/unshaped subnets (the handles upstream's htb variant used)
UNSHAPED_CLASS = 0x00010001  # 1:1, effectively unlimited
SHAPED_CLASS = 0x00010030  # 1:30 as tc shows it (minor 48), the configured rate
UNCAPPED_RATE_BYTES = 100_000_000_000 // 8  # 100 Gbit/s
HTB_PRIO_IPV4 = 16
HTB_PRIO_IPV6 = 15  # u32 cannot mix protocols under one preference
HTB_QUANTUM_MIN, HTB_QUANTUM_MAX = 1_000, 200_000


class TcError(Exception):
    """A traffic-control operation the kernel refused."""

    def __init__(self, what: str, err: int) -> None:
        super().__init__(f"{what}: {os.strerror(err)}")
        self.errno = err


# ---- parameter arithmetic ----------------------------------------------------


@lru_cache(maxsize=1)
def tick_in_usec() -> float:
    """Kernel packet-scheduler ticks per microsecond (from /proc/net/psched)."""
    with open("/proc/net/psched", encoding="ascii") as f:
        t2us, us2t, clock_res = (int(x, 16) for x in f.read().split()[:3])
    return t2us / us2t * (clock_res / TIME_UNITS_PER_SEC)


def time_to_ticks(usec: int) -> int:
    return int(usec * tick_in_usec())


def ticks_to_usec(ticks: int) -> float:
    return ticks / tick_in_usec()


@dataclass(frozen=True)
class TokenBucket:
    """tbf (or htb class) parameters as the kernel takes them."""

    rate: int  # bytes per second
    buffer: int  # ticks needed to send one full burst at `rate`
    limit: int  # bytes queued at most (rate * latency + burst)
    clamped: bool = field(default=False, compare=False)  # the burst asked for did not fit; buffer is the most

    @classmethod
    def from_bits(cls, rate_bits: int, burst_bits: int, latency_ms: float) -> "TokenBucket":
        """The reference plugin's conversion (integer truncation where Go truncates).

        Raises ValueError when a value does not fit the kernel's 32-bit fields. A
        burst that takes longer than the buffer field can hold to send at ``rate``
        is clamped to that maximum (``clamped``): runtimes send "no burst limit" as
        2^32-1 bits (containerd does for every bandwidth annotation), which the
        reference accepts by letting the field wrap around to an arbitrary value.
        """
        rate = rate_bits // 8
        burst = burst_bits // 8
        if rate <= 0:
            raise ValueError(f"rate {rate_bits} bit/s is below the minimum of 8 bit/s")
        if rate > U32_MAX:
            # pyroute2 has no TCA_TBF_RATE64 attribute to carry a larger rate
            raise ValueError(
                f"rate {rate_bits} bit/s is above the supported maximum of {U32_MAX * 8} bit/s (34 Gbit/s)"
            )
        if burst <= 0:
            raise ValueError(f"burst {burst_bits} bits is below the minimum of 8 bits")
        burst_usec = int(burst * TIME_UNITS_PER_SEC / rate)
        clamped = False
        if burst_usec > U32_MAX or time_to_ticks(burst_usec) > U32_MAX:
            burst_usec = min(U32_MAX, int(ticks_to_usec(U32_MAX)))
            while time_to_ticks(burst_usec) > U32_MAX:  # rounding: at most a few steps
                burst_usec -= 1
            burst = int(burst_usec * rate / TIME_UNITS_PER_SEC)
            clamped = True
        latency_usec = TIME_UNITS_PER_SEC * (latency_ms / 1000.0)
        limit = int(rate * latency_usec / TIME_UNITS_PER_SEC) + burst
        if limit > U32_MAX:
            raise ValueError(
                f"queue limit {limit} bytes (rate x latency + burst) exceeds 4 GB; lower the latency, rate or burst"
            )
        return cls(rate=rate, buffer=time_to_ticks(burst_usec), limit=limit, clamped=clamped)

    @property
    def burst_bytes(self) -> int:
        return int(ticks_to_usec(self.buffer) * self.rate / TIME_UNITS_PER_SEC)


# ---- messages -------------------------------------------------------------------

NLM_F_CREATE, NLM_F_EXCL = 0x400, 0x200
CREATE = rtnl.NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
DELETE = rtnl.NLM_F_ACK
RTM_NEWQDISC, RTM_DELQDISC, RTM_GETQDISC = 36, 37, 38
RTM_NEWTCLASS, RTM_GETTCLASS, RTM_NEWTFILTER, RTM_GETTFILTER = 40, 42, 44, 46
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_TBF_PARMS = 1
TCA_HTB_PARMS, TCA_HTB_INIT, TCA_HTB_RATE64, TCA_HTB_CEIL64 = 1, 2, 6, 7
TCA_U32_CLASSID, TCA_U32_SEL, TCA_U32_ACT = 1, 5, 7
TCA_ACT_KIND, TCA_ACT_OPTIONS = 1, 2
TCA_MIRRED_PARMS = 2
TCA_EGRESS_REDIR, TC_ACT_STOLEN = 1, 4
TC_U32_TERMINAL = 1

_TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info
_RATESPEC = struct.Struct("=BBHhHI")  # cell_log, linklayer, overhead, cell_align, mpu, rate
_U32_SEL = struct.Struct("=BBBxHHhhI")  # flags, offshift, nkeys, offmask, off, offoff, hoff, hmask
_MIRRED = struct.Struct("=IIiiiiI")  # tc_gen (index, capab, action, refcnt, bindcnt), eaction, ifindex
_CELL_LOG = 3  # what tc (and pyroute2) derive for the default 1600-byte MTU: 1600 >> 3 fits a 256-slot table


def _tcmsg(index: int, handle: int, parent: int, info: int = 0) -> bytes:
    return _TCMSG.pack(0, index, handle, parent, info)


def _ratespec(rate: int) -> bytes:
    """A tc_ratespec as tc fills it for a rate (cell_align -1, cell_log for a 1600-byte MTU); zeros for none."""
    return _RATESPEC.pack(_CELL_LOG, 0, 0, -1, 0, rate) if rate else bytes(_RATESPEC.size)


def _request(
    kind: int, flags: int, index: int, handle: int, parent: int, attrs: bytes, what: str, info: int = 0
) -> rtnl.Request:
    return rtnl.Request(kind, flags, _tcmsg(index, handle, parent, info) + attrs, what)


def _u32_selector(keys: list[str]) -> bytes:
    """A terminal tc_u32_sel with ``keys`` ("0xVALUE/0xMASK+OFFSET", value and mask in network order)."""
    out = _U32_SEL.pack(TC_U32_TERMINAL, 0, len(keys), 0, 0, 0, 0, 0)
    for key in keys:
        value_mask, _, offset = key.partition("+")
        value, _, mask = value_mask.partition("/")
        out += struct.pack(">II", int(mask, 16), int(value, 16)) + struct.pack("=ii", int(offset), 0)
    return out


def tbf_request(index: int, bucket: TokenBucket) -> rtnl.Request:
    """`tc qdisc add dev X root handle 1: tbf ...` with exact parameters."""
    parms = _ratespec(bucket.rate) + _ratespec(0) + struct.pack("=III", bucket.limit, bucket.buffer, 0)
    return _request(
        RTM_NEWQDISC,
        CREATE,
        index,
        ROOT_HANDLE,
        TC_H_ROOT,
        rtnl.attr_str(TCA_KIND, "tbf") + rtnl.attr(TCA_OPTIONS, rtnl.attr(TCA_TBF_PARMS, parms)),
        "create tbf qdisc",
    )


def ingress_request(index: int) -> rtnl.Request:
    return _request(
        RTM_NEWQDISC,
        CREATE,
        index,
        INGRESS_HANDLE,
        TC_H_INGRESS,
        rtnl.attr_str(TCA_KIND, "ingress") + rtnl.attr(TCA_OPTIONS, bytes(4)),
        "create ingress qdisc",
    )


def redirect_request(index: int, target_index: int) -> rtnl.Request:
    """Match every packet arriving on `index` and redirect it to the egress of `target_index`."""
    mirred = _MIRRED.pack(0, 0, TC_ACT_STOLEN, 0, 0, TCA_EGRESS_REDIR, target_index)
    action = rtnl.attr_str(TCA_ACT_KIND, "mirred") + rtnl.attr(
        TCA_ACT_OPTIONS | rtnl.NLA_F_NESTED, rtnl.attr(TCA_MIRRED_PARMS, mirred)
    )
    options = (
        rtnl.attr(TCA_U32_ACT, rtnl.attr(1, action))
        + rtnl.attr_u32(TCA_U32_CLASSID, UNSHAPED_CLASS)
        + rtnl.attr(TCA_U32_SEL, _u32_selector(["0x0/0x0+0"]))
    )  # match all
    return _request(
        RTM_NEWTFILTER,
        CREATE,
        index,
        0,
        INGRESS_HANDLE,
        rtnl.attr_str(TCA_KIND, "u32") + rtnl.attr(TCA_OPTIONS, options),
        "add redirect filter",
        info=(1 << 16) | socket.htons(ETH_P_ALL),
    )


def _htb_class_options(rate: int, buffer: int, mtu: int) -> bytes:
    quantum = max(HTB_QUANTUM_MIN, mtu, min(HTB_QUANTUM_MAX, rate // 10))
    capped = min(rate, U32_MAX)
    parms = _ratespec(capped) + _ratespec(capped) + struct.pack("=IIIII", buffer, buffer, quantum, 0, 0)
    options = rtnl.attr(TCA_HTB_PARMS, parms)
    if rate > U32_MAX:
        options += rtnl.attr(TCA_HTB_RATE64, struct.pack("=Q", rate)) + rtnl.attr(
            TCA_HTB_CEIL64, struct.pack("=Q", rate)
        )
    return options


def htb_requests(
    index: int, bucket: TokenBucket, subnets: Iterable[str], subnets_are_shaped: bool, match_source: bool, mtu: int
) -> list[rtnl.Request]:
    """Root htb: the configured rate for shaped traffic, ~unlimited for the rest.

    With ``subnets_are_shaped`` only traffic to/from ``subnets`` is shaped, else
    everything but them. ``match_source`` picks which address of a packet
    is the remote one (source for traffic toward the pod, destination for
    traffic from it).
    """
    default = UNSHAPED_CLASS if subnets_are_shaped else SHAPED_CLASS
    init = struct.pack("=IIIII", 3, 10, default & 0xFFFF, 0, 0)  # version, rate2quantum, defcls, debug, direct_pkts
    htb = rtnl.attr_str(TCA_KIND, "htb")
    out = [
        _request(
            RTM_NEWQDISC,
            CREATE,
            index,
            ROOT_HANDLE,
            TC_H_ROOT,
            htb + rtnl.attr(TCA_OPTIONS, rtnl.attr(TCA_HTB_INIT, init)),
            "create htb qdisc",
        ),
        _request(
            RTM_NEWTCLASS,
            CREATE,
            index,
            SHAPED_CLASS,
            ROOT_HANDLE,
            htb + rtnl.attr(TCA_OPTIONS, _htb_class_options(bucket.rate, bucket.buffer, mtu)),
            "create shaped htb class",
        ),
    ]
    uncapped_buffer = time_to_ticks(int((UNCAPPED_RATE_BYTES // 1000 + mtu) * TIME_UNITS_PER_SEC / UNCAPPED_RATE_BYTES))
    out.append(
        _request(
            RTM_NEWTCLASS,
            CREATE,
            index,
            UNSHAPED_CLASS,
            ROOT_HANDLE,
            htb + rtnl.attr(TCA_OPTIONS, _htb_class_options(UNCAPPED_RATE_BYTES, uncapped_buffer, mtu)),
            "create unshaped htb class",
        )
    )
    target = SHAPED_CLASS if subnets_are_shaped else UNSHAPED_CLASS
    out += [subnet_filter_request(index, subnet, target, match_source) for subnet in subnets]
    return out


def subnet_keys(subnet: str, match_source: bool) -> tuple[int, list[str]]:
    """u32 keys ("value/mask+offset") matching `subnet` as source or destination address."""
    net = ipaddress.ip_network(subnet, strict=False)
    if net.version == 4:
        offset, protocol = (12 if match_source else 16), ETH_P_IP
    else:
        offset, protocol = (8 if match_source else 24), ETH_P_IPV6
    packed_addr, packed_mask = net.network_address.packed, net.netmask.packed
    keys = []
    for word in range(0, len(packed_addr), 4):
        (mask,) = struct.unpack(">I", packed_mask[word : word + 4])
        if mask:
            (value,) = struct.unpack(">I", packed_addr[word : word + 4])
            keys.append(f"0x{value:08x}/0x{mask:08x}+{offset + word}")
    if not keys:  # a /0: match every packet of the family
        keys.append(f"0x0/0x0+{offset}")
    return protocol, keys


def subnet_filter_request(index: int, subnet: str, classid: int, match_source: bool) -> rtnl.Request:
    protocol, keys = subnet_keys(subnet, match_source)
    prio = HTB_PRIO_IPV4 if protocol == ETH_P_IP else HTB_PRIO_IPV6
    options = rtnl.attr_u32(TCA_U32_CLASSID, classid) + rtnl.attr(TCA_U32_SEL, _u32_selector(keys))
    return _request(
        RTM_NEWTFILTER,
        CREATE,
        index,
        0,
        ROOT_HANDLE,
        rtnl.attr_str(TCA_KIND, "u32") + rtnl.attr(TCA_OPTIONS, options),
        f"add htb filter for {subnet}",
        info=(prio << 16) | socket.htons(protocol),
    )


def delete_qdisc_request(index: int, handle: int, parent: int) -> rtnl.Request:
    return _request(RTM_DELQDISC, DELETE, index, handle, parent, b"", "delete qdisc")


def get_qdisc_request(index: int, parent: int) -> rtnl.Request:
    """The qdisc at ``parent`` (TC_H_ROOT: the root one, TC_H_INGRESS: the ingress one) of one device.

    NLM_F_ECHO is what makes the kernel answer: it sends a qdisc GET's answer
    to the RTNLGRP_TC listeners only, and to the requester only when asked to
    echo. A default qdisc (noqueue, noop) comes back as no message at all.
    """
    return _request(RTM_GETQDISC, rtnl.NLM_F_ACK | rtnl.NLM_F_ECHO, index, 0, parent, b"", "get qdisc")


def dump_qdiscs_request() -> rtnl.Request:
    """Every qdisc of the namespace (the kernel dumps them all; ``list_qdiscs`` picks)."""
    return _request(RTM_GETQDISC, rtnl.NLM_F_DUMP, 0, 0, 0, b"", "list qdiscs")


def dump_classes_request(index: int) -> rtnl.Request:
    return _request(RTM_GETTCLASS, rtnl.NLM_F_DUMP, index, 0, 0, b"", "list classes")


def dump_filters_request(index: int, parent: int) -> rtnl.Request:
    return _request(RTM_GETTFILTER, rtnl.NLM_F_DUMP, index, 0, parent, b"", "list filters")


# ---- sending -----------------------------------------------------------------------


def run(ipr: rtnl.Rtnl, requests: list[rtnl.Request]) -> list[rtnl.Answer]:
    """Send ``requests`` in one round trip; TcError for the first one the kernel refused.

    The kernel runs them in order and does not stop at a refusal: send together
    only what may run after an earlier failure (the caller tears down on TcError).
    """
    answers = ipr.run(requests)
    failed = rtnl.first_failure(answers)
    if failed is not None:
        raise TcError(failed.what, failed.error)
    return answers


def qdisc_gone(err: int) -> bool:
    """Whether a qdisc request's errno means "it (or the device) is not there"."""
    return err in (errno.ENOENT, errno.EINVAL, errno.ENODEV)


def delete_qdisc(ipr: rtnl.Rtnl, index: int, handle: int, parent: int) -> bool:
    """Delete one qdisc; False when it (or the device) was not there."""
    answer = ipr.run([delete_qdisc_request(index, handle, parent)])[0]
    if answer.error and not qdisc_gone(answer.error):
        raise TcError(answer.what, answer.error)
    return not answer.error


# ---- reading back --------------------------------------------------------------


@dataclass
class Qdisc:
    index: int  # the device's
    kind: str
    handle: int
    parent: int
    options: dict[str, Any]

    @property
    def is_root(self) -> bool:
        return self.parent == TC_H_ROOT


@dataclass
class HtbClass:
    handle: int
    rate: int
    ceil: int
    buffer: int


@dataclass
class U32Filter:
    prio: int
    protocol: int
    classid: int
    keys: list[tuple[int, int, int]]  # (value, mask, offset)
    redirect_to: list[int]  # ifindexes of mirred egress-redirect actions


def qdisc_from(payload: Any) -> Qdisc:
    """One RTM_NEWQDISC message as a Qdisc (tbf parameters and the htb default class in ``options``)."""
    _family, index, handle, parent, _info = _TCMSG.unpack_from(payload)
    attrs = rtnl.attrs(payload, _TCMSG.size)
    kind = rtnl.as_str(attrs.get(TCA_KIND))
    options: dict[str, Any] = {}
    nested = rtnl.attrs(attrs[TCA_OPTIONS]) if TCA_OPTIONS in attrs else {}
    if kind == "tbf" and TCA_TBF_PARMS in nested and len(nested[TCA_TBF_PARMS]) >= 36:
        rate = _RATESPEC.unpack_from(nested[TCA_TBF_PARMS])[5]
        limit, buffer = struct.unpack_from("=II", nested[TCA_TBF_PARMS], 2 * _RATESPEC.size)
        options = {"rate": rate, "limit": limit, "buffer": buffer}
    elif kind == "htb" and TCA_HTB_INIT in nested and len(nested[TCA_HTB_INIT]) >= 12:
        options = {"default": struct.unpack_from("=III", nested[TCA_HTB_INIT])[2]}
    return Qdisc(index=index, kind=kind, handle=handle, parent=parent, options=options)


def qdisc_at(answer: rtnl.Answer) -> Qdisc | None:
    """The qdisc a ``get_qdisc_request`` found; None when there is none there (or no such device)."""
    if qdisc_gone(answer.error):
        return None
    answer.check()
    return next((qdisc_from(payload) for kind, payload in answer.messages if kind == RTM_NEWQDISC), None)


def htb_class_from(payload: Any) -> HtbClass | None:
    """One RTM_NEWTCLASS message as an HtbClass (None for another kind of class); 64-bit rates win."""
    _family, _index, handle, _parent, _info = _TCMSG.unpack_from(payload)
    attrs = rtnl.attrs(payload, _TCMSG.size)
    if rtnl.as_str(attrs.get(TCA_KIND)) != "htb":
        return None
    options = rtnl.attrs(attrs[TCA_OPTIONS]) if TCA_OPTIONS in attrs else {}
    parms = options.get(TCA_HTB_PARMS)
    rate = ceil = buffer = 0
    if parms is not None and len(parms) >= 2 * _RATESPEC.size + 4:
        rate = _RATESPEC.unpack_from(parms)[5]
        ceil = _RATESPEC.unpack_from(parms, _RATESPEC.size)[5]
        (buffer,) = struct.unpack_from("=I", parms, 2 * _RATESPEC.size)
    for kind, name in ((TCA_HTB_RATE64, "rate"), (TCA_HTB_CEIL64, "ceil")):
        wide = options.get(kind)
        if wide is not None and len(wide) >= 8 and struct.unpack_from("=Q", wide)[0]:
            if name == "rate":
                (rate,) = struct.unpack_from("=Q", wide)
            else:
                (ceil,) = struct.unpack_from("=Q", wide)
    return HtbClass(handle=handle, rate=rate, ceil=ceil, buffer=buffer)


def u32_filters_from(messages: list[tuple[int, Any]]) -> list[U32Filter]:
    """The u32 filters among dumped RTM_NEWTFILTER messages (hash-table nodes, which carry no selector, left out)."""
    out = []
    for _kind, payload in messages:
        _family, _index, _handle, _parent, info = _TCMSG.unpack_from(payload)
        attrs = rtnl.attrs(payload, _TCMSG.size)
        if rtnl.as_str(attrs.get(TCA_KIND)) != "u32" or TCA_OPTIONS not in attrs:
            continue
        options = rtnl.attrs(attrs[TCA_OPTIONS])
        sel = options.get(TCA_U32_SEL)
        if sel is None or len(sel) < _U32_SEL.size:
            continue
        redirects = []
        for _prio, action in rtnl.attr_list(options.get(TCA_U32_ACT) or b""):
            act = rtnl.attrs(action)
            parms = rtnl.attrs(act[TCA_ACT_OPTIONS]).get(TCA_MIRRED_PARMS) if TCA_ACT_OPTIONS in act else None
            if rtnl.as_str(act.get(TCA_ACT_KIND)) == "mirred" and parms is not None and len(parms) >= _MIRRED.size:
                fields = _MIRRED.unpack_from(parms)
                if fields[5] == TCA_EGRESS_REDIR:
                    redirects.append(fields[6])
        nkeys = sel[2]
        keys = []
        for k in range(nkeys):
            offset = _U32_SEL.size + 16 * k
            if offset + 16 > len(sel):
                break
            mask, value = struct.unpack_from(">II", sel, offset)
            keys.append((value, mask, struct.unpack_from("=i", sel, offset + 8)[0]))
        out.append(
            U32Filter(
                prio=info >> 16,
                protocol=socket.ntohs(info & 0xFFFF),
                classid=rtnl.as_u32(options.get(TCA_U32_CLASSID)),
                keys=keys,
                redirect_to=redirects,
            )
        )
    return out


def list_qdiscs(ipr: rtnl.Rtnl, index: int | None = None) -> list[Qdisc]:
    """The qdiscs of one device (of every device when ``index`` is None), defaults left out."""
    found = [qdisc_from(payload) for kind, payload in ipr.call(dump_qdiscs_request()) if kind == RTM_NEWQDISC]
    return [q for q in found if (index is None or q.index == index) and q.kind not in ("pfifo_fast", "noqueue", "mq")]


def list_htb_classes(ipr: rtnl.Rtnl, index: int) -> list[HtbClass]:
    found = (
        htb_class_from(payload) for kind, payload in ipr.call(dump_classes_request(index)) if kind == RTM_NEWTCLASS
    )
    return [c for c in found if c is not None]


def list_u32_filters(ipr: rtnl.Rtnl, index: int, parent: int) -> list[U32Filter]:
    return u32_filters_from(ipr.call(dump_filters_request(index, parent)))


# ---- ifb devices --------------------------------------------------------------------


def ifb_requests(name: str, mtu: int, txqlen: int = 0) -> list[rtnl.Request]:
    """Create the ifb (up, with the given MTU) and look at it: read the answers with ``ifb_created``.

    txqueuelen 0 is what the reference sets; tbf brings its own queue, but the
    default leaf queues of an htb size themselves from it.
    """
    return [rtnl.add_ifb(name, mtu, txqlen), rtnl.get_link(name=name)]


def ifb_created(answers: list[rtnl.Answer], name: str) -> ip.Link:
    """The new ifb from the answers to ``ifb_requests``; TcError when the kernel refused it."""
    added, got = answers
    if added.error:
        raise TcError(f"create ifb {name}", added.error)
    if got.error and got.error != errno.ENODEV:
        raise TcError(f"create ifb {name}", got.error)
    link = ip.link_from(got) if not got.error else None
    if link is None:
        raise TcError(f"create ifb {name}", errno.ENODEV)
    return link
