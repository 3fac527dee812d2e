"""Pipelined rtnetlink writes: many neighbour, FDB and route requests on one socket, acknowledged together.

pyroute2's synchronous calls send one request and wait for its answer; a node
that programs a thousand remote nodes at start pays three thousand round
trips. Here every request goes out at once (``sendmsg`` in chunks that fit the
socket buffer) and the acknowledgements are read afterwards, matched by
sequence number. The messages are built by hand, for the three kinds the
overlay writes::

    RTM_NEWNEIGH / RTM_DELNEIGH  ndmsg{family, ifindex, state, flags} + NDA_DST, NDA_LLADDR
    RTM_NEWROUTE / RTM_DELROUTE  rtmsg{family, dst_len, table, protocol, scope, type, flags} + RTA_DST,
                                 RTA_GATEWAY, RTA_OIF (onlink: RTNH_F_ONLINK in rtm_flags)

Each request carries NLM_F_ACK; a new entry also NLM_F_CREATE | NLM_F_REPLACE
("replace"). The answer to each request is its errno (0: done), so a caller
can treat "not there" on a delete as success. Everything acts in the network
namespace the socket was opened in (the calling thread's).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_CREATE = 0x400
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29
NDA_DST, NDA_LLADDR = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
AF_INET, AF_INET6, AF_BRIDGE = 2, 10, 7
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x04
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10

_NLMSGHDR = struct.Struct("=IHHII")
_NDMSG = struct.Struct("=BxxxiHBB")
_RTMSG = struct.Struct("=BBBBBBBBI")
_CHUNK_BYTES = 32 * 1024  # requests per sendmsg: well under the socket's send buffer
_MAX_WAIT = 30.0


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((-length) % 4)


def _address(text: str) -> tuple[int, bytes]:
    address = ipaddress.ip_address(text)
    return (AF_INET6 if address.version == 6 else AF_INET), address.packed


def _mac(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


@dataclass(frozen=True)
class Request:
    """One rtnetlink request: its message type, flags and body (after the netlink header)."""

    kind: int
    flags: int
    body: bytes
    what: str  # for error messages: "add neighbour 10.244.3.0 -> 0a:..."


def neigh(add: bool, ifindex: int, ip: str, mac: str) -> Request:
    """`ip neigh replace IP lladdr MAC dev IFINDEX nud permanent` (or its delete)."""
    family, packed = _address(ip)
    body = _NDMSG.pack(family, ifindex, NUD_PERMANENT, 0, 0) + _attr(NDA_DST, packed)
    if add:
        body += _attr(NDA_LLADDR, _mac(mac))
    return Request(
        RTM_NEWNEIGH if add else RTM_DELNEIGH,
        NLM_F_CREATE | NLM_F_REPLACE if add else 0,
        body,
        f"{'add' if add else 'remove'} neighbour {ip} -> {mac}",
    )


def fdb(add: bool, ifindex: int, mac: str, dst: str) -> Request:
    """`bridge fdb replace MAC dev IFINDEX dst DST self permanent` (or its delete)."""
    _family, packed = _address(dst)
    body = (
        _NDMSG.pack(AF_BRIDGE, ifindex, NUD_PERMANENT, NTF_SELF, 0)
        + _attr(NDA_LLADDR, _mac(mac))
        + _attr(NDA_DST, packed)
    )
    return Request(
        RTM_NEWNEIGH if add else RTM_DELNEIGH,
        NLM_F_CREATE | NLM_F_REPLACE if add else 0,
        body,
        f"{'add' if add else 'remove'} fdb {mac} -> {dst}",
    )


def onlink_route(
    add: bool, ifindex: int, dst: str, gateway: str, protocol: int, table: int = 254, onlink: bool = True
) -> Request:
    """`ip route replace DST via GATEWAY dev IFINDEX [onlink]` in ``table`` (or its delete)."""
    net = ipaddress.ip_network(dst)
    family, gw = _address(gateway)
    body = _RTMSG.pack(
        family,
        net.prefixlen,
        0,
        0,
        table if table < 256 else 252,
        protocol if add else 0,
        RT_SCOPE_UNIVERSE,
        RTN_UNICAST,
        RTNH_F_ONLINK if onlink else 0,
    )
    body += (
        _attr(RTA_DST, net.network_address.packed)
        + _attr(RTA_GATEWAY, gw)
        + _attr(RTA_OIF, struct.pack("=i", ifindex))
        + _attr(RTA_TABLE, struct.pack("=I", table))
    )
    return Request(
        RTM_NEWROUTE if add else RTM_DELROUTE,
        NLM_F_CREATE | NLM_F_REPLACE if add else 0,
        body,
        f"{'add' if add else 'remove'} route {net} via {gateway}",
    )


class BatchSocket:
    """A NETLINK_ROUTE socket for pipelined requests, in the namespace of the thread that opens it."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
            try:  # acknowledgements without a copy of the request: smaller, so more of them fit
                self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            except OSError:
                pass
            self._sock.bind((0, 0))
        except BaseException:
            self._sock.close()
            raise
        self.port = self._sock.getsockname()[0]
        self._seq = int.from_bytes(os.urandom(2), "little") << 8

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "BatchSocket":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, requests: list[Request]) -> list[int]:
        """Send every request, return each one's errno (0: done), in order."""
        results: list[int] = []
        start = 0
        while start < len(requests):
            chunk, size = [], 0
            for request in requests[start:]:
                size += _NLMSGHDR.size + len(request.body)
                chunk.append(request)
                if size >= _CHUNK_BYTES:
                    break
            results += self._run_chunk(chunk)
            start += len(chunk)
        return results

    def _run_chunk(self, requests: list[Request]) -> list[int]:
        first = self._seq
        data = bytearray()
        for offset, request in enumerate(requests):
            length = _NLMSGHDR.size + len(request.body)
            data += _NLMSGHDR.pack(
                length, request.kind, NLM_F_REQUEST | NLM_F_ACK | request.flags, (first + offset) & 0xFFFFFFFF, 0
            )
            data += request.body
        self._seq = (first + len(requests)) & 0xFFFFFFFF
        self._sock.sendall(bytes(data))
        answers: dict[int, int] = {}
        self._sock.settimeout(_MAX_WAIT)
        try:
            while len(answers) < len(requests):
                reply = self._sock.recv(1 << 16)
                offset = 0
                while offset + _NLMSGHDR.size <= len(reply):
                    length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(reply, offset)
                    if length < _NLMSGHDR.size:
                        break
                    if kind == NLMSG_ERROR and length >= _NLMSGHDR.size + 4:
                        (code,) = struct.unpack_from("=i", reply, offset + _NLMSGHDR.size)
                        index = (seq - first) & 0xFFFFFFFF
                        if index < len(requests):
                            answers[index] = -code
                    offset += (length + 3) & ~3
        except socket.timeout:
            raise OSError(
                errno.ETIMEDOUT,
                f"no answer to {len(requests) - len(answers)} of {len(requests)} "
                f"netlink requests within {_MAX_WAIT:g} s",
            ) from None
        finally:
            self._sock.settimeout(None)
        return [answers[i] for i in range(len(requests))]


def describe_errno(code: int) -> str:
    return os.strerror(code) if code else "done"
