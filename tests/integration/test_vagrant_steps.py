"""vagrant/: the Vagrantfile validates, and its provisioning steps bring up a cluster of netns nodes.

The VMs themselves cannot boot on the CI machine (no nested virtualisation),
so `vagrant validate --ignore-provider` checks the Vagrantfile (the provider
plugins, libvirt and VirtualBox, are not installed here), and the very
scripts the VMs run (vagrant/steps/*.sh) run here inside network namespaces,
with their inputs (environment variables) pointing at temporary directories:

    10-install       pycni from the checkout into a fresh venv (pip offline: the venv sees this
                     venv's dependencies through a .pth file, standing in for PyPI)
    20-plugins       `pycni install` and the vxlan network configuration, per node
    30-cluster-init  on every node (the first writes, the others find it written)
    40-agent         PYCNI_AGENT_RUNNER=exec: the script becomes the agent (stopped by PID); the step
                     counts as done once the agent holds its lease (what the systemd runner waits for);
                     the systemd runner's unit and drop-in are checked with a stub systemctl
    50-conformance   --expect-nodes 3 (PYCNI_NODES, as the Vagrantfile passes it)
    60-report        the matrix: every check passes, from and to every node

The steps run in two orders:

- as Vagrant runs them: node1's steps, all of them (its conformance run
  included), before node2's first step, then node3's, then 60-report. That
  order is what broke `vagrant up` (node1, alone, checked itself and left; the
  others waited for it in vain), and CI ran the steps layer by layer, so it
  never saw it. 50-conformance runs its systemd-run branch, with a stand-in
  for systemd-run (no systemd in a namespace) that starts the run in the
  background in a session of its own and keeps its output, PID and exit
  status; the step must end once the node has joined, while node1's and
  node2's runs keep waiting for node3;
- layer by layer (each step on every node before the next step), with
  50-conformance in the foreground on the three nodes at once.

10-install runs once (the fixture), for all three nodes: they share one venv.
05-etcd.sh (apt-get and systemd on the etcd VM) does not run here; the
cluster store is etcd started in the underlay namespace (tests/cluster_helpers.py).
Each script runs through `nsenter --net=NODE`, which switches only the network
namespace (see test_conformance.py for why not `ip netns exec`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Iterator

import pytest

import netns
from pycni.conformance.probe import probe_netns_names

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from multinode import UNDERLAY_GATEWAY, Node, cluster_topology, wait_for  # noqa: E402
from pycni import procs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VAGRANT_DIR = os.path.join(REPO, "vagrant")
STEPS = os.path.join(VAGRANT_DIR, "steps")
STEP_TIMEOUT = 180


def steps() -> list[str]:
    return sorted(name for name in os.listdir(STEPS) if name.endswith(".sh") and name[:2].isdigit())


# ---- the files ---------------------------------------------------------------------------------


def test_every_step_is_valid_bash():
    for name in steps() + ["lib.sh"]:
        done = subprocess.run(["bash", "-n", os.path.join(STEPS, name)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{name}: {done.stderr}"


def test_the_vagrantfile_runs_every_node_step_in_order():
    with open(os.path.join(VAGRANT_DIR, "Vagrantfile")) as fh:
        text = fh.read()
    node_steps = re.search(r"NODE_STEPS = %w\[([^\]]*)\]", text).group(1).split()
    assert node_steps == ["10-install", "20-plugins", "30-cluster-init", "40-agent", "50-conformance"]
    assert [f"{s}.sh" for s in ["05-etcd", *node_steps, "60-report"]] == steps()
    assert "debian/bookworm64" in text and ":libvirt" in text and ":virtualbox" in text
    # Every node's steps know the cluster's size: conformance waits for that many nodes.
    assert '"PYCNI_NODES" => NODES.to_s' in text


def _vagrant_env(tmp_path) -> dict[str, str]:
    return dict(
        os.environ,
        VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"),
        VAGRANT_HOME=str(tmp_path / "home"),
        VAGRANT_CHECKPOINT_DISABLE="1",
        VAGRANT_NO_COLOR="1",
    )


@pytest.mark.skipif(
    shutil.which("vagrant") is None,
    reason="the vagrant binary is missing (apt-get install vagrant); cannot run `vagrant validate`",
)
@pytest.mark.parametrize("nodes", ["3", "5"])
def test_vagrant_validate(tmp_path, nodes):
    # --ignore-provider: neither provider (vagrant-libvirt, VirtualBox) is usable on the CI machine, and
    # without it validate stops at "provider could not be found" before looking at the configuration.
    env = _vagrant_env(tmp_path)
    env["PYCNI_NODES"] = nodes
    dot_existed = os.path.lexists(os.path.join(VAGRANT_DIR, ".vagrant"))
    done = subprocess.run(
        ["vagrant", "validate", "--ignore-provider"],
        cwd=VAGRANT_DIR,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Vagrantfile validated successfully" in done.stdout
    assert f"node{nodes}:" in done.stdout and "etcd:" in done.stdout
    # Vagrant's machine state went to the test's VAGRANT_DOTFILE_PATH, not into the checkout (judged only
    # when the checkout had none before: a developer's own `vagrant up` may have made one).
    assert dot_existed or not os.path.lexists(os.path.join(VAGRANT_DIR, ".vagrant"))


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="the vagrant binary is missing (apt-get install vagrant)")
def test_vagrant_validate_catches_a_broken_vagrantfile(tmp_path):
    with open(os.path.join(VAGRANT_DIR, "Vagrantfile")) as fh:
        text = fh.read().replace("node.vm.hostname = name", "node.vm.hostnme = name")
    (tmp_path / "Vagrantfile").write_text(text)
    done = subprocess.run(
        ["vagrant", "validate", "--ignore-provider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        env=_vagrant_env(tmp_path),
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode != 0 and "hostnme" in done.stdout + done.stderr


# ---- running the steps -------------------------------------------------------------------------


def run_step(
    name: str, env: dict[str, str], node: Node | None = None, timeout: float = STEP_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    args = ["bash", os.path.join(STEPS, name)]
    if node is not None:
        args = ["nsenter", f"--net={node.path}", *args]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Iterator[str]:
    """10-install.sh into a fresh venv: its PYCNI_VENV."""
    base = tmp_path_factory.mktemp("steps-install")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # pip, the build backend and the dependencies (click, pyroute2, netaddr) come from this test run's
    # venv, so the install works offline; on the VMs the venv has its own pip, which uses PyPI.
    site = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with open(os.path.join(site, "_pycni_test_deps.pth"), "w") as fh:
        fh.write(sysconfig.get_path("purelib") + "\n")
    # The step's source is a checkout of the test's own (as the synced folder is the VM's), so what the step
    # does to its source is judged on files no one else touches: `pip install -e .` in the real checkout
    # legitimately makes build/ (setup.py build_shim), and another run may be doing so right now.
    src = base / "src"
    shutil.copytree(
        REPO,
        src,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", ".vagrant"
        ),
    )
    before = _tree(src)
    env = dict(
        os.environ,
        PYCNI_SRC=str(src),
        PYCNI_VENV=str(venv),
        PYCNI_APT="0",
        PYCNI_PIP_ARGS="--no-index --no-deps --no-build-isolation",
        PYCNI_BIN_LINK=str(base / "bin" / "pycni"),
        PYCNI_NODE_NAME="ci",
    )
    done = run_step("10-install.sh", env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert os.path.realpath(base / "bin" / "pycni") == str(venv / "bin" / "pycni")
    # Installed from a copy: the source got no build/, no egg-info, nothing at all.
    after = _tree(src)
    assert after == before, f"10-install changed its source: {sorted(set(after) ^ set(before))[:10]}"
    yield str(venv)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime) of everything under root."""
    out = {}
    for where, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(where, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return out


def node_env(installed: str, workdir: str, node: Node, store_url: str) -> dict[str, str]:
    def path(what: str) -> str:
        return os.path.join(workdir, f"n{node.index}-{what}")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "PYCNI_"))}
    env.update(
        PYCNI_VENV=installed,
        PYCNI_SRC=REPO,
        PYCNI_APT="0",
        PYCNI_BIN_LINK="",
        CNI_BIN_DIR=path("bin"),
        CNI_CONF_DIR=path("netd"),
        CNI_CACHE_DIR=path("cache"),
        CNI_IPAM_DIR=path("ipam"),
        PYCNI_STATE_DIR=node.state_dir,
        PYCNI_SOCKET=node.socket,
        PYCNI_STORE=store_url,
        PYCNI_CLUSTER_CIDR="10.244.0.0/16",
        PYCNI_NETWORK="pycni-vxlan",
        PYCNI_PUBLIC_IP=node.public_ip,
        PYCNI_NODE_NAME=f"node{node.index + 1}",
        PYCNI_NODES="3",
        PYCNI_AGENT_RUNNER="exec",
        PYCNI_CONFORMANCE_RUNNER="foreground",
        PYCNI_CONFORMANCE_WAIT="60",
        PYCNI_REPORT_WAIT="60",
        PYCNI_UNIT_DIR=path("units"),
        PYCNI_SYSTEMCTL="false",
    )  # never the machine's systemd
    return env


