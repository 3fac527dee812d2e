"""`pycni install`: which shim it puts in front of the plugins, and what it says about the warm path.

In-process (click's CliRunner), so a test can take away what the machine has:
the package's built shim (``pycni.install.packaged_shim`` pointed at a path
where there is none, or at a copy built from another source) and the C
compiler ($CC naming a missing program, $PATH without cc or gcc). systemctl
never runs: the unit goes to a directory of the test, which systemd does not
load units from, and ``pycni.install._systemctl`` fails the test if called.
``enable_systemd_unit`` itself is driven with a runner of the test's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pycni.cli import cli
from pycni.install import (
    NATIVE_SHIM,
    SYSTEMD_BOOTED,
    CNIError,
    built_from,
    enable_systemd_unit,
    packaged_shim,
    shim_source,
    source_digest,
)

COMPILER = shutil.which("cc") or shutil.which("gcc")
needs_compiler = pytest.mark.skipif(COMPILER is None, reason="needs a C compiler (cc or gcc)")
needs_built_shim = pytest.mark.skipif(
    not built_from(packaged_shim(), shim_source()),
    reason="the installed package carries no compiled shim built from its "
    "source: run `pip install -e .` (.ci/setup) on a machine with gcc",
)


def run(*args: str):
    return CliRunner().invoke(cli, ["install", *args], catch_exceptions=False)


@pytest.fixture
def no_systemctl(monkeypatch):
    def refuse(argv):
        raise AssertionError(f"the test ran {argv}")

    monkeypatch.setattr("pycni.install._systemctl", refuse)


@pytest.fixture
def socket_path(tmp_path: Path) -> str:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    return str(run_dir / "agent.sock")


@pytest.fixture
def no_compiler(tmp_path: Path, monkeypatch) -> None:
    """$CC names a program that does not exist and $PATH holds neither cc nor gcc."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("CC", "/nonexistent/cc")


