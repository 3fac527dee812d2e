"""The plugin directories the suites run against: the reference Go plugins and pycni's.

``reference_dir()`` is Debian's /usr/lib/cni. ``install_pycni(dir)`` runs
``pycni install --cni-bin-dir DIR --no-agent`` (the cold path: what a user
gets without the agent) and adds, as symlinks, any reference plugin the suites
need that pycni does not provide, listing them so the report can say so.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import procs

REFERENCE_DIR = Path("/usr/lib/cni")
NEEDED = ("loopback", "host-local", "bridge", "portmap", "bandwidth")
KINDS = ("reference", "pycni")


def pycni_command() -> str:
    return os.path.join(os.path.dirname(sys.executable), "pycni")


def reference_dir() -> Path:
    return REFERENCE_DIR


def reference_missing() -> str | None:
    absent = [p for p in NEEDED if not os.access(REFERENCE_DIR / p, os.X_OK)]
    return (
        f"reference plugins missing from {REFERENCE_DIR}: {', '.join(absent)} "
        "(Debian package containernetworking-plugins)"
        if absent
        else None
    )


def install_pycni(
    target: str | os.PathLike[str], agent_socket: str | None = None, native: bool = False
) -> tuple[Path, list[str]]:
    """pycni's plugins in target (cold, or shims for agent_socket: compiled ones with native);
    (target, the reference plugins borrowed because pycni lacks them)."""
    target = Path(target)
    agent = ["--agent-socket", agent_socket] if agent_socket else ["--no-agent"]
    procs.run(
        [pycni_command(), "install", "--cni-bin-dir", str(target), *agent, *(["--native-shim"] if native else [])],
        timeout=120,
    )
    borrowed = []
    for plugin in NEEDED:
        if not (target / plugin).exists():
            (target / plugin).symlink_to(REFERENCE_DIR / plugin)
            borrowed.append(plugin)
    return target, borrowed
