"""The vxlan CNI plugin on one node, as a real process, with a hand-written overlay state.

A "node" namespace stands in for the host: it holds the state file the node
agent would write (subnet 10.244.5.0/24 of 10.244.0.0/16, MTU 1450, bridge
``vxbr0``), a VXLAN device named in that state, its own host-local data
directory, and runs every plugin process (`ip netns exec NODE <bin>/vxlan`,
with the executables `pycni install` writes, cold and warm). The plugin's
bridge delegate creates the bridge itself. Pods are namespaces of their own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

import pytest

import netns
from cni_plugins.shared.overlaystate import OverlayState, remove_state, write_state

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

NETWORK = "10.244.0.0/16"
SUBNET = "10.244.5.0/24"
GATEWAY = "10.244.5.1"
MTU = 1450
BRIDGE = "vxbr0"
VXLAN_DEV = "vxov.1"
NET_NAME = "overlay"
VERSIONS = ["0.2.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


# ---- harness ----------------------------------------------------------------------------


@pytest.fixture
def bin_dir(launcher_dir):
    """pycni's plugins as `pycni install` writes them, run both ways (tests/plugin_modes.py): cold, a
    plugin process per call, and warm, handed to an agent that serves them in the caller's namespace."""
    assert os.path.exists(os.path.join(launcher_dir, "vxlan")), "no vxlan executable (registry entry missing?)"
    return launcher_dir


@dataclass
class Outcome:
    rc: int
    out: Any
    stderr: str


def node_state(**changes: Any) -> OverlayState:
    fields = dict(
        network=NETWORK,
        subnet=SUBNET,
        gateway=GATEWAY,
        mtu=MTU,
        bridge=BRIDGE,
        vxlan_device=VXLAN_DEV,
        vni=1,
        public_ip="192.168.100.10",
        vtep_mac="0a:10:00:00:00:0a",
        node_name="node-a",
    )
    fields.update(changes)
    return OverlayState(**fields)


@dataclass
class Node:
    ns: Any
    bin_dir: str
    state_dir: str
    data_dir: str
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def name(self) -> str:
        return self.ns.name

    def pod(self, prefix: str = "vxp") -> Any:
        pod = self.stack.enter_context(netns.temporary(prefix))
        subprocess.run(["ip", "-n", pod.name, "link", "set", "lo", "up"], check=True)
        return pod

    def conf(self, version: str = "1.0.0", **options: Any) -> dict:
        conf = {
            "cniVersion": version,
            "name": NET_NAME,
            "type": "vxlan",
            "stateDir": self.state_dir,
            "dataDir": self.data_dir,
        }
        conf.update(options)
        return conf

    def run(
        self,
        command: str,
        conf: dict,
        pod: Any = None,
        container_id: str = "ctr1",
        ifname: str = "eth0",
        netns_path: str | None = None,
        plugin: str = "vxlan",
    ) -> Outcome:
        env = {
            "PATH": os.environ["PATH"],
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns_path if netns_path is not None else (pod.path if pod else ""),
            "CNI_IFNAME": ifname,
            "CNI_PATH": self.bin_dir,
        }
        proc = subprocess.run(
            ["ip", "netns", "exec", self.name, os.path.join(self.bin_dir, plugin)],
            input=json.dumps(conf).encode(),
            env=env,
            capture_output=True,
            timeout=60,
        )
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
        return Outcome(proc.returncode, out, proc.stderr.decode(errors="replace"))

    def add(self, pod: Any, container_id: str = "ctr1", **conf_options: Any) -> dict:
        outcome = self.run("ADD", self.conf(**conf_options), pod, container_id)
        assert outcome.rc == 0, (outcome.out, outcome.stderr)
        return outcome.out

    def ip_json(self, *args: str, ns: str | None = None) -> Any:
        proc = subprocess.run(["ip", "-n", ns or self.name, "-j", *args], capture_output=True, check=True)
        return json.loads(proc.stdout or b"[]")

    def leases(self, network: str = NET_NAME) -> list[str]:
        path = os.path.join(self.data_dir, network)
        if not os.path.isdir(path):
            return []
        return sorted(f for f in os.listdir(path) if f != "lock" and not f.startswith("last_reserved_ip"))

    def cache_files(self) -> list[str]:
        path = os.path.join(self.state_dir, "vxlan")
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def veths(self) -> list[str]:
        return sorted(
            link["ifname"]
            for link in self.ip_json("-d", "link", "show")
            if link.get("linkinfo", {}).get("info_kind") == "veth"
        )

    def ping(self, pod: Any, address: str) -> bool:
        proc = subprocess.run(
            ["ip", "netns", "exec", pod.name, "ping", "-n", "-c", "1", "-W", "2", address],
            capture_output=True,
            timeout=10,
        )
        return proc.returncode == 0


