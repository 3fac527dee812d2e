"""Start-up: wall time and peak memory of `VERSION` for each plugin.

VERSION does no networking, so it is the pure cost of starting the plugin:
for pycni the interpreter, the imports the command needs and the JSON answer.

Peak memory is the child's ru_maxrss from wait4(). Linux keeps the largest
resident size a process had across exec(), and a child forked from this
benchmark starts out with the benchmark's (a Python process) as its size, which
would hide a Go plugin's few MB. So the memory runs fork from a tiny Perl
process (perl-base is on every Debian system) that calls wait4 and prints
ru_maxrss; `memory floor` (`/bin/true` the same way) shows what that adds.
Without a usable Perl the figure falls back to our own wait4 and says so.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from typing import Any

from .. import spawn
from ..context import Context
from ..sides import PLUGIN_PATH, Side
from ..stats import pair, summary

STDIN = b'{"cniVersion":"1.0.0"}'
# wait4's syscall number; Perl's syscall() needs it. Other machines fall back.
WAIT4 = {"x86_64": 61, "aarch64": 260}
PERL_WAIT4 = r"""
my $pid = fork(); die "fork: $!" unless defined $pid;
if ($pid == 0) { exec { $ARGV[0] } @ARGV or exit 127; }
my $status = pack("i", 0); my $ru = "\0" x 256;
syscall(%d, $pid, $status, 0, $ru) == $pid or die "wait4: $!";
my @f = unpack("q18", $ru); my $st = unpack("i", $status);
print STDERR "maxrss_kib=$f[4] status=$st\n";
"""


def run(ctx: Context) -> dict[str, Any]:
    figures: dict[str, Any] = {"floor": _floors(ctx)}
    plugins = sorted(ctx.pycni.plugins)
    for plugin in ("loopback", "host-local", "bridge", "portmap", "bandwidth"):
        if not ctx.pycni.has(plugin):
            ctx.note(f"startup/{plugin}: skipped, pycni has no {plugin} plugin yet")
    print(f"  startup: VERSION of {', '.join(plugins)}", flush=True)
    for plugin in plugins:
        figures[plugin] = ctx.attempt(f"startup/{plugin}", lambda: _measure(ctx, plugin))
    return figures


def _env() -> dict[str, str]:
    return {"PATH": PLUGIN_PATH, "CNI_COMMAND": "VERSION"}


def _wall(side: Side, plugin: str) -> float:
    outcome = spawn.run([side.exe(plugin)], _env(), STDIN, None)
    if not outcome.ok:
        raise RuntimeError(f"{side.name} {plugin} VERSION: {outcome.describe()}")
    return outcome.wall_s


def _perl_script() -> str | None:
    number = WAIT4.get(platform.machine())
    if number is None or not shutil.which("perl"):
        return None
    return PERL_WAIT4 % number


def _maxrss_kib(argv: list[str]) -> int:
    script = _perl_script()
    if script is None:
        return spawn.run(argv, _env(), STDIN, None).maxrss_kib
    proc = subprocess.run(["perl", "-e", script, *argv], input=STDIN, env=_env(), capture_output=True, timeout=60)
    for line in proc.stderr.decode(errors="replace").splitlines():
        if line.startswith("maxrss_kib="):
            fields = dict(part.split("=", 1) for part in line.split())
            if fields["status"] != "0":
                raise RuntimeError(f"{argv[0]} VERSION exited with wait status {fields['status']}")
            return int(fields["maxrss_kib"])
    raise RuntimeError(f"could not measure the memory of {argv[0]}: {proc.stderr.decode(errors='replace')[-300:]}")


def _measure(ctx: Context, plugin: str) -> dict[str, Any]:
    sides = [s for s in (ctx.pycni, ctx.reference) if s.has(plugin)]
    walls: dict[str, list[float]] = {s.name: [] for s in sides}
    memory: dict[str, list[float]] = {s.name: [] for s in sides}
    for side in sides:  # one untimed run each: page cache, .pyc files
        _wall(side, plugin)
    for i in range(ctx.settings.startup_iterations):
        for side in ctx.both(i):
            if side in sides:
                walls[side.name].append(_wall(side, plugin))
    for i in range(ctx.settings.memory_iterations):
        for side in ctx.both(i):
            if side in sides:
                memory[side.name].append(float(_maxrss_kib([side.exe(plugin)])))
    if len(sides) < 2:
        only = sides[0].name
        return {
            "wall": {only: summary(walls[only], "ms", 1000)},
            "peak_memory": {only: summary(memory[only], "MiB", 1 / 1024)},
            "note": "no reference plugin of this type",
        }
    return {
        "wall": pair(walls["pycni"], walls["reference"], "ms", 1000),
        "peak_memory": pair(memory["pycni"], memory["reference"], "MiB", 1 / 1024),
    }


def _floors(ctx: Context) -> dict[str, Any]:
    """What starting any process costs here, for reading the figures above it."""
    node = ctx.cleanup.namespace("node")
    try:
        n = max(ctx.settings.startup_iterations, 5)
        plain = [spawn.run(["/bin/true"], _env(), b"", None).wall_s for _ in range(n)]
        in_node = [spawn.run(["/bin/true"], _env(), b"", node).wall_s for _ in range(n)]
    finally:
        ctx.cleanup.drop_namespace(node)
    return {
        "spawn /bin/true": summary(plain, "ms", 1000),
        "spawn /bin/true via ip netns exec (added to every ADD/DEL figure)": summary(in_node, "ms", 1000),
        "memory /bin/true": summary([float(_maxrss_kib(["/bin/true"]))], "MiB", 1 / 1024),
        "memory method": "perl fork+wait4" if _perl_script() else "wait4 from the benchmark (inflated)",
    }
