"""`pycni agent` and the installed shims, as real processes in test namespaces.

Every agent runs in a namespace of its own (``running_agent``) and is stopped by
PID at the end. The plugins run through their shims as a runtime runs them,
with their host side in "node" namespaces, so a request handled in the
agent's own namespace instead of the caller's shows up as state in the wrong
place. A request is held up where a test needs it (in flight, queued, timed
out) by holding host-local's store lock (``<dataDir>/<network>/lock``, flock)
from the test: the plugin waits on it exactly as behind a concurrent ADD.
CNI_NETNS names a real pod namespace even for host-local (which never opens
it): the agent serves only requests whose CNI_NETNS their caller could open.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.helpers.plugins import Outcome, run_plugin
from tests.helpers.state import link_names, nft_text
from tests.plugin_modes import AgentProcess, install, running_agent

pytestmark = pytest.mark.integration

NET = "agentnet"
SUBNET = "10.91.0.0/24"


# ---- helpers ----------------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def agent(workdir: Path) -> Iterator[AgentProcess]:
    with running_agent(str(workdir)) as proc:
        yield proc


@pytest.fixture(params=["python", "native"])
def shim_kind(request) -> str:
    """Every test that runs shims runs twice: with the Python shims and with the native (compiled) one."""
    return request.param


@pytest.fixture
def shims(workdir: Path, agent: AgentProcess, shim_kind: str) -> str:
    """Shims for ``agent``'s socket."""
    bin_dir = str(workdir / "bin")
    install(bin_dir, agent.socket_path, native=shim_kind == "native")
    return bin_dir


def host_local_conf(data_dir: Any, version: str = "1.0.0", network: str = NET) -> dict:
    return {
        "cniVersion": version,
        "name": network,
        "type": "bridge",
        "ipam": {"type": "host-local", "dataDir": str(data_dir), "ranges": [[{"subnet": SUBNET}]]},
    }


def bridge_conf(node, version: str = "1.0.0", **extra: Any) -> dict:
    return {
        "cniVersion": version,
        "name": NET,
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": True,
        "ipMasq": True,
        "ipam": node.host_local(ranges=[[{"subnet": SUBNET}]]),
        **extra,
    }


def leases(data_dir: Any, network: str = NET) -> dict[str, str]:
    """address -> the container ID holding it."""
    path = Path(data_dir) / network
    if not path.is_dir():
        return {}
    return {
        f.name: f.read_text().splitlines()[0]
        for f in path.iterdir()
        if f.name != "lock" and not f.name.startswith("last_reserved_ip")
    }


@contextlib.contextmanager
def store_locked(data_dir: Any, network: str = NET) -> Iterator[None]:
    """Hold host-local's lock on ``network``: every ADD/DEL of it waits until the block ends."""
    path = Path(data_dir) / network
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class Background:
    """A plugin run in a thread (so the test can act while it waits)."""

    def __init__(self, exe: str, command: str, conf: dict, **kwargs: Any) -> None:
        self.outcome: Outcome | None = None
        self.error: BaseException | None = None
        self.finished_at: float | None = None

        def run() -> None:
            try:
                self.outcome = run_plugin(exe, command, conf, **kwargs)
            except BaseException as exc:  # reported by result()
                self.error = exc
            self.finished_at = time.monotonic()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout: float = 60) -> Outcome:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the plugin did not finish"
        if self.error is not None:
            raise self.error
        assert self.outcome is not None
        return self.outcome


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def in_flight(agent: AgentProcess) -> int:
    return agent.status()["in_flight"]


def normalise(result: Any) -> Any:
    result = json.loads(json.dumps(result))
    for iface in result.get("interfaces", []):
        iface.pop("mac", None)
        if "sandbox" in iface:
            iface["sandbox"] = "<netns>"
        if iface["name"].startswith("veth"):
            iface["name"] = "<veth>"
    return result


