"""The runtime's result cache, in libcni's on-disk layout.

One JSON file per attachment at ``<cacheDir>/results/<network>-<containerID>-<ifname>``
with ``kind: "cniCacheV1"``, so pycni and libcni-based runtimes (cnitool,
containerd, CRI-O) read each other's entries. ``config`` holds the network
configuration's bytes in base64, as Go encodes a byte slice.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field
from typing import Any

from cni_plugins.spec.errors import ERR_DECODE, ERR_IO, CNIError

from cni_plugins.kernel.files import write_atomically

DEFAULT_CACHE_DIR = "/var/lib/cni"
CACHE_KIND = "cniCacheV1"


@dataclass
class CachedAttachment:
    """What the runtime remembers about one container attached to one network."""

    network_name: str
    container_id: str
    ifname: str
    config: bytes = b""
    netns: str = ""
    cni_args: list[tuple[str, str]] = field(default_factory=list)
    capability_args: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": CACHE_KIND,
            "containerId": self.container_id,
            "config": base64.b64encode(self.config).decode("ascii"),
            "ifName": self.ifname,
            "networkName": self.network_name,
        }
        # libcni leaves empty fields out (omitempty); do the same.
        if self.netns:
            out["netns"] = self.netns
        if self.cni_args:
            out["cniArgs"] = [[k, v] for k, v in self.cni_args]
        if self.capability_args:
            out["capabilityArgs"] = self.capability_args
        if self.result is not None:
            out["result"] = self.result
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str) -> "CachedAttachment":
        def text(key: str) -> str:
            value = d.get(key, "")
            if not isinstance(value, str):
                raise CNIError(ERR_DECODE, f"{path}: cache field {key!r} must be a string")
            return value

        try:
            config = base64.b64decode(text("config"), validate=True)
        except (binascii.Error, ValueError):
            raise CNIError(ERR_DECODE, f"{path}: cache field 'config' is not base64") from None
        raw_args = d.get("cniArgs") or []
        if not isinstance(raw_args, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in raw_args
        ):
            raise CNIError(ERR_DECODE, f"{path}: cache field 'cniArgs' must be a list of [key, value] pairs")
        caps = d.get("capabilityArgs") or {}
        result = d.get("result")
        if not isinstance(caps, dict) or (result is not None and not isinstance(result, dict)):
            raise CNIError(ERR_DECODE, f"{path}: cache fields 'capabilityArgs' and 'result' must be objects")
        return cls(
            network_name=text("networkName"),
            container_id=text("containerId"),
            ifname=text("ifName"),
            config=config,
            netns=text("netns"),
            cni_args=[(k, v) for k, v in raw_args],
            capability_args=caps,
            result=result,
        )


class ResultCache:
    """Reads and writes cache entries under ``cache_dir``.

    The default is $CNI_CACHE_DIR, else /var/lib/cni (libcni's default).
    """

    def __init__(self, cache_dir: str | None = None) -> None:
        self.cache_dir = cache_dir or os.environ.get("CNI_CACHE_DIR") or DEFAULT_CACHE_DIR

    @property
    def results_dir(self) -> str:
        return os.path.join(self.cache_dir, "results")

    def path(self, network: str, container_id: str, ifname: str) -> str:
        if not network or not container_id or not ifname:
            raise CNIError(
                ERR_IO,
                "a cache entry needs a network name, a container ID and an "
                f"interface name (got {network!r}, {container_id!r}, {ifname!r})",
            )
        return os.path.join(self.results_dir, f"{network}-{container_id}-{ifname}")

    def save(self, entry: CachedAttachment) -> str:
        """Write ``entry`` atomically (temp file + rename), readable by root only."""
        target = self.path(entry.network_name, entry.container_id, entry.ifname)
        data = json.dumps(entry.to_dict()).encode()
        try:
            os.makedirs(self.results_dir, mode=0o700, exist_ok=True)
            write_atomically(target, data, 0o600)
        except OSError as exc:
            raise CNIError(
                ERR_IO,
                f"cannot write cache entry {target}: {exc.strerror}",
                "check that --cache-dir / CNI_CACHE_DIR is writable",
            ) from None
        return target

    def load(self, network: str, container_id: str, ifname: str) -> CachedAttachment | None:
        """The entry for this attachment; None when there is none.

        A legacy entry (a bare result, as very old libcni wrote) is read as
        an attachment with only a result. A file that is not JSON raises.
        """
        target = self.path(network, container_id, ifname)
        try:
            with open(target, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CNIError(ERR_IO, f"cannot read cache entry {target}: {exc.strerror}") from None
        try:
            parsed = json.loads(data)
        except ValueError:
            raise CNIError(ERR_DECODE, f"cache entry {target} is not valid JSON") from None
        if not isinstance(parsed, dict):
            raise CNIError(ERR_DECODE, f"cache entry {target} is not a JSON object")
        if parsed.get("kind") == CACHE_KIND:
            return CachedAttachment.from_dict(parsed, target)
        if "cniVersion" in parsed:
            return CachedAttachment(network_name=network, container_id=container_id, ifname=ifname, result=parsed)
        raise CNIError(ERR_DECODE, f"cache entry {target} has unknown kind {parsed.get('kind')!r}")

    def remove(self, network: str, container_id: str, ifname: str) -> None:
        _remove_quietly(self.path(network, container_id, ifname))

    def list(self, network: str | None = None) -> list[CachedAttachment]:
        """All readable cniCacheV1 entries, optionally for one network only.

        Unreadable or foreign files are skipped, as libcni's GetCachedAttachments does.
        """
        try:
            names = sorted(os.listdir(self.results_dir))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise CNIError(ERR_IO, f"cannot list {self.results_dir}: {exc.strerror}") from None
        found = []
        for name in names:
            if name.startswith("."):
                continue
            full = os.path.join(self.results_dir, name)
            try:
                with open(full, "rb") as handle:
                    parsed = json.loads(handle.read())
                if not isinstance(parsed, dict) or parsed.get("kind") != CACHE_KIND:
                    continue
                entry = CachedAttachment.from_dict(parsed, full)
            except (OSError, ValueError, CNIError):
                continue
            if not entry.network_name or not entry.ifname or not entry.container_id:
                continue
            if network is not None and entry.network_name != network:
                continue
            found.append(entry)
        return found


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
