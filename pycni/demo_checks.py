"""What both demos check and how: pods, a scorecard, a ping, a TCP exchange that reports its source.

Shared by ``pycni demo`` (one node) and ``pycni demo --nodes N`` (the overlay).
"""

from __future__ import annotations

import socket
import subprocess
import threading
from dataclasses import dataclass, field

import click


@dataclass
class Pod:
    name: str
    path: str
    container_id: str
    address: str = ""
    gateway: str = ""
    address6: str = ""  # a dual-stack pod's IPv6 address (address and gateway are then the IPv4 ones)
    gateway6: str = ""

    def address_of(self, version: int) -> str:
        return self.address6 if version == 6 else self.address

    def gateway_of(self, version: int) -> str:
        return self.gateway6 if version == 6 else self.gateway


@dataclass
class Scorecard:
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def record(self, label: str, ok: bool, detail: str = "") -> None:
        mark = click.style("ok  ", fg="green") if ok else click.style("FAIL", fg="red")
        click.echo(f"  [{mark}] {label}{'  ' + detail if detail else ''}")
        (self.passed if ok else self.failed).append(label)


def ping(ns_name: str, address: str) -> tuple[bool, str]:
    proc = subprocess.run(
        ["ip", "netns", "exec", ns_name, "ping", "-c", "1", "-W", "2", address],
        capture_output=True,
        text=True,
        timeout=10,
    )
    rtt = ""
    for line in proc.stdout.splitlines():
        if "time=" in line:
            rtt = line.split("time=", 1)[1]
    return proc.returncode == 0, rtt


def tcp_exchange(server_ns: str, client_ns: str, connect_to: str, port: int, listen_port: int) -> tuple[bool, str]:
    """One TCP round trip: a listener in server_ns, a client in client_ns (IPv4 or IPv6, as connect_to is);
    the answer ends with the source address the listener saw."""
    import netns

    family = socket.AF_INET6 if ":" in connect_to else socket.AF_INET
    with netns.enter(server_ns):
        listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", listen_port))
    listener.listen(1)
    listener.settimeout(5)
    reply: list[bytes] = []

    def serve() -> None:
        try:
            conn, peer = listener.accept()
            with conn:
                conn.settimeout(5)
                data = conn.recv(1024)
                conn.sendall(data + b", seen from " + peer[0].encode())
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with netns.enter(client_ns):
            client = socket.socket(family, socket.SOCK_STREAM)
        with client:
            client.settimeout(5)
            client.connect((connect_to, port))
            client.sendall(b"hello")
            reply.append(client.recv(1024))
    except OSError as exc:
        return False, str(exc)
    finally:
        thread.join(timeout=6)
        listener.close()
    return True, reply[0].decode(errors="replace") if reply else ""
