"""ADD latency as pods accumulate on one node, with ipMasq and a port mapping per pod.

Both sides add pods alternately to a node of their own (bridge with ipMasq +
portmap, the chain a node with many pods runs). At each checkpoint c the
figure is the ADD latency of pods c+1..c+k; every earlier pod is still
attached, with its masquerade and port-mapping rules in place. Pods are not
deleted one by one: dropping the node namespace at the end removes them all.
"""

from __future__ import annotations

from typing import Any

from .. import chain, configs
from ..chain import Attachment
from ..context import Context
from ..stats import pair

NET = "benchscale"
NEEDS = ["bridge", "host-local", "portmap"]
FIRST_HOST_PORT = 10000


def run(ctx: Context) -> dict[str, Any]:
    skipped = ctx.unavailable("scale", NEEDS)
    if skipped:
        return skipped
    settings = ctx.settings
    total = max(settings.scale_checkpoints) + settings.scale_samples
    print(f"  scale: {total} pods per side (checkpoints {', '.join(map(str, settings.scale_checkpoints))})", flush=True)
    cleanup = ctx.cleanup
    sides = (ctx.pycni, ctx.reference)
    nodes = {s.name: cleanup.namespace("node") for s in sides}
    dirs = {s.name: cleanup.directory(s.name) for s in sides}
    pods: list[str] = []
    latencies: dict[str, list[float]] = {s.name: [] for s in sides}
    cpu: dict[str, list[float]] = {s.name: [] for s in sides}
    error = None
    try:
        for i in range(total):
            for side in ctx.both(i):
                pod = cleanup.namespace("pod")
                pods.append(pod)
                plugins = [configs.bridge(NET, dirs[side.name], ip_masq=True), configs.portmap(NET)]
                att = Attachment(f"scale-{side.name}-{i}", f"/var/run/netns/{pod}")
                try:
                    timed = chain.add(side, plugins, att, nodes[side.name], configs.port_mappings(FIRST_HOST_PORT + i))
                except Exception as exc:
                    error = f"pod {i + 1}: {exc}"
                    raise
                latencies[side.name].append(timed.wall_s)
                cpu[side.name].append(timed.cpu_s)
            if (i + 1) % 100 == 0:
                print(f"    {i + 1} pods per side", flush=True)
    except Exception:
        ctx.note(f"scale: stopped at {error}")
    finally:
        for name in [*pods, *nodes.values()]:
            cleanup.drop_namespace(name)
        for path in dirs.values():
            cleanup.drop_directory(path)
    figures: dict[str, Any] = {}
    k = settings.scale_samples
    for c in settings.scale_checkpoints:
        ours, ref = latencies["pycni"][c : c + k], latencies["reference"][c : c + k]
        if len(ours) == k and len(ref) == k:
            figures[f"add after {c} pods"] = pair(ours, ref, "ms", 1000)
            figures[f"add cpu after {c} pods"] = pair(cpu["pycni"][c : c + k], cpu["reference"][c : c + k], "ms", 1000)
    if error:
        figures["error"] = error
    return figures
