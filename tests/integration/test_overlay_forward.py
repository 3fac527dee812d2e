"""Accept rules for the cluster network in chains whose forward policy drops (pycni.overlay.forward). Root only.

Every firewall change happens in namespaces these tests create (make_pod,
deleted when the test ends, also when it fails): `iptables -P FORWARD DROP`
as Docker sets it, an nftables.conf-style `inet filter` forward chain with
policy drop, and a three-namespace chain (A - router R - B) whose router drops
forwarded traffic until the rules are in.
"""

from __future__ import annotations

import json

import pytest

from pycni.overlay import forward
from tests.helpers.netenv import ping, wait_until

pytestmark = pytest.mark.integration

NET4 = "10.244.0.0/16"
NET6 = "fd00:10::/48"
NOTE4 = f'"pycni-overlay: accept cluster network {NET4}"'
NOTE6 = f'"pycni-overlay: accept cluster network {NET6}"'
OURS4 = [
    f"-A FORWARD -s {NET4} -m comment --comment {NOTE4} -j ACCEPT",
    f"-A FORWARD -d {NET4} -m comment --comment {NOTE4} -j ACCEPT",
]
OURS6 = [
    f"-A FORWARD -s {NET6} -m comment --comment {NOTE6} -j ACCEPT",
    f"-A FORWARD -d {NET6} -m comment --comment {NOTE6} -j ACCEPT",
]
NFT_OURS = [
    f"ip saddr {NET4} accept comment {NOTE4}",
    f"ip daddr {NET4} accept comment {NOTE4}",
    f"ip6 saddr {NET6} accept comment {NOTE6}",
    f"ip6 daddr {NET6} accept comment {NOTE6}",
]

INET_FILTER = """
table inet filter {
    chain forward {
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "eth9" accept
    }
}
"""


def forward_chain(ns, family: int = 4) -> list[str]:
    """`iptables -S FORWARD` (ip6tables for 6) inside ns: the policy line, then the rules."""
    tool = "iptables" if family == 4 else "ip6tables"
    return ns.exec(tool, "-w", "-S", "FORWARD").stdout.splitlines()


def ruleset_text(ns) -> str:
    return ns.exec("nft", "list", "ruleset").stdout


def chain_rules(ns, family: str, table: str, chain: str) -> list[str]:
    """A chain's rules as `nft list chain` prints them (one line each, handles left out)."""
    lines = [line.strip() for line in ns.exec("nft", "list", "chain", family, table, chain).stdout.splitlines()]
    start = lines.index(f"chain {chain} {{") + 1
    if lines[start].startswith("type "):
        start += 1
    return [line for line in lines[start:] if line and line != "}"]


def nft_comments(ns) -> list[tuple[str, str, str, str]]:
    """(family, table, chain, comment) of every rule with an nft comment."""
    objects = json.loads(ns.exec("nft", "-j", "list", "ruleset").stdout)["nftables"]
    return [
        (r["family"], r["table"], r["chain"], r["comment"])
        for r in (o["rule"] for o in objects if "rule" in o)
        if "comment" in r
    ]


def ensure(ns, *networks: str) -> list[str]:
    return ns.run_in(forward.ensure_forward_accept, list(networks))


def remove(ns, *networks: str) -> list[str]:
    return ns.run_in(forward.remove_forward_accept, list(networks))


# -- (a) iptables: policy DROP, as Docker sets it -------------------------------------------


