"""The overlay on an IPv6 underlay: nodes whose public addresses are IPv6 (flannel-io/flannel#1781). Root only.

Two node namespaces on the test underlay (tests/multinode.py), given IPv6
addresses on it (fd70:7963::/64, "py" in the middle), agents started with
those as --public-ip against a file store. The IPv4 pod network rides VXLAN
over IPv6: the device's local address and every FDB destination are IPv6, the
MTU leaves room for the 70-byte IPv6 VXLAN header (1500 - 70 = 1430, where an
IPv4 underlay gives 1450), the member set the firewall keeps is the IPv6 one,
and pod packets cross at exactly that MTU with DF set.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from multinode import UNDERLAY_BRIDGE, cluster_topology, ip_in, wait_for  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    pytest.mark.multinode,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

PYCNI = os.path.join(os.path.dirname(sys.executable), "pycni")
NETWORK = "10.246.0.0/16"
PREFIX = "fd70:7963::"
VXLAN = "pycni.1"


def test_pods_cross_an_ipv6_underlay_at_its_mtu(tmp_path):
    with cluster_topology(2, "ov6") as topo:
        ip_in(topo.underlay, "addr", "add", f"{PREFIX}1/64", "dev", UNDERLAY_BRIDGE, "nodad")
        for node in topo.nodes:
            address = f"{PREFIX}{10 + node.index:x}"
            node.ip("addr", "add", f"{address}/64", "dev", "eth0", "nodad")
            node.public_ip = address
        store = "file://" + topo.path("store")
        init = topo.nodes[0].run(PYCNI, "cluster", "init", "--store", store, "--network", NETWORK, check=False)
        assert init.returncode == 0, init.stderr
        for node in topo.nodes:
            topo.start_agent(node, store)
        states = [node.read_state() for node in topo.nodes]
        a, b = topo.nodes
        sa, sb = states

        for node, state, other in ((a, sa, sb), (b, sb, sa)):
            link = node.ip_json("-d", "link", "show", VXLAN)[0]
            assert link["linkinfo"]["info_data"].get("local6") == node.public_ip
            assert link["mtu"] == 1430 == state["mtu"]
            entry = (other["vtepMAC"], other["publicIP"])

            def programmed(node=node, entry=entry) -> bool:
                out = node.run("bridge", "-j", "fdb", "show", "dev", VXLAN).stdout.strip()
                return entry in {
                    (e["mac"], e.get("dst")) for e in (json.loads(out) if out else []) if e.get("state") == "permanent"
                }

            wait_for(programmed, 10, what=f"{node.name}'s FDB entry for {other['publicIP']}")
            members = json.loads(node.run("nft", "-j", "list", "set", "inet", "pycni_overlay", "members6").stdout)
            elements = next(obj["set"].get("elem", []) for obj in members["nftables"] if "set" in obj)
            assert set(elements) == {a.public_ip, b.public_ip}

        prefix = sa["subnet"].split("/")[1]
        pod_a = topo.add_pod(a, f"{sa['subnet'].rsplit('.', 1)[0]}.5/{prefix}", sa["gateway"], sa["mtu"])
        pod_b = topo.add_pod(b, f"{sb['subnet'].rsplit('.', 1)[0]}.5/{prefix}", sb["gateway"], sb["mtu"])
        assert pod_a.ping(pod_b.public_ip, count=3), "pod to pod across the IPv6 underlay"
        assert pod_b.ping(sa["gateway"]), "pod to the other node"
        # 1430 bytes of IPv4 packet = 1402 bytes of ICMP payload: crosses with DF; one byte more does not.
        assert pod_a.ping(pod_b.public_ip, size=1430 - 28, dont_fragment=True)
        assert not pod_a.ping(pod_b.public_ip, size=1430 - 27, dont_fragment=True, timeout=1)
