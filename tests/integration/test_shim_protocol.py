"""Both shims and the agent against the one definition of their protocol (pycni/agent/protocol.py).

Every test here runs twice, once with the Python shim (``pycni install
--python-shim``) and once with the compiled one (the default), and expects the
same bytes from both: the same request on the wire, the same stdout, stderr
and exit code relayed, the same one-line notes when they fall back to running
the plugin in-process (the cold path), the same "try again" errors.

Two kinds of agent stand behind the shims:

- ``ScriptedAgent``: a socket server built from ``protocol`` alone, in a thread
  of the test. It decodes the request as the real agent does and answers with
  whatever frames a test scripts (a relay of arbitrary bytes, a refusal,
  nothing at all), so each rule of the protocol is exercised on its own. It
  does no networking.
- the real `pycni agent` (``running_agent``: a namespace of its own, a socket
  under the test's directory, stopped by PID), for version skew and a large
  request served warm. The shims then run inside a node namespace of the test
  (``ip netns exec``), with CNI_NETNS naming a pod namespace of the test.

The plugin behind the shims is host-local, which only writes files (its
dataDir, fresh for every call), so a cold run needs no namespace at all. A
call's cold result is compared with the same executable run with
PYCNI_NO_AGENT=1, which never tries an agent.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from pycni.agent import protocol
from tests.plugin_modes import running_agent

pytestmark = pytest.mark.integration

SHIMS = ("python", "compiled")
PLUGIN = "host-local"
SUBNET = "10.93.0.0/24"
MIB = 2**20
CALL_TIMEOUT = 60


@pytest.fixture(params=SHIMS)
def shim_kind(request) -> str:
    return request.param


# ---- the shims ---------------------------------------------------------------------------------


@dataclass
class Shims:
    """pycni's plugins as `pycni install` writes them, with one kind of shim, for one agent socket."""

    kind: str
    bin_dir: Path
    socket_path: Path
    data_dirs: Iterator[int] = field(default_factory=lambda: iter(range(10**6)))

    def exe(self, plugin_type: str = PLUGIN) -> str:
        return str(self.bin_dir / plugin_type)

    def with_version(self, version: str) -> str:
        """A host-local executable like the installed one, but of another pycni release (``version``)."""
        from cni_plugins.spec.registry import PLUGINS
        from pycni.agent.shim import native_script, script
        from pycni.install import MARKER, NATIVE_SHIM

        path = self.bin_dir / f"{PLUGIN}-{version}"
        marker = f"{MARKER}: test, another release"
        if self.kind == "compiled":
            text = native_script(
                PLUGIN,
                PLUGINS[PLUGIN],
                sys.executable,
                marker,
                str(self.bin_dir / NATIVE_SHIM),
                str(self.socket_path),
                version=version,
            )
        else:
            text = script(PLUGIN, PLUGINS[PLUGIN], sys.executable, marker, str(self.socket_path), version=version)
        path.write_text(text)
        path.chmod(0o755)
        return str(path)

    def conf(self, version: str = "0.4.0", **extra: object) -> bytes:
        """A host-local configuration with a dataDir of its own (so every call allocates the same address)."""
        data_dir = self.bin_dir.parent / f"ipam-{next(self.data_dirs)}"
        return json.dumps(
            {
                "cniVersion": version,
                "name": "protonet",
                "type": "bridge",
                "ipam": {"type": PLUGIN, "dataDir": str(data_dir), "ranges": [[{"subnet": SUBNET}]]},
                **extra,
            }
        ).encode()


