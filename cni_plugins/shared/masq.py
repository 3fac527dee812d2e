"""IP masquerading for pod addresses (the bridge plugin's `ipMasq`).

Traffic from a pod address to a destination outside the pod's subnet leaves
with the node's address; traffic inside the subnet (pod to pod) and multicast
keep the pod's address. Everything acts in the calling thread's network
namespace (the node's).

nftables backend (default): one table, ``inet pycni_masq``, whose rule count
does not grow with pods::

    map pods4 { type ipv4_addr : verdict }     # pod address -> jump to its subnet's chain
    map pods6 { type ipv6_addr : verdict }
    chain postrouting { nat hook;  multicast -> return;  ip saddr vmap @pods4;  ip6 saddr vmap @pods6 }
    chain net4_0a580000_24 { ip daddr != 10.88.0.0/24 masquerade }   # one per pod subnet

Each map element carries a comment ``"<tag> <network> <containerID> <ifname>"``
whose tag hashes the network and the attachment, so DEL and GC delete exactly
the elements their attachment added (also when another attachment took the
address over since). Every change is one atomic `nft -f` transaction.

iptables backend: the reference plugins' layout, so either implementation can
clean up after the other: chain ``CNI-<sha512(network + containerID)[:24]>``
in the nat table holding ACCEPT to the pod subnet and MASQUERADE to non-multicast,
reached from POSTROUTING for the pod address; every rule carries the comment
``name: "<network>" id: "<containerID>"``. Like the reference, this layout is
per (network, container): it does not tell interfaces apart, so ADD adds to
the container's chain and DEL removes the whole chain.

Our own read-modify-write steps are serialised with a lock, so that a DEL
never deletes what a concurrent ADD just wrote. The lock is the network
namespace's own (``locks.netns_lock``: the abstract unix socket
``pycni-masq-lock``, which the kernel scopes to the namespace whose ruleset it
guards), like the portmap plugin's: no file anywhere (no ``/run/pycni``),
released when its holder dies, and calls working on different namespaces
("nodes") never wait for each other.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import ContextManager, Iterable, Union

from cni_plugins.kernel import iptables, locks, names, nft
from cni_plugins.spec.errors import ERR_INTERNAL, ERR_INVALID_CONFIG, ERR_INVALID_ENV, CNIError
from cni_plugins.spec.skel import validate_container_id, validate_interface_name, validate_network_name

BACKENDS = ("nftables", "iptables")
DEFAULT_BACKEND = "nftables"

TABLE = "pycni_masq"
BASE_CHAIN = "postrouting"
POD_MAPS = {4: "pods4", 6: "pods6"}
MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}
_NFT_FAMILY_WORD = {4: "ip", 6: "ip6"}
_NFT_ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
_SUBNET_CHAIN_RE = re.compile(r"^net[46]_[0-9a-f]+_[0-9]+$")

IPT_CHAIN_PREFIX = "CNI-"
_IPT_CHAIN_LEN = 28
_IPT_COMMENT_MAX = 255
_IPT_COMMENT_RE = re.compile(r'^name: "([^"]*)" id: "([^"]*)"$')

LOCK_NAME = "pycni-masq-lock"
LOCK_TIMEOUT_SECONDS = 30.0

# Interface names end up in nftables comments: keep them to a quote-free alphabet.
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.\-@+=%]+$")

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


# ---- the API the bridge plugin calls ----------------------------------------


def setup_masq(
    network: str, container_id: str, ifname: str, addresses: list[str], backend: str = DEFAULT_BACKEND
) -> None:
    """Masquerade traffic from each pod address to destinations outside its subnet."""
    owner = Owner.checked(network, container_id, ifname)
    pods = parse_addresses(addresses)
    _backend(backend).setup(owner, pods)


def teardown_masq(network: str, container_id: str, ifname: str, backend: str = DEFAULT_BACKEND) -> None:
    """Remove what setup_masq installed for this attachment; nothing there is success.

    The state is found by network and container ID (and interface name, for
    nftables), so DEL needs neither the namespace nor the pod's addresses.
    """
    _backend(backend).teardown(Owner.checked(network, container_id, ifname))


def check_masq(
    network: str, container_id: str, ifname: str, addresses: list[str], backend: str = DEFAULT_BACKEND
) -> None:
    """Raise CNIError unless the masquerading for these pod addresses is in place."""
    owner = Owner.checked(network, container_id, ifname)
    pods = parse_addresses(addresses)
    _backend(backend).check(owner, pods)


def gc_masq(network: str, valid: list[tuple[str, str]], backend: str = DEFAULT_BACKEND) -> None:
    """Remove the network's masquerading for every attachment (containerID, ifname) not in ``valid``."""
    validate_network_name(network)
    _backend(backend).gc(network, [(str(cid), str(ifname)) for cid, ifname in valid])


