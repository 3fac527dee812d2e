"""`pycni netns add|list|exec|del`, the command line over the netns library, as real processes. Root only.

Every namespace has a fresh name of this test (pt-cli-<8 hex>) and is deleted in a finally, also when a
test fails; the machine's own namespace is only read (the inode of this process's namespace), and only
the test's own names are looked for in listings.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Iterator

import pytest

import netns
from tests.helpers.netenv import netns_list

pytestmark = pytest.mark.integration

PYCNI = os.path.join(os.path.dirname(sys.executable), "pycni")


def pycni_netns(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYCNI, "netns", *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


@pytest.fixture
def name() -> Iterator[str]:
    """A namespace name of this test; whatever exists under it at the end is deleted."""
    ns = f"pt-cli-{os.urandom(4).hex()}"
    try:
        yield ns
    finally:
        netns.delete(ns)


def test_add_prints_the_pinned_path_of_a_new_namespace_that_ip_netns_sees(name):
    done = pycni_netns("add", name)
    assert done.returncode == 0, done.stderr
    path = done.stdout.strip()
    assert path == netns.path_of(name) and os.path.exists(path)
    assert name in netns_list()  # `ip netns list`
    assert os.stat(path).st_ino != os.stat("/proc/self/ns/net").st_ino  # a namespace of its own
    links = subprocess.run(
        ["ip", "-n", name, "-o", "link", "show"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.splitlines()
    assert len(links) == 1 and ": lo:" in links[0] and "state DOWN" in links[0]
    # The same name again: an error on stderr, nothing on stdout, the namespace untouched.
    inode = os.stat(path).st_ino
    again = pycni_netns("add", name)
    assert again.returncode != 0 and again.stdout == "" and name in again.stderr, again
    assert "Traceback" not in again.stderr
    assert os.stat(path).st_ino == inode


def test_list_shows_the_names_one_per_line(name):
    assert name not in pycni_netns("list").stdout.splitlines()
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)  # made by the other tool
    listed = pycni_netns("list")
    assert listed.returncode == 0, listed.stderr
    assert name in listed.stdout.splitlines()


def test_exec_runs_inside_the_namespace_and_passes_the_exit_status_on(name):
    assert pycni_netns("add", name).returncode == 0
    path = netns.path_of(name)
    inside = pycni_netns("exec", name, "--", "readlink", "/proc/self/ns/net")
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.strip() == f"net:[{os.stat(path).st_ino}]"
    # A change made through exec is there, in that namespace only.
    assert pycni_netns("exec", name, "ip", "link", "set", "lo", "up").returncode == 0
    lo = subprocess.run(
        ["ip", "-n", name, "-o", "link", "show", "lo"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert "UP" in lo.split("<")[1].split(">")[0]
    assert pycni_netns("exec", name, "sh", "-c", "exit 7").returncode == 7
    assert pycni_netns("exec", name, "sh", "-c", "kill -TERM $$").returncode == 128 + 15
    missing = pycni_netns("exec", name, "no-such-command-pycni")
    assert missing.returncode == 127 and "command not found" in missing.stderr
    nowhere = pycni_netns("exec", f"{name}-absent", "true")
    assert nowhere.returncode != 0 and "Traceback" not in nowhere.stderr and nowhere.stderr.strip()


def test_del_removes_the_namespace_and_its_interfaces(name):
    assert pycni_netns("add", name).returncode == 0
    subprocess.run(
        ["ip", "-n", name, "link", "add", "cli0", "type", "veth", "peer", "name", "cli1"], check=True, timeout=30
    )
    done = pycni_netns("del", name)
    assert done.returncode == 0, done.stderr
    assert not os.path.exists(netns.path_of(name))
    assert name not in netns_list() and name not in pycni_netns("list").stdout.splitlines()
    # Deleting what is gone is no error (idempotent, as DEL is).
    again = pycni_netns("del", name)
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize("bad", ["../escape", "a/b", "", ".", "x" * 300])
def test_names_that_are_no_namespace_name_are_refused_and_nothing_is_made(bad):
    before = set(os.listdir(netns.RUN_DIR)) if os.path.isdir(netns.RUN_DIR) else set()
    done = pycni_netns("add", bad)
    assert done.returncode != 0 and done.stdout == "" and "Traceback" not in done.stderr, done
    after = set(os.listdir(netns.RUN_DIR)) if os.path.isdir(netns.RUN_DIR) else set()
    assert not {n for n in after - before if n in (bad, os.path.basename(bad))}
    assert not os.path.exists(os.path.join(os.path.dirname(netns.RUN_DIR.rstrip("/")), "escape"))
