"""`python -m bench`: pycni's plugins against the reference Go plugins, side by side."""
from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from typing import Any

import click

CASES = ("startup", "latency", "concurrency", "scale", "dataplane")


def _machine() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    return {"host": platform.node(), "kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(),
            "memory_mib": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20,
            "python": platform.python_version(), "executable": sys.executable,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", "mode", flag_value="quick", help="Fewer iterations and pods (under two minutes).")
@click.option("--smoke", "mode", flag_value="smoke",
              help="2-3 iterations per case, tiny scale and concurrency: checks the benchmark itself works.")
@click.option("--full", "mode", flag_value="full", default=True, help="The full run (default; about 15 minutes on 2 cores).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True),
              help="Write every figure to this JSON file.")
@click.option("--only", multiple=True, type=click.Choice(CASES),
              help="Run only these groups of figures (repeatable). Default: all.")
def main(mode: str, json_path: str | None, only: tuple[str, ...]) -> None:
    """Benchmark pycni's CNI plugins against the reference Go plugins in /usr/lib/cni.

    Needs root: every measurement runs in network namespaces the benchmark
    creates (a node namespace per side, pod namespaces per iteration) and
    removes again, also on Ctrl-C or SIGTERM. The machine's own network
    namespace is never touched. Each figure gives min/median/max for both sides
    and the ratio pycni/reference of the medians (above 1: pycni is slower,
    or for throughput/accuracy, higher).
    """
    if os.geteuid() != 0:
        raise click.UsageError("the benchmark needs root to create network namespaces; run it with sudo")
    from . import cleanup as cleanup_mod
    from .context import MODES, Context
    from .report import problems, table, write_json
    from .sides import pycni_side, reference_side

    settings = MODES[mode]
    selected = only or CASES
    registry = cleanup_mod.Cleanup()
    old_handlers = cleanup_mod.install_signal_handlers()
    started = time.monotonic()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    results: dict[str, Any] = {}
    interrupted = False
    leftovers: list[str] = []
    ctx = None
    try:
        bin_dir = registry.directory("bin")
        pycni, how = pycni_side(bin_dir)
        ctx = Context(settings, registry, pycni, reference_side())
        click.echo(f"bench: {mode} mode; pycni plugins: {', '.join(sorted(pycni.plugins))} ({how}); "
                   f"reference: {ctx.reference.bin_dir}")
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
            "meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "mode": mode, "elapsed_s": round(elapsed, 1), "load_average_at_start": load_at_start,
                     "settings": ctx.settings_dict(),
                     "machine": _machine(), "pycni_plugins": sorted(ctx.pycni.plugins),
                     "interrupted": interrupted},
            "notes": ctx.notes,
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
