"""Every trust boundary of the warm path: the agent's socket, what the agent executes, the state it reads.

The agent runs as root on behalf of whoever reaches its socket, so what a
request carries decides nothing the agent's operator did not allow:

- executables: a delegated plugin that is not pycni's own runs under the agent
  only from its --cni-bin-dir directories (and those `pycni install` recorded);
  anything else runs in the caller's own process, as a runtime would run it;
- namespaces: the agent works on the descriptors the caller passed, never on
  its own view of CNI_NETNS; no usable descriptor, no warm path;
- the socket: shims (both kinds) and `pycni install` trust only a socket of
  root's, served by root, in a directory only root can write to;
- its own resources: every descriptor a request brings is closed, connections
  and the time to send a request are bounded, garbage never stops it.

Every agent runs in a namespace of its own on a socket under the test's
directory (``running_agent``) and is stopped by PID; every helper process is
stopped by PID; plugins run with their host side in node namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from pycni.agent import protocol
from pycni.agent.client import send_cni
from tests.helpers.plugins import Outcome, run_plugin
from tests.helpers.state import link_names
from tests.plugin_modes import AgentProcess, install, running_agent

pytestmark = pytest.mark.integration

NET = "trustnet"
FAKE_IPAM = "fake-ipam"
LOOPBACK_CONF = {"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}


@pytest.fixture(params=["python", "native"])
def shim_kind(request) -> str:
    return request.param


def wait_for(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def lo_up(pod) -> bool:
    return "UP" in json.loads(pod.ip("-j", "link", "show", "lo").stdout)[0]["flags"]


def note_lines(outcome: Outcome) -> list[str]:
    return [line for line in outcome.err.splitlines() if line.startswith("pycni: ")]


# ---- what the agent executes ------------------------------------------------------------------

FAKE_IPAM_SCRIPT = """#!/bin/sh
# An IPAM plugin that records who ran it: its own pid and every parent up to init.
cat > /dev/null
chain=""
p=$$
i=0
while [ "$p" -gt 1 ] && [ "$i" -lt 64 ]; do
    chain="$chain $p"
    p=$(sed -n 's/^PPid:[[:space:]]*//p' /proc/$p/status)
    i=$((i + 1))
done
echo "$CNI_COMMAND netns=$CNI_NETNS chain=$chain" >> {record}
if [ "$CNI_COMMAND" = ADD ]; then
    echo '{{"cniVersion": "1.0.0", "ips": [{{"address": "10.77.0.5/24", "gateway": "10.77.0.1"}}]}}'
