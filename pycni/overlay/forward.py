"""Forwarding for the cluster network on hosts whose forward policy drops (Docker hosts).

Docker sets ``iptables -P FORWARD DROP``; nftables.conf setups often carry a
``hook forward ... policy drop`` chain. Pod traffic between nodes is forwarded
traffic, so such a host drops it. An accept in a table of pycni's own does not
help: netfilter runs every base chain on the forward hook, and a packet passes
only if none of them drops it. So, as flannel does with its FLANNEL-FWD rules,
pycni puts owned, named accept rules for the cluster network into the chain
that drops, first (no earlier rule of the host's can drop pod traffic), keeps
them first while the agent runs and removes them on leave::

    iptables / ip6tables (whichever the host's `iptables` command is), filter table,
    only while FORWARD's policy is DROP; IPv4 networks in iptables, IPv6 in ip6tables:
        -P FORWARD DROP
        -A FORWARD -s 10.244.0.0/16 -m comment --comment "pycni-overlay: accept cluster network 10.244.0.0/16" -j ACCEPT
        -A FORWARD -d 10.244.0.0/16 -m comment --comment "pycni-overlay: accept cluster network 10.244.0.0/16" -j ACCEPT
        -A FORWARD -j DOCKER-USER                       # the host's rules, after ours
        ...

    nftables, every other base chain with hook forward and policy drop
    (families ip, ip6, inet; each gets the networks of its address families):
        table inet filter {
            chain forward {
                type filter hook forward priority filter; policy drop;
                ip saddr 10.244.0.0/16 accept comment "pycni-overlay: accept cluster network 10.244.0.0/16"
                ip daddr 10.244.0.0/16 accept comment "pycni-overlay: accept cluster network 10.244.0.0/16"
                ...                                     # the host's rules, after ours
            }
        }

The rules are ours by their comment: ``ensure_forward_accept`` makes the rules
carrying the comment prefix in every dropping chain exactly the wanted ones, in
order, at the top (one listing per backend when nothing changed; a repair
deletes ours and inserts them again in one transaction per backend), and
``remove_forward_accept`` deletes the rules for the given networks from every
chain. Chains that accept by policy are left alone. Not changed, only reported
by ``forward_drops``: chains of iptables-nft's tables other than filter FORWARD
(iptables' own territory), and bridge-family forward chains (bridged frames:
accepting IP there would still drop ARP, so that is the admin's to open).

iptables-nft's filter FORWARD shows up in the nft listing too; when the
``iptables`` command is the nf_tables variant, the iptables path handles it and
the nft path skips it (a table of iptables-nft's: family ip/ip6, an xtables
table name and built-in chain name, or xt expressions in its rules). With the
legacy variant, such a chain in nftables is an ordinary chain to the nft path.

Networks are parsed with ``ipaddress`` before anything is listed, and only
their canonical text reaches a ruleset; comments go through ``nft.comment`` and
iptables-restore quoting; table and chain names read back from nftables are
checked before they are written into a script. Missing tools are no error
(nothing of theirs can drop). Everything runs in the calling thread's network
namespace.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Union

from cni_plugins.kernel import iptables, nft

COMMENT_PREFIX = "pycni-overlay: accept cluster network "

_IPTABLES_TOOL = {4: "iptables", 6: "ip6tables"}
_IP_WORD = {4: "ip", 6: "ip6"}
_NFT_FAMILY_VERSIONS = {"ip": (4,), "ip6": (6,), "inet": (4, 6)}  # families whose forward chains we change
_NFT_XT_FAMILY = {"ip": 4, "ip6": 6}
_XT_TABLES = {"filter", "mangle", "raw", "security", "nat"}
_XT_CHAINS = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
# Table and chain names as nft's scanner reads them unquoted (letters, digits, '_', '-', '.').
_NFT_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,255}$")

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

log = logging.getLogger("pycni.overlay.forward")


def parse_networks(networks: Iterable[str]) -> list[IPNetwork]:
    """The cluster networks, parsed (strict), without duplicates, IPv4 first; ValueError on anything else."""
    if isinstance(networks, (str, bytes)):
        raise ValueError(f"give a list of networks, not the single string {networks!r}")
    parsed = set()
    for text in networks:
        if not isinstance(text, str):
            raise ValueError(f"invalid cluster network {text!r}: give it as a string like 10.244.0.0/16")
        try:
            parsed.add(ipaddress.ip_network(text, strict=True))
        except ValueError as err:
            raise ValueError(f"invalid cluster network {text!r}: {err}") from None
    return sorted(parsed, key=lambda net: (net.version, net))  # type: ignore[arg-type]


@dataclass(frozen=True)
class AcceptRule:
    """One of our rules: accept forwarded traffic from (saddr) or to (daddr) a cluster network."""

    network: IPNetwork
    direction: str  # "saddr" or "daddr"

    @property
    def comment(self) -> str:
        return COMMENT_PREFIX + str(self.network)

    def iptables_args(self) -> list[str]:
        """The rule as `iptables -S` lists it, after `-A FORWARD`."""
        flag = "-s" if self.direction == "saddr" else "-d"
        return [flag, str(self.network), "-m", "comment", "--comment", self.comment, "-j", "ACCEPT"]

    def nft_statement(self) -> str:
        return (
            f"{_IP_WORD[self.network.version]} {self.direction} {self.network} accept "
            f"comment {nft.comment(self.comment)}"
        )

    def nft_signature(self) -> tuple[str, str, str, IPNetwork]:
        return self.comment, _IP_WORD[self.network.version], self.direction, self.network


def accept_rules(networks: list[IPNetwork], versions: Iterable[int]) -> list[AcceptRule]:
    """Our rules for the networks of the given IP versions, in the order they go at the top of a chain."""
    wanted = set(versions)
    return [AcceptRule(net, direction) for net in networks if net.version in wanted for direction in ("saddr", "daddr")]


def ensure_forward_accept(networks: Iterable[str]) -> list[str]:
    """Put our accept rules first in every chain that drops forwarded traffic; what was done (empty: nothing)."""
    nets = parse_networks(networks)
    actions: list[str] = []
    sees: dict[int, bool] = {}
    for family in sorted({net.version for net in nets}):
        view = _list_iptables_forward(family)
        sees[family] = view is not None and view.shared_with_nft
        if view is None or view.policy != "DROP":
            continue
        wanted = [rule.iptables_args() for rule in accept_rules(nets, [family])]
        own = [rule for rule in view.rules if _iptables_comment(rule).startswith(COMMENT_PREFIX)]
        if view.rules[: len(wanted)] == wanted and len(own) == len(wanted):
            continue
        batch = ["*filter"]
        batch += [iptables.rule_line("-D", "FORWARD", rule) for rule in own]
        batch += [
            iptables.rule_line("-I", "FORWARD", [str(position), *args]) for position, args in enumerate(wanted, start=1)
        ]
        batch.append("COMMIT")
        iptables.restore(family, "\n".join(batch) + "\n")
        actions.append(
            f"{_IPTABLES_TOOL[family]} filter FORWARD (policy DROP): put the accept rules for "
            f"{_net_list(nets, family)} first" + (f" (removed {len(own)} of ours)" if own else "")
        )
    ruleset = _list_nft()
    if ruleset is not None:
        script: list[str] = []
        for chain in ruleset.chains:
            if not chain.drops_forward:
                continue
            reason = _skipped(chain, ruleset, sees)
            if reason is not None:
                log.debug("nft %s %s %s drops by policy; left alone: %s", chain.family, chain.table, chain.name, reason)
                continue
            versions = _NFT_FAMILY_VERSIONS[chain.family]
            wanted_rules = accept_rules(nets, versions)
            own = [rule for rule in chain.rules if _nft_is_own(rule)]
            first = [_nft_signature(rule) for rule in chain.rules[: len(wanted_rules)]]
            if first == [rule.nft_signature() for rule in wanted_rules] and len(own) == len(wanted_rules):
                continue
            where = f"{chain.family} {chain.table} {chain.name}"
            script += [f"delete rule {where} handle {_handle(rule)}" for rule in own]
            script += [f"insert rule {where} {rule.nft_statement()}" for rule in reversed(wanted_rules)]
            if wanted_rules:
                actions.append(
                    f"nft {where} (policy drop): put the accept rules for {_net_list(nets, *versions)} "
                    f"first" + (f" (removed {len(own)} of ours)" if own else "")
                )
            else:
                actions.append(
                    f"nft {where} (policy drop): removed {len(own)} accept rule(s) of ours for other networks"
                )
        if script:
            nft.apply("\n".join(script) + "\n")
    for action in actions:
        log.info("%s", action)
    return actions


def remove_forward_accept(networks: Iterable[str]) -> list[str]:
    """Delete our accept rules for the networks from every chain (idempotent); what was done."""
    nets = parse_networks(networks)
    comments = {rule.comment for rule in accept_rules(nets, (4, 6))}
    actions: list[str] = []
    sees: dict[int, bool] = {}
    for family in sorted({net.version for net in nets}):
        view = _list_iptables_forward(family)
        sees[family] = view is not None and view.shared_with_nft
        if view is None:
            continue
        doomed = [rule for rule in view.rules if _iptables_comment(rule) in comments]
        if doomed:
            batch = ["*filter", *(iptables.rule_line("-D", "FORWARD", rule) for rule in doomed), "COMMIT"]
            iptables.restore(family, "\n".join(batch) + "\n")
            actions.append(
                f"{_IPTABLES_TOOL[family]} filter FORWARD: removed {len(doomed)} accept rule(s) "
                f"for {_net_list(nets, family)}"
            )
    ruleset = _list_nft()
    if ruleset is not None:
        script: list[str] = []
        for chain in ruleset.chains:
            doomed_rules = [rule for rule in chain.rules if rule.get("comment") in comments]
            if not doomed_rules or not chain.writable or _is_xtables(chain, ruleset, sees):
                continue
            where = f"{chain.family} {chain.table} {chain.name}"
            script += [f"delete rule {where} handle {_handle(rule)}" for rule in doomed_rules]
            actions.append(f"nft {where}: removed {len(doomed_rules)} accept rule(s)")
        if script:
            nft.apply("\n".join(script) + "\n")
    for action in actions:
        log.info("%s", action)
    return actions


def forward_drops() -> list[str]:
    """The chains that drop forwarded traffic by policy, described (for status and diagnosis)."""
    found: list[str] = []
    sees: dict[int, bool] = {}
    for family in (4, 6):
        try:
            view = _list_iptables_forward(family)
        except iptables.IptablesError as err:
            log.warning("cannot list %s FORWARD: %s %s", _IPTABLES_TOOL[family], err.msg, err.details)
            continue
        sees[family] = view is not None and view.shared_with_nft
        if view is not None and view.policy == "DROP":
            found.append(f"{_IPTABLES_TOOL[family]}: filter FORWARD, policy DROP")
    ruleset = _list_nft()
    for chain in ruleset.chains if ruleset is not None else []:
        if chain.hook != "forward" or chain.policy != "drop":
            continue
        if sees.get(_NFT_XT_FAMILY.get(chain.family, 0)) and chain.table == "filter" and chain.name == "FORWARD":
            continue  # the iptables listing above already showed it
        description = f"nft: {chain.family} {chain.table} {chain.name}, policy drop"
        reason = _skipped(chain, ruleset, sees) if ruleset is not None else None
        found.append(f"{description} ({reason})" if reason else description)
    return found


# ---- iptables ----------------------------------------------------------------------------


@dataclass
class _IptablesForward:
    policy: str | None
    rules: list[list[str]]
    shared_with_nft: bool  # the nf_tables variant: its tables show up in the nft listing too


def _list_iptables_forward(family: int) -> _IptablesForward | None:
    """filter FORWARD's policy and rules; None when the command is missing or cannot read the table."""
    try:
        text = iptables.run(family, ["-t", "filter", "-S", "FORWARD"])
    except iptables.IptablesError as err:
        if err.missing:
            log.debug("%s is not installed: nothing of its can drop forwarded traffic", _IPTABLES_TOOL[family])
            return None
        if "incompatible" in err.details:
            # A table iptables-nft cannot read (made by nft by hand): the nft path looks after it.
            log.debug("%s cannot read the filter table (%s); leaving it to nft", _IPTABLES_TOOL[family], err.details)
            return None
        raise
    policy = None
    for line in text.splitlines():
        words = line.split()
        if len(words) == 3 and words[:2] == ["-P", "FORWARD"]:
            policy = words[2]
    return _IptablesForward(
        policy=policy,
        rules=iptables.parse_listing(text).rules_of("FORWARD"),
        shared_with_nft=_iptables_variant(family) == "nf_tables",
    )


