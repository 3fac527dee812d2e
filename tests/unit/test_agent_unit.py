"""The agent's pieces called directly: protocol, statistics, shims, and an Agent served in-process.

The in-process agent tests replace the plugin behind a type with test functions
(``registry.funcs``), so they can observe what a request sees (its environment,
its network namespace) and hold a request up on purpose. They need root only
because the agent enters the caller's namespace (setns) for every request.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from cni_plugins.spec import registry
from cni_plugins.spec.skel import Outcome, PluginFuncs, dispatch
from pycni.agent import protocol
from pycni.agent.client import AgentRefused, send_cni, status
from pycni.agent.server import Agent, AgentError, AgentOptions, _Slots
from pycni.agent.shim import render, script, version_answer
from pycni.agent.stats import Stats, percentile
from pycni.install import MARKER

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the agent enters network namespaces (setns): root")


# ---- protocol ---------------------------------------------------------------------------


def test_request_round_trip():
    env = {"CNI_COMMAND": "ADD", "CNI_ARGS": "IP=10.0.0.5;K=a=b", "PYCNI_X": ""}
    frame = protocol.request("1.2.3", protocol.KIND_CNI, "bridge", env, b'{"x": "\x00\xff"}')
    assert frame[:8] == protocol.MAGIC
    size = int.from_bytes(frame[8:12], "big")
    assert size == len(frame) - 12
    version, kind, plugin_type, block, stdin = protocol.split_fields(frame[12:], protocol.REQUEST_FIELDS)
    assert (version, kind, plugin_type, stdin) == (b"1.2.3", b"cni", b"bridge", b'{"x": "\x00\xff"}')
    assert protocol.parse_environ(block) == env
    assert protocol.parse_environ(b"") == {}


@pytest.mark.parametrize("body", [b"\x00\x00", b"\x00\x00\x00\x09abc", b"\x00\x00\x00\x01a\x00"])
def test_truncated_fields_are_protocol_errors(body):
    with pytest.raises(protocol.ProtocolError):
        protocol.split_fields(body)


def test_field_count_and_environment_entries_are_checked():
    with pytest.raises(protocol.ProtocolError):
        protocol.split_fields(protocol.fields(b"a", b"b"), 5)
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_environ(b"CNI_COMMAND=ADD\x00NOEQUALS")


# ---- statistics ---------------------------------------------------------------------------


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50 and percentile(values, 0.99) == 99 and percentile(values, 1.0) == 100
    assert percentile([7.0], 0.99) == 7.0


def test_stats_snapshot_counts_per_plugin_and_command():
    stats = Stats()
    for ms, ok in ((10, True), (20, True), (30, False)):
        stats.served("bridge", "ADD", ms / 1000, ok)
    stats.served("bridge", "DEL", 0.005, True)
    stats.count("busy")
    snap = stats.snapshot()
    assert snap["requests"]["served"] == 4 and snap["requests"]["busy"] == 1
    assert snap["latency"]["bridge"]["ADD"] == {"count": 3, "errors": 1, "p50_ms": 20.0, "p99_ms": 30.0}
    assert snap["latency"]["bridge"]["DEL"]["p50_ms"] == 5.0


def test_slots_time_out_and_let_waiters_go_when_draining():
    slots = _Slots(1)
    assert slots.acquire(0.1) is True
    assert slots.acquire(0.05) is False
    outcome: list[Any] = []
    waiter = threading.Thread(target=lambda: outcome.append(slots.acquire(10)))
    waiter.start()
    time.sleep(0.05)
    slots.drain()
    waiter.join(5)
    assert outcome == [None]
    slots.release()


# ---- what a shim writes --------------------------------------------------------------------


def test_render_writes_what_plugin_main_writes():
    conf = json.dumps({"cniVersion": "1.0.0", "name": "bad name", "type": "loopback"}).encode()
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0", "CNI_PATH": "/x"}
    proc = subprocess.run(
        [sys.executable, "-c", "from cni_plugins.loopback import main; main()"],
        input=conf,
        env=env,
        capture_output=True,
        timeout=60,
    )
    code, stdout, stderr = render(dispatch(registry.funcs("loopback"), env, conf))
    assert (code, stdout, stderr) == (proc.returncode, proc.stdout, proc.stderr)
    assert render(Outcome(0, "{}")) == (0, b"{}\n", b"")
    assert render(Outcome(0, "")) == (0, b"", b"")


def _write_shim(tmp_path: Path, plugin_type: str, socket_path: str | None, version: str | None = None) -> str:
    path = tmp_path / plugin_type
    path.write_text(
        script(
            plugin_type,
            registry.PLUGINS[plugin_type],
            sys.executable,
            f"{MARKER}: the pycni {plugin_type!r} CNI plugin.",
            socket_path,
            version,
        )
    )
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("plugin_type", sorted(registry.PACKAGES))
def test_shims_are_recognised_and_compile(tmp_path, plugin_type):
    path = _write_shim(tmp_path, plugin_type, "/run/pycni/agent.sock")
    text = Path(path).read_text()
    compile(text, path, "exec")
    assert text.startswith(f"#!{sys.executable} -IS\n")
    assert registry.own_plugin(path) == plugin_type
    assert MARKER in text
    module = registry.PACKAGES[plugin_type]
    assert module in text[:512]  # older in-process delegation looks for the module name in a launcher's head
    warm_imports = text[text.index("import posix") :].split("\n", 1)[0]
    assert warm_imports == "import posix, sys, _socket"


def test_shim_answers_version_alone_and_without_a_command_runs_the_plugin(tmp_path):
    path = _write_shim(tmp_path, "bridge", str(tmp_path / "no" / "agent.sock"))
    proc = subprocess.run([path], env={"CNI_COMMAND": "VERSION"}, capture_output=True, timeout=30)
    cold = subprocess.run(
        [sys.executable, "-c", "from cni_plugins.bridge import main; main()"],
        env={"CNI_COMMAND": "VERSION"},
        capture_output=True,
        timeout=30,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, cold.stdout, b"")
    assert proc.stdout == version_answer("bridge")
    about = subprocess.run([path], env={}, capture_output=True, timeout=30)
    assert about.returncode == 0 and b"CNI bridge plugin" in about.stderr and b"agent" not in about.stderr


def test_shim_without_agent_runs_cold_with_one_line_note(tmp_path):
    missing = str(tmp_path / "no" / "agent.sock")
    path = _write_shim(tmp_path, "host-local", missing)
    conf = {
        "cniVersion": "1.0.0",
        "name": "n",
        "ipam": {"type": "host-local", "dataDir": str(tmp_path / "d"), "ranges": [[{"subnet": "10.1.2.0/24"}]]},
    }
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": "/x",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(tmp_path),
    }
    proc = subprocess.run([path], input=json.dumps(conf).encode(), env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ips"][0]["address"] == "10.1.2.2/24"
    assert proc.stderr.decode() == (
        f"pycni: agent not reached at {missing} (No such file or directory); running host-local in-process\n"
    )
    silent = subprocess.run(
        [path],
        input=json.dumps(conf).encode(),
        env=dict(env, PYCNI_NO_AGENT="1", CNI_CONTAINERID="c2"),
        capture_output=True,
        timeout=60,
    )
    assert silent.returncode == 0 and silent.stderr == b""


def test_cold_only_shims_never_try_an_agent(tmp_path):
    path = _write_shim(tmp_path, "loopback", None)
    assert "S = ''" in Path(path).read_text()
    about = subprocess.run(
        [path],
        env={"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c", "CNI_IFNAME": "lo", "CNI_PATH": "/x"},
        input=b'{"cniVersion": "1.0.0", "name": "n", "type": "loopback"}',
        capture_output=True,
        timeout=30,
    )
    assert about.returncode == 0 and about.stderr == b""


# ---- an agent served in this process ---------------------------------------------------------


class Recorder:
    """Plugin functions for the type "loopback" that report what their request saw."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)
        self.netns_seen: list[str] = []

    def add(self, req) -> dict:
        self.entered.release()
        self.gate.wait(30)
        if req.conf.get("explode"):
            raise RuntimeError("boom")
        if req.conf.get("exit"):
            raise SystemExit(3)  # what a plugin must never do in the agent: still one request's failure
        environ = getattr(req, "environ", None) or {}
        self.netns_seen.append(req.netns)
        return {
            "cniVersion": req.cni_version,
            "netns": os.stat("/proc/thread-self/ns/net").st_ino,
            "environ": dict(environ),
            "cni_netns": req.netns,
            "cni_netns_ino": os.stat(req.netns).st_ino,
        }

    def funcs(self) -> PluginFuncs:
        return PluginFuncs(add=self.add, delete=lambda req: None, status=lambda req: None)


