"""Running a list of plugins the way a runtime runs a conflist (libcni order)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from . import configs
from .sides import Call, Side, invoke


@dataclass
class Timed:
    """What a chain run returned and what it cost."""

    result: dict[str, Any]
    wall_s: float
    cpu_s: float


@dataclass
class Attachment:
    container_id: str
    netns: str
    ifname: str = "eth0"


def add(
    side: Side,
    plugins: list[dict[str, Any]],
    att: Attachment,
    node: str,
    runtime: dict[str, Any] | None = None,
    prev: dict[str, Any] | None = None,
) -> Timed:
    """ADD each plugin in order, feeding each one's result to the next.

    ``prev`` is the result of plugins run before these (untimed set-up).
    """
    cpu = 0.0
    started = time.perf_counter()
    for conf in plugins:
        call = Call("ADD", configs.chained(conf, prev, runtime), att.container_id, att.netns, att.ifname)
        outcome = invoke(side, conf["type"], call, node)
        prev = outcome.json()
        cpu += outcome.cpu_s
    return Timed(prev or {}, time.perf_counter() - started, cpu)


def delete(
    side: Side,
    plugins: list[dict[str, Any]],
    att: Attachment,
    node: str,
    result: dict[str, Any] | None,
    runtime: dict[str, Any] | None = None,
) -> Timed:
    """DEL in reverse order, each with the cached ADD result as prevResult."""
    cpu = 0.0
    started = time.perf_counter()
    for conf in reversed(plugins):
        call = Call("DEL", configs.chained(conf, result, runtime), att.container_id, att.netns, att.ifname)
        cpu += invoke(side, conf["type"], call, node).cpu_s
    return Timed({}, time.perf_counter() - started, cpu)