@functools.lru_cache(maxsize=None)
def _iptables_variant(family: int) -> str | None:
    """ "nf_tables" or "legacy" for the host's iptables (ip6tables) command; None if it cannot say."""
    try:
        out = iptables.run(family, ["-V"])
    except iptables.IptablesError:
        return None
    return "nf_tables" if "nf_tables" in out else "legacy" if "legacy" in out else None


def _iptables_comment(rule: list[str]) -> str:
    for i, word in enumerate(rule[:-1]):
        if word == "--comment":
            return rule[i + 1]
    return ""


# ---- nftables ----------------------------------------------------------------------------


@dataclass
class _NftChain:
    family: str
    table: str
    name: str
    hook: str | None
    policy: str | None
    rules: list[dict[str, Any]] = field(default_factory=list)  # in chain order

    @property
    def drops_forward(self) -> bool:
        return self.hook == "forward" and self.policy == "drop"

    @property
    def writable(self) -> bool:
        """Our scripts can name this chain: a family we change, and names nft reads back unquoted."""
        return (
            self.family in _NFT_FAMILY_VERSIONS
            and bool(_NFT_NAME_RE.match(self.table))
            and bool(_NFT_NAME_RE.match(self.name))
        )


@dataclass
class _NftRuleset:
    chains: list[_NftChain]
    xt_tables: set[tuple[str, str]]  # (family, table) holding rules with xt expressions (iptables-nft's)