def install_shims(workdir: Path, kind: str, socket_path: Path) -> Shims:
    from pycni.install import install

    done = install(
        str(workdir / "bin"), agent_socket=str(socket_path), shim="native" if kind == "compiled" else "python"
    )
    assert done.shim == kind, done.note
    return Shims(kind, workdir / "bin", socket_path)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A directory only root can write to: the shims trust a socket only there."""
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def shims(tmp_path: Path, run_dir: Path, shim_kind: str) -> Shims:
    return install_shims(tmp_path, shim_kind, run_dir / "agent.sock")


@dataclass
class Call:
    """What a shim process did: its exit code and its stdout and stderr, as bytes."""

    code: int
    out: bytes
    err: bytes

    @property
    def notes(self) -> list[str]:
        return [line for line in self.err.decode(errors="replace").splitlines() if line.startswith("pycni: ")]


def call(
    exe: str, stdin: bytes, command: str = "ADD", netns: str = "/nonexistent/netns", node: str | None = None, **env: str
) -> Call:
    """Run a plugin executable as a runtime does (CNI_* environment, config on stdin), in ``node`` if given."""
    variables = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": os.path.dirname(exe),
        **env,
    }
    argv = ["ip", "netns", "exec", node, exe] if node else [exe]
    proc = subprocess.run(argv, input=stdin, env=variables, capture_output=True, timeout=CALL_TIMEOUT)
    return Call(proc.returncode, proc.stdout, proc.stderr)


def cold(shims: Shims, stdin: bytes, node: str | None = None, netns: str = "/nonexistent/netns") -> Call:
    """The same request run in-process from the start (PYCNI_NO_AGENT): what every fallback must produce."""
    return call(shims.exe(), stdin, node=node, netns=netns, PYCNI_NO_AGENT="1")


def running_cold(note: str) -> str:
    return f"pycni: {note}; running {PLUGIN} in-process"


def try_again(cni_version: str, msg: str) -> bytes:
    """The shims' own "try again later" error (code 11), byte for byte."""
    return (f'{{\n    "cniVersion": "{cni_version}",\n    "code": 11,\n    "msg": "{msg}"\n}}\n').encode()


# ---- an agent built from the protocol module -----------------------------------------------------


@dataclass
class Request:
    """One request as the agent decodes it: its five fields, and what its descriptors are."""

    magic: bytes
    version: str
    kind: bytes
    plugin_type: str
    environ: dict[str, str]
    stdin: bytes
    descriptors: list[os.stat_result]


HANG = b""  # in a script: say nothing more and keep the connection open until the shim gives up


class ScriptedAgent:
    """A unix socket server answering every request with ``script(request)``'s frames, then hanging up.

    A connection that brings no request at all (a shim that connected and
    then ran the request itself) is counted in ``silent``. Serves one
    connection at a time, in a thread; ``close()`` stops it.
    """

    def __init__(self, socket_path: Path, script: Callable[[Request], list[bytes]]) -> None:
        self.script = script
        self.requests: list[Request] = []
        self.silent = 0
        self.errors: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(socket_path))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(CALL_TIMEOUT)
                try:
                    self._answer(conn)
                except Exception as exc:  # reported by the test through self.errors
                    self.errors.append(f"{type(exc).__name__}: {exc}")

    def _answer(self, conn: socket.socket) -> None:
        request = self._read(conn)
        if request is None:
            self.silent += 1
            return
        self.requests.append(request)
        for frame in self.script(request):
            if frame == HANG:
                while conn.recv(4096):  # until the shim closes its end
                    pass
                return
            conn.sendall(frame)

    @staticmethod
    def _read(conn: socket.socket) -> Request | None:
        head, fds = b"", []
        while len(head) < 12:
            data, ancdata, _, _ = conn.recvmsg(12 - len(head), socket.CMSG_SPACE(8 * 4))
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) - len(payload) % 4])
            if not data:
                if head:
                    raise EOFError("the shim closed in the middle of a header")
                return None
            head += data
        try:
            (size,) = struct.unpack(">I", head[8:12])
            body = protocol.recv_exact(conn, size)
            version, kind, plugin_type, env, stdin = protocol.split_fields(body, protocol.REQUEST_FIELDS)
            return Request(
                head[:8],
                version.decode(),
                kind,
                plugin_type.decode(),
                protocol.parse_environ(env),
                stdin,
                [os.fstat(fd) for fd in fds],
            )
        finally:
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(CALL_TIMEOUT + 10)
        self.sock.close()
        assert not self.thread.is_alive(), "the scripted agent did not stop"
        assert not self.errors, self.errors


@contextlib.contextmanager
def scripted_agent(shims: Shims, script: Callable[[Request], list[bytes]]) -> Iterator[ScriptedAgent]:
    agent = ScriptedAgent(shims.socket_path, script)
    try:
        yield agent
    finally:
        agent.close()
        os.unlink(shims.socket_path)