NOT_REACHED = "agent not reached"


# ---- the warm path does the work in the caller's namespace ------------------------------------


def test_requests_are_served_in_the_callers_namespace_with_cold_results(agent, shims, make_node):
    """An agent in its own namespace serves two nodes; each node's state lands in that node, and
    the results and state equal the cold path's (a third node, the same shims with no agent)."""
    nodes = [make_node("warm"), make_node("warm"), make_node("cold")]
    results = []
    for n, node in enumerate(nodes):
        pod = node.pod()
        env = {"PYCNI_NO_AGENT": "1"} if n == 2 else {}
        add = run_plugin(
            os.path.join(shims, "bridge"), "ADD", bridge_conf(node), node=node, netns=pod, container_id="ctr", env=env
        )
        assert add.code == 0, add
        assert NOT_REACHED not in add.err
        for step in ("portmap", "bandwidth"):
            conf = {
                "cniVersion": "1.0.0",
                "name": NET,
                "type": step,
                "prevResult": add.out,
                "runtimeConfig": {
                    "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
                    "bandwidth": {
                        "ingressRate": 8_000_000,
                        "ingressBurst": 80_000,
                        "egressRate": 8_000_000,
                        "egressBurst": 80_000,
                    },
                },
            }
            chained = run_plugin(
                os.path.join(shims, step), "ADD", conf, node=node, netns=pod, container_id="ctr", env=env
            )
            assert chained.code == 0, chained
            add = chained
        check = run_plugin(
            os.path.join(shims, "bridge"),
            "CHECK",
            dict(bridge_conf(node), prevResult=add.out),
            node=node,
            netns=pod,
            container_id="ctr",
            env=env,
        )
        assert check.code == 0, check
        names = link_names(node)
        results.append(
            (
                normalise(add.out),
                "cni0" in names,
                any(n.startswith("veth") for n in names),
                "pycni" in nft_text(node),
                sorted(node.leases(NET)),
            )
        )
    assert results[0] == results[1] == results[2]
    assert results[0][1:4] == (True, True, True)
    # Nothing in the agent's own namespace: no bridge, no veth, no firewall.
    assert link_names(agent.ns_name) == ["lo"]
    assert nft_text(agent.ns_name).strip() == ""
    served = agent.status()["latency"]
    assert served["bridge"]["ADD"]["count"] == 2 and served["bridge"]["CHECK"]["count"] == 2
    assert served["portmap"]["ADD"]["count"] == 2 and served["bandwidth"]["ADD"]["count"] == 2


def test_loopback_host_local_errors_and_version_match_cold(agent, shims, make_node, make_pod):
    node = make_node()
    outcomes = []
    for mode, env in (("warm", {}), ("cold", {"PYCNI_NO_AGENT": "1"})):
        pod = make_pod()
        data_dir = node.ipam_dir / mode
        lo = run_plugin(
            os.path.join(shims, "loopback"),
            "ADD",
            {"cniVersion": "0.4.0", "name": "lo", "type": "loopback"},
            node=node,
            netns=pod,
            env=env,
        )
        hl = run_plugin(
            os.path.join(shims, "host-local"),
            "ADD",
            host_local_conf(data_dir),
            node=node,
            netns=pod,
            container_id="c1",
            env=env,
        )
        dl = run_plugin(
            os.path.join(shims, "host-local"),
            "DEL",
            host_local_conf(data_dir),
            node=node,
            netns=pod,
            container_id="c1",
            env=env,
        )
        bad = run_plugin(
            os.path.join(shims, "bridge"), "ADD", {"cniVersion": "1.0.0", "name": "x y"}, node=node, netns=pod, env=env
        )
        version = run_plugin(os.path.join(shims, "bridge"), "VERSION", None, env=env)
        lo.out["interfaces"][0]["sandbox"] = "<netns>"
        outcomes.append([(o.code, o.out) for o in (lo, hl, dl, bad, version)])
        assert all(NOT_REACHED not in o.err for o in (lo, hl, dl, bad, version))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][3][0] == 1 and outcomes[0][3][1]["code"] == 7
    served = agent.status()["latency"]
    assert served["loopback"]["ADD"]["count"] == 1 and served["host-local"]["DEL"]["count"] == 1
    # VERSION never reaches the agent: the shim answers it.
    assert "VERSION" not in served.get("bridge", {})


