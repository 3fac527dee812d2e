"""Everything the benchmark creates is registered here and removed at the end.

The run creates only network namespaces, temporary directories and child
processes (iperf3 servers). Deleting a node namespace takes its bridge, veth
ends, qdiscs and firewall tables with it, so cleanup never needs the plugins.
SIGINT and SIGTERM interrupt the run (KeyboardInterrupt) so that the
`finally` blocks and this registry still run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import netns

# Every namespace is named <prefix>-<role>-<8 hex> and every directory pycni-bench-<prefix>-<role>-...;
# PYCNI_BENCH_PREFIX (letters and digits) tags one run's, so a test can check exactly what it made.
NS_PREFIX = os.environ.get("PYCNI_BENCH_PREFIX", "pb")
if not (NS_PREFIX.isascii() and NS_PREFIX.isalnum() and len(NS_PREFIX) <= 16):
    raise SystemExit(f"PYCNI_BENCH_PREFIX={NS_PREFIX!r}: use up to 16 letters and digits")


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) arrived; unwinds like Ctrl-C."""


@dataclass
class Cleanup:
    namespaces: list[str] = field(default_factory=list)
    directories: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def namespace(self, role: str) -> str:
        """Create a namespace pb-<role>-<hex> with lo up; return its name."""
        for _ in range(8):
            name = f"{NS_PREFIX}-{role}-{os.urandom(4).hex()}"
            if netns.exists(name):
                continue
            # Registered before it exists, so an interrupt inside create() still cleans it up.
            self.namespaces.append(name)
            netns.create(name)
            break
        else:
            raise RuntimeError(f"no free namespace name for role {role!r}")
        from .topology import set_up

        set_up(name, "lo")
        return name

    def drop_namespace(self, name: str) -> None:
        """Delete one namespace now (pods between iterations)."""
        netns.delete(name)
        try:
            self.namespaces.remove(name)
        except ValueError:
            pass

    def directory(self, role: str) -> str:
        path = tempfile.mkdtemp(prefix=f"pycni-bench-{NS_PREFIX}-{role}-")
        self.directories.append(path)
        return path

    def drop_directory(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)
        try:
            self.directories.remove(path)
        except ValueError:
            pass

    def process(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.processes.append(proc)
        return proc

    def stop_process(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if proc in self.processes:
            self.processes.remove(proc)

    @contextmanager
    def scope(self) -> Iterator[None]:
        """Remove the namespaces, directories and processes made inside the block when it ends."""
        marks = (len(self.namespaces), len(self.directories), len(self.processes))
        try:
            yield
        finally:
            for proc in self.processes[marks[2] :]:
                self.stop_process(proc)
            for name in reversed(self.namespaces[marks[0] :]):
                self.drop_namespace(name)
            for path in self.directories[marks[1] :]:
                self.drop_directory(path)

    def run_all(self) -> list[str]:
        """Remove everything still registered; return what could not be removed."""
        problems: list[str] = []
        for proc in list(self.processes):
            self.stop_process(proc)
        for name in reversed(list(self.namespaces)):
            try:
                netns.delete(name)
                self.namespaces.remove(name)
            except Exception as exc:  # keep going: remove as much as possible
                problems.append(f"namespace {name}: {exc}")
        for path in list(self.directories):
            self.drop_directory(path)
        return problems


def install_signal_handlers() -> dict[int, Any]:
    """Turn SIGTERM into an exception so that cleanup runs; returns the old handlers."""

    def interrupt(signum: int, _frame: Any) -> None:
        # Ignore further signals while unwinding, so cleanup is not cut short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"\nbench: {signal.Signals(signum).name} received, cleaning up...", file=sys.stderr)
        raise Interrupted()

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        old[sig] = signal.signal(sig, interrupt)
    return old


def restore_signal_handlers(old: dict[int, Any]) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler)
