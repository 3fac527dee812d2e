"""What the warm path changes: the shim's start-up, the plugin's own start-up, concurrent ADDs through the agent.

- ``start-up/<plugin>/shim``: wall time of ``VERSION`` through pycni's
  installed executable, which answers it by itself (the cost of starting a
  shim: ``python -IS`` and a few builtin modules), against the reference.
  This is also what ``startup/<plugin>/wall`` measures now.
- ``start-up/<plugin>/in-process plugin``: ``VERSION`` served by the plugin
  package itself (``python -I -c 'from <module> import main; main()'``, the
  launcher before the agent existed): the start-up a cold call pays before its
  work, against the reference.
- ``concurrency/<net>``: as the ``concurrency`` case (100 ADDs, 10 at a time,
  reaped with wait4), warm side against the reference in the same rounds;
  ``duplicates`` and ``failures`` must be 0. Its ``per_add_cpu`` is the shims'
  CPU only; ``agent_cpu`` is what the agent used for the whole round.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator

from .. import spawn
from ..context import Context
from ..sides import PLUGIN_PATH, Side
from ..stats import pair, summary
from . import concurrency

STDIN = b'{"cniVersion":"1.0.0"}'


def run(ctx: Context) -> dict[str, Any]:
    figures: dict[str, Any] = {"start-up": {}}
    for plugin in sorted(p for p in ctx.pycni.plugins if ctx.reference.has(p)):
        print(f"  warm: start-up of {plugin}", flush=True)
        figures["start-up"][plugin] = ctx.attempt(f"warm/start-up/{plugin}", lambda: _startup(ctx, plugin))
    if ctx.warm is None:
        ctx.note("warm: no agent (--no-warm): concurrency through the agent skipped")
        return figures
    figures["concurrency"] = {}
    for label, needs in concurrency.NETWORKS:
        if label not in ctx.settings.concurrency_networks:
            continue
        skipped = ctx.unavailable(f"warm/concurrency/{label}", needs)
        if skipped:
            figures["concurrency"][label] = skipped
            continue
        print(f"  warm: concurrency {label}, {ctx.settings.concurrency_total} ADDs, "
              f"{ctx.settings.concurrency_parallel} at a time", flush=True)
        figures["concurrency"][label] = ctx.attempt(f"warm/concurrency/{label}", lambda: _concurrency(ctx, label))
    return figures


def _wall(argv: list[str]) -> float:
    outcome = spawn.run(argv, {"PATH": PLUGIN_PATH, "CNI_COMMAND": "VERSION"}, STDIN, None)
    if not outcome.ok:
        raise RuntimeError(f"{argv} VERSION: {outcome.describe()}")
    return outcome.wall_s


def _startup(ctx: Context, plugin: str) -> dict[str, Any]:
    from cni_plugins.spec.registry import PLUGINS

    module, _, function = PLUGINS[plugin].partition(":")
    argvs = {"shim": [ctx.pycni.exe(plugin)],
             "in-process": [sys.executable, "-I", "-c", f"from {module} import {function}; {function}()"],
             "reference": [ctx.reference.exe(plugin)]}
    if ctx.warm is not None and ctx.warm_native:
        argvs["native shim"] = [ctx.warm.exe(plugin)]
    for argv in argvs.values():
        _wall(argv)  # untimed: page cache, .pyc files
    walls: dict[str, list[float]] = {name: [] for name in argvs}
    names = list(argvs)
    for i in range(ctx.settings.startup_iterations):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            walls[name].append(_wall(argvs[name]))
    out = {"shim": pair(walls["shim"], walls["reference"], "ms", 1000),
           "in-process plugin": pair(walls["in-process"], walls["reference"], "ms", 1000)}
    if "native shim" in walls:
        out["native shim"] = pair(walls["native shim"], walls["reference"], "ms", 1000)
    return out


def _concurrency(ctx: Context, label: str) -> dict[str, Any]:
    assert ctx.warm is not None and ctx.agent is not None
    agent = ctx.agent
    agent_cpu: list[float] = []

    @contextmanager
    def agent_cpu_of(side: Side) -> Iterator[None]:
        before = agent.cpu_s() if side is ctx.warm else 0.0
        yield
        if side is ctx.warm:
            agent_cpu.append(agent.cpu_s() - before)

    tally = concurrency.tally_rounds(ctx, label, (ctx.warm, ctx.reference), around=agent_cpu_of)
    warm, ref = tally[ctx.warm.name], tally[ctx.reference.name]
    out = {"wall": pair(warm.walls, ref.walls, "s"),
           "per_add": pair(warm.per_add, ref.per_add, "ms", 1000),
           "per_add_cpu": pair(warm.per_add_cpu, ref.per_add_cpu, "ms", 1000),
           "agent_cpu": summary(agent_cpu, "s"),
           "warm_duplicates": warm.duplicates, "warm_failures": warm.failures,
           "reference_duplicates": ref.duplicates, "reference_failures": ref.failures,
           "adds": ctx.settings.concurrency_total, "parallel": ctx.settings.concurrency_parallel}
    first_failure = {side.name: t.first_failure for side, t in ((ctx.warm, warm), (ctx.reference, ref))
                     if t.first_failure}
    if first_failure:
        out["first_failure"] = first_failure
    return out
