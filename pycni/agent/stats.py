"""What the agent has served: counts, latency percentiles and histograms per plugin and command."""

from __future__ import annotations

import bisect
import threading
from collections import deque
from typing import Any

# Percentiles come from the most recent samples only, so memory stays bounded.
WINDOW = 4096
# Upper bounds (seconds) of the latency histogram `pycni agent --metrics-address` exports: a warm
# request takes milliseconds, a cold-sized one tens of them, one behind a lock or a slow IPAM seconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (not empty)."""
    rank = max(1, min(len(sorted_values), round(fraction * len(sorted_values) + 0.4999)))
    return sorted_values[rank - 1]


class _Series:
    __slots__ = ("count", "errors", "samples", "seconds", "buckets")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.samples: deque[float] = deque(maxlen=WINDOW)
        self.seconds = 0.0  # sum of every request's latency, since start
        self.buckets = [0] * (len(BUCKETS) + 1)  # requests per latency bucket (the last: above BUCKETS[-1])


class Stats:
    """Thread-safe counters the connection threads update and ``pycni agent status`` reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], _Series] = {}
        # refused: protocol refusals (another pycni version, unknown plugin or kind, no namespace descriptor,
        # oversized); declined: requests the agent's rules send back to their caller's process (CNI_NETNS
        # without a usable descriptor, a delegate outside --cni-bin-dir); over_capacity: connections refused
        # unread at --max-connections. The callers of all three ran the plugin themselves.
        self.counters = {
            "served": 0,
            "refused": 0,
            "declined": 0,
            "busy": 0,
            "timed_out": 0,
            "denied": 0,
            "over_capacity": 0,
            "bad_requests": 0,
        }

    def count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    def served(self, plugin_type: str, command: str, seconds: float, ok: bool) -> None:
        with self._lock:
            series = self._series.setdefault((plugin_type, command), _Series())
            series.count += 1
            series.errors += 0 if ok else 1
            series.samples.append(seconds)
            series.seconds += seconds
            series.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
            self.counters["served"] += 1

    def histograms(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Per (plugin type, command) since start: count, errors, sum of seconds and the cumulative count
        at or below each of ``BUCKETS`` (then +Inf), as a Prometheus histogram has them. No sorting."""
        with self._lock:
            out = {}
            for key, series in self._series.items():
                cumulative, running = [], 0
                for n in series.buckets:
                    running += n
                    cumulative.append(running)
                out[key] = {
                    "count": series.count,
                    "errors": series.errors,
                    "sum": series.seconds,
                    "buckets": list(zip((*BUCKETS, float("inf")), cumulative)),
                }
            return out

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counters)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            latency: dict[str, dict[str, Any]] = {}
            for (plugin_type, command), series in sorted(self._series.items()):
                values = sorted(series.samples)
                latency.setdefault(plugin_type, {})[command] = {
                    "count": series.count,
                    "errors": series.errors,
                    "p50_ms": round(percentile(values, 0.50) * 1000, 2) if values else None,
                    "p99_ms": round(percentile(values, 0.99) * 1000, 2) if values else None,
                }
            return {"requests": dict(self.counters), "latency": latency}
