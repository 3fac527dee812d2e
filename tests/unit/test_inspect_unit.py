"""pycni.inspect without a network: parsing nft/tc/cache/lease data, health, direct routing, and the text and
Graphviz renderings (with the pictures' proportions measured from real PNGs)."""

from __future__ import annotations

import base64
import ipaddress
import json
import math
import shutil
import struct

import pytest

from pycni.inspect import collect, render
from pycni.inspect.cluster import ClusterView, LeaseView, RejectedView, judge
from pycni.inspect.collect import Bridge, NodeView, Pod, PortMapping, Remote, Shaping, Vxlan

PORTMAP_RULESET = [
    {
        "map": {
            "family": "inet",
            "name": "nabc_any4",
            "table": "pycni_portmap",
            "elem": [
                [
                    {"elem": {"val": {"concat": ["tcp", 17080]}, "comment": "6cd4 net/c1/eth0"}},
                    {"concat": ["10.244.0.2", 7080]},
                ]
            ],
        }
    },
    {
        "map": {
            "family": "inet",
            "name": "nabc_hip4",
            "table": "pycni_portmap",
            "elem": [[{"concat": ["192.168.1.5", "udp", 53]}, {"concat": ["10.244.0.3", 5353]}]],
        }
    },
    {
        "map": {
            "family": "inet",
            "name": "other",
            "table": "not_ours",
            "elem": [[{"concat": ["tcp", 1]}, {"concat": ["10.0.0.1", 1]}]],
        }
    },
    {
        "map": {
            "family": "inet",
            "name": "pods4",
            "table": "pycni_masq",
            "elem": [
                [{"elem": {"val": "10.88.0.2", "comment": "t net c1 eth0"}}, {"jump": {"target": "net4_0a580000_24"}}]
            ],
        }
    },
    {
        "set": {
            "family": "inet",
            "name": "members",
            "table": "pycni_overlay",
            "elem": ["192.168.100.11", "192.168.100.9"],
        }
    },
    {
        "rule": {
            "family": "inet",
            "table": "pycni_overlay",
            "chain": "postrouting",
            "expr": [{"match": {}}, {"masquerade": {"flags": "fully-random"}}],
        }
    },
]


def test_portmap_entries_are_read_from_the_maps():
    assert collect._portmaps(PORTMAP_RULESET) == [
        PortMapping("tcp", 17080, "10.244.0.2", 7080),
        PortMapping("udp", 53, "10.244.0.3", 5353, "192.168.1.5"),
    ]
    assert (
        PortMapping("udp", 53, "10.244.0.3", 5353, "192.168.1.5").describe() == "udp 192.168.1.5:53 -> 10.244.0.3:5353"
    )


def test_masquerade_and_overlay_tables_are_read():
    assert collect._masquerade(PORTMAP_RULESET) == {"10.88.0.2": "pycni_masq net4_0a580000_24"}
    assert collect._overlay_table(PORTMAP_RULESET) == (["192.168.100.9", "192.168.100.11"], True)


def test_shaping_comes_from_tbf_on_the_veth_and_on_its_ifb():
    qdiscs = [
        {"kind": "tbf", "dev": "veth1", "root": True, "options": {"rate": 125000, "burst": 12500}},
        {"kind": "ingress", "dev": "veth1", "parent": "ffff:fff1"},
        {"kind": "tbf", "dev": "bwp1", "root": True, "options": {"rate": 250000, "burst": 6250}},
        {"kind": "tbf", "dev": "veth2", "root": True, "options": {"rate": 1, "burst": 1}},
    ]
    shaping = collect._shaping(qdiscs, "veth1", "bwp1")
    assert shaping == Shaping(1_000_000, 12500, 2_000_000, 6250, "bwp1")
    assert shaping.describe() == "to pod 1 Mbit/s (burst 12500 B), from pod 2 Mbit/s (burst 6250 B, ifb bwp1)"
    assert collect._shaping(qdiscs, "veth9", "") is None
    assert [collect.rate(v) for v in (999, 1500, 2_500_000, 10**10)] == [
        "999 bit/s",
        "1.5 kbit/s",
        "2.5 Mbit/s",
        "10 Gbit/s",
    ]


