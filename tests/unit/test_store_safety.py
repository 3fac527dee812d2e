"""No residue and no symbolic links: host-local's store and the file lock under hostile conditions.

Every write in host-local's store goes through a temporary file; these tests
break the write at each step (a refused request, an exception between write
and link, an interrupted write, a killed writer) and look for what is left.
Links planted in the data directory (the lock, the network's directory, a
reservation's name) are refused with a clear error and nothing is written
through them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cni_plugins.kernel import locks
from cni_plugins.spec.errors import ERR_INVALID_ENV, ERR_IO, CNIError
from ipam import host_local
from ipam import store as store_mod
from ipam.store import TMP_PREFIX, DiskStore


def conf_for(data_dir, name="net1", version="1.1.0", **ipam):
    section = {"type": "host-local", "dataDir": str(data_dir), "subnet": "10.10.0.0/29", **ipam}
    return {"cniVersion": version, "name": name, "type": "bridge", "ipam": section}


def listing(path) -> list[str]:
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def temp_files(path) -> list[str]:
    return [name for name in listing(path) if name.startswith(TMP_PREFIX)]


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(10)
    return proc.pid


# ---- temporary files are removed on every path ---------------------------------------------


def test_refused_request_leaves_no_temp_file(tmp_path):
    conf = conf_for(tmp_path)
    host_local.allocate(conf, "c1", "eth0", "IP=10.10.0.3")
    with pytest.raises(CNIError):
        host_local.allocate(conf, "c2", "eth0", "IP=10.10.0.3")  # taken: the link step fails
    assert temp_files(tmp_path / "net1") == []
    assert listing(tmp_path / "net1") == ["10.10.0.3", "last_reserved_ip.0", "lock"]


def test_exception_between_write_and_link_removes_the_temp_file(tmp_path, monkeypatch):
    conf = conf_for(tmp_path)
    host_local.allocate(conf, "c0", "eth0")  # the directory and lock exist
    before = listing(tmp_path / "net1")

    def broken_link(*args, **kwargs):
        raise RuntimeError("interrupted between write and link")

    monkeypatch.setattr(store_mod.os, "link", broken_link)
    with pytest.raises(RuntimeError):
        host_local.allocate(conf, "c1", "eth0")
    assert listing(tmp_path / "net1") == before


def test_interrupted_write_removes_the_temp_file(tmp_path, monkeypatch):
    conf = conf_for(tmp_path)
    host_local.allocate(conf, "c0", "eth0")
    before = listing(tmp_path / "net1")

    def broken_write(fd, data):
        raise KeyboardInterrupt  # not an OSError: the cleanup must not depend on the kind

    monkeypatch.setattr(store_mod.os, "write", broken_write)
    with pytest.raises(KeyboardInterrupt):
        host_local.allocate(conf, "c1", "eth0")
    assert listing(tmp_path / "net1") == before


def test_failed_round_robin_file_undoes_the_reservation(tmp_path, monkeypatch):
    conf = conf_for(tmp_path)
    host_local.allocate(conf, "c0", "eth0")
    before = listing(tmp_path / "net1")

    def broken_replace(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod.os, "replace", broken_replace)
    with pytest.raises(CNIError) as info:
        host_local.allocate(conf, "c1", "eth0")
    assert info.value.code == ERR_IO
    assert listing(tmp_path / "net1") == before


@pytest.mark.parametrize("ifname", ["eth\udcff", "e\x00th"])
def test_interface_name_that_cannot_reach_a_file_is_refused_before_any_write(tmp_path, ifname):
    with pytest.raises(CNIError) as info:
        host_local.allocate(conf_for(tmp_path), "c1", ifname)
    assert info.value.code == ERR_INVALID_ENV
    assert not (tmp_path / "net1").exists()


def test_gc_removes_temp_files_of_dead_writers_and_old_ones_only(tmp_path):
    conf = conf_for(tmp_path)
    host_local.allocate(conf, "c1", "eth0")
    net = tmp_path / "net1"
    dead = net / f"{TMP_PREFIX}{dead_pid()}-0001"
    old = net / f"{TMP_PREFIX}1-0002"  # PID 1 runs, but nothing takes minutes to write
    garbage = net / f"{TMP_PREFIX}notapid"  # not one of ours by name: stale
    live = net / f"{TMP_PREFIX}{os.getpid()}-0003"  # a live writer's fresh file stays
    for path in (dead, old, garbage, live):
        path.write_text("10.10.0.9")
    os.utime(old, (1, 1))
    host_local.gc(conf, [("c1", "eth0")])
    assert temp_files(net) == [live.name]
    os.utime(live, (1, 1))
    host_local.gc(conf, [("c1", "eth0")])
    assert temp_files(net) == []
    assert "10.10.0.2" in listing(net)  # GC kept the valid attachment's address


# ---- nothing is opened through a link ------------------------------------------------------


def test_symlinked_lock_file_is_refused_and_nothing_is_written_through_it(tmp_path):
    net = tmp_path / "net1"
    net.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.chmod(victim, 0o600)
    (net / "lock").symlink_to(victim)
    stat_before = os.stat(victim)
    for call in (
        lambda: host_local.allocate(conf_for(tmp_path), "c1", "eth0"),
        lambda: host_local.release(conf_for(tmp_path), "c1", "eth0"),
        lambda: host_local.gc(conf_for(tmp_path), []),
    ):
        with pytest.raises(CNIError) as info:
            call()
        assert info.value.code == ERR_IO
        assert "symbolic link" in info.value.msg and str(net / "lock") in info.value.msg
    assert victim.read_text() == "precious\n"
    assert (os.stat(victim).st_mode, os.stat(victim).st_mtime_ns) == (stat_before.st_mode, stat_before.st_mtime_ns)
    assert listing(net) == ["lock"] and os.path.islink(net / "lock")


def test_symlinked_network_directory_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    (data / "net1").symlink_to(elsewhere, target_is_directory=True)
    for call in (
        lambda: host_local.allocate(conf_for(data), "c1", "eth0"),
        lambda: host_local.release(conf_for(data), "c1", "eth0"),
        lambda: host_local.check(conf_for(data), "c1", "eth0"),
    ):
        with pytest.raises(CNIError) as info:
            call()
        assert info.value.code == ERR_IO and "symbolic link" in info.value.msg, info.value.msg
    assert listing(elsewhere) == []  # no lock, no reservation, no temporary file made through the link
    assert host_local.gc(conf_for(data), []) == []  # GC: a link is no store of ours (it touches nothing)
    assert listing(elsewhere) == []


def test_data_dir_itself_may_be_a_link(tmp_path):
    """The operator's ipam.dataDir may be a link (e.g. /var/lib -> /data/var/lib); only what lies
    under it is never followed."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "data").symlink_to(real, target_is_directory=True)
    host_local.allocate(conf_for(tmp_path / "data"), "c1", "eth0")
    assert listing(real / "net1") == ["10.10.0.2", "last_reserved_ip.0", "lock"]


