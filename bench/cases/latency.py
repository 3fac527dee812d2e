"""ADD and DEL latency of each plugin alone, and of the bridge+portmap+bandwidth chain.

Per iteration and side: a fresh pod namespace, the untimed set-up (for portmap
and bandwidth: a reference bridge ADD, so both sides shape/map the same
attachment), the timed ADD, the timed DEL, the untimed tear-down. The node
namespace and host-local dataDir are fresh per case and side.

Three sides take turns (the order rotates every iteration): pycni cold, pycni
warm (through `pycni agent`) and the reference. ``add``/``del`` are cold vs
reference as before; ``warm/add``/``warm/del`` are warm vs reference. A warm
``_cpu`` figure is the shims' CPU plus the agent's (read from the agent before
and after the timed part), so it counts the same work as the others.
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
    needs: list[str]  # plugins both sides must have
    setup: Callable[[str], list[dict[str, Any]]]  # data_dir -> untimed plugins (run with the reference)
    timed: Callable[[str], list[dict[str, Any]]]  # data_dir -> timed plugins
    runtime: Callable[[int], dict[str, Any]] | None = None


def _runtime_chain(i: int) -> dict[str, Any]:
    return {**configs.port_mappings(10000 + i), **configs.shaping(50_000_000)}


CASES = [
    LatencyCase("loopback", ["loopback"], lambda d: [], lambda d: [configs.loopback(NET)]),
    LatencyCase("host-local", ["host-local"], lambda d: [], lambda d: [configs.host_local(NET, d)]),
    LatencyCase("bridge", ["bridge", "host-local"], lambda d: [], lambda d: [configs.bridge(NET, d)]),
    LatencyCase(
        "portmap",
        ["portmap"],
        lambda d: [configs.bridge(NET, d)],
        lambda d: [configs.portmap(NET)],
        lambda i: configs.port_mappings(10000 + i),
    ),
    LatencyCase(
        "bandwidth",
        ["bandwidth"],
        lambda d: [configs.bridge(NET, d)],
        lambda d: [configs.bandwidth(NET)],
        lambda i: configs.shaping(50_000_000),
    ),
    LatencyCase(
        "chain bridge+portmap+bandwidth",
        ["bridge", "host-local", "portmap", "bandwidth"],
        lambda d: [],
        lambda d: [configs.bridge(NET, d), configs.portmap(NET), configs.bandwidth(NET)],
        _runtime_chain,
    ),
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


FIGURES = ("add", "del", "add_cpu", "del_cpu")


def _measure(ctx: Context, case: LatencyCase) -> dict[str, Any]:
    cleanup = ctx.cleanup
    sides = ctx.rotation(0)
    nodes = {side.name: cleanup.namespace("node") for side in sides}
    dirs = {side.name: cleanup.directory(side.name) for side in sides}
    samples: dict[str, dict[str, list[float]]] = {figure: {side.name: [] for side in sides} for figure in FIGURES}
    try:
        for i in range(ctx.settings.warmup + ctx.settings.iterations):
            for side in ctx.rotation(i):
                add, delete = _one(ctx, case, side, nodes[side.name], dirs[side.name], i)
                if i >= ctx.settings.warmup:
                    for figure, value in (
                        ("add", add.wall_s),
                        ("del", delete.wall_s),
                        ("add_cpu", add.cpu_s),
                        ("del_cpu", delete.cpu_s),
                    ):
                        samples[figure][side.name].append(value)
    finally:
        for name in nodes.values():
            cleanup.drop_namespace(name)
        for path in dirs.values():
            cleanup.drop_directory(path)
    out: dict[str, Any] = {
        figure: pair(by_side[ctx.pycni.name], by_side[ctx.reference.name], "ms", 1000)
        for figure, by_side in samples.items()
    }
    if ctx.warm is not None:
        out["warm"] = {
            figure: pair(by_side[ctx.warm.name], by_side[ctx.reference.name], "ms", 1000)
            for figure, by_side in samples.items()
        }
    return out


def _timed(ctx: Context, side: Side, run: Callable[[], chain.Timed]) -> chain.Timed:
    """``run()``, with the agent's CPU added for the warm side."""
    if side is not ctx.warm or ctx.agent is None:
        return run()
    before = ctx.agent.cpu_s()
    timed = run()
    timed.cpu_s += ctx.agent.cpu_s() - before
    return timed


def _one(
    ctx: Context, case: LatencyCase, side: Side, node: str, data_dir: str, i: int
) -> tuple[chain.Timed, chain.Timed]:
    pod = ctx.cleanup.namespace("pod")
    try:
        att = Attachment(f"bench-{side.name}-{i}", f"/var/run/netns/{pod}")
        setup = case.setup(data_dir)
        runtime = case.runtime(i) if case.runtime else None
        base = chain.add(ctx.reference, setup, att, node).result if setup else None
        timed = case.timed(data_dir)
        add = _timed(ctx, side, lambda: chain.add(side, timed, att, node, runtime, prev=base))
        delete = _timed(ctx, side, lambda: chain.delete(side, timed, att, node, add.result, runtime))
        if setup:
            chain.delete(ctx.reference, setup, att, node, base)
        return add, delete
    finally:
        ctx.cleanup.drop_namespace(pod)
