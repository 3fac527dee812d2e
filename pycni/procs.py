"""Stopping a process this program started, by its PID: SIGTERM, a bounded wait, then SIGKILL.

Agents, echo services, etcd members and runtimes that pycni's demo,
conformance run, benchmarks and tests start are stopped this way, never by
name.
"""

from __future__ import annotations

import os
import signal
import subprocess


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
