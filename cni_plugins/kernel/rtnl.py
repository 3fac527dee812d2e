"""rtnetlink on a plain socket: the requests the plugins make on their ADD and DEL, built and read by hand.

pyroute2's IPRoute (0.7 and later) runs every request through an asyncio
event loop of its own: about 0.3-0.5 ms per request and 1 ms per socket on
top of the kernel's work, and some 100 ms of imports for a plugin process.
A plugin's ADD needs a handful of message kinds, so this module builds them
itself, byte for byte what pyroute2 sends for the same call (the unit tests
compare the two), and reads the few attributes the plugins look at.

``Rtnl`` is one NETLINK_ROUTE socket in the network namespace of the thread
that opens it (it stays there, whichever namespace the thread moves to
later). ``call`` sends one request and waits for its answer; ``run``
pipelines: every request goes out in one ``sendmsg`` and the answers are
matched by sequence number. The kernel handles the messages of one send one
after the other, in order, exactly as if they came one at a time, but a
failing request does not stop the ones after it (netlink has no
transactions): batch only requests that are harmless to run after an earlier
one failed, and report the first failure (``Answer.check``).

A dump (``dump=True``) must be the last request of a batch: the kernel runs
one dump per socket at a time and answers a second one started while the
first is still going with EBUSY.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Iterable

# ---- constants (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h, linux/if_addr.h) ----

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_ECHO = 0x1, 0x2, 0x4, 0x8
NLM_F_ROOT, NLM_F_MATCH = 0x100, 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE, NLM_F_APPEND = 0x100, 0x200, 0x400, 0x800
NLA_TYPE_MASK = 0x3FFF
NLA_F_NESTED = 0x8000

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK = 1, 3, 4, 5
IFLA_MASTER, IFLA_TXQLEN, IFLA_OPERSTATE, IFLA_LINKINFO = 10, 13, 16, 18
IFLA_IFALIAS, IFLA_NET_NS_FD, IFLA_PROMISCUITY = 20, 28, 30
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_DATA = 1, 2, 5
VETH_INFO_PEER = 1
IFLA_BRPORT_MODE, IFLA_BRPORT_ISOLATED = 4, 33

IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST, IFA_FLAGS = 1, 2, 4, 8
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_MULTIPATH, RTA_TABLE = 1, 4, 5, 6, 9, 15
RT_TABLE_MAIN, RT_TABLE_COMPAT = 254, 252
RTN_UNICAST = 1

AF_UNSPEC, AF_INET, AF_INET6 = 0, 2, 10
IFF_UP, IFF_PROMISC = 0x1, 0x100

OPER_STATES = ("UNKNOWN", "NOTPRESENT", "DOWN", "LOWERLAYERDOWN", "TESTING", "DORMANT", "UP")

NLMSGHDR = struct.Struct("=IHHII")
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBi")  # family, prefixlen, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
RTNEXTHOP = struct.Struct("=HBBi")  # len, flags, hops, ifindex
_NLA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
_RECV_BYTES = 1 << 18  # a dump part is at most 32 KiB; one GET answer far less
_TIMEOUT = 30.0


class NetlinkError(Exception):
    """The kernel refused a request: ``code`` is the errno. Reads and prints like pyroute2's NetlinkError
    (``(95, 'Operation not supported')``), so an unexpected refusal is reported the same either way."""

    def __init__(self, code: int, msg: str | None = None, what: str = "") -> None:
        super().__init__(code, msg or os.strerror(code))
        self.code = code
        self.what = what


# ---- attributes ----------------------------------------------------------------------


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    length = 4 + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * ((-length) % 4)


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, _U32.pack(value))


def attr_str(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def attrs(data: bytes | memoryview, offset: int = 0, end: int | None = None) -> dict[int, memoryview]:
    """The attributes in ``data[offset:end]``: type (flags masked off) -> payload; the first of a type wins."""
    view = memoryview(data)
    end = len(view) if end is None else end
    out: dict[int, memoryview] = {}
    while offset + 4 <= end:
        length, kind = _NLA.unpack_from(view, offset)
        if length < 4 or offset + length > end:
            break
        out.setdefault(kind & NLA_TYPE_MASK, view[offset + 4 : offset + length])
        offset += (length + 3) & ~3
    return out


def attr_list(data: bytes | memoryview) -> list[tuple[int, memoryview]]:
    """Every attribute in ``data``, in order (for lists whose entries share a type)."""
    view = memoryview(data)
    out = []
    offset = 0
    while offset + 4 <= len(view):
        length, kind = _NLA.unpack_from(view, offset)
        if length < 4 or offset + length > len(view):
            break
        out.append((kind & NLA_TYPE_MASK, view[offset + 4 : offset + length]))
        offset += (length + 3) & ~3
    return out


def as_str(payload: memoryview | None) -> str:
    if payload is None:
        return ""
    return bytes(payload).split(b"\0", 1)[0].decode("utf-8", "replace")


def as_u32(payload: memoryview | None) -> int:
    return _U32.unpack_from(payload)[0] if payload is not None and len(payload) >= 4 else 0


def as_mac(payload: memoryview | None) -> str:
    return ":".join(f"{b:02x}" for b in bytes(payload)) if payload is not None else ""


def mac_bytes(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


# ---- requests and answers --------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One rtnetlink request: message type, flags (NLM_F_REQUEST is added) and body."""

    kind: int
    flags: int
    body: bytes
    what: str = ""

    @property
    def dump(self) -> bool:
        return bool(self.flags & NLM_F_DUMP) and not self.flags & NLM_F_ACK

    def encode(self, seq: int) -> bytes:
        """The whole netlink message, header included, with sequence number ``seq``."""
        return (
            NLMSGHDR.pack(NLMSGHDR.size + len(self.body), self.kind, NLM_F_REQUEST | self.flags, seq & 0xFFFFFFFF, 0)
            + self.body
        )


