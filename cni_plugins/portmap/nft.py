"""The nftables backend of portmap: one table, per-network maps, one element per mapping.

Layout (table ``inet pycni_portmap``; ``<h>`` is a hash of the network name)::

    map  n<h>_hip4 / n<h>_hip6   hostIP . proto . hostPort : podIP . containerPort
    map  n<h>_any4 / n<h>_any6   proto . hostPort : podIP . containerPort (any local address)
    set  n<h>_src4 / n<h>_src6   sources that need masquerading (pod subnets, 127/8)
    chain n<h>_dnat              the network's conditions, mark-for-masquerade, DNAT lookups
    chain n<h>_masq              masquerade what n<h>_dnat marked
    chain prerouting / output / postrouting (base chains) jump to every network's chains

A new pod is a few map elements, never a new rule. Every element carries a
comment that starts with its owner's key (hash of network, container ID and
interface name), which is what DEL and GC match. Each change is one
``nft -f -`` transaction, made under a per-namespace lock held only while the
table is read and the transaction applied, so that DEL removes an element
only while it still belongs to the container being deleted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

from cni_plugins.kernel import nft
from cni_plugins.kernel.locks import netns_lock
from cni_plugins.kernel.names import short_hash
from cni_plugins.portmap.config import PortMapConfig, Targets
from cni_plugins.portmap.owner import Owner
from cni_plugins.spec.errors import ERR_INTERNAL, CNIError

FAMILY = "inet"
TABLE = "pycni_portmap"
# An abstract socket name: scoped to the network namespace (the table is per namespace),
# released when its holder dies, no file left behind.
LOCK_NAME = "pycni-portmap-nft-lock"
LOCK_TIMEOUT = 30.0
BASE_CHAINS = (
    ("prerouting", "prerouting", "dstnat", "dnat"),
    ("output", "output", "-100", "dnat"),
    ("postrouting", "postrouting", "srcnat", "masq"),
)
_NETWORK_CHAIN = re.compile(r"^n([0-9a-f]{12})_dnat$")
_KEY_PART = re.compile(r"^[0-9A-Za-z:./\-]+$")


def network_hash(network: str) -> str:
    return short_hash(network, 12)


@dataclass(frozen=True)
class Names:
    """The objects of one network in the table."""

    h: str

    def hip(self, family: int) -> str:
        return f"n{self.h}_hip{family}"

    def any(self, family: int) -> str:
        return f"n{self.h}_any{family}"

    def src(self, family: int) -> str:
        return f"n{self.h}_src{family}"

    @property
    def dnat(self) -> str:
        return f"n{self.h}_dnat"

    @property
    def masq(self) -> str:
        return f"n{self.h}_masq"

    @property
    def maps(self) -> tuple[str, ...]:
        return (self.hip(4), self.any(4), self.hip(6), self.any(6))

    @property
    def sets(self) -> tuple[str, ...]:
        return (self.src(4), self.src(6))


@dataclass(frozen=True)
class Element:
    key: tuple[str, ...]
    data: tuple[str, ...] = ()
    owner: str = ""  # the owner key from the comment; "" when none


@dataclass
class TableState:
    exists: bool = False
    networks: set[str] = field(default_factory=set)  # network hashes with a dnat chain
    elements: dict[str, list[Element]] = field(default_factory=dict)  # map name -> elements
    jumps: dict[str, set[str]] = field(default_factory=dict)  # base chain -> jump targets


# ---- reading the table ------------------------------------------------------------


def _value_parts(value: Any) -> tuple[str, ...]:
    if isinstance(value, dict) and "concat" in value:
        parts: list[str] = []
        for item in value["concat"]:
            parts.extend(_value_parts(item))
        return tuple(parts)
    if isinstance(value, dict) and "prefix" in value:
        return (f"{value['prefix']['addr']}/{value['prefix']['len']}",)
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        text = str(value)
        if _KEY_PART.match(text):
            return (text,)
    raise ValueError(f"unexpected element value {value!r}")


def _element(listed: nft.Element) -> Element:
    """A listed map element as key parts, data parts and owner key; ValueError if it is not ours."""
    owner = listed.comment.split(" ", 1)[0] if listed.comment else ""
    data = _value_parts(listed.value) if listed.value is not None else ()
    return Element(_value_parts(listed.key), data, owner)


def read_state() -> TableState:
    objects = nft.list_json("table", FAMILY, TABLE)
    if objects is None:
        return TableState()
    state = TableState(exists=True)
    try:
        for obj in objects:
            if "chain" in obj:
                match = _NETWORK_CHAIN.match(obj["chain"]["name"])
                if match:
                    state.networks.add(match.group(1))
            # Only the maps are read back: nothing looks at the source sets' elements, which
            # auto-merge may list as ranges.
            if "map" in obj:
                state.elements[obj["map"]["name"]] = [_element(e) for e in nft.elements(obj["map"])]
            if "rule" in obj:
                for expr in obj["rule"].get("expr", []):
                    if isinstance(expr, dict) and "jump" in expr:
                        state.jumps.setdefault(obj["rule"]["chain"], set()).add(expr["jump"]["target"])
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise CNIError(ERR_INTERNAL, f"could not read nftables table {FAMILY} {TABLE}: {exc}") from None
    return state


# ---- writing ---------------------------------------------------------------------


def _obj(kind: str, name: str) -> str:
    return f"{kind} {FAMILY} {TABLE} {name}"


def _elem_text(key: tuple[str, ...], data: tuple[str, ...] = (), comment: str = "") -> str:
    text = " . ".join(key)
    if comment:
        text += f" comment {nft.comment(comment)}"
    if data:
        text += " : " + " . ".join(data)
    return "{ " + text + " }"


def _network_objects(names: Names) -> list[str]:
    lines = []
    for family, addr in ((4, "ipv4_addr"), (6, "ipv6_addr")):
        lines.append(
            f"add {_obj('map', names.hip(family))} "
            f"{{ type {addr} . inet_proto . inet_service : {addr} . inet_service; }}"
        )
        lines.append(
            f"add {_obj('map', names.any(family))} {{ type inet_proto . inet_service : {addr} . inet_service; }}"
        )
        lines.append(f"add {_obj('set', names.src(family))} {{ type {addr}; flags interval; auto-merge; }}")
    lines.append(f"add {_obj('chain', names.dnat)}")
    lines.append(f"add {_obj('chain', names.masq)}")
    return lines


def _network_rules(cfg: PortMapConfig, names: Names) -> list[str]:
    """The network's rules, rebuilt on every ADD so they follow its current configuration."""
    lines = [f"flush {_obj('chain', names.dnat)}", f"flush {_obj('chain', names.masq)}"]
    mark = f"{cfg.mark:#x}"
    for family in (4, 6):
        ipx = "ip" if family == 4 else "ip6"
        head = " ".join([f"meta nfproto ipv{family}", *cfg.conditions(family)])
        hip_key = f"{ipx} daddr . meta l4proto . th dport"
        any_key = "fib daddr type local meta l4proto . th dport"
        rule = f"add rule {FAMILY} {TABLE} {names.dnat} {head}"
        if cfg.snat:
            source = "" if cfg.masq_all else f" {ipx} saddr @{names.src(family)}"
            lines.append(f"{rule}{source} {hip_key} @{names.hip(family)} meta mark set meta mark | {mark}")
            lines.append(f"{rule}{source} {any_key} @{names.any(family)} meta mark set meta mark | {mark}")
        lines.append(f"{rule} dnat {ipx} to {hip_key} map @{names.hip(family)}")
        lines.append(f"{rule} fib daddr type local dnat {ipx} to meta l4proto . th dport map @{names.any(family)}")
    if cfg.snat:
        lines.append(f"add rule {FAMILY} {TABLE} {names.masq} meta mark and {mark} == {mark} masquerade")
    return lines


