"""`pycni demo`: a live bridge network in throwaway namespaces, then cleaned away.

A node namespace stands in for the host; pod namespaces are attached to it
with the example bridge network from conf/examples, driven exactly as a
runtime would drive it (plugin processes, result cache). The demo shows the
pods' addresses, pings between pods and from the node, a TCP exchange, a
port mapping, and removes everything it made, also when interrupted.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from contextlib import ExitStack
from importlib import resources

import click

from pycni.demo_checks import Pod, Scorecard
from pycni.demo_checks import ping as _ping
from pycni.demo_checks import tcp_exchange as _tcp_exchange

EXAMPLE = "10-pycni-bridge.conflist"
HOST_PORT = 18080
POD_PORT = 8080
# The "outside" network behind the node (TEST-NET-2, only ever inside the demo's namespaces).
NODE_UPLINK = "198.51.100.1"
OUTSIDE_ADDR = "198.51.100.2"


def _example_conflist(data_dir: str) -> dict:
    text = resources.files("conf").joinpath("examples", EXAMPLE).read_text()
    conflist = json.loads(text)
    for plugin in conflist["plugins"]:
        if "ipam" in plugin:
            plugin["ipam"]["dataDir"] = data_dir  # keep leases out of the machine's /var/lib/cni
    return conflist


def run_demo(pod_count: int) -> int:
    import netns
    from conf import parse_conflist
    from pycni.install import install_plugins
    from pycni.runtime import CNIRuntime, RuntimeConf

    tag = secrets.token_hex(3)
    score = Scorecard()
    with ExitStack() as cleanup:
        workdir = tempfile.mkdtemp(prefix="pycni-demo-")
        cleanup.callback(shutil.rmtree, workdir, True)
        bin_dir = os.path.join(workdir, "bin")
        install_plugins(bin_dir)
        conflist = _example_conflist(os.path.join(workdir, "leases"))
        netlist = parse_conflist(json.dumps(conflist).encode(), f"conf/examples/{EXAMPLE}")
        runtime = CNIRuntime(bin_dir, os.path.join(workdir, "cache"))
        click.echo(
            f"pycni demo: network {netlist.name!r} ({', '.join(p['type'] for p in netlist.plugins)}), "
            f"work dir {workdir}"
        )

        node = netns.create(f"pycni-demo-node-{tag}")
        cleanup.callback(netns.delete, node)
        node_name = os.path.basename(node)
        subprocess.run(["ip", "-n", node_name, "link", "set", "lo", "up"], check=True)
        click.echo(f"node namespace: {node_name}")

        pods: list[Pod] = []
        for n in range(1, pod_count + 1):
            path = netns.create(f"pycni-demo-pod{n}-{tag}")
            cleanup.callback(netns.delete, path)
            pods.append(Pod(os.path.basename(path), path, f"demo-{tag}-pod{n}"))

        for n, pod in enumerate(pods):
            caps = {}
            if n == 0:
                caps["portMappings"] = [{"hostPort": HOST_PORT, "containerPort": POD_PORT, "protocol": "tcp"}]
            rt = RuntimeConf(container_id=pod.container_id, netns=pod.path, ifname="eth0", capability_args=caps)
            with netns.enter(node):  # plugin processes inherit the node namespace
                result = runtime.add(netlist, rt)
            cleanup.callback(_delete_quietly, runtime, netlist, rt, node)
            ip = result["ips"][0]
            pod.address, pod.gateway = ip["address"].split("/")[0], ip.get("gateway", "")
            click.echo(
                f"  ADD {pod.name}: eth0 {ip['address']} via {pod.gateway}"
                + (f", hostPort {HOST_PORT} -> {POD_PORT}" if caps else "")
            )

        click.echo("reachability:")
        for src, dst in zip(pods, pods[1:] + pods[:1]):
            ok, rtt = _ping(src.name, dst.address)
            score.record(f"ping {src.name} -> {dst.name} ({dst.address})", ok, rtt)
        ok, rtt = _ping(pods[0].name, pods[0].gateway)
        score.record(f"ping {pods[0].name} -> gateway {pods[0].gateway}", ok, rtt)
        for pod in pods:
            ok, rtt = _ping(node_name, pod.address)
            score.record(f"ping node -> {pod.name} ({pod.address})", ok, rtt)

        click.echo("TCP:")
        ok, detail = _tcp_exchange(pods[1].path, pods[0].path, pods[1].address, POD_PORT, POD_PORT)
        score.record(f"TCP {pods[0].name} -> {pods[1].name}:{POD_PORT}", ok, detail)
        if any(p["type"] == "portmap" for p in netlist.plugins):
            ok, detail = _tcp_exchange(pods[0].path, pods[1].path, pods[0].gateway, HOST_PORT, POD_PORT)
            score.record(
                f"TCP {pods[1].name} -> node {pods[0].gateway}:{HOST_PORT} (portmap to {pods[0].name}:{POD_PORT})",
                ok,
                detail,
            )

        outside = netns.create(f"pycni-demo-outside-{tag}")
        cleanup.callback(netns.delete, outside)
        _link_outside(node_name, os.path.basename(outside))
        click.echo(f"masquerade (ipMasq): pods -> {OUTSIDE_ADDR} in a namespace behind the node:")
        client, server = pods[-1], pods[0]
        ok, detail = _tcp_exchange(outside, client.path, OUTSIDE_ADDR, POD_PORT, POD_PORT)
        score.record(
            f"TCP {client.name} -> outside {OUTSIDE_ADDR}:{POD_PORT} arrives from the node",
            ok and detail.endswith(NODE_UPLINK),
            detail,
        )
        ok, detail = _tcp_exchange(server.path, client.path, server.address, POD_PORT, POD_PORT)
        score.record(
            f"TCP {client.name} -> {server.name} keeps the pod address", ok and detail.endswith(client.address), detail
        )

        click.echo("cleaning up: DEL every pod, remove namespaces and the work dir")
    leftovers = [n for n in netns.list_names() if n.endswith(tag)]
    score.record("nothing left behind", not leftovers, ", ".join(leftovers))
    total = len(score.passed) + len(score.failed)
    click.echo(f"{len(score.passed)} of {total} checks passed")
    return 0 if not score.failed else 1


def _link_outside(node: str, outside: str) -> None:
    """A veth pair from the node to an 'outside' namespace, with addresses on both ends."""
    steps = [
        ["ip", "-n", node, "link", "add", "uplink0", "type", "veth", "peer", "name", "eth0", "netns", outside],
        ["ip", "-n", node, "addr", "add", f"{NODE_UPLINK}/24", "dev", "uplink0"],
        ["ip", "-n", node, "link", "set", "uplink0", "up"],
        ["ip", "-n", outside, "addr", "add", f"{OUTSIDE_ADDR}/24", "dev", "eth0"],
        ["ip", "-n", outside, "link", "set", "eth0", "up"],
        ["ip", "-n", outside, "link", "set", "lo", "up"],
    ]
    for step in steps:
        subprocess.run(step, check=True, capture_output=True)


def _delete_quietly(runtime, netlist, rt, node) -> None:
    import netns

    try:
        with netns.enter(node):
            runtime.delete(netlist, rt)
    except Exception as exc:  # cleanup goes on; say what could not be removed
        click.echo(f"  warning: DEL {rt.container_id} failed: {exc}", err=True)


@click.command("demo")
@click.option(
    "--pods",
    "pod_count",
    default=3,
    show_default=True,
    type=click.IntRange(2, 8),
    help="How many pod namespaces to attach (single-node demo).",
)
@click.option(
    "--nodes",
    "node_count",
    default=None,
    type=click.IntRange(2, 8),
    metavar="N",
    help="Instead: N node namespaces on a simulated underlay running the vxlan overlay "
    "(one `pycni agent` per node, the file store, two pods per node).",
)
@click.option(
    "--dual-stack",
    is_flag=True,
    help="With --nodes: a dual-stack cluster (pod networks 10.244.0.0/16 and fd00:10:244::/56 on the "
    "IPv4 underlay); every pod gets an address of each family and the checks run in both.",
)
def demo(pod_count: int, node_count: int | None, dual_stack: bool) -> None:
    """Build a live demo network in throwaway namespaces, test it, remove it.

    Creates a node namespace and POD_COUNT pod namespaces, attaches the pods with
    the example bridge network (bridge + host-local + portmap + bandwidth from
    conf/examples), then shows their addresses, pings between pods and from the
    node, a TCP exchange, a port mapping, and masquerading toward an "outside"
    namespace behind the node. Everything is removed at the end,
    also on Ctrl-C. Needs root; never touches the machine's own network.

    With --nodes N: N node namespaces joined by an underlay bridge in a
    namespace of its own, a file cluster store in a temporary directory
    (`pycni cluster init`), one node agent per node, two pods per node attached
    with the example vxlan network, then pings and TCP across nodes showing the
    source address each receiver sees; everything is removed again. With
    --dual-stack as well: the cluster has an IPv6 pod network too, each pod an
    IPv4 and an IPv6 address, and the pings and TCP exchanges run in both
    families.
    """
    if dual_stack and node_count is None:
        raise click.BadParameter(
            "--dual-stack needs --nodes N (the single-node demo is IPv4)", param_hint="--dual-stack"
        )
    if os.geteuid() != 0:
        raise click.ClickException("the demo creates network namespaces: run it as root")

    def stop(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    try:
        if node_count is None:
            code = run_demo(pod_count)
        else:
            from pycni.demo_nodes import run_multinode_demo

            code = run_multinode_demo(node_count, dual_stack=dual_stack)
    except KeyboardInterrupt:
        click.echo("interrupted: everything the demo made has been removed", err=True)
        code = 130
    except Exception as exc:
        raise click.ClickException(f"demo failed: {exc} (everything it made has been removed)") from None
    raise SystemExit(code)