@dataclass
class Answer:
    """What the kernel said to one request: its errno (0: done) and the messages it sent back."""

    error: int = 0
    messages: list[tuple[int, memoryview]] = field(default_factory=list)
    what: str = ""

    def check(self) -> "Answer":
        if self.error:
            raise NetlinkError(self.error, what=self.what)
        return self


def first_failure(answers: Iterable[Answer]) -> Answer | None:
    return next((a for a in answers if a.error), None)


class Rtnl:
    """A NETLINK_ROUTE socket in the network namespace of the thread that opens it."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            try:  # acknowledgements without a copy of the request
                self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            except OSError:
                pass
            self._sock.bind((0, 0))
            self._sock.settimeout(_TIMEOUT)
        except BaseException:
            self._sock.close()
            raise
        self._seq = int.from_bytes(os.urandom(2), "little") << 8
        self._buf = bytearray(_RECV_BYTES)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "Rtnl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, request: Request) -> list[tuple[int, memoryview]]:
        """One request; its answer messages, or NetlinkError."""
        return self.run([request])[0].check().messages

    def run(self, requests: list[Request]) -> list[Answer]:
        """Send every request at once; each one's Answer, in order."""
        if not requests:
            return []
        if any(request.dump for request in requests[:-1]):
            raise ValueError("a dump must be the last request of a batch (the kernel runs one at a time per socket)")
        first = self._seq
        self._seq = (first + len(requests)) & 0xFFFFFFFF
        self._sock.sendall(b"".join(request.encode(first + offset) for offset, request in enumerate(requests)))
        answers = [Answer(what=r.what) for r in requests]
        pending = len(requests)
        view = memoryview(self._buf)
        try:
            while pending:
                size = self._sock.recv_into(self._buf)
                chunk = bytes(view[:size])  # the answers keep views of it; the buffer is reused
                cview = memoryview(chunk)
                offset = 0
                while offset + NLMSGHDR.size <= size:
                    length, kind, flags, seq, _pid = NLMSGHDR.unpack_from(chunk, offset)
                    if length < NLMSGHDR.size:
                        break
                    index = (seq - first) & 0xFFFFFFFF
                    if index < len(requests):
                        answer = answers[index]
                        if kind == NLMSG_ERROR:
                            (code,) = _I32.unpack_from(chunk, offset + NLMSGHDR.size)
                            answer.error = -code
                            pending -= 1
                        elif kind == NLMSG_DONE:
                            if length >= NLMSGHDR.size + 4:
                                (code,) = _I32.unpack_from(chunk, offset + NLMSGHDR.size)
                                answer.error = -code if code < 0 else 0
                            pending -= 1
                        else:
                            answer.messages.append((kind, cview[offset + NLMSGHDR.size : offset + length]))
                    offset += (length + 3) & ~3
        except socket.timeout:
            raise NetlinkError(errno.ETIMEDOUT, f"no answer from the kernel within {_TIMEOUT:g} s") from None
        return answers


