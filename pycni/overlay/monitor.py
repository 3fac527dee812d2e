"""Watching the kernel for changes to the overlay's own devices and entries.

A reconcile every few seconds would repair an FDB entry, neighbour entry or
route that someone deleted by hand, but traffic to that node would be black-
holed until then. Instead the agent listens to rtnetlink notifications and
reconciles as soon as one of its entries or devices is deleted or changed.

A raw NETLINK_ROUTE socket subscribed to the link, neighbour, address and
route groups; only the header fields needed to tell "ours" from "someone
else's" are decoded (ifindex, and a route's output interface).
"""
from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading
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

_NLMSGHDR = struct.Struct("=IHHII")
_RTATTR = struct.Struct("=HH")
DEBOUNCE = 0.03  # gather a burst of notifications, then reconcile once


def _align(n: int) -> int:
    return (n + 3) & ~3


def _route_oif(body: bytes) -> int | None:
    """RTA_OIF of an rtmsg body (12-byte header, then attributes)."""
    offset = 12
    while offset + 4 <= len(body):
        length, kind = _RTATTR.unpack_from(body, offset)
        if length < 4:
            return None
        if kind == RTA_OIF and length >= 8:
            return struct.unpack_from("=i", body, offset + 4)[0]
        offset += _align(length)
    return None


AF_INET6 = 10
NUD_PERMANENT = 0x80


def notifications(data: bytes) -> list[tuple[str, int]] | None:
    """(kind, ifindex) for each message in ``data``: kind is "link", "addr", "neigh" or "route".

    None means messages were lost (overrun): reconcile anyway. Non-permanent
    IPv6 neighbour updates (neighbour discovery churn) are left out: the agent
    writes only permanent entries.
    """
    out: list[tuple[str, int]] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        body = data[offset + _NLMSGHDR.size: offset + length]
        if kind == NLMSG_OVERRUN:
            return None
        if kind in (RTM_NEWLINK, RTM_DELLINK) and len(body) >= 8:
            out.append(("link", struct.unpack_from("=i", body, 4)[0]))    # ifinfomsg: family, pad, type, index
        elif kind in (RTM_NEWADDR, RTM_DELADDR) and len(body) >= 8:
            out.append(("addr", struct.unpack_from("=I", body, 4)[0]))    # ifaddrmsg: family, plen, flags, scope, index
        elif kind in (RTM_NEWNEIGH, RTM_DELNEIGH) and len(body) >= 10:
            family, ifindex, state = struct.unpack_from("=B3xiH", body, 0)  # ndmsg: family, pads, ifindex, state
            if not (kind == RTM_NEWNEIGH and family == AF_INET6 and not state & NUD_PERMANENT):
                out.append(("neigh", ifindex))
        elif kind in (RTM_NEWROUTE, RTM_DELROUTE):
            oif = _route_oif(body)
            if oif is not None:
                out.append(("route", oif))
        offset += _align(length)
    return out


def relevant_indexes(data: bytes) -> set[int] | None:
    """The interface indexes the messages in ``data`` concern (None: unknown)."""
    found = notifications(data)
    return None if found is None else {index for _kind, index in found}


class KernelMonitor:
    """Calls ``on_change()`` (from its own thread) when a watched interface or its entries change.

    The socket is opened in the calling thread's network namespace by start().
    ``watched()`` returns, at that moment, {kind: interface indexes} for the
    kinds "link", "addr", "neigh" and "route", or None when every change
    counts (the agent is waiting for a link to come back).
    """

    def __init__(self, watched: Callable[[], dict[str, set[int]] | None], on_change: Callable[[], None],
                 log_error: Callable[[str], None] = lambda msg: None) -> None:
        self._watched = watched
        self._on_change = on_change
        self._log_error = log_error
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop_r, self._stop_w = -1, -1

    def start(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
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

    def _drain(self) -> bool:
        """Read everything queued; True if any of it concerns a watched interface."""
        assert self._sock is not None
        relevant = False
        for _ in range(10000):  # bounded: the queue holds at most SO_RCVBUF worth
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # we missed notifications: assume the worst
                    relevant = True
                    continue
                raise
            found = notifications(data)
            if found is None:
                relevant = True
                continue
            watched = self._watched()
            if watched is None or any(index in watched.get(kind, ()) for kind, index in found):
                relevant = True
        return relevant

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
                if not self._drain():
                    continue
                # Let a burst (a device deleted with all its entries) arrive, then act once.
                if select.select([self._stop_r], [], [], DEBOUNCE)[0]:
                    return
                self._drain()
                self._on_change()
            except Exception as exc:  # the monitor must outlive any single failure
                self._log_error(f"kernel monitor: {exc!r}")
                if select.select([self._stop_r], [], [], 1.0)[0]:
                    return
