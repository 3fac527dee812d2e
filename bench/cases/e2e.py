"""End to end: real runtimes with pycni's plugins and with the reference ones, in the same run.

Two figures, each pycni (cold: `pycni install --no-agent`, what a node without
the agent runs) against the reference Go plugins in /usr/lib/cni, with the
same conflist (bridge + portmap + bandwidth, host-local IPAM):

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
SIDES = ("pycni", "reference")


def _iterations(mode: Any) -> int:
    if isinstance(mode, int):
        return mode
    if hasattr(mode, "settings"):   # a bench Context
        mode = mode.settings.mode
    return ITERATIONS.get(str(mode), ITERATIONS["quick"])


def _describe(exc: BaseException) -> str:
    """A failed step in one line: a gRPC error's details (the runtime's message), else the exception."""
    details = getattr(exc, "details", None)
    text = details() if callable(details) else str(exc)
    return " ".join(str(text).split())[:600]


def _figure(samples: dict[str, list[float]], errors: dict[str, str]) -> dict[str, Any]:
    figure = pair(samples["pycni"], samples["reference"], "ms", 1000)
    if errors:
        figure["errors"] = errors
    return figure


class _Side:
    """One side's host, plugin directory and per-runtime state."""

    def __init__(self, name: str, work: Path, bin_dir: Path):
        self.name, self.work, self.bin_dir = name, work, bin_dir
        self.host = Host(work / "host")
        self.data_dir = work / "ipam"
        self.conf_dir = conflist.write(work / "net.d", self.data_dir).parent
        self.cgroup = f"pycni-bench-{uuid.uuid4().hex[:10]}"

    def close(self) -> None:
        try:
            self.host.close()
        finally:
            procs.remove_cgroup(self.cgroup)


def _measure(sides: dict[str, _Side], n: int, setup: Callable[[_Side], Any],
             steps: Callable[[_Side, Any, int], dict[str, float]], label: str) -> dict[str, Any]:
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
        for i in range(n + 1):
            order = SIDES if i % 2 == 0 else SIDES[::-1]
            for name in order:
                if name in errors or name not in states:
                    continue
                try:
                    timed = steps(sides[name], states[name], i)
                except Exception as exc:
                    errors[name] = f"iteration {i}: {_describe(exc)}"
                    continue
                if i == 0:
                    continue   # warm-up
                for figure, seconds in timed.items():
                    samples.setdefault(figure, {s: [] for s in SIDES})[name].append(seconds)
    finally:
        for name, state in states.items():
            closer = getattr(state, "stop", None) or getattr(state, "close", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer()
    print(f"  e2e: {label} done", file=sys.stderr, flush=True)
    if not samples:
        return {"errors": errors}
    return {figure: _figure(by_side, errors) for figure, by_side in samples.items()}


def run(mode: Any = "quick") -> dict[str, Any]:
    n = _iterations(mode)
    missing = [r for r in (image.available(), containerd_kit.missing(), podman_kit.missing(),
                           plugins.reference_missing()) if r]
    if os.geteuid() != 0:
        missing.append("needs root")
    if missing:
        return {"skipped": "; ".join(missing)}
    work = Path(tempfile.mkdtemp(prefix="pycni-bench-e2e-"))
    sides: dict[str, _Side] = {}
    try:
        archive = image.docker_archive(work / "busybox.tar")
        pycni_dir, borrowed = plugins.install_pycni(work / "pycni-bin")
        dirs = {"pycni": pycni_dir, "reference": plugins.reference_dir()}
        for name in SIDES:
            sides[name] = _Side(name, work / name, dirs[name])
        figures: dict[str, Any] = {"iterations": n, "pycni_path": "cold (pycni install --no-agent)"}
        if borrowed:
            figures["borrowed_reference_plugins"] = borrowed

        # ---- podman run --rm ---------------------------------------------------------
        def podman_setup(side: _Side):
            runtime = podman_kit.Podman(side.host, side.work / "podman", bin_dir=side.bin_dir,
                                        conf_dir=side.conf_dir, network=conflist.NETWORK,
                                        cgroup_parent="/" + side.cgroup)
            runtime.load_image(archive)
            return runtime

        def podman_step(side: _Side, runtime, i: int) -> dict[str, float]:
            start = time.perf_counter()
            proc = runtime("run", "--rm", "--network", conflist.NETWORK, "--cgroup-parent", "/" + side.cgroup,
                           image.IMAGE, "true", check=False)
            elapsed = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"podman run --rm: {proc.stderr.strip()[-400:]}")
            return {"podman run --rm": elapsed}

        figures.update(_measure(sides, n, podman_setup, podman_step, "podman run --rm"))

        # ---- CRI sandbox run / stop / remove ---------------------------------------------
        def cri_setup(side: _Side):
            runtime = containerd_kit.Containerd(side.host, side.work / "containerd", bin_dir=side.bin_dir,
                                                conf_dir=side.conf_dir, api_cache=work / "cri-api")
            runtime.start()
            runtime.import_image(archive)
            return runtime

        def cri_steps(ports: bool, shaped: bool):
            label = "cri sandbox " + ("+".join(n for n, on in (("hostport", ports), ("bandwidth", shaped)) if on)
                                      or "plain")

            def step(side: _Side, runtime, i: int) -> dict[str, float]:
                client = runtime.client
                kwargs = {"cgroup_parent": "/" + side.cgroup, "log_directory": str(side.work / "pods")}
                if ports:
                    kwargs["port_mappings"] = [(8080, 80, "tcp")]
                if shaped:
                    kwargs["annotations"] = {"kubernetes.io/ingress-bandwidth": "10M",
                                             "kubernetes.io/egress-bandwidth": "20M"}
                t0 = time.perf_counter()
                pod = client.run_pod(f"bench-{i}", **kwargs)
                t1 = time.perf_counter()
                client.stop_pod(pod.id)
                t2 = time.perf_counter()
                client.remove_pod(pod.id)
                t3 = time.perf_counter()
                return {f"{label}/run": t1 - t0, f"{label}/stop": t2 - t1, f"{label}/remove": t3 - t2,
                        f"{label}/cycle": t3 - t0}
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


if __name__ == "__main__":   # python -m bench.cases.e2e [N]
    import json

    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else "quick"), indent=2))