def accepted(timeout: str = "60.0", cni_version: str = "0.4.0") -> bytes:
    return protocol.answer(protocol.ACCEPTED, timeout.encode(), json.dumps(cni_version).encode())


def done(code: int, stdout: bytes, stderr: bytes) -> bytes:
    return protocol.answer(protocol.DONE, str(code).encode(), stdout, stderr)


def refused(reason: str) -> bytes:
    return protocol.answer(protocol.REFUSED, reason.encode())


# ---- framing -------------------------------------------------------------------------------------


def test_the_request_is_one_frame_of_five_fields_with_the_namespaces_as_descriptors(shims, tmp_path):
    stdin = shims.conf()
    cni_netns = tmp_path / "a-netns-path"  # any file will do: the shim opens it O_PATH and sends that
    cni_netns.write_text("")
    with scripted_agent(shims, lambda r: [accepted(), done(0, b"{}\n", b"")]) as agent:
        answer = call(
            shims.exe(),
            stdin,
            netns=str(cni_netns),
            CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=p",
            PYCNI_EXTRA="kept",
            UNRELATED="dropped",
        )
    assert (answer.code, answer.out, answer.err) == (0, b"{}\n", b""), answer
    [request] = agent.requests
    assert request.magic == protocol.MAGIC
    assert request.version == protocol.pycni_version()
    assert (request.kind, request.plugin_type) == (protocol.KIND_CNI, PLUGIN)
    assert request.environ == {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": str(cni_netns),
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(shims.bin_dir),
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=p",
        "PYCNI_EXTRA": "kept",
    }
    assert request.stdin == stdin
    # First the caller's own network namespace, then what CNI_NETNS is for the caller.
    own, target = request.descriptors
    assert (own.st_dev, own.st_ino) == (os.stat("/proc/self/ns/net").st_dev, os.stat("/proc/self/ns/net").st_ino)
    assert (target.st_dev, target.st_ino) == (cni_netns.stat().st_dev, cni_netns.stat().st_ino)


def test_a_cni_netns_the_shim_cannot_open_sends_only_its_own_namespace(shims):
    with scripted_agent(shims, lambda r: [refused("no descriptor for CNI_NETNS")]) as agent:
        answer = call(shims.exe(), shims.conf(), netns="/nonexistent/netns")
    [request] = agent.requests
    assert len(request.descriptors) == 1 and request.environ["CNI_NETNS"] == "/nonexistent/netns"
    assert answer.notes == [running_cold("the agent refused the request (no descriptor for CNI_NETNS)")]


def test_version_and_no_agent_requests_never_reach_the_agent(shims):
    from pycni.agent.shim import version_answer

    with scripted_agent(shims, lambda r: [refused("unexpected")]) as agent:
        version = call(shims.exe(), b"", command="VERSION")
        alone = call(shims.exe(), shims.conf(), PYCNI_NO_AGENT="1")
    assert (version.code, version.out, version.err) == (0, version_answer(PLUGIN), b"")
    assert alone.code == 0 and alone.err == b"" and json.loads(alone.out)["ips"][0]["address"] == "10.93.0.2/24"
    assert agent.requests == [] and agent.silent == 0


# ---- relaying ------------------------------------------------------------------------------------

RELAYED = {
    "success": (0, b'{"cniVersion": "0.4.0"}\n', b""),
    "an error, bytes that are not UTF-8, no final newline": (7, b"\xff\xfe\x00 not json", b"diag \xc3\x28\n"),
    "4 MiB on stdout and stderr": (3, bytes(range(256)) * (16 * 1024), b"e" * (4 * MIB)),
}


@pytest.mark.parametrize("relayed", list(RELAYED), ids=list(RELAYED))
def test_the_answer_is_relayed_byte_for_byte(shims, relayed):
    code, stdout, stderr = RELAYED[relayed]
    with scripted_agent(shims, lambda r: [accepted(), done(code, stdout, stderr)]) as agent:
        answer = call(shims.exe(), shims.conf())
    assert len(agent.requests) == 1
    assert (answer.code, answer.out, answer.err) == (code, stdout, stderr)