def _base_chains(networks: set[str]) -> list[str]:
    """Hook chains jumping to every network's chains; rebuilt whole in each transaction."""
    lines = []
    for chain, hook, priority, _target in BASE_CHAINS:
        lines.append(f"add {_obj('chain', chain)} {{ type nat hook {hook} priority {priority}; policy accept; }}")
        lines.append(f"flush {_obj('chain', chain)}")
    for h in sorted(networks):
        names = Names(h)
        for chain, _hook, _priority, target in BASE_CHAINS:
            lines.append(f"add rule {FAMILY} {TABLE} {chain} jump {getattr(names, target)}")
    return lines


def _desired_elements(cfg: PortMapConfig, names: Names, targets: Targets) -> dict[str, list[Element]]:
    wanted: dict[str, list[Element]] = {}
    for family, addr in targets.items():
        for m in cfg.mappings_for(family):
            data = (str(addr.ip), str(m.container_port))
            if m.wildcard():
                wanted.setdefault(names.any(family), []).append(Element((m.protocol, str(m.host_port)), data))
            else:
                wanted.setdefault(names.hip(family), []).append(
                    Element((m.host_ip, m.protocol, str(m.host_port)), data)
                )
    return wanted


def _masq_sources(cfg: PortMapConfig, targets: Targets) -> dict[int, list[str]]:
    sources: dict[int, list[str]] = {}
    for family, addr in targets.items():
        if cfg.snat and not cfg.masq_all and cfg.mappings_for(family):
            sources[family] = [str(addr.network)]
            if family == 4:
                sources[family].append("127.0.0.0/8")
    return sources