# ---- inputs -------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """The attachment that masquerading belongs to."""

    network: str
    container_id: str
    ifname: str

    @classmethod
    def checked(cls, network: str, container_id: str, ifname: str) -> "Owner":
        validate_network_name(network)
        validate_container_id(container_id)
        validate_interface_name(ifname)
        if not _IFNAME_RE.match(ifname):
            raise CNIError(
                ERR_INVALID_ENV,
                "interface name has characters that cannot go into a firewall comment",
                f"{ifname!r}: use letters, digits and _ . - @ + = %",
            )
        return cls(network, container_id, ifname)

    @property
    def tag(self) -> str:
        """Identifies the attachment; its first half identifies the network."""
        return network_tag(self.network) + "-" + _hash16(f"{self.ifname}:{self.container_id}")

    @property
    def nft_comment(self) -> str:
        return f"{self.tag} {self.network} {self.container_id} {self.ifname}"


def network_tag(network: str) -> str:
    return _hash16(network)


def _hash16(text: str) -> str:
    return names.short_hash(text, 16)


@dataclass(frozen=True)
class PodAddress:
    """A pod's address and the subnet it is on, from a CIDR such as 10.88.0.5/24."""

    ip: IPAddress
    subnet: IPNetwork

    @property
    def family(self) -> int:
        return self.ip.version


def parse_addresses(addresses: Iterable[str]) -> list[PodAddress]:
    if isinstance(addresses, (str, bytes)) or not isinstance(addresses, (list, tuple)):
        raise CNIError(
            ERR_INVALID_CONFIG,
            "pod addresses must be a list of CIDR strings",
            f"got {addresses!r}; e.g. ['10.88.0.5/24', 'fd00::5/64']",
        )
    pods: list[PodAddress] = []
    for text in addresses:
        try:
            if not isinstance(text, str) or text != text.strip() or "%" in text:
                raise ValueError(text)
            iface = ipaddress.ip_interface(text)
        except ValueError:
            raise CNIError(
                ERR_INVALID_CONFIG,
                f"invalid pod address {text!r}",
                "expected an address with prefix length, e.g. 10.88.0.5/24 or fd00::5/64",
            ) from None
        pod = PodAddress(ip=iface.ip, subnet=iface.network)
        if pod not in pods:
            pods.append(pod)
    return pods


def _backend(name: str) -> "_Backend":
    if name == "nftables":
        return _NftablesBackend()
    if name == "iptables":
        return _IptablesBackend()
    raise CNIError(ERR_INVALID_CONFIG, f"unknown ipMasq backend {name!r}", 'use "nftables" or "iptables"')


class _Backend:
    def setup(self, owner: Owner, pods: list[PodAddress]) -> None: ...

    def teardown(self, owner: Owner) -> None: ...

    def check(self, owner: Owner, pods: list[PodAddress]) -> None: ...

    def gc(self, network: str, valid: list[tuple[str, str]]) -> None: ...


def _missing(msg: str, details: str = "") -> CNIError:
    return CNIError(ERR_INTERNAL, msg, details or "run ADD again to restore it")


def _locked() -> ContextManager[None]:
    """Serialise our read-modify-write steps on the calling thread's namespace (each step is short)."""
    return locks.netns_lock(LOCK_NAME, "the masquerade lock", LOCK_TIMEOUT_SECONDS)


# ---- nftables -------------------------------------------------------------------


def subnet_chain(subnet: IPNetwork) -> str:
    """The chain that masquerades everything leaving ``subnet``, e.g. net4_0a580000_24."""
    width = 8 if subnet.version == 4 else 32
    return f"net{subnet.version}_{int(subnet.network_address):0{width}x}_{subnet.prefixlen}"


@dataclass
class _NftEntry:
    family: int
    ip: IPAddress
    element: nft.Element

    @property
    def tag(self) -> str:
        return (self.element.comment or "").split(" ", 1)[0]