fi
exit 0
"""


def write_fake_ipam(directory: Path, record: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FAKE_IPAM
    path.write_text(FAKE_IPAM_SCRIPT.format(record=record))
    path.chmod(0o755)
    return path


def fake_ipam_runs(record: Path) -> list[tuple[str, str, list[int]]]:
    """(command, CNI_NETNS, [pid, parent, grandparent, ...]) of every run of the fake IPAM plugin."""
    if not record.exists():
        return []
    runs = []
    for line in record.read_text().splitlines():
        command, netns_part, chain_part = line.split(" ", 2)
        runs.append(
            (command, netns_part.removeprefix("netns="), [int(p) for p in chain_part.removeprefix("chain=").split()])
        )
    return runs


def bridge_conf() -> dict:
    return {"cniVersion": "1.0.0", "name": NET, "type": "bridge", "bridge": "tb0", "ipam": {"type": FAKE_IPAM}}


@pytest.mark.parametrize("allowed", ["nowhere", "--cni-bin-dir", "install record"])
def test_a_delegate_outside_the_allowed_directories_never_runs_under_the_agent(tmp_path, make_node, shim_kind, allowed):
    """A bridge request whose CNI_PATH leads to a script: the agent never executes it itself.

    Not allowed: the agent refuses before doing anything and the script runs under the shim's own
    process (cold), as a runtime would run it. Allowed (its directory given as --cni-bin-dir, or
    the shims' own directory that `pycni install` recorded for the socket): the agent runs it
    (warm), in the caller's namespace under the caller's CNI_NETNS path.
    """
    record = tmp_path / "runs.txt"
    bin_dir = tmp_path / "bin"
    script_dir = bin_dir if allowed == "install record" else tmp_path / "elsewhere"
    write_fake_ipam(script_dir, record)
    args = ["--cni-bin-dir", str(script_dir)] if allowed == "--cni-bin-dir" else []
    node = make_node()
    pod = node.pod()
    with running_agent(str(tmp_path), args) as agent:
        install(str(bin_dir), agent.socket_path, native=shim_kind == "native")  # records bin_dir for the agent
        if allowed == "install record":
            assert Path(agent.socket_path + ".cni-bin-dirs").read_text() == f"{bin_dir}\n"
        cni_path = f"{bin_dir}:{script_dir}"
        add = run_plugin(
            os.path.join(bin_dir, "bridge"),
            "ADD",
            bridge_conf(),
            node=node,
            netns=pod,
            container_id="ctr",
            path=cni_path,
        )
        assert add.code == 0, add
        assert add.out["ips"][0]["address"] == "10.77.0.5/24"
        [(command, netns_seen, chain)] = fake_ipam_runs(record)
        assert command == "ADD" and netns_seen == pod.path  # the caller's path, either way
        counters = agent.status()["requests"]
        if allowed == "nowhere":
            assert agent.pid not in chain, (chain, agent.pid)
            assert chain[1] != agent.pid and chain[2] == os.getpid()  # the shim's process ran it
            [note] = note_lines(add)
            assert "the agent refused the request (ipam type 'fake-ipam'" in note and str(script_dir) in note
            assert counters["declined"] == 1 and counters["served"] == 0
        else:
            assert chain[1] == agent.pid, (chain, agent.pid)
            assert add.err == "", add
            assert counters["served"] == 1 and counters["declined"] == 0
        # The container got what the IPAM plugin said, wherever it ran.
        assert "10.77.0.5/24" in pod.ip("-o", "addr", "show", "eth0").stdout
        delete = run_plugin(
            os.path.join(bin_dir, "bridge"),
            "DEL",
            bridge_conf(),
            node=node,
            netns=pod,
            container_id="ctr",
            path=cni_path,
        )
        assert delete.code == 0, delete
        assert [link for link in link_names(node) if link.startswith("veth")] == []


def test_a_refusal_part_way_through_add_leaves_nothing_behind(tmp_path, make_node):
    """The executable check where the executable is chosen: mid-ADD, after the bridge created the veth.

    The bridge's IPAM delegation meets a plugin outside the allowed directories (a request served
    under the agent's policy, as ``skel.dispatch`` runs it there): ``ExecRefused`` passes through
    dispatch, the bridge's undo deletes the veth pair on the way, and the script never runs.
    """
    import netns
    from cni_plugins.spec import registry
    from cni_plugins.spec.exec import AGENT_BIN_DIRS_VARIABLE, ExecRefused
    from cni_plugins.spec.skel import dispatch

    record = tmp_path / "runs.txt"
    script_dir = tmp_path / "elsewhere"
    write_fake_ipam(script_dir, record)
    node = make_node()
    pod = node.pod()
    environ = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "ctr",
        "CNI_NETNS": pod.path,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(script_dir),
        AGENT_BIN_DIRS_VARIABLE: "/nonexistent-allowed-dir",
    }
    failure: list[BaseException] = []

    def add_in_node() -> None:  # a thread of its own: the namespace switch never touches the test's thread
        try:
            with netns.enter(node.path):
                dispatch(registry.funcs("bridge"), environ, json.dumps(bridge_conf()).encode())
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=add_in_node)
    worker.start()
    worker.join(60)
    assert not worker.is_alive()
    assert len(failure) == 1 and isinstance(failure[0], ExecRefused), failure
    assert "outside the directories" in str(failure[0])
    assert fake_ipam_runs(record) == []
    # The bridge itself stays, as after any failed ADD (it is the node's, shared by its pods).
    assert [link for link in link_names(node) if link != "tb0"] == ["lo"]
    assert link_names(pod) == ["lo"]
    assert not (node.ipam_dir / NET).exists()


# ---- namespaces come as descriptors ------------------------------------------------------------


@pytest.fixture
def agent(tmp_path) -> Iterator[AgentProcess]:
    with running_agent(str(tmp_path)) as proc:
        yield proc


@pytest.fixture
def shims(tmp_path, agent, shim_kind) -> str:
    bin_dir = str(tmp_path / "bin")
    install(bin_dir, agent.socket_path, native=shim_kind == "native")
    return bin_dir


def test_a_cni_netns_the_caller_cannot_open_is_never_resolved_by_the_agent(agent, shims, make_node, make_pod):
    """The caller sees no namespace at CNI_NETNS (its /run/netns is another one); the agent does.

    The agent must not act on its own view of the path: it refuses, the shim runs the plugin
    where the path means nothing, which fails as it does cold, and the pod the agent could see
    is untouched.
    """
    node, pod = make_node(), make_pod()
    hidden_view = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount -t tmpfs none "$(dirname "$1")" && exec "$2"',
        "sh",
        pod.path,
        os.path.join(shims, "loopback"),
    ]
    lo = run_plugin(hidden_view, "ADD", LOOPBACK_CONF, node=node, netns=pod, path=shims)
    cold = run_plugin(hidden_view, "ADD", LOOPBACK_CONF, node=node, netns=pod, path=shims, env={"PYCNI_NO_AGENT": "1"})
    assert lo.code == cold.code != 0 and lo.out == cold.out, (lo, cold)
    [note] = note_lines(lo)
    assert f"the agent refused the request (the caller could not open CNI_NETNS {pod.path}" in note
    assert not lo_up(pod)
    counters = agent.status()["requests"]
    assert counters["declined"] == 1 and counters["served"] == 0


def test_a_cni_netns_that_is_no_network_namespace_is_refused(agent, shims, make_node, tmp_path):
    node = make_node()
    plain = tmp_path / "not-a-netns"
    plain.write_text("")
    warm = run_plugin(os.path.join(shims, "loopback"), "ADD", LOOPBACK_CONF, node=node, netns=str(plain))
    cold = run_plugin(
        os.path.join(shims, "loopback"), "ADD", LOOPBACK_CONF, node=node, netns=str(plain), env={"PYCNI_NO_AGENT": "1"}
    )
    assert warm.code == cold.code != 0 and warm.out == cold.out, (warm, cold)
    [note] = note_lines(warm)
    assert (
        f"the agent refused the request (CNI_NETNS {plain}: the descriptor the caller passed is not a "
        f"network namespace)" in note
    )
    assert agent.status()["requests"]["declined"] == 1


# ---- the socket: shims and install trust only root's -----------------------------------------

_NOBODY = 65534

_LISTENER = r"""
import os, socket, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
os.setgroups([])
os.setgid(int(sys.argv[2]))
os.setuid(int(sys.argv[2]))
sock.listen(16)
sock.settimeout(0.2)
print("ready", flush=True)
end = time.monotonic() + 60
while time.monotonic() < end:
    try:
        conn, _ = sock.accept()
    except OSError:
        continue
    conn.settimeout(1)
    try:
        if conn.recv(12):
            print("request", flush=True)
    except OSError:
        pass
    conn.close()
"""


class Impostor:
    """A socket at ``path`` that answers nothing and notes every request it receives."""

    def __init__(self, path: Path, owner: int = 0, listener_uid: int = 0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        os.chown(path, owner, owner)
        self.requests = 0
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()
        if listener_uid:  # a process of that user listens (SO_PEERCRED reports whoever called listen)
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _LISTENER, str(self.sock.fileno()), str(listener_uid)],
                pass_fds=[self.sock.fileno()],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"
        else:
            self.sock.listen(16)
            self.sock.settimeout(0.2)
            self.thread = threading.Thread(target=self._serve, daemon=True)
            self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                with contextlib.suppress(OSError):
                    if conn.recv(12):
                        self.requests += 1

    def close(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(10)
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=10)
            self.requests += out.count("request")
        self.sock.close()


@contextlib.contextmanager
def impostor(path: Path, **kwargs: Any) -> Iterator[Impostor]:
    fake = Impostor(path, **kwargs)
    try:
        yield fake
    finally:
        fake.close()


def write_shim(bin_dir: Path, name: str, plugin_type: str, socket_path: str, native: bool) -> str:
    """A plugin file for ``socket_path`` written directly (as `pycni install` would, without its checks)."""
    from cni_plugins.spec.registry import PLUGINS
    from pycni.agent.shim import native_script, script
    from pycni.install import MARKER, NATIVE_SHIM

    path = bin_dir / name
    if native:
        path.write_text(
            native_script(
                plugin_type,
                PLUGINS[plugin_type],
                sys.executable,
                f"{MARKER}: test",
                str(bin_dir / NATIVE_SHIM),
                socket_path,
            )
        )
    else:
        path.write_text(script(plugin_type, PLUGINS[plugin_type], sys.executable, f"{MARKER}: test", socket_path))
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("kind", ["writable directory", "socket of another user", "served by another user"])
def test_an_impostor_socket_is_refused_by_install_and_the_shims(tmp_path, make_node, shim_kind, kind):
    bin_dir = tmp_path / "bin"
    install(str(bin_dir), str(tmp_path / "run" / "agent.sock"), native=shim_kind == "native")  # the binary
    if kind == "writable directory":
        directory = tmp_path / "open"
        directory.mkdir()
        directory.chmod(0o777)
        options: dict[str, int] = {}
        why = f"{directory} is writable by group or others (mode 0777)"
    else:
        directory = tmp_path / "safe"
        directory.mkdir(mode=0o700)
        options = {"owner": _NOBODY} if kind == "socket of another user" else {"listener_uid": _NOBODY}
        why = (
            f"{directory / 'agent.sock'} belongs to uid {_NOBODY}, not root"
            if kind == "socket of another user"
            else f"the process serving it is not root (uid {_NOBODY})"
        )
    socket_path = directory / "agent.sock"
    node = make_node()
    with impostor(socket_path, **options) as fake:
        if kind == "writable directory":
            refused = subprocess.run(
                [
                    os.path.join(os.path.dirname(sys.executable), "pycni"),
                    "install",
                    "--cni-bin-dir",
                    str(tmp_path / "bin2"),
                    "--agent-socket",
                    str(socket_path),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert refused.returncode == 1, refused
            assert f"refusing the agent socket {socket_path}: {why}" in refused.stderr
            assert not (tmp_path / "bin2").exists()
        exe = write_shim(bin_dir, "loopback-impostor", "loopback", str(socket_path), shim_kind == "native")
        pod = node.pod()
        lo = run_plugin(exe, "ADD", LOOPBACK_CONF, node=node, netns=pod)
        assert lo.code == 0, lo
        assert note_lines(lo) == [
            f"pycni: not using the agent socket {socket_path}: {why}; running loopback in-process"
        ], lo.err
        assert lo_up(pod)
    assert fake.requests == 0


def test_the_shims_trust_a_root_socket_under_a_sticky_directory(tmp_path, make_node, shim_kind):
    """/tmp-like parents (sticky, writable by all) are fine: nobody else can rename what root put there."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    with running_agent(str(tmp_path), socket_path=str(sticky / "run" / "agent.sock")) as agent:
        bin_dir = str(tmp_path / "bin")
        install(bin_dir, agent.socket_path, native=shim_kind == "native")
        node = make_node()
        lo = run_plugin(os.path.join(bin_dir, "loopback"), "ADD", LOOPBACK_CONF, node=node, netns=node.pod())
        assert lo.code == 0 and lo.err == "", lo
        assert agent.status()["requests"]["served"] == 1


# ---- large requests --------------------------------------------------------------------------


def test_a_20_mib_stdin_runs_cold_and_is_answered_cleanly(agent, shims, make_node):
    node = make_node()
    conf = dict(LOOPBACK_CONF, padding="x" * (20 * 2**20))
    outcomes = []
    for env in ({}, {"PYCNI_NO_AGENT": "1"}):
        pod = node.pod()
        outcome = run_plugin(os.path.join(shims, "loopback"), "ADD", conf, node=node, netns=pod, env=env)
        assert "Traceback" not in outcome.err
        if isinstance(outcome.out, dict) and outcome.out.get("interfaces"):
            outcome.out["interfaces"][0]["sandbox"] = "<pod>"
        outcomes.append((outcome.code, outcome.out))
        if not env:
            assert note_lines(outcome) == [
                "pycni: the request is larger than the agent takes (16 MiB); running loopback in-process"
            ], outcome.err
    assert outcomes[0] == outcomes[1]
    counters = agent.status()["requests"]
    assert counters["served"] == counters["refused"] == counters["bad_requests"] == 0, counters
    assert agent.alive()


# ---- the agent's own resources: descriptors, connections, time ---------------------------------


def _frame(
    stdin: bytes = b"{}", env: dict | None = None, version: str | None = None, plugin_type: str = "loopback"
) -> bytes:
    return protocol.request(
        version or protocol.pycni_version(),
        protocol.KIND_CNI,
        plugin_type,
        env if env is not None else {"CNI_COMMAND": "ADD"},
        stdin,
    )


def _talk(socket_path: str, data: bytes, fds: list[int] = (), wait: float = 5.0) -> bytes:
    """Send ``data`` (``fds`` on its first byte), then read what comes back until the agent hangs up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(wait)
        sock.connect(socket_path)
        answer = b""
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # answered and closed before we sent
            sock.sendmsg([data], rights)
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := sock.recv(65536):
                answer += chunk
        return answer


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_descriptors_stay_flat_under_hostile_requests(tmp_path, make_node):
    """>= 200 requests that are refused, malformed, oversized, too slow or wrongly equipped: each brings
    descriptors, and the agent holds none of them afterwards."""
    node = make_node()
    pod = node.pod()
    plain = tmp_path / "plain"
    plain.write_text("")
    with running_agent(str(tmp_path), ["--read-timeout", "0.5"]) as agent:
        path = agent.socket_path
        env = {
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": "c1",
            "CNI_NETNS": pod.path,
            "CNI_IFNAME": "eth0",
            "CNI_PATH": "/nonexistent",
        }
        warm = send_cni(path, "loopback", env, json.dumps(LOOPBACK_CONF).encode(), netns_path=node.path)
        assert warm.kind == "done" and warm.exit_code == 0, warm
        wait_for(lambda: agent.status()["in_flight"] == 0, what="the warm-up to finish")
        baseline = _fd_count(agent.pid)
        own = os.open(node.path, os.O_RDONLY | os.O_CLOEXEC)  # the caller's own namespace: the node
        target = os.open(pod.path, os.O_PATH | os.O_CLOEXEC)
        regular = os.open(plain, os.O_PATH | os.O_CLOEXEC)
        regular_rd = os.open(plain, os.O_RDONLY | os.O_CLOEXEC)
        read_end, write_end = os.pipe()
        sent = 0
        try:
            hostile: list[tuple[bytes, list[int]]] = [
                (_frame(b"[" * 200_000, env), [own, target]),  # nesting too deep
                (b"GARBAGE!" + b"\x00" * 64, [own, target]),  # not a frame
                (_frame(b"{}", env, version="0.0.0-other"), [own, target]),  # another version
                (protocol.MAGIC + (protocol.MAX_BODY + 1).to_bytes(4, "big"), [own, target]),  # too large
                (_frame(json.dumps(LOOPBACK_CONF).encode(), env), [own]),  # CNI_NETNS, no descriptor
                (_frame(json.dumps(LOOPBACK_CONF).encode(), env), [own, regular]),  # a file as CNI_NETNS
                (_frame(json.dumps(LOOPBACK_CONF).encode(), env), [regular_rd, target]),  # a file as its own
                (_frame(json.dumps(LOOPBACK_CONF).encode(), env), [read_end, target]),  # a pipe as its own
                (_frame(b"{}", env, plugin_type="no-such-plugin"), [own, target]),  # unknown plugin
                (_frame(b"{}", env)[:40], [own, target]),  # truncated, then closed
            ]
            for _ in range(22):
                for data, fds in hostile:
                    _talk(path, data, fds)
                    sent += 1
            # Clients that start a request and then go silent: cut off after --read-timeout.
            with contextlib.ExitStack() as stack:
                for _ in range(20):
                    sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                    sock.connect(path)
                    sock.sendmsg(
                        [_frame(b"{}", env)[:30]],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("2i", own, target))],
                    )
                    sent += 1
                time.sleep(1.5)
        finally:
            for fd in (own, target, regular, regular_rd, read_end, write_end):
                os.close(fd)
        assert sent >= 200
        wait_for(
            lambda: _fd_count(agent.pid) <= baseline,
            what=f"the agent's descriptors to return to {baseline} (now {_fd_count(agent.pid)})",
        )
        counters = agent.status()["requests"]
        assert counters["declined"] >= 4 * 22 and counters["refused"] >= 3 * 22
        again = send_cni(path, "loopback", env, json.dumps(LOOPBACK_CONF).encode(), netns_path=node.path)
        assert again.kind == "done" and again.exit_code == 0, again
        assert agent.alive() and "Traceback" not in agent.log_text()


def _settled_thread_count(pid: int) -> int:
    """The agent's thread count once start-up's short-lived threads are gone (the same count 0.5 s apart)."""
    last = -1
    for _ in range(40):
        count = len(os.listdir(f"/proc/{pid}/task"))
        if count == last:
            return count
        last = count
        time.sleep(0.5)
    raise AssertionError(f"the agent's thread count did not settle: {last}")


def test_connections_are_bounded_and_slow_clients_cut_off(tmp_path):
    with running_agent(str(tmp_path), ["--max-connections", "4", "--read-timeout", "3"]) as agent:
        path = agent.socket_path
        threads_before = _settled_thread_count(agent.pid)
        with contextlib.ExitStack() as stack:
            silent = []
            for _ in range(4):
                sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                sock.connect(path)
                silent.append(sock)
            wait_for(
                lambda: len(os.listdir(f"/proc/{agent.pid}/task")) >= threads_before + 4, what="a thread per connection"
            )
            started = time.monotonic()
            answer = _talk(path, _frame(), wait=3)
            assert answer[:1] == protocol.REFUSED and b"busy" in answer, answer
            assert time.monotonic() - started < 1.0
            for _ in range(20):  # many more: each refused at once, no thread for any of them
                assert _talk(path, _frame(), wait=3)[:1] == protocol.REFUSED
            assert len(os.listdir(f"/proc/{agent.pid}/task")) <= threads_before + 4
            # The silent ones are cut off after --read-timeout.
            for sock in silent:
                sock.settimeout(5)
                assert sock.recv(100) == b""
        assert agent.status()["requests"]["over_capacity"] == 21
        # A client that trickles its request byte by byte is cut off too (the timeout covers the whole request).
        frame = _frame(b"x" * 100)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            started = time.monotonic()
            cut = None
            for byte in frame:
                try:
                    sock.send(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    cut = time.monotonic() - started
                    break
                time.sleep(0.1)
                if time.monotonic() - started > 8:
                    break
        assert cut is not None and 2.5 < cut < 5, cut
        assert agent.alive()


def test_garbage_on_the_socket_never_stops_the_agent(tmp_path, make_node):
    rng = random.Random(7)
    with running_agent(str(tmp_path), ["--read-timeout", "0.5"]) as agent:
        path = agent.socket_path
        bin_dir = str(tmp_path / "bin")
        install(bin_dir, path)
        dev_null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        directory = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        left, right = socket.socketpair()
        odd_fds = [dev_null, directory, left.fileno()]
        try:
            valid = _frame(b"{}", {"CNI_COMMAND": "ADD", "CNI_NETNS": "/proc/self/ns/net"})
            for n in range(150):
                choice = n % 6
                if choice == 0:  # random bytes, sometimes with descriptors of every kind
                    data = rng.randbytes(rng.randint(1, 4096))
                elif choice == 1:  # a frame cut anywhere
                    data = valid[: rng.randint(1, len(valid) - 1)]
                elif choice == 2:  # huge declared lengths
                    data = protocol.MAGIC + rng.choice([b"\xff\xff\xff\xff", b"\x80\x00\x00\x00"])
                elif choice == 3:  # fields whose lengths overrun the body, or too few of them
                    body = struct.pack(">I", 0xFFFFFF00) + b"abc"
                    data = protocol.MAGIC + struct.pack(">I", len(body)) + body
                elif choice == 4:  # an environment that is no environment
                    body = protocol.fields(
                        protocol.pycni_version().encode(), b"cni", b"loopback", b"NOEQUALS\x00=", b"{}"
                    )
                    data = protocol.MAGIC + struct.pack(">I", len(body)) + body
                else:  # a valid frame, descriptors of the wrong kind or too many of them
                    data = valid
                fds = rng.choice([[], odd_fds[:1], odd_fds[1:], odd_fds, odd_fds * 5])
                _talk(path, data, fds, wait=2)
            assert agent.alive()
        finally:
            for fd in (dev_null, directory):
                os.close(fd)
            left.close()
            right.close()
        node = make_node()
        pod = node.pod()
        lo = run_plugin(os.path.join(bin_dir, "loopback"), "ADD", LOOPBACK_CONF, node=node, netns=pod)
        assert lo.code == 0 and lo.err == "", lo
        assert lo_up(pod) and agent.status()["requests"]["served"] == 1
        assert agent.alive() and "Traceback" not in agent.log_text()


# ---- install: where the socket may live ----------------------------------------------------------


def test_install_records_its_bin_dir_only_for_an_agent_serving_a_safe_socket(tmp_path):
    from pycni.install import CNIError, install_plugins, socket_directory_problem

    run = tmp_path / "run"
    # Not there yet, under a directory only root may write to: fine, and nothing is created for it.
    assert socket_directory_problem(str(run / "agent.sock")) == ""
    install_plugins(str(tmp_path / "bin"), agent_socket=str(run / "agent.sock"))
    assert not run.exists()
    run.mkdir(mode=0o700)
    install_plugins(str(tmp_path / "bin"), agent_socket=str(run / "agent.sock"))  # no agent there (yet)
    record = run / "agent.sock.cni-bin-dirs"
    assert not record.exists()
    with socket.socket(socket.AF_UNIX) as agent_socket:  # an agent's socket (whether it listens is no matter)
        agent_socket.bind(str(run / "agent.sock"))
        install_plugins(str(tmp_path / "bin"), agent_socket=str(run / "agent.sock"))
        install_plugins(str(tmp_path / "bin2"), agent_socket=str(run / "agent.sock"))
        install_plugins(str(tmp_path / "bin"), agent_socket=str(run / "agent.sock"))
    assert record.read_text() == f"{tmp_path / 'bin'}\n{tmp_path / 'bin2'}\n"
    assert stat.S_IMODE(record.stat().st_mode) == 0o644 and record.stat().st_uid == 0
    # A missing directory whose parent anyone may write to (sticky or not): anyone could create it first.
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    with pytest.raises(
        CNIError,
        match="does not exist yet and .* is writable by group or others \\(mode 1777\\): "
        "another user could create it first",
    ):
        install_plugins(str(tmp_path / "bin3"), agent_socket=str(sticky / "run" / "agent.sock"))
    nobodys = tmp_path / "nobodys"
    nobodys.mkdir(mode=0o700)
    os.chown(nobodys, _NOBODY, _NOBODY)
    with pytest.raises(CNIError, match=f"belongs to uid {_NOBODY}, not root"):
        install_plugins(str(tmp_path / "bin3"), agent_socket=str(nobodys / "agent.sock"))
    assert not (tmp_path / "bin3").exists()
