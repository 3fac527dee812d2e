"""min/median/max summaries and pycni/reference ratios."""

from __future__ import annotations

import statistics
from typing import Any


def summary(values: list[float], unit: str, scale: float = 1.0) -> dict[str, Any]:
    """Summarise raw values (multiplied by scale, e.g. 1000 for s -> ms)."""
    if not values:
        return {"n": 0, "unit": unit}
    scaled = [v * scale for v in values]
    return {
        "n": len(scaled),
        "unit": unit,
        "min": round(min(scaled), 3),
        "median": round(statistics.median(scaled), 3),
        "max": round(max(scaled), 3),
    }


def ratio(ours: dict[str, Any], ref: dict[str, Any]) -> float | None:
    """pycni median / reference median (None when either is missing or zero)."""
    a, b = ours.get("median"), ref.get("median")
    if a is None or not b:
        return None
    return round(a / b, 2)


def pair(ours: list[float], ref: list[float], unit: str, scale: float = 1.0) -> dict[str, Any]:
    """The figure for one measurement: both summaries and the ratio of medians."""
    o, r = summary(ours, unit, scale), summary(ref, unit, scale)
    return {"pycni": o, "reference": r, "ratio": ratio(o, r)}
