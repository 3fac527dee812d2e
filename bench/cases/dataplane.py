"""Data plane: TCP throughput pod to pod, and bandwidth-plugin accuracy (iperf3).

Throughput compares four topologies, each built once in fresh namespaces and
measured in alternating rounds: two pods on a bridge made by pycni's bridge
plugin, the same made by the reference plugin, two namespaces joined by a bare
veth pair (the ceiling), and a bridge made by hand with `ip` (what a plugin
should match). The plugins only configure the kernel, so pycni and reference
figures should agree within noise; a gap would mean a configuration
difference (MTU, offloads, qdiscs).

Accuracy: a pod shaped by the bandwidth plugin (ingress and egress at R) sends
to and receives from an unshaped pod on the same bridge; the figure is the
measured rate divided by R. Both sides' pods come from the reference bridge so
that only the bandwidth plugin differs.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any, Callable

from .. import chain, configs, topology
from ..chain import Attachment
from ..context import Context
from ..sides import Side
from ..spawn import IP
from ..stats import pair, summary

NET = "benchdp"
PORT = 5201
IPERF = "iperf3"


def run(ctx: Context) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    if subprocess.run(["which", IPERF], capture_output=True).returncode != 0:
        ctx.note("dataplane: skipped, iperf3 is not installed")
        return {"skipped": "iperf3 not installed"}
    print("  dataplane: throughput", flush=True)
    figures["throughput"] = ctx.attempt("dataplane/throughput", lambda: _scoped(ctx, _throughput))
    skipped = ctx.unavailable("dataplane/bandwidth accuracy", ["bandwidth"])
    if skipped:
        figures["bandwidth accuracy"] = skipped
        return figures
    print("  dataplane: bandwidth accuracy", flush=True)
    figures["bandwidth accuracy"] = ctx.attempt("dataplane/bandwidth accuracy", lambda: _scoped(ctx, _accuracy))
    return figures


def _scoped(ctx: Context, measure: Callable[[Context], dict[str, Any]]) -> dict[str, Any]:
    """Run one figure's measurement, removing what it created even when it fails."""
    with ctx.cleanup.scope():
        return measure(ctx)


# ---- iperf3 between two namespaces ----------------------------------------------


def iperf_rounds(
    ctx: Context, topologies: dict[str, tuple[str, str, str]], rounds: int | None = None
) -> dict[str, list[float]]:
    """Gbit/s per topology (server namespace, server address, client namespace) over ``rounds`` (default: the
    mode's dataplane rounds), every round in the opposite order of the last, so that none always goes first."""
    gbits: dict[str, list[float]] = {name: [] for name in topologies}
    names = list(topologies)
    for round_no in range(ctx.settings.dataplane_rounds if rounds is None else rounds):
        for name in names if round_no % 2 == 0 else names[::-1]:
            server, server_ip, client = topologies[name]
            gbits[name].append(iperf(ctx, server, server_ip, client) / 1e9)
    return gbits


