"""Running the host tools the plugins drive (nft, iptables, conntrack): one runner.

A tool runs in the calling thread's network namespace (a child process
inherits the namespace of the thread that starts it), with a timeout, and its
failure becomes a ``HostToolError`` that says which tool, how it failed and
what to install when it is missing.
"""
from __future__ import annotations

import subprocess
from typing import Mapping

from cni_plugins.spec.errors import ERR_INTERNAL, CNIError

DEFAULT_TIMEOUT = 30.0
# Debian package that provides each tool, for the "not found" advice.
PACKAGES: Mapping[str, str] = {
    "nft": "nftables", "iptables": "iptables", "ip6tables": "iptables", "iptables-restore": "iptables",
    "ip6tables-restore": "iptables", "iptables-save": "iptables", "conntrack": "conntrack",
}


class HostToolError(CNIError):
    """A host tool failed: ``missing`` (not installed), ``timed_out``, or a non-zero ``returncode``."""

    def __init__(self, msg: str, details: str = "", *, missing: bool = False, timed_out: bool = False,
                 returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(ERR_INTERNAL, msg, details)
        self.missing = missing
        self.timed_out = timed_out
        self.returncode = returncode
        self.stderr = stderr


def run(argv: list[str], stdin: str | None = None, timeout: float = DEFAULT_TIMEOUT,
        alternative: str = "") -> str:
    """Run ``argv`` and return its stdout; raise HostToolError unless it exits 0.

    ``alternative`` completes the advice when the tool is missing (e.g. "or
    choose the iptables backend").
    """
    tool = argv[0]
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        package = PACKAGES.get(tool, tool)
        advice = f"install {package} (Debian: apt-get install {package})"
        raise HostToolError(f"the {tool} command was not found",
                            f"{advice} {alternative}".strip(), missing=True) from None
    except subprocess.TimeoutExpired:
        raise HostToolError(f"{' '.join(argv)} did not finish within {timeout:g}s",
                            "another program may hold its lock; try again", timed_out=True) from None
    if proc.returncode != 0:
        stderr = proc.stderr.strip()
        raise HostToolError(f"{' '.join(argv)} failed (exit {proc.returncode})", stderr,
                            returncode=proc.returncode, stderr=stderr)
    return proc.stdout