def _lo_up(pod) -> bool:
    return "UP" in json.loads(pod.ip("-j", "link", "show", "lo").stdout)[0]["flags"]


def test_a_caller_seeing_another_namespace_at_cni_netns_is_served_in_the_one_it_sees(agent, shims, make_node, make_pod):
    """A runtime in a mount namespace of its own may see another namespace at CNI_NETNS than the agent does.

    Here the caller has pod ``other`` bind-mounted over pod ``meant``'s path (a private mount namespace,
    so nobody else sees it). The agent never acts on its own view of the path: it works on the descriptor
    the caller opened, so the plugin acts where the path means what the caller meant, warm, and the
    result names the caller's path.
    """
    node, meant, other = make_node(), make_pod(), make_pod()
    conf = {"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}
    private_view = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount --bind "$1" "$2" && exec "$3"',
        "sh",
        other.path,
        meant.path,
        os.path.join(shims, "loopback"),
    ]
    lo = run_plugin(private_view, "ADD", conf, node=node, netns=meant, path=shims)
    assert lo.code == 0 and lo.err == "", lo
    assert lo.out["interfaces"][0]["sandbox"] == meant.path
    assert _lo_up(other) and not _lo_up(meant)  # what the caller meant, not what the agent sees
    counters = agent.status()["requests"]
    assert counters["served"] == 1 and counters["refused"] == counters["declined"] == 0
    # The same path seen alike: served there.
    lo = run_plugin(os.path.join(shims, "loopback"), "ADD", conf, node=node, netns=meant)
    assert lo.code == 0 and lo.err == "", lo
    assert _lo_up(meant) and agent.status()["requests"]["served"] == 2


# ---- fallback: down, killed mid-request, restarted ----------------------------------------------


def test_agent_down_runs_cold_and_says_so(workdir, make_node, shim_kind):
    bin_dir = str(workdir / "bin")
    missing = str(workdir / "nothing" / "agent.sock")
    install(bin_dir, missing, native=shim_kind == "native")
    node = make_node()
    add = run_plugin(
        os.path.join(bin_dir, "bridge"), "ADD", bridge_conf(node), node=node, netns=node.pod(), container_id="ctr"
    )
    assert add.code == 0, add
    assert f"{NOT_REACHED} at {missing}" in add.err and add.err.count("\n") == 1
    assert node.leases(NET) == ["10.91.0.2"]
    # DEL works with the agent down too.
    delete = run_plugin(os.path.join(bin_dir, "bridge"), "DEL", bridge_conf(node), node=node, container_id="ctr")
    assert delete.code == 0 and node.leases(NET) == []


def test_socket_refusing_connections_runs_cold(workdir, make_node, shim_kind):
    """A socket file nobody listens on (an agent that died without cleaning up): connect is refused."""
    bin_dir = str(workdir / "bin")
    stale = workdir / "run" / "agent.sock"
    stale.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))  # bound, never listening: connect() gets ECONNREFUSED
        install(bin_dir, str(stale), native=shim_kind == "native")
        node = make_node()
        add = run_plugin(
            os.path.join(bin_dir, "host-local"),
            "ADD",
            host_local_conf(node.ipam_dir),
            node=node,
            netns="/x",
            container_id="c1",
        )
    assert add.code == 0 and "Connection refused" in add.err