# ---- links -------------------------------------------------------------------------------


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0, family: int = AF_UNSPEC) -> bytes:
    return IFINFOMSG.pack(family, 0, index, flags, change)


def get_link(name: str = "", index: int = 0) -> Request:
    """`ip link show NAME` (or by index)."""
    body = _ifinfo(index) + (attr_str(IFLA_IFNAME, name) if name and not index else b"")
    return Request(RTM_GETLINK, NLM_F_ACK, body, f"get link {name or index}")


def dump_links() -> Request:
    return Request(RTM_GETLINK, NLM_F_DUMP, _ifinfo(), "list links")


def set_link(
    index: int,
    *,
    up: bool | None = None,
    promisc: bool | None = None,
    mac: str = "",
    master: int | None = None,
    alias: str | None = None,
    mtu: int = 0,
) -> Request:
    """`ip link set` on ``index``: flags (up, promisc) and attributes, as pyroute2's link("set") sends them."""
    flags = change = 0
    if up is not None:
        flags |= IFF_UP if up else 0
        change |= IFF_UP
    if promisc is not None:
        flags |= IFF_PROMISC if promisc else 0
        change |= IFF_PROMISC
    body = _ifinfo(index, flags, change)
    if mac:
        body += attr(IFLA_ADDRESS, mac_bytes(mac))
    if mtu:
        body += attr_u32(IFLA_MTU, mtu)
    if master is not None:
        body += attr_u32(IFLA_MASTER, master)
    if alias is not None:
        body += attr_str(IFLA_IFALIAS, alias)
    return Request(RTM_NEWLINK, NLM_F_ACK, body, f"set link {index}")


def delete_link(index: int) -> Request:
    return Request(RTM_DELLINK, NLM_F_ACK, _ifinfo(index), f"delete link {index}")


def delete_link_by_name(name: str) -> Request:
    """`ip link del NAME` in one request (ENODEV when there is none)."""
    return Request(RTM_DELLINK, NLM_F_ACK, _ifinfo() + attr_str(IFLA_IFNAME, name), f"delete link {name}")


def _linkinfo(kind: str, data: bytes = b"") -> bytes:
    return attr(IFLA_LINKINFO, attr_str(IFLA_INFO_KIND, kind) + (attr(IFLA_INFO_DATA, data) if data else b""))


def add_bridge(name: str, mtu: int = 0, mac: str | None = None) -> Request:
    """`ip link add NAME [mtu M] [address MAC] type bridge` (fails with EEXIST when NAME exists)."""
    body = _ifinfo() + attr_str(IFLA_IFNAME, name)
    if mtu:
        body += attr_u32(IFLA_MTU, mtu)
    if mac:
        body += attr(IFLA_ADDRESS, mac_bytes(mac))
    body += _linkinfo("bridge")
    return Request(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body, f"add bridge {name}")


def add_veth(name: str, peer: str, peer_ns_fd: int, mtu: int = 0, mac: str = "") -> Request:
    """A veth pair: ``name`` in this socket's namespace, ``peer`` in the namespace open as ``peer_ns_fd``."""
    body = _ifinfo() + attr_str(IFLA_IFNAME, name)
    if mtu:
        body += attr_u32(IFLA_MTU, mtu)
    if mac:
        body += attr(IFLA_ADDRESS, mac_bytes(mac))
    peer_body = _ifinfo() + attr_str(IFLA_IFNAME, peer) + attr_u32(IFLA_NET_NS_FD, peer_ns_fd)
    if mtu:
        peer_body += attr_u32(IFLA_MTU, mtu)
    body += _linkinfo("veth", attr(VETH_INFO_PEER, peer_body))
    return Request(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body, f"add veth {name}")


def add_ifb(name: str, mtu: int, txqlen: int, up: bool = True) -> Request:
    """`ip link add NAME mtu M txqueuelen Q type ifb` [up]."""
    body = (
        _ifinfo(0, IFF_UP if up else 0, IFF_UP if up else 0)
        + attr_str(IFLA_IFNAME, name)
        + attr_u32(IFLA_MTU, mtu)
        + attr_u32(IFLA_TXQLEN, txqlen)
        + _linkinfo("ifb")
    )
    return Request(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body, f"add ifb {name}")


