"""portmap's configuration: the options, the port mappings, and the container addresses they forward to.

The plugin, its host side and both backends read these types; this module
imports none of them. It is also all that portmap's most common call needs
(an ADD for a pod without host ports passes prevResult through), so it stays
free of the backends, host tools and hashing.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from cni_plugins.spec.decode import COMMON, ListOf, Schema
from cni_plugins.spec.errors import ERR_INVALID_CONFIG, ERR_UNSUPPORTED_FIELD, CNIError

if TYPE_CHECKING:  # only ADD and CHECK, which read prevResult, load the result types
    from cni_plugins.spec.types import Result

NFTABLES = "nftables"
IPTABLES = "iptables"
DEFAULT_MARK_BIT = 13  # Kubernetes uses 14 and 15, Calico 20-31
PROTOCOLS = ("tcp", "udp", "sctp")

# Characters that would end or comment out an nft command, or that no condition needs.
_NFT_FORBIDDEN = re.compile(r"[;#\n\r\x00-\x1f\x7f]")
# Conditions are match expressions. These words only begin statements (verdicts, NAT,
# logging, counting, rate limits, setting a field with "set", set/map updates...), never a
# match: a condition holding one, outside a quoted string, is refused.
_NFT_STATEMENT_WORDS = frozenset(
    {
        "accept",
        "drop",
        "reject",
        "jump",
        "goto",
        "return",
        "queue",
        "continue",
        "vmap",
        "dnat",
        "snat",
        "masquerade",
        "redirect",
        "tproxy",
        "fwd",
        "dup",
        "log",
        "counter",
        "limit",
        "quota",
        "notrack",
        "meter",
        "synproxy",
        "flow",
        "flowtable",
        "set",
        "add",
        "update",
        "delete",
        "reset",
        "destroy",
        "last",
        "xt",
        "count",
    }
)
_NFT_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_NFT_QUOTED = re.compile(r'"[^"]*"')
# iptables options that are not matches: targets (in any spelling getopt accepts: "--jump=X",
# "-jX", an unambiguous prefix like "--ju"), tables and commands, and global switches.
_IPT_SHORT_FORBIDDEN = set("jgtAIDRNXFZPELSCVhwc")
_IPT_SHORT_NO_ARGUMENT = set("f46vnx")  # "-fjACCEPT" is "-f -j ACCEPT" to getopt
_IPT_LONG_FORBIDDEN = (
    "--jump",
    "--goto",
    "--table",
    "--append",
    "--insert",
    "--delete",
    "--replace",
    "--new-chain",
    "--delete-chain",
    "--flush",
    "--zero",
    "--policy",
    "--rename-chain",
    "--list",
    "--list-rules",
    "--check",
    "--help",
    "--version",
    "--wait",
    "--wait-interval",
    "--modprobe",
    "--set-counters",
    "--line-numbers",
    "--exact",
    "--numeric",
    "--verbose",
    "--set",
)  # "--set": xt_recent's, which writes state
# Match modules that keep or change state (rate limits, quotas, recent lists, accounting).
_IPT_STATEFUL_MATCHES = {
    "limit",
    "hashlimit",
    "recent",
    "quota",
    "quota2",
    "connlimit",
    "nfacct",
    "statistic",
    "connbytes",
    "condition",
}
_CHAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,27}$")

ContainerAddress = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class PortMapping:
    host_port: int
    container_port: int
    protocol: str
    host_ip: str = ""  # "" means every local address

    def applies_to(self, family: int) -> bool:
        """A mapping with a hostIP only forwards to the container address of its family."""
        return not self.host_ip or ipaddress.ip_address(self.host_ip).version == family

    def wildcard(self) -> bool:
        return not self.host_ip or ipaddress.ip_address(self.host_ip).is_unspecified


PORT_MAPPING = Schema({"hostPort": int, "containerPort": int, "protocol": str, "hostIP": str})
# Every option the reference portmap reads, with its JSON type (decoded by the skeleton: any
# letter case, as containerd and CRI-O send capability arguments; null = absent; wrong type = 7).
SCHEMA = COMMON.extend(
    snat=bool,
    masqAll=bool,
    markMasqBit=int,
    externalSetMarkChain=str,
    backend=str,
    conditionsV4=ListOf(str),
    conditionsV6=ListOf(str),
    runtimeConfig=Schema({"portMappings": ListOf(PORT_MAPPING)}),
)


@dataclass
class PortMapConfig:
    network: str
    backend: str = NFTABLES
    snat: bool = True
    masq_all: bool = False
    mark_bit: int = DEFAULT_MARK_BIT
    external_set_mark_chain: str | None = None
    conditions_v4: list[str] = field(default_factory=list)
    conditions_v6: list[str] = field(default_factory=list)
    mappings: list[PortMapping] = field(default_factory=list)
    mappings_given: bool = False  # the runtime sent port mappings (even ones DEL had to skip)
    backend_unknown: bool = False  # DEL only: the backend named is none we know; clean both

    @property
    def mark(self) -> int:
        return 1 << self.mark_bit

    def conditions(self, family: int) -> list[str]:
        return self.conditions_v4 if family == 4 else self.conditions_v6

    def mappings_for(self, family: int) -> list[PortMapping]:
        return [m for m in self.mappings if m.applies_to(family)]


@dataclass
class Targets:
    """The container addresses that mappings forward to (one per family at most)."""

    v4: ipaddress.IPv4Interface | None = None
    v6: ipaddress.IPv6Interface | None = None

    def items(self) -> list[tuple[int, ContainerAddress]]:
        return [(f, a) for f, a in ((4, self.v4), (6, self.v6)) if a is not None]


def container_targets(result: Result | None, ifname: str) -> Targets:
    """The first address per family on the container's interface (the reference's rule)."""
    targets = Targets()
    if result is None:
        return targets
    for ip in result.ips:
        iface = ip.interface
        if iface is not None and 0 <= iface < len(result.interfaces):
            intf = result.interfaces[iface]
            if intf.name != ifname or not intf.sandbox:
                continue  # a host-side interface: not where traffic should go
        addr = ipaddress.ip_interface(ip.address)
        if addr.version == 4 and targets.v4 is None:
            targets.v4 = addr
        elif addr.version == 6 and targets.v6 is None:
            targets.v6 = addr
    return targets


# ---- parsing -------------------------------------------------------------------


def parse_config(conf: dict, warn: Callable[[str], None] | None = None) -> PortMapConfig:
    """Validate the plugin's options; raise CNIError (code 7 or 2) on bad input.

    With ``warn`` (DEL), nothing that only ADD needs is a reason to fail: a bad
    mapping is skipped, an unknown backend means "clean both", bad conditions
    or mark options are ignored; each is reported through ``warn``.
    """

    def tolerate(step: Callable[[], Any], fallback: Any) -> Any:
        if warn is None:
            return step()
        try:
            return step()
        except CNIError as err:
            warn(f"portmap: ignoring on DEL: {err}")
            return fallback

    cfg = PortMapConfig(network=conf.get("name", ""))
    cfg.snat = _bool_field(conf, "snat", True)
    cfg.masq_all = _bool_field(conf, "masqAll", False)
    tolerate(lambda: _parse_marks(conf, cfg), None)
    cond4 = tolerate(lambda: _parse_conditions(conf, "conditionsV4"), None)
    cond6 = tolerate(lambda: _parse_conditions(conf, "conditionsV6"), None)
    external = cfg.external_set_mark_chain
    try:
        cfg.backend = _choose_backend(conf.get("backend"), external, cond4, cond6)
    except CNIError as err:
        if warn is None:
            raise
        warn(f"portmap: ignoring on DEL: {err}; removing this container's state from both backends")
        cfg.backend, cfg.backend_unknown = NFTABLES, True
    for key, conds in (("conditionsV4", cond4), ("conditionsV6", cond6)):
        if conds:
            check = _validate_nft_conditions if cfg.backend == NFTABLES else _validate_ipt_conditions
            tolerate(lambda check=check, key=key, conds=conds: check(key, conds), None)
    cfg.conditions_v4 = [c for c in cond4 or [] if c]
    cfg.conditions_v6 = [c for c in cond6 or [] if c]
    runtime = conf.get("runtimeConfig") or {}
    if not isinstance(runtime, dict):
        raise invalid_config("runtimeConfig must be an object")
    raw_maps = runtime.get("portMappings") or []
    if not isinstance(raw_maps, list):
        raise invalid_config("runtimeConfig.portMappings must be a list")
    cfg.mappings_given = bool(raw_maps)
    seen: set[tuple[int, str, str]] = set()
    for n, raw in enumerate(raw_maps):
        mapping = tolerate(lambda raw=raw, n=n: _parse_mapping(raw, n), None)
        if mapping is None:
            continue
        # A repeated (hostPort, protocol, hostIP) can only forward one way: the first wins,
        # as it does with the reference's first-match rules.
        key = (mapping.host_port, mapping.protocol, mapping.host_ip)
        if key not in seen:
            seen.add(key)
            cfg.mappings.append(mapping)
    return cfg


def _parse_marks(conf: dict, cfg: PortMapConfig) -> None:
    mark_bit = conf.get("markMasqBit")
    external = conf.get("externalSetMarkChain")
    if mark_bit is not None and external is not None:
        raise invalid_config("Cannot specify externalSetMarkChain and markMasqBit", "use one or the other")
    if mark_bit is not None:
        mark_bit = _int_field(mark_bit, "markMasqBit")
        if not 0 <= mark_bit <= 31:
            raise invalid_config("MasqMarkBit must be between 0 and 31", f"got {mark_bit}")
        cfg.mark_bit = mark_bit
    if external is not None:
        if not isinstance(external, str) or not _CHAIN_NAME.fullmatch(external):
            raise invalid_config(
                f"externalSetMarkChain: {external!r} is not a valid iptables chain name",
                "use up to 28 letters, digits, '_', '.', '-'",
            )
        cfg.external_set_mark_chain = external


def invalid_config(msg: str, details: str = "") -> CNIError:
    """The spec's "invalid network config" error (code 7)."""
    return CNIError(ERR_INVALID_CONFIG, msg, details)


