"""pycni.inspect without a network: parsing nft/tc/cache/lease data, and the text and Graphviz renderings."""
from __future__ import annotations

import base64
import json
import shutil

import pytest

from pycni.inspect import collect, render
from pycni.inspect.cluster import ClusterView, LeaseView
from pycni.inspect.collect import Bridge, NodeView, Pod, PortMapping, Remote, Shaping, Vxlan

PORTMAP_RULESET = [
    {"map": {"family": "inet", "name": "nabc_any4", "table": "pycni_portmap",
             "elem": [[{"elem": {"val": {"concat": ["tcp", 17080]}, "comment": "6cd4 net/c1/eth0"}},
                       {"concat": ["10.244.0.2", 7080]}]]}},
    {"map": {"family": "inet", "name": "nabc_hip4", "table": "pycni_portmap",
             "elem": [[{"concat": ["192.168.1.5", "udp", 53]}, {"concat": ["10.244.0.3", 5353]}]]}},
    {"map": {"family": "inet", "name": "other", "table": "not_ours",
             "elem": [[{"concat": ["tcp", 1]}, {"concat": ["10.0.0.1", 1]}]]}},
    {"map": {"family": "inet", "name": "pods4", "table": "pycni_masq",
             "elem": [[{"elem": {"val": "10.88.0.2", "comment": "t net c1 eth0"}},
                       {"jump": {"target": "net4_0a580000_24"}}]]}},
    {"set": {"family": "inet", "name": "members", "table": "pycni_overlay",
             "elem": ["192.168.100.11", "192.168.100.9"]}},
    {"rule": {"family": "inet", "table": "pycni_overlay", "chain": "postrouting",
              "expr": [{"match": {}}, {"masquerade": {"flags": "fully-random"}}]}},
]


def test_portmap_entries_are_read_from_the_maps():
    assert collect._portmaps(PORTMAP_RULESET) == [
        PortMapping("tcp", 17080, "10.244.0.2", 7080),
        PortMapping("udp", 53, "10.244.0.3", 5353, "192.168.1.5"),
    ]
    assert PortMapping("udp", 53, "10.244.0.3", 5353, "192.168.1.5").describe() == \
        "udp 192.168.1.5:53 -> 10.244.0.3:5353"


def test_masquerade_and_overlay_tables_are_read():
    assert collect._masquerade(PORTMAP_RULESET) == {"10.88.0.2": "pycni_masq net4_0a580000_24"}
    assert collect._overlay_table(PORTMAP_RULESET) == (["192.168.100.9", "192.168.100.11"], True)


def test_shaping_comes_from_tbf_on_the_veth_and_on_its_ifb():
    qdiscs = [{"kind": "tbf", "dev": "veth1", "root": True, "options": {"rate": 125000, "burst": 12500}},
              {"kind": "ingress", "dev": "veth1", "parent": "ffff:fff1"},
              {"kind": "tbf", "dev": "bwp1", "root": True, "options": {"rate": 250000, "burst": 6250}},
              {"kind": "tbf", "dev": "veth2", "root": True, "options": {"rate": 1, "burst": 1}}]
    shaping = collect._shaping(qdiscs, "veth1", "bwp1")
    assert shaping == Shaping(1_000_000, 12500, 2_000_000, 6250, "bwp1")
    assert shaping.describe() == "to pod 1 Mbit/s (burst 12500 B), from pod 2 Mbit/s (burst 6250 B, ifb bwp1)"
    assert collect._shaping(qdiscs, "veth9", "") is None
    assert [collect.rate(v) for v in (999, 1500, 2_500_000, 10**10)] == ["999 bit/s", "1.5 kbit/s", "2.5 Mbit/s",
                                                                         "10 Gbit/s"]


