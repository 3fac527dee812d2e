"""Fixtures several unit test modules share."""

from __future__ import annotations

import time

import pytest

from ipam.cluster import filestore


class Clock:
    """A wall clock for the file store's expiry times that a test moves by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(filestore, "_wall_clock", c)
    return c
