"""portmap: forward host ports to a container (a chained plugin).

ADD reads the container's addresses from prevResult and installs DNAT for
every runtimeConfig ``portMappings`` entry, plus the masquerade that hairpin
(pod to its own host port through the node) and localhost traffic need; it
then passes prevResult through unchanged. DEL removes what ADD installed for
this (network, container, interface); it needs neither prevResult nor the
namespace. CHECK verifies the rules are present; GC removes the mappings of
attachments that are no longer valid.

Two backends with the reference's options and meanings: ``nftables`` (the
default here: one table, per-network maps, one element per mapping) and
``iptables`` (the reference's chain layout). Where the configuration holds
iptables-only options (``externalSetMarkChain``, iptables-style conditions)
and names no backend, the iptables backend is chosen, so configurations
written for the reference keep working.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cni_plugins.spec.errors import (ERR_INTERNAL, ERR_INVALID_CONFIG, ERR_UNSUPPORTED_FIELD, CNIError)
from cni_plugins.spec.skel import CmdArgs, gc_attachments, prev_result

# logging, hashlib, ipaddress and subprocess are imported where they are used: VERSION needs none.
if TYPE_CHECKING:
    import ipaddress
    import subprocess

    from cni_plugins.spec.types import Result

NFTABLES = "nftables"
IPTABLES = "iptables"
DEFAULT_MARK_BIT = 13  # Kubernetes uses 14 and 15, Calico 20-31
PROTOCOLS = ("tcp", "udp", "sctp")

# Characters that would end or comment out an nft command, or that no condition needs.
_NFT_FORBIDDEN = re.compile(r"[;#\n\r\x00-\x1f\x7f]")
_NFT_VERDICTS = {"accept", "drop", "reject", "jump", "goto", "return", "queue", "continue",
                 "dnat", "snat", "masquerade", "redirect"}
_IPT_FORBIDDEN_ARGS = {"-j", "--jump", "-g", "--goto"}
_CHAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,27}$")


# ---- configuration ----------------------------------------------------------

@dataclass(frozen=True)
class PortMapping:
    host_port: int
    container_port: int
    protocol: str
    host_ip: str = ""  # "" means every local address

    def applies_to(self, family: int) -> bool:
        """A mapping with a hostIP only forwards to the container address of its family."""
        return not self.host_ip or _ip(self.host_ip).version == family

    def wildcard(self) -> bool:
        return not self.host_ip or _ip(self.host_ip).is_unspecified


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

    @property
    def mark(self) -> int:
        return 1 << self.mark_bit

    def conditions(self, family: int) -> list[str]:
        return self.conditions_v4 if family == 4 else self.conditions_v6

    def mappings_for(self, family: int) -> list[PortMapping]:
        return [m for m in self.mappings if m.applies_to(family)]


@dataclass(frozen=True)
class Owner:
    """Who a mapping belongs to: what DEL and GC match on."""

    network: str
    container_id: str
    ifname: str

    @property
    def key(self) -> str:
        import hashlib

        raw = f"{self.network}\0{self.container_id}\0{self.ifname}".encode()
        return hashlib.sha256(raw).hexdigest()[:16]

    @property
    def comment(self) -> str:
        """The key first (what we match on), then a readable, ruleset-safe label."""
        label = f"{self.network}/{self.container_id}/{self.ifname}"
        return f"{self.key} {_safe_text(label)}"[:120]


@dataclass
class Targets:
    """The container addresses that mappings forward to (one per family at most)."""

    v4: ipaddress.IPv4Interface | None = None
    v6: ipaddress.IPv6Interface | None = None

    def items(self) -> list[tuple[int, ipaddress.IPv4Interface | ipaddress.IPv6Interface]]:
        return [(f, a) for f, a in ((4, self.v4), (6, self.v6)) if a is not None]


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    import ipaddress

    return ipaddress.ip_address(text)


def _safe_text(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:/\-]", "_", text)


def _bad(msg: str, details: str = "") -> CNIError:
    return CNIError(ERR_INVALID_CONFIG, msg, details)


def _int_field(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{what} must be an integer, got {value!r}")
    return value


def _bool_field(conf: dict, key: str, default: bool) -> bool:
    value = conf.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"{key} must be true or false, got {value!r}")
    return value


def _parse_mapping(raw: Any, n: int) -> PortMapping:
    what = f"runtimeConfig.portMappings[{n}]"
    if not isinstance(raw, dict):
        raise _bad(f"{what} must be an object with hostPort, containerPort, protocol")
    ports = {}
    for key in ("hostPort", "containerPort"):
        port = _int_field(raw.get(key, 0), f"{what}.{key}")
        if not 0 < port < 65536:
            kind = "host" if key == "hostPort" else "container"
            raise _bad(f"Invalid {kind} port number: {port}", f"{what}.{key} must be 1..65535")
        ports[key] = port
    protocol = raw.get("protocol") or "tcp"
    if not isinstance(protocol, str) or protocol.lower() not in PROTOCOLS:
        raise CNIError(ERR_UNSUPPORTED_FIELD, f"{what}.protocol: unsupported protocol {protocol!r}",
                       f"use one of {', '.join(PROTOCOLS)}")
    host_ip = raw.get("hostIP") or ""
    if not isinstance(host_ip, str):
        raise _bad(f"{what}.hostIP must be a string, got {host_ip!r}")
    if host_ip:
        try:
            if "%" in host_ip:  # a zone index is no address a packet carries
                raise ValueError(host_ip)
            host_ip = str(_ip(host_ip))
        except ValueError:
            raise _bad(f"{what}.hostIP: {host_ip!r} is not an IP address",
                       "give a plain IPv4 or IPv6 address, or leave hostIP out for every address") from None
    return PortMapping(ports["hostPort"], ports["containerPort"], protocol.lower(), host_ip)


def _parse_conditions(conf: dict, key: str) -> list[str] | None:
    value = conf.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise _bad(f"{key} must be a list of strings")
    return list(value)


def _conditions_backend(conditions: list[str] | None) -> str:
    """Like the reference: iptables conditions start with '-', nftables ones never do."""
    if not conditions or not conditions[0]:
        return ""
    return IPTABLES if conditions[0].startswith("-") else NFTABLES


def _validate_nft_conditions(key: str, conditions: list[str]) -> None:
    for cond in conditions:
        if _NFT_FORBIDDEN.search(cond):
            raise _bad(f"{key}: {cond!r} contains a character not allowed in a condition",
                       "conditions are nft match expressions; ';', '#' and control characters are refused")
        if _NFT_VERDICTS & set(cond.split()):
            raise _bad(f"{key}: {cond!r} holds a verdict or NAT statement",
                       "conditions may only match packets (e.g. 'ip saddr 10.0.0.0/8')")
        if cond.count('"') % 2:
            raise _bad(f"{key}: {cond!r} has an unbalanced quote")


def _validate_ipt_conditions(key: str, conditions: list[str]) -> None:
    for cond in conditions:
        if _NFT_FORBIDDEN.search(cond.replace("#", "")):
            raise _bad(f"{key}: {cond!r} contains control characters")
        if cond in _IPT_FORBIDDEN_ARGS:
            raise _bad(f"{key}: {cond!r} is not allowed", "conditions may only match packets, not jump")


def parse_config(conf: dict) -> PortMapConfig:
    """Validate the plugin's options; raise CNIError (code 7 or 2) on bad input."""
    cfg = PortMapConfig(network=conf.get("name", ""))
    cfg.snat = _bool_field(conf, "snat", True)
    cfg.masq_all = _bool_field(conf, "masqAll", False)
    mark_bit = conf.get("markMasqBit")
    external = conf.get("externalSetMarkChain")
    if mark_bit is not None and external is not None:
        raise _bad("Cannot specify externalSetMarkChain and markMasqBit", "use one or the other")
    if mark_bit is not None:
        cfg.mark_bit = _int_field(mark_bit, "markMasqBit")
        if not 0 <= cfg.mark_bit <= 31:
            raise _bad("MasqMarkBit must be between 0 and 31", f"got {cfg.mark_bit}")
    if external is not None:
        if not isinstance(external, str) or not _CHAIN_NAME.match(external):
            raise _bad(f"externalSetMarkChain: {external!r} is not a valid iptables chain name",
                       "use up to 28 letters, digits, '_', '.', '-'")
        cfg.external_set_mark_chain = external
    cond4 = _parse_conditions(conf, "conditionsV4")
    cond6 = _parse_conditions(conf, "conditionsV6")
    cfg.backend = _choose_backend(conf.get("backend"), external, cond4, cond6)
    for key, conds in (("conditionsV4", cond4), ("conditionsV6", cond6)):
        if conds:
            (_validate_nft_conditions if cfg.backend == NFTABLES else _validate_ipt_conditions)(key, conds)
    cfg.conditions_v4 = [c for c in cond4 or [] if c]
    cfg.conditions_v6 = [c for c in cond6 or [] if c]
    runtime = conf.get("runtimeConfig") or {}
    if not isinstance(runtime, dict):
        raise _bad("runtimeConfig must be an object")
    raw_maps = runtime.get("portMappings") or []
    if not isinstance(raw_maps, list):
        raise _bad("runtimeConfig.portMappings must be a list")
    seen: set[tuple[int, str, str]] = set()
    for n, raw in enumerate(raw_maps):
        mapping = _parse_mapping(raw, n)
        # A repeated (hostPort, protocol, hostIP) can only forward one way: the first wins,
        # as it does with the reference's first-match rules.
        key = (mapping.host_port, mapping.protocol, mapping.host_ip)
        if key not in seen:
            seen.add(key)
            cfg.mappings.append(mapping)
    return cfg


