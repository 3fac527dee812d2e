"""containerd 1.6 through its CRI API, as the kubelet drives it, with the plugin directory under test.

containerd runs inside the test's host namespace with a private config
(kit/containerd.py); a small gRPC client (kit/cri.py) runs pod sandboxes with
port mappings and the kubelet's bandwidth annotations, starts busybox httpd
containers in them, and stops and removes them. What containerd 1.6 sends the
plugins (seen through the capture wrappers):

- ``runtimeConfig.portMappings`` as ``[{"HostPort": 8080, "ContainerPort": 80,
  "Protocol": "tcp", "HostIP": ""}]`` and ``runtimeConfig.bandwidth`` as
  ``{"IngressRate": ..., "IngressBurst": 4294967295, "EgressRate": ...,
  "EgressBurst": 4294967295}``: go-cni's structs have no json tags, so the keys
  are the Go field names, not the CNI conventions' ``hostPort``/``ingressRate``;
  the reference plugins decode them with Go's case-insensitive encoding/json;
- ``CNI_ARGS`` ``IgnoreUnknown=1;K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;
  K8S_POD_INFRA_CONTAINER_ID=..;K8S_POD_UID=..``, ``CNI_NETNS`` a pin under
  /var/run/netns/cni-<uuid>; loopback separately (cniVersion 0.3.1, ifname lo);
- StopPodSandbox: DEL with the netns and the cached prevResult;
  RemovePodSandbox: DEL again with ``CNI_NETNS=""`` and no prevResult. A DEL
  that fails keeps the sandbox from being removed (and the lease and veth stay).
"""

from __future__ import annotations

import json

import grpc
import pytest

from tests.e2e.kit import conflist, image, leftovers, shaping
from tests.e2e.kit import containerd as containerd_kit
from tests.e2e.kit.cri import Pod
from tests.e2e.kit.host import HOST_IP, wait_for

pytestmark = pytest.mark.e2e

HOST_PORT = 8080
INGRESS, EGRESS = "10M", "20M"  # kubernetes.io/ingress-bandwidth, egress-bandwidth (bits/s)
WEB = ["/bin/sh", "-c", "hostname > /tmp/index.html; exec httpd -f -p 80 -h /tmp"]


@pytest.fixture
def containerd(site, busybox_archive, e2e_cache):
    if reason := containerd_kit.missing():
        pytest.skip(reason)
    runtime = containerd_kit.Containerd(
        site.host, site.root / "containerd", bin_dir=site.bin_dir, conf_dir=site.conf_dir, api_cache=e2e_cache
    )
    try:
        runtime.start()
        runtime.import_image(busybox_archive)
        yield runtime
    finally:
        runtime.stop()


@pytest.fixture
def one_address(site):
    """The e2e network narrowed to a single pod address (written before containerd starts)."""
    path = conflist.write(site.conf_dir, site.data_dir)
    raw = json.loads(path.read_text())
    raw["plugins"][0]["ipam"]["ranges"][0][0].update(rangeStart="10.88.7.10", rangeEnd="10.88.7.10")
    path.write_text(json.dumps(raw, indent=2))
    return "10.88.7.10"


def bandwidth_annotations() -> dict[str, str]:
    return {"kubernetes.io/ingress-bandwidth": INGRESS, "kubernetes.io/egress-bandwidth": EGRESS}


def run_pod(site, runtime, name: str, *, ports=(), shaped: bool = False) -> Pod:
    try:
        return runtime.client.run_pod(
            name,
            port_mappings=list(ports),
            annotations=bandwidth_annotations() if shaped else {},
            cgroup_parent=site.cgroup_path,
            log_directory=str(site.root / "pods" / name),
        )
    except grpc.RpcError as exc:
        pytest.fail(f"RunPodSandbox {name} failed: {exc.details()}\n{site.calls()}")


def stop_and_remove(site, runtime, pod: Pod, *, stops: int = 1) -> None:
    for step, times in ((runtime.client.stop_pod, stops), (runtime.client.remove_pod, 1)):
        for _ in range(times):
            try:
                step(pod.id)
            except grpc.RpcError as exc:
                pytest.fail(f"{step.__name__} {pod.name} failed: {exc.details()}\n{site.calls()}")