@contextlib.contextmanager
def store_for(topo) -> Iterator[str]:
    from cluster_helpers import etcd_skip_reason, start_etcd

    if etcd_skip_reason():
        yield "file://" + topo.path("store")
        return
    member = start_etcd(topo.underlay_path, UNDERLAY_GATEWAY, workdir=topo.path("etcd"))
    try:
        yield member.url
    finally:
        member.stop()


def _stop(proc: subprocess.Popen) -> None:
    procs.stop(proc, 15)


def start_agent_step(topo, node: Node, env: dict[str, str], stack: contextlib.ExitStack) -> subprocess.Popen:
    """40-agent.sh with PYCNI_AGENT_RUNNER=exec: the script becomes the agent (stopped by its PID when the
    stack unwinds); returns once the agent holds its lease, as the systemd runner's wait does."""
    log = open(topo.path(f"n{node.index}-agent-step.log"), "wb")
    stack.callback(log.close)
    # nsenter execs bash, bash execs the agent: the PID is the agent's own.
    proc = subprocess.Popen(
        ["nsenter", f"--net={node.path}", "bash", os.path.join(STEPS, "40-agent.sh")],
        env=env,
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
    )
    stack.callback(_stop, proc)
    wait_for(lambda: node.read_state() is not None or proc.poll() is not None, 30, what=f"the agent on {node.name}")
    assert proc.poll() is None, open(log.name).read()
    return proc