def carrying(container_id: str) -> list[int]:
    """PIDs of the processes whose environment carries CNI_CONTAINERID=container_id (a request's runs)."""
    needle = f"CNI_CONTAINERID={container_id}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    if needle in fh.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def test_killed_mid_request_answers_try_again_and_never_runs_twice(agent, shims, make_node):
    """The agent is killed while its host-local ADD waits for the store lock: the shim answers "try again"
    and never runs the request itself. Every run that gets the lock reserves an address, so the leases
    count the runs; they are counted once nothing can run the request any more, not after a pause: the
    agent is dead (reaped), the lock has been released, the shim has exited with its output pipes closed
    (run_plugin reads them to the end), and no process carrying the request's environment is left."""
    node = make_node()
    victim = f"victim-{os.urandom(4).hex()}"
    with store_locked(node.ipam_dir):
        pending = Background(
            os.path.join(shims, "host-local"),
            "ADD",
            host_local_conf(node.ipam_dir),
            node=node,
            netns=node.pod(),
            container_id=victim,
        )
        wait_for(lambda: in_flight(agent) == 1, what="the request to be in flight")
        agent.kill()
        # The shim must answer while the lock is still held; one that runs the request itself waits for the
        # lock instead: let it go after a bounded wait so that its run is counted below.
        with contextlib.suppress(AssertionError):
            wait_for(lambda: pending.finished_at is not None, timeout=15, what="the shim to answer")
        answered_under_the_lock = pending.finished_at is not None
    outcome = pending.result(timeout=60)
    assert not agent.alive()
    wait_for(lambda: carrying(victim) == [], timeout=30, what="every process running the request to end")
    assert leases(node.ipam_dir) == {}, "the request ran again after the agent was killed"
    assert answered_under_the_lock, "the shim did not answer while the agent's run held the work"
    assert outcome.code == 1 and outcome.out["code"] == 11, outcome
    assert outcome.out["cniVersion"] == "1.0.0"
    assert "try again" in outcome.out["msg"]
    assert NOT_REACHED not in outcome.err and "in-process" not in outcome.err, outcome.err


def test_restarted_agent_loses_no_request(workdir, agent, shims, make_node):
    node = make_node()
    exe = os.path.join(shims, "host-local")

    def add(cid: str) -> Outcome:
        return run_plugin(exe, "ADD", host_local_conf(node.ipam_dir), node=node, netns=node.pod(), container_id=cid)

    first = add("c1")
    assert first.code == 0 and NOT_REACHED not in first.err
    assert agent.stop() == 0
    assert not os.path.exists(agent.socket_path)
    assert os.path.exists(agent.socket_path + ".lock")  # the agent removes its socket and nothing else
    during = add("c2")
    assert during.code == 0 and NOT_REACHED in during.err
    agent.start()
    after = add("c3")
    assert after.code == 0 and NOT_REACHED not in after.err
    assert agent.status()["requests"]["served"] == 1
    assert sorted(leases(node.ipam_dir).values()) == ["c1", "c2", "c3"]


def test_sigterm_finishes_in_flight_lets_queued_run_cold_and_removes_only_the_socket(workdir, make_node, shim_kind):
    node = make_node()
    with running_agent(str(workdir), ["--max-concurrency", "1", "--grace", "20"]) as agent:
        bin_dir = str(workdir / "bin")
        install(bin_dir, agent.socket_path, native=shim_kind == "native")
        exe = os.path.join(bin_dir, "host-local")
        with store_locked(node.ipam_dir):
            accepted = Background(
                exe, "ADD", host_local_conf(node.ipam_dir), node=node, netns=node.pod(), container_id="accepted"
            )
            wait_for(lambda: in_flight(agent) == 1, what="the first request to be in flight")
            queued = Background(
                exe, "ADD", host_local_conf(node.ipam_dir), node=node, netns=node.pod(), container_id="queued"
            )
            wait_for(lambda: agent.status()["queued"] == 1, what="the second request to queue")
            agent.signal(signal.SIGTERM)
            wait_for(lambda: not os.path.exists(agent.socket_path), what="the socket to go")
            late = run_plugin(exe, "VERSION", None)
            assert late.code == 0
            time.sleep(0.3)
            assert agent.alive(), "the agent must wait for the request in flight"
        first, second = accepted.result(), queued.result()
        assert agent.proc.wait(20) == 0
    assert first.code == 0 and NOT_REACHED not in first.err, first
    assert second.code == 0 and "before accepting" in second.err, second
    assert sorted(leases(node.ipam_dir).values()) == ["accepted", "queued"]
    assert os.path.exists(agent.socket_path + ".lock")
    assert "Traceback" not in agent.log_text()


