"""Traffic-control mechanics for the bandwidth plugin (pyroute2 underneath).

Queueing disciplines, classes and filters are built as pyroute2 ``tcmsg``
messages and sent on a plain rtnetlink socket of the calling thread's network
namespace. We encode the parameters ourselves instead of going through
``IPRoute.tc()`` because that helper recomputes tbf/htb buffers (with its own
rounding and rate tables) from rate and burst, while the plugin must program
exactly the values the reference plugin programs, so that ``tc`` shows the
same qdiscs for the same configuration.

Units: rates in bytes per second, buffers in psched ticks, limits in bytes,
as the kernel takes them. ``TokenBucket.from_bits`` converts the CNI options
(bits per second, bits) with the reference plugin's arithmetic.

Links (the ifb devices included) are ``kernel.ip.Link``s, looked up with
``ip.find_link`` / ``ip.link_by_index`` (None when missing), like everywhere
else. As in ``kernel.ip``, pyroute2 is loaded when a message is first built or
a device created, not when this module is imported: a bandwidth ADD with no
limits configured validates, passes prevResult through and never needs it.
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

from cni_plugins.kernel import ip
from cni_plugins.kernel import netlink as _netlink  # noqa: F401  (before any pyroute2 import: skips its package __init__)

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
            raise ValueError(f"rate {rate_bits} bit/s is above the supported maximum of "
                             f"{U32_MAX * 8} bit/s (34 Gbit/s)")
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
            raise ValueError(f"queue limit {limit} bytes (rate x latency + burst) exceeds 4 GB; "
                             "lower the latency, rate or burst")
        return cls(rate=rate, buffer=time_to_ticks(burst_usec), limit=limit, clamped=clamped)

    @property
    def burst_bytes(self) -> int:
        return int(ticks_to_usec(self.buffer) * self.rate / TIME_UNITS_PER_SEC)


# ---- transport ----------------------------------------------------------------

_ACK_FLAGS = 0x01 | 0x04  # NLM_F_REQUEST | NLM_F_ACK
NLM_F_CREATE, NLM_F_EXCL = 0x400, 0x200
CREATE = _ACK_FLAGS | NLM_F_CREATE | NLM_F_EXCL
DELETE = _ACK_FLAGS
RTM_NEWQDISC, RTM_DELQDISC, RTM_NEWTCLASS, RTM_NEWTFILTER = 36, 37, 40, 44
NLMSG_ERROR = 2


def _tc_request(msg_type: int, flags: int, index: int, handle: int, parent: int,
                attrs: list[list[Any]], what: str, info: int = 0) -> None:
    """Send one tc request on a fresh rtnetlink socket and wait for its ack."""
    from pyroute2.netlink.rtnl.tcmsg import tcmsg  # on first use, as the module docstring says

    msg = tcmsg()
    msg["index"], msg["handle"], msg["parent"], msg["info"] = index, handle, parent, info
    msg["attrs"] = attrs
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = 1
    msg.encode()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(10)
        sock.bind((0, 0))
        sock.send(msg.data)
        for _ in range(64):  # bounded: the ack is the first message for seq 1
            data = sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _flags, seq = struct.unpack_from("=IHHI", data, offset)
                if kind == NLMSG_ERROR and seq == 1:
                    (err,) = struct.unpack_from("=i", data, offset + 16)
                    if err:
                        raise TcError(what, -err)
                    return
                offset += (length + 3) & ~3 or len(data)
    raise TcError(what, errno.ETIMEDOUT)


# ---- qdiscs, classes, filters ------------------------------------------------------

def add_tbf(index: int, bucket: TokenBucket) -> None:
    """`tc qdisc add dev X root handle 1: tbf ...` with exact parameters."""
    parms = {"rate": bucket.rate, "limit": bucket.limit, "buffer": bucket.buffer}
    _tc_request(RTM_NEWQDISC, CREATE, index, ROOT_HANDLE, TC_H_ROOT,
                [["TCA_KIND", "tbf"], ["TCA_OPTIONS", {"attrs": [["TCA_TBF_PARMS", parms]]}]],
                "create tbf qdisc")


def add_ingress_qdisc(index: int) -> None:
    _tc_request(RTM_NEWQDISC, CREATE, index, INGRESS_HANDLE, TC_H_INGRESS,
                [["TCA_KIND", "ingress"], ["TCA_OPTIONS", {"attrs": []}]], "create ingress qdisc")


def add_redirect_filter(index: int, target_index: int) -> None:
    """Match every packet arriving on `index` and redirect it to the egress of `target_index`."""
    options = {"attrs": [
        ["TCA_U32_ACT", {"attrs": [["TCA_ACT_PRIO_1", {"attrs": [
            ["TCA_ACT_KIND", "mirred"],
            ["TCA_ACT_OPTIONS", {"attrs": [["TCA_MIRRED_PARMS", {
                "eaction": 1,  # TCA_EGRESS_REDIR
                "action": 4,  # TC_ACT_STOLEN
                "ifindex": target_index}]]}],
        ]}]]}],
        ["TCA_U32_CLASSID", UNSHAPED_CLASS],
        ["TCA_U32_SEL", {"flags": 1, "keys": ["0x0/0x0+0"]}],  # TC_U32_TERMINAL, match all
    ]}
    _tc_request(RTM_NEWTFILTER, CREATE, index, 0, INGRESS_HANDLE,
                [["TCA_KIND", "u32"], ["TCA_OPTIONS", options]], "add redirect filter",
                info=(1 << 16) | socket.htons(ETH_P_ALL))


def _htb_class_options(rate: int, buffer: int, mtu: int) -> dict[str, Any]:
    quantum = max(HTB_QUANTUM_MIN, mtu, min(HTB_QUANTUM_MAX, rate // 10))
    parms = {"rate": min(rate, U32_MAX), "ceil": min(rate, U32_MAX), "buffer": buffer, "cbuffer": buffer,
             "quantum": quantum}
    attrs: list[list[Any]] = [["TCA_HTB_PARMS", parms]]
    if rate > U32_MAX:
        attrs += [["TCA_HTB_RATE64", rate], ["TCA_HTB_CEIL64", rate]]
    return {"attrs": attrs}


def add_htb(index: int, bucket: TokenBucket, subnets: Iterable[str], subnets_are_shaped: bool,
            match_source: bool, mtu: int) -> None:
    """Root htb: the configured rate for shaped traffic, ~unlimited for the rest.

    With ``subnets_are_shaped`` only traffic to/from ``subnets`` is shaped, else
    everything but them. ``match_source`` picks which address of a packet
    is the remote one (source for traffic toward the pod, destination for
    traffic from it).
    """
    subnets = list(subnets)
    default = UNSHAPED_CLASS if subnets_are_shaped else SHAPED_CLASS
    init = {"version": 3, "rate2quantum": 10, "defcls": default & 0xFFFF, "debug": 0, "direct_pkts": 0}
    _tc_request(RTM_NEWQDISC, CREATE, index, ROOT_HANDLE, TC_H_ROOT,
                [["TCA_KIND", "htb"], ["TCA_OPTIONS", {"attrs": [["TCA_HTB_INIT", init]]}]],
                "create htb qdisc")
    _tc_request(RTM_NEWTCLASS, CREATE, index, SHAPED_CLASS, ROOT_HANDLE,
                [["TCA_KIND", "htb"], ["TCA_OPTIONS", _htb_class_options(bucket.rate, bucket.buffer, mtu)]],
                "create shaped htb class")
    uncapped_buffer = time_to_ticks(int((UNCAPPED_RATE_BYTES // 1000 + mtu) * TIME_UNITS_PER_SEC
                                        / UNCAPPED_RATE_BYTES))
    _tc_request(RTM_NEWTCLASS, CREATE, index, UNSHAPED_CLASS, ROOT_HANDLE,
                [["TCA_KIND", "htb"],
                 ["TCA_OPTIONS", _htb_class_options(UNCAPPED_RATE_BYTES, uncapped_buffer, mtu)]],
                "create unshaped htb class")
    target = SHAPED_CLASS if subnets_are_shaped else UNSHAPED_CLASS
    for subnet in subnets:
        add_subnet_filter(index, subnet, target, match_source)


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
        (mask,) = struct.unpack(">I", packed_mask[word:word + 4])
        if mask:
            (value,) = struct.unpack(">I", packed_addr[word:word + 4])
            keys.append(f"0x{value:08x}/0x{mask:08x}+{offset + word}")
    if not keys:  # a /0: match every packet of the family
        keys.append(f"0x0/0x0+{offset}")
    return protocol, keys


def add_subnet_filter(index: int, subnet: str, classid: int, match_source: bool) -> None:
    protocol, keys = subnet_keys(subnet, match_source)
    prio = HTB_PRIO_IPV4 if protocol == ETH_P_IP else HTB_PRIO_IPV6
    options = {"attrs": [["TCA_U32_CLASSID", classid], ["TCA_U32_SEL", {"flags": 1, "keys": keys}]]}
    _tc_request(RTM_NEWTFILTER, CREATE, index, 0, ROOT_HANDLE,
                [["TCA_KIND", "u32"], ["TCA_OPTIONS", options]], f"add htb filter for {subnet}",
                info=(prio << 16) | socket.htons(protocol))


def delete_qdisc(index: int, handle: int, parent: int) -> bool:
    """Delete one qdisc; False when it (or the device) was not there."""
    try:
        _tc_request(RTM_DELQDISC, DELETE, index, handle, parent, [], "delete qdisc")
    except TcError as exc:
        if exc.errno in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            return False
        raise
    return True


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


def _nested(msg: Any, *path: str) -> Any:
    for name in path:
        if msg is None:
            return None
        msg = msg.get_attr(name)
    return msg


def list_qdiscs(ipr: Any, index: int | None = None) -> list[Qdisc]:
    """The qdiscs of one device (of every device when ``index`` is None), defaults left out."""
    out = []
    for msg in ipr.get_qdiscs(index):
        if index is not None and msg["index"] != index:
            continue
        kind = msg.get_attr("TCA_KIND")
        if kind in ("pfifo_fast", "noqueue", "mq"):
            continue
        options: dict[str, Any] = {}
        if kind == "tbf":
            parms = _nested(msg, "TCA_OPTIONS", "TCA_TBF_PARMS") or {}
            options = {"rate": parms.get("rate"), "limit": parms.get("limit"), "buffer": parms.get("buffer")}
        elif kind == "htb":
            init = _nested(msg, "TCA_OPTIONS", "TCA_HTB_INIT") or {}
            options = {"default": init.get("defcls")}
        out.append(Qdisc(index=msg["index"], kind=kind, handle=msg["handle"], parent=msg["parent"], options=options))
    return out


def list_htb_classes(ipr: Any, index: int) -> list[HtbClass]:
    out = []
    for msg in ipr.get_classes(index=index):
        if msg["index"] != index or msg.get_attr("TCA_KIND") != "htb":
            continue
        opts = msg.get_attr("TCA_OPTIONS")
        parms = (opts.get_attr("TCA_HTB_PARMS") if opts is not None else None) or {}
        rate = (opts.get_attr("TCA_HTB_RATE64") if opts is not None else None) or parms.get("rate", 0)
        ceil = (opts.get_attr("TCA_HTB_CEIL64") if opts is not None else None) or parms.get("ceil", 0)
        out.append(HtbClass(handle=msg["handle"], rate=rate, ceil=ceil, buffer=parms.get("buffer", 0)))
    return out


def list_u32_filters(ipr: Any, index: int, parent: int) -> list[U32Filter]:
    out = []
    for msg in ipr.get_filters(index=index, parent=parent):
        opts = msg.get_attr("TCA_OPTIONS")
        sel = opts.get_attr("TCA_U32_SEL") if opts is not None else None
        if msg.get_attr("TCA_KIND") != "u32" or sel is None:
            continue  # hash-table nodes carry no selector
        redirects = []
        acts = opts.get_attr("TCA_U32_ACT")
        for _name, act in (acts["attrs"] if acts is not None else []):
            parms = _nested(act, "TCA_ACT_OPTIONS", "TCA_MIRRED_PARMS")
            if act.get_attr("TCA_ACT_KIND") == "mirred" and parms and parms.get("eaction") == 1:
                redirects.append(parms["ifindex"])
        keys = [(k["key_val"], k["key_mask"], k["key_off"]) for k in sel.get("keys", [])]
        out.append(U32Filter(prio=msg["info"] >> 16, protocol=socket.ntohs(msg["info"] & 0xFFFF),
                             classid=opts.get_attr("TCA_U32_CLASSID") or 0, keys=keys,
                             redirect_to=redirects))
    return out


# ---- ifb devices --------------------------------------------------------------------

def create_ifb(ipr: Any, name: str, mtu: int, alias: str, txqlen: int = 0) -> ip.Link:
    """An ifb device, up, with the given MTU and alias; TcError when the kernel refuses.

    txqueuelen 0 is what the reference sets; tbf brings its own queue, but the
    default leaf queues of an htb size themselves from it.
    """
    from pyroute2.netlink.exceptions import NetlinkError  # on first use, as the module docstring says

    try:
        ipr.link("add", ifname=name, kind="ifb", mtu=mtu, txqlen=txqlen, state="up")
        link = ip.find_link(ipr, name)
        if link is None:
            raise TcError(f"create ifb {name}", errno.ENODEV)
        if alias:
            ipr.link("set", index=link.index, ifalias=alias)
            link.alias = alias
    except NetlinkError as exc:
        raise TcError(f"create ifb {name}", exc.code) from None
    return link