def test_iptables_forward_drop_gets_our_rules_first_and_loses_them_on_remove(make_pod):
    ns = make_pod("fwd")
    ns.exec("iptables", "-w", "-N", "DOCKER-USER")
    ns.exec("iptables", "-w", "-A", "FORWARD", "-j", "DOCKER-USER")
    ns.exec("iptables", "-w", "-A", "FORWARD", "-i", "eth9", "-j", "ACCEPT")
    ns.exec("iptables", "-w", "-P", "FORWARD", "DROP")
    ns.exec("ip6tables", "-w", "-P", "FORWARD", "DROP")
    before4, before6 = forward_chain(ns, 4), forward_chain(ns, 6)
    assert ns.run_in(forward.forward_drops) == [
        "iptables: filter FORWARD, policy DROP",
        "ip6tables: filter FORWARD, policy DROP",
    ]

    actions = ensure(ns, NET4, NET6)
    assert len(actions) == 2 and "iptables filter FORWARD" in actions[0] and "ip6tables" in actions[1]
    assert forward_chain(ns, 4) == [before4[0], *OURS4, *before4[1:]]
    assert forward_chain(ns, 6) == [before6[0], *OURS6, *before6[1:]]
    assert nft_comments(ns) == []  # iptables-nft's chain is left to iptables: no nft-native duplicates

    assert ensure(ns, NET4, NET6) == []  # nothing changed: nothing done
    assert forward_chain(ns, 4) == [before4[0], *OURS4, *before4[1:]]

    # Someone puts a rule above ours (Docker re-inserting its jump on restart, say): ours go back on top.
    ns.exec("iptables", "-w", "-I", "FORWARD", "1", "-i", "eth8", "-j", "DROP")
    theirs = "-A FORWARD -i eth8 -j DROP"
    assert ensure(ns, NET4, NET6) == [actions[0] + " (removed 2 of ours)"]
    assert forward_chain(ns, 4) == [before4[0], *OURS4, theirs, *before4[1:]]
    # One of ours deleted by hand: repaired.
    ns.exec(
        "iptables", "-w", "-D", "FORWARD", "-d", NET4, "-m", "comment", "--comment", NOTE4.strip('"'), "-j", "ACCEPT"
    )
    assert forward_chain(ns, 4) == [before4[0], OURS4[0], theirs, *before4[1:]]
    assert len(ensure(ns, NET4, NET6)) == 1
    assert forward_chain(ns, 4) == [before4[0], *OURS4, theirs, *before4[1:]]

    assert len(remove(ns, NET4, NET6)) == 2
    assert forward_chain(ns, 4) == [before4[0], theirs, *before4[1:]]  # every other rule kept, in order
    assert forward_chain(ns, 6) == before6
    assert remove(ns, NET4, NET6) == []  # idempotent


def test_iptables_ensure_touches_only_the_families_of_the_networks(make_pod):
    ns = make_pod("fwd")
    ns.exec("iptables", "-w", "-P", "FORWARD", "DROP")
    ns.exec("ip6tables", "-w", "-P", "FORWARD", "DROP")
    assert len(ensure(ns, NET4)) == 1
    assert forward_chain(ns, 4)[1:] == OURS4
    assert forward_chain(ns, 6) == ["-P FORWARD DROP"]
    # The cluster network changed: the rules for the old one go, the new ones come first.
    assert len(ensure(ns, "10.245.0.0/16")) == 1
    assert [line.split()[3] for line in forward_chain(ns, 4)[1:]] == ["10.245.0.0/16", "10.245.0.0/16"]


def test_iptables_rules_stay_while_the_policy_is_accept(make_pod):
    ns = make_pod("fwd")
    ns.exec("iptables", "-w", "-P", "FORWARD", "DROP")
    ensure(ns, NET4)
    ns.exec("iptables", "-w", "-P", "FORWARD", "ACCEPT")
    ns.exec("iptables", "-w", "-I", "FORWARD", "1", "-i", "eth8", "-j", "ACCEPT")
    assert ensure(ns, NET4) == []  # nothing drops by policy: nothing to keep first
    assert remove(ns, NET4) != []
    assert forward_chain(ns, 4) == ["-P FORWARD ACCEPT", "-A FORWARD -i eth8 -j ACCEPT"]


# -- (b) nftables: a forward chain with policy drop ------------------------------------------


