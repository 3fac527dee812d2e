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
    proc = subprocess.run([sys.executable, "-c", "from cni_plugins.loopback import main; main()"], input=conf,
                          env=env, capture_output=True, timeout=60)
    code, stdout, stderr = render(dispatch(registry.funcs("loopback"), env, conf))
    assert (code, stdout, stderr) == (proc.returncode, proc.stdout, proc.stderr)
    assert render(Outcome(0, "{}")) == (0, b"{}\n", b"")
    assert render(Outcome(0, "")) == (0, b"", b"")


def _write_shim(tmp_path: Path, plugin_type: str, socket_path: str | None, version: str | None = None) -> str:
    path = tmp_path / plugin_type
    path.write_text(script(plugin_type, registry.PLUGINS[plugin_type], sys.executable,
                           f"{MARKER}: the pycni {plugin_type!r} CNI plugin.", socket_path, version))
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
    warm_imports = text[text.index("import posix"):].split("\n", 1)[0]
    assert warm_imports == "import posix, sys, _socket"


def test_shim_answers_version_alone_and_without_a_command_runs_the_plugin(tmp_path):
    path = _write_shim(tmp_path, "bridge", str(tmp_path / "no" / "agent.sock"))
    proc = subprocess.run([path], env={"CNI_COMMAND": "VERSION"}, capture_output=True, timeout=30)
    cold = subprocess.run([sys.executable, "-c", "from cni_plugins.bridge import main; main()"],
                          env={"CNI_COMMAND": "VERSION"}, capture_output=True, timeout=30)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, cold.stdout, b"")
    assert proc.stdout == version_answer("bridge")
    about = subprocess.run([path], env={}, capture_output=True, timeout=30)
    assert about.returncode == 0 and b"CNI bridge plugin" in about.stderr and b"agent" not in about.stderr