@dataclass
class _NftState:
    """Our table as it is now (empty when it does not exist)."""

    exists: bool = False
    entries: list[_NftEntry] = field(default_factory=list)
    chains: set[str] = field(default_factory=set)
    rules: dict[str, list[list[dict]]] = field(default_factory=dict)

    @classmethod
    def load(cls) -> "_NftState":
        objects = nft.list_json("table", "inet", TABLE)
        state = cls()
        if objects is None:
            return state
        state.exists = True
        families = {name: fam for fam, name in POD_MAPS.items()}
        for obj in objects:
            if "map" in obj and obj["map"].get("name") in families:
                family = families[obj["map"]["name"]]
                for element in nft.elements(obj["map"]):
                    try:
                        ip = ipaddress.ip_address(element.key)
                    except (TypeError, ValueError):
                        continue  # not an element this code writes
                    state.entries.append(_NftEntry(family, ip, element))
            elif "chain" in obj:
                state.chains.add(obj["chain"]["name"])
            elif "rule" in obj:
                state.rules.setdefault(obj["rule"]["chain"], []).append(obj["rule"].get("expr", []))
        return state

    def entry_for(self, ip: IPAddress) -> _NftEntry | None:
        return next((e for e in self.entries if e.ip == ip), None)


def _table() -> str:
    return f"inet {TABLE}"


def _base_script() -> list[str]:
    """Create the table, maps and base chain if missing, and (re)write the base chain's rules."""
    t = _table()
    lines = [f"add table {t} {{ comment {nft.comment('pod address masquerading by pycni')}; }}"]
    for family, name in POD_MAPS.items():
        lines.append(f"add map {t} {name} {{ type {_NFT_ADDR_TYPE[family]} : verdict; }}")
    lines += [
        f"add chain {t} {BASE_CHAIN} {{ type nat hook postrouting priority srcnat; policy accept; }}",
        f"flush chain {t} {BASE_CHAIN}",
    ]
    for family in POD_MAPS:
        lines.append(f"add rule {t} {BASE_CHAIN} {_NFT_FAMILY_WORD[family]} daddr {MULTICAST[family]} return")
    for family, name in POD_MAPS.items():
        lines.append(f"add rule {t} {BASE_CHAIN} {_NFT_FAMILY_WORD[family]} saddr vmap @{name}")
    return lines


def _subnet_script(subnet: IPNetwork) -> list[str]:
    chain, t = subnet_chain(subnet), _table()
    return [
        f"add chain {t} {chain}",
        f"flush chain {t} {chain}",
        f"add rule {t} {chain} {_NFT_FAMILY_WORD[subnet.version]} daddr != {subnet} masquerade",
    ]


def _delete_script(state: _NftState, doomed: list[_NftEntry], added_chains: set[str] = frozenset()) -> list[str]:
    """Delete elements, then every subnet chain that no element will jump to any more."""
    t = _table()
    lines = [f"delete element {t} {POD_MAPS[e.family]} {{ {e.ip} }}" for e in doomed]
    doomed_ids = {id(e) for e in doomed}
    still_used = {e.element.jump_target for e in state.entries if id(e) not in doomed_ids} | set(added_chains)
    for chain in sorted(state.chains):
        if _SUBNET_CHAIN_RE.match(chain) and chain not in still_used:
            lines.append(f"delete chain {t} {chain}")
    return lines


