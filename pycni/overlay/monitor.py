"""Watching the kernel for changes to the overlay's own devices and entries.

A reconcile every few seconds would repair an FDB entry, neighbour entry or
route that someone deleted by hand, but traffic to that node would be black-
holed until then. Instead the agent listens to rtnetlink notifications and
acts as soon as one of its entries or devices is deleted or changed.

A raw NETLINK_ROUTE socket subscribed to the link, neighbour, address and
route groups. Each notification is decoded as far as the agent needs to tell
"ours, as we want it" from "changed under us" (``Change``: the interface, and
for a neighbour, FDB entry or route the addresses that identify it), so the
agent repairs exactly the entry that changed: O(1) work per notification, and
its own writes (which notify too) cost a dictionary lookup each. Lost
notifications (an overrun) are reported as None: then everything is checked.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Callable

RTMGRP_LINK = 0x1
RTMGRP_NEIGH = 0x4
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE

RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWADDR, RTM_DELADDR = 20, 21
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29
NLMSG_OVERRUN = 4
RTA_OIF = 4
RTA_DST, RTA_GATEWAY, RTA_TABLE = 1, 5, 15
NDA_DST, NDA_LLADDR = 1, 2
AF_INET, AF_INET6, AF_BRIDGE = 2, 10, 7
NUD_PERMANENT = 0x80

_NLMSGHDR = struct.Struct("=IHHII")
_RTATTR = struct.Struct("=HH")
DEBOUNCE = 0.03  # gather a burst of notifications, then reconcile once


def _align(n: int) -> int:
    return (n + 3) & ~3


@dataclass(frozen=True)
class Change:
    """One rtnetlink notification, decoded as far as the overlay needs it.

    kind: "link", "addr", "neigh" (IPv4/IPv6 neighbour), "fdb" (AF_BRIDGE entry) or "route";
    ip: a neighbour's or FDB entry's NDA_DST; mac: its NDA_LLADDR; dst: a route's "net/len";
    gateway: a route's RTA_GATEWAY.
    """

    kind: str
    index: int
    deleted: bool = False
    permanent: bool = False
    ip: str = ""
    mac: str = ""
    dst: str = ""
    gateway: str = ""
    table: int = 0


def _attrs(body: bytes, offset: int) -> dict[int, bytes]:
    """The first value of each rtattr type after a fixed header."""
    out: dict[int, bytes] = {}
    while offset + 4 <= len(body):
        length, kind = _RTATTR.unpack_from(body, offset)
        if length < 4:
            break
        out.setdefault(kind & 0x3FFF, body[offset + 4 : offset + length])
        offset += _align(length)
    return out


def _ip(family: int, raw: bytes | None) -> str:
    if not raw:
        return ""
    try:
        if family == AF_INET6 or len(raw) == 16:
            return str(ipaddress.IPv6Address(raw))
        return str(ipaddress.IPv4Address(raw[:4]))
    except ValueError:
        return ""


def _mac(raw: bytes | None) -> str:
    return ":".join(f"{b:02x}" for b in raw) if raw and len(raw) == 6 else ""


def changes(data: bytes) -> list[Change] | None:
    """The notifications in ``data``; None means messages were lost (an overrun): reconcile everything.

    Non-permanent IPv6 neighbour updates (neighbour discovery churn) are left
    out: the agent writes only permanent entries.
    """
    out: list[Change] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        body = data[offset + _NLMSGHDR.size : offset + length]
        offset += _align(length)
        if kind == NLMSG_OVERRUN:
            return None
        if kind in (RTM_NEWLINK, RTM_DELLINK) and len(body) >= 8:
            out.append(Change("link", struct.unpack_from("=i", body, 4)[0], kind == RTM_DELLINK))
        elif kind in (RTM_NEWADDR, RTM_DELADDR) and len(body) >= 8:
            out.append(Change("addr", struct.unpack_from("=I", body, 4)[0], kind == RTM_DELADDR))
        elif kind in (RTM_NEWNEIGH, RTM_DELNEIGH) and len(body) >= 12:
            family, ifindex, state = struct.unpack_from("=B3xiH", body, 0)
            permanent = bool(state & NUD_PERMANENT)
            if kind == RTM_NEWNEIGH and family == AF_INET6 and not permanent:
                continue
            attrs = _attrs(body, 12)
            ip_family = AF_INET6 if len(attrs.get(NDA_DST, b"")) == 16 else AF_INET
            out.append(
                Change(
                    "fdb" if family == AF_BRIDGE else "neigh",
                    ifindex,
                    kind == RTM_DELNEIGH,
                    permanent,
                    ip=_ip(ip_family, attrs.get(NDA_DST)),
                    mac=_mac(attrs.get(NDA_LLADDR)),
                )
            )
        elif kind in (RTM_NEWROUTE, RTM_DELROUTE) and len(body) >= 12:
            family, dst_len, _src_len, _tos, table = struct.unpack_from("=BBBBB", body, 0)
            attrs = _attrs(body, 12)
            oif = attrs.get(RTA_OIF)
            if oif is None or len(oif) < 4:
                continue
            table = struct.unpack("=I", attrs[RTA_TABLE][:4])[0] if len(attrs.get(RTA_TABLE, b"")) >= 4 else table
            dst = _ip(family, attrs.get(RTA_DST)) or ("0.0.0.0" if family == AF_INET else "::")
            out.append(
                Change(
                    "route",
                    struct.unpack("=i", oif[:4])[0],
                    kind == RTM_DELROUTE,
                    dst=f"{dst}/{dst_len}",
                    gateway=_ip(family, attrs.get(RTA_GATEWAY)),
                    table=table,
                )
            )
    return out


def notifications(data: bytes) -> list[tuple[str, int]] | None:
    """(kind, ifindex) for each message in ``data`` ("fdb" counted as "neigh"); None: messages were lost."""
    found = changes(data)
    if found is None:
        return None
    return [("neigh" if c.kind == "fdb" else c.kind, c.index) for c in found]


def relevant_indexes(data: bytes) -> set[int] | None:
    """The interface indexes the messages in ``data`` concern (None: unknown)."""
    found = notifications(data)
    return None if found is None else {index for _kind, index in found}


class KernelMonitor:
    """Calls ``on_change(changes)`` (from its own thread) with the changes to watched interfaces.

    The socket is opened in the calling thread's network namespace by start().
    ``watched()`` returns, at that moment, {kind: interface indexes} for the
    kinds "link", "addr", "neigh" (FDB entries included) and "route", or None
    when every change counts (the agent is waiting for a link to come back).
    ``on_change`` gets the changes of one burst, or None when notifications
    were lost (check everything).
    """

    def __init__(
        self,
        watched: Callable[[], dict[str, set[int]] | None],
        on_change: Callable[[list[Change] | None], None],
        log_error: Callable[[str], None] = lambda msg: None,
    ) -> None:
        self._watched = watched
        self._on_change = on_change
        self._log_error = log_error
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop_r, self._stop_w = -1, -1

    def start(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            sock.bind((0, GROUPS))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._loop, name="overlay-netlink-monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            try:
                os.write(self._stop_w, b"x")
            except OSError:
                pass
            self._thread.join(timeout)
            self._thread = None
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = -1
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _drain(self, into: list[Change]) -> bool:
        """Read everything queued; the watched changes go into ``into``. False: notifications were lost."""
        assert self._sock is not None
        complete = True
        for _ in range(10000):  # bounded: the queue holds at most SO_RCVBUF worth
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # we missed notifications: assume the worst
                    complete = False
                    continue
                raise
            found = changes(data)
            if found is None:
                complete = False
                continue
            watched = self._watched()
            into.extend(
                c
                for c in found
                if watched is None or c.index in watched.get("neigh" if c.kind == "fdb" else c.kind, ())
            )
        return complete

    def _loop(self) -> None:
        assert self._sock is not None
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            try:
                ready = {fd for fd, _ev in poller.poll()}
                if self._stop_r in ready:
                    return
                burst: list[Change] = []
                complete = self._drain(burst)
                if complete and not burst:
                    continue
                # Let a burst (a device deleted with all its entries) arrive, then act once.
                if select.select([self._stop_r], [], [], DEBOUNCE)[0]:
                    return
                complete = self._drain(burst) and complete
                self._on_change(burst if complete else None)
            except Exception as exc:  # the monitor must outlive any single failure
                self._log_error(f"kernel monitor: {exc!r}")
                if select.select([self._stop_r], [], [], 1.0)[0]:
                    return
