"""host-local: IP address management from ranges configured per node, stored on disk.

ADD reserves one address in every range set (a requested address where one
was asked for, otherwise the next free one round-robin) and reports them with
their gateways, the configured routes and the DNS settings of `resolvConf`.
DEL releases what the container's interface holds, CHECK verifies that it
still holds it, GC releases every reservation no valid attachment owns, and
STATUS reports whether the data directory can take new reservations.

The functions ``allocate``, ``release``, ``check``, ``gc`` and ``status`` are
the in-process API (used by bridge and vxlan when their IPAM is host-local);
they take the whole network configuration, exactly as the plugin reads it from
stdin, and give the same results as executing the plugin.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from cni_plugins.spec.errors import (
    ERR_INTERNAL,
    ERR_INVALID_CONFIG,
    ERR_INVALID_ENV,
    ERR_IO,
    ERR_PLUGIN_NOT_AVAILABLE,
    CNIError,
)
from cni_plugins.spec.skel import (
    GC_ATTACHMENT_KEYS,
    CmdArgs,
    PluginFuncs,
    gc_attachments,
    plugin_main,
    validate_container_id,
    validate_interface_name,
    validate_network_name,
)
from cni_plugins.spec.version import require_supported


if TYPE_CHECKING:  # the command functions import these: VERSION needs none of them
    from cni_plugins.spec.types import IPConfig, Result

    from .config import IPAMConfig
    from .ranges import IPAddress
    from .store import DiskStore


@contextmanager
def _io_errors() -> Iterator[None]:
    """Report file-system failures as the spec's I/O error, also to in-process callers."""
    try:
        yield
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise CNIError(
            ERR_IO, f"host-local store: {exc.strerror or exc}{where}", "check that ipam.dataDir is a writable directory"
        ) from None


def _config(conf: dict[str, Any], cni_args: str = "") -> IPAMConfig:
    from .config import load_ipam_config

    return load_ipam_config(conf, cni_args)


def _load(conf: dict[str, Any], cni_args: str = "") -> IPAMConfig:
    """The configuration, checked as the skeleton checks it for the executable:
    in-process callers do not pass through the skeleton."""
    validate_network_name(conf.get("name"))
    cfg = _config(conf, cni_args)
    require_supported(cfg.cni_version)
    return cfg


def _validate_attachment(container_id: str, ifname: str) -> None:
    validate_container_id(container_id)
    validate_interface_name(ifname)
    try:  # the skeleton refuses these in CNI_IFNAME; in-process callers get the same answer
        ifname.encode("utf-8")
    except UnicodeEncodeError:
        raise CNIError(ERR_INVALID_ENV, "interface name is not valid UTF-8", repr(ifname)) from None
    if "\x00" in ifname:
        raise CNIError(ERR_INVALID_ENV, "interface name contains a NUL character", repr(ifname))


# ---- ADD -----------------------------------------------------------------


def allocate(conf: dict[str, Any], container_id: str, ifname: str, cni_args: str = "") -> Result:
    """Reserve one address per range set for the container's interface."""
    cfg = _load(conf, cni_args)
    _validate_attachment(container_id, ifname)
    return _allocate(cfg, container_id, ifname)


def _allocate(cfg: IPAMConfig, container_id: str, ifname: str) -> Result:
    from cni_plugins.spec.types import Result

    from .store import DiskStore

    result = Result(cni_version=cfg.cni_version, routes=list(cfg.routes))
    if cfg.resolv_conf:
        from .resolvconf import parse_resolv_conf

        result.dns = parse_resolv_conf(cfg.resolv_conf)
    with _io_errors():
        store = DiskStore(cfg.name, cfg.data_dir)
        with store.locked():
            result.ips = _reserve_all(cfg, store, container_id, ifname)
    return result


def _reserve_all(cfg: IPAMConfig, store: DiskStore, container_id: str, ifname: str) -> list[IPConfig]:
    from cni_plugins.spec.types import IPConfig

    from .allocator import AllocationError, Allocator

    pending = _unique(cfg.requested_ips)
    reserved: list[str] = []
    ips: list[IPConfig] = []
    try:
        for index, range_set in enumerate(cfg.range_sets):
            wanted = next((ip for ip in pending if range_set.contains(ip)), None)
            if wanted is not None:
                pending.remove(wanted)
            try:
                got = Allocator(range_set, store, index).get(container_id, ifname, wanted)
            except CNIError as exc:
                raise AllocationError(f"failed to allocate for range {index}: {exc.msg}", exc.details) from None
            reserved.append(str(got.ip))
            ips.append(IPConfig(address=got.cidr, gateway=str(got.range.gateway)))
        if pending:
            raise AllocationError(
                "failed to allocate all requested IPs: " + " ".join(map(str, pending)),
                "each requested address must lie inside a range set, one per set",
            )
    except BaseException:
        for ip in reserved:  # undo exactly what this ADD reserved
            store.release_ip(ip)
        raise
    return ips


def _unique(ips: Iterable[IPAddress]) -> list[IPAddress]:
    out: list[IPAddress] = []
    for ip in ips:
        if ip not in out:
            out.append(ip)
    return out


# ---- DEL -----------------------------------------------------------------


def release(conf: dict[str, Any], container_id: str, ifname: str, cni_args: str = "") -> list[str]:
    """Release the interface's reservations; nothing to release is success. Returns what went."""
    cfg = _load(conf, cni_args)
    _validate_attachment(container_id, ifname)
    return _release(cfg, container_id, ifname)