def test_pods_come_from_the_result_cache_and_from_leases(tmp_path):
    data_dir = tmp_path / "ipam"
    config = {"cniVersion": "1.1.0", "name": "podnet",
              "plugins": [{"type": "vxlan", "dataDir": str(data_dir)}, {"type": "portmap"}]}
    entry = {"kind": "cniCacheV1", "containerId": "c1", "ifName": "eth0", "networkName": "podnet",
             "netns": "/var/run/netns/p1", "config": base64.b64encode(json.dumps(config).encode()).decode(),
             "result": {"cniVersion": "1.1.0",
                        "interfaces": [{"name": "pycni0", "mac": "aa:00:00:00:00:01"},
                                       {"name": "veth1", "mac": "aa:00:00:00:00:02"},
                                       {"name": "eth0", "mac": "aa:00:00:00:00:03", "mtu": 1450, "sandbox": "/x"},
                                       {"name": "bwp1", "mac": "aa:00:00:00:00:04"}],
                        "ips": [{"interface": 2, "address": "10.244.0.2/24", "gateway": "10.244.0.1"}]}}
    (tmp_path / "cache" / "results").mkdir(parents=True)
    (tmp_path / "cache" / "results" / "podnet-c1-eth0").write_text(json.dumps(entry))
    notes: list[str] = []
    pods, data_dirs, hosts = collect.cached_pods(str(tmp_path / "cache"), notes)
    (pod,) = pods
    assert (pod.container_id, pod.network, pod.netns, pod.addresses, pod.gateway, pod.mac, pod.mtu) == \
        ("c1", "podnet", "/var/run/netns/p1", ["10.244.0.2/24"], "10.244.0.1", "aa:00:00:00:00:03", 1450)
    assert data_dirs == [str(data_dir)] and hosts[id(pod)] == ["pycni0", "veth1", "bwp1"] and not notes

    (data_dir / "podnet").mkdir(parents=True)
    (data_dir / "podnet" / "10.244.0.2").write_text("c1\neth0")          # known from the cache
    (data_dir / "podnet" / "10.244.0.7").write_text("other-runtime\neth1")
    (data_dir / "podnet" / "lock").write_text("")
    (data_dir / "podnet" / "last_reserved_ip.0").write_text("10.244.0.7")
    (lease,) = collect.leased_pods([str(data_dir), str(tmp_path / "missing")], pods)
    assert (lease.container_id, lease.ifname, lease.addresses, lease.source) == \
        ("other-runtime", "eth1", ["10.244.0.7"], "lease")


def view() -> NodeView:
    pod = Pod(container_id='evil<b>&"x"', network="podnet", netns="/run/netns/p1", netns_name="p1",
              addresses=["10.244.0.2/24"], mac="aa:00:00:00:00:03", mtu=1450, host_veth="veth1", bridge="pycni0",
              gateway="10.244.0.1", masquerade="pycni_overlay (leaving the cluster network)",
              port_mappings=[PortMapping("tcp", 8080, "10.244.0.2", 80)],
              shaping=Shaping(1_000_000, 12500, None, None, ""))
    remotes = [Remote("192.168.100.11", "10.244.1.0/24", "0a:00:00:00:00:11", "10.244.1.0", "n1", True, True, True,
                      True),
               Remote("192.168.100.12", "10.244.2.0/24", "0a:00:00:00:00:12", "10.244.2.0", "n2", False, True, True,
                      True)]
    return NodeView(name="n0", public_ip="192.168.100.10", network="10.244.0.0/16", subnet="10.244.0.0/24",
                    gateway="10.244.0.1", mtu=1450, underlay="eth0",
                    bridges=[Bridge("pycni0", "aa:00:00:00:00:01", 1450, "UP", ["10.244.0.1/24"], ["veth1"])],
                    pods=[pod], vxlans=[Vxlan("pycni.1", 1, 8472, "192.168.100.10", "eth0", "0a:00:00:00:00:10",
                                              1450, ["10.244.0.0/32"], False, remotes)],
                    overlay_members=["192.168.100.10", "192.168.100.11"], overlay_masquerade=True,
                    portmap_entries=[PortMapping("tcp", 8080, "10.244.0.2", 80)])


def test_text_shows_the_tree_and_flags_missing_entries():
    text = render.node_text(view())
    assert text.splitlines()[0] == "node n0  192.168.100.10 on eth0"
    for line in ("bridge pycni0  10.244.0.1/24  mac aa:00:00:00:00:01  mtu 1450  up",
                 "  └─ veth1 <-> eth0 in netns p1",
                 "hostPort tcp 8080 -> 10.244.0.2:80",
                 "shaping: to pod 1 Mbit/s (burst 12500 B)",
                 "vxlan pycni.1  VNI 1  UDP 8472  local 192.168.100.10 via eth0  10.244.0.0/32  "
                 "mac 0a:00:00:00:00:10  mtu 1450  learning off",
                 "node n1  192.168.100.11  subnet 10.244.1.0/24  VTEP 0a:00:00:00:00:11 at 10.244.1.0  "
                 "(fdb ok, neighbour ok, route ok, in store)",
                 "(fdb MISSING, neighbour ok, route ok, in store)",
                 "pycni_portmap  tcp 8080 -> 10.244.0.2:80"):
        assert line in text, line


def test_dot_escapes_every_value_and_marks_missing_entries():
    dot = render.node_dot(view())
    assert 'evil&lt;b&gt;&amp;&quot;x&quot;' in dot and 'evil<b>' not in dot
    assert "missing: FDB" in dot and '#b00020' in dot
    assert dot.startswith("digraph pycni {") and dot.rstrip().endswith("}")
    json.dumps(view().to_dict())   # the JSON form is plain data


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
    return ClusterView(store="etcd://10.0.0.1:2379", network="10.244.0.0/16", subnet_len=24, vni=1, port=8472,
                       leases=[LeaseView("n0", "192.168.100.10", "10.244.0.0/24", "0a:00:00:00:00:10"),
                               LeaseView("", "192.168.100.11", "10.244.1.0/24", "0a:00:00:00:00:11")],
                       this_node="192.168.100.11")