# ---- limits: concurrency, queue, timeouts, STATUS ------------------------------------------------


def test_parallel_adds_all_succeed_with_distinct_addresses(workdir, make_node, shim_kind):
    node = make_node()
    with running_agent(str(workdir), ["--max-concurrency", "4"]) as agent:
        bin_dir = str(workdir / "bin")
        install(bin_dir, agent.socket_path, native=shim_kind == "native")
        pods = [node.pod() for _ in range(16)]
        runs = [
            Background(
                os.path.join(bin_dir, "bridge"), "ADD", bridge_conf(node), node=node, netns=pod, container_id=f"ctr{n}"
            )
            for n, pod in enumerate(pods)
        ]
        outcomes = [run.result(90) for run in runs]
        assert all(o.code == 0 and NOT_REACHED not in o.err for o in outcomes), [o for o in outcomes if o.code]
        addresses = [o.out["ips"][0]["address"] for o in outcomes]
        assert len(set(addresses)) == 16
        assert all(ipaddress.ip_interface(a) in ipaddress.ip_network(SUBNET) for a in addresses)
        assert agent.status()["latency"]["bridge"]["ADD"]["count"] == 16
        assert len(node.leases(NET)) == 16
        deletes = [
            Background(
                os.path.join(bin_dir, "bridge"), "DEL", bridge_conf(node), node=node, netns=pod, container_id=f"ctr{n}"
            )
            for n, pod in enumerate(pods)
        ]
        assert all(run.result(90).code == 0 for run in deletes)
        assert node.leases(NET) == []


def test_request_timeout_and_full_queue_answer_try_again_while_status_answers_at_once(workdir, make_node, shim_kind):
    node = make_node()
    args = ["--max-concurrency", "1", "--queue-timeout", "0.5", "--request-timeout", "1.5"]
    with running_agent(str(workdir), args) as agent:
        bin_dir = str(workdir / "bin")
        install(bin_dir, agent.socket_path, native=shim_kind == "native")
        exe = os.path.join(bin_dir, "host-local")
        with store_locked(node.ipam_dir):
            started = time.monotonic()
            slow = Background(
                exe, "ADD", host_local_conf(node.ipam_dir), node=node, netns=node.pod(), container_id="slow"
            )
            wait_for(lambda: in_flight(agent) == 1, what="the request to be in flight")
            busy = run_plugin(
                exe, "ADD", host_local_conf(node.ipam_dir), node=node, netns=node.pod(), container_id="busy"
            )
            assert busy.code == 1 and busy.out["code"] == 11 and "busy" in busy.out["msg"], busy
            status_conf = dict(host_local_conf(node.ipam_dir, "1.1.0"))
            quick = time.monotonic()
            status = run_plugin(exe, "STATUS", status_conf, node=node)
            assert status.code == 0, status
            assert time.monotonic() - quick < 1.0
            timed_out = slow.result(30)
            assert timed_out.code == 1 and timed_out.out["code"] == 11 and "timed out" in timed_out.out["msg"]
            assert 1.4 < slow.finished_at - started < 10
            assert leases(node.ipam_dir) == {}
        # The timed-out work was not cancelled (it cannot be): it finishes once the lock is free,
        # keeping its slot until then; a DEL cleans it up as after any failed ADD.
        wait_for(lambda: leases(node.ipam_dir) == {"10.91.0.2": "slow"}, what="the abandoned ADD to finish")
        wait_for(lambda: in_flight(agent) == 0, what="the slot to be free")
        counters = agent.status()["requests"]
        assert counters["busy"] == 1 and counters["timed_out"] == 1
        delete = run_plugin(
            exe, "DEL", host_local_conf(node.ipam_dir), node=node, netns=node.pod(), container_id="slow"
        )
        assert delete.code == 0 and leases(node.ipam_dir) == {}