def without_built_shim(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr("pycni.install.packaged_shim", lambda: str(tmp_path / "not-built" / NATIVE_SHIM))


def first_line(path: Path) -> str:
    return path.read_text(errors="replace").splitlines()[0]


def notes(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("pycni install: ")]


@needs_built_shim
def test_the_default_is_the_shim_built_with_the_package(tmp_path, socket_path, no_compiler, no_systemctl):
    target = tmp_path / "bin"
    result = run("--cni-bin-dir", str(target), "--agent-socket", socket_path)
    assert result.exit_code == 0, result.stderr
    shim = target / NATIVE_SHIM
    assert f"wrote {shim} (the compiled shim, built with the package)" in result.stdout
    assert shim.read_bytes() == Path(packaged_shim()).read_bytes() and os.access(shim, os.X_OK)
    assert first_line(target / "bridge") == f"#!{shim}"
    assert notes(result.stderr) == []
    # No agent serves the socket: one line says how to start one and what running without it costs.
    [hint] = [line for line in result.stdout.splitlines() if line.startswith("pycni install: ")]
    assert f"no agent serves {socket_path}: start one with `pycni agent --socket {socket_path}`" in hint
    assert "pycni install --systemd-unit" in hint and "cold path" in hint and "Go plugins" in hint


def test_without_a_built_shim_or_a_compiler_the_python_shim_is_installed_and_said_so(
    tmp_path, socket_path, monkeypatch, no_compiler, no_systemctl
):
    without_built_shim(monkeypatch, tmp_path)
    target = tmp_path / "bin"
    result = run("--cni-bin-dir", str(target), "--agent-socket", socket_path)
    assert result.exit_code == 0, result.stderr
    assert notes(result.stderr) == [
        "pycni install: installed the Python shim instead of the compiled one: the package was built without the "
        "compiled shim (no C compiler then), and no C compiler was found ($CC is '/nonexistent/cc', which is not "
        "an executable). Every warm call now starts a Python interpreter first (~10 ms, several times a whole Go "
        "plugin run); for the compiled shim, set $CC to a C compiler, or install one (Debian: apt-get install gcc "
        "libc6-dev), then run `pycni install` again (--python-shim chooses the Python shim without this note)"
    ]
    assert first_line(target / "bridge") == f"#!{sys.executable} -IS"
    assert not (target / NATIVE_SHIM).exists() and "compiled shim" not in result.stdout
    # --native-shim insists: the same lack is an error, and nothing is written.
    result = run("--cni-bin-dir", str(tmp_path / "strict"), "--agent-socket", socket_path, "--native-shim")
    assert result.exit_code == 1 and "no C compiler was found" in result.stderr and "gcc" in result.stderr
    assert not (tmp_path / "strict").exists()


def test_a_bin_dir_no_shebang_can_name_gets_the_python_shim_by_default(tmp_path, socket_path, no_systemctl):
    target = tmp_path / "with space"
    result = run("--cni-bin-dir", str(target), "--agent-socket", socket_path)
    assert result.exit_code == 0, result.stderr
    [note] = notes(result.stderr)
    assert "installed the Python shim instead of the compiled one" in note and "free of whitespace" in note
    assert first_line(target / "loopback") == f"#!{sys.executable} -IS"


@needs_compiler
def test_a_built_shim_from_another_source_is_not_used_the_source_is_compiled(
    tmp_path, socket_path, monkeypatch, no_systemctl
):
    """The package's build records its source's digest: after native_shim.c changes it is stale."""
    package = tmp_path / "package"
    package.mkdir()
    source = package / "native_shim.c"
    source.write_bytes(Path(shim_source()).read_bytes() + b"\n/* changed since the package was built */\n")
    if os.path.exists(packaged_shim()):
        shutil.copy2(packaged_shim(), package / NATIVE_SHIM)  # the build of the unchanged source, now stale
    monkeypatch.setattr("pycni.install.shim_source", lambda: str(source))
    monkeypatch.delenv("CC", raising=False)
    target = tmp_path / "bin"
    result = run("--cni-bin-dir", str(target), "--agent-socket", socket_path)
    assert result.exit_code == 0, result.stderr
    assert f"wrote {target / NATIVE_SHIM} (the compiled shim, compiled now from {source})" in result.stdout
    assert built_from(str(target / NATIVE_SHIM), str(source))
    assert not built_from(str(package / NATIVE_SHIM), str(source))
    assert source_digest(str(source)).encode() in (target / NATIVE_SHIM).read_bytes()
    version = subprocess.run(
        [str(target / "loopback")], env={"CNI_COMMAND": "VERSION"}, capture_output=True, check=False
    )
    assert version.returncode == 0 and b"supportedVersions" in version.stdout, version


def test_python_shim_on_request(tmp_path, socket_path, no_systemctl):
    target = tmp_path / "bin"
    result = run("--cni-bin-dir", str(target), "--agent-socket", socket_path, "--python-shim")
    assert result.exit_code == 0, result.stderr
    assert first_line(target / "host-local") == f"#!{sys.executable} -IS"
    assert not (target / NATIVE_SHIM).exists() and notes(result.stderr) == []


def test_no_agent_writes_cold_python_shims_and_says_what_that_costs(tmp_path, no_systemctl):
    target = tmp_path / "bin"
    result = run("--cni-bin-dir", str(target), "--no-agent")
    assert result.exit_code == 0, result.stderr
    assert first_line(target / "bridge") == f"#!{sys.executable} -IS" and "S = ''" in (target / "bridge").read_text()
    assert not (target / NATIVE_SHIM).exists() and notes(result.stderr) == []
    assert (
        "pycni install: --no-agent: these executables never try an agent: every plugin call starts Python"
        in result.stdout
    )


def test_systemd_unit_is_written_and_not_enabled_where_systemd_does_not_run(tmp_path, socket_path, no_systemctl):
    units = tmp_path / "units"
    target = tmp_path / "bin"
    result = run(
        "--cni-bin-dir", str(target), "--agent-socket", socket_path, "--systemd-unit", "--systemd-dir", str(units)
    )
    assert result.exit_code == 0, result.stderr
    unit = units / "pycni-agent.service"
    assert f"wrote {unit}" in result.stdout
    exec_start = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    assert exec_start == [
        f"ExecStart={os.path.dirname(sys.executable)}/pycni agent --socket {socket_path} --cni-bin-dir {target}"
    ]
    [note] = notes(result.stderr)
    assert note.startswith("pycni install: could not enable pycni-agent.service: ")
    if not os.path.isdir(SYSTEMD_BOOTED):  # this machine: PID 1 is not systemd
        assert f"systemd is not running here ({SYSTEMD_BOOTED} does not exist)" in note
    else:
        assert f"systemd does not load units from {units}" in note
    assert note.endswith(f"meanwhile start the agent with `pycni agent --socket {socket_path}`")
    assert "no agent serves" not in result.stdout  # the unit replaces the hint


# ---- enable_systemd_unit, with a systemctl of the test's -------------------------------------------


class FakeSystemctl:
    def __init__(self, fail_on: str = "", code: int = 1) -> None:
        self.calls: list[list[str]] = []
        self.fail_on, self.code = fail_on, code

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv)
        if self.fail_on and self.fail_on in argv:
            return subprocess.CompletedProcess(argv, self.code, "", "Failed to enable unit: Access denied\n")
        return subprocess.CompletedProcess(argv, 0, "", "")


def test_enabling_reloads_systemd_then_enables_and_starts_the_agent(tmp_path):
    unit = tmp_path / "pycni-agent.service"
    unit.write_text("[Unit]\n")
    systemctl = FakeSystemctl()
    outcome = enable_systemd_unit(str(unit), run=systemctl, booted=True, unit_dirs=(str(tmp_path),))
    assert outcome.enabled and "enabled and started pycni-agent.service" in outcome.message
    assert systemctl.calls == [["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", "pycni-agent.service"]]


def test_enabling_says_why_it_could_not(tmp_path):
    unit = tmp_path / "pycni-agent.service"
    unit.write_text("[Unit]\n")
    systemctl = FakeSystemctl()
    down = enable_systemd_unit(str(unit), run=systemctl, booted=False, unit_dirs=(str(tmp_path),))
    assert not down.enabled and "systemd is not running here" in down.message
    elsewhere = enable_systemd_unit(str(unit), run=systemctl, booted=True)
    assert not elsewhere.enabled and f"systemd does not load units from {tmp_path}" in elsewhere.message
    assert "systemctl daemon-reload && systemctl enable --now pycni-agent.service" in elsewhere.message
    assert systemctl.calls == []
    failing = FakeSystemctl(fail_on="enable")
    with pytest.raises(CNIError) as raised:
        enable_systemd_unit(str(unit), run=failing, booted=True, unit_dirs=(str(tmp_path),))
    assert "`systemctl enable --now pycni-agent.service` failed (exit 1): Failed to enable unit: Access denied" in str(
        raised.value
    )
    assert "journalctl -u pycni-agent.service" in str(raised.value)
    assert failing.calls[0] == ["systemctl", "daemon-reload"]
