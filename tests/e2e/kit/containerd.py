"""containerd 1.6 with its CRI plugin, run by the test inside a Host with a private everything.

The config (``config_toml``) puts containerd's root, state, sockets, runc's
state, the CRI plugin's CNI ``bin_dir``/``conf_dir`` and its pod logs under the
test's directory; the sandbox ("pause") image is the local busybox image the
test imports with ``ctr``, so nothing is pulled. Containers go under a cgroup
parent of the test's own. Stopping removes every sandbox through the CRI (so
the plugins' DEL runs), then stops containerd and anything it left (shims,
containers) by PID.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from . import cri, image, procs
from .host import Host, wait_for

CONTAINERD = "containerd"
CTR = "ctr"
NAMESPACE = "k8s.io"
START_TIMEOUT = 60.0


def missing() -> str | None:
    for tool, package in ((CONTAINERD, "containerd"), (CTR, "containerd"), ("runc", "runc")):
        if shutil.which(tool) is None:
            return f"{tool} not found (Debian package {package})"
    return cri.missing()


def config_toml(root: Path, *, bin_dir: Path, conf_dir: Path, sandbox_image: str = image.PAUSE_IMAGE) -> str:
    q = lambda p: '"' + str(p).replace("\\", "\\\\").replace('"', '\\"') + '"'  # noqa: E731 (TOML string)
    cri_plugin = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""# containerd config written by pycni's tests/e2e: everything private to {root}
version = 2
root = {q(root / "root")}
state = {q(root / "state")}
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp",
                    "io.containerd.internal.v1.tracing"]

[grpc]
  address = {q(root / "containerd.sock")}

[ttrpc]
  address = {q(root / "containerd.sock.ttrpc")}

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[{cri_plugin}]
  sandbox_image = {q(sandbox_image)}
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true
  max_container_log_line_size = 16384

  [{cri_plugin}.containerd]
    snapshotter = "native"
    default_runtime_name = "runc"

    [{cri_plugin}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [{cri_plugin}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = {q(root / "runc")}

  [{cri_plugin}.cni]
    bin_dir = {q(bin_dir)}
    conf_dir = {q(conf_dir)}
    max_conf_num = 1
"""


class Containerd:
    """One containerd in a Host; ``start()``, ``client``, ``stop()``."""

    def __init__(self, host: Host, root: Path, *, bin_dir: Path, conf_dir: Path, api_cache: Path):
        self.host, self.root = host, Path(root)
        self.bin_dir, self.conf_dir, self.api_cache = Path(bin_dir), Path(conf_dir), Path(api_cache)
        self.proc = None
        self.client: cri.CRIClient | None = None

    @property
    def socket(self) -> Path:
        return self.root / "containerd.sock"

    @property
    def log(self) -> Path:
        return self.root / "containerd.log"

    def start(self) -> Containerd:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.toml"
        config.write_text(config_toml(self.root, bin_dir=self.bin_dir, conf_dir=self.conf_dir))
        self.proc = self.host.popen([CONTAINERD, "--config", str(config)], log=self.log)
        wait_for(
            lambda: self.socket.exists() or self.proc.poll() is not None,
            timeout=START_TIMEOUT,
            what=f"containerd's socket ({self.log_tail()})",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"containerd exited ({self.proc.returncode}): {self.log_tail()}")
        self.client = cri.CRIClient(self.socket, self.api_cache)

        def ready() -> bool:
            try:
                conditions = self.client.conditions()
            except Exception:  # the CRI service comes up after the socket
                return False
            return all(conditions.get(c, (False, ""))[0] for c in ("RuntimeReady", "NetworkReady"))

        wait_for(ready, timeout=START_TIMEOUT, what=f"the CRI runtime and network to be ready ({self.log_tail()})")
        return self

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def ctr(self, *args: str, timeout: float = 120) -> str:
        return self.host.run(
            CTR, "--address", str(self.socket), "--namespace", NAMESPACE, *args, timeout=timeout
        ).stdout

    def import_image(self, archive: Path) -> None:
        self.ctr("images", "import", "--snapshotter", "native", "--no-unpack", str(archive))

        wait_for(
            lambda: all(self.client.has_image(tag) for tag in image.TAGS),
            timeout=30,
            what="the CRI plugin to know the imported images",
        )

    def remove_all_pods(self) -> list[str]:
        """Stop and remove every sandbox (the plugins' DEL runs); the errors, if any."""
        errors = []
        if self.client is None:
            return errors
        try:
            pods = self.client.list_pods()
        except Exception as exc:
            return [f"ListPodSandbox: {exc}"]
        for pod in pods:
            for step in (self.client.stop_pod, self.client.remove_pod):
                try:
                    step(pod.id)
                except Exception as exc:
                    errors.append(f"{step.__name__} {pod.id[:12]}: {exc}")
        return errors

    def stop(self) -> list[str]:
        """Remove all sandboxes, stop containerd by PID; what went wrong, if anything."""
        errors = self.remove_all_pods()
        if self.client is not None:
            self.client.close()
            self.client = None
        procs.stop_popen(self.proc, timeout=15)
        # Shims exit once their sandboxes are gone; give them a moment, then stop what is left by PID.
        deadline = time.monotonic() + 5
        while self.host.processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.host.stop_processes()
        return errors