def test_shim_without_agent_runs_cold_with_one_line_note(tmp_path):
    missing = str(tmp_path / "no" / "agent.sock")
    path = _write_shim(tmp_path, "host-local", missing)
    conf = {"cniVersion": "1.0.0", "name": "n", "ipam": {"type": "host-local", "dataDir": str(tmp_path / "d"),
                                                          "ranges": [[{"subnet": "10.1.2.0/24"}]]}}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0",
           "CNI_PATH": str(tmp_path)}
    proc = subprocess.run([path], input=json.dumps(conf).encode(), env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ips"][0]["address"] == "10.1.2.2/24"
    assert proc.stderr.decode() == (f"pycni: agent not reached at {missing} (No such file or directory); "
                                    f"running host-local in-process\n")
    silent = subprocess.run([path], input=json.dumps(conf).encode(), env=dict(env, PYCNI_NO_AGENT="1",
                                                                              CNI_CONTAINERID="c2"),
                            capture_output=True, timeout=60)
    assert silent.returncode == 0 and silent.stderr == b""


def test_cold_only_shims_never_try_an_agent(tmp_path):
    path = _write_shim(tmp_path, "loopback", None)
    assert "S = ''" in Path(path).read_text()
    about = subprocess.run([path], env={"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c", "CNI_IFNAME": "lo",
                                        "CNI_PATH": "/x"},
                           input=b'{"cniVersion": "1.0.0", "name": "n", "type": "loopback"}',
                           capture_output=True, timeout=30)
    assert about.returncode == 0 and about.stderr == b""


# ---- an agent served in this process ---------------------------------------------------------

class Recorder:
    """Plugin functions for the type "loopback" that report what their request saw."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)

    def add(self, req) -> dict:
        self.entered.release()
        self.gate.wait(30)
        if req.conf.get("explode"):
            raise RuntimeError("boom")
        if req.conf.get("exit"):
            raise SystemExit(3)  # what a plugin must never do in the agent: still one request's failure
        environ = getattr(req, "environ", None) or {}
        return {"cniVersion": req.cni_version, "netns": os.stat("/proc/thread-self/ns/net").st_ino,
                "environ": dict(environ)}

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


def cni_env(**extra: str) -> dict[str, str]:
    return {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0",
            "CNI_PATH": "/x", **extra}


CONF = b'{"cniVersion": "1.0.0", "name": "n", "type": "loopback"}'


@needs_root
def test_a_request_sees_only_its_own_environment_and_its_callers_namespace(tmp_path, recorder, monkeypatch):
    import netns

    monkeypatch.setenv("AGENT_ONLY", "agent")
    monkeypatch.setenv("CNI_IFNAME", "leaked-from-agent")
    with served(tmp_path) as agent, netns.temporary("agu") as ns:
        answers: dict[str, Any] = {}

        def call(tag: str, netns_path: str) -> None:
            answers[tag] = send_cni(agent.options.socket_path, "loopback",
                                    cni_env(CNI_CONTAINERID=tag, CNI_ARGS=f"TAG={tag}", PYCNI_LOG_LEVEL=tag,
                                            PATH="/caller/bin", LD_PRELOAD="/caller/evil.so"),
                                    CONF, netns_path=netns_path)

        recorder.gate.clear()
        threads = [threading.Thread(target=call, args=("one", ns.path)),
                   threading.Thread(target=call, args=("two", "/proc/self/ns/net"))]
        for t in threads:
            t.start()
        for _ in threads:
            assert recorder.entered.acquire(timeout=10)  # both run at the same time
        recorder.gate.set()
        for t in threads:
            t.join(30)
        mine = os.stat("/proc/self/ns/net").st_ino
        theirs = os.stat(ns.path).st_ino
    for tag, netns_link in (("one", theirs), ("two", mine)):
        answer = answers[tag]
        assert answer.accepted and answer.exit_code == 0, answer
        out = json.loads(answer.stdout)
        env = out["environ"]
        assert out["netns"] == netns_link
        assert env["CNI_CONTAINERID"] == tag and env["CNI_ARGS"] == f"TAG={tag}" and env["PYCNI_LOG_LEVEL"] == tag
        assert env["CNI_IFNAME"] == "eth0"                          # the caller's, not the agent's
        assert env["PATH"] != "/caller/bin" and "LD_PRELOAD" not in env  # never the caller's
        assert env["AGENT_ONLY"] == "agent" and env[protocol.NO_AGENT_VARIABLE] == "1"
    assert theirs != mine


@needs_root
def test_refusals_do_nothing(tmp_path, recorder):
    with served(tmp_path) as agent:
        path = agent.options.socket_path
        other = send_cni(path, "loopback", cni_env(), CONF, version="0.0.0-other")
        assert other.kind == "refused" and "version mismatch" in other.reason and not other.accepted
        unknown = send_cni(path, "no-such-plugin", cni_env(), CONF)
        assert unknown.kind == "refused" and "no plugin" in unknown.reason
        with socket.socket(socket.AF_UNIX) as sock:  # a request without the caller's namespace
            sock.connect(path)
            sock.sendall(protocol.request(protocol.pycni_version(), protocol.KIND_CNI, "loopback", cni_env(), CONF))
            kind, items = protocol.read_answer(sock)
        assert kind == protocol.REFUSED and b"network namespace" in items[0]
        with socket.socket(socket.AF_UNIX) as sock:  # garbage: dropped, the agent carries on
            sock.connect(path)
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(100) == b""
        assert recorder.entered.acquire(timeout=0.01) is False
        doc = status(path)
        assert doc["requests"]["refused"] == 3 and doc["requests"]["bad_requests"] == 1
        assert doc["requests"]["served"] == 0


@needs_root
def test_busy_timeout_and_status_at_once(tmp_path, recorder):
    with served(tmp_path, max_concurrency=1, queue_timeout=0.2, request_timeout=0.5) as agent:
        path = agent.options.socket_path
        recorder.gate.clear()
        slow: list[Any] = []
        first = threading.Thread(target=lambda: slow.append(send_cni(path, "loopback", cni_env(), CONF)))
        first.start()
        assert recorder.entered.acquire(timeout=10)
        busy = send_cni(path, "loopback", cni_env(CNI_CONTAINERID="c2"), CONF)
        assert busy.exit_code == 1 and not busy.accepted
        assert json.loads(busy.stdout)["code"] == 11
        started = time.monotonic()
        ready = send_cni(path, "loopback", cni_env(CNI_COMMAND="STATUS"),
                         b'{"cniVersion": "1.1.0", "name": "n", "type": "loopback"}')
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
        assert send_cni(path, "loopback", cni_env(CNI_CONTAINERID="c3"), CONF).exit_code == 0


@needs_root
def test_a_failing_plugin_is_an_error_object_and_the_agent_carries_on(tmp_path, recorder):
    with served(tmp_path) as agent:
        boom = send_cni(agent.options.socket_path, "loopback", cni_env(),
                        b'{"cniVersion": "0.4.0", "name": "n", "type": "loopback", "explode": true}')
        assert boom.exit_code == 1
        error = json.loads(boom.stdout)
        assert error["code"] == 999 and error["cniVersion"] == "0.4.0" and "boom" in error["msg"]
        assert b"Traceback" in boom.stderr
        exits = send_cni(agent.options.socket_path, "loopback", cni_env(),
                         b'{"cniVersion": "1.0.0", "name": "n", "type": "loopback", "exit": true}')
        assert exits.exit_code == 1 and json.loads(exits.stdout)["code"] == 999
        assert send_cni(agent.options.socket_path, "loopback", cni_env(), CONF).exit_code == 0


@needs_root
def test_stopping_removes_the_socket_only_and_a_new_agent_may_start(tmp_path, recorder):
    socket_path = tmp_path / "run" / "agent.sock"
    with served(tmp_path) as agent:
        assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700
        assert socket_path.stat().st_mode & 0o777 == 0o600
        with pytest.raises(AgentError, match="another pycni agent"):
            Agent(AgentOptions(socket_path=str(socket_path), warm_up=False)).start()
        assert status(str(socket_path))["pid"] == os.getpid()
    assert not socket_path.exists() and (tmp_path / "run" / "agent.sock.lock").exists()
    # A stale socket file (an agent killed without cleaning up) is replaced.
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(socket_path))
    with served(tmp_path) as agent:
        assert status(agent.options.socket_path)["alive"]


def test_unsafe_socket_directories_are_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(AgentError, match="not be writable by group or others"):
        Agent(AgentOptions(socket_path=str(shared / "agent.sock"), warm_up=False)).start()


@needs_root
def test_status_refused_to_other_users_is_reported(tmp_path):
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

    agent = Agent(AgentOptions(socket_path=str(tmp_path / "run" / "agent.sock"), warm_up=False),
                  extra_status=overlay)
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

    path = install_systemd_unit(str(tmp_path / "units"), pycni_command="/opt/pycni/bin/pycni",
                                agent_socket="/run/pycni/agent.sock")
    text = Path(path).read_text()
    assert Path(path).name == "pycni-agent.service" and Path(path).stat().st_mode & 0o777 == 0o644
    exec_lines = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    assert exec_lines == ["ExecStart=/opt/pycni/bin/pycni agent --socket /run/pycni/agent.sock"]
    assert "Type=notify" in text and "KillSignal=SIGTERM" in text and "RuntimeDirectory" not in text.split("[Service]")[1]
    with pytest.raises(CNIError):
        install_systemd_unit(str(tmp_path / "units"), pycni_command="/opt/my pycni/pycni")