def test_planted_links_in_the_store_are_not_followed(tmp_path):
    conf = conf_for(tmp_path)
    host_local.allocate(conf, "c0", "eth0")
    net = tmp_path / "net1"
    victim = tmp_path / "victim"
    victim.write_bytes(b"c1\r\neth0")
    (net / "10.10.0.3").symlink_to(victim)  # a "reservation" pointing elsewhere
    os.unlink(net / "last_reserved_ip.0")
    (net / "last_reserved_ip.0").symlink_to(victim)  # the round-robin file too
    store = DiskStore("net1", str(tmp_path))
    assert [r.ip for r in store.reservations()] == ["10.10.0.2"]  # the link is not read as c1's
    assert store.last_reserved_ip(0) is None
    got = host_local.allocate(conf, "c1", "eth0").to_dict()["ips"][0]["address"]
    assert got == "10.10.0.4/29"  # the name is taken (by the link), but the link is not followed
    assert victim.read_bytes() == b"c1\r\neth0"
    assert not os.path.islink(net / "last_reserved_ip.0")  # replaced by a file, not written through
    host_local.release(conf, "c1", "eth0")
    assert victim.exists() and os.path.islink(net / "10.10.0.3")


def test_fifo_named_like_an_address_does_not_hang_a_read(tmp_path):
    conf = conf_for(tmp_path)
    host_local.allocate(conf, "c0", "eth0")
    os.mkfifo(tmp_path / "net1" / "10.10.0.5")
    store = DiskStore("net1", str(tmp_path))
    assert store.owner_of("10.10.0.5") is None  # not a file: nobody's, and the read never blocks
    assert [r.ip for r in store.reservations()] == ["10.10.0.2"]


def test_file_lock_refuses_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "locks" / "masq.lock"
    link.parent.mkdir()
    link.symlink_to(victim)
    with pytest.raises(CNIError) as info:
        with locks.file_lock(str(link), timeout=1):
            pass
    assert info.value.code == ERR_IO and "symbolic link" in info.value.msg
    assert victim.read_text() == "precious\n"
    # A dangling link is refused too (O_CREAT would otherwise create its target).
    dangling = tmp_path / "locks" / "other.lock"
    dangling.symlink_to(tmp_path / "created-through-the-link")
    with pytest.raises(CNIError):
        with locks.file_lock(str(dangling), timeout=1):
            pass
    assert not (tmp_path / "created-through-the-link").exists()
    with locks.file_lock(str(tmp_path / "locks" / "fine.lock"), timeout=1):
        assert (tmp_path / "locks" / "fine.lock").is_file()