# ---- versions and peers ------------------------------------------------------------------------


def test_version_mismatch_is_refused_and_the_shim_runs_cold(agent, shims, make_node, shim_kind):
    from cni_plugins.spec.registry import PLUGINS
    from pycni.agent.shim import native_script, script
    from pycni.install import MARKER, NATIVE_SHIM

    exe = Path(shims) / "host-local-other-release"
    if shim_kind == "native":
        exe.write_text(
            native_script(
                "host-local",
                PLUGINS["host-local"],
                sys.executable,
                f"{MARKER}: test",
                os.path.join(shims, NATIVE_SHIM),
                agent.socket_path,
                version="0.0.0+other",
            )
        )
    else:
        exe.write_text(
            script(
                "host-local",
                PLUGINS["host-local"],
                sys.executable,
                f"{MARKER}: test",
                agent.socket_path,
                version="0.0.0+other",
            )
        )
    exe.chmod(0o755)
    node = make_node()
    outcome = run_plugin(str(exe), "ADD", host_local_conf(node.ipam_dir), node=node, netns="/x", container_id="c1")
    assert outcome.code == 0, outcome
    assert "refused the request (version mismatch" in outcome.err
    assert leases(node.ipam_dir) == {"10.91.0.2": "c1"}
    counters = agent.status()["requests"]
    assert counters["refused"] == 1 and counters["served"] == 0


