"""100 ADDs on one network, 10 running at a time: wall time, failures, duplicates.

The runtime-like scheduler starts plugin processes without threads and reaps
them with wait4(), so a new ADD starts the moment one finishes. Duplicates
are addresses handed to more than one container (must be zero: host-local's
lock file is the only thing between concurrent ADDs).
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

from .. import configs
from ..context import Context
from ..sides import Call, Side, start
from ..spawn import Outcome
from ..stats import pair

NET = "benchconc"
NETWORKS = [
    ("host-local", ["host-local"]),
    ("bridge+host-local", ["bridge", "host-local"]),
]


def run(ctx: Context) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for label, needs in NETWORKS:
        if label not in ctx.settings.concurrency_networks:
            continue
        skipped = ctx.unavailable(f"concurrency/{label}", needs)
        if skipped:
            figures[label] = skipped
            continue
        print(
            f"  concurrency: {label}, {ctx.settings.concurrency_total} ADDs, "
            f"{ctx.settings.concurrency_parallel} at a time",
            flush=True,
        )
        figures[label] = ctx.attempt(f"concurrency/{label}", lambda: _measure(ctx, label))
    return figures


@dataclass
class Tally:
    """One side's figures over every round."""

    walls: list[float] = field(default_factory=list)
    per_add: list[float] = field(default_factory=list)
    per_add_cpu: list[float] = field(default_factory=list)
    duplicates: int = 0
    failures: int = 0
    first_failure: str = ""


def tally_rounds(
    ctx: Context, label: str, sides: tuple[Side, Side], around: Callable[[Side], ContextManager[Any]] | None = None
) -> dict[str, Tally]:
    """Every round on both sides, alternating which goes first; ``around(side)`` wraps each side's round."""
    tally = {side.name: Tally() for side in sides}
    for round_no in range(ctx.settings.concurrency_rounds):
        for side in sides if round_no % 2 == 0 else sides[::-1]:
            with around(side) if around is not None else nullcontext():
                wall, done, dups, failed, why = _round(ctx, side, label, round_no)
            t = tally[side.name]
            t.walls.append(wall)
            t.per_add.extend(o.wall_s for o in done)
            t.per_add_cpu.extend(o.cpu_s for o in done)
            t.duplicates += dups
            t.failures += failed
            t.first_failure = t.first_failure or why
    return tally


def _measure(ctx: Context, label: str) -> dict[str, Any]:
    tally = tally_rounds(ctx, label, (ctx.pycni, ctx.reference))
    ours, ref = tally[ctx.pycni.name], tally[ctx.reference.name]
    out = {
        "wall": pair(ours.walls, ref.walls, "s"),
        "per_add": pair(ours.per_add, ref.per_add, "ms", 1000),
        "per_add_cpu": pair(ours.per_add_cpu, ref.per_add_cpu, "ms", 1000),
        "duplicates": {"pycni": ours.duplicates, "reference": ref.duplicates},
        "failures": {"pycni": ours.failures, "reference": ref.failures},
        "adds": ctx.settings.concurrency_total,
        "parallel": ctx.settings.concurrency_parallel,
    }
    first_failure = {name: t.first_failure for name, t in (("pycni", ours), ("reference", ref)) if t.first_failure}
    if first_failure:
        out["first_failure"] = first_failure
    return out


def _round(ctx: Context, side: Side, label: str, round_no: int) -> tuple[float, list[Outcome], int, int, str]:
    cleanup, settings = ctx.cleanup, ctx.settings
    node = cleanup.namespace("node")
    data_dir = cleanup.directory(side.name)
    bridged = label.startswith("bridge")
    pods: list[str] = []
    try:
        if bridged:
            pods = [cleanup.namespace("pod") for _ in range(settings.concurrency_total)]
        else:  # host-local never enters the namespace; one is enough for a valid CNI_NETNS
            pods = [cleanup.namespace("pod")]
        conf = configs.bridge(NET, data_dir) if bridged else configs.host_local(NET, data_dir)
        plugin = conf["type"]
        calls = [
            Call("ADD", conf, f"conc-{round_no}-{i}", f"/var/run/netns/{pods[i % len(pods)]}")
            for i in range(settings.concurrency_total)
        ]
        outcomes, wall = _run_parallel(side, plugin, calls, node, settings.concurrency_parallel)
        addresses: list[str] = []
        failed, why = 0, ""
        for outcome in outcomes:
            if not outcome.ok:
                failed += 1
                why = why or outcome.describe()
                continue
            addresses += [ip["address"].split("/")[0] for ip in (outcome.json() or {}).get("ips", [])]
        duplicates = len(addresses) - len(set(addresses))
        return wall, [o for o in outcomes if o.ok], duplicates, failed, why
    finally:
        for name in [*pods, node]:
            cleanup.drop_namespace(name)
        cleanup.drop_directory(data_dir)


def _run_parallel(side: Side, plugin: str, calls: list[Call], node: str, parallel: int) -> tuple[list[Outcome], float]:
    """Run all calls, at most `parallel` at once; return the outcomes and the total wall time."""
    pending = list(calls)
    running = {}
    done: list[Outcome] = []
    started = time.perf_counter()
    while pending or running:
        while pending and len(running) < parallel:
            proc = start(side, plugin, pending.pop(0), node)
            running[proc.proc.pid] = proc
        pid, status, usage = os.wait4(-1, 0)
        proc = running.pop(pid, None)
        if proc is not None:
            done.append(proc.finished(status, usage))
    return done, time.perf_counter() - started
