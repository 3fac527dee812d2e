"""The client side of the checks: one TCP or UDP exchange with an echo service, one ICMP echo.

Each function opens its socket in the network namespace it is given (a probe
pod's; None: the caller's, i.e. the node's) and talks to an address, never a
name: nothing here resolves DNS. The result says what was observed (a reply,
or why not: a timeout, a refusal, an ICMP error) and how long it took.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .echo import REQUEST_PREFIX, SERVICE

IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
IPV6_MTU_DISCOVER = getattr(socket, "IPV6_MTU_DISCOVER", 23)
IPV6_PMTUDISC_DO = getattr(socket, "IPV6_PMTUDISC_DO", 2)
IPV6_DONTFRAG = getattr(socket, "IPV6_DONTFRAG", 62)
ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY, ICMP_UNREACH = 8, 0, 3
ICMP6_UNREACH, ICMP6_PACKET_TOO_BIG, ICMP6_ECHO_REQUEST, ICMP6_ECHO_REPLY = 1, 2, 128, 129
HEADER_BYTES = {4: 20 + 8, 6: 40 + 8}  # IP header + ICMP header: an echo's packet is its payload + these
_UNREACH_CODES = {
    0: "network unreachable",
    1: "host unreachable",
    3: "port unreachable",
    9: "rejected: network administratively prohibited",
    10: "rejected: host administratively prohibited",
    13: "rejected: administratively prohibited",
}
_UNREACH6_CODES = {
    0: "unreachable (no route to destination)",
    1: "rejected: administratively prohibited",
    3: "unreachable (address unreachable)",
    4: "port unreachable",
    5: "rejected: source address failed ingress/egress policy",
    6: "rejected: reject route to destination",
}
_ids = iter(range(1, 1 << 30))
_ids_lock = threading.Lock()


@dataclass
class Exchange:
    ok: bool
    latency_ms: float | None = None
    reply: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # timeout, refused, unreachable, reset, emsgsize..., frag-needed..., rejected...

    @property
    def peer(self) -> str:
        """The source address the echo service saw."""
        return str(self.reply.get("peer", ""))

    @property
    def label(self) -> str:
        return str(self.reply.get("label", ""))


def _checked(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        raise ValueError(f"{address!r} is not an address: the conformance checks never resolve names") from None


def _open(netns_path: str | None, family: int, kind: int, proto: int = 0) -> socket.socket:
    if netns_path:
        import netns

        with netns.enter(netns_path):
            return socket.socket(family, kind, proto)
    return socket.socket(family, kind, proto)


def _family(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def _error(exc: OSError) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable (" + os.strerror(exc.errno) + ")"
    if exc.errno == errno.EACCES or exc.errno == errno.EPERM:
        return "rejected (" + os.strerror(exc.errno) + ")"
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _parse(raw: bytes, nonce: str) -> dict[str, Any] | None:
    try:
        reply = json.loads(raw.split(b"\n", 1)[0])
    except ValueError:
        return None
    if not isinstance(reply, dict) or reply.get("service") != SERVICE or reply.get("nonce") != nonce:
        return None
    return reply


def tcp_exchange(netns_path: str | None, address: str, port: int, timeout: float) -> Exchange:
    """Connect, send one request, read the echo's answer."""
    address = _checked(address)
    nonce = os.urandom(6).hex()
    sock = _open(netns_path, _family(address), socket.SOCK_STREAM)
    start = time.monotonic()
    try:
        with sock:
            sock.settimeout(timeout)
            sock.connect((address, port))
            sock.sendall(REQUEST_PREFIX + nonce.encode() + b"\n")
            data = b""
            while b"\n" not in data and len(data) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        return Exchange(False, error=_error(exc))
    latency = (time.monotonic() - start) * 1000
    reply = _parse(data, nonce)
    if reply is None:
        return Exchange(False, latency, error="an answer that is not the conformance echo's")
    return Exchange(True, latency, reply)


def udp_exchange(netns_path: str | None, address: str, port: int, timeout: float, tries: int = 2) -> Exchange:
    """Send one datagram (again on silence, ``tries`` times in all) and wait for the echo's answer."""
    address = _checked(address)
    nonce = os.urandom(6).hex()
    sock = _open(netns_path, _family(address), socket.SOCK_DGRAM)
    per_try = max(timeout / max(tries, 1), 0.2)
    last = "timeout"
    with sock:
        try:
            sock.connect((address, port))
        except OSError as exc:
            return Exchange(False, error=_error(exc))
        for _ in range(max(tries, 1)):
            start = time.monotonic()
            try:
                sock.send(REQUEST_PREFIX + nonce.encode() + b"\n")
                deadline = start + per_try
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise socket.timeout()
                    sock.settimeout(left)
                    reply = _parse(sock.recv(4096), nonce)
                    if reply is not None:
                        return Exchange(True, (time.monotonic() - start) * 1000, reply)
            except OSError as exc:
                last = _error(exc)
                if last == "refused":
                    break
    return Exchange(False, error=last)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _echo_request(ident: int, seq: int, payload: bytes) -> bytes:
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, _checksum(header + payload), ident, seq) + payload