def _as_nobody(socket_path: str, request: bytes) -> tuple[str, bytes]:
    """Connect and send ``request`` from a child process running as uid/gid 65534."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, talk, report through the pipe, never return
        code = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                try:
                    sock.connect(socket_path)
                except OSError as exc:
                    os.write(write_end, f"connect:{exc.errno}".encode())
                else:
                    answer = b""
                    try:  # the agent answers a refused peer without reading its request, then hangs up
                        sock.sendall(request)
                        while chunk := sock.recv(65536):
                            answer += chunk
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    os.write(write_end, b"answer:" + answer)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 65536):
        data += chunk
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    kind, _, rest = data.partition(b":")
    return kind.decode(), rest


def test_only_root_may_talk_to_the_agent(workdir):
    from pycni.agent import protocol

    # The socket goes where any user can reach its directory (pytest's own tree is root-only).
    reachable = tempfile.mkdtemp(prefix="pycni-agent-test-", dir="/tmp")
    try:
        with running_agent(str(workdir), socket_path=os.path.join(reachable, "run", "agent.sock")) as agent:
            request = protocol.request(protocol.pycni_version(), protocol.KIND_STATUS, "", {}, b"")
            # The socket's directory (created by the agent) and the socket are root's only: another
            # user cannot even connect.
            directory = os.path.dirname(agent.socket_path)
            assert os.stat(directory).st_mode & 0o777 == 0o700
            assert os.stat(agent.socket_path).st_mode & 0o777 == 0o600
            os.chmod(reachable, 0o755)
            assert _as_nobody(agent.socket_path, request) == ("connect", b"13")  # EACCES
            # Even through a socket someone opened up by mistake, the agent checks the peer (SO_PEERCRED).
            os.chmod(directory, 0o755)
            os.chmod(agent.socket_path, 0o666)
            kind, rest = _as_nobody(agent.socket_path, request)
            assert kind == "answer" and rest[:1] == protocol.REFUSED and b"root only" in rest, (kind, rest)
            assert agent.status()["requests"]["denied"] == 1
    finally:
        shutil.rmtree(reachable, ignore_errors=True)


NOBODY = ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--")


def test_agent_status_from_another_user_is_refused_and_reported(workdir):
    """`pycni agent status` run as uid 65534 against a running agent: refused, and the command says so.

    Through the agent's own 0700/0600 socket the other user cannot even connect; through a socket opened
    up by mistake the agent itself refuses the peer (SO_PEERCRED) and tells it why. Root is served."""
    pycni = os.path.join(os.path.dirname(sys.executable), "pycni")
    reachable = tempfile.mkdtemp(prefix="pycni-agent-test-", dir="/tmp")
    try:
        os.chmod(reachable, 0o755)
        with running_agent(str(workdir), socket_path=os.path.join(reachable, "run", "agent.sock")) as agent:
            command = [pycni, "agent", "status", "--socket", agent.socket_path]

            def as_nobody() -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [*NOBODY, *command], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd="/"
                )

            closed = as_nobody()
            assert closed.returncode == 1 and closed.stdout == "", closed
            assert closed.stderr == f"Error: no pycni agent at {agent.socket_path}: Permission denied\n", closed
            os.chmod(os.path.dirname(agent.socket_path), 0o755)
            os.chmod(agent.socket_path, 0o666)
            refused = as_nobody()
            assert refused.returncode == 1 and refused.stdout == "", refused
            assert refused.stderr == "Error: permission denied: the agent serves root only\n", refused
            assert agent.status()["requests"]["denied"] == 1
            assert "refused a connection from pid" in agent.log_text() and "uid 65534" in agent.log_text()
            served = subprocess.run(command, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            assert served.returncode == 0 and "alive:    yes" in served.stdout, served
    finally:
        shutil.rmtree(reachable, ignore_errors=True)


def test_a_second_agent_on_the_same_socket_is_refused_and_unsafe_directories_too(agent, workdir):
    second = AgentProcess(agent.socket_path, str(workdir / "second.log"), agent.ns_name)
    second.start(wait=False)
    assert second.proc.wait(30) == 1
    assert "another pycni agent is serving" in second.log_text()
    assert agent.status()["pid"] == agent.pid
    open_dir = workdir / "open"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    third = AgentProcess(str(open_dir / "agent.sock"), str(workdir / "third.log"), agent.ns_name)
    third.start(wait=False)
    assert third.proc.wait(30) == 1
    assert "not be writable by group or others" in third.log_text()


def test_status_command_reports_latency_per_plugin_and_command(agent, shims, make_node):
    node = make_node()
    for cid in ("c1", "c2", "c3"):
        run_plugin(
            os.path.join(shims, "host-local"),
            "ADD",
            host_local_conf(node.ipam_dir),
            node=node,
            netns=node.pod(),
            container_id=cid,
        )
    pycni = os.path.join(os.path.dirname(sys.executable), "pycni")
    text = subprocess.run(
        [pycni, "agent", "status", "--socket", agent.socket_path],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "alive:    yes" in text and "3 served" in text
    row = next(line for line in text.splitlines() if line.startswith("host-local"))
    assert row.split()[:4] == ["host-local", "ADD", "3", "0"]
    doc = json.loads(
        subprocess.run(
            [pycni, "agent", "status", "--socket", agent.socket_path, "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    )
    figures = doc["latency"]["host-local"]["ADD"]
    assert doc["alive"] and doc["pid"] == agent.pid and figures["count"] == 3
    assert 0 < figures["p50_ms"] <= figures["p99_ms"]
    gone = subprocess.run(
        [pycni, "agent", "status", "--socket", str(Path(agent.socket_path).with_name("x.sock"))],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert gone.returncode == 1 and "no pycni agent" in gone.stderr
