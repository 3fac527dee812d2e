"""The shipped examples (conf/examples) work, byte for byte, under the runtimes the e2e suites start.

The files are copied unchanged into the runtime's configuration directory: the
test's host (kit/host.py) has a private ``/run`` and ``/var/lib``, so the paths
the examples name (host-local's default ``/var/lib/cni/networks``, the vxlan
plugin's ``stateDir`` ``/run/pycni``) land in the host and die with it, and the
bridge ``pycni0`` and the example subnets live in the host's network namespace.
Nothing of the machine's is used.

- ``10-pycni-bridge.conflist`` (beside ``99-loopback.conf``, as a user copies the
  directory): containerd 1.6 through the CRI runs a sandbox with an address of
  the example's subnet, stops and removes it; podman 4.3 runs a container on it.
  containerd brings ``lo`` up with its own built-in loopback configuration and
  reads only the first list (``max_conf_num = 1``); podman reads only
  ``*.conflist`` files and sets ``lo`` up itself. So ``99-loopback.conf`` is run
  by cnitool (libcni 1.1), by the network name ``lo``.
- ``10-pycni-vxlan.conflist``: pycni's plugins only (the reference set has no
  vxlan). No node agent runs: the test writes the node's overlay state
  (``/run/pycni/overlay.json``, what the agent writes once it holds a lease) the
  way the vxlan plugin's own tests do, and the sandbox / container is addressed
  from that subnet. Reaching other nodes (the VXLAN device, peers) is the
  agent's part and is tested in tests/integration.

Every request the plugins got for an example network carries the file's own
``cniVersion`` (1.0.0: what libcni 1.1 reads), and every result answers in it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import grpc
import pytest

from tests.e2e.kit import cnitool, image, leftovers
from tests.e2e.kit import containerd as containerd_kit
from tests.e2e.kit import podman as podman_kit
from tests.e2e.kit.host import HOST_IP

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "conf" / "examples"
BRIDGE = "10-pycni-bridge.conflist"
VXLAN = "10-pycni-vxlan.conflist"
LOOPBACK = "99-loopback.conf"

# What `pycni agent` would have written after leasing this node a subnet of the example's cluster network.
NODE_STATE = {
    "network": "10.244.0.0/16",
    "subnet": "10.244.5.0/24",
    "gateway": "10.244.5.1",
    "mtu": 1450,
    "bridge": "pycni0",
    "vxlan_device": "pycni.1",
    "vni": 1,
    "public_ip": HOST_IP,
    "vtep_mac": "0a:e2:e0:00:00:01",
    "node_name": "e2e-node",
}
_WRITE_STATE = """
import json, sys
from cni_plugins.shared.overlaystate import OverlayState, write_state
write_state(sys.argv[1], OverlayState(**json.loads(sys.argv[2])))
"""


def example(name: str) -> dict:
    return json.loads((EXAMPLES / name).read_text())


def install(conf_dir: Path, *names: str) -> Path:
    """The examples copied byte for byte into conf_dir; conf_dir."""
    conf_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(EXAMPLES / name, conf_dir / name)
        assert (conf_dir / name).read_bytes() == (EXAMPLES / name).read_bytes()
    return conf_dir


def bridge_subnet() -> ipaddress.IPv4Network:
    plugin = example(BRIDGE)["plugins"][0]
    return ipaddress.ip_network(plugin["ipam"]["ranges"][0][0]["subnet"])


def in_subnet(address: str, subnet: str | ipaddress.IPv4Network) -> bool:
    network = ipaddress.ip_network(subnet)
    return ipaddress.ip_address(address) in network and ipaddress.ip_address(address) != next(network.hosts())


def write_node_state(site) -> None:
    """The vxlan example's overlay state, in the host's private /run (where its stateDir points)."""
    state_dir = example(VXLAN)["plugins"][0]["stateDir"]
    state = dict(NODE_STATE, lease_expires=time.time() + 3600)
    site.host.run(sys.executable, "-c", _WRITE_STATE, state_dir, json.dumps(state))


def need_vxlan(site) -> None:
    if site.plugins.is_reference:
        pytest.skip("the reference plugins have no vxlan plugin (10-pycni-vxlan.conflist is pycni's)")


def assert_spoken_in_the_files_version(site, name: str) -> None:
    """Every request for the example's network has the file's cniVersion; every answer is in it."""
    raw = example(name)
    version, network = raw["cniVersion"], raw["name"]
    seen = [r for r in site.requests() if (r.conf or {}).get("name") == network]
    assert seen, f"no plugin call for network {network!r}\n{site.calls()}"
    for request in seen:
        assert request.conf["cniVersion"] == version, (request.summary(), request.conf)
        if request.command == "ADD" and request.rc == 0:
            assert request.answer["cniVersion"] == version, (request.summary(), request.answer)


def no_failed_calls(site) -> None:
    failed = [r.summary() for r in site.requests() if r.rc not in (0, None)]
    assert not failed, f"plugin calls failed: {failed}\n{site.calls()}"


def data_dir(site, name: str) -> Path:
    """host-local's data directory for the example, as the host sees it (its default unless the file says)."""
    plugin = example(name)["plugins"][0]
    return site.host.path(plugin.get("dataDir") or (plugin.get("ipam") or {}).get("dataDir") or "/var/lib/cni/networks")


