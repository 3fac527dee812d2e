"""A tiny busybox image built offline from Debian's busybox-static, as a docker-archive tarball.

The layer is a rootfs: the static ``/bin/busybox``, a symlink per applet, an
``/etc/passwd`` and the usual empty mount points. The archive (``manifest.json``,
an image config, the layer) is the ``docker save`` format that both
``ctr images import`` and ``podman load`` read, with one tag per name in ``TAGS``:
the workload image and the CRI sandbox ("pause") image are the same busybox,
whose default command sleeps.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

BUSYBOX = "/bin/busybox"
IMAGE = "pycni.test/busybox:e2e"
PAUSE_IMAGE = "pycni.test/pause:e2e"
TAGS = (IMAGE, PAUSE_IMAGE)
# The sandbox container's process: it only has to live until the sandbox is stopped (bounded anyway).
PAUSE_COMMAND = ["/bin/sleep", "86400"]


def available() -> str | None:
    """None if the image can be built, else why not."""
    if not os.access(BUSYBOX, os.X_OK):
        return f"{BUSYBOX} missing (Debian package busybox-static)"
    return None


def _applets() -> list[str]:
    out = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout
    return sorted({name for name in out.split() if name and "/" not in name and name != "busybox"})


def _add(
    tar: tarfile.TarFile,
    name: str,
    *,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    mode: int = 0o644,
    link: str = "",
) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.uid, info.gid = kind, mode, 0, 0, 0
    if kind == tarfile.SYMTYPE:
        info.linkname = link
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def rootfs_layer() -> bytes:
    """The layer tarball (uncompressed): busybox and its applets, /etc, mount points."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for directory, mode in (
            ("bin", 0o755),
            ("etc", 0o755),
            ("dev", 0o755),
            ("proc", 0o755),
            ("sys", 0o755),
            ("root", 0o700),
            ("tmp", 0o1777),
            ("var", 0o755),
            ("www", 0o755),
        ):
            _add(tar, directory, kind=tarfile.DIRTYPE, mode=mode)
        _add(tar, "bin/busybox", data=Path(BUSYBOX).read_bytes(), mode=0o755)
        for applet in _applets():
            _add(tar, f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox", mode=0o777)
        _add(tar, "etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        _add(tar, "etc/group", data=b"root:x:0:\nnogroup:x:65534:\n")
        _add(tar, "www/index.html", data=b"pycni e2e\n")
    return buffer.getvalue()


def docker_archive(path: str | os.PathLike[str], tags: tuple[str, ...] = TAGS) -> Path:
    """Write the image as a docker-archive tarball to path (once; an existing file is kept)."""
    path = Path(path)
    if path.exists():
        return path
    layer = rootfs_layer()
    layer_digest = hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/bin"], "Cmd": PAUSE_COMMAND, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "pycni tests/e2e: busybox-static rootfs"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = f"{hashlib.sha256(config_bytes).hexdigest()}.json"
    manifest = [{"Config": config_name, "RepoTags": list(tags), "Layers": [f"{layer_digest}/layer.tar"]}]
    # A name of this writer's own: another copy of the suite may be writing the same archive right now.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(4).hex()}.partial")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, f"{layer_digest}", kind=tarfile.DIRTYPE, mode=0o755)
        _add(tar, f"{layer_digest}/layer.tar", data=layer)
        _add(tar, config_name, data=config_bytes)
        _add(tar, "manifest.json", data=json.dumps(manifest).encode())
    os.replace(tmp, path)
    return path