@pytest.fixture
def recorder(monkeypatch) -> Recorder:
    rec = Recorder()
    real = registry.funcs
    monkeypatch.setattr(registry, "funcs", lambda t: rec.funcs() if t == "loopback" else real(t))
    return rec


@contextlib.contextmanager
def served(tmp_path: Path, **options: Any) -> Iterator[Agent]:
    agent = Agent(AgentOptions(socket_path=str(tmp_path / "run" / "agent.sock"), warm_up=False, **options))
    agent.start()
    thread = threading.Thread(target=agent.serve_forever, daemon=True)
    thread.start()
    try:
        yield agent
    finally:
        agent.stop()
        thread.join(30)
        agent.close()
        assert not thread.is_alive()


@pytest.fixture
def pod() -> Iterator[str]:
    """A network namespace for CNI_NETNS (removed afterwards)."""
    import netns

    with netns.temporary("agp") as ns:
        yield ns.path


def cni_env(pod: str, **extra: str) -> dict[str, str]:
    return {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": pod,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/x",
        **extra,
    }


CONF = b'{"cniVersion": "1.0.0", "name": "n", "type": "loopback"}'


@needs_root
@pytest.mark.integration
def test_a_request_sees_only_its_own_environment_and_its_callers_namespace(tmp_path, recorder, monkeypatch, pod):
    import netns

    monkeypatch.setenv("AGENT_ONLY", "agent")
    monkeypatch.setenv("CNI_IFNAME", "leaked-from-agent")
    with served(tmp_path) as agent, netns.temporary("agu") as ns:
        answers: dict[str, Any] = {}

        def call(tag: str, netns_path: str) -> None:
            answers[tag] = send_cni(
                agent.options.socket_path,
                "loopback",
                cni_env(
                    pod,
                    CNI_CONTAINERID=tag,
                    CNI_ARGS=f"TAG={tag}",
                    PYCNI_LOG_LEVEL=tag,
                    PATH="/caller/bin",
                    LD_PRELOAD="/caller/evil.so",
                    PYCNI_AGENT_CNI_BIN_DIRS="/caller/bin",
                ),
                CONF,
                netns_path=netns_path,
            )

        recorder.gate.clear()
        threads = [
            threading.Thread(target=call, args=("one", ns.path)),
            threading.Thread(target=call, args=("two", "/proc/self/ns/net")),
        ]
        for t in threads:
            t.start()
        for _ in threads:
            assert recorder.entered.acquire(timeout=10)  # both run at the same time
        recorder.gate.set()
        for t in threads:
            t.join(30)
        mine = os.stat("/proc/self/ns/net").st_ino
        theirs = os.stat(ns.path).st_ino
        pods = os.stat(pod).st_ino
    for tag, netns_link in (("one", theirs), ("two", mine)):
        answer = answers[tag]
        assert answer.accepted and answer.exit_code == 0, answer
        out = json.loads(answer.stdout)
        env = out["environ"]
        assert out["netns"] == netns_link
        # The plugin works on the descriptor the caller passed; its output names the caller's path.
        assert out["cni_netns_ino"] == pods and out["cni_netns"] == pod
        assert env["PYCNI_AGENT_CNI_NETNS"] == pod and env["PYCNI_AGENT_CNI_BIN_DIRS"] != "/caller/bin"
        assert env["CNI_CONTAINERID"] == tag and env["CNI_ARGS"] == f"TAG={tag}" and env["PYCNI_LOG_LEVEL"] == tag
        assert env["CNI_IFNAME"] == "eth0"  # the caller's, not the agent's
        assert env["PATH"] != "/caller/bin" and "LD_PRELOAD" not in env  # never the caller's
        assert env["AGENT_ONLY"] == "agent" and env[protocol.NO_AGENT_VARIABLE] == "1"
    assert theirs != mine
    # What the plugin code itself saw: the descriptor the caller passed, as a /proc path of the agent's.
    assert len(recorder.netns_seen) == 2
    assert all(seen.startswith(f"/proc/{os.getpid()}/fd/") for seen in recorder.netns_seen), recorder.netns_seen


