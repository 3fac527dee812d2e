"""Rollback as data: what a failing ADD must take back, newest first."""

from __future__ import annotations

from typing import Any, Callable


class Undo:
    """A stack of (what, how) steps; ``run`` takes them back newest first and keeps going on failure."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        self._steps: list[tuple[str, Callable[[], Any]]] = []
        self._warn = warn

    def push(self, what: str, fn: Callable[[], Any]) -> None:
        self._steps.append((what, fn))

    def run(self) -> None:
        for what, fn in reversed(self._steps):
            try:
                fn()
            except Exception as exc:  # keep undoing; the original error is what the caller reports
                self._warn(f"rollback: {what} failed: {exc}")
        self._steps.clear()
