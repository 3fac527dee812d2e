"""podman 4.3 on its CNI network backend with the plugin directory under test.

podman runs inside the test's host namespace with a private containers.conf
(``network_backend = "cni"``, ``cni_plugin_dirs``, ``network_config_dir``) and
private storage (kit/podman.py). What podman 4.3 sends the plugins (seen
through the capture wrappers):

- ``runtimeConfig.portMappings`` in the CNI conventions' letter case,
  ``[{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]`` (no
  ``hostIP`` key unless ``-p IP:HOST:CONTAINER``); no ``bandwidth`` (podman has
  no option for it), so nothing is shaped;
- ``CNI_ARGS`` ``IgnoreUnknown=1;K8S_POD_NAME=<container name>``, ``CNI_NETNS``
  a pin under /run/netns/netns-<uuid>; no separate loopback call (podman sets
  lo up itself);
- before every ADD and DEL, ``VERSION`` to each plugin of the list with
  ``CNI_PATH``, ``CNI_NETNS`` and ``CNI_IFNAME`` set to ``dummy``;
- ``podman rm``: one DEL with the netns and the cached prevResult.
podman itself also holds each published host port open (conmon listens on it).
"""

from __future__ import annotations

import re

import pytest

from tests.e2e.kit import conflist, image, leftovers, shaping
from tests.e2e.kit import podman as podman_kit
from tests.e2e.kit.host import HOST_IP, wait_for

pytestmark = pytest.mark.e2e

HOST_PORT = 8080
WEB = ["sh", "-c", "hostname > /tmp/index.html; exec httpd -f -p 80 -h /tmp"]


@pytest.fixture
def podman(site, busybox_archive):
    if reason := podman_kit.missing():
        pytest.skip(reason)
    runtime = podman_kit.Podman(
        site.host,
        site.root / "podman",
        bin_dir=site.bin_dir,
        conf_dir=site.conf_dir,
        network=conflist.NETWORK,
        cgroup_parent=site.cgroup_path,
    )
    try:
        runtime.load_image(busybox_archive)
        yield runtime
    finally:
        runtime.close()


def run(site, podman, *args: str):
    proc = podman(*args, check=False)
    if proc.returncode != 0:
        pytest.fail(
            f"podman {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}\n{site.calls()}"
        )
    return proc


def container_ids(site) -> list[str]:
    return sorted({r.env.get("CNI_CONTAINERID", "") for r in site.requests() if r.command == "ADD"})


def test_containers_talk_and_publish_a_port(site, podman):
    run(
        site,
        podman,
        "run",
        "-d",
        "--name",
        "web-a",
        "--hostname",
        "web-a",
        "--network",
        conflist.NETWORK,
        "--cgroup-parent",
        site.cgroup_path,
        "-p",
        f"{HOST_PORT}:80",
        image.IMAGE,
        *WEB,
    )
    run(
        site,
        podman,
        "run",
        "-d",
        "--name",
        "web-b",
        "--hostname",
        "web-b",
        "--network",
        conflist.NETWORK,
        "--cgroup-parent",
        site.cgroup_path,
        image.IMAGE,
        *WEB,
    )

    sent = [
        r.conf["runtimeConfig"]["portMappings"]
        for r in site.requests()
        if (r.plugin, r.command) == ("portmap", "ADD") and "runtimeConfig" in (r.conf or {})
    ]
    assert sent == [[{"hostPort": HOST_PORT, "containerPort": 80, "protocol": "tcp"}]], site.calls()

    ip_a, ip_b = podman.ip_of("web-a"), podman.ip_of("web-b")
    assert conflist.in_subnet(ip_a) and conflist.in_subnet(ip_b) and ip_a != ip_b, (ip_a, ip_b)
    wait_for(lambda: site.host.http_get(f"http://{ip_a}/") == "web-a\n", timeout=15, what=f"web-a's httpd at {ip_a}")
    assert site.host.http_get(f"http://{ip_b}/") == "web-b\n"
    for name, target, expected in (("web-a", ip_b, "web-b"), ("web-b", ip_a, "web-a")):
        out = run(site, podman, "exec", name, "wget", "-q", "-O-", f"http://{target}/").stdout
        assert out.strip() == expected, f"{name} -> {target}: {out!r}"
    assert site.host.http_get(f"http://{HOST_IP}:{HOST_PORT}/", where="outside") == "web-a\n", (
        f"hostPort {HOST_PORT} not reached from the outside namespace\n{site.calls()}"
    )

    veth_a = site.host_veth(container_ids_for(site, "web-a"))
    assert veth_a, site.calls()
    assert shaping.tbf_rate(site.host, veth_a) is None and not shaping.ifb_devices(site.host), (
        "shaped although podman asked for no bandwidth limits"
    )

    ids = container_ids(site)
    run(site, podman, "rm", "--force", "--time", "0", "web-a", "web-b")
    failed = [r.summary() for r in site.requests() if r.rc not in (0, None)]
    assert not failed, f"plugin calls failed: {failed}\n{site.calls()}"
    left = site.leftovers(
        cache_dir=site.host.path("/var/lib/cni"), netns_dir=site.host.path("/run/netns"), ids=ids, ips=[ip_a, ip_b]
    )
    assert not left, f"{left}\n{site.calls()}"


def container_ids_for(site, name: str) -> str:
    """The container ID podman used in CNI calls for the container called name (K8S_POD_NAME)."""
    for request in site.requests():
        if request.command == "ADD" and f"K8S_POD_NAME={name}" in request.env.get("CNI_ARGS", "").split(";"):
            return request.env["CNI_CONTAINERID"]
    return ""


def test_five_run_rm_cycles_leave_nothing(site, podman):
    ips, rulesets = [], []
    for _i in range(5):
        out = run(
            site,
            podman,
            "run",
            "--rm",
            "--network",
            conflist.NETWORK,
            "--cgroup-parent",
            site.cgroup_path,
            "-p",
            f"{HOST_PORT + 1}:80",
            image.IMAGE,
            "ip",
            "-4",
            "-o",
            "addr",
            "show",
            "eth0",
        ).stdout
        match = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
        assert match and conflist.in_subnet(match.group(1)), out
        ips.append(match.group(1))
        rulesets.append(leftovers.ruleset(site.host))
    failed = [r.summary() for r in site.requests() if r.rc not in (0, None)]
    assert not failed, f"plugin calls failed: {failed}\n{site.calls()}"
    left = site.leftovers(
        cache_dir=site.host.path("/var/lib/cni"),
        netns_dir=site.host.path("/run/netns"),
        ids=container_ids(site),
        ips=ips,
    )
    assert not left, f"{left}\n{site.calls()}"
    assert rulesets[-1] == rulesets[0], "the firewall grew over the cycles"