def _list_nft() -> _NftRuleset | None:
    """The ruleset's chains with their rules; None when nft is not installed."""
    try:
        objects = nft.list_json("ruleset") or []
    except nft.NftError as err:
        if err.missing:
            log.debug("nft is not installed: no nftables chain can drop forwarded traffic")
            return None
        raise
    chains: dict[tuple[str, str, str], _NftChain] = {}
    xt_tables: set[tuple[str, str]] = set()
    for obj in objects:
        if not isinstance(obj, dict):
            continue
        if isinstance(obj.get("chain"), dict):
            c = obj["chain"]
            key = (str(c.get("family")), str(c.get("table")), str(c.get("name")))
            chains[key] = _NftChain(*key, hook=c.get("hook"), policy=c.get("policy"))
        elif isinstance(obj.get("rule"), dict):
            r = obj["rule"]
            key = (str(r.get("family")), str(r.get("table")), str(r.get("chain")))
            if key in chains:
                chains[key].rules.append(r)
            if any(isinstance(e, dict) and "xt" in e for e in r.get("expr") or []):
                xt_tables.add(key[:2])
    return _NftRuleset(chains=list(chains.values()), xt_tables=xt_tables)


def _is_xtables(chain: _NftChain, ruleset: _NftRuleset, sees: dict[int, bool]) -> bool:
    """A chain of iptables-nft's that the host's iptables command reads (iptables' territory).

    sees: for each family listed through iptables in this call, whether that
    listing reads the same tables as nft (the nf_tables variant, table readable).
    """
    version = _NFT_XT_FAMILY.get(chain.family)
    if version is None:
        return False
    looks_xt = (chain.table in _XT_TABLES and chain.name in _XT_CHAINS) or (
        chain.family,
        chain.table,
    ) in ruleset.xt_tables
    if not looks_xt:
        return False
    if version in sees:
        return sees[version]
    return _iptables_variant(version) == "nf_tables"


