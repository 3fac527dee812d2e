"""Running pycni's installed plugins both ways: cold (a process per call) and warm (through `pycni agent`).

Tests that run "our" plugins take their executables from the ``launcher_dir``
fixture (a CNI bin dir, see tests/conftest.py). This module's ``launcher_dir``
is a drop-in replacement parametrized over ``MODES``, so every test using it
runs once per mode with unchanged assertions (tests/integration/conftest.py
puts it in place for the integration tests)::

    def test_something(launcher_dir):
        run_plugin(os.path.join(launcher_dir, "bridge"), "ADD", conf, node=node, netns=pod)

- ``cold``: the executables of `pycni install` with no agent behind their socket:
  each call runs the plugin in its own process (the shims' fallback, with its
  one-line note on stderr).
- ``warm``: the same executables with a `pycni agent` serving them, started in a
  network namespace of its own (so it can only get a request right by entering
  the caller's namespace). Every request ``run_plugin`` sends through a warm
  bin dir must be served by the agent, checked per request (its served
  counter moves, the shim writes no "running ... in-process" note:
  tests/helpers/plugins.py ``WARM_BIN_DIRS``), so a warm test that silently
  ran cold fails; when the session ends the agent must have refused none.

``plugin_set`` (module-scoped, also both modes) gives the same as a ``PluginSet``
that knows its mode and agent; ``running_agent`` starts and stops an agent for
tests that drive one directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import netns  # noqa: E402
from pycni import procs  # noqa: E402
from tests.helpers.plugins import WARM_BIN_DIRS  # noqa: E402

PYCNI = os.path.join(os.path.dirname(sys.executable), "pycni")
MODES = ("cold", "warm")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


@dataclass
class AgentProcess:
    """A `pycni agent` process in its own test namespace; ``stop()`` it by PID."""

    socket_path: str
    log_path: str
    ns_name: str
    proc: subprocess.Popen | None = None
    args: tuple[str, ...] = ()

    def start(self, extra_args: Sequence[str] = (), wait: bool = True) -> AgentProcess:
        self.args = (PYCNI, "agent", "--socket", self.socket_path, "--log-level", "debug", *extra_args)
        with open(self.log_path, "ab") as log:
            log.write(f"---- {time.strftime('%H:%M:%S')} {' '.join(self.args)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns_name, *self.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                close_fds=True,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
        if wait:
            self.wait_ready()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until the agent answers a status request (bounded); raise with its log if it exits."""
        from pycni.agent.client import AgentUnreachable, status

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the agent exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if status(self.socket_path, timeout=2.0)["pid"] == self.pid:
                    return
            except (AgentUnreachable, OSError, EOFError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the agent did not answer within {timeout} s:\n{self.log_tail()}")

    def status(self) -> dict:
        from pycni.agent.client import status

        return status(self.socket_path)

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, a bounded wait, then SIGKILL; the exit status (None if it was never started)."""
        if self.proc is None:
            return None
        procs.stop(self.proc, timeout)
        return self.proc.returncode

    def kill(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except OSError:
            return ""


@contextlib.contextmanager
def running_agent(
    workdir: str, extra_args: Sequence[str] = (), ns_prefix: str = "agt", socket_path: str | None = None
) -> Iterator[AgentProcess]:
    """An agent serving ``workdir/run/agent.sock`` (the agent creates ``run``, 0700) from a namespace
    of its own; stopped by PID at the end."""
    with netns.temporary(ns_prefix) as ns:
        agent = AgentProcess(
            socket_path or os.path.join(workdir, "run", "agent.sock"), os.path.join(workdir, "agent.log"), ns.name
        )
        try:
            agent.start(extra_args)
            yield agent
        finally:
            agent.stop()


def install(bin_dir: str, agent_socket: str | None, native: bool | None = None) -> None:
    """`pycni install` into bin_dir: shims for agent_socket (None: cold only). The shim: the default
    install's (None), the compiled one (True: --native-shim) or the Python one (False: --python-shim)."""
    args = [PYCNI, "install", "--cni-bin-dir", bin_dir]
    args += ["--agent-socket", agent_socket] if agent_socket else ["--no-agent"]
    args += [] if native is None or agent_socket is None else ["--native-shim" if native else "--python-shim"]
    subprocess.run(args, check=True, capture_output=True, timeout=120)


@dataclass
class PluginSet:
    """pycni's plugin executables in ``bin_dir``, run cold or warm (``mode``)."""

    mode: str
    bin_dir: str
    socket_path: str
    agent: AgentProcess | None = None
    notes: list[str] = field(default_factory=list)

    def exe(self, plugin_type: str) -> str:
        return os.path.join(self.bin_dir, plugin_type)

    def command(self, plugin_type: str) -> list[str]:
        return [self.exe(plugin_type)]


@contextlib.contextmanager
def plugins_in_mode(mode: str, workdir: str) -> Iterator[PluginSet]:
    """Installed executables whose socket has an agent behind it (warm) or nothing (cold)."""
    bin_dir = os.path.join(workdir, "bin")
    socket_path = os.path.join(workdir, "run", "agent.sock")
    install(bin_dir, socket_path)
    if mode == "cold":
        yield PluginSet(mode, bin_dir, socket_path)
        return
    with running_agent(workdir) as agent:
        plugins = PluginSet(mode, bin_dir, socket_path, agent)
        # Per request: run_plugin checks that the agent served every request sent through bin_dir.
        WARM_BIN_DIRS[os.path.realpath(bin_dir)] = socket_path
        try:
            yield plugins
        finally:
            WARM_BIN_DIRS.pop(os.path.realpath(bin_dir), None)
        doc = agent.status()
        assert agent.alive(), f"the agent died during the tests:\n{agent.log_tail()}"
        assert doc["requests"]["served"] > 0, "warm mode: the agent served nothing (did the shims fall back?)"
        assert doc["requests"]["refused"] == 0 and doc["requests"]["denied"] == 0, doc["requests"]
        assert "Traceback" not in agent.log_text(), agent.log_tail(80)


@pytest.fixture(scope="session", params=MODES)
def launcher_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A CNI bin dir with our plugins, cold and then warm (one agent for the whole session)."""
    if request.param == "warm" and os.geteuid() != 0:
        pytest.skip("warm mode needs root (the agent enters network namespaces)")
    with plugins_in_mode(request.param, str(tmp_path_factory.mktemp(f"launchers-{request.param}"))) as plugins:
        yield plugins.bin_dir


@pytest.fixture(scope="module", params=MODES)
def plugin_set(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginSet]:
    """pycni's installed plugins, cold and then warm (module-scoped: one agent per module)."""
    if request.param == "warm" and os.geteuid() != 0:
        pytest.skip("warm mode needs root (the agent enters network namespaces)")
    with plugins_in_mode(request.param, str(tmp_path_factory.mktemp(f"plugins-{request.param}"))) as plugins:
        yield plugins