@needs_root
@pytest.mark.integration
def test_refusals_do_nothing(tmp_path, recorder, pod):
    with served(tmp_path) as agent:
        path = agent.options.socket_path
        other = send_cni(path, "loopback", cni_env(pod), CONF, version="0.0.0-other")
        assert other.kind == "refused" and "version mismatch" in other.reason and not other.accepted
        unknown = send_cni(path, "no-such-plugin", cni_env(pod), CONF)
        assert unknown.kind == "refused" and "no plugin" in unknown.reason
        with socket.socket(socket.AF_UNIX) as sock:  # a request without the caller's namespace
            sock.connect(path)
            sock.sendall(protocol.request(protocol.pycni_version(), protocol.KIND_CNI, "loopback", cni_env(pod), CONF))
            kind, items = protocol.read_answer(sock)
        assert kind == protocol.REFUSED and b"network namespace" in items[0]
        with socket.socket(socket.AF_UNIX) as sock:  # garbage: dropped, the agent carries on
            sock.connect(path)
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(100) == b""
        assert recorder.entered.acquire(timeout=0.01) is False
        doc = status(path)
        # CNI_NETNS that the caller could not open: the agent does not look at the path itself.
        gone = send_cni(path, "loopback", cni_env(str(tmp_path / "no-such-netns")), CONF)
        assert gone.kind == "refused" and "could not open CNI_NETNS" in gone.reason and not gone.accepted
        assert recorder.entered.acquire(timeout=0.01) is False
        doc = status(path)
        assert doc["requests"]["refused"] == 3 and doc["requests"]["bad_requests"] == 1
        assert doc["requests"]["declined"] == 1 and doc["requests"]["served"] == 0


@needs_root
@pytest.mark.integration
def test_busy_timeout_and_status_at_once(tmp_path, recorder, pod):
    with served(tmp_path, max_concurrency=1, queue_timeout=0.2, request_timeout=0.5) as agent:
        path = agent.options.socket_path
        recorder.gate.clear()
        slow: list[Any] = []
        first = threading.Thread(target=lambda: slow.append(send_cni(path, "loopback", cni_env(pod), CONF)))
        first.start()
        assert recorder.entered.acquire(timeout=10)
        busy = send_cni(path, "loopback", cni_env(pod, CNI_CONTAINERID="c2"), CONF)
        assert busy.exit_code == 1 and not busy.accepted
        assert json.loads(busy.stdout)["code"] == 11
        started = time.monotonic()
        ready = send_cni(
            path,
            "loopback",
            cni_env(pod, CNI_COMMAND="STATUS"),
            b'{"cniVersion": "1.1.0", "name": "n", "type": "loopback"}',
        )
        assert ready.exit_code == 0 and time.monotonic() - started < 2.0  # not behind the slot (held 30 s)
        first.join(10)
        timed_out = slow[0]
        assert timed_out.accepted and timed_out.exit_code == 1
        error = json.loads(timed_out.stdout)
        assert error["code"] == 11 and error["cniVersion"] == "1.0.0"
        deadline = time.monotonic() + 10  # the answer goes out just before the connection's bookkeeping
        while status(path)["in_flight"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        doc = status(path)
        assert doc["requests"]["timed_out"] == 1 and doc["requests"]["busy"] == 1
        recorder.gate.set()  # the abandoned request ends and gives its slot back
        deadline = time.monotonic() + 10
        while status(path)["latency"].get("loopback", {}).get("ADD", {}).get("count", 0) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert send_cni(path, "loopback", cni_env(pod, CNI_CONTAINERID="c3"), CONF).exit_code == 0


@needs_root
@pytest.mark.integration
def test_a_failing_plugin_is_an_error_object_and_the_agent_carries_on(tmp_path, recorder, pod):
    with served(tmp_path) as agent:
        boom = send_cni(
            agent.options.socket_path,
            "loopback",
            cni_env(pod),
            b'{"cniVersion": "0.4.0", "name": "n", "type": "loopback", "explode": true}',
        )
        assert boom.exit_code == 1
        error = json.loads(boom.stdout)
        assert error["code"] == 999 and error["cniVersion"] == "0.4.0" and "boom" in error["msg"]
        assert b"Traceback" in boom.stderr
        exits = send_cni(
            agent.options.socket_path,
            "loopback",
            cni_env(pod),
            b'{"cniVersion": "1.0.0", "name": "n", "type": "loopback", "exit": true}',
        )
        assert exits.exit_code == 1 and json.loads(exits.stdout)["code"] == 999
        assert send_cni(agent.options.socket_path, "loopback", cni_env(pod), CONF).exit_code == 0


@needs_root
def test_stopping_removes_the_socket_only_and_a_new_agent_may_start(tmp_path, recorder):
    socket_path = tmp_path / "run" / "agent.sock"
    with served(tmp_path) as agent:
        assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700
        assert socket_path.stat().st_mode & 0o777 == 0o600
        # Published by a rename once listening: no staging name is left beside it.
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["agent.sock", "agent.sock.lock"]
        with pytest.raises(AgentError, match="another pycni agent"):
            Agent(AgentOptions(socket_path=str(socket_path), warm_up=False)).start()
        assert status(str(socket_path))["pid"] == os.getpid()
    assert not socket_path.exists() and (tmp_path / "run" / "agent.sock.lock").exists()
    # A stale socket file (an agent killed without cleaning up) is replaced.
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(socket_path))
    with served(tmp_path) as agent:
        assert status(agent.options.socket_path)["alive"]


