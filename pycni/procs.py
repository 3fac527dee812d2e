"""Stopping a process this program started, by its PID: SIGTERM, a bounded wait, then SIGKILL.

Agents, echo services, etcd members and runtimes that pycni's demo,
conformance run, benchmarks and tests start are stopped this way, never by
name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Callable


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> bool:
    """Stop ``proc`` (idempotent); True when it ignored SIGTERM for ``timeout`` s and was killed."""
    if proc.poll() is not None:
        return False
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout)
        return False
    except subprocess.TimeoutExpired:
        pass
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)
    return True


def stop_pid(pid: int, alive: Callable[[int], bool], timeout: float = 2.0) -> bool:
    """Stop a process that is not our child (so it cannot be waited for) by PID: SIGTERM, then up to
    ``timeout`` s until ``alive(pid)`` is false (``alive`` also makes sure the PID is still the process meant),
    then SIGKILL. True when it had to be killed."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not alive(pid):
            return sig is signal.SIGKILL
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    return True