def test_nft_forward_drop_chain_gets_our_rules_first_and_loses_them_on_remove(make_pod):
    ns = make_pod("fwd")
    _nft_load(
        ns,
        INET_FILTER
        + """
table ip my-fw {
    chain fwd-drop {
        type filter hook forward priority 10; policy drop;
        counter
    }
    chain other {
        iifname "eth7" accept
    }
}
table inet open {
    chain forward {
        type filter hook forward priority 5; policy accept;
    }
}
""",
    )
    before = ruleset_text(ns)
    inet_before = chain_rules(ns, "inet", "filter", "forward")
    assert ns.run_in(forward.forward_drops) == [
        "nft: inet filter forward, policy drop",
        "nft: ip my-fw fwd-drop, policy drop",
    ]

    actions = ensure(ns, NET4, NET6)
    assert actions == [
        f"nft inet filter forward (policy drop): put the accept rules for {NET4}, {NET6} first",
        f"nft ip my-fw fwd-drop (policy drop): put the accept rules for {NET4} first",
    ]
    assert chain_rules(ns, "inet", "filter", "forward") == NFT_OURS + inet_before
    assert chain_rules(ns, "ip", "my-fw", "fwd-drop") == NFT_OURS[:2] + ["counter packets 0 bytes 0"]
    assert chain_rules(ns, "ip", "my-fw", "other") == ['iifname "eth7" accept']
    assert chain_rules(ns, "inet", "open", "forward") == []  # accepts by policy: left alone

    assert ensure(ns, NET4, NET6) == []
    assert chain_rules(ns, "inet", "filter", "forward") == NFT_OURS + inet_before

    # A rule inserted above ours by someone else: ours move back to the top, theirs stays.
    ns.exec("nft", "insert", "rule", "inet", "filter", "forward", "iifname", "eth8", "drop")
    assert ensure(ns, NET4, NET6) == [actions[0] + " (removed 4 of ours)"]
    assert chain_rules(ns, "inet", "filter", "forward") == NFT_OURS + ['iifname "eth8" drop'] + inet_before

    assert len(remove(ns, NET4, NET6)) == 2
    assert chain_rules(ns, "inet", "filter", "forward") == ['iifname "eth8" drop'] + inet_before
    ns.exec(
        "nft", "delete", "rule", "inet", "filter", "forward", "handle", _first_handle(ns, "inet", "filter", "forward")
    )
    assert ruleset_text(ns).replace("packets 0 bytes 0", "") == before.replace("packets 0 bytes 0", "")
    assert remove(ns, NET4, NET6) == []


def test_nft_chains_left_alone_are_reported(make_pod):
    ns = make_pod("fwd")
    _nft_load(
        ns,
        """
table bridge l2 {
    chain forward {
        type filter hook forward priority 0; policy drop;
    }
}
""",
    )
    ns.exec("iptables", "-w", "-t", "mangle", "-P", "FORWARD", "DROP")
    before = ruleset_text(ns)
    assert sorted(ns.run_in(forward.forward_drops)) == [
        "nft: bridge l2 forward, policy drop (bridged traffic: pycni adds no rules here)",
        "nft: ip mangle FORWARD, policy drop (iptables-nft's mangle table: pycni adds no rules here)",
    ]
    assert ensure(ns, NET4, NET6) == []
    assert ruleset_text(ns) == before


# -- (c) packets through a router whose forward policy drops ---------------------------------


@pytest.fixture
def routed(make_pod):
    """A (10.244.1.2) - R (router, forwarding on) - B (10.244.2.2); veths made in their final namespaces."""
    a, r, b = make_pod("fwa"), make_pod("fwr"), make_pod("fwb")
    for ns, peer, address, gateway in (
        (a, "a0", "10.244.1.2/24", "10.244.1.1"),
        (b, "b0", "10.244.2.2/24", "10.244.2.1"),
    ):
        ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns", r.name)
        ns.ip("addr", "add", address, "dev", "eth0")
        ns.ip("link", "set", "eth0", "up")
        ns.ip("link", "set", "lo", "up")
        ns.ip("route", "add", "default", "via", gateway)
        r.ip("addr", "add", gateway + "/24", "dev", peer)
        r.ip("link", "set", peer, "up")
    r.exec("sysctl", "-qw", "net.ipv4.ip_forward=1")
    assert wait_until(lambda: ping(a, "10.244.2.2", wait=1), timeout=5), "test topology broken: A cannot reach B"
    return a, r, b