@needs_root
def test_the_socket_appears_only_once_it_accepts(tmp_path, monkeypatch):
    """Runtimes take the socket's presence as readiness: it must not exist before listen() (a connect in
    between is refused), and must be there, listening, when start() returns."""
    from pycni.agent import server

    path = tmp_path / "run" / "agent.sock"
    seen_at_listen: list[bool] = []

    class Watched(socket.socket):
        def listen(self, *args: Any) -> None:
            seen_at_listen.append(path.exists())
            super().listen(*args)

    monkeypatch.setattr(server.socket, "socket", Watched)
    with served(tmp_path):
        monkeypatch.undo()
        assert seen_at_listen == [False]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))


def test_unsafe_socket_directories_are_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(AgentError, match="not be writable by group or others"):
        Agent(AgentOptions(socket_path=str(shared / "agent.sock"), warm_up=False)).start()


@needs_root
def test_status_of_a_stopped_agent_fails_without_claiming_a_refusal(tmp_path):
    # The refusal of another user is tested for real in tests/integration/test_agent.py (setpriv).
    with served(tmp_path) as agent:
        doc = status(agent.options.socket_path)
        assert doc["alive"] and doc["version"] == protocol.pycni_version()
    with pytest.raises(Exception) as info:
        status(agent.options.socket_path)
    assert not isinstance(info.value, AgentRefused)


@needs_root
def test_status_carries_the_overlay_part_and_survives_its_failure(tmp_path):
    calls = {"n": 0}

    def overlay() -> dict:
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("store unreachable")
        return {"overlay": {"subnet": "10.244.1.0/24"}}

    agent = Agent(AgentOptions(socket_path=str(tmp_path / "run" / "agent.sock"), warm_up=False), extra_status=overlay)
    agent.start()
    thread = threading.Thread(target=agent.serve_forever, daemon=True)
    thread.start()
    try:
        assert status(agent.options.socket_path)["overlay"] == {"subnet": "10.244.1.0/24"}
        doc = status(agent.options.socket_path)
        assert doc["alive"] and "store unreachable" in doc["extra_status_error"]
    finally:
        agent.stop()
        thread.join(30)
        agent.close()


def test_systemd_unit_runs_this_installations_agent(tmp_path):
    from pycni.install import CNIError, install_systemd_unit

    path = install_systemd_unit(
        str(tmp_path / "units"), pycni_command="/opt/pycni/bin/pycni", agent_socket="/run/pycni/agent.sock"
    )
    text = Path(path).read_text()
    assert Path(path).name == "pycni-agent.service" and Path(path).stat().st_mode & 0o777 == 0o644
    exec_lines = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    assert exec_lines == ["ExecStart=/opt/pycni/bin/pycni agent --socket /run/pycni/agent.sock"]
    assert (
        "Type=notify" in text and "KillSignal=SIGTERM" in text and "RuntimeDirectory" not in text.split("[Service]")[1]
    )
    with pytest.raises(CNIError):
        install_systemd_unit(str(tmp_path / "units"), pycni_command="/opt/my pycni/pycni")


# ---- trust boundaries, piece by piece -----------------------------------------------------------


def test_unsafe_directories_and_sockets(tmp_path):
    from pycni.agent.protocol import unsafe_directory, unsafe_socket

    if os.geteuid() != 0 or os.stat(tmp_path).st_uid != 0:
        pytest.skip("the checks want root's directories: run as root")
    safe = tmp_path / "safe"
    safe.mkdir(mode=0o700)
    assert unsafe_directory(str(safe)) == ""
    assert unsafe_directory(str(safe / "missing")) == ""
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    assert unsafe_directory(str(open_dir)) == f"{open_dir} is writable by group or others (mode 0777)"
    below = open_dir / "below"
    below.mkdir(mode=0o700)
    assert "is writable by group or others" in unsafe_directory(str(below))  # a parent anyone may rename in
    open_dir.chmod(0o1777)
    assert unsafe_directory(str(below)) == ""  # sticky: nobody can
    link = tmp_path / "link"
    link.symlink_to(open_dir)
    assert unsafe_directory(str(link)) == f"{open_dir} is writable by group or others (mode 1777)"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(safe / "agent.sock"))
        assert unsafe_socket(str(safe / "agent.sock")) == ""
        os.chown(safe / "agent.sock", 65534, 65534)
        assert unsafe_socket(str(safe / "agent.sock")) == f"{safe / 'agent.sock'} belongs to uid 65534, not root"
    (safe / "file").write_text("")
    assert unsafe_socket(str(safe / "file")) == f"{safe / 'file'} is not a socket"
    assert unsafe_socket(str(safe / "nothing")) == ""  # missing: connecting says so


def test_exec_policy_allows_only_its_directories_by_their_real_path(tmp_path):
    from cni_plugins.spec.exec import AGENT_BIN_DIRS_VARIABLE, AGENT_NETNS_VARIABLE, ExecPolicy, ExecRefused

    allowed, other = tmp_path / "allowed", tmp_path / "other"
    allowed.mkdir()
    other.mkdir()
    (tmp_path / "via-link").symlink_to(allowed)
    assert ExecPolicy.from_environ({"CNI_PATH": "/x"}) is None
    policy = ExecPolicy.from_environ({AGENT_BIN_DIRS_VARIABLE: f"{allowed}:", AGENT_NETNS_VARIABLE: "/run/netns/a"})
    assert policy == ExecPolicy((str(allowed),), "/run/netns/a")
    assert policy.executable(str(allowed / "ipam")) == str(allowed / "ipam")
    assert policy.executable(str(tmp_path / "via-link" / "ipam")) == str(allowed / "ipam")  # the checked path
    for outside in (other / "ipam", allowed / ".." / "other" / "ipam"):
        with pytest.raises(ExecRefused, match="outside the directories"):
            policy.executable(str(outside))
    with pytest.raises(ExecRefused, match=r"\(none; "):
        ExecPolicy(()).executable(str(allowed / "ipam"))
    assert not issubclass(ExecRefused, Exception)  # no plugin turns it into a CNI error