def test_cluster_text_and_dot_list_every_lease():
    text = render.cluster_text(cluster())
    assert text.splitlines()[0] == ("cluster network 10.244.0.0/16: /24 per node, VXLAN VNI 1 on UDP 8472; "
                                    "2 node(s) in etcd://10.0.0.1:2379")
    assert text.splitlines()[3] == "-     192.168.100.11  10.244.1.0/24  0a:00:00:00:00:11  this node"
    dot = render.cluster_dot(cluster())
    assert dot.count(" -- underlay ") == 2 and "(this node)" in dot
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
N2 = Lease("n2", "192.168.100.12", "10.244.2.0/24", "0a:00:00:00:00:12", "fd00:10:244:2::/64", "fd70::12",
           "0a:66:00:00:00:12")


def test_one_device_carrying_both_families_shows_each_familys_entries(monkeypatch):
    kernel(monkeypatch, {"pycni.1": (
        [{"mac": "0a:00:00:00:00:11", "dst": "192.168.100.11"}],
        [{"dst": "10.244.1.0", "lladdr": "0a:00:00:00:00:11"}, {"dst": "fe80::1", "lladdr": "0a:00:00:00:00:99"}],
        {4: [{"dst": "10.244.1.0/24", "gateway": "10.244.1.0"}],
         6: [{"dst": "fd00:10:244::", "protocol": "kernel"},                   # the device's own address
             {"dst": "fd00:10:244:1::/64", "gateway": "fd00:10:244:1::"}]})})  # its neighbour entry is missing
    lanes = collect.Lanes(("192.168.100.10",), "pycni.1", "", (4, 6))
    (remote,) = collect._remotes(Vxlan("pycni.1"), [N1], "192.168.100.10", [], lanes)
    assert (remote.node_name, remote.public_ip, remote.subnet, remote.vtep_address) == \
        ("n1", "192.168.100.11", "10.244.1.0/24", "10.244.1.0")
    assert (remote.subnet6, remote.vtep_address6, remote.neigh6, remote.route6) == \
        ("fd00:10:244:1::/64", "fd00:10:244:1::", False, True)
    assert remote.dual and not remote.complete and remote.missing() == ["IPv6 neighbour"]
    text = render.node_text(NodeView(vxlans=[Vxlan("pycni.1", remotes=[remote])]))
    assert ("node n1  192.168.100.11  subnet 10.244.1.0/24  VTEP 0a:00:00:00:00:11 at 10.244.1.0  "
            "(fdb ok, neighbour ok, route ok, in store)") in text
    assert "     IPv6 subnet fd00:10:244:1::/64  VTEP at fd00:10:244:1::  (neighbour MISSING, route ok)" in text
    assert "missing: IPv6 neighbour" in render.node_dot(NodeView(vxlans=[Vxlan("pycni.1", remotes=[remote])]))


def test_with_a_second_device_each_lease_is_expected_where_the_agent_sends_its_pods(monkeypatch):
    kernel(monkeypatch, {"pycni.1": ([], [], {4: [], 6: []}), "pycni6.1": ([], [], {4: [], 6: []})})
    lanes = collect.Lanes(("192.168.100.10", "fd70::10"), "pycni.1", "pycni6.1", (4, 6))
    assert lanes.carries("pycni.1", N1) == ("192.168.100.11", "0a:00:00:00:00:11", [4, 6])
    assert lanes.carries("pycni6.1", N1) is None           # n1 has no IPv6 underlay: both families on pycni.1
    assert lanes.carries("pycni.1", N2) == ("192.168.100.12", "0a:00:00:00:00:12", [4])
    assert lanes.carries("pycni6.1", N2) == ("fd70::12", "0a:66:00:00:00:12", [6])
    assert lanes.carries("flannel.1", N2) is None          # not the overlay's device
    main = collect._remotes(Vxlan("pycni.1"), [N1, N2], "192.168.100.10", [], lanes)
    assert [(r.node_name, r.subnet, r.subnet6, r.in_store) for r in main] == [
        ("n1", "10.244.1.0/24", "fd00:10:244:1::/64", True), ("n2", "10.244.2.0/24", "", True)]
    (second,) = collect._remotes(Vxlan("pycni6.1"), [N1, N2], "192.168.100.10", [], lanes)
    assert (second.public_ip, second.vtep_mac, second.subnet, second.vtep_address, second.missing()) == \
        ("fd70::12", "0a:66:00:00:00:12", "fd00:10:244:2::/64", "fd00:10:244:2::", ["FDB", "neighbour", "route"])


