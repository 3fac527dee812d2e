"""The `pycni` command line (click's test runner; fake plugins, no namespaces)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pycni.cli import cli, derived_container_id, netns_path

# A plugin that answers ADD with a fixed result, fails when told to, else succeeds.
FAKE = """#!/bin/sh
conf=$(cat)
echo "$CNI_COMMAND $CNI_CONTAINERID $CNI_IFNAME $CNI_NETNS" >> "$FAKE_LOG"
case "$conf" in *'"failme"'*)
  echo '{"cniVersion":"1.0.0","code":7,"msg":"bad bridge name","details":"use 15 chars"}'; exit 1;;
esac
case "$CNI_COMMAND $conf" in "STATUS "*'"notready"'*)
  echo '{"cniVersion":"1.1.0","code":50,"msg":"plugin not available","details":"no lease"}'; exit 1;;
"STATUS "*'"crashme"'*) exit 3;;
esac
if [ "$CNI_COMMAND" = ADD ]; then
  echo '{"cniVersion":"1.0.0","ips":[{"address":"10.7.0.2/24"}],"dns":{}}'
fi
"""


@pytest.fixture
def setup(tmp_path, monkeypatch):
    bin_dir, conf_dir, cache_dir = tmp_path / "bin", tmp_path / "net.d", tmp_path / "cache"
    bin_dir.mkdir()
    conf_dir.mkdir()
    plugin = bin_dir / "fake"
    plugin.write_text(FAKE)
    plugin.chmod(0o755)
    log = tmp_path / "log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    for name in ("CNI_ARGS", "CAP_ARGS", "CNI_IFNAME", "CNI_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETCONFPATH", str(conf_dir))
    monkeypatch.setenv("CNI_PATH", str(bin_dir))
    monkeypatch.setenv("CNI_CACHE_DIR", str(cache_dir))

    def network(name="clinet", version="1.0.0", **plugin_extra):
        (conf_dir / f"{name}.conflist").write_text(
            json.dumps({"cniVersion": version, "name": name, "plugins": [{"type": "fake", **plugin_extra}]})
        )

    def log_lines():
        return log.read_text().splitlines() if log.exists() else []

    return {"network": network, "log": log_lines, "cache": cache_dir, "conf": conf_dir, "bin": bin_dir}


def run(*args, **kwargs):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False, **kwargs)


def test_container_id_matches_cnitool():
    path = "/var/run/netns/testing"
    assert derived_container_id(path) == "cnitool-" + hashlib.sha512(path.encode()).hexdigest()[:20]
    assert len(derived_container_id(path)) == len("cnitool-") + 20


def test_netns_name_or_path():
    assert netns_path("pod1") == "/var/run/netns/pod1"
    assert netns_path("/proc/1/ns/net") == "/proc/1/ns/net"
    assert netns_path("./ns") == os.path.abspath("ns")


def test_add_check_del(setup):
    setup["network"]()
    result = run("add", "clinet", "pod1")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["ips"][0]["address"] == "10.7.0.2/24"
    assert result.stdout.startswith("{\n    ")
    cid = derived_container_id("/var/run/netns/pod1")
    assert setup["log"]() == [f"ADD {cid} eth0 /var/run/netns/pod1"]
    assert (setup["cache"] / "results" / f"clinet-{cid}-eth0").exists()
    assert run("check", "clinet", "pod1").exit_code == 0
    assert run("del", "clinet", "pod1").exit_code == 0
    assert run("del", "clinet", "pod1").exit_code == 0
    assert [line.split()[0] for line in setup["log"]()] == ["ADD", "CHECK", "DEL", "DEL"]
    assert not (setup["cache"] / "results" / f"clinet-{cid}-eth0").exists()


def test_options_and_environment(setup, monkeypatch):
    setup["network"]()
    monkeypatch.setenv("CNI_IFNAME", "net5")
    result = run("add", "clinet", "/proc/1/ns/net", "--container-id", "abc")
    assert result.exit_code == 0, result.stderr
    assert setup["log"]() == ["ADD abc net5 /proc/1/ns/net"]
    result = run("del", "clinet", "/proc/1/ns/net", "--container-id", "abc", "-i", "net5")
    assert result.exit_code == 0
    assert setup["log"]()[1] == "DEL abc net5 /proc/1/ns/net"


@pytest.mark.parametrize("option", [["--container-id", "../etc"], ["-i", "a/b"], ["-i", "x" * 16]])
def test_bad_container_id_or_ifname_runs_no_plugin(setup, option):
    setup["network"]()
    result = run("add", "clinet", "pod1", *option)
    assert result.exit_code == 1 and result.stdout == ""
    assert "(CNI code 4)" in result.stderr
    assert setup["log"]() == []


def test_plugin_error_goes_to_stderr_with_code(setup):
    setup["network"](bridge="failme")
    result = run("add", "clinet", "pod1")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "Error: plugin 'fake' failed (ADD): bad bridge name; use 15 chars (CNI code 7)" in result.stderr


def test_config_errors_are_reported(setup):
    (setup["conf"] / "bad.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "badnet", "plugins": [{"type": "../../bin/sh"}]})
    )
    result = run("add", "badnet", "pod1")
    assert result.exit_code == 1 and result.stdout == ""
    assert "field 'plugins[0].type'" in result.stderr and "(CNI code 7)" in result.stderr
    assert setup["log"]() == []
    result = run("add", "nonet", "pod1")
    assert result.exit_code == 1 and "no network named 'nonet'" in result.stderr


def test_bad_cap_args_and_cni_args(setup):
    setup["network"]()
    result = run("add", "clinet", "pod1", env={"CAP_ARGS": "{nope"})
    assert result.exit_code == 1 and "CAP_ARGS is not valid JSON" in result.stderr
    result = run("add", "clinet", "pod1", env={"CAP_ARGS": "[1]"})
    assert result.exit_code == 1 and "JSON object" in result.stderr
    result = run("add", "clinet", "pod1", env={"CNI_ARGS": "A=1;broken"})
    assert result.exit_code == 1 and "invalid pair 'broken'" in result.stderr
    assert setup["log"]() == []


def test_check_without_add_fails(setup):
    setup["network"]()
    result = run("check", "clinet", "pod1")
    assert result.exit_code == 1 and "could not retrieve cached result" in result.stderr


def test_gc_and_status(setup):
    setup["network"](version="1.1.0")
    assert run("add", "clinet", "pod1").exit_code == 0
    assert run("add", "clinet", "pod2").exit_code == 0
    keep = derived_container_id("/var/run/netns/pod1")
    result = run("gc", "clinet", "--valid", keep)
    assert result.exit_code == 0, result.stderr
    assert f"deleted stale attachment {derived_container_id('/var/run/netns/pod2')} eth0" in result.stdout
    assert "GC sent to fake with 1 valid attachment(s)" in result.stdout
    assert os.listdir(setup["cache"] / "results") == [f"clinet-{keep}-eth0"]
    result = run("status", "clinet")
    assert result.exit_code == 0 and "ready" in result.stdout
    # NETNS is accepted for cnitool compatibility.
    assert run("status", "clinet", "pod1").exit_code == 0


def test_help_texts_explain_environment():
    for command in ("add", "check", "del"):
        text = run(command, "--help").stdout
        for word in ("NETCONFPATH", "CNI_PATH", "CNI_ARGS", "CAP_ARGS", "CNI_IFNAME", "--container-id"):
            assert word in text
    assert "CONTAINER_ID[:IFNAME]" in run("gc", "--help").stdout
    for command in ("gc", "status"):
        text = run(command, "--help").stdout
        for word in ("NETCONFPATH", "CNI_PATH", "CNI_CACHE_DIR"):
            assert word in text
        assert "CNI_ARGS" not in text
    top = run("--help").stdout
    for command in ("add", "check", "del", "gc", "status", "netns", "install", "version"):
        assert command in top
    assert "exec" in run("netns", "--help").stdout


def test_version():
    result = run("version")
    assert result.exit_code == 0
    assert "1.1.0" in result.stdout and "loopback" in result.stdout and result.stdout.startswith("pycni ")


def test_version_option_prints_the_package_version():
    from importlib.metadata import version

    result = run("--version")
    assert result.exit_code == 0 and result.stdout == f"pycni {version('pycni')}\n"
    assert "--version" in run("--help").stdout
    # The installed command, as an operator runs it.
    pycni = os.path.join(os.path.dirname(sys.executable), "pycni")
    done = subprocess.run([pycni, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == f"pycni {version('pycni')}\n"


def test_status_exit_codes_tell_ready_from_not_ready_from_could_not_ask(setup):
    setup["network"](version="1.1.0")
    ready = run("status", "clinet")
    assert ready.exit_code == 0 and "is ready (fake)" in ready.stdout
    # Not ready: the plugin answered with an error (its message and code on stderr).
    setup["network"](name="down", version="1.1.0", mode="notready")
    down = run("status", "down")
    assert down.exit_code == 1 and down.stdout == ""
    assert "plugin not available; no lease (CNI code 50)" in down.stderr
    setup["network"](name="crash", version="1.1.0", mode="crashme")
    assert run("status", "crash").exit_code == 1
    # Could not ask: no STATUS before 1.1.0, no such network, no such plugin, a plugin that cannot run.
    setup["network"](name="old", version="1.0.0")
    old = run("status", "old")
    assert old.exit_code == 2 and "STATUS not supported" in old.stderr and "1.1.0" in old.stderr
    missing = run("status", "nonet")
    assert missing.exit_code == 2 and "no network named 'nonet'" in missing.stderr
    (setup["conf"] / "ghost.conflist").write_text(
        json.dumps({"cniVersion": "1.1.0", "name": "ghost", "plugins": [{"type": "nosuchplugin"}]})
    )
    ghost = run("status", "ghost")
    assert ghost.exit_code == 2 and "nosuchplugin" in ghost.stderr
    broken = setup["bin"] / "broken"
    broken.write_text("#!/nonexistent/interpreter\n")
    broken.chmod(0o755)
    (setup["conf"] / "broken.conflist").write_text(
        json.dumps({"cniVersion": "1.1.0", "name": "broken", "plugins": [{"type": "broken"}]})
    )
    result = run("status", "broken")
    assert result.exit_code == 2 and "cannot execute" in result.stderr
    assert [line.split()[0] for line in setup["log"]()] == ["STATUS"] * 3  # clinet, down and crash only


def test_status_help_lists_the_exit_codes():
    text = run("status", "--help").stdout
    assert "Exit status:" in text
    for line in ("0  ready", "1  not ready", "2  could not ask"):
        assert line in text


# ---- install -------------------------------------------------------------


def test_install_writes_executable_wrappers(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    target = tmp_path / "cni" / "bin"
    result = run("install", "--cni-bin-dir", str(target), "--python-shim")
    assert result.exit_code == 0, result.stderr
    loopback = target / "loopback"
    assert f"wrote {loopback}" in result.stdout
    assert stat.S_IMODE(loopback.stat().st_mode) == 0o755
    first_line = loopback.read_text().splitlines()[0]
    assert first_line == f"#!{sys.executable} -IS"  # a shim (pycni/agent/shim.py): isolated, no site
    assert not [n for n in os.listdir(target) if n.startswith(".")]
    # The wrapper is a working plugin: VERSION needs no namespace.
    proc = subprocess.run(
        [str(loopback)], input=b"{}", env={"CNI_COMMAND": "VERSION"}, capture_output=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "1.1.0" in json.loads(proc.stdout)["supportedVersions"]
    # Installing again replaces our own files.
    assert run("install", "--cni-bin-dir", str(target), "--python-shim").exit_code == 0


def test_install_refuses_path_dirs_and_foreign_files(tmp_path, monkeypatch):
    on_path = tmp_path / "onpath"
    on_path.mkdir()
    monkeypatch.setenv("PATH", f"/usr/bin:{on_path}")
    result = run("install", "--cni-bin-dir", str(on_path))
    assert result.exit_code == 1 and "on $PATH" in result.stderr
    assert os.listdir(on_path) == []

    foreign = tmp_path / "bin"
    foreign.mkdir()
    (foreign / "loopback").write_text("#!/bin/sh\necho reference\n")
    result = run("install", "--cni-bin-dir", str(foreign))
    assert result.exit_code == 1 and "loopback" in result.stderr and "--force" in result.stderr
    assert (foreign / "loopback").read_text().endswith("reference\n")
    assert run("install", "--cni-bin-dir", str(foreign), "--force").exit_code == 0
    assert "pycni install" in (foreign / "loopback").read_text()


def test_install_native_shim_builds_one_binary_the_plugin_files_run(tmp_path, monkeypatch):
    from cni_plugins.spec.registry import own_plugin

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    target = tmp_path / "bin"
    result = run("install", "--cni-bin-dir", str(target), "--native-shim", "--agent-socket", "/run/x/agent.sock")
    assert result.exit_code == 0, result.stderr
    shim = target / "pycni-shim"
    assert shim.read_bytes()[:4] == b"\x7fELF" and stat.S_IMODE(shim.stat().st_mode) == 0o755
    loopback = target / "loopback"
    text = loopback.read_text()
    assert text.splitlines()[0] == f"#!{shim}" and "socket=/run/x/agent.sock" in text
    assert own_plugin(str(loopback)) == "loopback"  # in-process delegation still recognises it
    assert own_plugin(str(shim)) is None
    proc = subprocess.run(
        [str(loopback)], input=b"{}", env={"CNI_COMMAND": "VERSION"}, capture_output=True, check=False
    )
    cold = subprocess.run(
        [sys.executable, "-I", "-c", "from cni_plugins.loopback import main; main()"],
        input=b"{}",
        env={"CNI_COMMAND": "VERSION"},
        capture_output=True,
        check=False,
    )
    assert (proc.returncode, proc.stdout) == (cold.returncode, cold.stdout) == (0, cold.stdout)
    # Run by hand, the binary says what it is for.
    alone = subprocess.run([str(shim)], capture_output=True, text=True, check=False)
    assert alone.returncode == 1 and "run a plugin, not me" in alone.stderr
    # Again: our own binary is replaced; a foreign one is not, without --force.
    assert run("install", "--cni-bin-dir", str(target), "--native-shim").exit_code == 0
    shim.write_bytes(b"\x7fELF someone else's")
    result = run("install", "--cni-bin-dir", str(target), "--native-shim")
    assert result.exit_code == 1 and "pycni-shim" in result.stderr and "--force" in result.stderr
    assert run("install", "--cni-bin-dir", str(target), "--native-shim", "--force").exit_code == 0


def test_install_native_shim_says_what_it_lacks(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    result = run("install", "--cni-bin-dir", str(tmp_path / "a"), "--native-shim", "--no-agent")
    assert result.exit_code == 1 and "needs an agent socket" in result.stderr
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc or gcc on it
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr("pycni.install.packaged_shim", lambda: str(tmp_path / "not-built" / "pycni-shim"))
    result = run("install", "--cni-bin-dir", str(tmp_path / "b"), "--native-shim")
    assert result.exit_code == 1 and "no C compiler" in result.stderr and "gcc" in result.stderr
    assert not os.path.exists(tmp_path / "b" / "loopback")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    result = run("install", "--cni-bin-dir", str(tmp_path / "with space"), "--native-shim")
    assert result.exit_code == 1 and "whitespace" in result.stderr
    long_socket = "/run/" + "s" * 120
    result = run("install", "--cni-bin-dir", str(tmp_path / "c"), "--agent-socket", long_socket)
    assert result.exit_code == 1 and "too long" in result.stderr


def test_del_uses_cached_config_when_file_is_gone(setup):
    setup["network"]()
    assert run("add", "clinet", "pod1").exit_code == 0
    os.unlink(setup["conf"] / "clinet.conflist")
    result = run("del", "clinet", "pod1")
    assert result.exit_code == 0, result.stderr
    assert "using the configuration ADD cached" in result.stderr
    assert [line.split()[0] for line in setup["log"]()] == ["ADD", "DEL"]
    # Nothing cached any more: now the missing network is an error.
    result = run("del", "clinet", "pod1")
    assert result.exit_code == 1 and "no network named 'clinet'" in result.stderr