@needs_root
@pytest.mark.integration
def test_a_delegated_executable_gets_the_callers_netns_only_where_it_means_the_same(tmp_path):
    import netns

    from cni_plugins.spec.exec import ExecPolicy, ExecRefused, replace_sandbox

    with netns.temporary("age") as meant, netns.temporary("agf") as other:
        fd = os.open(meant.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            ours = f"/proc/{os.getpid()}/fd/{fd}"
            conf = {"name": "n", "prevResult": {"interfaces": [{"name": "eth0", "sandbox": ours}, {"name": "br"}]}}
            netns_path, stdin = ExecPolicy((), meant.path).child_request(ours, conf, b"raw")
            assert netns_path == meant.path
            assert json.loads(stdin)["prevResult"]["interfaces"][0]["sandbox"] == meant.path
            with pytest.raises(ExecRefused, match="another namespace for the agent"):
                ExecPolicy((), other.path).child_request(ours, conf, b"raw")
            with pytest.raises(ExecRefused, match="cannot see it"):
                ExecPolicy((), str(tmp_path / "gone")).child_request(ours, conf, b"raw")
            assert ExecPolicy(()).child_request(ours, conf, b"raw") == (ours, b"raw")  # nothing replaced
        finally:
            os.close(fd)
    assert replace_sandbox({"name": "n"}, "a", "b") is None
    assert replace_sandbox({"prevResult": {"interfaces": [{"sandbox": "x"}]}}, "a", "b") is None


def test_a_delegate_outside_the_policy_is_never_executed(tmp_path):
    from cni_plugins.shared.delegate import delegate
    from cni_plugins.spec.exec import AGENT_BIN_DIRS_VARIABLE, ExecRefused
    from cni_plugins.spec.skel import CmdArgs

    marker = tmp_path / "ran"
    script_dir = tmp_path / "bin"
    script_dir.mkdir()
    script = script_dir / "foreign-ipam"
    script.write_text(f'#!/bin/sh\ntouch {marker}\necho \'{{"cniVersion": "1.0.0", "ips": []}}\'\n')
    script.chmod(0o755)
    conf = {"cniVersion": "1.0.0", "name": "n", "ipam": {"type": "foreign-ipam"}}
    base = dict(
        command="ADD",
        container_id="c",
        netns="",
        ifname="eth0",
        path=str(script_dir),
        conf=conf,
        stdin_data=json.dumps(conf).encode(),
        cni_version="1.0.0",
    )
    refused = CmdArgs(**base, environ={AGENT_BIN_DIRS_VARIABLE: "/opt/elsewhere"})
    with pytest.raises(ExecRefused):
        delegate(refused, "foreign-ipam", "ADD")
    assert not marker.exists()
    allowed = CmdArgs(**base, environ={AGENT_BIN_DIRS_VARIABLE: str(script_dir), "PATH": "/usr/bin:/bin"})
    assert delegate(allowed, "foreign-ipam", "ADD") is not None and marker.exists()
    marker.unlink()
    cold = CmdArgs(**base, environ={"PATH": "/usr/bin:/bin"})  # no policy: anything CNI_PATH finds
    assert delegate(cold, "foreign-ipam", "ADD") is not None and marker.exists()


def test_outputs_name_the_callers_netns_path_again():
    from pycni.agent.server import _NetnsName

    name = _NetnsName(caller='/run/netns/pod "1"', ours="/proc/42/fd/7")
    stdout, stderr = name.shown(
        b'{"sandbox": "/proc/42/fd/7", "other": "/proc/42/fd/70"}', b"cannot open /proc/42/fd/7\n"
    )
    assert json.loads(stdout) == {"sandbox": '/run/netns/pod "1"', "other": "/proc/42/fd/70"}
    assert stderr == b'cannot open /run/netns/pod "1"\n'


def test_a_request_must_arrive_whole_within_the_read_timeout():
    from pycni.agent.server import _Oversized, _read_request

    left, right = socket.socketpair()
    with left, right:
        frame = protocol.request(protocol.pycni_version(), protocol.KIND_CNI, "loopback", {}, b"{}")

        def trickle() -> None:
            for byte in frame:
                try:
                    right.send(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.05)

        sender = threading.Thread(target=trickle)
        sender.start()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            _read_request(left, time.monotonic() + 0.5)
        assert time.monotonic() - started < 1.5  # each byte came in time; the whole request did not
        left.close()
        sender.join(10)
    left, right = socket.socketpair()
    with left, right:
        right.send(protocol.MAGIC + (protocol.MAX_BODY + 1).to_bytes(4, "big"))
        with pytest.raises(_Oversized, match="larger than the agent takes"):
            _read_request(left, time.monotonic() + 5)


def test_install_refuses_a_socket_someone_else_could_own(tmp_path):
    from pycni.install import CNIError, socket_directory_problem, wrapper_script

    if os.geteuid() != 0 or os.stat(tmp_path).st_uid != 0:
        pytest.skip("the checks want root's directories: run as root")
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(CNIError, match=f"refusing the agent socket {open_dir}/agent.sock: {open_dir} is writable"):
        wrapper_script("loopback", registry.PLUGINS["loopback"], sys.executable, str(open_dir / "agent.sock"))
    assert socket_directory_problem(str(tmp_path / "run" / "agent.sock")) == ""
    assert "another user could create it first" in socket_directory_problem(str(open_dir / "run" / "agent.sock"))


def test_systemd_unit_carries_the_cni_bin_dirs(tmp_path):
    from pycni.install import CNIError, install_systemd_unit

    path = install_systemd_unit(
        str(tmp_path / "units"),
        pycni_command="/opt/pycni/bin/pycni",
        agent_socket="/run/pycni/agent.sock",
        cni_bin_dirs=("/usr/libexec/cni",),
    )
    assert (
        "ExecStart=/opt/pycni/bin/pycni agent --socket /run/pycni/agent.sock --cni-bin-dir /usr/libexec/cni"
        in Path(path).read_text().splitlines()
    )
    with pytest.raises(CNIError):
        install_systemd_unit(str(tmp_path / "units"), pycni_command="/opt/pycni/bin/pycni", cni_bin_dirs=("/a:b",))


# ---- metrics, health and the journal -------------------------------------------------------------


def test_stats_histograms_are_cumulative_and_since_start():
    from pycni.agent.stats import BUCKETS

    stats = Stats()
    for seconds, ok in ((0.0005, True), (0.001, True), (0.02, False), (0.02, True), (120.0, True)):
        stats.served("bridge", "ADD", seconds, ok)
    figures = stats.histograms()[("bridge", "ADD")]
    assert figures["count"] == 5 and figures["errors"] == 1
    assert figures["sum"] == pytest.approx(120.0415)
    buckets = dict(figures["buckets"])
    assert list(buckets) == [*BUCKETS, float("inf")]
    assert buckets[0.001] == 2  # an upper bound holds what equals it (Prometheus "le")
    assert buckets[0.01] == 2 and buckets[0.025] == 4 and buckets[60.0] == 4 and buckets[float("inf")] == 5
    counts = [n for _bound, n in figures["buckets"]]
    assert counts == sorted(counts)
    assert stats.counts()["served"] == 5


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:9917", ("127.0.0.1", 9917)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("[::1]:9917", ("::1", 9917)),
        ("[fe80::1%eth0]:65535", ("fe80::1%eth0", 65535)),
    ],
)
def test_metrics_addresses(text, expected):
    from pycni.agent.metrics import format_address, parse_address

    assert parse_address(text) == expected
    assert format_address(*expected) == text


