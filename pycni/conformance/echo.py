"""The conformance echo service: it answers every TCP connection and UDP datagram with the address it saw.

Run as a child process of `pycni conformance run`, which stops it by PID::

    python -m pycni.conformance.echo --netns /run/netns/POD --address 0.0.0.0 --port 7080 \\
        --label node-a/probe --lifetime 600

A request is one line, ``PYCNI-CONFORMANCE <nonce>``; the answer is one JSON
line ``{"service": "pycni-conformance-echo", "label": ..., "peer": ..., "nonce": ...}``
where ``peer`` is the source address the service saw: the no-SNAT check
compares it with the sender's own address. Anything else gets no answer.

The service prints ``ready`` once both sockets are bound, exits on SIGTERM,
when its parent dies (PR_SET_PDEATHSIG) and after ``--lifetime`` seconds at
the latest, so a crashed run leaves nothing listening.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time

SERVICE = "pycni-conformance-echo"
REQUEST_PREFIX = b"PYCNI-CONFORMANCE "
MAX_REQUEST = 256
CONN_TIMEOUT = 2.0
PR_SET_PDEATHSIG = 1


def answer(request: bytes, peer: str, label: str) -> bytes | None:
    """The reply to one request line, or None when it is not ours."""
    line = request.split(b"\n", 1)[0].strip()
    if not line.startswith(REQUEST_PREFIX):
        return None
    nonce = line[len(REQUEST_PREFIX) :].decode("ascii", "replace")[:64]
    return (json.dumps({"service": SERVICE, "label": label, "peer": peer, "nonce": nonce}) + "\n").encode()


def _peer_address(peer: tuple) -> str:
    address = ipaddress.ip_address(peer[0].split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


def _serve_connection(conn: socket.socket, peer: tuple, label: str) -> None:
    with conn:
        conn.settimeout(CONN_TIMEOUT)
        data = b""
        try:
            while b"\n" not in data and len(data) < MAX_REQUEST:
                chunk = conn.recv(MAX_REQUEST)
                if not chunk:
                    break
                data += chunk
            reply = answer(data, _peer_address(peer), label)
            if reply is not None:
                conn.sendall(reply)
        except OSError:
            pass


def bind_sockets(address: str, port: int) -> tuple[socket.socket, socket.socket]:
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    tcp = socket.socket(family, socket.SOCK_STREAM)
    udp = socket.socket(family, socket.SOCK_DGRAM)
    for sock in (tcp, udp):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and ipaddress.ip_address(address).is_unspecified:
            # "::" serves both families (a dual-stack probe pod), whatever net.ipv6.bindv6only says.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((address, port))
    tcp.listen(64)
    return tcp, udp


def serve(tcp: socket.socket, udp: socket.socket, label: str, deadline: float, stop: threading.Event) -> None:
    tcp.setblocking(False)
    udp.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(tcp, selectors.EVENT_READ)
    selector.register(udp, selectors.EVENT_READ)
    while not stop.is_set() and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            try:
                if key.fileobj is tcp:
                    conn, peer = tcp.accept()
                    conn.setblocking(True)
                    threading.Thread(target=_serve_connection, args=(conn, peer, label), daemon=True).start()
                else:
                    data, peer = udp.recvfrom(MAX_REQUEST)
                    reply = answer(data, _peer_address(peer), label)
                    if reply is not None:
                        udp.sendto(reply, peer)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                continue
    selector.close()


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pycni.conformance.echo", description=__doc__.splitlines()[0])
    parser.add_argument("--netns", default="", help="network namespace path to serve in (default: this one)")
    parser.add_argument("--address", required=True, help="address to listen on (an address, never a name)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--lifetime", type=float, default=600.0, help="exit after this many seconds at the latest")
    args = parser.parse_args(argv)
    _die_with_parent()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if os.getppid() == 1:  # the parent is already gone
        return 1
    if args.netns:
        import netns

        with netns.enter(args.netns):
            tcp, udp = bind_sockets(args.address, args.port)
    else:
        tcp, udp = bind_sockets(args.address, args.port)
    print("ready", flush=True)
    serve(tcp, udp, args.label, time.monotonic() + args.lifetime, stop)
    tcp.close()
    udp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