def _match(packet: bytes, address: str, ident: int, seq: int) -> str | None:
    """ "ok" for our echo reply, an error text for an ICMP error about our request, else None."""
    if len(packet) < 20:
        return None
    ihl = (packet[0] & 0x0F) * 4
    icmp = packet[ihl:]
    if len(icmp) < 8:
        return None
    kind, code = icmp[0], icmp[1]
    if kind == ICMP_ECHO_REPLY:
        r_ident, r_seq = struct.unpack("!HH", icmp[4:8])
        source = socket.inet_ntoa(packet[12:16])
        return "ok" if (r_ident, r_seq) == (ident, seq) and source == address else None
    if kind == ICMP_UNREACH and len(icmp) >= 8 + 20 + 8:
        inner = icmp[8:]
        inner_ihl = (inner[0] & 0x0F) * 4
        inner_dst = socket.inet_ntoa(inner[16:20])
        inner_icmp = inner[inner_ihl : inner_ihl + 8]
        if inner_dst != address or len(inner_icmp) < 8:
            return None
        if struct.unpack("!HH", inner_icmp[4:8]) != (ident, seq):
            return None
        if code == 4:
            mtu = struct.unpack("!H", icmp[6:8])[0]
            return f"frag-needed (next-hop MTU {mtu})"
        return _UNREACH_CODES.get(code, f"unreachable (ICMP code {code})")
    return None


def _echo_request6(ident: int, seq: int, payload: bytes) -> bytes:
    """An ICMPv6 echo request; the kernel fills in the checksum (it covers the IPv6 pseudo-header)."""
    return struct.pack("!BBHHH", ICMP6_ECHO_REQUEST, 0, 0, ident, seq) + payload


def _match6(icmp: bytes, source: str, address: str, ident: int, seq: int) -> str | None:
    """``_match`` for ICMPv6, as a raw IPv6 socket receives it: the ICMPv6 message without the IPv6 header,
    and its sender's address."""
    if len(icmp) < 8:
        return None
    kind, code = icmp[0], icmp[1]
    if kind == ICMP6_ECHO_REPLY:
        r_ident, r_seq = struct.unpack("!HH", icmp[4:8])
        return "ok" if (r_ident, r_seq) == (ident, seq) and _same(source, address) else None
    if kind in (ICMP6_UNREACH, ICMP6_PACKET_TOO_BIG) and len(icmp) >= 8 + 40 + 8:
        inner = icmp[8:]
        inner_dst = socket.inet_ntop(socket.AF_INET6, inner[24:40])
        if not _same(inner_dst, address) or inner[6] != socket.IPPROTO_ICMPV6:
            return None
        if struct.unpack("!HH", inner[44:48]) != (ident, seq):
            return None
        if kind == ICMP6_PACKET_TOO_BIG:
            return f"packet-too-big (next-hop MTU {struct.unpack('!I', icmp[4:8])[0]})"
        return _UNREACH6_CODES.get(code, f"unreachable (ICMPv6 code {code})")
    return None


def _same(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a.split("%", 1)[0]) == ipaddress.ip_address(b)
    except ValueError:
        return False


def icmp_echo(
    netns_path: str | None, address: str, size: int, dont_fragment: bool, timeout: float, tries: int = 2
) -> Exchange:
    """One ICMP echo (ICMPv6 to an IPv6 address) with ``size`` bytes of payload: the IP packet is
    size + 28 bytes (IPv6: size + 48).

    With ``dont_fragment`` nothing on the way may fragment the packet: IPv4 sets DF (IP_PMTUDISC_DO), like
    ``ping -M do``; IPv6 routers never fragment, and the socket does not either (IPV6_PMTUDISC_DO,
    IPV6_DONTFRAG).
    """
    address = _checked(address)
    version = ipaddress.ip_address(address).version
    if version == 6:
        sock = _open(netns_path, socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    else:
        sock = _open(netns_path, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with _ids_lock:
        ident = (os.getpid() + next(_ids)) & 0xFFFF
    per_try = max(timeout / max(tries, 1), 0.2)
    payload = (b"pycni-conformance-" * (size // 18 + 1))[:size]
    last = "timeout"
    with sock:
        if dont_fragment and version == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_DONTFRAG, 1)
        elif dont_fragment:
            sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        for seq in range(1, max(tries, 1) + 1):
            start = time.monotonic()
            request = _echo_request6(ident, seq, payload) if version == 6 else _echo_request(ident, seq, payload)
            try:
                sock.sendto(request, (address, 0))
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:
                    return Exchange(False, error=f"emsgsize (message too long{_path_mtu(sock, version)})")
                return Exchange(False, error=_error(exc))
            deadline = start + per_try
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                ready, _, _ = select.select([sock], [], [], left)
                if not ready:
                    break
                try:
                    packet, sender = sock.recvfrom(65535)
                except OSError:
                    continue
                if version == 6:
                    verdict = _match6(packet, str(sender[0]), address, ident, seq)
                else:
                    verdict = _match(packet, address, ident, seq)
                if verdict == "ok":
                    return Exchange(True, (time.monotonic() - start) * 1000)
                if verdict is not None:
                    last = verdict
                    if not verdict.startswith(("frag-needed", "packet-too-big")):
                        return Exchange(False, error=verdict)
    return Exchange(False, error=last)


def _path_mtu(sock: socket.socket, version: int) -> str:
    try:
        if version == 6:
            return f", path MTU {sock.getsockopt(socket.IPPROTO_IPV6, getattr(socket, 'IPV6_MTU', 24))}"
        return f", path MTU {sock.getsockopt(socket.IPPROTO_IP, getattr(socket, 'IP_MTU', 14))}"
    except OSError:
        return ""
