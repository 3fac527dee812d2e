"""tests/e2e/kit/rootns.py: the e2e suites' root-namespace check flags what is ours and nothing else.

Fed with what `ip -j`, `tc -j` and `nft list ruleset` print; no root and no namespaces needed.
"""

from __future__ import annotations

import copy

from tests.e2e.kit import rootns


def _link(name, kind="", master=None, flags=("BROADCAST", "UP", "LOWER_UP"), mtu=1500):
    link = {"ifname": name, "flags": list(flags), "mtu": mtu}
    if kind:
        link["linkinfo"] = {"info_kind": kind}
    if master:
        link["master"] = master
    return link


def _addrs(name, *addrs):
    return {
        "ifname": name,
        "addr_info": [
            {"family": "inet6" if ":" in a else "inet", "local": a.split("/")[0], "prefixlen": int(a.split("/")[1])}
            for a in addrs
        ],
    }


NFT = """\
table ip nat {
\tchain POSTROUTING {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr 172.17.0.0/16 oifname != "docker0" masquerade
\t}
}
table inet firewalld {
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t}
}
"""


def machine() -> dict:
    """A root namespace like a fresh CI machine's: lo and eth0, a default route, a docker rule."""
    return {
        "links": [_link("lo", flags=("LOOPBACK", "UP", "LOWER_UP"), mtu=65536), _link("eth0")],
        "addresses": [_addrs("lo", "127.0.0.1/8"), _addrs("eth0", "192.0.2.2/24")],
        "routes": [
            {"dst": "default", "gateway": "192.0.2.1", "dev": "eth0"},
            {"dst": "192.0.2.0/24", "dev": "eth0", "protocol": "kernel", "scope": "link"},
        ],
        "rules": [{"priority": 0, "src": "all", "table": "local"}],
        "qdiscs": [{"kind": "pfifo_fast", "dev": "eth0", "root": True, "refcnt": 2}],
        "nftables": NFT,
        "sysctl": {"net.ipv4.ip_forward": "0"},
    }


def diff(before: dict, after: dict) -> list[str]:
    first = rootns.attribute(before)
    return rootns.differences(first, rootns.attribute(after, first.watch))


def test_unrelated_churn_is_not_a_change():
    before = machine()
    after = copy.deepcopy(before)
    # `modprobe ifb` (the bandwidth plugin in a test namespace) makes ifb0/ifb1 appear in every namespace.
    after["links"] += [_link("ifb0", "ifb", flags=("BROADCAST", "NOARP")), _link("ifb1", "ifb")]
    # br_netfilter loaded: its sysctl appears.
    after["sysctl"]["net.bridge.bridge-nf-call-iptables"] = "1"
    # Another engine's bridge, address, route and firewall rules; another table altogether.
    after["links"] += [_link("docker0", "bridge"), _link("br-1234", "bridge")]
    after["addresses"].append(_addrs("docker0", "172.17.0.1/16"))
    after["routes"].append({"dst": "172.17.0.0/16", "dev": "docker0", "protocol": "kernel"})
    after["qdiscs"].append({"kind": "noqueue", "dev": "docker0", "root": True})
    after["nftables"] = (
        NFT.replace("\t}\n}\ntable inet", "\t\tip saddr 172.18.0.0/16 masquerade\n\t}\n}\ntable inet", 1)
        + "table ip docker {\n\tchain x {\n\t}\n}\n"
    )
    # A refcount and a privacy address on the watched link come and go by themselves.
    after["qdiscs"][0]["refcnt"] = 5
    after["addresses"][1]["addr_info"].append(
        {"family": "inet6", "local": "2001:db8::99", "prefixlen": 64, "temporary": True, "dynamic": True}
    )
    assert diff(before, after) == []


def test_a_pod_veth_bridge_or_ifb_in_the_root_namespace_is_flagged():
    for name, kind in (
        ("veth1a2b3c4d", "veth"),
        ("cni0", "bridge"),
        ("e2ebr0", "bridge"),
        ("bwp5e6f", "ifb"),
        ("pycni.1", "vxlan"),
        ("cni-podman0", "bridge"),
    ):
        after = machine()
        after["links"].append(_link(name, kind))
        changed = diff(machine(), after)
        assert len(changed) == 1 and changed[0].startswith("links:") and name in changed[0], (name, changed)


def test_our_addresses_routes_and_rules_are_flagged_on_any_link():
    after = machine()
    after["addresses"][1]["addr_info"].append({"family": "inet", "local": "10.88.7.1", "prefixlen": 24})
    after["routes"].append({"dst": "10.244.1.0/24", "gateway": "192.0.2.7", "dev": "eth0"})
    after["rules"].append({"priority": 100, "src": "10.88.7.0/24", "table": "main"})
    changed = diff(machine(), after)
    assert [c.split(":")[0] for c in changed] == ["addresses", "routes", "rules"], changed


def test_the_default_route_links_are_watched():
    enslaved = machine()
    enslaved["links"][1]["master"] = "pycni0"
    assert "links" in diff(machine(), enslaved)[0]
    gone = machine()
    del gone["links"][1]
    gone["addresses"].pop()
    gone["routes"] = []
    gone["qdiscs"] = []
    changed = diff(machine(), gone)
    assert any('"missing": true' in c for c in changed) and any(c.startswith("routes:") for c in changed)
    shaped = machine()
    shaped["qdiscs"].append({"kind": "tbf", "dev": "eth0", "handle": "1:", "root": True})
    assert diff(machine(), shaped)[0].startswith("qdiscs:")


def test_our_nftables_tables_chains_and_jumps_are_flagged_and_others_are_not():
    after = machine()
    after["nftables"] = NFT.replace(
        "\t\tip saddr 172.17", "\t\tip saddr 10.88.7.2 jump CNI-0a1b2c\n\t\tip saddr 172.17"
    )
    after["nftables"] += (
        "table inet pycni_masq {\n\tmap pods4 {\n\t\ttype ipv4_addr : verdict\n\t}\n"
        "\tchain postrouting {\n\t\tip saddr vmap @pods4\n\t}\n}\n"
    )
    changed = diff(machine(), after)
    assert len(changed) == 1 and changed[0].startswith("nftables:")
    assert (
        "CNI-0a1b2c" in changed[0] and "table inet pycni_masq / chain postrouting: ip saddr vmap @pods4" in changed[0]
    )
    assert "172.17" not in changed[0]


def test_a_changed_forwarding_sysctl_is_flagged():
    after = machine()
    after["sysctl"]["net.ipv4.ip_forward"] = "1"
    assert diff(machine(), after) == ["sysctl: changed {'net.ipv4.ip_forward': ('0', '1')} gone []"]


def test_the_real_namespace_reads_and_compares_equal_to_itself():
    first = rootns.snapshot()
    assert "lo" in first.watch
    assert rootns.differences(first, rootns.snapshot(watch=first.watch)) == []