def left_behind(site, name: str, *, ids=(), ips=()) -> list[str]:
    """What a removed pod of the example network left in the host (the example's bridge may stay)."""
    raw = example(name)
    network, plugin = raw["name"], raw["plugins"][0]
    leases_dir = data_dir(site, name)
    problems = []
    if held := leftovers.leases(leases_dir, network):
        problems.append(f"leases still held in {leases_dir}: {held}")
    bridges = {f"{b} (bridge)" for b in (plugin.get("bridge"), NODE_STATE["bridge"]) if b}  # bridges stay
    if extra := [link for link in leftovers.links(site.host) if link not in bridges]:
        problems.append(f"links left in the host namespace: {extra}")
    if qdiscs := leftovers.shaping(site.host):
        problems.append(f"shaping qdiscs left: {qdiscs}")
    if rules := leftovers.rules_naming(site.host, ids, ips):
        problems.append(f"firewall rules naming a removed pod: {rules[:10]}")
    if entries := leftovers.cache_entries(site.host.path("/var/lib/cni"), network):
        problems.append(f"result cache entries left: {entries}")
    if "stateDir" in plugin:
        cache = site.host.path(plugin["stateDir"]) / "vxlan"
        if cache.is_dir() and (entries := sorted(os.listdir(cache))):
            problems.append(f"vxlan attachment cache left in {cache}: {entries}")
    return problems


def test_examples_are_in_a_version_debian_12_runtimes_read():
    """libcni 1.1 (containerd 1.6, podman 4.3) fails every pod of a 1.1.0 list: conf/examples/README.md."""
    for name in (BRIDGE, VXLAN, LOOPBACK):
        assert example(name)["cniVersion"] == "1.0.0", f"{name}: see conf/examples/README.md before changing it"


# ---- containerd (CRI) ---------------------------------------------------------------------


@pytest.fixture
def start_containerd(site, busybox_archive, e2e_cache):
    """start(conf_dir): containerd with conf_dir as its CNI conf_dir, the image imported; stopped afterwards."""
    if reason := containerd_kit.missing():
        pytest.skip(reason)
    started = []

    def start(conf_dir: Path) -> containerd_kit.Containerd:
        runtime = containerd_kit.Containerd(
            site.host, site.root / "containerd", bin_dir=site.bin_dir, conf_dir=conf_dir, api_cache=e2e_cache
        )
        started.append(runtime)
        try:
            runtime.start()
        except (AssertionError, RuntimeError) as exc:
            pytest.fail(f"containerd did not take {sorted(os.listdir(conf_dir))}: {exc}\n{runtime.log_tail(30)}")
        runtime.import_image(busybox_archive)
        return runtime

    try:
        yield start
    finally:
        for runtime in started:
            runtime.stop()


