"""Processes: run commands, start long-lived ones, and stop them strictly by PID.

A runtime starts processes of its own (containerd's shims, podman's conmon,
the containers). The suites find them by what the test owns: the host's mount
namespace (every process a runtime starts inside the host shares it) and the
cgroup parent the test gives its containers. Both are ours alone, so killing
their members by PID touches nothing else on the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

CGROUP_ROOT = Path("/sys/fs/cgroup")


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command (text in and out, both streams captured); raise with its output on failure."""
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        env=None if env is None else dict(env),
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed (exit {proc.returncode}): {' '.join(argv)}\n"
            f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
        )
    return proc


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_pid(pid: int, *, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Send sig to pid, wait up to timeout for it to go, then SIGKILL it (bounded)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def stop_popen(proc: subprocess.Popen | None, *, timeout: float = 10.0) -> None:
    """Stop a child we started (SIGTERM, then SIGKILL) and reap it."""
    if proc is None or proc.poll() is not None:
        return
    stop_pid(proc.pid, timeout=timeout)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _ns_inode(pid: int | str, kind: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def pids_in_mount_ns(anchor_pid: int) -> list[int]:
    """Every live process sharing anchor_pid's mount namespace (anchor_pid left out)."""
    target = _ns_inode(anchor_pid, "mnt")
    if target is None or target == _ns_inode("self", "mnt"):
        return []  # never the caller's own (the machine's) mount namespace
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != anchor_pid and _ns_inode(entry, "mnt") == target:
            found.append(int(entry))
    return found


def cgroup_dirs(parent: str) -> list[Path]:
    """parent (e.g. "/pycni-e2e-ab12cd") in every mounted v1 hierarchy and the v2 one, deepest first."""
    name = parent.strip("/")
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"not a test cgroup parent: {parent!r}")
    dirs: list[Path] = []
    if not CGROUP_ROOT.is_dir():
        return dirs
    for hierarchy in CGROUP_ROOT.iterdir():
        top = hierarchy / name
        if top.is_dir():
            dirs.extend(sorted((Path(d) for d, _, _ in os.walk(top)), key=lambda p: -len(p.parts)))
    return dirs


def pids_in_cgroup(parent: str) -> list[int]:
    pids: set[int] = set()
    for directory in cgroup_dirs(parent):
        try:
            pids.update(int(line) for line in (directory / "cgroup.procs").read_text().split())
        except OSError:
            continue
    return sorted(pids)


def kill_all(pids: Iterable[int]) -> None:
    """SIGKILL each pid and wait (bounded) until they are gone."""
    pids = [p for p in pids if p != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def remove_cgroup(parent: str) -> list[str]:
    """Kill what is left in the test's cgroup parent and remove its directories; what could not go."""
    for _ in range(3):
        pids = pids_in_cgroup(parent)
        if not pids:
            break
        kill_all(pids)
    failed = []
    for directory in cgroup_dirs(parent):
        for _attempt in range(20):
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)
        else:
            failed.append(str(directory))
    return failed