def _vxlan_device(node_name: str) -> None:
    proc = subprocess.run(
        ["ip", "-n", node_name, "link", "add", VXLAN_DEV, "type", "vxlan", "id", "1", "dstport", "8472", "nolearning"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot create a VXLAN device in a namespace: {proc.stderr.strip()}")


@pytest.fixture
def node(bin_dir, tmp_path):
    """A node namespace with an overlay state file and a VXLAN device; everything removed afterwards."""
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(netns.temporary("vxn"))
        subprocess.run(["ip", "-n", ns.name, "link", "set", "lo", "up"], check=True)
        _vxlan_device(ns.name)
        state_dir, data_dir = tmp_path / "state", tmp_path / "data"
        state_dir.mkdir()
        data_dir.mkdir()
        write_state(str(state_dir), node_state())
        n = Node(ns, bin_dir, str(state_dir), str(data_dir))
        stack.enter_context(n.stack)
        yield n


def pod_routes(node: Node, pod: Any) -> dict[str, str | None]:
    return {r["dst"]: r.get("gateway") for r in node.ip_json("route", "show", ns=pod.name)}


# ---- ADD ------------------------------------------------------------------------------


def test_add_addresses_the_pod_from_the_node_subnet_with_overlay_mtu_and_routes(node):
    pod = node.pod()
    result = node.add(pod)

    ips = result["ips"]
    assert len(ips) == 1
    address = ipaddress.ip_interface(ips[0]["address"])
    assert address.network == ipaddress.ip_network(SUBNET) and address.ip != ipaddress.ip_address(GATEWAY)
    assert ips[0]["gateway"] == GATEWAY
    names = [i["name"] for i in result["interfaces"]]
    assert names[0] == BRIDGE and names[2] == "eth0"
    assert result["interfaces"][2]["sandbox"] == pod.path
    assert {"dst": NETWORK} in result["routes"]
    assert {"dst": "0.0.0.0/0", "gw": GATEWAY} in result["routes"]

    eth0 = node.ip_json("addr", "show", "dev", "eth0", ns=pod.name)[0]
    assert eth0["mtu"] == MTU
    assert f"{address.ip}/{address.network.prefixlen}" in [
        f"{a['local']}/{a['prefixlen']}" for a in eth0["addr_info"] if a["family"] == "inet"
    ]
    routes = pod_routes(node, pod)
    assert routes["default"] == GATEWAY
    assert routes[NETWORK] == GATEWAY

    # The bridge the delegate created: gateway address, overlay MTU; the pod's port in hairpin mode.
    bridge = node.ip_json("addr", "show", "dev", BRIDGE)[0]
    assert [f"{a['local']}/{a['prefixlen']}" for a in bridge["addr_info"] if a["family"] == "inet"] == [f"{GATEWAY}/24"]
    host_veth = result["interfaces"][1]["name"]
    port = node.ip_json("-d", "link", "show", "dev", host_veth)[0]
    assert port["master"] == BRIDGE and port["mtu"] == MTU
    assert port["linkinfo"]["info_slave_data"]["hairpin"] is True

    # Leased in the node's data dir, the delegate cached in the state dir.
    assert node.leases() == [str(address.ip)]
    assert node.cache_files() == [f"{NET_NAME}-ctr1-eth0.json"]
    with open(os.path.join(node.state_dir, "vxlan", f"{NET_NAME}-ctr1-eth0.json")) as fh:
        cached = json.load(fh)
    assert cached["delegate"]["type"] == "bridge" and cached["delegate"]["ipMasq"] is False
    assert cached["delegate"]["ipam"]["ranges"] == [[{"subnet": SUBNET, "gateway": GATEWAY}]]
    assert cached["delegate"]["ipam"]["dataDir"] == node.data_dir

    assert node.ping(pod, GATEWAY)


def test_pods_on_one_node_reach_each_other(node):
    pods = [node.pod(), node.pod()]
    addresses = [node.add(pod, f"ctr{i}")["ips"][0]["address"].split("/")[0] for i, pod in enumerate(pods)]
    assert addresses[0] != addresses[1]
    assert node.ping(pods[0], addresses[1])
    assert node.ping(pods[1], addresses[0])


def test_options_override_the_derived_bridge_configuration(node):
    pod = node.pod()
    result = node.add(pod, mtu=1300, isDefaultGateway=False, hairpinMode=False, bridge="other0")
    assert result["interfaces"][0]["name"] == "other0"
    assert node.ip_json("link", "show", "dev", "eth0", ns=pod.name)[0]["mtu"] == 1300
    routes = pod_routes(node, pod)
    assert "default" not in routes and routes[NETWORK] == GATEWAY
    port = node.ip_json("-d", "link", "show", "dev", result["interfaces"][1]["name"])[0]
    assert port["linkinfo"]["info_slave_data"]["hairpin"] is False


def test_add_without_a_lease_asks_to_try_again_and_leaves_nothing(node):
    remove_state(node.state_dir)
    pod = node.pod()
    outcome = node.run("ADD", node.conf(), pod)
    assert outcome.rc != 0
    assert outcome.out["code"] == 11
    assert "no overlay subnet lease" in outcome.out["msg"]
    assert "pycni agent" in outcome.out["details"]
    assert node.veths() == [] and node.leases() == [] and node.cache_files() == []


def test_add_with_a_broken_state_file_reports_an_io_error(node):
    with open(os.path.join(node.state_dir, "overlay.json"), "w") as fh:
        fh.write("{not json")
    outcome = node.run("ADD", node.conf(), node.pod())
    assert outcome.rc != 0 and outcome.out["code"] == 5
    assert "overlay state" in outcome.out["msg"]


@pytest.mark.parametrize(
    "options, code",
    [
        ({"mtu": 20}, 7),
        ({"stateDir": "relative/dir"}, 7),
        ({"delegate": {"type": "macvlan"}}, 7),
        ({"ipam": {"subnet": "10.1.0.0/16"}}, 7),
        ({"hairpinMode": "yes"}, 7),
    ],
)  # a wrong JSON type is 7, naming the option
def test_invalid_configurations_are_refused(node, options, code):
    outcome = node.run("ADD", node.conf(**options), node.pod())
    assert outcome.rc != 0 and outcome.out["code"] == code, outcome.out
    assert node.veths() == [] and node.leases() == []


# ---- results in every version ---------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_result_in_the_configured_version(node, version):
    pod = node.pod()
    out = node.add(pod, version=version)
    assert out["cniVersion"] == version
    if version == "0.2.0":
        assert out["ip4"]["ip"].startswith("10.244.5.") and out["ip4"]["gateway"] == GATEWAY
        assert {"dst": NETWORK} in out["ip4"]["routes"]
        assert "interfaces" not in out
    else:
        assert out["ips"][0]["address"].startswith("10.244.5.")
        assert [i["name"] for i in out["interfaces"]][::2] == [BRIDGE, "eth0"]
        if version.startswith("0."):
            assert out["ips"][0]["version"] == "4"
        else:
            assert "version" not in out["ips"][0]
        has_mtu = all("mtu" in i for i in out["interfaces"])
        assert has_mtu == (version == "1.1.0")
        if version == "1.1.0":
            assert out["interfaces"][2]["mtu"] == MTU
    outcome = node.run("DEL", node.conf(version=version), pod)
    assert outcome.rc == 0, outcome.out
    assert node.leases() == [] and node.veths() == [] and node.cache_files() == []


# ---- DEL --------------------------------------------------------------------------------------


def test_del_removes_veth_lease_and_cache_and_is_idempotent(node):
    pod = node.pod()
    node.add(pod)
    assert node.veths() and node.leases() and node.cache_files()
    for _ in range(2):
        outcome = node.run("DEL", node.conf(), pod)
        assert outcome.rc == 0, outcome.out
        assert outcome.out is None
    assert node.veths() == [] and node.leases() == [] and node.cache_files() == []
    assert not [link for link in node.ip_json("link", "show", ns=pod.name) if link["ifname"] == "eth0"]
    # With no namespace at all (the runtime lost it): still success.
    outcome = node.run("DEL", node.conf(), netns_path="")
    assert outcome.rc == 0, outcome.out


def test_del_with_empty_netns_releases_the_lease(node):
    pod = node.pod()
    node.add(pod)
    outcome = node.run("DEL", node.conf(), netns_path="")
    assert outcome.rc == 0, outcome.out
    assert node.leases() == [] and node.cache_files() == []


def test_del_after_the_state_file_is_gone_uses_the_cached_delegate(node):
    pod = node.pod()
    node.add(pod)
    remove_state(node.state_dir)
    outcome = node.run("DEL", node.conf(), pod)
    assert outcome.rc == 0, outcome.out
    assert node.veths() == [] and node.leases() == [] and node.cache_files() == []


def test_del_with_neither_state_nor_cache_still_releases_the_address(node):
    pod = node.pod()
    node.add(pod)
    remove_state(node.state_dir)
    shutil.rmtree(os.path.join(node.state_dir, "vxlan"))
    outcome = node.run("DEL", node.conf(), pod)
    assert outcome.rc == 0, outcome.out
    assert node.veths() == [] and node.leases() == []


def test_del_after_the_lease_changed_releases_from_the_old_subnet(node):
    pod = node.pod()
    node.add(pod)
    write_state(node.state_dir, node_state(subnet="10.244.9.0/24", gateway="10.244.9.1"))
    outcome = node.run("DEL", node.conf(), pod)
    assert outcome.rc == 0, outcome.out
    assert node.leases() == [] and node.veths() == [] and node.cache_files() == []


# ---- CHECK ------------------------------------------------------------------------------------


def test_check_passes_then_fails_when_the_node_subnet_changed(node):
    pod = node.pod()
    result = node.add(pod)
    outcome = node.run("CHECK", node.conf(prevResult=result), pod)
    assert outcome.rc == 0, outcome.out
    write_state(node.state_dir, node_state(subnet="10.244.9.0/24", gateway="10.244.9.1"))
    outcome = node.run("CHECK", node.conf(prevResult=result), pod)
    assert outcome.rc != 0
    assert "subnet" in outcome.out["msg"] and "recreate the pod" in outcome.out["details"]


def test_check_notices_a_missing_container_interface(node):
    pod = node.pod()
    result = node.add(pod)
    subprocess.run(["ip", "-n", pod.name, "link", "del", "eth0"], check=True)
    outcome = node.run("CHECK", node.conf(prevResult=result), pod)
    assert outcome.rc != 0 and "eth0" in outcome.out["msg"]


# ---- STATUS and GC -----------------------------------------------------------------------------


def test_status_follows_the_lease_and_the_vxlan_device(node):
    conf = node.conf(version="1.1.0")
    assert node.run("STATUS", conf).rc == 0
    subprocess.run(["ip", "-n", node.name, "link", "del", VXLAN_DEV], check=True)
    outcome = node.run("STATUS", conf)
    assert outcome.rc != 0 and outcome.out["code"] == 51 and VXLAN_DEV in outcome.out["msg"]
    remove_state(node.state_dir)
    outcome = node.run("STATUS", conf)
    assert outcome.rc != 0 and outcome.out["code"] == 50
    assert "no overlay subnet lease" in outcome.out["msg"]


def test_gc_releases_what_no_valid_attachment_owns(node):
    pods = [node.pod(), node.pod()]
    for i, pod in enumerate(pods):
        node.add(pod, f"ctr{i}", version="1.1.0")
    keep = node.leases()
    assert len(keep) == 2
    conf = node.conf(version="1.1.0")
    conf["cni.dev/valid-attachments"] = [{"containerID": "ctr0", "ifname": "eth0"}]
    outcome = node.run("GC", conf)
    assert outcome.rc == 0, outcome.out
    assert len(node.leases()) == 1
    assert node.cache_files() == [f"{NET_NAME}-ctr0-eth0.json"]
    # Without the state file GC still works from the configuration alone.
    remove_state(node.state_dir)
    conf["cni.dev/valid-attachments"] = []
    outcome = node.run("GC", conf)
    assert outcome.rc == 0, outcome.out
    assert node.leases() == [] and node.cache_files() == []


def test_version_lists_every_version(node):
    outcome = node.run("VERSION", {})
    assert outcome.rc == 0
    assert outcome.out["supportedVersions"] == ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


# ---- chained with portmap and bandwidth ------------------------------------------------------


def test_chain_with_portmap_and_bandwidth_adds_checks_and_deletes_cleanly(node, tmp_path):
    from conf import parse_conflist
    from pycni.runtime import CNIRuntime, RuntimeConf

    conflist = {
        "cniVersion": "1.1.0",
        "name": NET_NAME,
        "plugins": [
            {"type": "vxlan", "stateDir": node.state_dir, "dataDir": node.data_dir},
            {"type": "portmap", "capabilities": {"portMappings": True}},
            {"type": "bandwidth", "capabilities": {"bandwidth": True}},
        ],
    }
    netlist = parse_conflist(json.dumps(conflist).encode(), "test")
    runtime = CNIRuntime(node.bin_dir, str(tmp_path / "cache"))
    pod = node.pod()
    rt = RuntimeConf(
        container_id="chain1",
        netns=pod.path,
        ifname="eth0",
        capability_args={
            "portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}],
            "bandwidth": {
                "ingressRate": 8_000_000,
                "ingressBurst": 64_000,
                "egressRate": 8_000_000,
                "egressBurst": 64_000,
            },
        },
    )
    with netns.enter(node.ns.path):
        result = runtime.add(netlist, rt)
    try:
        assert result["ips"][0]["address"].startswith("10.244.5.")
        host_veth = result["interfaces"][1]["name"]
        qdiscs = json.loads(
            subprocess.run(
                ["tc", "-n", node.name, "-j", "qdisc", "show", "dev", host_veth], capture_output=True, check=True
            ).stdout
        )
        assert [q["kind"] for q in qdiscs].count("tbf") == 1
        ruleset = subprocess.run(
            ["ip", "netns", "exec", node.name, "nft", "list", "ruleset"], capture_output=True, text=True, check=True
        ).stdout
        assert "18080" in ruleset
        with netns.enter(node.ns.path):
            assert runtime.check(netlist, rt)
    finally:
        with netns.enter(node.ns.path):
            runtime.delete(netlist, rt)
    assert node.veths() == [] and node.leases() == [] and node.cache_files() == []
    ifb = [
        link["ifname"]
        for link in node.ip_json("-d", "link", "show")
        if link.get("linkinfo", {}).get("info_kind") == "ifb"
    ]
    assert ifb == []
    ruleset = subprocess.run(
        ["ip", "netns", "exec", node.name, "nft", "list", "ruleset"], capture_output=True, text=True, check=True
    ).stdout
    assert "18080" not in ruleset and "chain1" not in ruleset
    with netns.enter(node.ns.path):
        runtime.delete(netlist, rt)  # a second DEL of the whole chain succeeds too