class _NftablesBackend(_Backend):
    def setup(self, owner: Owner, pods: list[PodAddress]) -> None:
        if not pods:
            return
        t = _table()
        with _locked():
            state = _NftState.load()
            lines = _base_script()
            chains = {subnet_chain(p.subnet): p.subnet for p in pods}
            for subnet in chains.values():
                lines += _subnet_script(subnet)
            # Replace our own earlier elements and any stale owner's element at these addresses.
            ips = {p.ip for p in pods}
            doomed = [e for e in state.entries if e.tag == owner.tag or e.ip in ips]
            lines += _delete_script(state, doomed, added_chains=set(chains))
            note = nft.comment(owner.nft_comment)
            for pod in pods:
                lines.append(
                    f"add element {t} {POD_MAPS[pod.family]} "
                    f"{{ {pod.ip} comment {note} : jump {subnet_chain(pod.subnet)} }}"
                )
            nft.apply("\n".join(lines) + "\n")

    def teardown(self, owner: Owner) -> None:
        # Elements are found by the attachment's tag (so an address now owned by
        # another attachment is left alone).
        self._delete_where(lambda entry: entry.tag == owner.tag)

    def gc(self, network: str, valid: list[tuple[str, str]]) -> None:
        prefix = network_tag(network) + "-"
        keep = {Owner(network, cid, ifname).tag for cid, ifname in valid}
        self._delete_where(lambda entry: entry.tag.startswith(prefix) and entry.tag not in keep)

    def _delete_where(self, doomed_if) -> None:
        try:
            with _locked():
                state = _NftState.load()
                doomed = [e for e in state.entries if doomed_if(e)]
                if not doomed:
                    return
                if len(doomed) == len(state.entries):
                    nft.apply(f"delete table {_table()}\n")  # the last pod is gone: leave no trace
                else:
                    nft.apply("\n".join(_delete_script(state, doomed)) + "\n")
        except nft.NftError as err:
            if err.missing:
                return  # no nftables here, so nothing of ours to remove
            raise

    def check(self, owner: Owner, pods: list[PodAddress]) -> None:
        if not pods:
            return
        state = _NftState.load()
        if not state.exists:
            raise _missing(f"nftables table {_table()} does not exist")
        base = state.rules.get(BASE_CHAIN, [])
        for pod in pods:
            family_map = POD_MAPS[pod.family]
            if not any(_has_vmap(expr, family_map) for expr in base):
                raise _missing(f"chain {BASE_CHAIN} of table {_table()} does not look up @{family_map}")
            entry = state.entry_for(pod.ip)
            if entry is None:
                raise _missing(f"no masquerade entry for {pod.ip} in map {family_map}")
            if entry.tag != owner.tag:
                raise _missing(
                    f"the masquerade entry for {pod.ip} belongs to another attachment",
                    f"its comment is {entry.element.comment!r}",
                )
            chain = subnet_chain(pod.subnet)
            if entry.element.jump_target != chain:
                raise _missing(
                    f"the masquerade entry for {pod.ip} jumps to {entry.element.jump_target!r}, expected {chain}"
                )
            if not any(_masquerades_outside(expr, pod.subnet) for expr in state.rules.get(chain, [])):
                raise _missing(f"chain {chain} does not masquerade traffic leaving {pod.subnet}")


def _has_vmap(expr: list[dict], map_name: str) -> bool:
    return any(stmt.get("vmap", {}).get("data") == f"@{map_name}" for stmt in expr)


def _masquerades_outside(expr: list[dict], subnet: IPNetwork) -> bool:
    masquerades = any("masquerade" in stmt for stmt in expr)
    excludes = any(
        stmt.get("match", {}).get("op") == "!="
        and stmt["match"].get("right") == {"prefix": {"addr": str(subnet.network_address), "len": subnet.prefixlen}}
        for stmt in expr
    )
    return masquerades and excludes


# ---- iptables -------------------------------------------------------------------


def iptables_chain(network: str, container_id: str) -> str:
    """The reference's chain name (utils.FormatChainName): CNI- + sha512(network + containerID) in hex."""
    return names.hashed_name(IPT_CHAIN_PREFIX, network + container_id, _IPT_CHAIN_LEN)


def iptables_comment(network: str, container_id: str) -> str:
    """The reference's rule comment (utils.FormatComment); both names are validated, so no escaping is needed."""
    return f'name: "{network}" id: "{container_id}"'


def _jump_source(rule: list[str], chain: str) -> IPAddress | None:
    """The source address of a POSTROUTING rule that jumps to ``chain`` (None for other rules)."""
    if not _arg(rule, "-j") == chain:
        return None
    source = _arg(rule, "-s")
    try:
        return ipaddress.ip_interface(source).ip if source else None
    except ValueError:
        return None


def _accepted_subnet(rule: list[str]) -> IPNetwork | None:
    """The destination subnet of an ACCEPT rule in a masquerade chain (None for other rules)."""
    if _arg(rule, "-j") != "ACCEPT" or _arg(rule, "-d") is None:
        return None
    try:
        return ipaddress.ip_network(_arg(rule, "-d"))
    except ValueError:
        return None


def _arg(rule: list[str], flag: str) -> str | None:
    for i, word in enumerate(rule[:-1]):
        if word == flag and (i == 0 or rule[i - 1] != "!"):
            return rule[i + 1]
    return None