def set_bridge_port(index: int, hairpin: bool, isolated: bool) -> Request:
    """The bridge-port flags of ``index`` (hairpin mode, isolation), as pyroute2's brport("set") sends them
    (the kind "bridge_slave" in IFLA_INFO_KIND: the kernel takes the port data from IFLA_INFO_SLAVE_DATA)."""
    slave = attr(IFLA_BRPORT_MODE, bytes([int(hairpin)])) + attr(IFLA_BRPORT_ISOLATED, bytes([int(isolated)]))
    info = attr_str(IFLA_INFO_KIND, "bridge_slave") + attr(IFLA_INFO_SLAVE_DATA, slave)
    return Request(RTM_NEWLINK, NLM_F_ACK, _ifinfo(index) + attr(IFLA_LINKINFO, info), f"set bridge port {index}")


@dataclass
class LinkInfo:
    """The attributes of one link the plugins read (ip.Link is built from it)."""

    name: str
    index: int
    mac: str
    mtu: int
    kind: str
    master: int
    peer_index: int
    oper_state: str
    flags: int
    promiscuity: int
    alias: str
    txqlen: int


def parse_link(payload: memoryview) -> LinkInfo:
    _family, _type, index, flags, _change = IFINFOMSG.unpack_from(payload)
    a = attrs(payload, IFINFOMSG.size)
    info = a.get(IFLA_LINKINFO)
    kind = as_str(attrs(info).get(IFLA_INFO_KIND)) if info is not None else ""
    oper = a.get(IFLA_OPERSTATE)
    state = OPER_STATES[oper[0]] if oper is not None and len(oper) and oper[0] < len(OPER_STATES) else "UNKNOWN"
    return LinkInfo(
        name=as_str(a.get(IFLA_IFNAME)),
        index=index,
        mac=as_mac(a.get(IFLA_ADDRESS)),
        mtu=as_u32(a.get(IFLA_MTU)),
        kind=kind,
        master=as_u32(a.get(IFLA_MASTER)),
        peer_index=as_u32(a.get(IFLA_LINK)),
        oper_state=state,
        flags=flags,
        promiscuity=as_u32(a.get(IFLA_PROMISCUITY)),
        alias=as_str(a.get(IFLA_IFALIAS)),
        txqlen=as_u32(a.get(IFLA_TXQLEN)),
    )


def link_of(answer: Answer) -> LinkInfo | None:
    """The link a GETLINK answered with; None when there is no such link (ENODEV); raise other errors."""
    if answer.error == errno.ENODEV:
        return None
    answer.check()
    for kind, payload in answer.messages:
        if kind == RTM_NEWLINK:
            return parse_link(payload)
    return None


# ---- addresses -------------------------------------------------------------------------------