def _release(cfg: IPAMConfig, container_id: str, ifname: str) -> list[str]:
    from .store import DiskStore

    released: list[str] = []
    with _io_errors():
        store = DiskStore(cfg.name, cfg.data_dir)
        with store.locked():
            store.remove_stale_temp_files()  # a writer killed mid-ADD (of this or another container)
            # One pass per range set, as the reference does: the first releases the
            # interface's files, a later one the container's legacy (ID-only) files.
            for _ in cfg.range_sets:
                released += store.release_by_id(container_id, ifname)
    return released


# ---- CHECK ---------------------------------------------------------------


def check(conf: dict[str, Any], container_id: str, ifname: str, cni_args: str = "") -> None:
    """Verify the interface still holds its addresses (those of prevResult in our
    ranges, or at least one reservation when there is no such prevResult)."""
    cfg = _load(conf, cni_args)
    _validate_attachment(container_id, ifname)
    _check(cfg, conf.get("prevResult"), container_id, ifname)


def _check(cfg: IPAMConfig, prev: Any, container_id: str, ifname: str) -> None:
    from .store import DiskStore

    expected = _our_addresses(cfg, prev)
    with _io_errors():
        store = DiskStore(cfg.name, cfg.data_dir)
        with store.locked():
            for ip in expected:
                owner = store.owner_of(ip)
                if owner is None or not (owner.owned_by(container_id, ifname) or owner.owned_by_legacy(container_id)):
                    holder = f"; it is held by container {owner.container_id}" if owner else ""
                    raise CNIError(
                        ERR_INTERNAL,
                        f"host-local: address {ip} of container {container_id} is not reserved for it{holder}",
                        "run DEL and ADD again for this container",
                    )
            if not expected and not store.find_by_id(container_id, ifname):
                raise CNIError(
                    ERR_INTERNAL,
                    f"host-local: Failed to find address added by container {container_id}",
                    f"no reservation in {store.dir} names this container and interface",
                )


def _our_addresses(cfg: IPAMConfig, prev: Any) -> list[str]:
    if prev is None:
        return []
    import ipaddress

    from cni_plugins.spec.types import Result

    from .ranges import canonical

    previous = Result.from_dict(prev, cfg.cni_version)
    out = []
    for ipc in previous.ips:
        ip = canonical(ipaddress.ip_interface(ipc.address).ip)
        if any(range_set.contains(ip) for range_set in cfg.range_sets):
            out.append(str(ip))
    return out


# ---- GC and STATUS ---------------------------------------------------------


def gc(conf: dict[str, Any], valid: Iterable[tuple[str, str]]) -> list[str]:
    """Release every reservation of the network that no valid (containerID, ifname) owns."""
    return _gc(_load(conf), valid)


def _gc(cfg: IPAMConfig, valid: Iterable[tuple[str, str]]) -> list[str]:
    from .store import DiskStore

    keep = {(cid.strip(), ifname) for cid, ifname in valid}
    keep_ids = {cid for cid, _ in keep}
    released = []
    with _io_errors():
        store = DiskStore(cfg.name, cfg.data_dir, create=False)
        if not store.exists():
            return []
        with store.locked():
            store.remove_stale_temp_files()
            for res in store.reservations():
                owned = res.container_id in keep_ids if res.ifname is None else (res.container_id, res.ifname) in keep
                if not owned and store.release_ip(res.ip):
                    released.append(res.ip)
    return released


def status(conf: dict[str, Any]) -> None:
    """Raise ERR_PLUGIN_NOT_AVAILABLE unless new reservations could be written."""
    _status(_load(conf))


def _status(cfg: IPAMConfig) -> None:
    target = os.path.join(cfg.data_dir, cfg.name)
    probe = target
    while not os.path.lexists(probe):  # the nearest existing ancestor will hold the new directory
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise CNIError(
            ERR_PLUGIN_NOT_AVAILABLE,
            f"host-local data directory {target} is not writable",
            f"{probe} is not a writable directory; fix ipam.dataDir or its permissions",
        )


# ---- the plugin ------------------------------------------------------------
# The skeleton has validated the name, IDs and version: the commands skip _load's checks.


def cmd_add(req: CmdArgs) -> Result:
    return _allocate(_config(req.conf, req.args), req.container_id, req.ifname)


def cmd_del(req: CmdArgs) -> None:
    _release(_config(req.conf, req.args), req.container_id, req.ifname)


def cmd_check(req: CmdArgs) -> None:
    _check(_config(req.conf, req.args), req.conf.get("prevResult"), req.container_id, req.ifname)


def cmd_gc(req: CmdArgs) -> None:
    if not any(key in req.conf for key in GC_ATTACHMENT_KEYS):
        # Without the list every reservation would look stale: refuse rather than release all.
        raise CNIError(
            ERR_INVALID_CONFIG,
            "GC needs cni.dev/valid-attachments",
            "pass the list of attachments still in use (an empty list releases everything)",
        )
    _gc(_config(req.conf), gc_attachments(req.conf))


def cmd_status(req: CmdArgs) -> None:
    _status(_config(req.conf))


FUNCS = PluginFuncs(add=cmd_add, delete=cmd_del, check=cmd_check, gc=cmd_gc, status=cmd_status, schema="ipam.schema")


def main() -> None:
    plugin_main(FUNCS, "CNI host-local IPAM plugin (pycni)")


if __name__ == "__main__":
    main()