def test_pods_come_from_the_result_cache_and_from_leases(tmp_path):
    data_dir = tmp_path / "ipam"
    config = {
        "cniVersion": "1.1.0",
        "name": "podnet",
        "plugins": [{"type": "vxlan", "dataDir": str(data_dir)}, {"type": "portmap"}],
    }
    entry = {
        "kind": "cniCacheV1",
        "containerId": "c1",
        "ifName": "eth0",
        "networkName": "podnet",
        "netns": "/var/run/netns/p1",
        "config": base64.b64encode(json.dumps(config).encode()).decode(),
        "result": {
            "cniVersion": "1.1.0",
            "interfaces": [
                {"name": "pycni0", "mac": "aa:00:00:00:00:01"},
                {"name": "veth1", "mac": "aa:00:00:00:00:02"},
                {"name": "eth0", "mac": "aa:00:00:00:00:03", "mtu": 1450, "sandbox": "/x"},
                {"name": "bwp1", "mac": "aa:00:00:00:00:04"},
            ],
            "ips": [{"interface": 2, "address": "10.244.0.2/24", "gateway": "10.244.0.1"}],
        },
    }
    (tmp_path / "cache" / "results").mkdir(parents=True)
    (tmp_path / "cache" / "results" / "podnet-c1-eth0").write_text(json.dumps(entry))
    notes: list[str] = []
    pods, data_dirs, hosts = collect.cached_pods(str(tmp_path / "cache"), notes)
    (pod,) = pods
    assert (pod.container_id, pod.network, pod.netns, pod.addresses, pod.gateway, pod.mac, pod.mtu) == (
        "c1",
        "podnet",
        "/var/run/netns/p1",
        ["10.244.0.2/24"],
        "10.244.0.1",
        "aa:00:00:00:00:03",
        1450,
    )
    assert data_dirs == [str(data_dir)] and hosts[id(pod)] == ["pycni0", "veth1", "bwp1"] and not notes

    (data_dir / "podnet").mkdir(parents=True)
    (data_dir / "podnet" / "10.244.0.2").write_text("c1\neth0")  # known from the cache
    (data_dir / "podnet" / "10.244.0.7").write_text("other-runtime\neth1")
    (data_dir / "podnet" / "lock").write_text("")
    (data_dir / "podnet" / "last_reserved_ip.0").write_text("10.244.0.7")
    (lease,) = collect.leased_pods([str(data_dir), str(tmp_path / "missing")], pods)
    assert (lease.container_id, lease.ifname, lease.addresses, lease.source) == (
        "other-runtime",
        "eth1",
        ["10.244.0.7"],
        "lease",
    )


def view() -> NodeView:
    pod = Pod(
        container_id='evil<b>&"x"',
        network="podnet",
        netns="/run/netns/p1",
        netns_name="p1",
        addresses=["10.244.0.2/24"],
        mac="aa:00:00:00:00:03",
        mtu=1450,
        host_veth="veth1",
        bridge="pycni0",
        gateway="10.244.0.1",
        masquerade="pycni_overlay (leaving the cluster network)",
        port_mappings=[PortMapping("tcp", 8080, "10.244.0.2", 80)],
        shaping=Shaping(1_000_000, 12500, None, None, ""),
    )
    remotes = [
        Remote("192.168.100.11", "10.244.1.0/24", "0a:00:00:00:00:11", "10.244.1.0", "n1", True, True, True, True),
        Remote("192.168.100.12", "10.244.2.0/24", "0a:00:00:00:00:12", "10.244.2.0", "n2", False, True, True, True),
    ]
    return NodeView(
        name="n0",
        public_ip="192.168.100.10",
        network="10.244.0.0/16",
        subnet="10.244.0.0/24",
        gateway="10.244.0.1",
        mtu=1450,
        underlay="eth0",
        bridges=[Bridge("pycni0", "aa:00:00:00:00:01", 1450, "UP", ["10.244.0.1/24"], ["veth1"])],
        pods=[pod],
        vxlans=[
            Vxlan(
                "pycni.1",
                1,
                8472,
                "192.168.100.10",
                "eth0",
                "0a:00:00:00:00:10",
                1450,
                ["10.244.0.0/32"],
                False,
                remotes,
            )
        ],
        overlay_members=["192.168.100.10", "192.168.100.11"],
        overlay_masquerade=True,
        portmap_entries=[PortMapping("tcp", 8080, "10.244.0.2", 80)],
    )


def test_text_shows_the_tree_and_flags_missing_entries():
    text = render.node_text(view())
    assert text.splitlines()[0] == "node n0  192.168.100.10 on eth0"
    for line in (
        "bridge pycni0  10.244.0.1/24  mac aa:00:00:00:00:01  mtu 1450  up",
        "  └─ veth1 <-> eth0 in netns p1",
        "hostPort tcp 8080 -> 10.244.0.2:80",
        "shaping: to pod 1 Mbit/s (burst 12500 B)",
        "vxlan pycni.1  VNI 1  UDP 8472  local 192.168.100.10 via eth0  10.244.0.0/32  "
        "mac 0a:00:00:00:00:10  mtu 1450  learning off",
        "node n1  192.168.100.11  subnet 10.244.1.0/24  VTEP 0a:00:00:00:00:11 at 10.244.1.0  "
        "(fdb ok, neighbour ok, route ok, in store)",
        "(fdb MISSING, neighbour ok, route ok, in store)",
        "pycni_portmap  tcp 8080 -> 10.244.0.2:80",
    ):
        assert line in text, line


