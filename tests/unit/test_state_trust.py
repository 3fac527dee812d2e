"""The node's overlay state and the vxlan delegate cache are trusted only if root alone could write them.

The state (``<stateDir>/overlay.json``) tells a root process which subnet,
gateway and bridge to give pods; the delegate cache (``<stateDir>/vxlan/``)
tells DEL what to tear down. Both are written 0600 in 0700 directories, and a
file or directory owned by another uid, or writable by group or others, is
refused: by the vxlan plugin with a CNI error (code 5) naming the path and what
to do, by the agent with a warning (its previous lease is not reused) or an
error (it will not write there). Another uid is simulated with os.chown to
65534 (nobody); no user is added. Runs as root (the files are chowned).
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat

import pytest

from cni_plugins.shared.overlaystate import OverlayState, OverlayStateError, read_state, state_path, write_state
from cni_plugins.spec.errors import ERR_IO, ERR_PLUGIN_NOT_AVAILABLE, CNIError
from cni_plugins.spec.skel import CmdArgs, dispatch
from cni_plugins.vxlan import FUNCS as VXLAN_FUNCS
from cni_plugins.vxlan import cache
from cni_plugins.vxlan import plugin as vxlan_plugin

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (files are chowned to another uid)")

NOBODY = 65534
STATE = OverlayState(
    network="10.244.0.0/16",
    subnet="10.244.3.0/24",
    gateway="10.244.3.1",
    mtu=1450,
    bridge="pycni0",
    vxlan_device="pycni.1",
    vni=1,
    public_ip="192.168.100.11",
    vtep_mac="0a:00:00:00:00:0b",
)


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def conf(tmp_path) -> dict:
    return {
        "cniVersion": "1.0.0",
        "name": "overlay",
        "type": "vxlan",
        "stateDir": str(tmp_path / "state"),
        "dataDir": str(tmp_path / "data"),
    }


def request(tmp_path, command="ADD") -> CmdArgs:
    c = conf(tmp_path)
    return CmdArgs(
        command=command,
        container_id="ctr1",
        netns="/run/netns/pod",
        ifname="eth0",
        path="/opt/cni/bin",
        stdin_data=json.dumps(c).encode(),
        conf=c,
        cni_version="1.0.0",
    )


@pytest.fixture
def no_bridge(monkeypatch):
    """The bridge delegate replaced by a recorder: these tests are about what the plugin reads."""
    calls = []

    def fake(req, plugin_type, conf, command=None):
        calls.append(command)
        if command == "ADD":
            from cni_plugins.spec.types import Result

            return Result.from_dict(
                {"cniVersion": conf["cniVersion"], "ips": [{"address": "10.244.3.2/24", "gateway": "10.244.3.1"}]},
                conf["cniVersion"],
            )
        return None

    monkeypatch.setattr(vxlan_plugin, "run_in_process", fake)
    return calls


# ---- modes after writing --------------------------------------------------------------------------


def test_the_state_is_written_0600_in_a_0700_directory(tmp_path):
    state_dir = tmp_path / "run" / "pycni"
    path = write_state(str(state_dir), STATE)
    assert mode(state_dir) == 0o700
    assert mode(path) == 0o600
    write_state(str(state_dir), STATE)  # a rewrite keeps them
    assert (mode(state_dir), mode(path)) == (0o700, 0o600)


def test_the_delegate_cache_is_written_0600_in_a_0700_directory(tmp_path):
    state_dir = tmp_path / "state"
    write_state(str(state_dir), STATE)
    path = cache.save(str(state_dir), "overlay", "ctr1", "eth0", {"type": "bridge"})
    assert mode(state_dir / "vxlan") == 0o700
    assert mode(path) == 0o600


def test_an_older_0755_state_directory_of_root_is_tightened_not_refused(tmp_path, caplog):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    os.chmod(state_dir, 0o755)
    (state_dir / "vxlan").mkdir()
    os.chmod(state_dir / "vxlan", 0o755)
    old = state_dir / "overlay.json"  # an older agent's 0644 file is still read...
    old.write_text(json.dumps(STATE.to_dict()))
    os.chmod(old, 0o644)
    assert read_state(str(state_dir)) == STATE
    with caplog.at_level(logging.WARNING, logger="pycni.state"):
        write_state(str(state_dir), STATE)  # ...and replaced by a 0600 one
    assert (mode(state_dir), mode(old)) == (0o700, 0o600)
    assert any(
        "tightened the state directory" in r.getMessage() and str(state_dir) in r.getMessage() for r in caplog.records
    )
    cache.save(str(state_dir), "overlay", "ctr1", "eth0", {"type": "bridge"})
    assert mode(state_dir / "vxlan") == 0o700


# ---- the state file: refused when someone else could have written it -------------------------------


def _foreign_state_file(tmp_path):
    state_dir = tmp_path / "state"
    path = write_state(str(state_dir), STATE)
    os.chown(path, NOBODY, -1)
    return state_dir, path


@pytest.mark.parametrize(
    "tamper, problem",
    [
        (lambda p: os.chown(p, NOBODY, -1), f"is owned by uid {NOBODY}, not by root"),
        (lambda p: os.chmod(p, 0o620), "is writable by group (mode 0620)"),
        (lambda p: os.chmod(p, 0o646), "is writable by others (mode 0646)"),
    ],
)
def test_a_state_file_someone_else_could_write_is_refused(tmp_path, tamper, problem):
    state_dir = tmp_path / "state"
    path = write_state(str(state_dir), STATE)
    tamper(path)
    with pytest.raises(OverlayStateError) as info:
        read_state(str(state_dir))
    assert f"{path} {problem}" in str(info.value)
    assert "remove" in str(info.value) and "node agent" in str(info.value)  # what to do


@pytest.mark.parametrize(
    "tamper, problem",
    [
        (lambda p: os.chown(p, NOBODY, -1), f"is owned by uid {NOBODY}, not by root"),
        (lambda p: os.chmod(p, 0o777), "is writable by group and others (mode 0777)"),
    ],
)
def test_a_state_directory_someone_else_could_write_is_refused_by_reader_and_writer(tmp_path, tamper, problem):
    state_dir = tmp_path / "state"
    write_state(str(state_dir), STATE)
    tamper(state_dir)
    with pytest.raises(OverlayStateError, match=re.escape(f"{state_dir} {problem}") + ".*chown root:root"):
        read_state(str(state_dir))
    with pytest.raises(OverlayStateError, match=re.escape(f"{state_dir} {problem}")):
        write_state(str(state_dir), STATE)
    assert json.loads((state_dir / "overlay.json").read_text()) == STATE.to_dict()  # nothing was written


def test_a_symlinked_state_directory_is_not_followed(tmp_path):
    write_state(str(tmp_path / "real"), STATE)
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(OverlayStateError, match="symbolic link"):
        read_state(str(tmp_path / "link"))
    with pytest.raises(OverlayStateError, match="symbolic link"):
        write_state(str(tmp_path / "link"), STATE)


def test_the_vxlan_plugin_refuses_a_foreign_state_file_with_a_cni_error(tmp_path, no_bridge):
    _state_dir, path = _foreign_state_file(tmp_path)
    with pytest.raises(CNIError) as info:
        vxlan_plugin.cmd_add(request(tmp_path))
    assert info.value.code == ERR_IO
    assert f"{path} is owned by uid {NOBODY}, not by root" in info.value.msg
    assert f"remove {path}" in info.value.msg
    assert no_bridge == [] and not os.path.exists(tmp_path / "state" / "vxlan")  # nothing was done

    # The same through the skeleton, as a runtime sees it: a spec error object on stdout.
    env = {"CNI_COMMAND": "STATUS", "CNI_PATH": "/opt/cni/bin"}
    outcome = dispatch(VXLAN_FUNCS, env, json.dumps({**conf(tmp_path), "cniVersion": "1.1.0"}).encode())
    assert outcome.exit_code == 1, outcome
    error = json.loads(outcome.stdout)
    assert error["code"] == ERR_PLUGIN_NOT_AVAILABLE and str(path) in error["msg"] and "uid 65534" in error["msg"]


def test_the_agent_does_not_reuse_a_foreign_state_file(tmp_path, caplog):
    from ipam.cluster import ClusterConfig
    from pycni.overlay.node import OverlayNode, OverlayOptions

    state_dir, path = _foreign_state_file(tmp_path)
    node = OverlayNode(
        OverlayOptions(store_url="file:///nonexistent", public_ip="192.168.100.11", state_dir=str(state_dir))
    )
    with caplog.at_level(logging.WARNING, logger="pycni.overlay"):
        assert node._previous_lease(ClusterConfig(network="10.244.0.0/16")) is None
    assert any(f"{path} is owned by uid {NOBODY}" in r.getMessage() for r in caplog.records)
    # Its next write replaces the file (a rename) with root's own.
    write_state(str(state_dir), STATE)
    info = os.lstat(path)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o600)
    assert read_state(str(state_dir)) == STATE


# ---- the delegate cache ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tamper, problem",
    [
        (lambda p: os.chown(p, NOBODY, -1), f"is owned by uid {NOBODY}, not by root"),
        (lambda p: os.chmod(p, 0o666), "is writable by group and others (mode 0666)"),
    ],
)
def test_a_cached_delegate_someone_else_could_write_is_refused(tmp_path, no_bridge, tamper, problem):
    state_dir = tmp_path / "state"
    write_state(str(state_dir), STATE)
    vxlan_plugin.cmd_add(request(tmp_path))
    entry = cache.load(str(state_dir), "overlay", "ctr1", "eth0")
    tamper(entry.path)
    for call in (
        lambda: vxlan_plugin.cmd_del(request(tmp_path, "DEL")),
        lambda: cache.load(str(state_dir), "overlay", "ctr1", "eth0"),
        lambda: list(cache.entries(str(state_dir), "overlay")),
    ):
        with pytest.raises(CNIError) as info:
            call()
        assert info.value.code == ERR_IO
        assert f"{entry.path} {problem}" in info.value.msg
        assert f"remove {entry.path}" in info.value.details
    assert no_bridge == ["ADD"]  # DEL never ran the bridge with a delegate someone else may have written


def test_a_cache_directory_of_another_uid_is_refused(tmp_path, no_bridge):
    state_dir = tmp_path / "state"
    write_state(str(state_dir), STATE)
    vxlan_plugin.cmd_add(request(tmp_path))
    os.chown(state_dir / "vxlan", NOBODY, -1)
    with pytest.raises(CNIError) as info:
        vxlan_plugin.cmd_del(request(tmp_path, "DEL"))
    assert info.value.code == ERR_IO
    assert f"{state_dir / 'vxlan'} is owned by uid {NOBODY}" in info.value.msg
    assert "chown root:root" in info.value.details
    with pytest.raises(CNIError, match=f"uid {NOBODY}"):
        cache.save(str(state_dir), "overlay", "ctr2", "eth0", {"type": "bridge"})
    assert state_path(str(state_dir))  # the state itself is still fine
    assert read_state(str(state_dir)) == STATE
