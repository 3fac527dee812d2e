"""End to end: real runtimes with pycni's plugins and with the reference ones, in the same run.

Two figures, each pycni (cold: `pycni install --no-agent`, what a node without
the agent runs) against the reference Go plugins in /usr/lib/cni, with the
same conflist (bridge + portmap + bandwidth, host-local IPAM), and under
``warm/`` the same for pycni's shims served by a `pycni agent` that runs in
the runtime's host (its network and mount namespaces, as a node's agent
would; the shims are those of the bench's warm side: the compiled shim of the
default `pycni install`, unless install fell back to the Python shim):

- ``podman run --rm``: a trivial busybox container (``true``) on the CNI
  network, podman 4.3 on its CNI backend; wall time of the whole command.
- ``cri sandbox``: containerd 1.6 through the CRI API, RunPodSandbox,
  StopPodSandbox, RemovePodSandbox (the kubelet's calls for a pod without
  containers), timed each and as a cycle; ``plain`` without port mappings or
  bandwidth annotations, ``hostport`` with one port mapping, and
  ``hostport+bandwidth`` with the kubelet's bandwidth annotations as well (what
  containerd then sends: see tests/e2e/test_containerd_cri.py). A side that
  fails records the error instead of figures.

Each side runs in a host namespace of its own, with its own runtime instance
and private directories (tests/e2e/kit): nothing touches the root network
namespace, and everything is removed at the end. Sides alternate per iteration
and one untimed warm-up iteration runs first. ``run(mode)`` takes the bench
mode (smoke: 2 iterations, quick: 5, full: 10), a Context, or an int.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.e2e.kit import conflist, containerd as containerd_kit, image, plugins, podman as podman_kit, procs  # noqa: E402
from tests.e2e.kit.host import Host  # noqa: E402

from ..stats import pair  # noqa: E402

ITERATIONS = {"smoke": 2, "quick": 5, "full": 10}
COLD, WARM, REFERENCE = "pycni", "pycni-warm", "reference"
AGENT_READY_TIMEOUT = 30.0


def _iterations(mode: Any) -> int:
    if isinstance(mode, int):
        return mode
    if hasattr(mode, "settings"):  # a bench Context
        mode = mode.settings.mode
    return ITERATIONS.get(str(mode), ITERATIONS["quick"])


def _describe(exc: BaseException) -> str:
    """A failed step in one line: a gRPC error's details (the runtime's message), else the exception."""
    details = getattr(exc, "details", None)
    text = details() if callable(details) else str(exc)
    return " ".join(str(text).split())[:600]


def _figure(samples: dict[str, list[float]], side: str, errors: dict[str, str]) -> dict[str, Any]:
    figure = pair(samples[side], samples[REFERENCE], "ms", 1000)
    mine = {name: why for name, why in errors.items() if name in (side, REFERENCE)}
    if mine:
        figure["errors"] = mine
    return figure


class _Side:
    """One side's host, plugin directory and per-runtime state (and, warm, the host's agent)."""

    def __init__(self, name: str, work: Path, bin_dir: Path | None = None, native: bool = False):
        self.name, self.work = name, work
        self.host = Host(work / "host")
        self.agent = None
        try:
            self.data_dir = work / "ipam"
            self.conf_dir = conflist.write(work / "net.d", self.data_dir).parent
            self.cgroup = f"pycni-bench-{uuid.uuid4().hex[:10]}"
            if bin_dir is None:  # warm: shims for an agent living in this host
                socket_path = str(work / "agent.sock")
                bin_dir, _ = plugins.install_pycni(work / "bin", agent_socket=socket_path, native=native)
                self.agent = self.host.popen(
                    [plugins.pycni_command(), "agent", "--socket", socket_path, "--log-level", "warning"],
                    log=work / "agent.log",
                )
                self.host.resident.add(self.agent.pid)  # outlives each runtime's clean-up
                _wait_for_socket(socket_path, self.agent)
            self.bin_dir = bin_dir
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            procs.stop_popen(self.agent)
            self.host.close()
        finally:
            if getattr(self, "cgroup", ""):
                procs.remove_cgroup(self.cgroup)


def _wait_for_socket(path: str, agent: Any) -> None:
    deadline = time.monotonic() + AGENT_READY_TIMEOUT
    while not os.path.exists(path):
        if agent.poll() is not None:
            raise RuntimeError(f"pycni agent exited with {agent.returncode} before serving {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"pycni agent did not serve {path} within {AGENT_READY_TIMEOUT:g} s")
        time.sleep(0.05)


def _measure(
    sides: dict[str, _Side],
    n: int,
    setup: Callable[[_Side], Any],
    steps: Callable[[_Side, Any, int], dict[str, float]],
    label: str,
) -> dict[str, Any]:
    """Run steps(side, state, i) -> {figure: seconds} for a warm-up and n iterations per side, alternating."""
    samples: dict[str, dict[str, list[float]]] = {}
    errors: dict[str, str] = {}
    states: dict[str, Any] = {}
    try:
        for name, side in sides.items():
            try:
                states[name] = setup(side)
            except Exception as exc:
                errors[name] = f"set-up failed: {_describe(exc)}"
        names = list(sides)
        for i in range(n + 1):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                if name in errors or name not in states:
                    continue
                try:
                    timed = steps(sides[name], states[name], i)
                except Exception as exc:
                    errors[name] = f"iteration {i}: {_describe(exc)}"
                    continue
                if i == 0:
                    continue  # warm-up
                for figure, seconds in timed.items():
                    samples.setdefault(figure, {s: [] for s in names})[name].append(seconds)
    finally:
        for state in states.values():
            closer = getattr(state, "stop", None) or getattr(state, "close", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer()
    print(f"  e2e: {label} done", file=sys.stderr, flush=True)
    if not samples:
        return {"errors": errors}
    out = {figure: _figure(by_side, COLD, errors) for figure, by_side in samples.items()}
    if WARM in sides:
        out.update({f"warm/{figure}": _figure(by_side, WARM, errors) for figure, by_side in samples.items()})
    return out


def run(mode: Any = "quick") -> dict[str, Any]:
    n = _iterations(mode)
    warm = getattr(mode, "warm", None) is not None  # a bench Context with its warm side
    native = bool(getattr(mode, "warm_native", False))
    missing = [
        r for r in (image.available(), containerd_kit.missing(), podman_kit.missing(), plugins.reference_missing()) if r
    ]
    if os.geteuid() != 0:
        missing.append("needs root")
    if missing:
        return {"skipped": "; ".join(missing)}
    work = Path(tempfile.mkdtemp(prefix="pycni-bench-e2e-"))
    sides: dict[str, _Side] = {}
    try:
        archive = image.docker_archive(work / "busybox.tar")
        pycni_dir, borrowed = plugins.install_pycni(work / "pycni-bin")
        sides[COLD] = _Side(COLD, work / COLD, pycni_dir)
        sides[REFERENCE] = _Side(REFERENCE, work / REFERENCE, plugins.reference_dir())
        figures: dict[str, Any] = {"iterations": n, "pycni_path": "cold (pycni install --no-agent)"}
        if warm:
            sides[WARM] = _Side(WARM, work / WARM, native=native)
            figures["warm_path"] = (
                f"pycni agent in the runtime's host, "
                f"{'native' if native else 'Python'} shims (pycni install --agent-socket)"
            )
        if borrowed:
            figures["borrowed_reference_plugins"] = borrowed

        # ---- podman run --rm ---------------------------------------------------------
        def podman_setup(side: _Side):
            runtime = podman_kit.Podman(
                side.host,
                side.work / "podman",
                bin_dir=side.bin_dir,
                conf_dir=side.conf_dir,
                network=conflist.NETWORK,
                cgroup_parent="/" + side.cgroup,
            )
            runtime.load_image(archive)
            return runtime

        def podman_step(side: _Side, runtime, i: int) -> dict[str, float]:
            start = time.perf_counter()
            proc = runtime(
                "run",
                "--rm",
                "--network",
                conflist.NETWORK,
                "--cgroup-parent",
                "/" + side.cgroup,
                image.IMAGE,
                "true",
                check=False,
            )
            elapsed = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"podman run --rm: {proc.stderr.strip()[-400:]}")
            return {"podman run --rm": elapsed}

        figures.update(_measure(sides, n, podman_setup, podman_step, "podman run --rm"))

        # ---- CRI sandbox run / stop / remove ---------------------------------------------
        def cri_setup(side: _Side):
            runtime = containerd_kit.Containerd(
                side.host,
                side.work / "containerd",
                bin_dir=side.bin_dir,
                conf_dir=side.conf_dir,
                api_cache=work / "cri-api",
            )
            runtime.start()
            runtime.import_image(archive)
            return runtime

        def cri_steps(ports: bool, shaped: bool):
            label = "cri sandbox " + (
                "+".join(n for n, on in (("hostport", ports), ("bandwidth", shaped)) if on) or "plain"
            )

            def step(side: _Side, runtime, i: int) -> dict[str, float]:
                client = runtime.client
                kwargs = {"cgroup_parent": "/" + side.cgroup, "log_directory": str(side.work / "pods")}
                if ports:
                    kwargs["port_mappings"] = [(8080, 80, "tcp")]
                if shaped:
                    kwargs["annotations"] = {
                        "kubernetes.io/ingress-bandwidth": "10M",
                        "kubernetes.io/egress-bandwidth": "20M",
                    }
                t0 = time.perf_counter()
                pod = client.run_pod(f"bench-{i}", **kwargs)
                t1 = time.perf_counter()
                client.stop_pod(pod.id)
                t2 = time.perf_counter()
                client.remove_pod(pod.id)
                t3 = time.perf_counter()
                return {
                    f"{label}/run": t1 - t0,
                    f"{label}/stop": t2 - t1,
                    f"{label}/remove": t3 - t2,
                    f"{label}/cycle": t3 - t0,
                }

            return label, step

        for ports, shaped in ((False, False), (True, False), (True, True)):
            label, step = cri_steps(ports, shaped)
            figures.update(_measure(sides, n, cri_setup, step, label))
        return figures
    finally:
        for side in sides.values():
            with contextlib.suppress(Exception):
                side.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":  # python -m bench.cases.e2e [N]
    import json

    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else "quick"), indent=2))
