"""Running the host tools the plugins drive (nft, iptables, conntrack): one runner.

A tool runs in the calling thread's network namespace (a child process
inherits the namespace of the thread that starts it), with a timeout, and its
failure becomes a ``HostToolError`` that says which tool, how it failed and
what to install when it is missing.

Where the tool comes from (``find_tool``): the absolute directories of the
inherited PATH, in order; a relative entry ("", ".", "bin") would make the
working directory decide what runs as root, so it is skipped. A runtime may
start plugins with an empty or no PATH at all; then (and whenever PATH does not
have the tool) the fixed SAFE_DIRS are searched, each used only if it is owned
by root and not writable by group or others, for a root-owned executable that
group and others cannot write either. The child keeps the tool's own name as
argv[0] (multi-call binaries such as xtables-nft-multi dispatch on it).
"""

from __future__ import annotations

import os
import stat
import subprocess
from typing import Mapping

from cni_plugins.spec.errors import ERR_INTERNAL, CNIError

DEFAULT_TIMEOUT = 30.0
# Debian package that provides each tool, for the "not found" advice.
PACKAGES: Mapping[str, str] = {
    "nft": "nftables",
    "iptables": "iptables",
    "ip6tables": "iptables",
    "iptables-restore": "iptables",
    "ip6tables-restore": "iptables",
    "iptables-save": "iptables",
    "conntrack": "conntrack",
}


# Searched when the inherited PATH does not have the tool (an empty or unset PATH included).
SAFE_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin", "/usr/local/bin")


def _root_only(path: str) -> bool:
    """path (followed through links: /sbin -> usr/sbin) is root's and not writable by group or others."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    return info.st_uid == 0 and not info.st_mode & 0o022


def _executable(path: str) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and os.access(path, os.X_OK)


def find_tool(name: str, path: str | None = None) -> str | None:
    """The file to execute for the tool ``name``; None if neither PATH nor SAFE_DIRS has it.

    ``path`` defaults to this process's PATH. A name with a slash is the caller's own choice and
    returned as it is.
    """
    if "/" in name:
        return name
    entries = os.environ.get("PATH", "") if path is None else path
    for directory in entries.split(os.pathsep):
        if not os.path.isabs(directory):
            continue  # "", ".", "bin": the working directory would choose what runs
        candidate = os.path.join(directory, name)
        if _executable(candidate):
            return candidate
    for directory in SAFE_DIRS:
        candidate = os.path.join(directory, name)
        if _root_only(directory) and _executable(candidate) and _root_only(candidate):
            return candidate
    return None


class HostToolError(CNIError):
    """A host tool failed: ``missing`` (not installed), ``timed_out``, or a non-zero ``returncode``."""

    def __init__(
        self,
        msg: str,
        details: str = "",
        *,
        missing: bool = False,
        timed_out: bool = False,
        returncode: int | None = None,
        stderr: str = "",
    ) -> None:
        super().__init__(ERR_INTERNAL, msg, details)
        self.missing = missing
        self.timed_out = timed_out
        self.returncode = returncode
        self.stderr = stderr


def run(argv: list[str], stdin: str | None = None, timeout: float = DEFAULT_TIMEOUT, alternative: str = "") -> str:
    """Run ``argv`` and return its stdout; raise HostToolError unless it exits 0.

    ``alternative`` completes the advice when the tool is missing (e.g. "or
    choose the iptables backend").
    """
    tool = argv[0]
    executable = find_tool(tool)
    try:
        if executable is None:
            raise FileNotFoundError(tool)
        proc = subprocess.run(
            argv, executable=executable, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        package = PACKAGES.get(tool, tool)
        advice = f"install {package} (Debian: apt-get install {package})"
        raise HostToolError(
            f"the {tool} command was not found (looked on PATH and in {', '.join(SAFE_DIRS)})",
            f"{advice} {alternative}".strip(),
            missing=True,
        ) from None
    except subprocess.TimeoutExpired:
        raise HostToolError(
            f"{' '.join(argv)} did not finish within {timeout:g}s",
            "another program may hold its lock; try again",
            timed_out=True,
        ) from None
    if proc.returncode != 0:
        stderr = proc.stderr.strip()
        raise HostToolError(
            f"{' '.join(argv)} failed (exit {proc.returncode})", stderr, returncode=proc.returncode, stderr=stderr
        )
    return proc.stdout