def start_web(site, runtime, pod: Pod) -> str:
    try:
        return runtime.client.start_container(pod, "web", image.IMAGE, WEB)
    except grpc.RpcError as exc:
        pytest.fail(f"CreateContainer/StartContainer in {pod.name} failed: {exc.details()}\n{site.calls()}")


def test_pods_reach_each_other_the_host_and_a_host_port(site, containerd):
    a = run_pod(site, containerd, "pod-a", ports=[(HOST_PORT, 80, "tcp")])
    b = run_pod(site, containerd, "pod-b")
    web_a, web_b = start_web(site, containerd, a), start_web(site, containerd, b)
    ip_a, ip_b = containerd.client.pod_ip(a.id), containerd.client.pod_ip(b.id)
    assert conflist.in_subnet(ip_a) and conflist.in_subnet(ip_b) and ip_a != ip_b, (ip_a, ip_b)

    # host -> pod (waiting for httpd to listen), pod <-> pod, outside -> hostPort -> pod-a
    wait_for(lambda: site.host.http_get(f"http://{ip_a}/") == "pod-a\n", timeout=15, what=f"pod-a's httpd at {ip_a}")
    assert site.host.http_get(f"http://{ip_b}/") == "pod-b\n"
    for container, target, expected in ((web_a, ip_b, "pod-b"), (web_b, ip_a, "pod-a")):
        # (no -T: busybox-static's wget crashes with it; ExecSync's timeout bounds the call)
        code, out, err = containerd.client.exec_sync(container, ["wget", "-q", "-O-", f"http://{target}/"])
        assert (code, out.strip()) == (0, expected), f"pod -> {target}: exit {code} {out!r} {err!r}"
    assert site.host.http_get(f"http://{HOST_IP}:{HOST_PORT}/", where="outside") == "pod-a\n", (
        f"hostPort {HOST_PORT} not reached from the outside namespace\n{site.calls()}"
    )
    assert not shaping.ifb_devices(site.host) and shaping.tbf_rate(site.host, site.host_veth(a.id)) is None, (
        "shaped although no bandwidth annotation asked for it"
    )

    # the kubelet stops a sandbox more than once before removing it
    stop_and_remove(site, containerd, a, stops=2)
    stop_and_remove(site, containerd, b, stops=2)
    failed = [r.summary() for r in site.requests() if r.rc not in (0, None)]
    assert not failed, f"plugin calls failed: {failed}\n{site.calls()}"
    left = site.leftovers(
        cache_dir=site.host.path("/var/lib/cni"),
        netns_dir=site.host.path("/run/netns"),
        ids=[a.id, b.id],
        ips=[ip_a, ip_b],
    )
    assert not left, f"{left}\n{site.calls()}"


def test_bandwidth_annotations_shape_the_pod(site, containerd):
    """The kubelet's annotations (which containerd turns into bursts of 2^32-1 bits) shape both ways."""
    pod = run_pod(site, containerd, "pod-shaped", shaped=True)
    ip = containerd.client.pod_ip(pod.id)
    veth = site.host_veth(pod.id)
    assert veth, site.calls()
    qdiscs = site.host.net("tc", "qdisc", "show").stdout
    assert shaping.tbf_rate(site.host, veth) == "10Mbit", qdiscs  # ingress: tbf on the host veth
    assert "20Mbit" in shaping.egress_rates(site.host).values(), qdiscs  # egress: tbf on an ifb
    stop_and_remove(site, containerd, pod)
    failed = [r.summary() for r in site.requests() if r.rc not in (0, None)]
    assert not failed, f"plugin calls failed: {failed}\n{site.calls()}"
    left = site.leftovers(
        cache_dir=site.host.path("/var/lib/cni"), netns_dir=site.host.path("/run/netns"), ids=[pod.id], ips=[ip]
    )
    assert not left, f"{left}\n{site.calls()}"