def _choose_backend(requested: Any, external: str | None, cond4: list[str] | None,
                    cond6: list[str] | None) -> str:
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
        raise _bad(f"unrecognized backend {requested!r}", "use \"nftables\" or \"iptables\"")
    wrong = IPTABLES if backend == NFTABLES else NFTABLES
    if needs[wrong]:
        raise _bad(f"{backend} backend was requested but configuration contains {wrong}-specific "
                   f"options {needs[wrong]}", f"set \"backend\": \"{wrong}\" or rewrite those options")
    return backend


def container_targets(result: Any, ifname: str) -> Targets:
    """The first address per family on the container's interface (the reference's rule)."""
    import ipaddress

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


# ---- host-side helpers --------------------------------------------------------

def run_tool(argv: list[str], stdin: str | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
    """Run a host tool; a missing tool or a hang is a clear CNI error."""
    import subprocess

    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise CNIError(ERR_INTERNAL, f"{argv[0]} not found",
                       f"install {argv[0]} on the node (Debian: nftables, iptables, conntrack)") from None
    except subprocess.TimeoutExpired:
        raise CNIError(ERR_INTERNAL, f"{argv[0]} did not finish within {timeout}s") from None


def flush_udp_conntrack(cfg: PortMapConfig, family: int) -> None:
    """Drop stale UDP conntrack entries for the mapped ports, so new traffic takes the DNAT.

    Failures are only logged, as in the reference.
    """
    import logging

    log = logging.getLogger("pycni.portmap")
    ports = sorted({m.host_port for m in cfg.mappings_for(family) if m.protocol == "udp"})
    for port in ports:
        try:
            proc = run_tool(["conntrack", "-D", "-f", "ipv4" if family == 4 else "ipv6",
                             "-p", "udp", "--orig-port-dst", str(port)], timeout=5)
        except CNIError as err:
            log.info("could not flush UDP conntrack entries for port %d: %s", port, err)
            return
        if proc.returncode not in (0, 1):  # 1: nothing to delete
            log.info("conntrack -D for UDP port %d failed: %s", port, proc.stderr.strip())


def enable_route_localnet(container_ip: ipaddress.IPv4Address) -> None:
    """Let 127/8 sources cross to the container: set route_localnet on the interface
    that routes to it (in the node's namespace, where this plugin runs), as the reference does."""
    proc = run_tool(["ip", "-o", "route", "get", str(container_ip)], timeout=5)
    words = proc.stdout.split()
    if proc.returncode != 0 or "dev" not in words:
        return
    dev = words[words.index("dev") + 1]
    if not dev or "/" in dev or dev in (".", ".."):
        return
    path = f"/proc/sys/net/ipv4/conf/{dev}/route_localnet"
    try:
        with open(path) as fh:
            if fh.read().strip() == "1":
                return
        with open(path, "w") as fh:
            fh.write("1")
    except OSError as exc:
        raise CNIError(ERR_INTERNAL, f"unable to enable route_localnet on {dev}: {exc}") from None


def _backend(cfg: PortMapConfig):
    if cfg.backend == IPTABLES:
        from cni_plugins.portmap import ipt as portmap_ipt
        return portmap_ipt
    from cni_plugins.portmap import nft as portmap_nft
    return portmap_nft


def _owner(req: CmdArgs) -> Owner:
    return Owner(req.network_name, req.container_id, req.ifname)


# ---- commands -----------------------------------------------------------------

def _chained_request(req: CmdArgs, missing_previous: CNIError) -> tuple[PortMapConfig, Result, Targets]:
    """Configuration, prevResult (raise ``missing_previous`` without it) and the container
    addresses to map to (none when there is no mapping)."""
    cfg = parse_config(req.conf)
    previous = prev_result(req)
    if previous is None:
        raise missing_previous
    targets = container_targets(previous, req.ifname) if cfg.mappings else Targets()
    return cfg, previous, targets


def cmd_add(req: CmdArgs):
    cfg, previous, targets = _chained_request(
        req, _bad("must be called as chained plugin", "portmap needs prevResult from a plugin such as bridge"))
    if not targets.items():
        return previous
    backend, owner = _backend(cfg), _owner(req)
    backend.add(cfg, owner, targets)
    try:
        for family, _addr in targets.items():
            flush_udp_conntrack(cfg, family)
        if cfg.snat and targets.v4 is not None and cfg.mappings_for(4):
            enable_route_localnet(targets.v4.ip)
    except Exception:
        backend.delete(cfg, owner)  # a failed ADD leaves no mappings behind
        raise
    return previous


def cmd_del(req: CmdArgs) -> None:
    cfg = parse_config(req.conf)
    if not cfg.mappings and cfg.backend == IPTABLES:
        # The reference skips DEL without mappings: every iptables call is costly.
        return None
    # nftables: one table listing finds this container's elements even when the
    # runtime sends DEL without the port mappings it sent on ADD, so none leak.
    _backend(cfg).delete(cfg, _owner(req))
    return None


def cmd_check(req: CmdArgs) -> None:
    cfg, _previous, targets = _chained_request(
        req, _bad("Required prevResult missing", "CHECK needs the prevResult that ADD returned"))
    if targets.items():
        _backend(cfg).check(cfg, _owner(req), targets)
    return None


def cmd_gc(req: CmdArgs) -> None:
    cfg = parse_config(req.conf)
    valid = [Owner(cfg.network, cid, ifname) for cid, ifname in gc_attachments(req.conf)]
    _backend(cfg).gc(cfg, valid)
    return None

