"""macspoofchk: drop frames from a pod's host veth whose source MAC is not the pod's.

nftables in the node namespace, laid out like the reference: table ``bridge
nat``, base chain PREROUTING (filter hook, priority -300) with one jump per
attachment to a chain that returns for the allowed MAC and drops the rest.
Chain names derive from a hash of network, container ID and interface, and
every rule's comment carries a tag of the network and that hash, so DEL finds
one attachment's rules without its namespace and GC finds a network's stale ones.
"""

from __future__ import annotations

from typing import Any

from cni_plugins.kernel import names, nft
from cni_plugins.spec.errors import ERR_INTERNAL, CNIError

TABLE = "nat"
BASE = "PREROUTING"
_CHAIN_PREFIX = "cni_br_iface_"
_UNSAFE = set("\"\\;{}#$ \t\n'")


def _digest(text: str, length: int) -> str:
    return names.short_hash(text, length)


def network_tag(network: str) -> str:
    return _digest(network, 8)


def attachment_id(network: str, container_id: str, ifname: str) -> str:
    return _digest(f"{network}/{container_id}/{ifname}", 16)


def _chains(attachment: str) -> tuple[str, str]:
    chain = f"{_CHAIN_PREFIX}{attachment}"
    return chain, f"{chain}_mac"


def _comment(network: str, attachment: str) -> str:
    return f"macspoofchk {network_tag(network)} {attachment}"


def setup(network: str, container_id: str, ifname: str, host_iface: str, mac: str) -> None:
    """Allow only ``mac`` as source on frames entering the bridge from ``host_iface``."""
    if not host_iface or _UNSAFE & set(host_iface) or len(host_iface) > 15:
        raise CNIError(ERR_INTERNAL, f"invalid interface name {host_iface!r} for the spoof check")
    octets = mac.split(":")
    if len(octets) != 6 or not all(len(o) == 2 and all(c in "0123456789abcdefABCDEF" for c in o) for o in octets):
        raise CNIError(ERR_INTERNAL, f"invalid MAC address {mac!r} for the spoof check")
    attachment = attachment_id(network, container_id, ifname)
    chain, mac_chain = _chains(attachment)
    note = nft.comment(_comment(network, attachment))
    nft.apply(
        f"table bridge {TABLE} {{\n"
        f"  chain {BASE} {{ type filter hook prerouting priority -300; policy accept; }}\n"
        f"  chain {chain} {{ }}\n"
        f"  chain {mac_chain} {{ }}\n"
        f"}}\n"
        f"flush chain bridge {TABLE} {chain}\n"
        f"flush chain bridge {TABLE} {mac_chain}\n"
        f'add rule bridge {TABLE} {BASE} iifname "{host_iface}" jump {chain} comment {note}\n'
        f"add rule bridge {TABLE} {chain} jump {mac_chain} comment {note}\n"
        f"add rule bridge {TABLE} {mac_chain} ether saddr {mac.lower()} return comment {note}\n"
        f"add rule bridge {TABLE} {mac_chain} drop comment {note}\n"
    )


def _installed() -> tuple[list[dict[str, Any]], set[str]] | None:
    """The rules of the base chain and the names of all chains in the table; None when there is none."""
    try:
        listed = nft.list_json("table", "bridge", TABLE)
    except nft.NftError as exc:
        if exc.missing:
            return None
        raise
    if listed is None:
        return None
    base_rules = [obj["rule"] for obj in listed if "rule" in obj and obj["rule"].get("chain") == BASE]
    chains = {obj["chain"]["name"] for obj in listed if "chain" in obj}
    return base_rules, chains


def _jump_handles(base_rules: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Per attachment hash, the handles of the base-chain rules that jump to its chain."""
    jumps: dict[str, list[int]] = {}
    for rule in base_rules:
        for stmt in rule.get("expr", []):
            target = stmt.get("jump", {}).get("target", "")
            if target.startswith(_CHAIN_PREFIX):
                jumps.setdefault(target[len(_CHAIN_PREFIX) :], []).append(int(rule["handle"]))
    return jumps


def _remove(attachments: list[str], base_rules: list[dict[str, Any]], chains: set[str]) -> None:
    jumps = _jump_handles(base_rules)
    ops = []
    for attachment in attachments:
        ops += [f"delete rule bridge {TABLE} {BASE} handle {handle}\n" for handle in jumps.get(attachment, [])]
        ours = [c for c in _chains(attachment) if c in chains]
        ops += [f"flush chain bridge {TABLE} {c}\n" for c in ours]
        ops += [f"delete chain bridge {TABLE} {c}\n" for c in ours]
    if ops:
        nft.apply("".join(ops))


def teardown(network: str, container_id: str, ifname: str) -> None:
    """Remove one attachment's spoof check; nothing installed is success."""
    state = _installed()
    if state is not None:
        _remove([attachment_id(network, container_id, ifname)], *state)


def gc(network: str, valid: list[tuple[str, str]]) -> None:
    """Remove the spoof checks of ``network`` whose attachment is not in ``valid``."""
    state = _installed()
    if state is None:
        return
    base_rules, chains = state
    keep = {attachment_id(network, cid, ifname) for cid, ifname in valid}
    tag = network_tag(network)
    stale = set()
    for rule in base_rules:
        words = rule.get("comment", "").split()
        if len(words) == 3 and words[0] == "macspoofchk" and words[1] == tag and words[2] not in keep:
            stale.add(words[2])
    _remove(sorted(stale), base_rules, chains)
