"""Running iptables/ip6tables: listing a table, and batches through iptables-restore.

Changes go through ``restore``: one `iptables-restore --noflush` batch is
committed as a whole (all of it or none of it), so a failure half-way leaves
no stray rules. Listings come from `-S` and are parsed with shell rules, which
is how iptables quotes them. Every command passes `-w` so it waits for the
xtables lock instead of failing while another program holds it; the process
itself is bounded by a timeout.

Everything runs in the calling thread's network namespace.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from cni_plugins.kernel import hostcmd
from cni_plugins.spec.errors import ERR_INTERNAL, CNIError

TIMEOUT_SECONDS = 30
_BINARIES = {4: ("iptables", "iptables-restore"), 6: ("ip6tables", "ip6tables-restore")}


class IptablesError(CNIError):
    def __init__(self, msg: str, details: str = "", missing: bool = False, timed_out: bool = False) -> None:
        super().__init__(ERR_INTERNAL, msg, details)
        self.missing = missing  # the command itself is not installed
        self.timed_out = timed_out


def _run(argv: list[str], stdin: str | None = None) -> str:
    try:
        return hostcmd.run(argv, stdin, TIMEOUT_SECONDS, alternative="or choose the nftables backend")
    except hostcmd.HostToolError as err:
        details = err.details
        if stdin and err.returncode is not None:
            details += "\nbatch was:\n" + stdin
        raise IptablesError(err.msg, details, missing=err.missing, timed_out=err.timed_out) from None


def run(family: int, args: list[str]) -> str:
    """Run `iptables -w ARGS` (ip6tables for family 6) and return its stdout."""
    return _run([_BINARIES[family][0], "-w", *args])


def restore(family: int, batch: str) -> None:
    """Apply an iptables-restore batch (with its *table and COMMIT lines) without flushing tables."""
    _run([_BINARIES[family][1], "-w", "--noflush"], stdin=batch)


@dataclass
class TableListing:
    """A table as `iptables -S` shows it: user chains, and each chain's rules as argument lists."""

    chains: set[str] = field(default_factory=set)
    rules: dict[str, list[list[str]]] = field(default_factory=dict)

    def rules_of(self, chain: str) -> list[list[str]]:
        return self.rules.get(chain, [])


def parse_listing(text: str) -> TableListing:
    """Parse `iptables -S` output; a rule keeps its arguments after `-A CHAIN`."""
    listing = TableListing()
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) >= 2 and words[0] == "-N":
            listing.chains.add(words[1])
        elif len(words) >= 2 and words[0] == "-A":
            listing.rules.setdefault(words[1], []).append(words[2:])
    return listing


def list_table(family: int, table: str) -> TableListing:
    return parse_listing(run(family, ["-t", table, "-S"]))


def quote(word: str) -> str:
    """Quote one argument for an iptables-restore line (it splits on spaces and knows double quotes)."""
    if word and all(c.isalnum() or c in "-_./:!=" for c in word):
        return word
    if any(c in "\n\r\\" for c in word):
        raise IptablesError(
            f"refusing to put {word!r} into an iptables-restore batch",
            "newlines and backslashes cannot be quoted safely",
        )
    return '"' + word.replace('"', '\\"') + '"'


def rule_line(op: str, chain: str, args: list[str]) -> str:
    """One batch line, e.g. rule_line("-A", "POSTROUTING", ["-s", "10.0.0.1", "-j", "X"])."""
    return " ".join([op, quote(chain), *(quote(a) for a in args)])
