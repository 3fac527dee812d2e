"""ADD and DEL latency of each plugin alone, and of the bridge+portmap+bandwidth chain.

Per iteration and side: a fresh pod namespace, the untimed set-up (for portmap
and bandwidth: a reference bridge ADD, so both sides shape/map the same
attachment), the timed ADD, the timed DEL, the untimed tear-down. The node
namespace and host-local dataDir are fresh per case and side.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .. import chain, configs
from ..chain import Attachment
from ..context import Context
from ..sides import Side
from ..stats import pair

NET = "benchnet"


@dataclass
class LatencyCase:
    name: str
    needs: list[str]                                   # plugins both sides must have
    setup: Callable[[str], list[dict[str, Any]]]       # data_dir -> untimed plugins (run with the reference)
    timed: Callable[[str], list[dict[str, Any]]]       # data_dir -> timed plugins
    runtime: Callable[[int], dict[str, Any]] | None = None


def _runtime_chain(i: int) -> dict[str, Any]:
    return {**configs.port_mappings(10000 + i), **configs.shaping(50_000_000)}


CASES = [
    LatencyCase("loopback", ["loopback"], lambda d: [], lambda d: [configs.loopback(NET)]),
    LatencyCase("host-local", ["host-local"], lambda d: [], lambda d: [configs.host_local(NET, d)]),
    LatencyCase("bridge", ["bridge", "host-local"], lambda d: [], lambda d: [configs.bridge(NET, d)]),
    LatencyCase("portmap", ["portmap"], lambda d: [configs.bridge(NET, d)], lambda d: [configs.portmap(NET)],
                lambda i: configs.port_mappings(10000 + i)),
    LatencyCase("bandwidth", ["bandwidth"], lambda d: [configs.bridge(NET, d)], lambda d: [configs.bandwidth(NET)],
                lambda i: configs.shaping(50_000_000)),
    LatencyCase("chain bridge+portmap+bandwidth", ["bridge", "host-local", "portmap", "bandwidth"], lambda d: [],
                lambda d: [configs.bridge(NET, d), configs.portmap(NET), configs.bandwidth(NET)], _runtime_chain),
]


def run(ctx: Context) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for case in CASES:
        label = f"latency/{case.name}"
        skipped = ctx.unavailable(label, case.needs)
        if skipped:
            figures[case.name] = skipped
            continue
        print(f"  latency: {case.name}", flush=True)
        figures[case.name] = ctx.attempt(label, lambda: _measure(ctx, case))
    return figures


def _measure(ctx: Context, case: LatencyCase) -> dict[str, Any]:
    cleanup = ctx.cleanup
    nodes = {side.name: cleanup.namespace("node") for side in (ctx.pycni, ctx.reference)}
    dirs = {side.name: cleanup.directory(side.name) for side in (ctx.pycni, ctx.reference)}
    samples: dict[str, dict[str, list[float]]] = {
        figure: {ctx.pycni.name: [], ctx.reference.name: []} for figure in ("add", "del", "add_cpu", "del_cpu")}
    try:
        for i in range(ctx.settings.warmup + ctx.settings.iterations):
            for side in ctx.both(i):
                add, delete = _one(ctx, case, side, nodes[side.name], dirs[side.name], i)
                if i >= ctx.settings.warmup:
                    for figure, value in (("add", add.wall_s), ("del", delete.wall_s),
                                          ("add_cpu", add.cpu_s), ("del_cpu", delete.cpu_s)):
                        samples[figure][side.name].append(value)
    finally:
        for name in nodes.values():
            cleanup.drop_namespace(name)
        for path in dirs.values():
            cleanup.drop_directory(path)
    return {figure: pair(by_side["pycni"], by_side["reference"], "ms", 1000) for figure, by_side in samples.items()}


def _one(ctx: Context, case: LatencyCase, side: Side, node: str, data_dir: str,
         i: int) -> tuple[chain.Timed, chain.Timed]:
    pod = ctx.cleanup.namespace("pod")
    try:
        att = Attachment(f"bench-{side.name}-{i}", f"/var/run/netns/{pod}")
        setup = case.setup(data_dir)
        runtime = case.runtime(i) if case.runtime else None
        base = chain.add(ctx.reference, setup, att, node).result if setup else None
        timed = case.timed(data_dir)
        add = chain.add(side, timed, att, node, runtime, prev=base)
        delete = chain.delete(side, timed, att, node, add.result, runtime)
        if setup:
            chain.delete(ctx.reference, setup, att, node, base)
        return add, delete
    finally:
        ctx.cleanup.drop_namespace(pod)
