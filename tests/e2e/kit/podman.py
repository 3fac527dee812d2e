"""podman 4.3 on its CNI network backend, run by the test inside a Host, with private everything.

``containers.conf`` (``CONTAINERS_CONF``) selects ``network_backend = "cni"``,
``cni_plugin_dirs`` = the plugin directory under test and a private
``network_config_dir``; storage (vfs), run root, tmp dir, events log,
registries and signature policy are private too (``CONTAINERS_STORAGE_CONF``,
``CONTAINERS_REGISTRIES_CONF``, ``--signature-policy``), so nothing under
/etc/containers, /var/lib/containers or /run/containers is read or written.
Containers go under a cgroup parent of the test's own. The run root and tmp
dir live in the host's private /run (podman refuses a run root longer than 50
characters, too short for a test's temporary directory).
"""

from __future__ import annotations

import json
import resource
import shutil
from pathlib import Path
from typing import Sequence

from . import image
from .host import Host

PODMAN = "podman"
# In the host's private /run (kit/host.py), so short enough for podman and gone with the host.
RUN_ROOT = "/run/e2e-podman/run"
TMP_DIR = "/run/e2e-podman/tmp"


def missing() -> str | None:
    for tool, package in ((PODMAN, "podman"), ("conmon", "conmon")):
        if shutil.which(tool) is None and not Path("/usr/libexec/podman/conmon").exists():
            return f"{tool} not found (Debian package {package})"
    if not any(shutil.which(r) for r in ("crun", "runc")):
        return "no OCI runtime (Debian package crun or runc)"
    return None


def oci_runtime() -> str:
    # runc first: crun 1.8 refuses hosts with cgroup v1 hierarchies beside a v2 one ("hybrid mode").
    return "runc" if shutil.which("runc") else "crun"


def containers_conf(root: Path, *, bin_dir: Path, conf_dir: Path, network: str) -> str:
    q = lambda p: json.dumps(str(p))  # noqa: E731 (a TOML basic string is a JSON string)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ulimits = json.dumps([f"nofile={min(soft, 4096)}:{min(hard, 4096)}", "nproc=4096:4096"])
    return f"""# podman config written by pycni's tests/e2e: everything private to {root}
[containers]
log_driver = "k8s-file"
netns = "bridge"
cgroupns = "private"
userns = "host"
default_sysctls = []
# podman's defaults for nofile/nproc can be above what this machine lets a process set without
# CAP_SYS_RESOURCE (crun: setrlimit EPERM); these are small and always allowed
default_ulimits = {ulimits}

[network]
network_backend = "cni"
cni_plugin_dirs = [{q(bin_dir)}]
network_config_dir = {q(conf_dir)}
default_network = {q(network)}

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = {q(root / "events.log")}
tmp_dir = {q(TMP_DIR)}
static_dir = {q(root / "static")}
volume_path = {q(root / "volumes")}
runtime = {q(oci_runtime())}
no_pivot_root = false
"""


class Podman:
    """podman commands in a Host with a private configuration under root."""

    def __init__(self, host: Host, root: Path, *, bin_dir: Path, conf_dir: Path, network: str, cgroup_parent: str):
        self.host, self.root = host, Path(root)
        self.network, self.cgroup_parent = network, cgroup_parent
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "containers.conf").write_text(
            containers_conf(self.root, bin_dir=Path(bin_dir), conf_dir=Path(conf_dir), network=network)
        )
        (self.root / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = {json.dumps(str(self.root / "storage"))}\n'
            f"runroot = {json.dumps(RUN_ROOT)}\n"
        )
        (self.root / "registries.conf").write_text("unqualified-search-registries = []\n")
        (self.root / "policy.json").write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        self.env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.root),
            "XDG_CONFIG_HOME": str(self.root / "xdg"),
            "CONTAINERS_CONF": str(self.root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.root / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(self.root / "registries.conf"),
        }

    def argv(self, *args: str) -> list[str]:
        return [
            PODMAN,
            "--root",
            str(self.root / "storage"),
            "--runroot",
            RUN_ROOT,
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            "--tmpdir",
            TMP_DIR,
            *args,
        ]

    def __call__(self, *args: str, check: bool = True, timeout: float = 120):
        return self.host.run(*self.argv(*args), check=check, timeout=timeout, env=self.env)

    def load_image(self, archive: Path) -> None:
        self("load", "--signature-policy", str(self.root / "policy.json"), "--input", str(archive))

    def run_detached(
        self, name: str, command: Sequence[str], *, publish: Sequence[str] = (), extra: Sequence[str] = ()
    ) -> str:
        args = [
            "run",
            "-d",
            "--name",
            name,
            "--hostname",
            name,
            "--network",
            self.network,
            "--cgroup-parent",
            self.cgroup_parent,
            "--pull",
            "never",
        ]
        for spec in publish:
            args += ["-p", spec]
        out = self(*args, *extra, image.IMAGE, *command).stdout
        return out.strip().splitlines()[-1]

    def ip_of(self, name: str) -> str:
        out = self("inspect", "--format", "{{json .NetworkSettings.Networks}}", name).stdout
        return json.loads(out)[self.network]["IPAddress"]

    def remove_all(self) -> list[str]:
        """Remove every container (stopping them: the plugins' DEL runs); the errors, if any."""
        proc = self("rm", "--force", "--all", "--time", "0", check=False)
        return [] if proc.returncode == 0 else [f"podman rm -af: {proc.stderr.strip()[-1500:]}"]

    def close(self) -> list[str]:
        errors = self.remove_all()
        self.host.stop_processes()
        return errors
