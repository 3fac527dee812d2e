"""Reading a node's network state with the iproute2, nftables and tc tools' JSON output.

Every reader runs its tool in the calling thread's network namespace (a child
process inherits the namespace of the thread that starts it) and only reads.
A tool that is missing or fails yields an empty answer and a note in
``ReadErrors`` rather than an exception: a picture with one part missing is
more useful than none, and the note says what is missing.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from typing import Any

TIMEOUT = 15.0


@dataclass
class ReadErrors:
    """What could not be read, one line each (shown at the end of the text output)."""

    notes: list[str] = field(default_factory=list)

    def add(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)


def run_json(argv: list[str], errors: ReadErrors | None = None, default: Any = None) -> Any:
    """``argv``'s stdout parsed as JSON; ``default`` (or []) when the tool fails or prints nothing."""
    fallback = [] if default is None else default
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except FileNotFoundError:
        if errors is not None:
            errors.add(f"{argv[0]} is not installed")
        return fallback
    except OSError as exc:
        if errors is not None:
            errors.add(f"cannot run {argv[0]}: {exc.strerror}")
        return fallback
    except subprocess.TimeoutExpired:
        if errors is not None:
            errors.add(f"{' '.join(argv)} timed out")
        return fallback
    if proc.returncode != 0:
        if errors is not None:
            errors.add(f"{' '.join(argv)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
        return fallback
    text = proc.stdout.strip()
    if not text:
        return fallback
    try:
        return json.loads(text)
    except ValueError:
        if errors is not None:
            errors.add(f"{' '.join(argv)} printed no JSON")
        return fallback


def ip_json(*args: str, errors: ReadErrors | None = None) -> list[dict[str, Any]]:
    """`ip -j ARGS`."""
    return run_json(["ip", "-j", *args], errors)


def links(errors: ReadErrors | None = None) -> list[dict[str, Any]]:
    """Every link with details (`ip -j -d link show`): linkinfo holds kind, vxlan and bridge-port data."""
    return ip_json("-d", "link", "show", errors=errors)


def addresses(errors: ReadErrors | None = None) -> dict[str, list[str]]:
    """Interface name -> its addresses as CIDR strings (link-local IPv6 left out)."""
    out: dict[str, list[str]] = {}
    for entry in ip_json("addr", "show", errors=errors):
        for addr in entry.get("addr_info", []):
            if addr.get("scope") == "link" and addr.get("family") == "inet6":
                continue
            out.setdefault(entry["ifname"], []).append(f"{addr['local']}/{addr['prefixlen']}")
    return out


def routes(errors: ReadErrors | None = None, *args: str, version: int = 4) -> list[dict[str, Any]]:
    """Routes of IP ``version`` (4 or 6) in the main table (`ip -j -4 route show ARGS`, `-6`)."""
    return ip_json(f"-{version}", "route", "show", *args, errors=errors)


def fdb(device: str, errors: ReadErrors | None = None) -> list[dict[str, Any]]:
    """The forwarding entries of a device (`bridge -j fdb show dev DEVICE`): mac, dst, state."""
    return run_json(["bridge", "-j", "fdb", "show", "dev", device], errors)


def neighbours(device: str, errors: ReadErrors | None = None) -> list[dict[str, Any]]:
    """`ip -j neigh show dev DEVICE`: dst, lladdr, state."""
    return ip_json("neigh", "show", "dev", device, errors=errors)


def netns_ids(errors: ReadErrors | None = None) -> dict[int, str]:
    """nsid -> namespace name, for the namespaces pinned under /run/netns that hold this one's peers."""
    return {
        int(entry["nsid"]): entry.get("name", "")
        for entry in ip_json("netns", "list-id", errors=errors)
        if "nsid" in entry
    }


def qdiscs(errors: ReadErrors | None = None) -> list[dict[str, Any]]:
    """`tc -j qdisc show`."""
    return run_json(["tc", "-j", "qdisc", "show"], errors)


def ingress_redirects(device: str, errors: ReadErrors | None = None) -> list[str]:
    """Devices that DEVICE's ingress filters redirect to (the bandwidth plugin's ifb)."""
    targets = []
    for flt in run_json(["tc", "-j", "filter", "show", "dev", device, "ingress"], errors):
        for action in (flt.get("options") or {}).get("actions", []):
            if action.get("kind") == "mirred" and action.get("to_dev"):
                targets.append(action["to_dev"])
    return targets


def nft_ruleset(errors: ReadErrors | None = None) -> list[dict[str, Any]]:
    """`nft -j list ruleset` as its objects (metainfo left out)."""
    data = run_json(["nft", "-j", "list", "ruleset"], errors, default={})
    if not isinstance(data, dict):
        return []
    return [obj for obj in data.get("nftables", []) if "metainfo" not in obj]