def sandbox_cycle(site, runtime, name: str, example_name: str, subnet) -> tuple[str, str]:
    """Run a sandbox, check its address (and its lease in the example's dataDir), stop and remove it;
    (its ID, its address)."""
    try:
        pod = runtime.client.run_pod(name, cgroup_parent=site.cgroup_path, log_directory=str(site.root / "pods" / name))
    except grpc.RpcError as exc:
        pytest.fail(f"RunPodSandbox {name} failed: {exc.details()}\n{site.calls()}\n{runtime.log_tail(30)}")
    address = runtime.client.pod_ip(pod.id)
    assert in_subnet(address, subnet), (address, str(subnet))
    assert address in leftovers.leases(data_dir(site, example_name), example(example_name)["name"])
    namespaces = runtime.client.pod_info(pod.id)["runtimeSpec"]["linux"]["namespaces"]
    pod_netns = next(ns["path"] for ns in namespaces if ns["type"] == "network")
    lo = site.host.run("nsenter", f"--net={pod_netns}", "ip", "-o", "link", "show", "lo").stdout
    assert ",UP" in lo, lo
    try:
        runtime.client.stop_pod(pod.id)
        runtime.client.remove_pod(pod.id)
    except grpc.RpcError as exc:
        pytest.fail(f"stopping/removing {name} failed: {exc.details()}\n{site.calls()}")
    assert not runtime.client.list_pods()
    return pod.id, address


def test_containerd_runs_the_bridge_example(site, start_containerd):
    containerd = start_containerd(install(site.root / "examples.d", BRIDGE, LOOPBACK))
    pod_id, address = sandbox_cycle(site, containerd, "example-bridge", BRIDGE, bridge_subnet())
    no_failed_calls(site)
    assert_spoken_in_the_files_version(site, BRIDGE)
    assert {(r.plugin, r.command) for r in site.requests() if (r.conf or {}).get("name") == "pycni-bridge"} >= {
        ("bridge", "ADD"),
        ("host-local", "ADD"),
        ("portmap", "ADD"),
        ("bandwidth", "ADD"),
        ("bridge", "DEL"),
    }
    # containerd's lo comes from its own built-in loopback list, not from 99-loopback.conf
    loopback = [r.conf for r in site.requests() if r.plugin == "loopback" and r.command == "ADD"]
    assert loopback and all(conf["name"] != example(LOOPBACK)["name"] for conf in loopback), loopback
    assert not (left := left_behind(site, BRIDGE, ids=[pod_id], ips=[address])), f"{left}\n{site.calls()}"


def test_containerd_runs_the_vxlan_example(site, start_containerd):
    need_vxlan(site)
    write_node_state(site)
    containerd = start_containerd(install(site.root / "examples.d", VXLAN, LOOPBACK))
    pod_id, address = sandbox_cycle(site, containerd, "example-vxlan", VXLAN, NODE_STATE["subnet"])
    no_failed_calls(site)
    assert_spoken_in_the_files_version(site, VXLAN)
    assert not (left := left_behind(site, VXLAN, ids=[pod_id], ips=[address])), f"{left}\n{site.calls()}"


# ---- podman -------------------------------------------------------------------------------


def start_podman(site, busybox_archive, conf_dir: Path, network: str, request) -> podman_kit.Podman:
    if reason := podman_kit.missing():
        pytest.skip(reason)
    runtime = podman_kit.Podman(
        site.host,
        site.root / "podman",
        bin_dir=site.bin_dir,
        conf_dir=conf_dir,
        network=network,
        cgroup_parent=site.cgroup_path,
    )
    request.addfinalizer(runtime.close)
    runtime.load_image(busybox_archive)
    return runtime


def podman_ok(site, podman, *args: str) -> str:
    proc = podman(*args, check=False)
    if proc.returncode != 0:
        pytest.fail(
            f"podman {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}\n{site.calls()}"
        )
    return proc.stdout