def iperf(ctx: Context, server_ns: str, server_ip: str, client_ns: str) -> float:
    """TCP goodput from client_ns to server_ns in bits per second."""
    settings = ctx.settings
    server = ctx.cleanup.process(
        subprocess.Popen(
            [IP, "netns", "exec", server_ns, IPERF, "-s", "-1", "-B", server_ip, "-p", str(PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    try:
        _wait_listening(server_ns)
        args = [
            IP,
            "netns",
            "exec",
            client_ns,
            IPERF,
            "-c",
            server_ip,
            "-p",
            str(PORT),
            "-J",
            "-t",
            str(settings.iperf_seconds),
        ]
        if settings.iperf_omit:
            args += ["-O", str(settings.iperf_omit)]
        proc = subprocess.run(
            args, capture_output=True, text=True, timeout=settings.iperf_seconds + settings.iperf_omit + 30
        )
        report = json.loads(proc.stdout or "{}")
        if proc.returncode != 0 or "error" in report:
            raise RuntimeError(
                f"iperf3 {client_ns} -> {server_ip} failed: {report.get('error') or proc.stderr.strip()}"
            )
        return float(report["end"]["sum_received"]["bits_per_second"])
    finally:
        ctx.cleanup.stop_process(server)


def _wait_listening(ns: str) -> None:
    for _ in range(500):  # up to ~10 s (a loaded CI machine)
        out = subprocess.run(
            [IP, "netns", "exec", ns, "ss", "-Htln", f"sport = :{PORT}"], capture_output=True, text=True
        ).stdout
        if out.strip():
            return
        time.sleep(0.02)
    raise RuntimeError(f"iperf3 server in {ns} did not start listening on port {PORT}")


def _ip_of(result: dict[str, Any]) -> str:
    return result["ips"][0]["address"].split("/")[0]


# ---- throughput -------------------------------------------------------------------


def _plugin_pair(ctx: Context, side: Side, bridge_side: Side) -> tuple[str, str, str]:
    """Node + two pods attached by bridge_side's bridge plugin; returns (pod_a, ip_a, pod_b)."""
    cleanup = ctx.cleanup
    node = cleanup.namespace("node")
    data_dir = cleanup.directory(side.name)
    pods, ips = [], []
    for i in range(2):
        pod = cleanup.namespace("pod")
        att = Attachment(f"dp-{i}", f"/var/run/netns/{pod}")
        result = chain.add(bridge_side, [configs.bridge(NET, data_dir)], att, node).result
        pods.append(pod)
        ips.append(_ip_of(result))
    return pods[0], ips[0], pods[1]


def _bare_veth(ctx: Context) -> tuple[str, str, str]:
    a, b = ctx.cleanup.namespace("pod"), ctx.cleanup.namespace("pod")
    topology.veth_between(a, "eth0", b, "eth0")
    topology.add_address(a, "eth0", "10.99.0.1/24")
    topology.add_address(b, "eth0", "10.99.0.2/24")
    return a, "10.99.0.1", b


def _hand_bridge(ctx: Context) -> tuple[str, str, str]:
    node = ctx.cleanup.namespace("node")
    topology.bridge(node, "br0")
    pods = []
    for i in range(2):
        pod = ctx.cleanup.namespace("pod")
        topology.veth_between(node, f"veth{i}", pod, "eth0")
        topology.enslave(node, f"veth{i}", "br0")
        topology.add_address(pod, "eth0", f"10.98.0.{i + 2}/24")
        pods.append(pod)
    return pods[0], "10.98.0.2", pods[1]


def _throughput(ctx: Context) -> dict[str, Any]:
    topologies: dict[str, tuple[str, str, str]] = {"bare veth": _bare_veth(ctx), "hand-made bridge": _hand_bridge(ctx)}
    sides = [s for s in (ctx.pycni, ctx.reference) if s.has("bridge") and s.has("host-local")]
    for side in sides:
        topologies[f"{side.name} bridge"] = _plugin_pair(ctx, side, side)
    if len(sides) < 2:
        ctx.note("dataplane/throughput: pycni bridge+host-local missing; measured without it")
    gbits = iperf_rounds(ctx, topologies)
    out: dict[str, Any] = {name: summary(values, "Gbit/s") for name, values in gbits.items()}
    if "pycni bridge" in gbits and "reference bridge" in gbits:
        out["bridge plugin"] = pair(gbits["pycni bridge"], gbits["reference bridge"], "Gbit/s")
    return out


# ---- bandwidth accuracy -------------------------------------------------------------


def _shaped(ctx: Context, side: Side, rate_bits: int) -> tuple[str, str, str, str]:
    """Node with a shaped pod A and an unshaped pod B; returns (pod_a, ip_a, pod_b, ip_b)."""
    cleanup = ctx.cleanup
    node = cleanup.namespace("node")
    data_dir = cleanup.directory(side.name)
    out = []
    for i, shaped in enumerate((True, False)):
        pod = cleanup.namespace("pod")
        att = Attachment(f"bw-{i}", f"/var/run/netns/{pod}")
        base = chain.add(ctx.reference, [configs.bridge(NET, data_dir)], att, node).result
        if shaped:
            chain.add(side, [configs.bandwidth(NET)], att, node, configs.shaping(rate_bits), prev=base)
        out += [pod, _ip_of(base)]
    return out[0], out[1], out[2], out[3]


def _accuracy(ctx: Context) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for rate in ctx.settings.rates_mbit:
        target = rate * 1_000_000
        with ctx.cleanup.scope():
            figures.update(_accuracy_at(ctx, rate, target))
    return figures


def _accuracy_at(ctx: Context, rate: int, target: int) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    setups = {side.name: _shaped(ctx, side, target) for side in (ctx.pycni, ctx.reference)}
    for direction in ("ingress", "egress"):
        achieved: dict[str, list[float]] = {"pycni": [], "reference": []}
        for round_no in range(ctx.settings.dataplane_rounds):
            for side in ctx.both(round_no):
                pod_a, ip_a, pod_b, ip_b = setups[side.name]
                if direction == "ingress":  # into the shaped pod
                    bps = iperf(ctx, pod_a, ip_a, pod_b)
                else:  # out of the shaped pod
                    bps = iperf(ctx, pod_b, ip_b, pod_a)
                achieved[side.name].append(bps / target)
        figures[f"{direction} at {rate} Mbit/s"] = pair(achieved["pycni"], achieved["reference"], "x target")
    return figures
