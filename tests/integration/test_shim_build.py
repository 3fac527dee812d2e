"""The compiled shim from the package build to a warm plugin call.

- the package build (setup.py's build_shim) compiles pycni/agent/native_shim.c:
  a wheel built from a copy of this checkout carries ``pycni/agent/pycni-shim``
  (executable, tagged for the platform); built where there is no compiler it
  still succeeds, says so, and carries no binary;
- the interpreter's installed package (what .ci/setup's `pip install -e .`
  made) holds a shim built from its own source;
- `pycni install`, the console script, copies that shim beside the plugins by
  default, with no compiler on $PATH, and says in one line that no agent runs;
  with an agent on the socket (``running_agent``: its own namespace, a socket
  under the test's directory, stopped by PID) it says the warm path is on, and
  a plugin call from a node namespace of the test is served by the agent.

Wheels are built with the interpreter's own setuptools (--no-build-isolation,
--no-index: nothing is downloaded) from a copy in the test's directory, never
in the checkout.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.plugin_modes import PYCNI, running_agent

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PACKAGE_FILES = ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "LICENSE")
PACKAGES = ("cni_plugins", "conf", "ipam", "netns", "pycni")
BINARY = "pycni/agent/pycni-shim"
COMPILER = shutil.which("cc") or shutil.which("gcc")


def source_copy(where: Path) -> Path:
    """The files a package build reads, copied out of the checkout (no build products, no caches)."""
    where.mkdir()
    for name in PACKAGE_FILES:
        if (REPO / name).exists():
            shutil.copy2(REPO / name, where / name)
    for package in PACKAGES:
        shutil.copytree(
            REPO / package,
            where / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "pycni-shim", "*.egg-info", "*.tmp"),
        )
    return where


def build_wheel(source: Path, out: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], Path | None]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-v",
            "-w",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=str(source),
    )
    wheels = glob.glob(str(out / "pycni-*.whl"))
    return proc, Path(wheels[0]) if len(wheels) == 1 else None


def wheel_members(wheel: Path) -> dict[str, int]:
    """Member name -> its Unix mode, as pip will install it."""
    with zipfile.ZipFile(wheel) as archive:
        return {info.filename: info.external_attr >> 16 for info in archive.infolist()}


@pytest.mark.skipif(COMPILER is None, reason="needs a C compiler (cc or gcc)")
def test_a_wheel_carries_the_compiled_shim(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CC"}
    proc, wheel = build_wheel(source_copy(tmp_path / "src"), tmp_path / "out", env)
    assert proc.returncode == 0 and wheel is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pycni: built the native shim" in proc.stdout + proc.stderr
    members = wheel_members(wheel)
    assert BINARY in members and stat.S_IMODE(members[BINARY]) == 0o755, sorted(members)[:20]
    assert "pycni/agent/native_shim.c" in members  # install can still compile it where it must
    assert wheel.name.startswith("pycni-") and "-py3-none-linux_" in wheel.name, wheel.name
    with zipfile.ZipFile(wheel) as archive:
        binary = archive.read(BINARY)
    from pycni.install import source_digest

    assert binary[:4] == b"\x7fELF"
    assert (
        b"pycni-native-shim v1 source " + source_digest(str(tmp_path / "src" / "pycni/agent/native_shim.c")).encode()
        in binary
    )


def test_without_a_compiler_the_wheel_builds_and_says_so(tmp_path):
    empty = tmp_path / "empty-path"
    empty.mkdir()
    env = dict(os.environ, CC="/nonexistent/cc", PATH=str(empty))
    proc, wheel = build_wheel(source_copy(tmp_path / "src"), tmp_path / "out", env)
    assert proc.returncode == 0 and wheel is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "pycni: WARNING: the native shim was not built" in output and "'/nonexistent/cc' not found" in output
    assert "installs the Python shim" in output
    members = wheel_members(wheel)
    assert BINARY not in members and "pycni/agent/shim.py" in members and "pycni/agent/native_shim.c" in members


def test_the_installed_package_holds_a_shim_built_from_its_source():
    """What `pip install -e .` (.ci/setup) left in this interpreter's package, asked from outside the checkout."""
    code = (
        "import json, os, pycni.install as i; "
        "print(json.dumps([i.packaged_shim(), i.shim_source(), i.built_from(i.packaged_shim(), i.shim_source())]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60)
    assert proc.returncode == 0, proc.stderr
    binary, source, current = json.loads(proc.stdout)
    assert os.path.dirname(binary) == os.path.dirname(source)
    assert current, (
        f"{binary} is missing or was built from another {source}: install the package again "
        "(pip install -e .) on a machine with a C compiler"
    )
    assert os.access(binary, os.X_OK) and Path(binary).read_bytes()[:4] == b"\x7fELF"


def _install(bin_dir: Path, socket_path: str, path: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CC"}
    env["PATH"] = path
    return subprocess.run(
        [PYCNI, "install", "--cni-bin-dir", str(bin_dir), "--agent-socket", socket_path],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd="/",
    )


def test_pycni_install_picks_the_built_shim_and_the_agent_serves_through_it(tmp_path, make_node, make_pod):
    from pycni.install import built_from, packaged_shim, shim_source

    if not built_from(packaged_shim(), shim_source()):
        pytest.skip("the installed package carries no compiled shim (see the test above)")
    empty = tmp_path / "empty-path"
    empty.mkdir()  # no compiler anywhere on $PATH: the shim must be the package's
    run_dir = tmp_path / "run"
    socket_path = str(run_dir / "agent.sock")
    bin_dir = tmp_path / "bin"

    done = _install(bin_dir, socket_path, str(empty))
    assert done.returncode == 0, done.stderr
    shim = bin_dir / "pycni-shim"
    assert f"wrote {shim} (the compiled shim, built with the package)" in done.stdout
    assert shim.read_bytes() == Path(packaged_shim()).read_bytes()
    assert (bin_dir / "host-local").read_text().splitlines()[0] == f"#!{shim}"
    assert (
        f"pycni install: no agent serves {socket_path}: start one with `pycni agent --socket {socket_path}`"
        in done.stdout
        and done.stderr == ""
    )

    with running_agent(str(tmp_path)) as agent:
        assert agent.socket_path == socket_path
        again = _install(bin_dir, socket_path, str(empty))
        assert again.returncode == 0, again.stderr
        assert f"pycni install: an agent serves {socket_path}: plugin calls take the warm path" in again.stdout
        node, pod = make_node(), make_pod()
        conf = {
            "cniVersion": "1.0.0",
            "name": "shimnet",
            "type": "bridge",
            "ipam": {"type": "host-local", "dataDir": str(tmp_path / "ipam"), "ranges": [[{"subnet": "10.94.0.0/24"}]]},
        }
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": "c1",
            "CNI_NETNS": os.fspath(pod),
            "CNI_IFNAME": "eth0",
            "CNI_PATH": str(bin_dir),
        }
        added = subprocess.run(
            ["ip", "netns", "exec", node.name, str(bin_dir / "host-local")],
            input=json.dumps(conf).encode(),
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert added.returncode == 0 and added.stderr == b"", added
        assert json.loads(added.stdout)["ips"][0]["address"] == "10.94.0.2/24"
        counters = agent.status()["requests"]
        assert counters["served"] == 1 and counters["refused"] == 0, counters
