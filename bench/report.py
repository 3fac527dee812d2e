"""The human-readable table (ratios first) and the JSON file."""

from __future__ import annotations

import json
from typing import Any, Iterator


def _fmt(s: dict[str, Any]) -> str:
    if not s or s.get("n", 0) == 0:
        return "-"

    def num(v: float) -> str:
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"

    return f"{num(s['median'])} {s['unit']} ({num(s['min'])}..{num(s['max'])}, n={s['n']})"


def rows(results: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(figure path, figure) for every figure: a pair (pycni/reference/ratio) or a lone summary."""
    for key, value in results.items():
        if not isinstance(value, dict):
            continue
        path = f"{prefix}/{key}" if prefix else key
        if "ratio" in value and "pycni" in value:
            yield path, value
        elif "median" in value and "unit" in value:
            yield path, {"alone": value}
        else:
            yield from rows(value, path)


def table(results: dict[str, Any]) -> str:
    lines = []
    paired = [(p, f) for p, f in rows(results) if "alone" not in f]
    width = max([len(p) for p, _ in paired] + [20])
    lines.append(f"{'ratio':>7}  {'figure':<{width}}  {'pycni median (min..max)':<34}  reference median (min..max)")
    lines.append("-" * (width + 80))
    for path, fig in paired:
        r = fig.get("ratio")
        ratio = f"{r:.2f}x" if isinstance(r, (int, float)) else "-"
        lines.append(f"{ratio:>7}  {path:<{width}}  {_fmt(fig['pycni']):<34}  {_fmt(fig['reference'])}")
    alone = [(p, f["alone"]) for p, f in rows(results) if "alone" in f]
    if alone:
        lines.append("")
        lines.append("figures without a pycni/reference pair:")
        for path, s in alone:
            lines.append(f"         {path:<{width}}  {_fmt(s)}")
    for label, conc in (results.get("concurrency") or {}).items():
        if isinstance(conc, dict) and "duplicates" in conc:
            lines.append(
                f"concurrency/{label}: duplicates pycni={conc['duplicates']['pycni']} "
                f"reference={conc['duplicates']['reference']}; failures pycni={conc['failures']['pycni']} "
                f"reference={conc['failures']['reference']}"
            )
    return "\n".join(lines)


def problems(results: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(kind, figure path, message) for every skipped or failed figure."""
    for key, value in results.items():
        if not isinstance(value, (dict, str)):
            continue
        path = f"{prefix}/{key}" if prefix else key
        if key in ("error", "skipped") and isinstance(value, str):
            yield key, prefix, value
        elif isinstance(value, dict):
            yield from problems(value, path)


def write_json(path: str, document: dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(document, handle, indent=2, sort_keys=False)
        handle.write("\n")
