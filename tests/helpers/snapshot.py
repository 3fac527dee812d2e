"""A node's whole observable state in one comparable value, for "nothing changed / nothing left" checks.

``node_snapshot(ns, data_dirs)`` reads, inside a test namespace: links (kind,
master, MTU, MAC, alias, flags), addresses, routes of every table, qdiscs and
tc filters, the nftables ruleset (stateless: no counters), iptables and
ip6tables (nat, filter, mangle as `-S`), and every file under the given
directories (type, mode, a hash of the content). Volatile details (counters,
timers, LOWER_UP, DAD flags) are left out so two snapshots of an idle node
compare equal. ``state_diff`` says what differs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping


def _run(argv: list[str]) -> tuple[int, str, str]:
    # Names need not be UTF-8 (a plugin that lets "eth\xff" through makes one): never fail on them.
    out = subprocess.run(argv, capture_output=True, timeout=30)
    return out.returncode, out.stdout.decode(errors="replace"), out.stderr.decode(errors="replace")


def _json(argv: list[str]) -> Any:
    code, stdout, stderr = _run(argv)
    if code != 0:
        return {"error": stderr.strip()}
    return json.loads(stdout or "[]")


def _text(argv: list[str]) -> str:
    code, stdout, stderr = _run(argv)
    return stdout if code == 0 else f"error: {stderr.strip()}"


_CARRIER_FLAGS = ("LOWER_UP", "NO-CARRIER")  # follow the ports a bridge has: not a plugin's doing


def links(ns: str) -> list[tuple]:
    rows = []
    for link in _json(["ip", "-n", ns, "-d", "-j", "link", "show"]):
        info = link.get("linkinfo", {})
        rows.append(
            (
                link["ifname"],
                info.get("info_kind", ""),
                info.get("info_slave_kind", ""),
                link.get("master", ""),
                link.get("mtu"),
                link.get("address", ""),
                link.get("ifalias", ""),
                tuple(sorted(f for f in link.get("flags", []) if f not in _CARRIER_FLAGS)),
                link.get("txqlen"),
            )
        )
    return sorted(rows)


def addresses(ns: str) -> list[tuple]:
    rows = []
    for link in _json(["ip", "-n", ns, "-j", "addr", "show"]):
        for addr in link.get("addr_info", []):
            rows.append((link["ifname"], addr.get("family"), addr.get("local"), addr.get("prefixlen")))
    return sorted(rows)


def routes(ns: str, derived: bool = True) -> list[str]:
    """Routes of every table; derived=False leaves out the kernel's own (protocol kernel: they
    follow addresses and carrier, e.g. a bridge's IPv6 local routes come and go with its ports)."""
    rows = []
    for family in ("-4", "-6"):
        for route in _json(["ip", "-n", ns, family, "-j", "route", "show", "table", "all"]):
            if route.get("type") == "multicast" or (not derived and route.get("protocol") == "kernel"):
                continue
            rows.append(
                json.dumps(
                    {
                        k: route.get(k)
                        for k in ("type", "dst", "gateway", "dev", "table", "protocol", "scope", "prefsrc", "metric")
                    },
                    sort_keys=True,
                )
            )
    return sorted(rows)


def traffic_control(ns: str) -> list[str]:
    rows = []
    for q in _json(["ip", "netns", "exec", ns, "tc", "-j", "qdisc", "show"]):
        q.pop("refcnt", None)
        rows.append(json.dumps(q, sort_keys=True))
    for dev in [row[0] for row in links(ns)]:
        for parent in ("ffff:", "1:"):
            for flt in _json(["ip", "netns", "exec", ns, "tc", "-j", "filter", "show", "dev", dev, "parent", parent]):
                rows.append(json.dumps({"dev": dev, **flt}, sort_keys=True))
    return sorted(rows)


def files(dirs: Iterable[os.PathLike[str] | str], ignore: Iterable[str] = ()) -> dict[str, Any]:
    """path -> (kind, mode, content hash) for everything under dirs; names matching ``ignore`` left out."""
    patterns = list(ignore)
    out: dict[str, Any] = {}
    for base in dirs:
        for root, subdirs, names in os.walk(base):
            for name in sorted(subdirs + names):
                if any(fnmatch.fnmatch(name, p) for p in patterns):
                    continue
                path = os.path.join(root, name)
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode):
                    with open(path, "rb") as handle:
                        digest = hashlib.sha256(handle.read()).hexdigest()[:16]
                    out[path] = ("file", stat.S_IMODE(st.st_mode), digest)
                elif stat.S_ISLNK(st.st_mode):
                    out[path] = ("link", os.readlink(path))
                else:
                    out[path] = ("dir" if stat.S_ISDIR(st.st_mode) else "other", stat.S_IMODE(st.st_mode))
    return out


def node_snapshot(
    ns: str,
    data_dirs: Iterable[Path | str] = (),
    pods: Iterable[str] = (),
    ignore_files: Iterable[str] = (),
    derived_routes: bool = True,
) -> dict[str, Any]:
    state: dict[str, Any] = {
        "links": links(ns),
        "addresses": addresses(ns),
        "routes": routes(ns, derived_routes),
        "tc": traffic_control(ns),
        "nft": _text(["ip", "netns", "exec", ns, "nft", "-s", "list", "ruleset"]),
        "files": files(data_dirs, ignore_files),
    }
    for pod in pods:
        state[f"pod {pod} links"] = links(pod)
        state[f"pod {pod} addresses"] = addresses(pod)
    for tool in ("iptables", "ip6tables"):
        for table in ("nat", "filter", "mangle"):
            state[f"{tool}-{table}"] = _text(["ip", "netns", "exec", ns, tool, "-w", "-t", table, "-S"])
    return state


def state_diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """What differs between two snapshots, per part (empty when they are equal)."""
    lines = []
    for key in before:
        if before[key] == after.get(key):
            continue
        if isinstance(before[key], str):
            old, new = set(before[key].splitlines()), set(after[key].splitlines())
            lines.append(f"{key}: gone {sorted(old - new)[:8]} new {sorted(new - old)[:8]}")
        elif isinstance(before[key], dict):
            gone = sorted(set(before[key]) - set(after[key]))
            new = sorted(set(after[key]) - set(before[key]))
            changed = sorted(k for k in before[key] if k in after[key] and before[key][k] != after[key][k])
            lines.append(f"{key}: gone {gone[:8]} new {new[:8]} changed {changed[:8]}")
        else:
            old, new = set(map(str, before[key])), set(map(str, after[key]))
            lines.append(f"{key}: gone {sorted(old - new)[:8]} new {sorted(new - old)[:8]}")
    return "\n".join(lines)