@pytest.mark.parametrize(
    "text, says",
    [
        ("9917", "HOST:PORT"),
        (":9917", "HOST:PORT"),
        ("localhost:9917", "IP address"),
        ("::1:9917", "in brackets"),
        ("[127.0.0.1]:9917", "IPv6 addresses only"),
        ("127.0.0.1:0", "1 to 65535"),
        ("127.0.0.1:65536", "1 to 65535"),
        ("127.0.0.1:http", "1 to 65535"),
        ("[::1]", "HOST:PORT"),
    ],
)
def test_bad_metrics_addresses_say_what_is_wrong(text, says):
    from pycni.agent.metrics import parse_address

    with pytest.raises(ValueError, match=says):
        parse_address(text)


def test_the_metrics_address_flag_is_checked_before_anything_starts():
    from click.testing import CliRunner

    from pycni.agent.cli import agent

    result = CliRunner().invoke(agent, ["--metrics-address", "localhost:9917"])
    assert result.exit_code == 2 and "HOST must be an IP address" in result.output
    assert "--metrics-address HOST:PORT" in CliRunner().invoke(agent, ["--help"]).output


def test_neither_the_agent_help_nor_a_cold_plugin_imports_prometheus_client():
    code = (
        "import sys\n"
        "from pycni.cli import main\n"
        "try:\n"
        "    main(['agent', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "import pycni.agent.server, pycni.agent.metrics, pycni.agent.shim\n"
        "from cni_plugins.spec import registry, skel\n"
        "for plugin_type in registry.PACKAGES:\n"
        "    registry.funcs(plugin_type)\n"
        "print(sorted(m for m in sys.modules if m.startswith('prometheus_client')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def _journal_logger(tmp_path: Path, name: str):
    import logging

    stream = open(tmp_path / "stderr", "w+")  # stands in for the stream journald gave the agent
    logger = logging.getLogger(f"pycni-test-journal.{name}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s pycni-agent[%(process)d] %(levelname)s %(name)s: %(message)s"))
    logger.handlers[:] = [handler]
    return logger, stream


def test_under_systemd_every_line_carries_its_journal_priority_and_no_timestamp(tmp_path, monkeypatch):
    from pycni.agent.server import JournalFormatter, journal_priority, use_journal_format

    logger, stream = _journal_logger(tmp_path, "on")
    st = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert use_journal_format(logger)
    assert isinstance(logger.handlers[0].formatter, JournalFormatter)
    logger.debug("tick")
    logger.info("serving on %s", "/run/pycni/agent.sock")
    logger.warning("two\nlines")
    logger.error("failed")
    logger.critical("gone")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("with a traceback")
    stream.flush()
    lines = Path(stream.name).read_text().splitlines()
    stream.close()
    assert lines[:6] == [
        "<7>DEBUG pycni-test-journal.on: tick",
        "<6>INFO pycni-test-journal.on: serving on /run/pycni/agent.sock",
        "<4>WARNING pycni-test-journal.on: two",
        "<4>lines",
        "<3>ERROR pycni-test-journal.on: failed",
        "<2>CRITICAL pycni-test-journal.on: gone",
    ]
    trace = lines[6:]
    assert trace[0] == "<3>ERROR pycni-test-journal.on: with a traceback" and len(trace) > 3
    assert all(line.startswith("<3>") for line in trace) and trace[-1] == "<3>ValueError: boom"
    assert [journal_priority(n) for n in (5, 10, 15, 20, 25, 30, 40, 50, 60)] == [7, 7, 7, 6, 6, 4, 3, 2, 2]


