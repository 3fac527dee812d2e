"""A small client for the CRI v1 RuntimeService (what the kubelet drives), over containerd's socket.

The messages come from ``cri_api.proto`` (next to this file), compiled with
grpcio-tools into a cache directory on first use (``load_api``), so nothing
generated is checked in.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

PROTO = Path(__file__).with_name("cri_api.proto")
MODULE = "cri_api"


def missing() -> str | None:
    """None if grpcio and grpcio-tools are installed, else why the CRI suite cannot run."""
    for name, package in (("grpc", "grpcio"), ("grpc_tools", "grpcio-tools")):
        try:
            importlib.import_module(name)
        except ImportError:
            return f"{package} is not installed (pip install -e '.[test]')"
    return None


def load_api(cache_dir: str | os.PathLike[str]) -> tuple[ModuleType, ModuleType]:
    """Compile cri_api.proto (once per content) into cache_dir; its (messages, grpc stubs) modules."""
    source = PROTO.read_bytes()
    out = Path(cache_dir) / f"cri-{hashlib.sha256(source).hexdigest()[:12]}"
    if not (out / f"{MODULE}_pb2_grpc.py").exists():
        from grpc_tools import protoc
        import grpc_tools

        out.mkdir(parents=True, exist_ok=True)
        proto_copy = out / PROTO.name
        proto_copy.write_bytes(source)
        include = Path(grpc_tools.__file__).parent / "_proto"
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{out}",
                f"-I{include}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                str(proto_copy),
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed ({rc}) on {PROTO}")
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    return importlib.import_module(f"{MODULE}_pb2"), importlib.import_module(f"{MODULE}_pb2_grpc")


@dataclass
class Pod:
    """A sandbox the test ran: its ID, the config it was run with (CreateContainer needs it again)."""

    id: str
    name: str
    config: Any
    containers: list[str] = field(default_factory=list)


class CRIClient:
    def __init__(self, socket_path: str | os.PathLike[str], api_cache: str | os.PathLike[str], *, timeout: float = 60):
        import grpc

        self.pb, grpc_mod = load_api(api_cache)
        self.channel = grpc.insecure_channel(f"unix://{os.fspath(socket_path)}")
        self.stub = grpc_mod.RuntimeServiceStub(self.channel)
        self.images = grpc_mod.ImageServiceStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        return getattr(self.stub, method)(request, timeout=timeout or self.timeout)

    # ---- runtime ------------------------------------------------------------------
    def version(self) -> Any:
        return self._call("Version", self.pb.VersionRequest(version="v1"), timeout=5)

    def conditions(self) -> dict[str, tuple[bool, str]]:
        status = self._call("Status", self.pb.StatusRequest(verbose=False), timeout=5).status
        return {c.type: (c.status, c.message) for c in status.conditions}

    def has_image(self, ref: str) -> bool:
        """Whether the CRI plugin knows ref (it learns of imported images asynchronously)."""
        reply = self.images.ImageStatus(self.pb.ImageStatusRequest(image=self.pb.ImageSpec(image=ref)), timeout=5)
        return bool(reply.image.id)

    # ---- sandboxes ------------------------------------------------------------------
    def sandbox_config(
        self,
        name: str,
        *,
        port_mappings: list[tuple[int, int, str]] = (),
        annotations: dict[str, str] | None = None,
        cgroup_parent: str = "",
        log_directory: str = "",
        namespace: str = "e2e",
    ) -> Any:
        pb = self.pb
        protocols = {"tcp": pb.TCP, "udp": pb.UDP, "sctp": pb.SCTP}
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=str(uuid.uuid4()), namespace=namespace, attempt=0),
            hostname=name,
            log_directory=log_directory,
            port_mappings=[
                pb.PortMapping(protocol=protocols[proto], container_port=cport, host_port=hport)
                for hport, cport, proto in port_mappings
            ],
            labels={"app": "pycni-e2e", "pod": name},
            annotations=annotations or {},
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=cgroup_parent,
                security_context=pb.LinuxSandboxSecurityContext(
                    namespace_options=pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD)
                ),
            ),
        )

    def run_pod(self, name: str, **config: Any) -> Pod:
        sandbox = self.sandbox_config(name, **config)
        reply = self._call("RunPodSandbox", self.pb.RunPodSandboxRequest(config=sandbox))
        return Pod(reply.pod_sandbox_id, name, sandbox)

    def pod_status(self, pod_id: str, verbose: bool = False) -> Any:
        return self._call("PodSandboxStatus", self.pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose))

    def pod_ip(self, pod_id: str) -> str:
        return self.pod_status(pod_id).status.network.ip

    def pod_info(self, pod_id: str) -> dict[str, Any]:
        """containerd's verbose sandbox info (pid, netns path, the CNI result, ...)."""
        info = self.pod_status(pod_id, verbose=True).info.get("info", "{}")
        return json.loads(info)

    def stop_pod(self, pod_id: str) -> None:
        self._call("StopPodSandbox", self.pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))

    def remove_pod(self, pod_id: str) -> None:
        self._call("RemovePodSandbox", self.pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    def list_pods(self) -> list[Any]:
        return list(self._call("ListPodSandbox", self.pb.ListPodSandboxRequest()).items)

    # ---- containers -----------------------------------------------------------------
    def start_container(self, pod: Pod, name: str, image: str, command: list[str]) -> str:
        pb = self.pb
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=0),
            image=pb.ImageSpec(image=image),
            command=command,
            log_path=f"{name}.log",
            linux=pb.LinuxContainerConfig(
                security_context=pb.LinuxContainerSecurityContext(
                    namespace_options=pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD)
                )
            ),
        )
        reply = self._call(
            "CreateContainer",
            pb.CreateContainerRequest(pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config),
        )
        self._call("StartContainer", pb.StartContainerRequest(container_id=reply.container_id))
        pod.containers.append(reply.container_id)
        return reply.container_id

    def container_state(self, container_id: str) -> Any:
        return self._call("ContainerStatus", self.pb.ContainerStatusRequest(container_id=container_id)).status

    def exec_sync(self, container_id: str, cmd: list[str], timeout: int = 10) -> tuple[int, str, str]:
        reply = self._call(
            "ExecSync",
            self.pb.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=timeout),
            timeout=timeout + 10,
        )
        return reply.exit_code, reply.stdout.decode(errors="replace"), reply.stderr.decode(errors="replace")