def _skipped(chain: _NftChain, ruleset: _NftRuleset, sees: dict[int, bool]) -> str | None:
    """Why ensure leaves this dropping chain alone, or None if it puts our rules there."""
    if chain.family == "bridge":
        return "bridged traffic: pycni adds no rules here"
    if chain.family not in _NFT_FAMILY_VERSIONS:
        return f"family {chain.family}: pycni adds no rules here"
    if _is_xtables(chain, ruleset, sees):
        if chain.table == "filter" and chain.name == "FORWARD":
            return "iptables-nft's: handled through iptables"
        return f"iptables-nft's {chain.table} table: pycni adds no rules here"
    if not chain.writable:
        return "its name cannot be written into an nft script safely: pycni adds no rules here"
    return None


def _nft_is_own(rule: dict[str, Any]) -> bool:
    note = rule.get("comment")
    return isinstance(note, str) and note.startswith(COMMENT_PREFIX)


def _nft_signature(rule: dict[str, Any]) -> tuple[str, str, str, IPNetwork] | None:
    """(comment, ip/ip6, saddr/daddr, network) of a rule shaped like ours; None for any other rule."""
    expr = rule.get("expr")
    if not _nft_is_own(rule) or not isinstance(expr, list) or len(expr) != 2 or expr[1] != {"accept": None}:
        return None
    match = expr[0].get("match") if isinstance(expr[0], dict) else None
    if not isinstance(match, dict) or match.get("op") != "==":
        return None
    payload = (match.get("left") or {}).get("payload") if isinstance(match.get("left"), dict) else None
    if (
        not isinstance(payload, dict)
        or payload.get("protocol") not in ("ip", "ip6")
        or payload.get("field") not in ("saddr", "daddr")
    ):
        return None
    right = match.get("right")
    try:
        if isinstance(right, dict) and isinstance(right.get("prefix"), dict):
            network = ipaddress.ip_network(f"{right['prefix']['addr']}/{int(right['prefix']['len'])}", strict=True)
        elif isinstance(right, str):
            network = ipaddress.ip_network(right, strict=True)
        else:
            return None
    except (KeyError, TypeError, ValueError):
        return None
    return rule["comment"], payload["protocol"], payload["field"], network


def _handle(rule: dict[str, Any]) -> int:
    handle = rule.get("handle")
    if isinstance(handle, bool) or not isinstance(handle, int) or handle <= 0:
        raise nft.NftError(f"nft listed a rule without a valid handle: {str(rule)[:200]}")
    return handle


def _net_list(nets: list[IPNetwork], *versions: int) -> str:
    return ", ".join(str(net) for net in nets if net.version in versions)