@pytest.mark.parametrize("dropped_by", ["iptables", "nft"])
def test_packets_flow_through_a_dropping_router_only_with_the_rules(routed, dropped_by):
    a, r, b = routed
    if dropped_by == "iptables":
        r.exec("iptables", "-w", "-P", "FORWARD", "DROP")
    else:
        _nft_load(r, INET_FILTER)
    assert not ping(a, "10.244.2.2", wait=0.5)

    assert ensure(r, NET4) != []
    assert wait_until(lambda: ping(a, "10.244.2.2", wait=1), timeout=5)
    assert ping(b, "10.244.1.2")

    assert remove(r, NET4) != []
    assert not ping(a, "10.244.2.2", wait=0.5)


# -- (d) nothing drops ----------------------------------------------------------------------------


def test_nothing_drops_nothing_changes(make_pod):
    ns = make_pod("fwd")
    assert ns.run_in(forward.forward_drops) == []
    assert ensure(ns, NET4, NET6) == []
    assert ruleset_text(ns) == ""  # not even an empty table was made
    assert forward_chain(ns, 4) == ["-P FORWARD ACCEPT"] and forward_chain(ns, 6) == ["-P FORWARD ACCEPT"]
    # Forward chains that accept by policy, with rules of their own: left alone too.
    ns.exec("iptables", "-w", "-A", "FORWARD", "-i", "eth9", "-j", "DROP")
    _nft_load(ns, INET_FILTER.replace("policy drop", "policy accept"))
    before = ruleset_text(ns)
    assert ensure(ns, NET4, NET6) == []
    assert remove(ns, NET4, NET6) == []
    assert ruleset_text(ns) == before


# -- (e) hostile input ----------------------------------------------------------------------------


HOSTILE = [
    "10.244.0.0/16 accept; flush ruleset",
    '10.244.0.0/16" -j DROP',
    "10.244.0.0/16 -j DROP",
    "10.244.0.0/16\n-P FORWARD ACCEPT",
    "10.244.0.1/16",  # host bits set: not a network
    "10.244.0.0/33",
    "",
    "pods",
]


@pytest.mark.parametrize("bad", HOSTILE)
def test_hostile_networks_are_refused_and_nothing_is_applied(make_pod, bad):
    ns = make_pod("fwd")
    ns.exec("iptables", "-w", "-P", "FORWARD", "DROP")
    _nft_load(ns, INET_FILTER)
    before = ruleset_text(ns)
    with pytest.raises(ValueError):
        ensure(ns, NET4, bad)  # a good network with a bad one: nothing at all is applied
    with pytest.raises(ValueError):
        remove(ns, bad)
    assert ruleset_text(ns) == before


def test_networks_must_be_a_list_of_strings(make_pod):
    ns = make_pod("fwd")
    ns.exec("iptables", "-w", "-P", "FORWARD", "DROP")
    with pytest.raises(ValueError, match="not the single string"):
        ns.run_in(forward.ensure_forward_accept, NET4)
    with pytest.raises(ValueError):
        ns.run_in(forward.ensure_forward_accept, [167772160])
    assert forward_chain(ns, 4) == ["-P FORWARD DROP"]


# -- helpers ---------------------------------------------------------------------------------------


def _nft_load(ns, ruleset: str) -> None:
    import subprocess

    subprocess.run(
        ["ip", "netns", "exec", ns.name, "nft", "-f", "-"],
        input=ruleset,
        text=True,
        check=True,
        capture_output=True,
        timeout=30,
    )


def _first_handle(ns, family: str, table: str, chain: str) -> str:
    objects = json.loads(ns.exec("nft", "-j", "list", "chain", family, table, chain).stdout)["nftables"]
    return str(next(o["rule"]["handle"] for o in objects if "rule" in o))
