"""The agent's wire protocol (version 1), spoken over a unix stream socket.

A request is one frame::

    MAGIC (8 bytes)  u32 body length  body

and its body is five length-prefixed fields (u32 big-endian length, then the
bytes): the caller's pycni version, the request kind (``cni`` or ``status``),
the plugin type, the environment (``KEY=VALUE`` entries joined by NUL) and
stdin. A ``cni`` request carries the caller's network namespace as a file
descriptor (SCM_RIGHTS) on its first byte, followed by the caller's CNI_NETNS
opened O_PATH when it could be opened. The agent works on these
descriptors, never on the path: a request with a non-empty CNI_NETNS but no
network-namespace descriptor for it is refused (``R``).

The agent answers with frames ``kind byte, u32 body length, body`` (the body
again length-prefixed fields):

- ``R`` refused (reason): nothing of the request remains; the shim runs the
  plugin itself. Usually the first frame; it may also follow ``A`` when the
  work met something the agent may not do (an executable outside its
  ``--cni-bin-dir`` directories): the plugin has undone what it did, as after
  any failed ADD, before the agent answers.
- ``A`` accepted (timeout seconds, the request's cniVersion as a JSON string):
  the work has started. Before this frame the agent has done nothing, so a
  connection closed without it is as safe to retry in-process as a refused
  connect; after it, the shim waits for ``D`` (or ``R``) and never runs the
  work itself otherwise.
- ``D`` done (exit code, stdout, stderr): what the plugin process would
  have produced, to relay byte for byte.
- ``S`` status (a JSON document): the answer to a ``status`` request.

Limits both ends keep: a request body is at most ``MAX_BODY`` (16 MiB; a
shim runs a larger one in-process, the agent refuses it from its header), and
a shim talks only to a socket that root owns in a directory that root owns
and nobody else may write to (``unsafe_socket``); otherwise it runs cold.

This module is the one definition of the format. The two shims carry their
own copies, because neither may import it on the warm path: the Python shim
(``shim.py``, builtin ``_socket`` and ``posix`` only; MAGIC and MAX_BODY are
filled in from here when it is written) and the compiled one
(``native_shim.c``). tests/integration/test_shim_protocol.py runs both
against an agent built from this module and against the real one, with the
same tests: framing, relaying, refusal, fallback, version skew and size
limits. Change the format here, in both shims and in the agent together.
"""

from __future__ import annotations

import functools
import os
import socket
import stat
import struct

MAGIC = b"PYCNIA\x00\x01"
MAX_BODY = 16 * 2**20
KIND_CNI, KIND_STATUS = b"cni", b"status"
REFUSED, ACCEPTED, DONE, STATUS = b"R", b"A", b"D", b"S"
ANSWERS = (REFUSED, ACCEPTED, DONE, STATUS)
REQUEST_FIELDS = 5
_LEN = struct.Struct(">I")

DEFAULT_SOCKET = "/run/pycni/agent.sock"
# Where the agent may execute delegated plugins from when no --cni-bin-dir is given.
DEFAULT_CNI_BIN_DIR = "/opt/cni/bin"
# Beside the socket: the CNI bin directories `pycni install` wrote shims for this socket into while an
# agent served it (one absolute path a line, root's, mode 0644); the agent may execute delegates from them too.
BIN_DIRS_RECORD_SUFFIX = ".cni-bin-dirs"
# Variables a shim forwards besides CNI_*: the few pycni settings a plugin reads.
FORWARDED_PREFIXES = ("CNI_", "PYCNI_")
# Set in a request's environment by the agent: a plugin executable this request
# runs (a delegated IPAM shim) runs in-process instead of calling the agent again.
NO_AGENT_VARIABLE = "PYCNI_NO_AGENT"
# Variables only the agent sets in a request's environment (a caller's are dropped).
AGENT_ONLY_PREFIX = "PYCNI_AGENT_"


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
        out.append(body[pos : pos + size])
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


def bin_dirs_record(socket_path: str) -> str:
    """The file beside ``socket_path`` that lists the CNI bin directories `pycni install` wrote its shims into."""
    return os.path.abspath(socket_path) + BIN_DIRS_RECORD_SUFFIX


def unsafe_directory(directory: str) -> str:
    """Why someone other than root could change what ``directory`` holds ("" when nobody can).

    The directory (symlinks resolved) must belong to root and be writable by
    no group or other user; so must every directory above it, except that
    a sticky one (like /tmp) may be writable by all: nobody can then rename
    what root put there. A missing directory is not unsafe here (callers
    decide what missing means).
    """
    path = os.path.realpath(directory)
    leaf = True
    while True:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return ""
        except OSError as exc:
            return f"cannot inspect {path}: {exc.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"{path} is not a directory"
        if st.st_uid != 0:
            return f"{path} belongs to uid {st.st_uid}, not root"
        if st.st_mode & 0o022 and (leaf or not st.st_mode & stat.S_ISVTX):
            return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
        if path == "/":
            return ""
        path = os.path.dirname(path)
        leaf = False


def unsafe_socket(socket_path: str) -> str:
    """Why the shims would not trust an agent at ``socket_path`` ("" when they would, or when it is missing).

    The Python shim (``shim.py``) and the native one (``native_shim.c``) do the
    same checks before they connect; `pycni install` does the directory part.
    """
    try:
        st = os.lstat(socket_path)
    except OSError:
        return ""  # nothing there (yet): connecting says so
    if not stat.S_ISSOCK(st.st_mode):
        return f"{socket_path} is not a socket"
    if st.st_uid != 0:
        return f"{socket_path} belongs to uid {st.st_uid}, not root"
    return unsafe_directory(os.path.dirname(os.path.abspath(socket_path)))
