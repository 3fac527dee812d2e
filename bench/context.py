"""Run modes and the state every case shares."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from .cleanup import Cleanup
from .sides import Side


@dataclass(frozen=True)
class Settings:
    mode: str
    iterations: int  # timed ADD/DEL pairs per side and latency case
    warmup: int  # untimed iterations per side before them
    scale_checkpoints: tuple[int, ...]
    scale_samples: int  # ADDs timed at each checkpoint
    concurrency_networks: tuple[str, ...]  # which of concurrency.NETWORKS to run
    concurrency_total: int
    concurrency_parallel: int
    concurrency_rounds: int
    iperf_seconds: int
    iperf_omit: int  # seconds iperf3 leaves out at the start (TCP ramp, tbf burst)
    dataplane_rounds: int
    rates_mbit: tuple[int, ...]
    startup_iterations: int
    memory_iterations: int


BOTH_NETWORKS = ("host-local", "bridge+host-local")

MODES = {
    "smoke": Settings(
        "smoke",
        iterations=2,
        warmup=0,
        scale_checkpoints=(3,),
        scale_samples=2,
        concurrency_networks=BOTH_NETWORKS,
        concurrency_total=20,
        concurrency_parallel=5,
        concurrency_rounds=1,
        iperf_seconds=1,
        iperf_omit=0,
        dataplane_rounds=1,
        rates_mbit=(8,),
        startup_iterations=3,
        memory_iterations=1,
    ),
    # quick keeps under two minutes on a 2-core machine: concurrency on host-local only.
    "quick": Settings(
        "quick",
        iterations=5,
        warmup=1,
        scale_checkpoints=(10, 50),
        scale_samples=3,
        concurrency_networks=("host-local",),
        concurrency_total=100,
        concurrency_parallel=10,
        concurrency_rounds=1,
        iperf_seconds=2,
        iperf_omit=0,
        dataplane_rounds=1,
        rates_mbit=(8, 50),
        startup_iterations=10,
        memory_iterations=3,
    ),
    "full": Settings(
        "full",
        iterations=20,
        warmup=2,
        scale_checkpoints=(10, 100, 500, 1000),
        scale_samples=5,
        concurrency_networks=BOTH_NETWORKS,
        concurrency_total=100,
        concurrency_parallel=10,
        concurrency_rounds=3,
        iperf_seconds=5,
        iperf_omit=1,
        dataplane_rounds=3,
        rates_mbit=(8, 50),
        startup_iterations=40,
        memory_iterations=5,
    ),
}


@dataclass
class Context:
    settings: Settings
    cleanup: Cleanup
    pycni: Side
    reference: Side
    notes: list[str] = field(default_factory=list)
    warm: Side | None = None  # pycni through `pycni agent` (bench/sides.py); None with --no-warm
    agent: Any = None  # the WarmAgent serving ``warm`` (and ``warm_python``)
    warm_shim: str = ""  # the shim of ``warm`` (the default install's): "compiled" or "python"
    # The same agent behind `pycni install --python-shim` executables: bench/cases/warm.py measures them as
    # figures of their own (warm/python-shim/...). None with --no-python-shim, or when ``warm`` is that already.
    warm_python: Side | None = None

    @property
    def warm_native(self) -> bool:
        """``warm``'s plugins run through the compiled shim (what bench/cases/e2e.py installs for its warm side)."""
        return self.warm_shim == "compiled"

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.notes.append(text)

    def both(self, index: int) -> tuple[Side, Side]:
        """Both sides, in alternating order so that neither always goes first."""
        return (self.pycni, self.reference) if index % 2 == 0 else (self.reference, self.pycni)

    def rotation(self, index: int) -> list[Side]:
        """Every side (cold, warm when there is one, reference), rotated so that none always goes first."""
        sides = [s for s in (self.pycni, self.warm, self.reference) if s is not None]
        shift = index % len(sides)
        return sides[shift:] + sides[:shift]

    def missing(self, plugins: list[str]) -> list[str]:
        return [p for p in plugins if not self.pycni.has(p) or not self.reference.has(p)]

    def unavailable(self, label: str, needs: list[str]) -> dict[str, Any] | None:
        """The figure's entry (and a note) when a side lacks a plugin it needs, else None."""
        missing = self.missing(needs)
        if not missing:
            return None
        self.note(f"{label}: skipped, pycni has no {', '.join(missing)} plugin yet")
        return {"skipped": f"missing plugin(s): {', '.join(missing)}"}

    def attempt(self, label: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``measure()``, or an error entry (and a note) when it fails:
        one broken figure must not stop the others."""
        try:
            return measure()
        except Exception as exc:
            self.note(f"{label}: failed: {exc}")
            return {"error": str(exc)}

    def settings_dict(self) -> dict[str, Any]:
        return asdict(self.settings)