def container_cycle(site, podman, network: str, subnet) -> tuple[list[str], str]:
    """A container on the network: its address in subnet, lo up; removed. (container IDs, address)."""
    out = podman_ok(
        site,
        podman,
        "run",
        "--rm",
        "--network",
        network,
        "--cgroup-parent",
        site.cgroup_path,
        "--pull",
        "never",
        image.IMAGE,
        "ip",
        "-o",
        "addr",
        "show",
    )
    match = re.search(r"eth0\s+inet (\d+\.\d+\.\d+\.\d+)/", out)
    assert match and in_subnet(match.group(1), subnet), out
    assert re.search(r"\blo\s+inet 127\.0\.0\.1/8", out), out
    ids = sorted({r.env.get("CNI_CONTAINERID", "") for r in site.requests() if r.command == "ADD"})
    return ids, match.group(1)


def test_podman_runs_the_bridge_example(site, busybox_archive, request):
    conf_dir = install(site.root / "examples.d", BRIDGE, LOOPBACK)
    podman = start_podman(site, busybox_archive, conf_dir, example(BRIDGE)["name"], request)
    listed = podman_ok(site, podman, "network", "ls", "--format", "{{.Name}}").split()
    assert "pycni-bridge" in listed and "lo" not in listed, listed  # podman reads *.conflist only
    inspected = json.loads(podman_ok(site, podman, "network", "inspect", "pycni-bridge"))[0]
    assert [s["subnet"] for s in inspected["subnets"]] == [str(bridge_subnet())], inspected

    ids, address = container_cycle(site, podman, "pycni-bridge", bridge_subnet())
    no_failed_calls(site)
    assert_spoken_in_the_files_version(site, BRIDGE)
    assert not (left := left_behind(site, BRIDGE, ids=ids, ips=[address])), f"{left}\n{site.calls()}"


def test_podman_runs_the_vxlan_example(site, busybox_archive, request):
    need_vxlan(site)
    write_node_state(site)
    conf_dir = install(site.root / "examples.d", VXLAN)
    podman = start_podman(site, busybox_archive, conf_dir, example(VXLAN)["name"], request)
    assert "pycni-vxlan" in podman_ok(site, podman, "network", "ls", "--format", "{{.Name}}").split()

    ids, address = container_cycle(site, podman, "pycni-vxlan", NODE_STATE["subnet"])
    no_failed_calls(site)
    assert_spoken_in_the_files_version(site, VXLAN)
    assert not (left := left_behind(site, VXLAN, ids=ids, ips=[address])), f"{left}\n{site.calls()}"


# ---- cnitool: 99-loopback.conf ------------------------------------------------------------


def test_cnitool_runs_the_loopback_example(site, e2e_cache):
    """libcni loads the single-plugin .conf by its name ("lo") and brings lo up in a pod namespace."""
    try:
        exe = cnitool.build(e2e_cache)
    except cnitool.Unavailable as exc:
        pytest.skip(f"cnitool cannot be built: {exc}")
    conf_dir = install(site.root / "examples.d", LOOPBACK)
    name = example(LOOPBACK)["name"]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NETCONFPATH": str(conf_dir), "CNI_PATH": str(site.bin_dir)}
    pod = "e2e-example-lo"
    # in the host's mount namespace: the pod namespace's pin and libcni's cache are the host's private ones
    site.host.run("ip", "netns", "add", pod)
    try:

        def cni(command: str):
            proc = site.host.run(
                "env",
                "-i",
                *(f"{k}={v}" for k, v in env.items()),
                str(exe),
                command,
                name,
                f"/run/netns/{pod}",
                check=False,
            )
            assert proc.returncode == 0, f"cnitool {command} {name}: {proc.stderr.strip()[-1500:]}\n{site.calls()}"
            return proc.stdout

        result = json.loads(cni("add"))
        assert result["cniVersion"] == example(LOOPBACK)["cniVersion"], result
        assert "UP" in site.host.run("ip", "-n", pod, "-o", "link", "show", "lo").stdout
        assert {i["address"] for i in result["ips"]} >= {"127.0.0.1/8"}, result
        cni("check")
        cni("del")
        assert "UP" not in site.host.run("ip", "-n", pod, "-o", "link", "show", "lo").stdout.split(">")[0]
    finally:
        site.host.run("ip", "netns", "del", pod, check=False)
    no_failed_calls(site)
    assert_spoken_in_the_files_version(site, LOOPBACK)
    assert not leftovers.cache_entries(site.host.path("/var/lib/cni"), name)
