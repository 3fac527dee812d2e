"""Talking to a running agent from Python: status, and CNI requests as a shim sends them (tests)."""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Mapping

from . import protocol


class AgentUnreachable(Exception):
    """Nothing listens on the socket (or the connection was refused)."""


class AgentRefused(Exception):
    """The agent answered with a refusal (reason in the message)."""


def _connect(socket_path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(socket_path)
    except OSError as exc:
        sock.close()
        raise AgentUnreachable(f"no pycni agent at {socket_path}: {exc.strerror or exc}") from None
    return sock


def status(socket_path: str = protocol.DEFAULT_SOCKET, timeout: float = 5.0) -> dict[str, Any]:
    """The agent's status document (alive, uptime, counters, latency per plugin and command)."""
    with _connect(socket_path, timeout) as sock:
        sock.sendall(protocol.request(protocol.pycni_version(), protocol.KIND_STATUS, "", {}, b""))
        kind, items = protocol.read_answer(sock)
    if kind == protocol.REFUSED:
        raise AgentRefused(items[0].decode(errors="replace") if items else "refused")
    if kind != protocol.STATUS:
        raise protocol.ProtocolError(f"unexpected answer {kind!r} to a status request")
    return json.loads(items[0])


@dataclass
class Answer:
    kind: str  # "done", "refused"
    accepted: bool  # the agent said it started the work
    exit_code: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    reason: str = ""


def send_cni(
    socket_path: str,
    plugin_type: str,
    environ: Mapping[str, str],
    stdin: bytes,
    netns_path: str = "/proc/thread-self/ns/net",
    version: str | None = None,
    timeout: float = 30.0,
) -> Answer:
    """Send one CNI request the way a shim does and wait for the final answer.

    ``netns_path`` is the caller's own network namespace; CNI_NETNS (from
    ``environ``) goes along opened O_PATH when it can be opened, as a shim sends it.
    """
    fds = [os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)]
    try:
        if environ.get("CNI_NETNS"):
            try:
                fds.append(os.open(environ["CNI_NETNS"], os.O_PATH | os.O_CLOEXEC))
            except OSError:
                pass
        with _connect(socket_path, timeout) as sock:
            message = protocol.request(
                version or protocol.pycni_version(), protocol.KIND_CNI, plugin_type, dict(environ), stdin
            )
            rights = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)
            sent = sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
            if sent < len(message):
                sock.sendall(message[sent:])
            accepted = False
            while True:
                kind, items = protocol.read_answer(sock)
                if kind == protocol.ACCEPTED:
                    accepted = True
                    continue
                if kind == protocol.REFUSED:  # before or after accepting: nothing of the request remains
                    return Answer("refused", accepted, reason=items[0].decode(errors="replace"))
                if kind == protocol.DONE:
                    return Answer("done", accepted, int(items[0]), items[1], items[2])
                raise protocol.ProtocolError(f"unexpected answer {kind!r}")
    finally:
        for fd in fds:
            os.close(fd)
