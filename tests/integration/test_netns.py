"""netns against the real kernel and iproute2. Root only.

Everything happens in namespaces these tests create (random names, removed in
finally); the root namespace is only read.
"""

from __future__ import annotations

import os
import threading

import pytest

import netns
from tests.helpers.netenv import netns_list, sh

pytestmark = pytest.mark.integration


def _unique(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


def _ns_inode(path: str) -> int:
    return os.stat(path).st_ino


@pytest.fixture(autouse=True)
def stays_in_root_namespace():
    """Every test must leave the test thread in the namespace it started in."""
    before = _ns_inode(netns.current_path())
    yield
    assert _ns_inode(netns.current_path()) == before


@pytest.fixture
def make_ns(make_pod):
    """make_ns() -> the name of a fresh namespace (made with netns.create), removed after the test."""
    return lambda: make_pod("ns").name


def test_create_list_exists_and_ip_netns_sees_it(make_ns):
    name = make_ns()
    path = netns.path_of(name)
    assert path == f"/var/run/netns/{name}"
    assert netns.exists(name)
    # One listing, judged on its own: other tests (another copy of the suite too) create and delete
    # namespaces at any moment, so two listings of the machine-wide directory need not agree.
    names = netns.list_names()
    assert name in names
    assert names == sorted(names)
    assert netns.is_netns(path)
    assert name in netns_list()
    # A fresh namespace, not a second name for ours.
    assert _ns_inode(path) != _ns_inode(netns.current_path())


def test_ip_netns_exec_works_and_loopback_is_down(make_ns):
    name = make_ns()
    out = sh("ip", "netns", "exec", name, "ip", "-o", "link").stdout
    lines = out.splitlines()
    assert len(lines) == 1 and ": lo:" in lines[0]
    assert "state DOWN" in lines[0]


def test_create_existing_name_fails_and_keeps_the_original(make_ns):
    name = make_ns()
    inode = _ns_inode(netns.path_of(name))
    with pytest.raises(netns.NetnsExistsError, match=name):
        netns.create(name)
    assert _ns_inode(netns.path_of(name)) == inode


def test_failed_create_removes_the_file(monkeypatch):
    from netns import lifecycle

    def broken_pin(path):
        raise netns.NetnsError("injected failure")

    monkeypatch.setattr(lifecycle, "_pin_new_netns", broken_pin)
    name = _unique("pt")
    with pytest.raises(netns.NetnsError, match="injected"):
        netns.create(name)
    assert not netns.exists(name)


def test_enter_switches_and_pyroute2_works_inside(make_ns):
    from pyroute2 import IPRoute

    name = make_ns()
    suffix = os.urandom(3).hex()
    veth, peer = f"pta{suffix}", f"ptb{suffix}"
    with netns.enter(name) as path:
        assert path == netns.path_of(name)
        assert _ns_inode(netns.current_path()) == _ns_inode(path)
        with IPRoute() as ipr:
            ipr.link("add", ifname=veth, kind="veth", peer=peer)
            assert ipr.link_lookup(ifname=veth)
    inside = sh("ip", "-n", name, "-o", "link").stdout
    assert veth in inside and peer in inside
    # Only read the root namespace: the pair must not be there.
    assert sh("ip", "link", "show", "dev", veth, check=False).returncode != 0
    assert sh("ip", "link", "show", "dev", peer, check=False).returncode != 0


def test_enter_comes_back_after_exception(make_ns):
    name = make_ns()
    before = _ns_inode(netns.current_path())
    with pytest.raises(RuntimeError, match="inside"):
        with netns.enter(name):
            assert _ns_inode(netns.current_path()) == _ns_inode(netns.path_of(name))
            raise RuntimeError("inside")
    assert _ns_inode(netns.current_path()) == before


def test_enter_nests(make_ns):
    outer, inner = make_ns(), make_ns()
    root = _ns_inode(netns.current_path())
    with netns.enter(outer):
        with netns.enter(netns.path_of(inner)):
            assert _ns_inode(netns.current_path()) == _ns_inode(netns.path_of(inner))
        assert _ns_inode(netns.current_path()) == _ns_inode(netns.path_of(outer))
    assert _ns_inode(netns.current_path()) == root


def test_threads_enter_different_namespaces_concurrently(make_ns):
    names = [make_ns(), make_ns()]
    markers = {}
    for name in names:
        marker = f"ptm{os.urandom(3).hex()}"
        sh("ip", "-n", name, "link", "add", marker, "type", "veth", "peer", "name", marker + "p")
        markers[name] = marker
    root = _ns_inode(netns.current_path())
    all_inside = threading.Barrier(len(names) + 1, timeout=20)
    results: dict[str, object] = {}

    def work(name: str) -> None:
        try:
            from pyroute2 import IPRoute

            with netns.enter(name):
                all_inside.wait()  # both threads are inside at the same time
                with IPRoute() as ipr:
                    seen = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
                results[name] = (_ns_inode(netns.current_path()), seen)
                all_inside.wait()
            results[name + ":after"] = _ns_inode(netns.current_path())
        except BaseException as err:  # reported by the main thread
            all_inside.abort()
            results[name] = err

    workers = [threading.Thread(target=work, args=(name,)) for name in names]
    for worker in workers:
        worker.start()
    all_inside.wait()
    # The other threads' switches do not move this one.
    assert _ns_inode(netns.current_path()) == root
    all_inside.wait()
    for worker in workers:
        worker.join(timeout=20)
        assert not worker.is_alive()
    for name, other in (names, names[::-1]):
        result = results[name]
        assert not isinstance(result, BaseException), result
        inode, seen = result
        assert inode == _ns_inode(netns.path_of(name))
        assert markers[name] in seen and markers[other] not in seen
        assert results[name + ":after"] == root


def test_run_in_returns_the_result(make_ns):
    name = make_ns()

    def where(offset, *, scale):
        return _ns_inode(netns.current_path()) * scale + offset

    assert netns.run_in(name, where, 0, scale=1) == _ns_inode(netns.path_of(name))
    with pytest.raises(ZeroDivisionError):
        netns.run_in(name, lambda: 1 / 0)


def test_delete_is_idempotent():
    name = _unique("pt")
    path = netns.create(name)
    netns.delete(name)
    assert not netns.exists(name)
    assert name not in netns_list()
    netns.delete(name)
    netns.delete(path)  # by absolute path, too


def test_delete_by_path_and_refuses_non_pins(make_ns, tmp_path):
    name = make_ns()
    netns.delete(netns.path_of(name))
    assert not os.path.lexists(netns.path_of(name))
    precious = tmp_path / "precious"
    precious.write_text("keep me")
    with pytest.raises(netns.NotNetnsError):
        netns.delete(str(precious))
    assert precious.read_text() == "keep me"
    with pytest.raises(netns.NotNetnsError):
        netns.delete(netns.current_path())


def test_temporary_cleans_up_even_when_body_raises():
    with pytest.raises(RuntimeError):
        with netns.temporary("pt") as ns:
            kept = ns
            assert ns.name.startswith("pt-") and len(ns.name) == len("pt-") + 8
            assert ns.path == netns.path_of(ns.name)
            assert os.fspath(ns) == ns.path
            assert ns.name in netns_list()
            assert ns.run(lambda: _ns_inode(netns.current_path())) == _ns_inode(ns.path)
            raise RuntimeError("boom")
    assert not netns.exists(kept.name)
    assert kept.name not in netns_list()


def test_temporary_names_are_unique():
    with netns.temporary("pt") as first, netns.temporary("pt") as second:
        assert first.name != second.name
        assert _ns_inode(first.path) != _ns_inode(second.path)
    assert not netns.exists(first.name) and not netns.exists(second.name)


def test_failed_restore_is_fatal_and_loud(make_ns, monkeypatch, caplog):
    """Run in a throwaway thread: after a failed restore that thread is stranded."""
    from netns import _sys

    name = make_ns()
    real_setns = _sys.setns
    calls = []
    outcome: dict[str, object] = {}

    def setns_failing_on_restore(fd, nstype):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(1, "Operation not permitted")
        real_setns(fd, nstype)

    def stranded() -> None:
        try:
            with netns.enter(name):
                pass
        except BaseException as err:
            outcome["error"] = err
        outcome["inode"] = _ns_inode(netns.current_path())

    monkeypatch.setattr(_sys, "setns", setns_failing_on_restore)
    worker = threading.Thread(target=stranded)
    worker.start()
    worker.join(timeout=20)
    monkeypatch.undo()
    assert isinstance(outcome["error"], netns.NetnsRestoreError)
    assert "WRONG network namespace" in outcome["error"].msg
    assert outcome["inode"] == _ns_inode(netns.path_of(name))
    assert any("FATAL" in record.message for record in caplog.records)