def test_an_unexpected_frame_is_an_error_to_try_again_never_a_cold_run(shims):
    status = protocol.answer(protocol.STATUS, b"{}")
    with scripted_agent(shims, lambda r: [accepted(), status]) as agent:
        answer = call(shims.exe(), shims.conf(version="0.3.1"))
    assert len(agent.requests) == 1
    assert (answer.code, answer.out, answer.notes) == (
        1,
        try_again("0.3.1", "unexpected answer from the pycni agent; try again"),
        [],
    )


# ---- refusal and fallback ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames",
    [[refused("the agent has no plugin 'host-local'")], [accepted(), refused("the agent has no plugin 'host-local'")]],
    ids=["refused at once", "refused after accepting"],
)
def test_a_refused_request_runs_in_process_with_the_same_stdin(shims, frames):
    stdin = shims.conf()
    with scripted_agent(shims, lambda r: frames) as agent:
        answer = call(shims.exe(), stdin)
    [request] = agent.requests
    assert request.stdin == stdin
    assert answer.notes == [running_cold("the agent refused the request (the agent has no plugin 'host-local')")]
    expected = cold(shims, shims.conf())
    assert (answer.code, answer.out) == (expected.code, expected.out) == (0, expected.out)


def test_a_connection_closed_before_accepting_runs_in_process(shims):
    stdin = shims.conf()
    with scripted_agent(shims, lambda r: []) as agent:
        answer = call(shims.exe(), stdin)
    assert len(agent.requests) == 1
    assert answer.notes == [running_cold("the agent closed the connection before accepting the request (EOFError)")]
    assert answer.code == 0 and json.loads(answer.out)["ips"][0]["address"] == "10.93.0.2/24"


def test_no_agent_runs_in_process_and_says_why(shims, run_dir):
    stdin = shims.conf()
    missing = call(shims.exe(), stdin)
    assert missing.notes == [running_cold(f"agent not reached at {shims.socket_path} (No such file or directory)")]
    # A socket nobody listens on: connect() is refused.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unserved:
        unserved.bind(str(shims.socket_path))
        again = call(shims.exe(), shims.conf())
    os.unlink(shims.socket_path)
    assert again.notes == [running_cold(f"agent not reached at {shims.socket_path} (Connection refused)")]
    expected = cold(shims, shims.conf())
    assert missing.out == again.out == expected.out and missing.code == again.code == expected.code == 0


def test_accepted_work_is_never_run_twice(shims):
    """After A the shim waits for D (the agent's timeout plus a margin) and otherwise answers "try again"."""
    with scripted_agent(shims, lambda r: [accepted(cni_version="1.0.0")]) as agent:
        closed = call(shims.exe(), shims.conf())
    with scripted_agent(shims, lambda r: [accepted(timeout="0.0", cni_version="1.0.0"), HANG]):
        silent = call(shims.exe(), shims.conf())
    message = "the pycni agent did not answer (it timed out, stopped or restarted); try again"
    for answer in (closed, silent):
        assert (answer.code, answer.out, answer.notes) == (1, try_again("1.0.0", message), [])
    assert len(agent.requests) == 1
    data_dirs = [p for p in shims.bin_dir.parent.iterdir() if p.name.startswith("ipam-")]
    assert data_dirs == [], "the shim ran accepted work itself"


# ---- size limits ----------------------------------------------------------------------------------


def test_several_mib_of_stdin_travel_in_one_request(shims):
    stdin = shims.conf(padding="x" * (6 * MIB))
    with scripted_agent(shims, lambda r: [accepted(), done(0, b"ok", b"")]) as agent:
        answer = call(shims.exe(), stdin)
    [request] = agent.requests
    assert request.stdin == stdin and (answer.code, answer.out) == (0, b"ok")


def test_a_request_over_the_limit_runs_in_process_with_all_of_its_stdin(shims):
    padding = "x" * (protocol.MAX_BODY + MIB)
    stdin = shims.conf(padding=padding)
    with scripted_agent(shims, lambda r: [refused("unexpected")]) as agent:
        answer = call(shims.exe(), stdin)
    assert agent.requests == [] and agent.silent == 1  # connected, then sent nothing
    assert answer.notes == [running_cold(f"the request is larger than the agent takes ({protocol.MAX_BODY >> 20} MiB)")]
    expected = cold(shims, shims.conf(padding=padding))
    assert (answer.code, answer.out) == (expected.code, expected.out) == (0, expected.out)


