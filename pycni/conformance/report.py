"""The matrix: every node's rows, as a table or as JSON, and the verdict."""

from __future__ import annotations

import json
from typing import Any, Iterable

from .model import CHECK_HELP, FAIL, PASS, RENDEZVOUS, SKIP, Check, NodeResults


def current_round(results: Iterable[NodeResults]) -> tuple[list[NodeResults], list[NodeResults]]:
    """(the newest run's results, older results to ignore).

    The newest run is the most recently finished result and every result
    connected to it by having measured each other's sessions: nodes that ran
    together. A node's results from an earlier run (it did not take part this
    time) are not mixed into the matrix.
    """
    results = sorted(results, key=lambda r: r.finished, reverse=True)
    if not results:
        return [], []
    chosen = [results[0]]
    changed = True
    while changed:
        changed = False
        sessions = {(r.node, r.session) for r in chosen} | {item for r in chosen for item in r.peers.items()}
        for r in results:
            if r in chosen:
                continue
            if (r.node, r.session) in sessions or any(item in sessions for item in r.peers.items()):
                chosen.append(r)
                changed = True
    return chosen, [r for r in results if r not in chosen]


def collect(results: Iterable[NodeResults], leased: Iterable[str] = ()) -> list[Check]:
    """All rows, plus a failing rendezvous row for every leased node (public IP) that left no results."""
    results = list(results)
    rows = [row for r in results for row in r.checks]
    reported = {r.lease_address for r in results}
    for public_ip in sorted(set(leased) - reported):
        rows.append(
            Check(
                RENDEZVOUS,
                public_ip,
                "-",
                FAIL,
                None,
                f"node {public_ip} holds a subnet lease but wrote no conformance results: run "
                f"`pycni conformance run` there (or `pycni agent leave` if it is gone)",
            )
        )
    return sorted(rows, key=lambda r: r.sort_key)


def summary(rows: list[Check]) -> dict[str, int]:
    return {kind: sum(1 for r in rows if r.result == kind) for kind in (PASS, FAIL, SKIP)}


def passed(rows: list[Check]) -> bool:
    return bool(rows) and not any(r.result == FAIL for r in rows)


def _latency(row: Check) -> str:
    return "-" if row.latency_ms is None else f"{row.latency_ms:.2f}ms"


def table(rows: list[Check], width: int = 0) -> str:
    """The matrix as an aligned text table; messages of failures and skips in full."""
    header = ("CHECK", "FROM", "TO", "RESULT", "LATENCY", "MESSAGE")
    cells = [header] + [(r.check, r.source, r.target, r.result.upper(), _latency(r), r.message) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(5)]
    lines = []
    for cell in cells:
        text = "  ".join(value.ljust(widths[i]) for i, value in enumerate(cell[:5])) + "  " + cell[5]
        if width and len(text) > width and cell[3] == PASS.upper():
            text = text[: max(width - 1, 20)] + "…"
        lines.append(text.rstrip())
    counts = summary(rows)
    verdict = "PASS" if passed(rows) else "FAIL"
    lines.append("")
    lines.append(
        f"{verdict}: {len(rows)} checks, {counts[PASS]} passed, {counts[FAIL]} failed, "
        f"{counts[SKIP]} skipped (DNS-free: every check dials addresses from the store)"
    )
    return "\n".join(lines)


def _node(r: NodeResults) -> dict[str, Any]:
    return {"node": r.node, "publicIP": r.public_ip, "session": r.session, "started": r.started, "finished": r.finished}


def ignored_note(ignored: Iterable[NodeResults]) -> str:
    ignored = list(ignored)
    if not ignored:
        return ""
    return (
        "ignored results of an earlier run from "
        + ", ".join(sorted(r.node for r in ignored))
        + " (they did not take part in the newest run)"
    )


def as_json(rows: list[Check], results: Iterable[NodeResults] = (), ignored: Iterable[NodeResults] = ()) -> str:
    doc: dict[str, Any] = {
        "passed": passed(rows),
        "summary": summary(rows),
        "checks": [r.to_dict() for r in rows],
        "nodes": [_node(r) for r in results],
        "ignored": [_node(r) for r in ignored],
        "legend": CHECK_HELP,
    }
    return json.dumps(doc, indent=2)
