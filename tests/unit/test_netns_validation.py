"""netns: name rules, path resolution and telling network namespaces from other files.

No namespaces are created here; opening the test process's own namespace files
needs no privileges.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading

import pytest

import netns
from netns import check, lifecycle


@pytest.mark.parametrize("name", ["blue", "pt-0123abcd", "a" * 255, "with space", "..dots", ".hidden"])
def test_valid_names(name):
    assert netns.validate_name(name) == name


@pytest.mark.parametrize("name", ["", "a/b", "/abs", ".", "..", "a" * 256, "nul\0byte"])
def test_invalid_names(name):
    with pytest.raises(netns.InvalidNetnsNameError) as info:
        netns.validate_name(name)
    assert info.value.msg
    assert isinstance(info.value, ValueError)


def test_create_rejects_bad_name_before_touching_anything(monkeypatch):
    def touched(*args, **kwargs):
        pytest.fail("create() touched the file system before validating the name")

    monkeypatch.setattr(lifecycle, "_prepare_run_dir", touched)
    monkeypatch.setattr(lifecycle.os, "open", touched)
    with pytest.raises(netns.InvalidNetnsNameError):
        netns.create("../etc")
    with pytest.raises(netns.InvalidNetnsNameError):
        netns.create("x" * 256)


def test_temporary_rejects_bad_prefix():
    with pytest.raises(netns.InvalidNetnsNameError):
        with netns.temporary("bad/prefix"):
            pass


def test_path_of():
    assert netns.RUN_DIR == "/var/run/netns"
    assert netns.path_of("blue") == "/var/run/netns/blue"
    assert netns.path_of("/proc/1/ns/net") == "/proc/1/ns/net"
    assert netns.path_of(netns.Namespace("blue", "/somewhere/blue")) == "/somewhere/blue"
    with pytest.raises(netns.InvalidNetnsNameError, match="absolute path"):
        netns.path_of("relative/path")
    with pytest.raises(netns.InvalidNetnsNameError):
        netns.path_of("..")


def test_current_path_is_per_thread():
    seen = {}

    def record():
        seen["thread"] = netns.current_path()

    worker = threading.Thread(target=record)
    worker.start()
    worker.join()
    mine = netns.current_path()
    assert mine == f"/proc/self/task/{threading.get_native_id()}/ns/net"
    assert seen["thread"] != mine
    assert netns.is_netns(mine)


def test_own_network_namespace_is_netns():
    assert netns.is_netns("/proc/self/ns/net")
    netns.validate("/proc/self/ns/net")


def test_regular_file_is_not_netns(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("not a namespace")
    assert not netns.is_netns(str(plain))
    with pytest.raises(netns.NotNetnsError, match="not a network namespace") as info:
        netns.validate(str(plain))
    assert not isinstance(info.value, netns.NetnsNotFoundError)


def test_empty_file_hints_at_leftover_pin(tmp_path):
    empty = tmp_path / "empty"
    empty.touch()
    with pytest.raises(netns.NotNetnsError, match="empty file"):
        netns.validate(str(empty))


def test_mount_namespace_is_not_netns():
    assert not netns.is_netns("/proc/self/ns/mnt")
    with pytest.raises(netns.NotNetnsError, match="mnt namespace"):
        netns.validate("/proc/self/ns/mnt")


def test_missing_path(tmp_path):
    missing = str(tmp_path / "missing")
    assert not netns.is_netns(missing)
    with pytest.raises(netns.NetnsNotFoundError, match="does not exist"):
        netns.validate(missing)


def test_directory_and_fifo_are_not_netns(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert not netns.is_netns(str(tmp_path))
    assert not netns.is_netns(str(fifo))  # must not block waiting for a writer
    with pytest.raises(netns.NotNetnsError, match="FIFO"):
        netns.validate(str(fifo))


def test_fallback_without_ns_get_nstype_ioctl(monkeypatch, tmp_path):
    """Kernels before 4.11 lack NS_GET_NSTYPE: statfs + the fd's link name decide."""

    def no_ioctl(fd, request, *args):
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    monkeypatch.setattr(check.fcntl, "ioctl", no_ioctl)
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert netns.is_netns("/proc/self/ns/net")
    assert not netns.is_netns("/proc/self/ns/mnt")
    assert not netns.is_netns("/proc/self/status")  # on procfs, but not a namespace
    assert not netns.is_netns(str(plain))


def test_enter_refuses_non_namespaces_without_switching(tmp_path):
    before = os.stat(netns.current_path()).st_ino
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(netns.NotNetnsError):
        with netns.enter(str(plain)):
            pytest.fail("body must not run")
    with pytest.raises(netns.NetnsNotFoundError):
        netns.run_in(str(tmp_path / "missing"), lambda: None)
    assert os.stat(netns.current_path()).st_ino == before


def test_errors_carry_cni_codes():
    from cni_plugins.spec.errors import ERR_INVALID_NETNS, ERR_IO

    assert netns.NotNetnsError("x").code == ERR_INVALID_NETNS
    assert netns.NetnsNotFoundError("x").code == ERR_INVALID_NETNS
    assert netns.NetnsError("x").code == ERR_IO
    assert issubclass(netns.NetnsNotFoundError, netns.NotNetnsError)
    assert issubclass(netns.NetnsRestoreError, netns.NetnsError)
    assert netns.NetnsExistsError("boom").msg == "boom"


def test_import_is_light():
    code = "import sys, netns; print('pyroute2' in sys.modules, 'ctypes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
