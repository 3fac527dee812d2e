"""A pytest run stopped with SIGTERM still tears its fixtures down (tests/conftest.py's handler).

Each case runs a small test file in a pytest process of its own (pytester) with the project's conftest
as a plugin; the fixture leaves a mark once its teardown has completed.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["pytester"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROBE = """
import os, signal, threading, time
import pytest

MARKS = {marks!r}

def mark(name):
    open(os.path.join(MARKS, name), "w").close()

@pytest.fixture
def resource():
    yield
    {in_teardown}
    time.sleep(0.5)  # a teardown that takes a moment
    mark("torn-down")

def test_first(resource):
    {in_test}

def test_second():
    mark("second-ran")
"""


def _run(pytester: pytest.Pytester, in_test: str = "pass", in_teardown: str = "pass") -> tuple[object, str]:
    marks = str(pytester.path / "marks")
    os.makedirs(marks)
    pytester.makepyfile(test_probe=PROBE.format(marks=marks, in_test=in_test, in_teardown=in_teardown))
    pytester.syspathinsert(ROOT)
    return pytester.runpytest_subprocess("-p", "tests.conftest", "-p", "no:cacheprovider", timeout=60), marks


def test_sigterm_during_a_test_interrupts_it_and_tears_down(pytester: pytest.Pytester):
    result, marks = _run(pytester, in_test="os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)")
    out = result.stdout.str()
    assert result.ret == pytest.ExitCode.INTERRUPTED and "pytest got SIGTERM" in out, out
    assert os.path.exists(os.path.join(marks, "torn-down")), out
    assert not os.path.exists(os.path.join(marks, "second-ran")), out


def test_sigterm_during_a_teardown_lets_it_finish_then_stops(pytester: pytest.Pytester):
    # Sent 0.1 s into the 0.5 s teardown, and a second one after it: neither cuts the teardown short.
    send = "threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start(); "
    send += "threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()"
    result, marks = _run(pytester, in_teardown=send)
    out = result.stdout.str()
    assert os.path.exists(os.path.join(marks, "torn-down")), out
    assert "Interrupted: pytest got SIGTERM" in out, out
    assert not os.path.exists(os.path.join(marks, "second-ran")), out
