"""The iptables backend of portmap, with the reference plugin's chain layout (nat table).

    PREROUTING, OUTPUT: -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT     (appended)
    CNI-HOSTPORT-DNAT:  -m comment --comment 'dnat name: "N" id: "ID"' -m multiport
                        -p tcp --destination-ports 8080,8081 [conditions] -j CNI-DN-<hash>
    CNI-DN-<hash>:      per mapping: mark hairpin (pod subnet, or everything with masqAll)
                        and localhost sources for masquerade, then DNAT
    CNI-HOSTPORT-SETMARK: -j MARK --set-xmark <bit>/<bit>
    POSTROUTING: -j CNI-HOSTPORT-MASQ (appended); CNI-HOSTPORT-MASQ: -m mark --mark <bit>/<bit> -j MASQUERADE

Entries into the kernel's hooks are appended, never inserted first, so that a
host's own rules keep precedence (CVE-2019-9946). Within CNI-HOSTPORT-DNAT a
container's entry goes first, so the latest container to claim a port wins.
Every value reaches iptables as its own argument (no shell, no restore file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cni_plugins.kernel import iptables
from cni_plugins.kernel.names import hashed_name
from cni_plugins.portmap.config import ContainerAddress, PortMapConfig, Targets
from cni_plugins.portmap.owner import Owner
from cni_plugins.spec.errors import ERR_INTERNAL, CNIError

TOPLEVEL_DNAT = "CNI-HOSTPORT-DNAT"
SETMARK = "CNI-HOSTPORT-SETMARK"
MASQ = "CNI-HOSTPORT-MASQ"
_COMMENT = re.compile(r'^dnat name: "(?P<name>[^"]*)" id: "(?P<id>[^"]*)"$')


def dnat_chain_name(network: str, container_id: str) -> str:
    """CNI-DN- followed by the SHA-512 of name+ID, 28 characters in all (the reference's name)."""
    return hashed_name("CNI-DN-", network + container_id, 28)


def _comment(network: str, container_id: str) -> str:
    text = f'dnat name: "{network}" id: "{container_id}"'
    return text if len(text) <= 255 else text[:253] + "..."


@dataclass
class Chain:
    name: str
    rules: list[list[str]] = field(default_factory=list)
    entry_chains: tuple[str, ...] = ()
    entry_rules: list[list[str]] = field(default_factory=list)
    prepend_entry: bool = False


class Iptables:
    """The iptables (family 4) or ip6tables (family 6) nat table, one command per call."""

    def __init__(self, family: int) -> None:
        self.family = family
        self.binary = "iptables" if family == 4 else "ip6tables"

    def run(self, *args: str) -> str:
        return iptables.run(self.family, ["-t", "nat", *args])

    def probe(self, *args: str) -> str | None:
        """The output of a command that may fail (-S CHAIN, -C RULE); None when it does.
        A missing binary still raises."""
        try:
            return self.run(*args)
        except iptables.IptablesError as err:
            if err.missing:
                raise
            return None

    def usable(self) -> bool:
        try:
            return self.probe("-S", "OUTPUT") is not None
        except CNIError:
            return False

    def chain_exists(self, chain: str) -> bool:
        return self.probe("-S", chain) is not None

    def ensure_chain(self, chain: str) -> None:
        if not self.chain_exists(chain):
            self.run("-N", chain)

    def exists(self, chain: str, rule: list[str]) -> bool:
        return self.probe("-C", chain, *rule) is not None

    def insert_unique(self, chain: str, rule: list[str], prepend: bool) -> None:
        if not self.exists(chain, rule):
            if prepend:
                self.run("-I", chain, "1", *rule)
            else:
                self.run("-A", chain, *rule)

    def list_rules(self, chain: str) -> list[list[str]]:
        """The chain's rules as argument lists (without the leading '-A CHAIN')."""
        return iptables.parse_listing(self.probe("-S", chain) or "").rules_of(chain)

    def setup(self, chain: Chain) -> None:
        self.ensure_chain(chain.name)
        for rule in chain.rules:
            self.insert_unique(chain.name, rule, prepend=False)
        for entry in chain.entry_chains:
            for rule in chain.entry_rules:
                self.insert_unique(entry, [*rule, "-j", chain.name], prepend=chain.prepend_entry)

    def teardown(self, chain: Chain) -> None:
        """Remove the chain and every jump to it; a chain that is not there is fine."""
        if not self.chain_exists(chain.name):
            return
        self.run("-F", chain.name)
        for entry in chain.entry_chains:
            for rule in self.list_rules(entry):
                if rule[-2:] == ["-j", chain.name]:
                    self.run("-D", entry, *rule)
        self.run("-X", chain.name)

    def check(self, chain: Chain) -> None:
        if not self.chain_exists(chain.name):
            raise CNIError(
                ERR_INTERNAL,
                f"chain {chain.name} not found in {self.binary} table nat",
                "run ADD again to restore the port mappings",
            )
        for rule in chain.rules:
            if not self.exists(chain.name, rule):
                raise CNIError(ERR_INTERNAL, f"rule {' '.join(rule)} not found in chain {chain.name}")
        for entry in chain.entry_chains:
            for rule in chain.entry_rules:
                if not self.exists(entry, [*rule, "-j", chain.name]):
                    raise CNIError(ERR_INTERNAL, f"jump to {chain.name} not found in chain {entry}")


# ---- the chains ------------------------------------------------------------------


def _mark(cfg: PortMapConfig) -> str:
    return f"{cfg.mark:#x}/{cfg.mark:#x}"


def setmark_chain(cfg: PortMapConfig) -> Chain:
    return Chain(
        SETMARK,
        rules=[["-m", "comment", "--comment", "CNI portfwd masquerade mark", "-j", "MARK", "--set-xmark", _mark(cfg)]],
    )


def masq_chain(cfg: PortMapConfig) -> Chain:
    return Chain(
        MASQ,
        rules=[["-m", "mark", "--mark", _mark(cfg), "-j", "MASQUERADE"]],
        entry_chains=("POSTROUTING",),
        entry_rules=[["-m", "comment", "--comment", "CNI portfwd requiring masquerade"]],
    )


def toplevel_chain() -> Chain:
    return Chain(
        TOPLEVEL_DNAT, entry_chains=("PREROUTING", "OUTPUT"), entry_rules=[["-m", "addrtype", "--dst-type", "LOCAL"]]
    )


def dnat_chain(network: str, container_id: str) -> Chain:
    return Chain(dnat_chain_name(network, container_id), entry_chains=(TOPLEVEL_DNAT,), prepend_entry=True)


def _fill_dnat_chain(chain: Chain, cfg: PortMapConfig, owner: Owner, family: int, target: ContainerAddress) -> None:
    # Like the reference, the entry rules list every mapped port (a port whose hostIP is of
    # the other family just finds no rule in the container's chain).
    by_proto: dict[str, list[int]] = {}
    for m in cfg.mappings:
        by_proto.setdefault(m.protocol, []).append(m.host_port)
    for proto in sorted(by_proto):
        ports = by_proto[proto]
        for start in range(0, len(ports), 15):  # multiport takes at most 15 ports
            chain.entry_rules.append(
                [
                    "-m",
                    "comment",
                    "--comment",
                    _comment(owner.network, owner.container_id),
                    "-m",
                    "multiport",
                    "-p",
                    proto,
                    "--destination-ports",
                    ",".join(str(p) for p in ports[start : start + 15]),
                    *cfg.conditions(family),
                ]
            )
    setmark = cfg.external_set_mark_chain or SETMARK
    everything = "0.0.0.0/0" if family == 4 else "::/0"
    for m in cfg.mappings_for(family):
        base = ["-p", m.protocol, "--dport", str(m.host_port)]
        if not m.wildcard():
            base += ["-d", m.host_ip]
        if cfg.snat:
            chain.rules.append([*base, "-s", everything if cfg.masq_all else str(target.network), "-j", setmark])
            if family == 4 and not cfg.masq_all:
                chain.rules.append([*base, "-s", "127.0.0.1", "-j", setmark])
        dest = f"{target.ip}:{m.container_port}" if family == 4 else f"[{target.ip}]:{m.container_port}"
        chain.rules.append([*base, "-j", "DNAT", "--to-destination", dest])


def _container_chain(cfg: PortMapConfig, owner: Owner, family: int, target: ContainerAddress) -> Chain:
    chain = dnat_chain(owner.network, owner.container_id)
    _fill_dnat_chain(chain, cfg, owner, family, target)
    return chain


# ---- the backend interface --------------------------------------------------------


def add(cfg: PortMapConfig, owner: Owner, targets: Targets) -> None:
    done: list[Iptables] = []
    try:
        for family, target in targets.items():
            ipt = Iptables(family)
            done.append(ipt)
            if cfg.snat and cfg.external_set_mark_chain is None:
                ipt.setup(setmark_chain(cfg))
                ipt.setup(masq_chain(cfg))
            ipt.setup(toplevel_chain())
            chain = _container_chain(cfg, owner, family, target)
            ipt.teardown(chain)  # a repeated ADD replaces what an earlier one left
            ipt.setup(chain)
    except CNIError:
        for ipt in done:  # undo this container's chains; shared chains may stay
            try:
                ipt.teardown(dnat_chain(owner.network, owner.container_id))
            except CNIError:
                pass
        raise


def delete(cfg: PortMapConfig, owner: Owner) -> None:
    usable = [ipt for ipt in (Iptables(4), Iptables(6)) if ipt.usable()]
    if not usable:
        raise CNIError(
            ERR_INTERNAL, "neither iptables nor ip6tables is usable", 'install iptables, or use "backend": "nftables"'
        )
    for ipt in usable:
        ipt.teardown(dnat_chain(owner.network, owner.container_id))


def check(cfg: PortMapConfig, owner: Owner, targets: Targets) -> None:
    # Only the families the container has addresses in (the v1.1.1 reference also looks
    # for an IPv6 chain on IPv4-only networks and fails; the spec wants success).
    for family, target in targets.items():
        Iptables(family).check(_container_chain(cfg, owner, family, target))


def gc(cfg: PortMapConfig, valid: list[Owner]) -> None:
    """Remove the CNI-DN chains of this network whose container is not a valid attachment.

    The reference's comment carries network name and container ID (not the interface),
    so a container stays as long as any of its attachments is valid.
    """
    keep = {o.container_id for o in valid}
    for ipt in (Iptables(4), Iptables(6)):
        if not ipt.usable():
            continue
        for rule in ipt.list_rules(TOPLEVEL_DNAT):
            if "--comment" not in rule:
                continue
            match = _COMMENT.match(rule[rule.index("--comment") + 1])
            if not match or match.group("name") != cfg.network or match.group("id") in keep:
                continue
            chain = dnat_chain(cfg.network, match.group("id"))
            if rule[-2:] == ["-j", chain.name]:
                ipt.teardown(chain)
