"""Integration tests run our plugins both ways: ``launcher_dir`` is parametrized cold / warm (tests/plugin_modes.py)."""

from tests.plugin_modes import launcher_dir  # noqa: F401  (overrides tests/conftest.py's cold-only one)

import os  # noqa: E402

import pytest  # noqa: E402

import netns  # noqa: E402


@pytest.fixture
def stays_in_its_namespace():
    """Fails the test if it leaves this thread in another network namespace than it found."""
    before = os.stat(netns.current_path()).st_ino
    yield
    assert os.stat(netns.current_path()).st_ino == before
