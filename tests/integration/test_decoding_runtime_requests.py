"""Requests as runtimes send them: keys in another letter case, and DEL with config ADD would refuse.

Go's encoding/json matches keys regardless of case, so a runtime whose JSON
says "PortMappings"/"HostPort" or "IngressRate" gets the same rules and qdiscs
from the reference plugins; pycni must give the same state. DEL must finish
(and remove everything) even when the configuration carries values only ADD
could have refused.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.netenv import sh
from tests.helpers.plugins import REFERENCE_DIR, has_reference
from tests.helpers.state import nft_text, tc_qdiscs

pytestmark = pytest.mark.integration

SUBNET = "10.61.0.0/24"


def chain(node, pod, plugins: list[dict], name: str = "dec", runtime: dict | None = None) -> list[dict]:
    """The per-plugin configs of a bridge chain, ADDed in order; returns the configs with prevResults."""
    confs = []
    prev = None
    for plugin in plugins:
        conf = {"cniVersion": "1.0.0", "name": name, **plugin}
        if runtime:
            conf["runtimeConfig"] = runtime
        if prev is not None:
            conf["prevResult"] = prev
        out = node.run(plugin["type"], "ADD", conf, pod)
        assert out.code == 0, out.err or out.out
        prev = out.out
        confs.append(conf)
    return confs


def bridge(node) -> dict:
    return {"type": "bridge", "bridge": "dec0", "isGateway": True, "ipam": node.host_local(subnet=SUBNET)}


def host_veth(node) -> str:
    links = json.loads(sh("ip", "-n", node.name, "-j", "link", "show", "master", "dec0").stdout)
    assert len(links) == 1
    return links[0]["ifname"]


@pytest.fixture(params=["pycni", "reference"])
def side(request, make_node, launcher_dir):
    if request.param == "reference" and not has_reference("portmap"):
        pytest.skip("reference plugins not installed")
    return make_node(cni_path=launcher_dir if request.param == "pycni" else REFERENCE_DIR), request.param


def test_capability_args_in_go_letter_case_give_the_same_shaping(side):
    node, kind = side
    pod = node.pod()
    runtime = {
        "Bandwidth": {"IngressRate": 8_000_000, "IngressBurst": 80_000, "EgressRate": 4_000_000, "EgressBurst": 40_000}
    }
    chain(node, pod, [bridge(node), {"type": "bandwidth", "capabilities": {"bandwidth": True}}], runtime=runtime)
    veth = host_veth(node)
    kinds = sorted(q["kind"] for q in tc_qdiscs(node, veth))
    assert "tbf" in kinds and "ingress" in kinds, (kind, kinds)
    tbf = next(q for q in tc_qdiscs(node, veth) if q["kind"] == "tbf")
    assert tbf["options"]["rate"] == 1_000_000  # bytes/s: 8 Mbit/s


def test_capability_args_in_go_letter_case_give_the_same_port_mapping(make_node, launcher_dir):
    node = make_node(cni_path=launcher_dir)
    pod = node.pod()
    runtime = {"PortMappings": [{"HostPort": 18080, "ContainerPort": 80, "Protocol": "TCP"}]}
    chain(node, pod, [bridge(node), {"type": "portmap", "capabilities": {"portMappings": True}}], runtime=runtime)
    ruleset = nft_text(node, "table", "inet", "pycni_portmap")
    assert "18080" in ruleset and " 80" in ruleset


def test_del_succeeds_with_config_that_add_would_refuse(make_node, launcher_dir):
    node = make_node(cni_path=launcher_dir)
    pod = node.pod()
    runtime = {
        "portMappings": [{"hostPort": 18081, "containerPort": 80, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": 8_000_000, "ingressBurst": 80_000},
    }
    plugins = [
        bridge(node),
        {"type": "portmap", "capabilities": {"portMappings": True}},
        {"type": "bandwidth", "capabilities": {"bandwidth": True}},
    ]
    confs = chain(node, pod, plugins, runtime=runtime)
    assert "18081" in nft_text(node, "table", "inet", "pycni_portmap")
    # What DEL now gets: a mapping ADD would refuse, an unknown backend, a bad rate.
    broken = {
        "portMappings": [{"hostPort": "eighty", "containerPort": 0, "protocol": "carrier-pigeon"}],
        "bandwidth": {"ingressRate": "fast", "ingressBurst": -1},
    }
    for conf in reversed(confs):
        conf = {**conf, "runtimeConfig": broken}
        conf.pop("prevResult", None)
        if conf["type"] == "portmap":
            conf["backend"] = "no-such-backend"
        out = node.run(conf["type"], "DEL", conf, pod)
        assert out.code == 0, (conf["type"], out.out, out.err)
    assert "18081" not in nft_text(node, "table", "inet", "pycni_portmap", check=False)
    assert not [line for line in sh("ip", "-n", node.name, "-o", "link").stdout.splitlines() if "bwp" in line]
    assert node.leases("dec") == []
    # and ADD with the same values is refused with the option named
    conf = {**confs[1], "runtimeConfig": broken}
    out = node.run("portmap", "ADD", conf, pod)
    assert out.code != 0 and out.error[0] == 7 and "hostPort" in out.error[1]