class _IptablesBackend(_Backend):
    def setup(self, owner: Owner, pods: list[PodAddress]) -> None:
        # The chain is shared by all of the container's interfaces on this network (the
        # reference's layout), so like the reference this adds to what is there and
        # removes nothing; DEL removes it all.
        chain = iptables_chain(owner.network, owner.container_id)
        note = self._comment(owner.network, owner.container_id)
        with _locked():
            for family in sorted({p.family for p in pods}):
                mine = [p for p in pods if p.family == family]
                listing = iptables.list_table(family, "nat")
                jumped = {_jump_source(rule, chain) for rule in listing.rules_of("POSTROUTING")}
                subnets = [_accepted_subnet(rule) for rule in listing.rules_of(chain)]
                subnets = list(dict.fromkeys([s for s in subnets if s is not None] + [p.subnet for p in mine]))
                # Declaring the chain creates it, or empties it so that it is written afresh in order:
                # every ACCEPT before the MASQUERADE.
                batch = ["*nat", f":{chain} - [0:0]"]
                for subnet in subnets:
                    batch.append(
                        iptables.rule_line(
                            "-A", chain, ["-d", str(subnet), "-m", "comment", "--comment", note, "-j", "ACCEPT"]
                        )
                    )
                batch.append(
                    iptables.rule_line(
                        "-A",
                        chain,
                        ["!", "-d", MULTICAST[family], "-m", "comment", "--comment", note, "-j", "MASQUERADE"],
                    )
                )
                for pod in mine:
                    if pod.ip not in jumped:
                        batch.append(
                            iptables.rule_line(
                                "-A",
                                "POSTROUTING",
                                ["-s", str(pod.ip), "-m", "comment", "--comment", note, "-j", chain],
                            )
                        )
                batch.append("COMMIT")
                iptables.restore(family, "\n".join(batch) + "\n")

    def teardown(self, owner: Owner) -> None:
        # Like the reference, the chain is per (network, container): the ifname plays no part.
        with _locked():
            for family in (4, 6):
                self._remove_chain(family, iptables_chain(owner.network, owner.container_id))

    def gc(self, network: str, valid: list[tuple[str, str]]) -> None:
        keep = {cid for cid, _ifname in valid}
        with _locked():
            for family in (4, 6):
                try:
                    listing = iptables.list_table(family, "nat")
                except iptables.IptablesError as err:
                    if err.missing:
                        continue
                    raise
                stale: set[str] = set()
                for rule in listing.rules_of("POSTROUTING"):
                    match = _IPT_COMMENT_RE.match(_arg(rule, "--comment") or "")
                    if not match or match.group(1) != network or match.group(2) in keep:
                        continue
                    chain = iptables_chain(network, match.group(2))
                    if _arg(rule, "-j") == chain:  # only chains this layout names, never a lookalike
                        stale.add(chain)
                for chain in sorted(stale):
                    self._remove_chain(family, chain, listing)

    def check(self, owner: Owner, pods: list[PodAddress]) -> None:
        chain = iptables_chain(owner.network, owner.container_id)
        for family in sorted({p.family for p in pods}):
            listing = iptables.list_table(family, "nat")
            tool = "iptables" if family == 4 else "ip6tables"
            if chain not in listing.chains:
                raise _missing(f"{tool} chain {chain} does not exist in the nat table")
            rules = listing.rules_of(chain)
            for pod in (p for p in pods if p.family == family):
                if not any(_jump_source(r, chain) == pod.ip for r in listing.rules_of("POSTROUTING")):
                    raise _missing(f"{tool} POSTROUTING has no rule sending {pod.ip} to {chain}")
                if not any(_arg(r, "-d") == str(pod.subnet) and _arg(r, "-j") == "ACCEPT" for r in rules):
                    raise _missing(f"{tool} chain {chain} does not accept traffic to {pod.subnet}")
            if not any(_arg(r, "-j") == "MASQUERADE" and "!" in r for r in rules):
                raise _missing(f"{tool} chain {chain} has no MASQUERADE rule")

    @staticmethod
    def _comment(network: str, container_id: str) -> str:
        note = iptables_comment(network, container_id)
        if len(note) > _IPT_COMMENT_MAX:
            raise CNIError(
                ERR_INVALID_CONFIG,
                "network name and container ID are too long for an iptables comment",
                f"together at most {_IPT_COMMENT_MAX - len(iptables_comment('', ''))} characters",
            )
        return note

    @staticmethod
    def _remove_chain(family: int, chain: str, listing: iptables.TableListing | None = None) -> None:
        """Delete the POSTROUTING jumps to ``chain`` and the chain itself, in one batch."""
        try:
            if listing is None:
                listing = iptables.list_table(family, "nat")
        except iptables.IptablesError as err:
            if err.missing:
                return  # no iptables here, so nothing of ours to remove
            raise
        jumps = [r for r in listing.rules_of("POSTROUTING") if _arg(r, "-j") == chain]
        if not jumps and chain not in listing.chains:
            return
        batch = ["*nat"] + [iptables.rule_line("-D", "POSTROUTING", rule) for rule in jumps]
        if chain in listing.chains:
            batch += [f":{chain} - [0:0]", f"-X {chain}"]  # the declaration empties it so it can go
        batch.append("COMMIT")
        iptables.restore(family, "\n".join(batch) + "\n")