def test_elsewhere_the_log_keeps_its_format(tmp_path, monkeypatch):
    from pycni.agent.server import use_journal_format

    logger, stream = _journal_logger(tmp_path, "off")
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert not use_journal_format(logger)
    # Inherited from a unit, but stderr went elsewhere (another file): not the journal's stream.
    other = os.fstat(sys.__stdin__.fileno()) if sys.__stdin__ else os.stat("/dev/null")
    monkeypatch.setenv("JOURNAL_STREAM", f"{other.st_dev}:{other.st_ino}")
    assert not use_journal_format(logger)
    monkeypatch.setenv("JOURNAL_STREAM", "garbage")
    assert not use_journal_format(logger)
    logger.warning("plain")
    stream.flush()
    line = Path(stream.name).read_text().splitlines()[0]
    stream.close()
    assert not line.startswith("<") and f"pycni-agent[{os.getpid()}] WARNING pycni-test-journal.off: plain" in line
    assert line[:4].isdigit()  # the timestamp stays


def _overlay_status(**changes: Any) -> dict[str, Any]:
    status = {
        "ready": True,
        "nodeName": "n0",
        "publicIP": "192.168.100.10",
        "network": "10.244.0.0/16",
        "vni": 1,
        "vxlanDevice": "pycni.1",
        "subnet": "10.244.3.0/24",
        "subnets": ["10.244.3.0/24"],
        "lease": "valid",
        "leaseExpires": 2_000_000_000.0,
        "leaseProblem": None,
        "remotes": 2,
        "remoteNodes": [{"subnet": "10.244.1.0/24"}, {"subnet": "10.244.2.0/24"}],
        "skipped": [],
        "rejectedEntries": [{"key": "/pycni/subnets/x", "revision": 3, "reason": "bad"}],
        "lastReconcile": 1_000.0,
        "reconciles": 7,
        "events": 4,
        "changes": 12,
        "repairs": 1,
        "entryRepairs": 2,
        "storeRevision": 42,
        "storeReachable": True,
        "storeError": None,
        "store": {
            "watch": "streaming",
            "revision": 42,
            "relists": 3,
            "errors": 5,
            "requests": {"requests": {"range": 9, "txn": 2}, "errors": 1},
        },
    }
    status.update(changes)
    return status


class _FakeAgent:
    """What the metrics read of an Agent, without a socket."""

    def __init__(self, serving: bool = True, stopping: bool = False) -> None:
        self.version = "9.9.9"
        self.started_at = 1_700_000_000.0
        self.serving, self.stopping = serving, stopping
        self.options = AgentOptions(max_concurrency=4)
        self.stats = Stats()

    def load(self) -> dict[str, int]:
        return {"in_flight": 1, "queued": 2, "connections": 3}


