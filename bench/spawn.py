"""Starting a plugin process with its host side in a node namespace, and timing it.

A plugin runs as `ip netns exec NODE PLUGIN`: `ip` joins the node's network
namespace, gives the child a private (rslave) mount namespace and remounts /sys
there, then executes the plugin, so the plugin sees the node as its host and
nothing it does reaches the machine's own namespace. Doing those steps in a
Python pre-exec hook instead was measured slower (it forces a full fork of the
benchmark process), so `ip` it is; the floor this adds to every figure is
measured and reported apart (startup/floor).

stdin, stdout and stderr are temporary files, not pipes: nothing has to be
pumped while a child runs, so many children can run at once from one thread
and be reaped with wait4(). A watchdog kills a child that outlives its
timeout, so a hung plugin cannot hang the benchmark.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

IP = "/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else "/sbin/ip"
TIMEOUT_S = 120.0


@dataclass
class Outcome:
    """One finished plugin process."""

    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes
    wall_s: float
    # User + system CPU of the child and the children it waited for (iptables, tc, ...).
    cpu_s: float
    # The child's ru_maxrss. Linux carries the peak resident size across exec(),
    # so this includes the forking (benchmark) process: see cases/startup.py.
    maxrss_kib: int

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def json(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None

    def describe(self) -> str:
        text = self.stdout.decode(errors="replace").strip() or self.stderr.decode(errors="replace").strip()
        return f"{os.path.basename(self.argv[0])} exited {self.returncode}: {text[-600:]}"


@dataclass
class Running:
    """A started process; reap it with wait4() and hand the result to finished()."""

    argv: list[str]
    proc: subprocess.Popen
    started: float
    watchdog: threading.Timer
    files: list[Any] = field(default_factory=list)

    def finished(self, status: int, usage: Any) -> Outcome:
        """The outcome, once wait4() has reaped this process (status and rusage from it)."""
        ended = time.perf_counter()
        self.watchdog.cancel()
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        outs = []
        for handle in self.files[1:]:
            handle.seek(0)
            outs.append(handle.read())
        for handle in self.files:
            handle.close()
        if self.proc.returncode == -9 and not outs[0]:
            outs[0] = f"killed after {TIMEOUT_S:.0f} s".encode()
        return Outcome(
            self.argv,
            self.proc.returncode,
            outs[0],
            outs[1],
            ended - self.started,
            usage.ru_utime + usage.ru_stime,
            usage.ru_maxrss,
        )


def node_argv(node: str | None, argv: list[str]) -> list[str]:
    return [IP, "netns", "exec", node, *argv] if node else list(argv)


def start(argv: list[str], env: dict[str, str], stdin: bytes, node: str | None) -> Running:
    """Start argv with env and stdin, with the host side in namespace ``node`` when given."""
    files = [tempfile.TemporaryFile() for _ in range(3)]
    files[0].write(stdin)
    files[0].seek(0)
    full = node_argv(node, argv)
    started = time.perf_counter()
    proc = subprocess.Popen(full, stdin=files[0], stdout=files[1], stderr=files[2], env=env, cwd="/")
    # Popen.kill() polls first, so it does nothing once the child has been reaped.
    watchdog = threading.Timer(TIMEOUT_S, proc.kill)
    watchdog.daemon = True
    watchdog.start()
    return Running(argv, proc, started, watchdog, files)


def run(argv: list[str], env: dict[str, str], stdin: bytes, node: str | None) -> Outcome:
    """Start argv and wait for it (a blocking wait4, so the figure has no polling slack)."""
    running = start(argv, env, stdin, node)
    _, status, usage = os.wait4(running.proc.pid, 0)
    return running.finished(status, usage)