def test_dot_escapes_every_value_and_marks_missing_entries():
    dot = render.node_dot(view())
    assert "evil&lt;b&gt;&amp;&quot;x&quot;" in dot and "evil<b>" not in dot
    assert "missing: FDB" in dot and "#b00020" in dot
    assert dot.startswith("digraph pycni {") and dot.rstrip().endswith("}")
    json.dumps(view().to_dict())  # the JSON form is plain data


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is missing (apt-get install graphviz)")
def test_graphviz_renders_both_pictures():
    svg = render.graphviz(render.node_dot(view()), "svg").decode()
    assert "<svg" in svg and "evil&lt;b&gt;" in svg
    png = render.graphviz(render.cluster_dot(cluster()), "png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_graphviz_the_picture_formats_say_what_to_install(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(render.RenderError, match="apt-get install graphviz"):
        render.graphviz("digraph {}", "png")
    with pytest.raises(render.RenderError):
        render.graphviz("digraph {}", "gif")


def cluster() -> ClusterView:
    return ClusterView(
        store="etcd://10.0.0.1:2379",
        network="10.244.0.0/16",
        subnet_len=24,
        vni=1,
        port=8472,
        leases=[
            LeaseView("n0", "192.168.100.10", "10.244.0.0/24", "0a:00:00:00:00:10"),
            LeaseView("", "192.168.100.11", "10.244.1.0/24", "0a:00:00:00:00:11"),
        ],
        this_node="192.168.100.11",
    )


def test_cluster_text_and_dot_list_every_lease():
    text = render.cluster_text(cluster())
    assert text.splitlines()[0] == (
        "cluster network 10.244.0.0/16: /24 per node, VXLAN VNI 1 on UDP 8472; 2 node(s) in etcd://10.0.0.1:2379"
    )
    assert text.splitlines()[3] == "-     192.168.100.11  10.244.1.0/24  0a:00:00:00:00:11  this node"
    dot = render.cluster_dot(cluster())
    assert dot.count("<B>node ") == 2 and "node ? (this node)" in dot
    assert dot.count("✓ lease ok") == 2 and "run on a node to check its entries too" in dot
    assert "no cluster configuration" in ClusterView(store="file:///x").describe()


def test_reading_tools_that_are_missing_leaves_a_note(monkeypatch, tmp_path):
    errors = collect.readers.ReadErrors()
    monkeypatch.setenv("PATH", str(tmp_path))
    assert collect.readers.run_json(["nft", "-j", "list", "ruleset"], errors, default={}) == {}
    assert errors.notes == ["nft is not installed"]


# ---- dual-stack --------------------------------------------------------------------------------


class Lease:
    def __init__(self, node_name, public_ip, subnet, vtep_mac, ipv6_subnet="", public_ipv6="", vtep_mac6=""):
        self.node_name, self.public_ip, self.subnet, self.vtep_mac = node_name, public_ip, subnet, vtep_mac
        self.ipv6_subnet, self.public_ipv6, self.vtep_mac6 = ipv6_subnet, public_ipv6, vtep_mac6


def kernel(monkeypatch, devices):
    """readers answering for each device: (fdb, neighbours, {4: routes, 6: routes})."""
    monkeypatch.setattr(collect.readers, "fdb", lambda dev, errors=None: devices[dev][0])
    monkeypatch.setattr(collect.readers, "neighbours", lambda dev, errors=None: devices[dev][1])
    monkeypatch.setattr(collect.readers, "routes", lambda errors, *args, version=4: devices[args[1]][2][version])


N1 = Lease("n1", "192.168.100.11", "10.244.1.0/24", "0a:00:00:00:00:11", "fd00:10:244:1::/64")
N2 = Lease(
    "n2", "192.168.100.12", "10.244.2.0/24", "0a:00:00:00:00:12", "fd00:10:244:2::/64", "fd70::12", "0a:66:00:00:00:12"
)


def test_one_device_carrying_both_families_shows_each_familys_entries(monkeypatch):
    kernel(
        monkeypatch,
        {
            "pycni.1": (
                [{"mac": "0a:00:00:00:00:11", "dst": "192.168.100.11"}],
                [
                    {"dst": "10.244.1.0", "lladdr": "0a:00:00:00:00:11"},
                    {"dst": "fe80::1", "lladdr": "0a:00:00:00:00:99"},
                ],
                {
                    4: [{"dst": "10.244.1.0/24", "gateway": "10.244.1.0"}],
                    6: [
                        {"dst": "fd00:10:244::", "protocol": "kernel"},  # the device's own address
                        {"dst": "fd00:10:244:1::/64", "gateway": "fd00:10:244:1::"},
                    ],
                },
            )
        },
    )  # its neighbour entry is missing
    lanes = collect.Lanes(("192.168.100.10",), "pycni.1", "", (4, 6))
    (remote,) = collect._remotes(Vxlan("pycni.1"), [N1], "192.168.100.10", [], lanes)
    assert (remote.node_name, remote.public_ip, remote.subnet, remote.vtep_address) == (
        "n1",
        "192.168.100.11",
        "10.244.1.0/24",
        "10.244.1.0",
    )
    assert (remote.subnet6, remote.vtep_address6, remote.neigh6, remote.route6) == (
        "fd00:10:244:1::/64",
        "fd00:10:244:1::",
        False,
        True,
    )
    assert remote.dual and not remote.complete and remote.missing() == ["IPv6 neighbour"]
    text = render.node_text(NodeView(vxlans=[Vxlan("pycni.1", remotes=[remote])]))
    assert (
        "node n1  192.168.100.11  subnet 10.244.1.0/24  VTEP 0a:00:00:00:00:11 at 10.244.1.0  "
        "(fdb ok, neighbour ok, route ok, in store)"
    ) in text
    assert "     IPv6 subnet fd00:10:244:1::/64  VTEP at fd00:10:244:1::  (neighbour MISSING, route ok)" in text
    assert "missing: IPv6 neighbour" in render.node_dot(NodeView(vxlans=[Vxlan("pycni.1", remotes=[remote])]))


def test_with_a_second_device_each_lease_is_expected_where_the_agent_sends_its_pods(monkeypatch):
    kernel(monkeypatch, {"pycni.1": ([], [], {4: [], 6: []}), "pycni6.1": ([], [], {4: [], 6: []})})
    lanes = collect.Lanes(("192.168.100.10", "fd70::10"), "pycni.1", "pycni6.1", (4, 6))
    assert lanes.carries("pycni.1", N1) == ("192.168.100.11", "0a:00:00:00:00:11", [4, 6])
    assert lanes.carries("pycni6.1", N1) is None  # n1 has no IPv6 underlay: both families on pycni.1
    assert lanes.carries("pycni.1", N2) == ("192.168.100.12", "0a:00:00:00:00:12", [4])
    assert lanes.carries("pycni6.1", N2) == ("fd70::12", "0a:66:00:00:00:12", [6])
    assert lanes.carries("flannel.1", N2) is None  # not the overlay's device
    main = collect._remotes(Vxlan("pycni.1"), [N1, N2], "192.168.100.10", [], lanes)
    assert [(r.node_name, r.subnet, r.subnet6, r.in_store) for r in main] == [
        ("n1", "10.244.1.0/24", "fd00:10:244:1::/64", True),
        ("n2", "10.244.2.0/24", "", True),
    ]
    (second,) = collect._remotes(Vxlan("pycni6.1"), [N1, N2], "192.168.100.10", [], lanes)
    assert (second.public_ip, second.vtep_mac, second.subnet, second.vtep_address, second.missing()) == (
        "fd70::12",
        "0a:66:00:00:00:12",
        "fd00:10:244:2::/64",
        "fd00:10:244:2::",
        ["FDB", "neighbour", "route"],
    )


def dual_view() -> NodeView:
    v = view()
    v.network6, v.subnet6, v.gateway6 = "fd00:10:244::/56", "fd00:10:244::/64", "fd00:10:244::1"
    v.public_ipv6, v.underlay6 = "fd70::10", "eth0"
    v.pods[0].addresses.append("fd00:10:244::2/64")
    v.pods[0].gateway6 = "fd00:10:244::1"
    v.pods[0].port_mappings.append(PortMapping("tcp", 8080, "fd00:10:244::2", 80))
    v.vxlans.append(
        Vxlan(
            "pycni6.1",
            1,
            8472,
            "fd70::10",
            "eth0",
            "0a:66:00:00:00:10",
            1430,
            ["fd00:10:244::/128"],
            False,
            [
                Remote(
                    "fd70::11",
                    "fd00:10:244:1::/64",
                    "0a:66:00:00:00:11",
                    "fd00:10:244:1::",
                    "n1",
                    True,
                    True,
                    True,
                    True,
                )
            ],
        )
    )
    return v


def test_text_and_dot_show_a_dual_stack_node():
    text = render.node_text(dual_view())
    assert text.splitlines()[0] == "node n0  192.168.100.10 on eth0, fd70::10 on eth0"
    for line in (
        "  overlay IPv6: subnet fd00:10:244::/64 of fd00:10:244::/56, gateway fd00:10:244::1",
        "eth0 10.244.0.2/24, fd00:10:244::2/64  mac aa:00:00:00:00:03  mtu 1450  gateway 10.244.0.1, fd00:10:244::1",
        "hostPort tcp 8080 -> [fd00:10:244::2]:80",
        "vxlan pycni6.1  VNI 1  UDP 8472  local fd70::10 via eth0  fd00:10:244::/128",
        "node n1  fd70::11  subnet fd00:10:244:1::/64  VTEP 0a:66:00:00:00:11 at fd00:10:244:1::",
        "pod traffic leaving 10.244.0.0/16 and fd00:10:244::/56 masqueraded",
    ):
        assert line in text, line
    dot = render.node_dot(dual_view())
    assert "fd00:10:244::/64 of fd00:10:244::/56" in dot and "192.168.100.10, fd70::10" in dot
    assert 'vx_pycni6_1 -> ul_eth0 [label="encap UDP 8472"]' in dot


def test_the_cluster_view_lists_each_familys_subnets():
    dual = ClusterView(
        store="file:///s",
        network="10.244.0.0/16",
        subnet_len=24,
        vni=1,
        port=8472,
        ipv6_network="fd00:10:244::/56",
        ipv6_subnet_len=64,
        this_node="192.168.100.10",
        leases=[
            LeaseView(
                "n0",
                "192.168.100.10",
                "10.244.0.0/24",
                "0a:00:00:00:00:10",
                "fd00:10:244::/64",
                "fd70::10",
                "0a:66:00:00:00:10",
            ),
            LeaseView("n1", "192.168.100.11", "10.244.1.0/24", "0a:00:00:00:00:11", "fd00:10:244:1::/64"),
        ],
    )
    text = render.cluster_text(dual).splitlines()
    assert text[0] == (
        "cluster network 10.244.0.0/16: /24 per node, IPv6 network fd00:10:244::/56: /64 per node, "
        "VXLAN VNI 1 on UDP 8472; 2 node(s) in file:///s"
    )
    assert text[1].split() == ["NODE", "PUBLIC-IP", "SUBNET", "IPV6-SUBNET", "VTEP-MAC", "PUBLIC-IPV6", "IPV6-VTEP-MAC"]
    assert text[2].split() == [
        "n0",
        "192.168.100.10",
        "10.244.0.0/24",
        "fd00:10:244::/64",
        "0a:00:00:00:00:10",
        "fd70::10",
        "0a:66:00:00:00:10",
        "this",
        "node",
    ]
    assert text[3].split() == [
        "n1",
        "192.168.100.11",
        "10.244.1.0/24",
        "fd00:10:244:1::/64",
        "0a:00:00:00:00:11",
        "-",
        "-",
    ]
    dot = render.cluster_dot(dual)
    assert "IPv6 network fd00:10:244::/56: /64 per node" in dot and "192.168.100.10, fd70::10" in dot
    assert "pod subnet 10.244.0.0/24" in dot and "pod subnet fd00:10:244::/64" in dot
    assert dual.to_dict()["leases"][0]["ipv6Subnet"] == "fd00:10:244::/64"
    only6 = ClusterView(
        store="file:///s",
        vni=1,
        port=8472,
        ipv6_network="fd00:10:244::/56",
        ipv6_subnet_len=64,
        leases=[LeaseView("n0", "192.168.100.10", "", "0a:00:00:00:00:10", "fd00:10:244::/64")],
    )
    text = render.cluster_text(only6).splitlines()
    assert text[0].startswith("cluster IPv6 network fd00:10:244::/56: /64 per node, VXLAN VNI 1")
    assert text[1].split() == ["NODE", "PUBLIC-IP", "IPV6-SUBNET", "VTEP-MAC"]


# ---- pod names from the runtime's CNI_ARGS --------------------------------------------------------

CONTAINERD_ID = "4f1c0e8a9b7d6c5e" * 4  # 64 hex digits, as containerd, CRI-O and podman make them


def cache_entry(container_id: str, cni_args: list[list[str]] | None) -> dict:
    entry = {
        "kind": "cniCacheV1",
        "containerId": container_id,
        "ifName": "eth0",
        "networkName": "podnet",
        "netns": f"/var/run/netns/{container_id[:8]}",
        "config": base64.b64encode(b"{}").decode(),
        "result": {"cniVersion": "1.0.0", "ips": [{"address": "10.244.0.5/24"}]},
    }
    if cni_args is not None:
        entry["cniArgs"] = cni_args
    return entry


def test_pods_are_titled_by_the_kubernetes_names_the_runtime_cached(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    # As containerd's libcni writes it: the CNI_ARGS pairs it passed, with the pod's namespace and name.
    kubelet_args = [
        ["IgnoreUnknown", "1"],
        ["K8S_POD_NAMESPACE", "default"],
        ["K8S_POD_NAME", "web-0"],
        ["K8S_POD_INFRA_CONTAINER_ID", CONTAINERD_ID],
        ["K8S_POD_UID", "7d0c3c5e-52a9"],
    ]
    (results / f"podnet-{CONTAINERD_ID}-eth0").write_text(json.dumps(cache_entry(CONTAINERD_ID, kubelet_args)))
    other = "9" * 64
    (results / f"podnet-{other}-eth0").write_text(json.dumps(cache_entry(other, None)))
    (results / "podnet-plain-eth0").write_text(json.dumps(cache_entry("plain", [["K8S_POD_NAME", "lonely"]])))
    pods, _, _ = collect.cached_pods(str(tmp_path), [])
    titles = {p.container_id: (p.pod_namespace, p.pod_name, p.title) for p in pods}
    assert titles == {
        CONTAINERD_ID: ("default", "web-0", "default/web-0"),
        other: ("", "", "999999999999"),
        "plain": ("", "lonely", "lonely"),
    }
    named = next(p for p in pods if p.pod_name == "web-0")
    named.bridge, named.host_veth = "pycni0", "veth1"
    v = NodeView(bridges=[Bridge("pycni0")], pods=[named])
    text = render.node_text(v)
    assert f"pod default/web-0  container {CONTAINERD_ID}  network podnet" in text
    dot = render.node_dot(v)
    assert "<B>pod default/web-0</B>" in dot and f"container {CONTAINERD_ID[:12]}<" in dot
    assert CONTAINERD_ID not in dot  # 64 hex digits would make the card as wide as the README
    assert json.loads(json.dumps(v.to_dict()))["pods"][0]["title"] == "default/web-0"


def test_identity_arguments_that_are_not_names_are_not_shown():
    assert collect.pod_identity([("K8S_POD_NAMESPACE", "kube-system"), ("K8S_POD_NAME", "dns\x1b[31m")]) == (
        "kube-system",
        "",
    )
    assert collect.pod_identity([("K8S_POD_NAME", "x" * 254)]) == ("", "")
    assert collect.short_id("cnitool-0123456789abcdef0123") == "cnitool-0123456789abcdef0123"
    assert collect.short_id("c" * 40) == "cccccccccccc"
    assert collect.short_id("not-hex-" * 5) == "not-hex-not-hex-not-hex-not…"
    assert Pod(container_id="", host_veth="veth9").title == "(unknown, on veth9)"


# ---- health marks ------------------------------------------------------------------------------


def test_every_node_wears_a_health_mark_in_the_picture_and_the_text():
    v = view()  # n1 complete, n2 missing its FDB entry
    assert [r.healthy for r in v.vxlans[0].remotes] == [True, False]
    assert v.problems() == ["1 remote node unhealthy: n2"] and not v.healthy
    text = render.node_text(v)
    assert text.splitlines()[1] == "  health: PROBLEM: 1 remote node unhealthy: n2"
    dot = render.node_dot(v)
    assert "✓ ok · vxlan" in dot  # the healthy remote node has its mark too
    assert "<B>✗</B> missing: FDB" in dot and "✓ node ok" in dot
    assert "pycni.1: 2 other nodes, 1 unhealthy" in dot
    v.vxlans[0].remotes[1].fdb = True
    assert v.healthy and render.node_text(v).splitlines()[1] == "  health: ok"
    assert "✓ healthy, 2 other nodes reachable" in render.node_dot(v) and "✗" not in render.node_dot(v)
    v.own_problems = ["bridge pycni0 is missing"]
    assert "✗ bridge pycni0 is missing" in render.node_dot(v)
    doc = v.to_dict()
    assert doc["healthy"] is False and doc["problems"] == ["bridge pycni0 is missing"]
    assert doc["vxlans"][0]["remotes"][0]["healthy"] is True and doc["vxlans"][0]["remotes"][0]["mode"] == "vxlan"


def test_a_remote_the_store_no_longer_holds_is_unhealthy():
    stale = Remote(
        "192.168.100.19",
        "10.244.9.0/24",
        "0a:00:00:00:00:19",
        "10.244.9.0",
        "",
        True,
        True,
        True,
        in_store=False,
        store_checked=True,
    )
    assert stale.complete and stale.problems() == ["not in the store (stale entries)"]
    stale.store_checked = False  # without --store nothing says it is stale
    assert stale.healthy


def test_the_cluster_is_judged_from_the_node_it_runs_on():
    c = ClusterView(
        store="file:///s",
        network="10.244.0.0/16",
        subnet_len=24,
        vni=1,
        port=8472,
        this_node="192.168.100.10",
        leases=[
            LeaseView("n0", "192.168.100.10", "10.244.0.0/24", "0a:00:00:00:00:10"),
            LeaseView("n1", "192.168.100.11", "10.244.1.0/24", "0a:00:00:00:00:11"),
            LeaseView("n2", "192.168.100.12", "10.244.2.0/24", "0a:00:00:00:00:12"),
            LeaseView("n3", "192.168.100.13", "10.244.3.0/24", "0a:00:00:00:00:13"),
            LeaseView("n4", "192.168.100.14", "10.244.4.0/24", "0a:00:00:00:00:13"),
        ],
    )
    node = view()
    node.vxlans[0].remotes.append(
        Remote(
            "192.168.100.13",
            "10.244.3.0/24",
            "",
            "",
            "n3",
            route=True,
            in_store=True,
            direct="192.168.100.13",
            direct_dev="eth0",
        )
    )
    judge(c, node)
    got = {l.node_name: (l.mode, l.problems) for l in c.leases}
    assert got == {
        "n0": ("this node", []),
        "n1": ("vxlan", []),
        "n2": ("vxlan", ["missing: FDB"]),
        "n3": ("direct", ["VTEP MAC 0a:00:00:00:00:13 also in the lease of n4"]),
        "n4": ("", ["VTEP MAC 0a:00:00:00:00:13 also in the lease of n3", "n0 has no entries for it"]),
    }
    text = render.cluster_text(c)
    assert "HEALTH" in text.splitlines()[1] and "(health as seen from node n0)" in text
    assert next(l for l in text.splitlines() if l.startswith("n1 ")).split()[-1] == "(vxlan)"
    dot = render.cluster_dot(c)
    assert "✓ ok · this node" in dot and "✓ ok · vxlan" in dot and dot.count("<B>✗</B>") == 3
    assert "3 of 5 nodes unhealthy (seen from node n0)" in dot
    assert c.to_dict()["leases"][2]["problems"] == ["missing: FDB"]
    node.subnet = "10.244.7.0/24"  # the node's state and its lease disagree
    judge(c, node)
    assert c.leases[0].problems == ["its overlay state has subnet 10.244.7.0/24, the store 10.244.0.0/24"]


def test_rejected_lease_keys_are_drawn_as_unhealthy_cards():
    c = cluster()
    c.rejected.append(RejectedView("subnets/10.244.200.0-24", "PublicIP: not an address"))
    assert "rejected subnets/10.244.200.0-24: PublicIP: not an address" in render.cluster_text(c)
    dot = render.cluster_dot(c)
    assert "subnets/10.244.200.0-24" in dot and "rejected by every agent" in dot and not c.healthy


# ---- direct routing ------------------------------------------------------------------------------

D1 = Lease("n1", "192.168.100.11", "10.244.1.0/24", "0a:00:00:00:00:11")  # VXLAN entries in place
D2 = Lease("n2", "192.168.100.12", "10.244.2.0/24", "0a:00:00:00:00:12")  # routed directly on eth0
D3 = Lease("n3", "192.168.100.13", "10.244.3.0/24", "0a:00:00:00:00:13")  # same subnet, route missing
D4 = Lease("n4", "192.168.7.14", "10.244.4.0/24", "0a:00:00:00:00:14")  # another underlay subnet


def direct_kernel(monkeypatch, main_table: dict[int, list[dict]]) -> None:
    """pycni.1 holds n1's VXLAN entries; ``main_table`` is `ip -j route show` of each family."""
    kernel(
        monkeypatch,
        {
            "pycni.1": (
                [{"mac": "0a:00:00:00:00:11", "dst": "192.168.100.11"}],
                [{"dst": "10.244.1.0", "lladdr": "0a:00:00:00:00:11"}],
                {4: [{"dst": "10.244.1.0/24", "gateway": "10.244.1.0", "dev": "pycni.1"}], 6: []},
            )
        },
    )
    inner = collect.readers.routes

    def routes(errors, *args, version=4):
        return main_table[version] if not args else inner(errors, *args, version=version)

    monkeypatch.setattr(collect.readers, "routes", routes)


MAIN_TABLE = {
    4: [
        {"dst": "default", "gateway": "192.168.100.1", "dev": "eth0"},
        {"dst": "10.244.1.0/24", "gateway": "10.244.1.0", "dev": "pycni.1", "flags": ["onlink"]},
        {"dst": "10.244.2.0/24", "gateway": "192.168.100.12", "dev": "eth0", "protocol": "boot"},
        {"dst": "10.244.9.0/24", "gateway": "192.168.100.19", "dev": "eth0", "protocol": "boot"},
        {"dst": "192.168.100.0/24", "dev": "eth0", "protocol": "kernel", "prefsrc": "192.168.100.10"},
    ],
    6: [],
}


def direct(enabled: bool) -> collect.DirectRoutes:
    return collect.direct_routes(
        enabled,
        ["eth0"],
        {"eth0": ["192.168.100.10/24"], "pycni.1": ["10.244.0.0/32"]},
        ["192.168.100.10"],
        ["10.244.0.0/16"],
        ["pycni.1"],
    )


def test_direct_routes_are_read_from_the_main_table_off_the_vxlan_device(monkeypatch):
    direct_kernel(monkeypatch, MAIN_TABLE)
    d = direct(True)
    assert d.subnets == [(ipaddress.ip_network("192.168.100.0/24"), "eth0")]
    assert d.routes == {"10.244.2.0/24": ("192.168.100.12", "eth0"), "10.244.9.0/24": ("192.168.100.19", "eth0")}
    assert d.expected_hop(D3, 4) == ("192.168.100.13", "eth0") and d.expected_hop(D4, 4) == ("", "")
    assert d.expected_hop(D3, 6) == ("", "") and direct(False).expected_hop(D3, 4) == ("", "")


def test_with_direct_routing_a_remote_on_the_underlay_subnet_is_healthy_direct(monkeypatch):
    direct_kernel(monkeypatch, MAIN_TABLE)
    d, notes = direct(True), []
    lanes = collect.Lanes(("192.168.100.10",), "pycni.1", "", (4,))
    remotes = {
        r.node_name: r for r in collect._remotes(Vxlan("pycni.1"), [D1, D2, D3, D4], "192.168.100.10", notes, lanes, d)
    }
    n1, n2, n3, n4 = (remotes[n] for n in ("n1", "n2", "n3", "n4"))
    assert (n1.mode, n1.healthy, n1.direct) == ("vxlan", True, "")
    # n2: `10.244.2.0/24 via 192.168.100.12 dev eth0`, and no FDB, neighbour or onlink route: healthy, direct.
    assert (n2.mode, n2.direct, n2.direct_dev, n2.route, n2.fdb, n2.neigh) == (
        "direct",
        "192.168.100.12",
        "eth0",
        True,
        False,
        False,
    )
    assert n2.healthy and n2.missing() == [] and not n2.needs_fdb
    # n3 shares the subnet but its route is gone: only the direct route is missing (no FDB, no neighbour).
    assert (n3.mode, n3.direct, n3.direct_dev, n3.missing()) == ("direct", "192.168.100.13", "eth0", ["direct route"])
    # n4 is on another subnet: it goes through VXLAN, and its entries are missing.
    assert (n4.mode, n4.missing()) == ("vxlan", ["FDB", "neighbour", "route"])
    assert not notes
    text = render.node_text(NodeView(vxlans=[Vxlan("pycni.1", remotes=[n2, n3])]))
    assert (
        "node n2  192.168.100.12  subnet 10.244.2.0/24  direct via 192.168.100.12 on eth0  (direct route ok, in store)"
    ) in text
    assert "(direct route MISSING, in store)" in text
    dot = render.node_dot(NodeView(vxlans=[Vxlan("pycni.1", remotes=[n2, n3])]))
    assert "✓ ok · direct" in dot and "routed via 192.168.100.12 on eth0" in dot
    assert "<B>✗</B> missing: direct route" in dot
    # The route nobody's lease explains (10.244.9.0/24) is a stale one.
    (stray,) = collect._stray_direct_routes(d, store_checked=True)
    assert (stray.subnet, stray.direct, stray.mode, stray.problems()) == (
        "10.244.9.0/24",
        "192.168.100.19",
        "direct",
        ["not in the store (stale entries)"],
    )


def test_a_direct_route_found_counts_even_when_the_setting_is_unknown(monkeypatch):
    direct_kernel(monkeypatch, MAIN_TABLE)
    remotes = {
        r.node_name: r for r in collect._remotes(Vxlan("pycni.1"), [D2, D3], "192.168.100.10", [], None, direct(False))
    }
    assert remotes["n2"].mode == "direct" and remotes["n2"].healthy
    # Without the setting, n3 (nothing anywhere) is expected through VXLAN.
    assert (remotes["n3"].mode, remotes["n3"].missing()) == ("vxlan", ["FDB", "neighbour", "route"])


def test_a_direct_route_via_another_address_is_not_the_nodes(monkeypatch):
    table = {4: [{"dst": "10.244.3.0/24", "gateway": "192.168.100.99", "dev": "eth0"}], 6: []}
    direct_kernel(monkeypatch, table)
    notes: list[str] = []
    remotes = collect._remotes(Vxlan("pycni.1"), [D3], "192.168.100.10", notes, None, direct(True))
    (n3,) = [r for r in remotes if r.node_name == "n3"]
    assert n3.missing() == ["direct route"]
    assert notes == ["10.244.3.0/24 (node n3) is routed via 192.168.100.99 on eth0, but the node is at 192.168.100.13"]


def test_dual_stack_remote_with_one_family_direct_still_needs_its_fdb_entry():
    r = Remote(
        "192.168.100.12",
        "10.244.2.0/24",
        "0a:00:00:00:00:12",
        "",
        "n2",
        fdb=False,
        route=True,
        in_store=True,
        subnet6="fd00:10:244:2::/64",
        vtep_address6="fd00:10:244:2::",
        neigh6=True,
        route6=True,
        direct="192.168.100.12",
        direct_dev="eth0",
    )
    assert r.mode == "direct + vxlan" and r.needs_fdb and r.missing() == ["FDB"]


# ---- the pictures' proportions ------------------------------------------------------------------

needs_dot = pytest.mark.skipif(
    shutil.which("dot") is None, reason="Graphviz's dot is missing (apt-get install graphviz)"
)


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    return struct.unpack(">II", png[16:24])


def many_remotes(count: int) -> list[Remote]:
    return [
        Remote(
            f"192.168.100.{11 + i}",
            f"10.244.{i + 1}.0/24",
            f"0a:00:00:00:01:{i:02x}",
            f"10.244.{i + 1}.0",
            f"node-{i + 1}",
            True,
            True,
            True,
            True,
            store_checked=True,
        )
        for i in range(count)
    ]


@needs_dot
@pytest.mark.parametrize("pods, remotes", [(1, 0), (1, 1), (2, 19), (7, 3)])
def test_a_node_picture_is_no_wider_than_two_and_a_half_to_one(pods, remotes):
    v = view()
    template = v.pods[0]
    v.pods = [
        Pod(
            **{
                **template.__dict__,
                "container_id": CONTAINERD_ID[:-2] + f"{i:02x}",
                "pod_name": f"web-{i}",
                "pod_namespace": "default",
                "host_veth": f"veth{i}",
            }
        )
        for i in range(pods)
    ]
    v.vxlans[0].remotes = many_remotes(remotes)
    width, height = png_size(render.graphviz(render.node_dot(v), "png"))
    assert width / height <= 2.5, (width, height)
    assert width <= 1400, width  # readable at README width (about 900 px): scaled by >= 0.64


@needs_dot
@pytest.mark.parametrize("count", [1, 2, 20, 60])
def test_a_cluster_picture_is_a_grid_no_wider_than_two_and_a_half_to_one(count):
    c = ClusterView(
        store="file:///var/lib/some/rather/long/path/to/the/cluster/store/of/this/cluster",
        network="10.244.0.0/16",
        subnet_len=24,
        vni=1,
        port=8472,
        this_node="192.168.100.11",
        leases=[
            LeaseView(f"node-{i}", f"192.168.100.{11 + i}", f"10.244.{i}.0/24", f"0a:00:00:00:01:{i:02x}")
            for i in range(count)
        ],
    )
    dot = render.cluster_dot(c)
    assert dot.count("<TR><TD VALIGN") == math.ceil(count / render._columns(count))  # the grid's rows
    width, height = png_size(render.graphviz(dot, "png"))
    assert width / height <= 2.5, (width, height)
    assert width <= 1400, width


@needs_dot
def test_graphviz_stretches_a_drawing_that_would_be_too_wide():
    chain = "digraph { rankdir=LR; " + " -> ".join(f"n{i}" for i in range(14)) + "; }"
    width, height = png_size(render.graphviz(chain, "png", max_aspect=None))
    assert width / height > 8
    width, height = png_size(render.graphviz(chain, "png"))
    assert width / height <= 2.5
    svg = render.graphviz(chain, "svg").decode()
    assert "<svg" in svg and "n13" in svg


def test_the_readmes_pictures_are_no_wider_than_two_and_a_half_to_one():
    """docs/inspect-*.png (made by tests/integration/test_inspect.py with PYCNI_DOCS_PICTURES=1)."""
    import glob
    import os

    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs")
    pictures = sorted(glob.glob(os.path.join(docs, "inspect*.png")))
    assert [os.path.basename(p) for p in pictures] == ["inspect-cluster.png", "inspect-example.png"]
    for path in pictures:
        with open(path, "rb") as fh:
            width, height = png_size(fh.read(32))
        assert width / height <= 2.5 and width <= 1400, (path, width, height)
