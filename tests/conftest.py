"""Markers, the root check, and the shared fixtures (see tests/helpers).

Markers (also listed in setup.cfg):
  integration  needs root and network namespaces
  e2e          drives real runtimes
  multinode    several node namespaces / agents
  etcd         starts etcd
Tests carrying any of them are skipped, with the reason, when not run as root,
so test files need no `skipif(os.geteuid() != 0)` of their own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable, Iterator

import pytest

from tests.helpers.netenv import Node, Pod, temporary_node, temporary_pod
from tests.helpers.plugins import launchers

# PYCNI_STRICT_SKIPS=1 (CI): a skip for a reason that does not belong to the machine fails the session.
pytest_plugins = ["tests.skip_policy"]

MARKERS = {
    "integration": "needs root and network namespaces",
    "e2e": "drives real runtimes",
    "multinode": "several node namespaces / agents",
    "etcd": "starts etcd",
}
NEEDS_ROOT = ("integration", "e2e", "multinode", "etcd")


def pytest_configure(config: pytest.Config) -> None:
    for name, meaning in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")
    # A run stopped with SIGTERM (a timeout, a supervisor, tools/mutate.py) tears its fixtures down as on
    # Ctrl-C: namespaces, agents and etcd go, instead of staying pinned on the machine.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


# SIGTERM: a test being set up or run is interrupted (KeyboardInterrupt: pytest then tears everything
# down); one arriving while fixtures are torn down lets that teardown finish and stops the session after
# it. Only the first counts: another must not cut a teardown short.
_SIGTERM = {"session": None, "tearing_down": False}


def _on_sigterm(signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    why = f"pytest got {signal.Signals(signum).name}"
    session = _SIGTERM["session"]
    if _SIGTERM["tearing_down"] and session is not None:
        session.shouldstop = why
        return
    raise KeyboardInterrupt(why)


def pytest_sessionstart(session: pytest.Session) -> None:
    _SIGTERM["session"] = session


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    _SIGTERM["tearing_down"] = True  # module and session fixtures end here too, with their last test
    try:
        yield
    finally:
        _SIGTERM["tearing_down"] = False


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish() -> Iterator[None]:
    _SIGTERM["tearing_down"] = True  # what is still set up is torn down now
    yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    for item in items:
        needs = [name for name in NEEDS_ROOT if item.get_closest_marker(name)]
        if needs:
            item.add_marker(
                pytest.mark.skip(reason=f"marked {', '.join(needs)}: needs root to create network namespaces")
            )


@pytest.fixture(scope="session")
def launcher_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A CNI bin dir with an executable for each of our plugins, as `pycni install` writes them."""
    return launchers(tmp_path_factory)


@pytest.fixture
def make_node(tmp_path) -> Iterator[Callable[..., Node]]:
    """make_node(tag="node", cni_path=REFERENCE_DIR) -> a fresh Node; all of them (and their pods)
    are deleted when the test ends, also when it fails."""
    with contextlib.ExitStack() as stack:
        yield lambda tag="node", **kwargs: stack.enter_context(temporary_node(tag, root=tmp_path, **kwargs))


@pytest.fixture
def make_pod() -> Iterator[Callable[..., Pod]]:
    """make_pod(tag="pod") -> a fresh Pod not tied to a node; deleted when the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda tag="pod": stack.enter_context(temporary_pod(tag))


@pytest.fixture
def node(make_node) -> Node:
    """One node namespace with its directories."""
    return make_node()