def _int_field(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_config(f"{what} must be an integer, got {value!r}")
    return value


def _bool_field(conf: dict, key: str, default: bool) -> bool:
    value = conf.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid_config(f"{key} must be true or false, got {value!r}")
    return value


def _parse_mapping(raw: Any, n: int) -> PortMapping:
    what = f"runtimeConfig.portMappings[{n}]"
    if not isinstance(raw, dict):
        raise invalid_config(f"{what} must be an object with hostPort, containerPort, protocol")
    ports = {}
    for key in ("hostPort", "containerPort"):
        port = _int_field(raw.get(key, 0), f"{what}.{key}")
        if not 0 < port < 65536:
            kind = "host" if key == "hostPort" else "container"
            raise invalid_config(f"Invalid {kind} port number: {port}", f"{what}.{key} must be 1..65535")
        ports[key] = port
    protocol = raw.get("protocol") or "tcp"
    if not isinstance(protocol, str) or protocol.lower() not in PROTOCOLS:
        raise CNIError(
            ERR_UNSUPPORTED_FIELD,
            f"{what}.protocol: unsupported protocol {protocol!r}",
            f"use one of {', '.join(PROTOCOLS)}",
        )
    host_ip = raw.get("hostIP") or ""
    if not isinstance(host_ip, str):
        raise invalid_config(f"{what}.hostIP must be a string, got {host_ip!r}")
    if host_ip:
        try:
            if "%" in host_ip:  # a zone index is no address a packet carries
                raise ValueError(host_ip)
            host_ip = str(ipaddress.ip_address(host_ip))
        except ValueError:
            raise invalid_config(
                f"{what}.hostIP: {host_ip!r} is not an IP address",
                "give a plain IPv4 or IPv6 address, or leave hostIP out for every address",
            ) from None
    return PortMapping(ports["hostPort"], ports["containerPort"], protocol.lower(), host_ip)


def _parse_conditions(conf: dict, key: str) -> list[str] | None:
    value = conf.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise invalid_config(f"{key} must be a list of strings")
    return list(value)


def _conditions_backend(conditions: list[str] | None) -> str:
    """Like the reference: iptables conditions start with '-', nftables ones never do."""
    if not conditions or not conditions[0]:
        return ""
    return IPTABLES if conditions[0].startswith("-") else NFTABLES


def _validate_nft_conditions(key: str, conditions: list[str]) -> None:
    # Checked one by one and joined, as the rule gets them: a statement split over two list
    # items ("meta mark", "set 1") is caught too.
    for cond in [*conditions, " ".join(conditions)]:
        if _NFT_FORBIDDEN.search(cond):
            raise invalid_config(
                f"{key}: {cond!r} contains a character not allowed in a condition",
                "conditions are nft match expressions; ';', '#' and control characters are refused",
            )
        if cond.count('"') % 2:
            raise invalid_config(f"{key}: {cond!r} has an unbalanced quote")
        bare = _NFT_QUOTED.sub(" ", cond)
        if "\\" in bare or any(bare.count(o) != bare.count(c) for o, c in ("{}", "()", "[]")):
            raise invalid_config(
                f"{key}: {cond!r} has an unbalanced bracket or a backslash",
                "a condition is one match expression (sets in braces are fine)",
            )
        words = {w.lower() for w in _NFT_WORD.findall(bare)}
        statements = sorted(words & _NFT_STATEMENT_WORDS)
        if statements:
            raise invalid_config(
                f"{key}: {cond!r} holds a statement ({', '.join(statements)}), not only matches",
                "conditions may only match packets (e.g. 'ip saddr 10.0.0.0/8'); quote a name "
                "that happens to be one of these words",
            )


def _ipt_option(arg: str) -> tuple[str, str] | None:
    """(option name, attached value) for an argument that is an option, else None."""
    if arg.startswith("--") and len(arg) > 2:
        name, _, value = arg.partition("=")
        return name, value
    if arg.startswith("-") and len(arg) > 1 and not arg[1].isdigit():
        return arg[:2], arg[2:]
    return None


def _validate_ipt_conditions(key: str, conditions: list[str]) -> None:
    expect_module = False
    for cond in conditions:
        if _NFT_FORBIDDEN.search(cond.replace("#", "")):
            raise invalid_config(f"{key}: {cond!r} contains control characters")
        if expect_module:
            expect_module = False
            if cond.lower() in _IPT_STATEFUL_MATCHES:
                raise invalid_config(
                    f"{key}: the match module {cond!r} keeps state; it is not allowed",
                    "conditions may only match packets (e.g. -s, -d, -i, -m conntrack)",
                )
        option = _ipt_option(cond)
        if option is None:
            continue
        name, value = option
        if len(name) == 2 and name[1] in _IPT_SHORT_NO_ARGUMENT and value:
            raise invalid_config(f"{key}: {cond!r} combines short options", "give each option as its own list item")
        forbidden = (
            name[1:] in _IPT_SHORT_FORBIDDEN
            if len(name) == 2 and name[1] != "-"
            else any(full.startswith(name) for full in _IPT_LONG_FORBIDDEN)
        )
        if forbidden:
            raise invalid_config(
                f"{key}: {cond!r} is not allowed",
                "conditions may only match packets: no target, jump, table or command",
            )
        if name in ("-m", "--match") or (len(name) > 3 and "--match".startswith(name)):
            if value:
                if value.lower() in _IPT_STATEFUL_MATCHES:
                    raise invalid_config(
                        f"{key}: the match module {value!r} keeps state; it is not allowed",
                        "conditions may only match packets (e.g. -s, -d, -i, -m conntrack)",
                    )
            else:
                expect_module = True


def _choose_backend(requested: Any, external: str | None, cond4: list[str] | None, cond6: list[str] | None) -> str:
    needs: dict[str, list[str]] = {IPTABLES: [], NFTABLES: []}
    if external is not None:
        needs[IPTABLES].append("externalSetMarkChain")
    for key, conds in (("conditionsV4", cond4), ("conditionsV6", cond6)):
        kind = _conditions_backend(conds)
        if kind:
            needs[kind].append(key)
    if requested is None:
        backend = IPTABLES if needs[IPTABLES] and not needs[NFTABLES] else NFTABLES
    elif requested in (NFTABLES, IPTABLES):
        backend = requested
    else:
        raise invalid_config(f"unrecognized backend {requested!r}", 'use "nftables" or "iptables"')
    wrong = IPTABLES if backend == NFTABLES else NFTABLES
    if needs[wrong]:
        raise invalid_config(
            f"{backend} backend was requested but configuration contains {wrong}-specific options {needs[wrong]}",
            f'set "backend": "{wrong}" or rewrite those options',
        )
    return backend
