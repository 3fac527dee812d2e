"""What a runtime really sends: a logging wrapper in front of every plugin.

``wrap(real_dir, wrap_dir, log_dir)`` writes, for each executable in real_dir,
a small ``/bin/sh`` script of the same name into wrap_dir that saves the
request (the ``CNI_*`` environment and stdin), runs the real plugin with the
same arguments and stdin, saves its stdout and exit status, and relays both.
Stderr passes straight through. The runtime is pointed at wrap_dir, so
``CNI_PATH`` names wrap_dir too and a delegated IPAM plugin is logged as well.
``requests(log_dir)`` reads them back in call order.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_WRAPPER = """#!/bin/sh
# Written by pycni's tests/e2e (kit/capture.py): log the CNI request, then run the real plugin.
d={log}/$(date +%s%N)-$$-{name}
mkdir -p "$d"
cat > "$d/stdin"
env | grep '^CNI_' > "$d/env"
{real} "$@" < "$d/stdin" > "$d/stdout"
rc=$?
echo "$rc" > "$d/rc"
cat "$d/stdout"
exit "$rc"
"""


def wrap(real_dir: str | os.PathLike[str], wrap_dir: str | os.PathLike[str], log_dir: str | os.PathLike[str]) -> Path:
    """Write a logging wrapper into wrap_dir for every executable in real_dir; returns wrap_dir."""
    wrap_dir, log_dir = Path(wrap_dir), Path(log_dir)
    wrap_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    for entry in sorted(Path(real_dir).iterdir()):
        if not (entry.is_file() and os.access(entry, os.X_OK)):
            continue
        target = wrap_dir / entry.name
        target.write_text(
            _WRAPPER.format(log=shlex.quote(str(log_dir)), name=entry.name, real=shlex.quote(str(entry.resolve())))
        )
        target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return wrap_dir


@dataclass
class Request:
    """One plugin call as the runtime made it, and what the plugin answered."""

    plugin: str
    env: dict[str, str]
    stdin_text: str
    stdout_text: str
    rc: int | None

    @property
    def command(self) -> str:
        return self.env.get("CNI_COMMAND", "")

    @property
    def conf(self) -> Any:
        try:
            return json.loads(self.stdin_text)
        except ValueError:
            return None

    @property
    def answer(self) -> Any:
        try:
            return json.loads(self.stdout_text) if self.stdout_text.strip() else None
        except ValueError:
            return None

    def summary(self) -> str:
        status = "ok" if self.rc == 0 else f"exit {self.rc}: {self.stdout_text.strip()[:600]}"
        return (
            f"{self.plugin} {self.command} container={self.env.get('CNI_CONTAINERID', '')[:12]} "
            f"netns={self.env.get('CNI_NETNS', '')!r} -> {status}"
        )


def requests(log_dir: str | os.PathLike[str]) -> list[Request]:
    """Every logged call in log_dir, oldest first."""
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        return []
    found = []
    for entry in sorted(log_dir.iterdir(), key=lambda p: (int(p.name.split("-", 1)[0]), p.name)):

        def read(name: str) -> str:
            try:
                return (entry / name).read_text()
            except OSError:
                return ""

        env = dict(line.split("=", 1) for line in read("env").splitlines() if "=" in line)
        rc_text = read("rc").strip()
        found.append(
            Request(
                entry.name.split("-", 2)[2],
                env,
                read("stdin"),
                read("stdout"),
                int(rc_text) if rc_text.lstrip("-").isdigit() else None,
            )
        )
    return found


def failures(log_dir: str | os.PathLike[str]) -> list[Request]:
    return [r for r in requests(log_dir) if r.rc not in (0, None)]


def report(log_dir: str | os.PathLike[str], *, limit: int = 40) -> str:
    """The calls as lines (for assertion messages), failed ones with their request."""
    lines = []
    for request in requests(log_dir)[-limit:]:
        lines.append(request.summary())
        if request.rc not in (0, None):
            lines.append(f"    request: {request.stdin_text.strip()[:1500]}")
    return "\n".join(lines) or "(no plugin calls logged)"