def dual_view() -> NodeView:
    v = view()
    v.network6, v.subnet6, v.gateway6 = "fd00:10:244::/56", "fd00:10:244::/64", "fd00:10:244::1"
    v.public_ipv6, v.underlay6 = "fd70::10", "eth0"
    v.pods[0].addresses.append("fd00:10:244::2/64")
    v.pods[0].gateway6 = "fd00:10:244::1"
    v.pods[0].port_mappings.append(PortMapping("tcp", 8080, "fd00:10:244::2", 80))
    v.vxlans.append(Vxlan("pycni6.1", 1, 8472, "fd70::10", "eth0", "0a:66:00:00:00:10", 1430, ["fd00:10:244::/128"],
                          False, [Remote("fd70::11", "fd00:10:244:1::/64", "0a:66:00:00:00:11", "fd00:10:244:1::",
                                         "n1", True, True, True, True)]))
    return v


def test_text_and_dot_show_a_dual_stack_node():
    text = render.node_text(dual_view())
    assert text.splitlines()[0] == "node n0  192.168.100.10 on eth0, fd70::10 on eth0"
    for line in ("  overlay IPv6: subnet fd00:10:244::/64 of fd00:10:244::/56, gateway fd00:10:244::1",
                 "eth0 10.244.0.2/24, fd00:10:244::2/64  mac aa:00:00:00:00:03  mtu 1450  gateway 10.244.0.1, "
                 "fd00:10:244::1",
                 "hostPort tcp 8080 -> [fd00:10:244::2]:80",
                 "vxlan pycni6.1  VNI 1  UDP 8472  local fd70::10 via eth0  fd00:10:244::/128",
                 "node n1  fd70::11  subnet fd00:10:244:1::/64  VTEP 0a:66:00:00:00:11 at fd00:10:244:1::",
                 "pod traffic leaving 10.244.0.0/16 and fd00:10:244::/56 masqueraded"):
        assert line in text, line
    dot = render.node_dot(dual_view())
    assert "fd00:10:244::/64 of fd00:10:244::/56" in dot and "192.168.100.10, fd70::10" in dot
    assert 'vx_pycni6_1 -> ul_eth0 [label="encap UDP 8472"]' in dot


def test_the_cluster_view_lists_each_familys_subnets():
    dual = ClusterView(store="file:///s", network="10.244.0.0/16", subnet_len=24, vni=1, port=8472,
                       ipv6_network="fd00:10:244::/56", ipv6_subnet_len=64, this_node="192.168.100.10",
                       leases=[LeaseView("n0", "192.168.100.10", "10.244.0.0/24", "0a:00:00:00:00:10",
                                         "fd00:10:244::/64", "fd70::10", "0a:66:00:00:00:10"),
                               LeaseView("n1", "192.168.100.11", "10.244.1.0/24", "0a:00:00:00:00:11",
                                         "fd00:10:244:1::/64")])
    text = render.cluster_text(dual).splitlines()
    assert text[0] == ("cluster network 10.244.0.0/16: /24 per node, IPv6 network fd00:10:244::/56: /64 per node, "
                       "VXLAN VNI 1 on UDP 8472; 2 node(s) in file:///s")
    assert text[1].split() == ["NODE", "PUBLIC-IP", "SUBNET", "IPV6-SUBNET", "VTEP-MAC", "PUBLIC-IPV6",
                               "IPV6-VTEP-MAC"]
    assert text[2].split() == ["n0", "192.168.100.10", "10.244.0.0/24", "fd00:10:244::/64", "0a:00:00:00:00:10",
                               "fd70::10", "0a:66:00:00:00:10", "this", "node"]
    assert text[3].split() == ["n1", "192.168.100.11", "10.244.1.0/24", "fd00:10:244:1::/64", "0a:00:00:00:00:11",
                               "-", "-"]
    dot = render.cluster_dot(dual)
    assert "pod network 10.244.0.0/16 + fd00:10:244::/56" in dot and dot.count(" -- underlay ") == 3
    assert 'label="10.244.0.0/24, fd00:10:244::/64"' in dot
    assert dual.to_dict()["leases"][0]["ipv6Subnet"] == "fd00:10:244::/64"
    only6 = ClusterView(store="file:///s", vni=1, port=8472, ipv6_network="fd00:10:244::/56", ipv6_subnet_len=64,
                        leases=[LeaseView("n0", "192.168.100.10", "", "0a:00:00:00:00:10", "fd00:10:244::/64")])
    text = render.cluster_text(only6).splitlines()
    assert text[0].startswith("cluster IPv6 network fd00:10:244::/56: /64 per node, VXLAN VNI 1")
    assert text[1].split() == ["NODE", "PUBLIC-IP", "IPV6-SUBNET", "VTEP-MAC"]