def test_failed_sandbox_leaves_nothing(site, one_address, containerd):
    """A RunPodSandbox whose ADD fails (no address left) is undone by containerd's DEL: nothing stays."""
    first = run_pod(site, containerd, "pod-first", ports=[(HOST_PORT, 80, "tcp")])
    assert containerd.client.pod_ip(first.id) == one_address
    with pytest.raises(grpc.RpcError) as failure:
        containerd.client.run_pod(
            "pod-second",
            port_mappings=[(HOST_PORT + 1, 80, "tcp")],
            cgroup_parent=site.cgroup_path,
            log_directory=str(site.root / "pods" / "second"),
        )
    assert "failed to setup network" in failure.value.details(), failure.value.details()
    second_id = next(r.env["CNI_CONTAINERID"] for r in reversed(site.requests()) if r.command == "ADD")
    assert second_id != first.id
    dels_of_second = [r for r in site.requests() if r.command == "DEL" and r.env["CNI_CONTAINERID"] == second_id]
    assert dels_of_second and all(r.rc == 0 for r in dels_of_second), site.calls()
    assert [p.id for p in containerd.client.list_pods()] == [first.id], "the failed sandbox was kept"
    stop_and_remove(site, containerd, first)
    left = site.leftovers(
        cache_dir=site.host.path("/var/lib/cni"),
        netns_dir=site.host.path("/run/netns"),
        ids=[first.id, second_id],
        ips=[one_address],
    )
    assert not left, f"{left}\n{site.calls()}"


def test_what_containerd_sends(site, containerd):
    """containerd's capability arguments carry Go field names (HostPort, IngressRate): see the module doc."""
    try:
        pod = containerd.client.run_pod(
            "pod-caps",
            port_mappings=[(HOST_PORT, 80, "tcp")],
            annotations=bandwidth_annotations(),
            cgroup_parent=site.cgroup_path,
            log_directory=str(site.root / "pods" / "caps"),
        )
        containerd.client.stop_pod(pod.id)
        containerd.client.remove_pod(pod.id)
    except grpc.RpcError:
        pass  # what was sent is the point here; the other tests judge the outcome
    sent = {}
    for request in site.requests():
        runtime_config = (request.conf or {}).get("runtimeConfig") or {}
        for key, value in runtime_config.items():
            sent.setdefault((request.plugin, key), value)
    assert sent.get(("portmap", "portMappings")) == [
        {"HostPort": HOST_PORT, "ContainerPort": 80, "Protocol": "tcp", "HostIP": ""}
    ], site.calls()
    assert sent.get(("bandwidth", "bandwidth")) == {
        "IngressRate": 10_000_000,
        "IngressBurst": 4294967295,
        "EgressRate": 20_000_000,
        "EgressBurst": 4294967295,
    }, site.calls()
    bridge_add = next(r for r in site.requests() if (r.plugin, r.command) == ("bridge", "ADD"))
    args = dict(pair.split("=", 1) for pair in bridge_add.env["CNI_ARGS"].split(";"))
    assert args.keys() >= {"IgnoreUnknown", "K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_INFRA_CONTAINER_ID"}
    assert args["K8S_POD_NAME"] == "pod-caps"


def test_five_sandbox_cycles_leave_nothing(site, containerd):
    ids, ips, rulesets = [], [], []
    for i in range(5):
        pod = run_pod(site, containerd, f"cycle-{i}", ports=[(HOST_PORT, 80, "tcp")], shaped=True)
        ip = containerd.client.pod_ip(pod.id)
        assert conflist.in_subnet(ip), ip
        ids.append(pod.id)
        ips.append(ip)
        stop_and_remove(site, containerd, pod)
        rulesets.append(leftovers.ruleset(site.host))
    failed = [r.summary() for r in site.requests() if r.rc not in (0, None)]
    assert not failed, f"plugin calls failed: {failed}\n{site.calls()}"
    left = site.leftovers(
        cache_dir=site.host.path("/var/lib/cni"), netns_dir=site.host.path("/run/netns"), ids=ids, ips=ips
    )
    assert not left, f"{left}\n{site.calls()}"
    assert rulesets[-1] == rulesets[0], "the firewall grew over the cycles"
