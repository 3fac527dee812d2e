"""A snapshot of the machine's root network namespace, taken read-only, to prove a suite left it unchanged."""
from __future__ import annotations

import re
import shutil
import subprocess

_COMMANDS = {
    "links": ["ip", "-o", "link", "show"],
    "addresses": ["ip", "-o", "addr", "show"],
    "routes4": ["ip", "-4", "route", "show", "table", "all"],
    "routes6": ["ip", "-6", "route", "show", "table", "all"],
    "rules4": ["ip", "-4", "rule", "show"],
    "rules6": ["ip", "-6", "rule", "show"],
    "qdiscs": ["tc", "qdisc", "show"],
    "nftables": ["nft", "-s", "list", "ruleset"],
    "sysctl": ["sysctl", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding",
               "net.ipv4.conf.all.route_localnet", "net.bridge.bridge-nf-call-iptables"],
}
# Counting, ageing or per-boot values that change without anyone changing the namespace.
_VOLATILE = [re.compile(p) for p in (r"valid_lft \S+ preferred_lft \S+", r"expires \S+", r"\bage \S+")]


def snapshot() -> dict[str, str]:
    state = {}
    for name, argv in _COMMANDS.items():
        if shutil.which(argv[0]) is None:
            continue
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        text = proc.stdout + (f"[exit {proc.returncode}]" if proc.returncode and name != "sysctl" else "")
        for pattern in _VOLATILE:
            text = pattern.sub("", text)
        # sysctl prints a line per key it knows; a missing key (no br_netfilter) goes to stderr
        state[name] = text
    return state


def differences(before: dict[str, str], after: dict[str, str]) -> list[str]:
    out = []
    for name in sorted(set(before) | set(after)):
        if before.get(name) != after.get(name):
            old = set(before.get(name, "").splitlines())
            new = set(after.get(name, "").splitlines())
            out.append(f"{name}: gone {sorted(old - new)} new {sorted(new - old)}")
    return out
