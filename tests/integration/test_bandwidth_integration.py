"""bandwidth plugin against the kernel and the reference plugin (/usr/lib/cni/bandwidth v1.1.1).

Each test builds node namespaces (standing in for hosts) and attaches pods
to a node bridge with the REFERENCE bridge + host-local plugins; then our
bandwidth plugin (a real process, run inside the node namespace) and the
reference one are chained after it on the same input, each on its own node,
and results, exit codes, qdiscs and ifb devices are compared. Traffic tests
push TCP with iperf3 between two pods of one node and measure it at the
receiver.

Where v1.1.1 departs from the spec these tests follow the spec and say so:
its validation errors carry code 999 (ours: 7, invalid network config), and
its CHECK panics when no bandwidth is configured (ours: success).
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import netns
from cni_plugins.bandwidth.shaping import ifb_name

REFERENCE = "/usr/lib/cni"
NETWORK = "bwnet"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(
        not os.path.exists(f"{REFERENCE}/bandwidth"), reason="reference CNI plugins not installed in /usr/lib/cni"
    ),
]


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> str:
    """An executable of our plugin, as `pycni install` would write it."""
    exe = tmp_path_factory.mktemp("bin") / "bandwidth"
    exe.write_text(f"#!{sys.executable}\nfrom cni_plugins.bandwidth import main\nmain()\n")
    exe.chmod(0o755)
    return str(exe)


@dataclass
class Pod:
    ns: str
    path: str
    container_id: str
    prev: dict
    ip: str
    ifname: str = "eth0"

    @property
    def host_veth(self) -> str:
        return next(i["name"] for i in self.prev["interfaces"] if i["name"].startswith("veth"))


@dataclass
class Node:
    """A node namespace with a reference bridge; pods attach to it."""

    name: str
    ipam_dir: Path
    pods: list[Pod] = field(default_factory=list)

    def attach(self, container_id: str) -> Pod:
        pod_ns = f"pt-bwp-{secrets.token_hex(4)}"
        path = netns.create(pod_ns)
        conf = {
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": True,
            "ipam": {"type": "host-local", "subnet": "10.77.0.0/24", "dataDir": str(self.ipam_dir)},
        }
        pod = Pod(ns=pod_ns, path=path, container_id=container_id, prev={}, ip="")
        self.pods.append(pod)
        rc, out = run_plugin(f"{REFERENCE}/bridge", "ADD", conf, self, pod)
        assert rc == 0, out
        pod.prev = out
        pod.ip = out["ips"][0]["address"].split("/")[0]
        return pod

    def qdiscs(self) -> list[dict]:
        """`tc -d -j qdisc show` of the node, minus the noqueue defaults, devices by role."""
        roles = {p.host_veth: f"host-veth-{p.container_id}" for p in self.pods}
        out = []
        for q in json.loads(sh("ip", "netns", "exec", self.name, "tc", "-d", "-j", "qdisc", "show").stdout):
            if q["kind"] in ("noqueue", "pfifo_fast"):
                continue
            q.pop("refcnt", None)
            q["dev"] = roles.get(q["dev"], q["dev"])
            out.append(q)
        return sorted(out, key=lambda q: (q["dev"], q["handle"]))

    def ifbs(self) -> list[dict]:
        links = json.loads(sh("ip", "-n", self.name, "-d", "-j", "link", "show", "type", "ifb").stdout)
        keep = ("ifname", "mtu", "txqlen", "operstate", "flags", "qdisc")
        return sorted(({k: link.get(k) for k in keep} for link in links), key=lambda x: x["ifname"])

    def ifb_aliases(self) -> dict[str, str]:
        links = json.loads(sh("ip", "-n", self.name, "-d", "-j", "link", "show", "type", "ifb").stdout)
        return {link["ifname"]: link.get("ifalias", "") for link in links}

    def filters(self, dev: str, parent: str) -> list[dict]:
        out = sh("ip", "netns", "exec", self.name, "tc", "-j", "filter", "show", "dev", dev, "parent", parent)
        return json.loads(out.stdout or "[]")


@pytest.fixture
def make_node(tmp_path):
    created: list[Node] = []

    def make() -> Node:
        name = f"pt-bwn-{secrets.token_hex(4)}"
        netns.create(name)
        node = Node(name=name, ipam_dir=tmp_path / name)
        created.append(node)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return node

    yield make
    for node in created:
        for pod in node.pods:
            if netns.exists(pod.ns):
                netns.delete(pod.ns)
        netns.delete(node.name)


def run_plugin(
    exe: str, command: str, conf: dict, node: Node, pod: Pod | None, container_id: str | None = None
) -> tuple[int, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update(
        CNI_COMMAND=command,
        CNI_PATH=REFERENCE,
        CNI_IFNAME=pod.ifname if pod else "eth0",
        CNI_CONTAINERID=container_id or (pod.container_id if pod else "none"),
        CNI_NETNS=pod.path if pod else "",
    )
    proc = subprocess.run(
        ["ip", "netns", "exec", node.name, exe],
        input=json.dumps(conf),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert "Traceback" not in proc.stdout
    return proc.returncode, (json.loads(proc.stdout) if proc.stdout.strip() else {})


def bw_conf(pod: Pod, version: str = "1.0.0", **options) -> dict:
    conf = {"cniVersion": version, "name": NETWORK, "type": "bandwidth", "prevResult": copy.deepcopy(pod.prev)}
    conf.update(options)
    return conf


def without_macs(result: dict, pod: Pod) -> dict:
    out = copy.deepcopy(result)
    for iface in out.get("interfaces", []):
        iface.pop("mac", None)
        if iface["name"] == pod.host_veth:
            iface["name"] = "host-veth"
        iface.pop("sandbox", None)
    return out


def twin_pods(make_node, container_id: str = "ctr1") -> tuple[Node, Pod, Node, Pod]:
    """The same pod (same container ID) on two nodes: one for us, one for the reference."""
    ours_node, ref_node = make_node(), make_node()
    return ours_node, ours_node.attach(container_id), ref_node, ref_node.attach(container_id)


LIMITS = {"ingressRate": 8_000_000, "ingressBurst": 80_000, "egressRate": 50_000_000, "egressBurst": 500_000}


# ---- ADD compared with the reference ---------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(LIMITS, id="both-directions"),
        pytest.param({"ingressRate": 1_000_000, "ingressBurst": 16_000}, id="ingress-only"),
        pytest.param({"egressRate": 123_456_789, "egressBurst": 9_999_999}, id="egress-only"),
        pytest.param({"runtimeConfig": {"bandwidth": LIMITS}, "capabilities": {"bandwidth": True}}, id="runtimeConfig"),
        pytest.param(
            {"ingressRate": 2_000_000, "ingressBurst": 40_000, "runtimeConfig": {"bandwidth": LIMITS}},
            id="top-level-wins",
        ),
        pytest.param({"runtimeConfig": {"bandwidth": {"ingressRate": 0, "ingressBurst": 0}}}, id="zero-is-noop"),
        pytest.param({}, id="unconfigured-is-noop"),
    ],
)
def test_add_matches_reference(make_node, ours, options):
    our_node, our_pod, ref_node, ref_pod = twin_pods(make_node)
    rc_ours, res_ours = run_plugin(ours, "ADD", bw_conf(our_pod, **options), our_node, our_pod)
    rc_ref, res_ref = run_plugin(f"{REFERENCE}/bandwidth", "ADD", bw_conf(ref_pod, **options), ref_node, ref_pod)
    assert (rc_ours, rc_ref) == (0, 0), (res_ours, res_ref)
    assert without_macs(res_ours, our_pod) == without_macs(res_ref, ref_pod)
    assert our_node.qdiscs() == ref_node.qdiscs()
    assert our_node.ifbs() == ref_node.ifbs()
    if res_ours != our_pod.prev:
        # The reference accepts what we built as its own (its CHECK panics when nothing is configured).
        rc, out = run_plugin(
            f"{REFERENCE}/bandwidth", "CHECK", bw_conf(our_pod, **options) | {"prevResult": res_ours}, our_node, our_pod
        )
        assert rc == 0, out


def test_add_result_versions_and_ifb(make_node, ours):
    node = make_node()
    pod = node.attach("ctr-v")
    rc, res = run_plugin(ours, "ADD", bw_conf(pod, version="0.4.0", **LIMITS), node, pod)
    assert rc == 0, res
    assert installed_shaping(node, pod) == expected_shaping(LIMITS, res["interfaces"][-1]["name"])
    assert res["cniVersion"] == "0.4.0"
    ifb = res["interfaces"][-1]
    assert ifb["name"].startswith("bwp") and len(ifb["name"]) == 15 and "sandbox" not in ifb
    assert node.ifb_aliases() == {ifb["name"]: f"{NETWORK}/ctr-v/eth0"}
    [flt] = [f for f in node.filters(pod.host_veth, "ffff:") if "options" in f and "match" in f["options"]]
    assert flt["options"]["flowid"] == "1:1"
    assert [a["to_dev"] for a in flt["options"]["actions"]] == [ifb["name"]]


def test_latency_option(make_node, ours):
    node = make_node()
    pod = node.attach("ctr-lat")
    rc, res = run_plugin(ours, "ADD", bw_conf(pod, latencyMs=100, **LIMITS), node, pod)
    assert rc == 0, res
    tbfs = [q for q in node.qdiscs() if q["kind"] == "tbf"]
    assert [q["options"]["lat"] for q in tbfs] == [100_000, 100_000]
    rc, res = run_plugin(ours, "CHECK", bw_conf(pod, latencyMs=100, **LIMITS) | {"prevResult": res}, node, pod)
    assert rc == 0, res


# ---- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"ingressRate": 1_000_000},
        {"ingressBurst": 1_000_000},
        {"egressRate": 1_000_000, "egressBurst": 0},
        {"egressBurst": 8 * 0xFFFFFFFF, "egressRate": 1_000_000},
        {"runtimeConfig": {"bandwidth": {"egressRate": 5}}},
        {"ingressRate": -1, "ingressBurst": 10},
        {"ingressRate": "8M", "ingressBurst": 80_000},
    ],
    ids=[
        "rate-no-burst",
        "burst-no-rate",
        "egress-burst-zero",
        "burst-over-4GB",
        "runtime-rate-no-burst",
        "negative",
        "string",
    ],
)
def test_invalid_config_is_code_7_and_changes_nothing(make_node, ours, options):
    our_node, our_pod, ref_node, ref_pod = twin_pods(make_node)
    before = our_node.qdiscs(), our_node.ifbs()
    rc, err = run_plugin(ours, "ADD", bw_conf(our_pod, **options), our_node, our_pod)
    assert rc != 0 and err["code"] == 7, err  # v1.1.1 reports these as 999
    assert (our_node.qdiscs(), our_node.ifbs()) == before
    rc_ref, _ = run_plugin(f"{REFERENCE}/bandwidth", "ADD", bw_conf(ref_pod, **options), ref_node, ref_pod)
    assert rc_ref != 0


@pytest.mark.parametrize(
    "options",
    [
        {"shapedSubnets": ["10.0.0.0/8"], "unshapedSubnets": ["10.1.0.0/16"], **LIMITS},
        {"unshapedSubnets": ["not-a-subnet"], **LIMITS},
        {"latencyMs": 0, **LIMITS},
        {"ingressRate": 7, "ingressBurst": 100},
    ],
)
def test_invalid_extensions_are_code_7(make_node, ours, options):
    node = make_node()
    pod = node.attach("ctr-bad")
    rc, err = run_plugin(ours, "ADD", bw_conf(pod, **options), node, pod)
    assert rc != 0 and err["code"] == 7, err
    assert node.qdiscs() == [] and node.ifbs() == []


def test_not_chained_is_an_error(make_node, ours):
    node = make_node()
    pod = node.attach("ctr-nc")
    conf = bw_conf(pod, **LIMITS)
    del conf["prevResult"]
    rc, err = run_plugin(ours, "ADD", conf, node, pod)
    assert rc != 0 and err["code"] == 7 and "chained" in err["msg"]


# ---- CHECK ---------------------------------------------------------------------------------


def test_check(make_node, ours):
    node = make_node()
    pod = node.attach("ctr-chk")
    rc, res = run_plugin(ours, "ADD", bw_conf(pod, **LIMITS), node, pod)
    assert rc == 0, res
    check = bw_conf(pod, **LIMITS) | {"prevResult": res}
    assert run_plugin(ours, "CHECK", check, node, pod)[0] == 0
    assert run_plugin(f"{REFERENCE}/bandwidth", "CHECK", check, node, pod)[0] == 0
    # A different configuration does not match what is there.
    rc, err = run_plugin(ours, "CHECK", check | {"egressRate": 40_000_000}, node, pod)
    assert rc != 0 and "doesn't match" in err["msg"], err
    rc, err = run_plugin(ours, "CHECK", {k: v for k, v in check.items() if k not in LIMITS}, node, pod)
    assert rc != 0 and "none is configured" in err["msg"], err
    # Someone changed the qdisc behind our back.
    sh(
        "ip",
        "netns",
        "exec",
        node.name,
        "tc",
        "qdisc",
        "replace",
        "dev",
        pod.host_veth,
        "root",
        "handle",
        "1:",
        "tbf",
        "rate",
        "9mbit",
        "burst",
        "10000",
        "latency",
        "25ms",
    )
    rc, err = run_plugin(ours, "CHECK", check, node, pod)
    assert rc != 0 and "doesn't match" in err["msg"], err
    # The ifb gone: reported (once ADD has put the shaping back, so only the ifb is wrong).
    assert run_plugin(ours, "ADD", bw_conf(pod, **LIMITS), node, pod)[0] == 0
    assert run_plugin(ours, "CHECK", check, node, pod)[0] == 0
    sh("ip", "-n", node.name, "link", "del", res["interfaces"][-1]["name"])
    rc, err = run_plugin(ours, "CHECK", check, node, pod)
    assert rc != 0 and "not found" in err["msg"], err


@pytest.mark.parametrize("subnets", [{}, {"shapedSubnets": ["10.99.0.0/16"]}], ids=["tbf", "htb"])
def test_check_compares_burst_and_latency_not_only_the_rate(make_node, ours, subnets):
    """Same rate, another burst or latency: CHECK must say the shaping does not match."""
    node = make_node()
    pod = node.attach("ctr-burst")
    rc, res = run_plugin(ours, "ADD", bw_conf(pod, **LIMITS, **subnets), node, pod)
    assert rc == 0, res
    check = bw_conf(pod, **LIMITS, **subnets) | {"prevResult": res}
    assert run_plugin(ours, "CHECK", check, node, pod)[0] == 0
    changes = [{"ingressBurst": LIMITS["ingressBurst"] * 2}, {"egressBurst": LIMITS["egressBurst"] // 2}]
    if not subnets:
        changes.append({"latencyMs": 100})  # tbf's queue limit is rate x latency + burst (htb has none)
    for change in changes:
        rc, err = run_plugin(ours, "CHECK", check | change, node, pod)
        assert rc != 0 and err["code"] == 999 and "match" in err["msg"], (change, err)
    assert run_plugin(ours, "CHECK", check, node, pod)[0] == 0
    if subnets:
        # The shaped class changed behind our back: same rate, another burst.
        sh(
            "ip",
            "netns",
            "exec",
            node.name,
            "tc",
            "class",
            "change",
            "dev",
            pod.host_veth,
            "parent",
            "1:",
            "classid",
            "1:30",
            "htb",
            "rate",
            "8mbit",
            "ceil",
            "8mbit",
            "burst",
            "20000b",
        )
    else:
        # The qdisc replaced behind our back: same rate, another burst (the limit kept), then another latency.
        for burst, latency in (("20000", "25ms"), ("10000", "50ms")):
            sh(
                "ip",
                "netns",
                "exec",
                node.name,
                "tc",
                "qdisc",
                "replace",
                "dev",
                pod.host_veth,
                "root",
                "handle",
                "1:",
                "tbf",
                "rate",
                "8mbit",
                "burst",
                burst,
                "latency",
                latency,
            )
            rc, err = run_plugin(ours, "CHECK", check, node, pod)
            assert rc != 0 and "doesn't match" in err["msg"], (burst, latency, err)
        return
    rc, err = run_plugin(ours, "CHECK", check, node, pod)
    assert rc != 0 and "match" in err["msg"], err


def test_check_without_bandwidth_config_succeeds(make_node, ours):
    """v1.1.1 panics here (nil bandwidth entry); upstream and the spec expect success, and nothing shaped."""
    node = make_node()
    pod = node.attach("ctr-nobw")
    rc, res = run_plugin(ours, "ADD", bw_conf(pod), node, pod)
    assert rc == 0 and res == pod.prev, res  # nothing configured: the result passes through unchanged
    assert node.qdiscs() == [] and node.ifbs() == []
    rc, out = run_plugin(ours, "CHECK", bw_conf(pod), node, pod)
    assert rc == 0 and out == {}, out
    assert node.qdiscs() == [] and node.ifbs() == []


# ---- DEL -----------------------------------------------------------------------------------


def test_del_removes_everything_and_is_idempotent(make_node, ours):
    our_node, our_pod, ref_node, ref_pod = twin_pods(make_node, "ctr-del")
    for exe, node, pod in ((ours, our_node, our_pod), (f"{REFERENCE}/bandwidth", ref_node, ref_pod)):
        rc, res = run_plugin(exe, "ADD", bw_conf(pod, **LIMITS), node, pod)
        assert rc == 0, res
        assert run_plugin(exe, "DEL", bw_conf(pod, **LIMITS) | {"prevResult": res}, node, pod)[0] == 0
        assert node.ifbs() == []
    # The reference leaves the host veth's qdiscs to die with the veth; we remove them now.
    assert our_node.qdiscs() == []
    assert {q["kind"] for q in ref_node.qdiscs()} == {"tbf", "ingress"}
    # Again, with the pod's namespace gone, and with no prevResult: still success.
    assert run_plugin(ours, "DEL", bw_conf(our_pod, **LIMITS), our_node, our_pod)[0] == 0
    netns.delete(our_pod.ns)
    assert run_plugin(ours, "DEL", bw_conf(our_pod), our_node, our_pod)[0] == 0
    conf = bw_conf(our_pod)
    del conf["prevResult"]
    assert run_plugin(ours, "DEL", conf, our_node, None, container_id="ctr-del")[0] == 0


def installed_shaping(node: Node, pod: Pod) -> dict[str, tuple[str, int, int]]:
    """What tc shows in the node's namespace, as (qdisc kind, rate in bit/s, burst in bits) per direction:
    "ingress" is the root qdisc of the pod's host veth (traffic toward the pod), "egress" the root qdisc of
    the ifb that the veth's ingress qdisc redirects to (traffic from the pod); "ifb" is that device's name."""

    def root(dev: str) -> dict | None:
        qdiscs = json.loads(sh("ip", "netns", "exec", node.name, "tc", "-j", "qdisc", "show", "dev", dev).stdout)
        return next((q for q in qdiscs if q.get("root") and q["kind"] not in ("noqueue", "pfifo_fast")), None)

    def bucket(q: dict | None) -> tuple[str, int, int] | None:
        if q is None:
            return None
        burst = q["options"]["burst"]  # "<bytes>b/<cell>"
        return q["kind"], q["options"]["rate"] * 8, int(str(burst).split("b")[0]) * 8

    out: dict = {"ingress": bucket(root(pod.host_veth))}
    redirects = [
        a["to_dev"]
        for f in node.filters(pod.host_veth, "ffff:")
        if "actions" in f.get("options", {})
        for a in f["options"]["actions"]
        if "to_dev" in a
    ]
    out["ifb"] = redirects[0] if len(redirects) == 1 else redirects
    out["egress"] = bucket(root(redirects[0])) if len(redirects) == 1 else None
    return out


def expected_shaping(limits: dict, ifb: str) -> dict:
    return {
        "ingress": ("tbf", limits["ingressRate"], limits["ingressBurst"]),
        "ifb": ifb,
        "egress": ("tbf", limits["egressRate"], limits["egressBurst"]),
    }


def test_add_twice_replaces(make_node, ours):
    """A repeated ADD installs the shaping it is given now: the rates and bursts tc shows are the new ones."""
    node = make_node()
    pod = node.attach("ctr-twice")
    rc, res = run_plugin(ours, "ADD", bw_conf(pod, **LIMITS), node, pod)
    assert rc == 0, res
    ifb = res["interfaces"][-1]["name"]
    assert installed_shaping(node, pod) == expected_shaping(LIMITS, ifb)
    again = {"ingressRate": 16_000_000, "ingressBurst": 160_000, "egressRate": 24_000_000, "egressBurst": 240_000}
    rc, res = run_plugin(ours, "ADD", bw_conf(pod, **again), node, pod)
    assert rc == 0, res
    assert res["interfaces"][-1]["name"] == ifb
    assert installed_shaping(node, pod) == expected_shaping(again, ifb)
    assert [link["ifname"] for link in node.ifbs()] == [ifb]


def test_failed_add_leaves_nothing_behind(make_node, ours):
    node = make_node()
    pod = node.attach("ctr-fail")
    squatter = ifb_name(NETWORK, "ctr-fail")
    sh("ip", "-n", node.name, "link", "add", squatter, "type", "veth", "peer", "name", "squat-peer")
    rc, err = run_plugin(ours, "ADD", bw_conf(pod, **LIMITS), node, pod)
    assert rc != 0 and squatter in err["details"], err
    assert node.qdiscs() == []  # the ingress tbf made before the ifb failed was removed again
    assert sh("ip", "-n", node.name, "link", "show", squatter).returncode == 0  # not ours: untouched


# ---- GC ------------------------------------------------------------------------------------


def test_gc_removes_ifbs_of_gone_attachments(make_node, ours):
    node = make_node()
    keep, gone, leaked = node.attach("ctr-keep"), node.attach("ctr-gone"), node.attach("ctr-leaked")
    for pod in (keep, gone, leaked):
        rc, res = run_plugin(ours, "ADD", bw_conf(pod, **LIMITS), node, pod)
        assert rc == 0, res
    netns.delete(gone.ns)  # its veth and the qdiscs on it go with the namespace
    # An ifb of another network with the same naming scheme must survive.
    other = node.attach("ctr-other")
    rc, _ = run_plugin(ours, "ADD", bw_conf(other, **LIMITS) | {"name": "othernet"}, node, other)
    assert rc == 0
    assert len(node.ifbs()) == 4
    no_list = {"cniVersion": "1.1.0", "name": NETWORK, "type": "bandwidth"}
    assert run_plugin(ours, "GC", no_list, node, None)[0] == 0
    assert len(node.ifbs()) == 4  # without a list of valid attachments nothing is judged stale
    gc = {
        "cniVersion": "1.1.0",
        "name": NETWORK,
        "type": "bandwidth",
        "cni.dev/valid-attachments": [{"containerID": "ctr-keep", "ifname": "eth0"}],
    }
    rc, out = run_plugin(ours, "GC", gc, node, None)
    assert rc == 0, out
    assert sorted(node.ifb_aliases().values()) == [f"{NETWORK}/ctr-keep/eth0", "othernet/ctr-other/eth0"]
    # The leaked pod's veth still exists: no qdisc of it is left either.
    devs = {q["dev"] for q in node.qdiscs()}
    assert "host-veth-ctr-leaked" not in devs and "host-veth-ctr-keep" in devs
    check = bw_conf(keep, **LIMITS)
    check["prevResult"]["interfaces"].append(
        {"name": next(iter(n for n, a in node.ifb_aliases().items() if a.startswith(NETWORK)))}
    )
    assert run_plugin(ours, "CHECK", check, node, keep)[0] == 0


# ---- shaped / unshaped subnets -------------------------------------------------------------------


@pytest.mark.parametrize("key,default", [("unshapedSubnets", "0x30"), ("shapedSubnets", "0x1")])
def test_subnets_build_htb(make_node, ours, key, default):
    node = make_node()
    pod = node.attach("ctr-sub")
    options = {key: ["10.99.0.0/16", "fd00:99::/64"], **LIMITS}
    rc, res = run_plugin(ours, "ADD", bw_conf(pod, **options), node, pod)
    assert rc == 0, res
    roots = [q for q in node.qdiscs() if q.get("root")]
    assert [q["kind"] for q in roots] == ["htb", "htb"]
    assert all(
        hex(q["options"]["default"]) == default
        if isinstance(q["options"]["default"], int)
        else q["options"]["default"] == default
        for q in roots
    )
    classes = sh("ip", "netns", "exec", node.name, "tc", "class", "show", "dev", pod.host_veth).stdout
    assert "class htb 1:30 root prio 0 rate 8Mbit ceil 8Mbit burst 10000b cburst 10000b" in classes
    assert "class htb 1:1 root prio 0 rate 100Gbit ceil 100Gbit" in classes
    # Traffic toward the pod is matched on its source address (IPv4 offset 12, IPv6 offset 8),
    # traffic from the pod (on the ifb) on its destination (16 and 24).
    for dev, v4, v6 in ((pod.host_veth, 12, 8), (res["interfaces"][-1]["name"], 16, 24)):
        text = sh("ip", "netns", "exec", node.name, "tc", "filter", "show", "dev", dev, "parent", "1:").stdout
        matches = sorted(line.strip() for line in text.splitlines() if line.strip().startswith("match"))
        assert matches == sorted(
            [
                f"match 0a630000/ffff0000 at {v4}",
                f"match fd000099/ffffffff at {v6}",
                f"match 00000000/ffffffff at {v6 + 4}",
            ]
        ), text
    assert run_plugin(ours, "CHECK", bw_conf(pod, **options) | {"prevResult": res}, node, pod)[0] == 0
    other = "shapedSubnets" if key == "unshapedSubnets" else "unshapedSubnets"
    rc, _ = run_plugin(ours, "CHECK", bw_conf(pod, **{other: options[key]}, **LIMITS) | {"prevResult": res}, node, pod)
    assert rc != 0
    assert run_plugin(ours, "DEL", bw_conf(pod, **options), node, pod)[0] == 0
    assert node.qdiscs() == [] and node.ifbs() == []


# ---- real traffic ----------------------------------------------------------------------------------


def iperf(node: Node, client: Pod, server: Pod, reverse: bool, seconds: int = 2) -> float:
    """Receiver-side TCP throughput in bit/s from `client` to `server` (server to client with reverse)."""
    port = str(5201 + secrets.randbelow(1000))
    srv = subprocess.Popen(
        ["ip", "netns", "exec", server.ns, "iperf3", "-s", "-1", "-p", port],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # bounded wait for the listener
            if f":{port} " in sh("ip", "netns", "exec", server.ns, "ss", "-Hltn").stdout:
                break
            time.sleep(0.05)
        args = [
            "ip",
            "netns",
            "exec",
            client.ns,
            "iperf3",
            "-c",
            server.ip,
            "-p",
            port,
            "-J",
            "-t",
            str(seconds),
            "-O",
            "1",
        ] + (["-R"] if reverse else [])
        out = json.loads(sh(*args, timeout=seconds + 20).stdout)
        return out["end"]["sum_received"]["bits_per_second"]
    finally:
        srv.kill()
        srv.wait(timeout=5)


@pytest.mark.skipif(not shutil.which("iperf3"), reason="iperf3 not installed")
@pytest.mark.parametrize("ingress,egress", [(8_000_000, 50_000_000), (50_000_000, 8_000_000)])
def test_tcp_throughput_is_shaped(make_node, ours, ingress, egress):
    node = make_node()
    shaped, peer = node.attach("ctr-shaped"), node.attach("ctr-peer")
    options = {
        "ingressRate": ingress,
        "ingressBurst": ingress // 100,
        "egressRate": egress,
        "egressBurst": egress // 100,
    }
    rc, res = run_plugin(ours, "ADD", bw_conf(shaped, **options), node, shaped)
    assert rc == 0, res
    to_pod = iperf(node, shaped, peer, reverse=True)
    from_pod = iperf(node, shaped, peer, reverse=False)
    assert abs(to_pod - ingress) <= 0.1 * ingress, f"toward the pod: {to_pod:.0f} bit/s, want {ingress}"
    assert abs(from_pod - egress) <= 0.1 * egress, f"from the pod: {from_pod:.0f} bit/s, want {egress}"


@pytest.mark.skipif(not shutil.which("iperf3"), reason="iperf3 not installed")
def test_unshaped_subnet_is_not_limited(make_node, ours):
    node = make_node()
    shaped, peer = node.attach("ctr-shaped"), node.attach("ctr-peer")
    options = {
        "unshapedSubnets": [f"{peer.ip}/32"],
        "ingressRate": 8_000_000,
        "ingressBurst": 80_000,
        "egressRate": 8_000_000,
        "egressBurst": 80_000,
    }
    rc, res = run_plugin(ours, "ADD", bw_conf(shaped, **options), node, shaped)
    assert rc == 0, res
    assert iperf(node, shaped, peer, reverse=True, seconds=1) > 80_000_000
    assert iperf(node, shaped, peer, reverse=False, seconds=1) > 80_000_000
    rc, res = run_plugin(
        ours, "ADD", bw_conf(shaped, **(options | {"unshapedSubnets": ["192.0.2.0/24"]})), node, shaped
    )
    assert rc == 0, res
    rate = iperf(node, shaped, peer, reverse=True, seconds=1)
    assert rate < 8_800_000, rate