@pytest.mark.integration
@pytest.mark.multinode
@pytest.mark.etcd
def test_the_steps_bring_up_a_cluster_that_passes_conformance(installed):
    with cluster_topology(3, "vs") as topo, store_for(topo) as store_url, contextlib.ExitStack() as stack:
        envs = {node.name: node_env(installed, topo.workdir, node, store_url) for node in topo.nodes}
        for node in topo.nodes:
            for name in ("20-plugins.sh", "30-cluster-init.sh"):
                done = run_step(name, envs[node.name], node)
                assert done.returncode == 0, f"{name} on {node.name}: {done.stdout}{done.stderr}"
            conflist = json.load(open(os.path.join(envs[node.name]["CNI_CONF_DIR"], "10-pycni-vxlan.conflist")))
            assert conflist["plugins"][0]["stateDir"] == node.state_dir
            assert os.access(os.path.join(envs[node.name]["CNI_BIN_DIR"], "vxlan"), os.X_OK)
        for node in topo.nodes:
            start_agent_step(topo, node, envs[node.name], stack)
        wait_for(
            lambda: all(
                len([r for r in n.ip_json("route", "show") if "onlink" in r.get("flags", [])]) == 2 for n in topo.nodes
            ),
            20,
            what="every node routing to the others",
        )

        procs = [
            (
                node,
                subprocess.Popen(
                    ["nsenter", f"--net={node.path}", "bash", os.path.join(STEPS, "50-conformance.sh")],
                    env=envs[node.name],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    stdin=subprocess.DEVNULL,
                ),
            )
            for node in topo.nodes
        ]
        outputs = {}
        for node, proc in procs:
            stack.callback(_stop, proc)
            outputs[node.name] = proc.communicate(timeout=STEP_TIMEOUT)
        for node, proc in procs:
            assert proc.returncode == 0, outputs[node.name]
        last = topo.nodes[-1]
        done = run_step("60-report.sh", envs[last.name], last)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "PASS: 54 checks, 54 passed, 0 failed" in done.stdout
        assert {f"node{i}" for i in (1, 2, 3)} <= set(re.findall(r"\bnode\d\b", done.stdout))
        assert "cluster network 10.244.0.0/16" in done.stderr  # pycni inspect --cluster
        probes = {name for node in topo.nodes for name in probe_netns_names(f"node{node.index + 1}", node.state_dir)}
        assert not probes & set(netns.list_names())


