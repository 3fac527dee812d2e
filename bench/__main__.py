"""`python -m bench`: pycni's plugins against the reference Go plugins, side by side."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from typing import Any

import click

CASES = ("startup", "latency", "concurrency", "warm", "scale", "dataplane", "overlay", "e2e", "store")
# Run only when named with --only: `store` (1000 nodes on one etcd) takes ~4 minutes even in quick mode.
OPT_IN_CASES = ("store",)


def _machine() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_mib": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20,
        "python": platform.python_version(),
        "executable": sys.executable,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", "mode", flag_value="quick", help="Fewer iterations and pods (under two minutes).")
@click.option(
    "--smoke",
    "mode",
    flag_value="smoke",
    help="2-3 iterations per case, tiny scale and concurrency: checks the benchmark itself works.",
)
@click.option(
    "--full", "mode", flag_value="full", default=True, help="The full run (default; about 15 minutes on 2 cores)."
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, writable=True), help="Write every figure to this JSON file."
)
@click.option(
    "--only",
    multiple=True,
    type=click.Choice(CASES),
    help="Run only these groups of figures (repeatable). Default: all but "
    + ", ".join(OPT_IN_CASES)
    + " (run it with --only store: the overlay at 1000 nodes on one "
    "etcd, several minutes).",
)
@click.option(
    "--warm/--no-warm",
    default=True,
    show_default=True,
    help="Also measure pycni through `pycni agent` (the warm path), beside the cold path.",
)
@click.option(
    "--native-shim",
    is_flag=True,
    help="Install pycni's plugins with `pycni install --native-shim`: the compiled shim or an error. "
    "Without it they are what the default `pycni install` writes: the compiled shim too, unless "
    "install falls back to the Python shim (it then says why).",
)
@click.option(
    "--python-shim/--no-python-shim",
    default=True,
    show_default=True,
    help="Also measure the warm path through `pycni install --python-shim` executables, as figures "
    "of their own (warm/python-shim/... and the python shim start-up).",
)
def main(
    mode: str, json_path: str | None, only: tuple[str, ...], warm: bool, native_shim: bool, python_shim: bool
) -> None:
    """Benchmark pycni's CNI plugins against the reference Go plugins in /usr/lib/cni.

    Needs root: every measurement runs in network namespaces the benchmark
    creates (a node namespace per side, pod namespaces per iteration) and
    removes again, also on Ctrl-C or SIGTERM. The machine's own network
    namespace is never touched. Each figure gives min/median/max for both sides
    and the ratio pycni/reference of the medians (above 1: pycni is slower,
    or for throughput/accuracy, higher).

    pycni runs cold (a process per call: its shims with no agent behind them)
    and, unless --no-warm, warm (the same shims served by a `pycni agent` the
    benchmark starts in a namespace of its own): figures under `.../warm/...`
    compare the warm path with the reference, all others the cold path. Both
    use the executables of the default `pycni install` (the compiled shim);
    warm/python-shim/... measures the warm path through the Python shim
    (`pycni install --python-shim`) with the same agent.
    """
    if os.geteuid() != 0:
        raise click.UsageError("the benchmark needs root to create network namespaces; run it with sudo")
    from . import cleanup as cleanup_mod
    from .context import MODES, Context
    from .report import problems, table, write_json
    from .sides import PYCNI_WARM_PYTHON, installed_shim, pycni_side, reference_side, warm_side

    settings = MODES[mode]
    selected = only or tuple(case for case in CASES if case not in OPT_IN_CASES)
    registry = cleanup_mod.Cleanup()
    old_handlers = cleanup_mod.install_signal_handlers()
    started = time.monotonic()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    results: dict[str, Any] = {}
    interrupted = False
    leftovers: list[str] = []
    ctx = None
    agent = None
    agent_status: dict[str, Any] | None = None
    try:
        bin_dir = registry.directory("bin")
        # The cold side's shims point at a socket nothing serves (never an agent running on this machine).
        shim = "native" if native_shim else None
        pycni, how = pycni_side(bin_dir, os.path.join(bin_dir, "no-agent", "agent.sock"), shim=shim)
        ctx = Context(settings, registry, pycni, reference_side())
        click.echo(
            f"bench: {mode} mode; pycni plugins: {', '.join(sorted(pycni.plugins))} ({how}); "
            f"reference: {ctx.reference.bin_dir}"
        )
        if warm:
            ctx.warm, agent, how_warm = warm_side(registry, registry.directory("bin-warm"), shim)
            ctx.agent, ctx.warm_shim = agent, installed_shim(ctx.warm.bin_dir)
            click.echo(
                f"bench: warm side: pycni agent (pid {agent.proc.pid}) in namespace {agent.ns}, "
                f"shims by {how_warm}; figures under .../warm/... are pycni-warm vs reference"
            )
            if python_shim and ctx.warm_shim == "python":
                ctx.note(
                    "the default install put the Python shim in front of the plugins already: "
                    "no separate warm/python-shim figures"
                )
            elif python_shim:
                ctx.warm_python, how_python = pycni_side(
                    registry.directory("bin-warm-python"), agent.socket_path, PYCNI_WARM_PYTHON, "python"
                )
                click.echo(
                    f"bench: warm side through the Python shim: the same agent, shims by {how_python}; "
                    f"figures under warm/python-shim/... and .../python shim"
                )
        for case in CASES:
            if case not in selected:
                continue
            click.echo(f"[{case}]")
            module = __import__(f"bench.cases.{case}", fromlist=["run"])
            case_started = time.monotonic()
            results[case] = module.run(ctx)
            click.echo(f"  ({time.monotonic() - case_started:.1f} s)")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if agent is not None:
            try:
                agent_status = agent.status()
            except Exception as exc:  # the figures stand without it
                agent_status = {"error": str(exc)}
            agent.stop()
        leftovers = registry.run_all()
        cleanup_mod.restore_signal_handlers(old_handlers)
    elapsed = time.monotonic() - started
    click.echo("")
    click.echo(table(results))
    found = list(problems(results))
    for kind, path, message in found:
        click.echo(f"{kind}: {path}: {message}")
    if json_path and ctx is not None:
        document = {
            "meta": {
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "mode": mode,
                "elapsed_s": round(elapsed, 1),
                "load_average_at_start": load_at_start,
                "settings": ctx.settings_dict(),
                "machine": _machine(),
                "pycni_plugins": sorted(ctx.pycni.plugins),
                "warm_shims": ctx.warm_shim or None,
                "python_shim_figures": ctx.warm_python is not None,
                "interrupted": interrupted,
            },
            "notes": ctx.notes,
            "agent": agent_status,
            "results": results,
        }
        write_json(json_path, document)
        click.echo(f"bench: figures written to {json_path}")
    click.echo(f"bench: done in {elapsed:.0f} s")
    if leftovers:
        click.echo("bench: could not remove: " + "; ".join(leftovers), err=True)
    if interrupted:
        sys.exit(130)
    if leftovers or any(kind == "error" for kind, _, _ in found):
        sys.exit(1)


if __name__ == "__main__":
    main()
