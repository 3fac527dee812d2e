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
from typing import Any

from .. import spawn
from ..context import Context
from ..sides import PLUGIN_PATH
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
    for argv in argvs.values():
        _wall(argv)  # untimed: page cache, .pyc files
    walls: dict[str, list[float]] = {name: [] for name in argvs}
    names = list(argvs)
    for i in range(ctx.settings.startup_iterations):
        for name in names[i % 3:] + names[:i % 3]:
            walls[name].append(_wall(argvs[name]))
    return {"shim": pair(walls["shim"], walls["reference"], "ms", 1000),
            "in-process plugin": pair(walls["in-process"], walls["reference"], "ms", 1000)}


def _concurrency(ctx: Context, label: str) -> dict[str, Any]:
    assert ctx.warm is not None and ctx.agent is not None
    names = (ctx.warm.name, ctx.reference.name)
    walls: dict[str, list[float]] = {n: [] for n in names}
    per_add: dict[str, list[float]] = {n: [] for n in names}
    per_add_cpu: dict[str, list[float]] = {n: [] for n in names}
    duplicates = dict.fromkeys(names, 0)
    failures = dict.fromkeys(names, 0)
    agent_cpu: list[float] = []
    first_failure: dict[str, str] = {}
    for round_no in range(ctx.settings.concurrency_rounds):
        order = [ctx.warm, ctx.reference] if round_no % 2 == 0 else [ctx.reference, ctx.warm]
        for side in order:
            before = ctx.agent.cpu_s() if side is ctx.warm else 0.0
            wall, done, dups, failed, why = concurrency._round(ctx, side, label, round_no)
            if side is ctx.warm:
                agent_cpu.append(ctx.agent.cpu_s() - before)
            walls[side.name].append(wall)
            per_add[side.name].extend(o.wall_s for o in done)
            per_add_cpu[side.name].extend(o.cpu_s for o in done)
            duplicates[side.name] += dups
            failures[side.name] += failed
            if why and side.name not in first_failure:
                first_failure[side.name] = why
    warm, ref = names
    out = {"wall": pair(walls[warm], walls[ref], "s"),
           "per_add": pair(per_add[warm], per_add[ref], "ms", 1000),
           "per_add_cpu": pair(per_add_cpu[warm], per_add_cpu[ref], "ms", 1000),
           "agent_cpu": summary(agent_cpu, "s"),
           "warm_duplicates": duplicates[warm], "warm_failures": failures[warm],
           "reference_duplicates": duplicates[ref], "reference_failures": failures[ref],
           "adds": ctx.settings.concurrency_total, "parallel": ctx.settings.concurrency_parallel}
    if first_failure:
        out["first_failure"] = first_failure
    return out