# ---- node after node, as Vagrant runs the steps ----------------------------------------------------

# Stands in for systemd-run on netns nodes (no systemd there): the options are skipped and the command starts
# in the background, in a session of its own (its PID is the session's and the process group's id), with
# its output in RUNS/<node>.log, that PID in RUNS/<node>.pid and, when it ends, its exit status in
# RUNS/<node>.rc.
SYSTEMD_RUN_STAND_IN = """#!/bin/sh
while [ $# -gt 0 ]; do case "$1" in --*) shift ;; *) break ;; esac; done
out="{runs}/$PYCNI_NODE_NAME"
setsid sh -c '"$@"; echo $? > "$0.rc"' "$out" "$@" > "$out.log" 2>&1 < /dev/null &
echo $! > "$out.pid"
"""


def _stop_background_run(pid_file: Path) -> None:
    """SIGTERM to the process group the stand-in started (the run removes its probes), SIGKILL after 20 s."""
    if not pid_file.exists():
        return
    pgid = int(pid_file.read_text())
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _run_state(runs: Path, name: str) -> tuple[bool, str | None, str]:
    """(the background run of node ``name`` is still running, its exit status or None, its output)."""
    pid = int((runs / f"{name}.pid").read_text())
    rc_file = runs / f"{name}.rc"
    rc = rc_file.read_text().strip() if rc_file.exists() else None
    try:
        os.killpg(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    return alive and rc is None, rc, (runs / f"{name}.log").read_text()


def _outputs(runs: Path) -> str:
    """The background runs' output so far, for assertion messages."""
    return "".join(
        f"\n--- {log.stem}'s conformance run:\n{log.read_text()[-3000:]}" for log in sorted(runs.glob("*.log"))
    )


@pytest.mark.integration
@pytest.mark.multinode
@pytest.mark.etcd
def test_the_steps_node_by_node_as_vagrant_runs_them_meet_on_every_node(installed, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    stand_in = tmp_path / "systemd-run"
    stand_in.write_text(SYSTEMD_RUN_STAND_IN.format(runs=runs))
    stand_in.chmod(0o755)
    with cluster_topology(3, "vo") as topo, store_for(topo) as store_url, contextlib.ExitStack() as stack:
        envs = {}
        for node in topo.nodes:
            name = f"node{node.index + 1}"
            env = envs[name] = node_env(installed, topo.workdir, node, store_url)
            env.update(
                PYCNI_CONFORMANCE_RUNNER="systemd-run",
                PYCNI_SYSTEMD_RUN=str(stand_in),
                PYCNI_CONFORMANCE_WAIT="150",
                PYCNI_JOIN_WAIT="60",
            )
            # This node's whole provisioning, before the next node's first step.
            for step in ("20-plugins.sh", "30-cluster-init.sh"):
                done = run_step(step, env, node)
                assert done.returncode == 0, f"{step} on {name}: {done.stdout}{done.stderr}"
            start_agent_step(topo, node, env, stack)
            stack.callback(_stop_background_run, runs / f"{name}.pid")
            done = run_step("50-conformance.sh", env, node, timeout=90)
            assert done.returncode == 0, f"50-conformance on {name}: {done.stdout}{done.stderr}{_outputs(runs)}"
            assert f"[50-conformance {name}] joined: the run waits for 3 node(s) in total" in done.stderr
            # Joined: its probe is up, or (the last node, whose run completes the meeting at once) already checked.
            assert re.search(rf"^{name}\s+{re.escape(node.public_ip)}\s.*\byes: probe", done.stderr, re.M) or (
                node.index == 2 and f"node {name} took part: its run has finished already" in done.stderr
            ), done.stderr
            if node.index < 2:
                # Its run did not check this node alone and leave: it keeps its probe up and waits for the rest.
                wait_for(
                    lambda: "more node(s) to come up (--expect-nodes 3" in _run_state(runs, name)[2],
                    15,
                    what=f"{name}'s run to say what it waits for",
                )
                for earlier in range(node.index + 1):
                    running, rc, out = _run_state(runs, f"node{earlier + 1}")
                    assert running, f"node{earlier + 1}'s run ended (exit {rc}) before node3 came:\n{out}"

        last = topo.nodes[-1]
        done = run_step("60-report.sh", envs["node3"], last)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "PASS: 54 checks, 54 passed, 0 failed" in done.stdout, done.stdout

        # Every node's own run checked every node, and ended with success.
        wait_for(lambda: all((runs / f"node{i}.rc").exists() for i in (1, 2, 3)), 60, what="the runs to end")
        for i in (1, 2, 3):
            _running, rc, out = _run_state(runs, f"node{i}")
            others = sorted(f"node{j}" for j in (1, 2, 3) if j != i)
            assert rc == "0", f"node{i}'s run exited {rc}:\n{out}"
            assert f"checking against 2 other node(s): {others[0]} (" in out and f"{others[1]} (" in out, out
        report = subprocess.run(
            [
                "nsenter",
                f"--net={last.path}",
                os.path.join(installed, "bin", "pycni"),
                "conformance",
                "report",
                "--store",
                store_url,
                "--json",
                "--expect-nodes",
                "3",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert report.returncode == 0, report.stdout + report.stderr
        matrix = json.loads(report.stdout)
        names = {"node1", "node2", "node3"}
        assert {n["node"] for n in matrix["nodes"]} == names and matrix["ignored"] == []
        assert {(r["from"], r["to"]) for r in matrix["checks"] if r["check"] == "pod-pod-other-node"} == {
            (a, b) for a in names for b in names if a != b
        }
        assert {r["result"] for r in matrix["checks"]} == {"pass"}

        for i in (1, 2, 3):
            _stop_background_run(runs / f"node{i}.pid")
        probes = {name for node in topo.nodes for name in probe_netns_names(f"node{node.index + 1}", node.state_dir)}
        assert not probes & set(netns.list_names())


def test_the_agent_step_installs_a_systemd_unit_with_the_node_overlay_options(installed, tmp_path):
    calls = tmp_path / "systemctl.log"
    stub = tmp_path / "systemctl"
    stub.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    stub.chmod(0o755)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "overlay.json").write_text("{}")  # what the started agent would write
    socket_path = str(tmp_path / "run" / "agent.sock")  # the test's own: never the machine's /run/pycni
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "PYCNI_"))}
    env.update(
        PYCNI_VENV=installed,
        PYCNI_AGENT_RUNNER="systemd",
        PYCNI_SYSTEMCTL=str(stub),
        PYCNI_UNIT_DIR=str(tmp_path / "units"),
        CNI_BIN_DIR=str(tmp_path / "bin"),
        PYCNI_STATE_DIR=str(state_dir),
        PYCNI_SOCKET=socket_path,
        PYCNI_STORE="etcd://192.168.56.10:2379",
        PYCNI_PUBLIC_IP="192.168.56.11",
        PYCNI_NODE_NAME="node1",
        PYCNI_AGENT_WAIT="5",
    )
    # Writes files only (a unit, a drop-in, plugin executables) and calls the stub: nothing is started.
    done = run_step("40-agent.sh", env)
    assert done.returncode == 0, done.stdout + done.stderr
    unit = (tmp_path / "units" / "pycni-agent.service").read_text()
    pycni = os.path.join(installed, "bin", "pycni")
    assert f"ExecStart={pycni} agent --socket {socket_path}" in unit and "Type=notify" in unit
    dropin = (tmp_path / "units" / "pycni-agent.service.d" / "overlay.conf").read_text()
    assert dropin.splitlines()[-2:] == [
        "ExecStart=",
        f"ExecStart={pycni} agent --socket {socket_path} --store etcd://192.168.56.10:2379 "
        f"--public-ip 192.168.56.11 --state-dir {state_dir} --node-name node1",
    ]
    assert calls.read_text().splitlines() == [
        "daemon-reload",
        "enable --now pycni-agent.service",
        "restart pycni-agent.service",
    ]
