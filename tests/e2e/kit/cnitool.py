"""cnitool, built once with Debian's Go from libcni in golang-github-containernetworking-cni-dev.

Debian 12 packages libcni (``golang-github-appc-cni-dev``, which provides
``golang-github-containernetworking-cni-dev``) under /usr/share/gocode but not
cnitool's main package, so ``cnitool/main.go`` here is the command, built in
GOPATH mode (GO111MODULE=off, GOPROXY=off: offline) into a cache directory
keyed by the source's hash. ``build()`` raises Unavailable when the machine lacks Go or libcni
(a skip) and BuildFailed when they are there and the build fails (a failure: a compile error is a bug).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("cnitool") / "main.go"
GOCODE = Path("/usr/share/gocode")
LIBCNI = GOCODE / "src/github.com/containernetworking/cni/libcni"


class Unavailable(Exception):
    """cnitool cannot be built here: a tool or package the machine lacks (the reason is the message)."""


class BuildFailed(Exception):
    """Go and libcni are there but ``go build`` failed (a compile error, say): a failure, never a skip."""


def build(cache_dir: str | os.PathLike[str]) -> Path:
    """The cnitool executable, built into cache_dir unless already there for this source."""
    go = shutil.which("go")
    if go is None:
        raise Unavailable("Go is not installed (Debian package golang-go)")
    if not LIBCNI.is_dir():
        raise Unavailable(
            f"libcni is not in {LIBCNI} "
            "(Debian package golang-github-containernetworking-cni-dev / golang-github-appc-cni-dev)"
        )
    digest = hashlib.sha256(SOURCE.read_bytes() + str(sorted(p.name for p in LIBCNI.iterdir())).encode())
    out_dir = Path(cache_dir) / "cnitool"
    exe = out_dir / f"cnitool-{digest.hexdigest()[:12]}"
    if os.access(exe, os.X_OK):
        return exe
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(out_dir),
        "GOPATH": str(GOCODE),
        "GO111MODULE": "off",
        "GOFLAGS": "",
        "GOPROXY": "off",
        "CGO_ENABLED": "0",
        "GOCACHE": str(out_dir / "gocache"),
        "GOTMPDIR": "",
        "GOTOOLCHAIN": "local",
    }
    # A name of this build's own: two suites building at once each write their own file, then rename.
    tmp = exe.with_name(f"{exe.name}.{os.getpid()}.{os.urandom(4).hex()}.partial")
    try:
        proc = subprocess.run(
            [go, "build", "-o", str(tmp), str(SOURCE)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            cwd=str(out_dir),
        )
        if proc.returncode != 0:
            raise BuildFailed(f"go build of cnitool failed offline: {proc.stderr.strip()[-1500:]}")
        os.replace(tmp, exe)
    finally:
        if tmp.exists():
            tmp.unlink()
    return exe
