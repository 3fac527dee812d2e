"""Integration tests run our plugins both ways: ``launcher_dir`` is parametrized cold / warm (tests/plugin_modes.py)."""
from tests.plugin_modes import launcher_dir  # noqa: F401  (overrides tests/conftest.py's cold-only one)