# ---- the real agent --------------------------------------------------------------------------------


@pytest.fixture
def agent_and_shims(tmp_path: Path, shim_kind: str):
    with running_agent(str(tmp_path)) as agent:
        yield agent, install_shims(tmp_path, shim_kind, Path(agent.socket_path))


def test_the_agent_serves_both_shims_what_the_plugin_answers_in_process(agent_and_shims, make_node, make_pod):
    agent, shims = agent_and_shims
    node, pod = make_node(), make_pod()
    for padding in ("", "x" * (6 * MIB)):
        warm = call(shims.exe(), shims.conf(padding=padding), node=node.name, netns=os.fspath(pod))
        expected = cold(shims, shims.conf(padding=padding), node=node.name, netns=os.fspath(pod))
        assert (warm.code, warm.out, warm.err) == (expected.code, expected.out, b""), warm
    counters = agent.status()["requests"]
    assert counters["served"] == 2 and counters["refused"] == 0, counters


def test_a_shim_of_another_release_is_refused_and_runs_in_process(agent_and_shims, make_node, make_pod):
    agent, shims = agent_and_shims
    node, pod = make_node(), make_pod()
    other = shims.with_version("0.0.0+other")
    answer = call(other, shims.conf(), node=node.name, netns=os.fspath(pod))
    reason = f"version mismatch: the shim is pycni 0.0.0+other, the agent pycni {protocol.pycni_version()}"
    assert answer.notes == [running_cold(f"the agent refused the request ({reason})")]
    expected = cold(shims, shims.conf(), node=node.name, netns=os.fspath(pod))
    assert (answer.code, answer.out) == (expected.code, expected.out) == (0, expected.out)
    counters = agent.status()["requests"]
    assert counters["refused"] == 1 and counters["served"] == 0, counters


def _exchange(socket_path: str, data: bytes, fds: tuple[int, ...] = ()) -> tuple[bytes, list[bytes]] | None:
    """Send ``data`` (``fds`` with its first byte) and read one answer frame; None when the agent hangs up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(socket_path)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        sock.sendmsg([data], rights)
        try:
            return protocol.read_answer(sock)
        except EOFError:
            return None


def test_the_agent_answers_each_kind_of_frame_as_the_protocol_says(tmp_path):
    """The other end, driven with ``protocol``'s own frames: what the scripted agent stands in for."""
    with running_agent(str(tmp_path)) as agent:
        kind, items = _exchange(
            agent.socket_path, protocol.request(protocol.pycni_version(), protocol.KIND_STATUS, "", {}, b"")
        )
        assert kind == protocol.STATUS and json.loads(items[0])["version"] == protocol.pycni_version()
        own = os.open("/proc/self/ns/net", os.O_RDONLY)
        try:
            skewed = protocol.request("0.0.0+other", protocol.KIND_CNI, PLUGIN, {"CNI_COMMAND": "ADD"}, b"{}")
            kind, items = _exchange(agent.socket_path, skewed, (own,))
            assert kind == protocol.REFUSED and items[0].decode().startswith(
                "version mismatch: the shim is pycni 0.0.0+other"
            )
            unknown = protocol.request(protocol.pycni_version(), protocol.KIND_CNI, "no-such-plugin", {}, b"{}")
            kind, items = _exchange(agent.socket_path, unknown, (own,))
            assert (kind, items) == (protocol.REFUSED, [b"the agent has no plugin 'no-such-plugin'"])
        finally:
            os.close(own)
        oversized = protocol.MAGIC + struct.pack(">I", protocol.MAX_BODY + 1)
        kind, items = _exchange(agent.socket_path, oversized)
        assert kind == protocol.REFUSED and b"larger than the agent takes" in items[0]
        assert _exchange(agent.socket_path, b"PYCNIA\x00\x02" + bytes(4)) is None  # another protocol version
        assert agent.alive()