def _scrape(sources) -> dict[str, dict[tuple, float]]:
    """name -> {sorted label items: value}, through prometheus_client's own parser."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from pycni.agent.metrics import registry_for

    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry_for(sources)).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_count_requests_by_plugin_command_and_outcome():
    from pycni.agent.metrics import Sources

    agent = _FakeAgent()
    for seconds, ok in ((0.004, True), (0.03, True), (0.2, False)):
        agent.stats.served("host-local", "ADD", seconds, ok)
    agent.stats.served("bridge", "DEL", 0.002, True)
    for reason in ("refused", "declined", "declined", "busy", "bad_requests"):
        agent.stats.count(reason)
    got = _scrape(Sources(agent))
    requests = got["pycni_agent_requests_total"]
    assert requests[(("command", "ADD"), ("outcome", "success"), ("plugin", "host-local"))] == 2
    assert requests[(("command", "ADD"), ("outcome", "error"), ("plugin", "host-local"))] == 1
    assert requests[(("command", "DEL"), ("outcome", "success"), ("plugin", "bridge"))] == 1
    hl = (("command", "ADD"), ("plugin", "host-local"))
    assert got["pycni_agent_request_duration_seconds_count"][hl] == 3
    assert got["pycni_agent_request_duration_seconds_sum"][hl] == pytest.approx(0.234)
    buckets = got["pycni_agent_request_duration_seconds_bucket"]
    assert buckets[(*hl[:1], ("le", "0.005"), *hl[1:])] == 1
    assert buckets[(*hl[:1], ("le", "0.05"), *hl[1:])] == 2
    assert buckets[(*hl[:1], ("le", "+Inf"), *hl[1:])] == 3
    assert got["pycni_agent_requests_served_total"][()] == 4
    not_served = {dict(k)["reason"]: v for k, v in got["pycni_agent_requests_not_served_total"].items()}
    assert not_served == {
        "refused": 1,
        "declined": 2,
        "over_capacity": 0,
        "busy": 1,
        "timed_out": 0,
        "denied": 0,
        "bad_request": 1,
    }
    assert got["pycni_agent_requests_in_flight"][()] == 1 and got["pycni_agent_requests_queued"][()] == 2
    assert got["pycni_agent_info"][(("version", "9.9.9"),)] == 1
    assert got["pycni_agent_healthy"][()] == 1 and got["pycni_agent_serving"][()] == 1
    assert "process_cpu_seconds_total" in got and "python_info" in got
    assert not any(name.startswith("pycni_overlay") for name in got)


def test_metrics_of_an_overlay_node():
    from pycni.agent.metrics import Sources

    status = _overlay_status()
    got = _scrape(Sources(_FakeAgent(), overlay_status=lambda: status, clock=lambda: 1_005.0))
    assert got["pycni_overlay_status_available"][()] == 1
    assert got["pycni_overlay_remote_nodes"][()] == 2 and got["pycni_overlay_remote_subnets"][()] == 2
    assert got["pycni_overlay_reconciles_total"][()] == 7
    assert got["pycni_overlay_last_reconcile_timestamp_seconds"][()] == 1_000.0
    lease = {dict(k)["state"]: v for k, v in got["pycni_overlay_lease_state"].items()}
    assert lease == {"valid": 1, "lapsed": 0, "lost": 0}
    assert got["pycni_overlay_leases_held"][()] == 1
    assert got["pycni_overlay_lease_subnet"][(("subnet", "10.244.3.0/24"),)] == 1
    assert got["pycni_overlay_store_errors_total"][()] == 5 and got["pycni_overlay_store_relists_total"][()] == 3
    assert got["pycni_overlay_store_reachable"][()] == 1
    watch = {dict(k)["state"]: v for k, v in got["pycni_overlay_store_watch"].items()}
    assert watch == {"not_started": 0, "streaming": 1, "reconnecting": 0, "re_listing": 0}
    assert got["pycni_overlay_store_requests_total"] == {(("operation", "range"),): 9, (("operation", "txn"),): 2}
    assert got["pycni_overlay_rejected_store_entries"][()] == 1
    assert got["pycni_overlay_kernel_changes_total"][()] == 12
    assert got["pycni_agent_healthy"][()] == 1
    assert "pycni_overlay_reconcile_duration_seconds_count" not in got  # the node does not time them (yet)
    # When the node reports its reconcile durations, they are a histogram.
    status["reconcileDuration"] = {"count": 3, "sum": 0.3, "buckets": [[0.05, 1], [0.1, 2]]}
    got = _scrape(Sources(_FakeAgent(), overlay_status=lambda: status, clock=lambda: 1_005.0))
    assert got["pycni_overlay_reconcile_duration_seconds_count"][()] == 3
    assert got["pycni_overlay_reconcile_duration_seconds_bucket"] == {
        (("le", "0.05"),): 1,
        (("le", "0.1"),): 2,
        (("le", "+Inf"),): 3,
    }
    assert got["pycni_overlay_reconcile_duration_seconds_sum"][()] == pytest.approx(0.3)
    # A lapsed lease: held no more, and unhealthy.
    got = _scrape(Sources(_FakeAgent(), overlay_status=lambda: _overlay_status(lease="lapsed"), clock=lambda: 1_005.0))
    assert got["pycni_overlay_leases_held"][()] == 0 and got["pycni_agent_healthy"][()] == 0
    assert got["pycni_overlay_lease_subnet"][(("subnet", "10.244.3.0/24"),)] == 0


def test_a_scraper_asking_for_openmetrics_gets_it():
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    from pycni.agent.metrics import MetricsEndpoint, Sources, registry_for

    agent = _FakeAgent()
    agent.stats.served("bridge", "ADD", 0.01, True)
    endpoint = MetricsEndpoint.__new__(MetricsEndpoint)  # the rendering only: no socket
    endpoint.registry = registry_for(Sources(agent, overlay_status=_overlay_status, clock=lambda: 1_005.0))
    code, content_type, body = endpoint.metrics("application/openmetrics-text; version=1.0.0")
    assert code == 200 and content_type.startswith("application/openmetrics-text")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["pycni_agent_requests"].type == "counter"
    assert families["pycni_agent_request_duration_seconds"].type == "histogram"
    assert families["pycni_overlay_store_watch"].type == "gauge"
    code, content_type, body = endpoint.metrics(None)
    assert code == 200 and content_type.startswith("text/plain; version=0.0.4")


def test_health_without_overlay_is_the_agent_serving():
    from pycni.agent.metrics import Sources

    assert Sources(_FakeAgent()).health() == (True, "ok")
    assert Sources(_FakeAgent(serving=False)).health() == (False, "the agent is starting")
    assert Sources(_FakeAgent(serving=False, stopping=True)).health() == (False, "the agent is stopping")


def test_health_of_an_overlay_node_names_every_reason_in_one_line():
    from pycni.agent.metrics import Sources, reconcile_max_age

    def health(now: float = 1_005.0, **changes: Any) -> tuple[bool, str]:
        status = _overlay_status(**changes)
        return Sources(_FakeAgent(), overlay_status=lambda: status, reconcile_max_age=20.0, clock=lambda: now).health()

    assert health() == (True, "ok")
    ok, reason = health(storeReachable=False, storeError="etcd 192.168.100.1:2379:\n connection refused")
    assert not ok and reason == "the cluster store did not answer: etcd 192.168.100.1:2379: connection refused"
    ok, reason = health(lease="lost", leaseProblem="10.244.3.0/24 is held by n7")
    assert reason == "the subnet lease of 10.244.3.0/24 is lost: 10.244.3.0/24 is held by n7"
    ok, reason = health(now=1_021.0)
    assert not ok and reason == "the last reconcile completed 21 s ago (stale after 20 s)"
    ok, reason = health(now=1_021.0, storeReachable=False, storeError="", lease=None, lastReconcile=None)
    assert reason == ("the cluster store has not answered yet; no subnet lease yet; no reconcile has completed yet")
    assert "\n" not in reason
    failed = Sources(
        _FakeAgent(),
        overlay_status=lambda: _overlay_status(),
        clock=lambda: 1_005.0,
        overlay_failure=lambda: "RuntimeError: boom",
    )
    assert failed.health() == (False, "the overlay reconcile loop stopped: RuntimeError: boom")
    assert reconcile_max_age(10.0) == 30.0 and reconcile_max_age(0.5) == 15.5 and reconcile_max_age(60) == 180


def test_a_stuck_overlay_node_makes_health_say_so_without_hanging():
    from pycni.agent.metrics import Sources

    release = threading.Event()
    calls = []

    def stuck() -> dict:
        calls.append(1)
        release.wait(30)
        return _overlay_status()

    sources = Sources(_FakeAgent(), overlay_status=stuck, status_wait=0.2, clock=lambda: 1_005.0)
    try:
        started = time.monotonic()
        for _ in range(3):
            ok, reason = sources.health()
            assert not ok and reason == "the overlay node did not report its status (no answer within 0.2 s)"
        assert time.monotonic() - started < 3
        assert len(calls) == 1  # one call in flight at a time, shared by every caller
        got = _scrape(sources)
        assert got["pycni_overlay_status_available"][()] == 0 and got["pycni_agent_healthy"][()] == 0
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while sources.health() != (True, "ok") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sources.health() == (True, "ok")
    failing = Sources(_FakeAgent(), overlay_status=lambda: 1 / 0)
    assert failing.health() == (False, "the overlay node cannot report its status: division by zero")
