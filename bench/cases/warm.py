"""What the warm path changes: the shim's start-up, the plugin's own start-up, concurrent ADDs through the agent.

pycni's executables are those of the default `pycni install` (the compiled
shim); with a Python-shim side (``ctx.warm_python``: `pycni install
--python-shim` for the same agent) the same figures are measured for it too:

- ``start-up/<plugin>/shim``: wall time of ``VERSION`` through pycni's
  installed executable, which answers it by itself (the cost of starting the
  shim), against the reference. This is also what ``startup/<plugin>/wall``
  measures. ``start-up/<plugin>/python shim``: the same through the Python
  shim (``python -IS`` and a few builtin modules).
- ``start-up/<plugin>/in-process plugin``: ``VERSION`` served by the plugin
  package itself (``python -I -c 'from <module> import main; main()'``, the
  launcher before the agent existed): the start-up a cold call pays before its
  work, against the reference.
- ``concurrency/<net>``: as the ``concurrency`` case (100 ADDs, 10 at a time,
  reaped with wait4), warm side against the reference in the same rounds;
  ``duplicates`` and ``failures`` must be 0. Its ``per_add_cpu`` is the shims'
  CPU only; ``agent_cpu`` is what the agent used for the whole round.
  ``python-shim/concurrency/<net>``: the Python shim's side in the same rounds.
- ``python-shim/latency/<case>``: the ``latency`` case's ADD and DEL (wall
  time) through the Python shim, served by the agent, against the reference
  in the same iterations; the default install's are ``latency/<case>/warm``.
"""

from __future__ import annotations

import sys
import dataclasses
from contextlib import contextmanager
from typing import Any, Iterator

from .. import spawn
from ..context import Context
from ..sides import PLUGIN_PATH, Side
from ..stats import pair, summary
from . import concurrency, latency

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
    python_shim: dict[str, Any] = {"concurrency": {}, "latency": {}} if ctx.warm_python is not None else {}
    for label, needs in concurrency.NETWORKS:
        if label not in ctx.settings.concurrency_networks:
            continue
        skipped = ctx.unavailable(f"warm/concurrency/{label}", needs)
        if skipped:
            figures["concurrency"][label] = skipped
            continue
        print(
            f"  warm: concurrency {label}, {ctx.settings.concurrency_total} ADDs, "
            f"{ctx.settings.concurrency_parallel} at a time",
            flush=True,
        )
        measured = ctx.attempt(f"warm/concurrency/{label}", lambda: _concurrency(ctx, label))
        if python_shim:
            python_shim["concurrency"][label] = measured.pop(
                "python shim", {"skipped": f"the warm round failed (see warm/concurrency/{label})"}
            )
        figures["concurrency"][label] = measured
    if python_shim:
        for case in latency.CASES:
            label = f"warm/python-shim/latency/{case.name}"
            skipped = ctx.unavailable(label, case.needs)
            if skipped:
                python_shim["latency"][case.name] = skipped
                continue
            print(f"  warm: latency through the Python shim: {case.name}", flush=True)
            python_shim["latency"][case.name] = ctx.attempt(label, lambda: _python_shim_latency(ctx, case))
        figures["python-shim"] = python_shim
    return figures


def _wall(argv: list[str]) -> float:
    outcome = spawn.run(argv, {"PATH": PLUGIN_PATH, "CNI_COMMAND": "VERSION"}, STDIN, None)
    if not outcome.ok:
        raise RuntimeError(f"{argv} VERSION: {outcome.describe()}")
    return outcome.wall_s


def _startup(ctx: Context, plugin: str) -> dict[str, Any]:
    from cni_plugins.spec.registry import PLUGINS

    module, _, function = PLUGINS[plugin].partition(":")
    argvs = {
        "shim": [ctx.pycni.exe(plugin)],
        "in-process": [sys.executable, "-I", "-c", f"from {module} import {function}; {function}()"],
        "reference": [ctx.reference.exe(plugin)],
    }
    if ctx.warm_python is not None:
        argvs["python shim"] = [ctx.warm_python.exe(plugin)]
    for argv in argvs.values():
        _wall(argv)  # untimed: page cache, .pyc files
    walls: dict[str, list[float]] = {name: [] for name in argvs}
    names = list(argvs)
    for i in range(ctx.settings.startup_iterations):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            walls[name].append(_wall(argvs[name]))
    out = {
        "shim": pair(walls["shim"], walls["reference"], "ms", 1000),
        "in-process plugin": pair(walls["in-process"], walls["reference"], "ms", 1000),
    }
    if "python shim" in walls:
        out["python shim"] = pair(walls["python shim"], walls["reference"], "ms", 1000)
    return out


def _concurrency(ctx: Context, label: str) -> dict[str, Any]:
    """The default warm side (and the Python shim's, under "python shim") against the reference, same rounds."""
    assert ctx.warm is not None and ctx.agent is not None
    agent = ctx.agent
    warm_sides = [s for s in (ctx.warm, ctx.warm_python) if s is not None]
    agent_cpu: dict[str, list[float]] = {side.name: [] for side in warm_sides}

    @contextmanager
    def agent_cpu_of(side: Side) -> Iterator[None]:
        before = agent.cpu_s() if side.name in agent_cpu else 0.0
        yield
        if side.name in agent_cpu:
            agent_cpu[side.name].append(agent.cpu_s() - before)

    tally = concurrency.tally_rounds(ctx, label, (*warm_sides, ctx.reference), around=agent_cpu_of)
    ref = tally[ctx.reference.name]
    figures = []
    for side in warm_sides:
        warm = tally[side.name]
        out = {
            "wall": pair(warm.walls, ref.walls, "s"),
            "per_add": pair(warm.per_add, ref.per_add, "ms", 1000),
            "per_add_cpu": pair(warm.per_add_cpu, ref.per_add_cpu, "ms", 1000),
            "agent_cpu": summary(agent_cpu[side.name], "s"),
            "warm_duplicates": warm.duplicates,
            "warm_failures": warm.failures,
            "reference_duplicates": ref.duplicates,
            "reference_failures": ref.failures,
            "adds": ctx.settings.concurrency_total,
            "parallel": ctx.settings.concurrency_parallel,
        }
        first_failure = {
            name: t.first_failure for name, t in ((side.name, warm), (ctx.reference.name, ref)) if t.first_failure
        }
        if first_failure:
            out["first_failure"] = first_failure
        figures.append(out)
    if len(figures) > 1:
        figures[0]["python shim"] = figures[1]
    return figures[0]


def _python_shim_latency(ctx: Context, case: latency.LatencyCase) -> dict[str, Any]:
    """The latency case with the Python shim's warm side in the place of the cold one (wall times only:
    the case adds the agent's CPU to its own warm side alone)."""
    assert ctx.warm_python is not None
    through_python = dataclasses.replace(ctx, pycni=ctx.warm_python, warm=None, warm_python=None)
    measured = latency._measure(through_python, case)
    return {"add": measured["add"], "del": measured["del"]}