def _removal(state: TableState, names: Names, doomed: set[str]) -> tuple[list[str], int]:
    """Delete the elements of this network owned by ``doomed`` keys; tidy up what empties."""
    lines: list[str] = []
    remaining = 0
    for map_name in names.maps:
        for elem in state.elements.get(map_name, []):
            if elem.owner in doomed:
                lines.append(f"delete element {FAMILY} {TABLE} {map_name} {_elem_text(elem.key)}")
            else:
                remaining += 1
    return lines, remaining


def _drop_network(state: TableState, names: Names) -> list[str]:
    """Remove a network that has no mappings left (and the table when no network is left)."""
    others = state.networks - {names.h}
    if not others:
        return [f"delete table {FAMILY} {TABLE}"]
    lines = _base_chains(others)
    lines += [f"delete {_obj('chain', names.dnat)}", f"delete {_obj('chain', names.masq)}"]
    lines += [f"delete {_obj('map', m)}" for m in names.maps]
    lines += [f"delete {_obj('set', s)}" for s in names.sets]
    return lines


def _remove_owners(network: str, doomed_of: Callable[[str], bool]) -> None:
    """Under the lock: delete the elements whose owner key ``doomed_of(key)`` is true."""
    names = Names(network_hash(network))
    with table_lock():
        state = read_state()
        if not state.exists or names.h not in state.networks:
            return
        owners = {e.owner for m in names.maps for e in state.elements.get(m, [])}
        doomed = {o for o in owners if doomed_of(o)}
        lines, remaining = _removal(state, names, doomed)
        if remaining == 0:
            lines = _drop_network(state, names)
        elif not doomed:
            return
        nft.apply("\n".join(lines) + "\n")


# ---- the backend interface ------------------------------------------------------------


def add(cfg: PortMapConfig, owner: Owner, targets: Targets) -> None:
    names = Names(network_hash(cfg.network))
    wanted = _desired_elements(cfg, names, targets)
    with table_lock():
        state = read_state()
        lines = [f"add table {FAMILY} {TABLE}"]
        lines += _network_objects(names)
        lines += _network_rules(cfg, names)
        lines += _base_chains(state.networks | {names.h})
        for map_name in names.maps:
            new_keys = {e.key for e in wanted.get(map_name, [])}
            for elem in state.elements.get(map_name, []):
                # Our old elements go; another container's element on a key we now claim
                # goes too: the last ADD of a host port wins, as with the reference.
                if elem.owner == owner.key or elem.key in new_keys:
                    lines.append(f"delete element {FAMILY} {TABLE} {map_name} {_elem_text(elem.key)}")
            for elem in wanted.get(map_name, []):
                lines.append(
                    f"add element {FAMILY} {TABLE} {map_name} {_elem_text(elem.key, elem.data, owner.comment)}"
                )
        for family, prefixes in _masq_sources(cfg, targets).items():
            lines.append(f"add element {FAMILY} {TABLE} {names.src(family)} {{ {', '.join(prefixes)} }}")
        nft.apply("\n".join(lines) + "\n")


def delete(cfg: PortMapConfig, owner: Owner) -> None:
    _remove_owners(cfg.network, lambda key: key == owner.key)


def gc(cfg: PortMapConfig, valid: list[Owner]) -> None:
    keep = {o.key for o in valid}
    _remove_owners(cfg.network, lambda key: key not in keep)


def check(cfg: PortMapConfig, owner: Owner, targets: Targets) -> None:
    names = Names(network_hash(cfg.network))
    state = read_state()
    if not state.exists or names.h not in state.networks:
        raise CNIError(
            ERR_INTERNAL,
            f"no nftables port mappings for network {cfg.network!r}",
            f"table {FAMILY} {TABLE} lacks the network's chain {names.dnat}; run ADD again",
        )
    for chain, _hook, _priority, target in BASE_CHAINS:
        if getattr(names, target) not in state.jumps.get(chain, set()):
            raise CNIError(
                ERR_INTERNAL,
                f"nftables chain {chain} does not jump to {getattr(names, target)}",
                "run ADD again to restore the port mappings",
            )
    for map_name, elems in _desired_elements(cfg, names, targets).items():
        present = {(e.key, e.data) for e in state.elements.get(map_name, []) if e.owner == owner.key}
        for elem in elems:
            if (elem.key, elem.data) not in present:
                raise CNIError(
                    ERR_INTERNAL,
                    f"missing port mapping {' . '.join(elem.key)} -> "
                    f"{' . '.join(elem.data)} in nftables map {map_name}",
                    "run ADD again to restore the port mappings",
                )


# ---- locking -------------------------------------------------------------------


def table_lock() -> ContextManager[None]:
    """The per-namespace lock, held for one read of the table and the transaction that follows."""
    return netns_lock(LOCK_NAME, "the portmap nftables lock", LOCK_TIMEOUT)
