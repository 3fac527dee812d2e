"""The agent's wire protocol (version 1), spoken over a unix stream socket.

A request is one frame::

    MAGIC (8 bytes)  u32 body length  body

and its body is five length-prefixed fields (u32 big-endian length, then the
bytes): the caller's pycni version, the request kind (``cni`` or ``status``),
the plugin type, the environment (``KEY=VALUE`` entries joined by NUL) and
stdin. A ``cni`` request carries the caller's network namespace as a file
descriptor (SCM_RIGHTS) on its first byte, followed by the caller's CNI_NETNS
opened O_PATH when it could be opened: the agent refuses (``R``) a request
whose CNI_NETNS is another namespace, or none, in its own mount namespace.

The agent answers with frames ``kind byte, u32 body length, body`` (the body
again length-prefixed fields):

- ``R`` refused (reason): nothing ran; the shim runs the plugin itself.
- ``A`` accepted (timeout seconds, the request's cniVersion as a JSON string):
  the work has started. Before this frame the agent has done nothing, so a
  connection closed without it is as safe to retry in-process as a refused
  connect; after it, the shim waits for the answer and never runs the work.
- ``D`` done (exit code, stdout, stderr): what the plugin process would
  have produced, to relay byte for byte.
- ``S`` status (a JSON document): the answer to a ``status`` request.

The shim (``shim.py``) carries its own copy of this format, written with the
builtin ``_socket`` and ``posix`` modules only; keep the two in step.
"""
from __future__ import annotations

import functools
import socket
import struct

MAGIC = b"PYCNIA\x00\x01"
MAX_BODY = 16 * 2**20
KIND_CNI, KIND_STATUS = b"cni", b"status"
REFUSED, ACCEPTED, DONE, STATUS = b"R", b"A", b"D", b"S"
ANSWERS = (REFUSED, ACCEPTED, DONE, STATUS)
REQUEST_FIELDS = 5
_LEN = struct.Struct(">I")

DEFAULT_SOCKET = "/run/pycni/agent.sock"
# Variables a shim forwards besides CNI_*: the few pycni settings a plugin reads.
FORWARDED_PREFIXES = ("CNI_", "PYCNI_")
# Set in a request's environment by the agent: a plugin executable this request
# runs (a delegated IPAM shim) runs in-process instead of calling the agent again.
NO_AGENT_VARIABLE = "PYCNI_NO_AGENT"


class ProtocolError(Exception):
    """A frame that does not follow this protocol."""


@functools.cache
def pycni_version() -> str:
    """The version both ends compare: a shim of another release is refused (it then runs cold)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pycni")
    except PackageNotFoundError:
        return "unknown"


def fields(*items: bytes) -> bytes:
    return b"".join(_LEN.pack(len(item)) + item for item in items)


def split_fields(body: bytes, count: int | None = None) -> list[bytes]:
    out: list[bytes] = []
    pos = 0
    while pos < len(body):
        if pos + 4 > len(body):
            raise ProtocolError("truncated field length")
        (size,) = _LEN.unpack_from(body, pos)
        pos += 4
        if pos + size > len(body):
            raise ProtocolError("truncated field")
        out.append(body[pos:pos + size])
        pos += size
    if count is not None and len(out) != count:
        raise ProtocolError(f"expected {count} fields, got {len(out)}")
    return out


def request(version: str, kind: bytes, plugin_type: str, environ: dict[str, str], stdin: bytes) -> bytes:
    env = b"\0".join(f"{k}={v}".encode() for k, v in environ.items())
    body = fields(version.encode(), kind, plugin_type.encode(), env, stdin)
    return MAGIC + _LEN.pack(len(body)) + body


def answer(kind: bytes, *items: bytes) -> bytes:
    body = fields(*items)
    return kind + _LEN.pack(len(body)) + body


def parse_environ(block: bytes) -> dict[str, str]:
    environ: dict[str, str] = {}
    for entry in block.split(b"\0") if block else []:
        key, sep, value = entry.partition(b"=")
        if not sep or not key:
            raise ProtocolError("environment entry without '='")
        environ[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    return environ


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes, or EOFError when the peer closes first."""
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise EOFError("connection closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_answer(sock: socket.socket) -> tuple[bytes, list[bytes]]:
    """One answer frame: (kind, fields)."""
    head = recv_exact(sock, 5)
    kind, (size,) = head[:1], _LEN.unpack(head[1:])
    if kind not in ANSWERS or size > MAX_BODY:
        raise ProtocolError(f"unexpected answer frame {kind!r}")
    return kind, split_fields(recv_exact(sock, size))