def _ifaddr(index: int, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> bytes:
    return IFADDRMSG.pack(AF_INET6 if iface.version == 6 else AF_INET, iface.network.prefixlen, 0, 0, index)


def add_address(index: int, cidr: str, nodad: bool = False) -> Request:
    """`ip addr add CIDR [brd +] dev INDEX [nodad]`, as kernel.ip.add_address sends it through pyroute2."""
    iface = ipaddress.ip_interface(cidr)
    packed = iface.ip.packed
    body = _ifaddr(index, iface) + attr(IFA_ADDRESS, packed)
    if iface.version == 4:
        if iface.network.prefixlen < 31:
            body += attr(IFA_BROADCAST, iface.network.broadcast_address.packed)
        body += attr(IFA_LOCAL, packed)
    elif nodad:
        body += attr_u32(IFA_FLAGS, 0x02)  # IFA_F_NODAD
    return Request(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body, f"add address {cidr}")


def delete_address(index: int, cidr: str) -> Request:
    iface = ipaddress.ip_interface(cidr)
    packed = iface.ip.packed
    body = _ifaddr(index, iface) + attr(IFA_ADDRESS, packed)
    if iface.version == 4:
        body += attr(IFA_LOCAL, packed)
    return Request(RTM_DELADDR, NLM_F_ACK, body, f"delete address {cidr}")


def dump_addresses(family: int = 0) -> Request:
    """Every address of a family (4, 6; 0 for both) in the namespace."""
    af = {4: AF_INET, 6: AF_INET6}.get(family, AF_UNSPEC)
    return Request(RTM_GETADDR, NLM_F_DUMP, IFADDRMSG.pack(af, 0, 0, 0, 0), "list addresses")


def parse_address(payload: memoryview) -> tuple[int, ipaddress.IPv4Interface | ipaddress.IPv6Interface, int] | None:
    """(ifindex, address/prefix, flags) of one RTM_NEWADDR; IFA_FLAGS (32 bits) over the header's 8."""
    family, prefixlen, flags, _scope, index = IFADDRMSG.unpack_from(payload)
    a = attrs(payload, IFADDRMSG.size)
    raw = a.get(IFA_ADDRESS) or a.get(IFA_LOCAL)
    if raw is None:
        return None
    address = ipaddress.ip_address(bytes(raw))
    extended = a.get(IFA_FLAGS)
    return index, ipaddress.ip_interface(f"{address}/{prefixlen}"), (as_u32(extended) or flags)


# ---- routes --------------------------------------------------------------------------------------


def append_route(
    index: int,
    dst: str,
    gateway: str | None = None,
    priority: int | None = None,
    table: int | None = None,
    scope: int | None = None,
    protocol: int = 3,
) -> Request:
    """`ip route append DST [via GW] dev INDEX [metric P] [table T] [scope S] proto boot`, as pyroute2 sends it."""
    net = ipaddress.ip_network(dst, strict=False)
    rt_table = RT_TABLE_MAIN if table is None else (table if table < 256 else RT_TABLE_COMPAT)
    body = RTMSG.pack(
        AF_INET6 if net.version == 6 else AF_INET, net.prefixlen, 0, 0, rt_table, protocol, scope or 0, RTN_UNICAST, 0
    )
    if net.prefixlen:
        body += attr(RTA_DST, net.network_address.packed)
    body += attr(RTA_OIF, _I32.pack(index))
    if gateway:
        body += attr(RTA_GATEWAY, ipaddress.ip_address(gateway).packed)
    if priority is not None:
        body += attr_u32(RTA_PRIORITY, priority)
    if table is not None:
        body += attr_u32(RTA_TABLE, table)
    return Request(RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND, body, f"add route {net}")


def dump_routes(family: int) -> Request:
    af = AF_INET if family == 4 else AF_INET6
    return Request(RTM_GETROUTE, NLM_F_DUMP, RTMSG.pack(af, 0, 0, 0, RT_TABLE_MAIN, 0, 0, 0, 0), "list routes")


def parse_route(
    payload: memoryview,
) -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str | None, int | None, int]]:
    """(dst, gateway, oif, table) per next hop of one RTM_NEWROUTE (multipath flattened)."""
    family, dst_len, _src_len, _tos, rt_table, _proto, _scope, _type, _flags = RTMSG.unpack_from(payload)
    a = attrs(payload, RTMSG.size)
    raw_dst = a.get(RTA_DST)
    if raw_dst is not None:
        dst = ipaddress.ip_address(bytes(raw_dst))
    else:
        dst = ipaddress.ip_address("0.0.0.0" if family == AF_INET else "::")
    net = ipaddress.ip_network(f"{dst}/{dst_len}", strict=False)
    table = as_u32(a.get(RTA_TABLE)) or rt_table
    hops = a.get(RTA_MULTIPATH)
    if hops is not None and len(hops):
        out = []
        offset = 0
        while offset + RTNEXTHOP.size <= len(hops):
            length, _nh_flags, _hops, ifindex = RTNEXTHOP.unpack_from(hops, offset)
            if length < RTNEXTHOP.size:
                break
            gw = attrs(hops, offset + RTNEXTHOP.size, offset + length).get(RTA_GATEWAY)
            out.append((net, str(ipaddress.ip_address(bytes(gw))) if gw is not None else None, ifindex, table))
            offset += (length + 3) & ~3
        return out
    gw = a.get(RTA_GATEWAY)
    oif = a.get(RTA_OIF)
    return [
        (
            net,
            str(ipaddress.ip_address(bytes(gw))) if gw is not None else None,
            as_u32(oif) if oif is not None else None,
            table,
        )
    ]
