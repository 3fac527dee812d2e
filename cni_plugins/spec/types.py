"""CNI result types and their conversion between every spec version.

Internally a result is held in the 1.1.0 shape. ``Result.from_dict`` reads any
version's JSON, ``Result.to_dict`` writes any version's JSON:

* 0.1.0 / 0.2.0: ``ip4`` / ``ip6`` objects, routes nested in them, no interfaces;
* 0.3.0 / 0.3.1 / 0.4.0: ``interfaces``, ``ips`` carrying ``version``, ``routes``;
* 1.0.0: as 0.4.0 without ``ips[].version``;
* 1.1.0: adds interface ``mtu``/``socketPath``/``pciID`` and route
  ``mtu``/``advmss``/``priority``/``table``/``scope``.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from cni_plugins.spec.errors import ERR_DECODE, ERR_INCOMPATIBLE_VERSION, CNIError
from cni_plugins.spec.version import SUPPORTED_VERSIONS, at_least, is_legacy


def _decode_error(msg: str) -> CNIError:
    return CNIError(ERR_DECODE, msg)


def _cidr(value: Any, what: str) -> str:
    """Validate an address in CIDR form (host bits allowed, as in '10.0.0.2/24')."""
    if not isinstance(value, str):
        raise _decode_error(f"{what}: expected an address in CIDR form, got {value!r}")
    try:
        ipaddress.ip_interface(value)
    except ValueError:
        raise _decode_error(f"{what}: {value!r} is not an address in CIDR form") from None
    if "/" not in value:
        raise _decode_error(f"{what}: {value!r} has no prefix length")
    return value


def _ip(value: Any, what: str) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise _decode_error(f"{what}: expected an IP address, got {value!r}")
    try:
        if "%" in value:  # a zone index: Python's parser takes it, Go's net.ParseIP does not
            raise ValueError(value)
        ipaddress.ip_address(value)
    except ValueError:
        raise _decode_error(f"{what}: {value!r} is not an IP address") from None
    return value


def ip_family(cidr: str) -> int:
    return ipaddress.ip_interface(cidr).version


def _opt_int(d: dict, key: str, what: str) -> int | None:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _decode_error(f"{what}.{key}: expected an integer, got {value!r}")
    return value


@dataclass
class Interface:
    name: str
    mac: str = ""
    mtu: int = 0
    sandbox: str = ""
    socket_path: str = ""
    pci_id: str = ""

    @classmethod
    def from_dict(cls, d: Any, what: str = "interfaces[]") -> "Interface":
        if not isinstance(d, dict) or not isinstance(d.get("name", ""), str):
            raise _decode_error(f"{what}: expected an object with a 'name'")
        return cls(
            name=d.get("name", ""),
            mac=d.get("mac", "") or "",
            mtu=_opt_int(d, "mtu", what) or 0,
            sandbox=d.get("sandbox", "") or "",
            socket_path=d.get("socketPath", "") or "",
            pci_id=d.get("pciID", "") or "",
        )

    def to_dict(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.mac:
            out["mac"] = self.mac
        if self.mtu and at_least(version, "1.1.0"):
            out["mtu"] = self.mtu
        if self.sandbox:
            out["sandbox"] = self.sandbox
        if at_least(version, "1.1.0"):
            if self.socket_path:
                out["socketPath"] = self.socket_path
            if self.pci_id:
                out["pciID"] = self.pci_id
        return out


@dataclass
class IPConfig:
    address: str
    gateway: str | None = None
    interface: int | None = None

    @property
    def family(self) -> int:
        return ip_family(self.address)

    @classmethod
    def from_dict(cls, d: Any, what: str = "ips[]") -> "IPConfig":
        if not isinstance(d, dict):
            raise _decode_error(f"{what}: expected an object")
        iface = _opt_int(d, "interface", what)
        return cls(
            address=_cidr(d.get("address"), f"{what}.address"),
            gateway=_ip(d.get("gateway"), f"{what}.gateway"),
            interface=iface,
        )

    def to_dict(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if not at_least(version, "1.0.0"):
            out["version"] = str(self.family)
        if self.interface is not None:
            out["interface"] = self.interface
        out["address"] = self.address
        if self.gateway:
            out["gateway"] = self.gateway
        return out


@dataclass
class Route:
    dst: str
    gw: str | None = None
    mtu: int | None = None
    advmss: int | None = None
    priority: int | None = None
    table: int | None = None
    scope: int | None = None

    @property
    def family(self) -> int:
        return ip_family(self.dst)

    @classmethod
    def from_dict(cls, d: Any, what: str = "routes[]") -> "Route":
        if not isinstance(d, dict):
            raise _decode_error(f"{what}: expected an object")
        return cls(
            dst=_cidr(d.get("dst"), f"{what}.dst"),
            gw=_ip(d.get("gw"), f"{what}.gw"),
            mtu=_opt_int(d, "mtu", what),
            advmss=_opt_int(d, "advmss", what),
            priority=_opt_int(d, "priority", what),
            table=_opt_int(d, "table", what),
            scope=_opt_int(d, "scope", what),
        )

    def to_dict(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"dst": self.dst}
        if self.gw:
            out["gw"] = self.gw
        if at_least(version, "1.1.0"):
            for key in ("mtu", "advmss", "priority", "table", "scope"):
                value = getattr(self, key)
                if value is not None:
                    out[key] = value
        return out


@dataclass
class DNS:
    nameservers: list[str] = field(default_factory=list)
    domain: str = ""
    search: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Any, what: str = "dns") -> "DNS":
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise _decode_error(f"{what}: expected an object")

        def strings(key: str) -> list[str]:
            value = d.get(key) or []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise _decode_error(f"{what}.{key}: expected a list of strings")
            return list(value)

        domain = d.get("domain", "") or ""
        if not isinstance(domain, str):
            raise _decode_error(f"{what}.domain: expected a string")
        return cls(strings("nameservers"), domain, strings("search"), strings("options"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.nameservers:
            out["nameservers"] = list(self.nameservers)
        if self.domain:
            out["domain"] = self.domain
        if self.search:
            out["search"] = list(self.search)
        if self.options:
            out["options"] = list(self.options)
        return out

    def is_empty(self) -> bool:
        return not (self.nameservers or self.domain or self.search or self.options)


@dataclass
class Result:
    cni_version: str = "1.1.0"
    interfaces: list[Interface] = field(default_factory=list)
    ips: list[IPConfig] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    dns: DNS = field(default_factory=DNS)

    # ---- reading -------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Any, version: str | None = None) -> "Result":
        """Read a result written in ``version`` (default: its own cniVersion)."""
        if not isinstance(d, dict):
            raise _decode_error("result: expected a JSON object")
        version = version or d.get("cniVersion") or "0.1.0"
        if version not in SUPPORTED_VERSIONS:
            raise CNIError(
                ERR_INCOMPATIBLE_VERSION,
                f"unsupported result version {version!r}",
                f"supported versions are {list(SUPPORTED_VERSIONS)}",
            )
        if is_legacy(version):
            return cls._from_legacy(d, version)
        interfaces = d.get("interfaces") or []
        ips = d.get("ips") or []
        routes = d.get("routes") or []
        for key, value in (("interfaces", interfaces), ("ips", ips), ("routes", routes)):
            if not isinstance(value, list):
                raise _decode_error(f"result.{key}: expected a list")
        result = cls(
            cni_version=version,
            interfaces=[Interface.from_dict(i, f"interfaces[{n}]") for n, i in enumerate(interfaces)],
            ips=[IPConfig.from_dict(i, f"ips[{n}]") for n, i in enumerate(ips)],
            routes=[Route.from_dict(r, f"routes[{n}]") for n, r in enumerate(routes)],
            dns=DNS.from_dict(d.get("dns")),
        )
        for n, ip in enumerate(result.ips):
            if ip.interface is not None and not 0 <= ip.interface < len(result.interfaces):
                raise _decode_error(f"ips[{n}].interface: index {ip.interface} names no interface")
        return result

    @classmethod
    def _from_legacy(cls, d: dict, version: str) -> "Result":
        result = cls(cni_version=version, dns=DNS.from_dict(d.get("dns")))
        for key in ("ip4", "ip6"):
            block = d.get(key)
            if block is None:
                continue
            if not isinstance(block, dict):
                raise _decode_error(f"result.{key}: expected an object")
            result.ips.append(
                IPConfig(
                    address=_cidr(block.get("ip"), f"{key}.ip"),
                    gateway=_ip(block.get("gateway"), f"{key}.gateway"),
                )
            )
            routes = block.get("routes") or []
            if not isinstance(routes, list):
                raise _decode_error(f"{key}.routes: expected a list")
            result.routes.extend(Route.from_dict(r, f"{key}.routes[{n}]") for n, r in enumerate(routes))
        return result

    @classmethod
    def from_json(cls, data: str | bytes, version: str | None = None) -> "Result":
        try:
            d = json.loads(data)
        except ValueError as exc:
            raise _decode_error(f"result is not valid JSON: {exc}") from None
        return cls.from_dict(d, version)

    # ---- writing -------------------------------------------------------
    def to_dict(self, version: str | None = None) -> dict[str, Any]:
        version = version or self.cni_version
        if version not in SUPPORTED_VERSIONS:
            raise CNIError(
                ERR_INCOMPATIBLE_VERSION,
                f"cannot write a result in version {version!r}",
                f"supported versions are {list(SUPPORTED_VERSIONS)}",
            )
        if is_legacy(version):
            return self._to_legacy(version)
        out: dict[str, Any] = {"cniVersion": version}
        if self.interfaces:
            out["interfaces"] = [i.to_dict(version) for i in self.interfaces]
        if self.ips:
            out["ips"] = [i.to_dict(version) for i in self.ips]
        if self.routes:
            out["routes"] = [r.to_dict(version) for r in self.routes]
        out["dns"] = self.dns.to_dict()
        return out

    def _to_legacy(self, version: str) -> dict[str, Any]:
        blocks: dict[int, dict[str, Any]] = {}
        for ip in self.ips:
            if ip.family in blocks:
                continue  # the legacy form holds one address per family
            block: dict[str, Any] = {"ip": ip.address}
            if ip.gateway:
                block["gateway"] = ip.gateway
            blocks[ip.family] = block
        if not blocks:
            raise CNIError(
                ERR_INCOMPATIBLE_VERSION,
                f"cannot convert result to version {version}: it has no IP address",
                "0.1.0 and 0.2.0 results need at least one address",
            )
        for route in self.routes:
            block = blocks.get(route.family)
            if block is not None:
                block.setdefault("routes", []).append(route.to_dict(version))
        out: dict[str, Any] = {"cniVersion": version}
        if 4 in blocks:
            out["ip4"] = blocks[4]
        if 6 in blocks:
            out["ip6"] = blocks[6]
        out["dns"] = self.dns.to_dict()
        return out

    def to_json(self, version: str | None = None) -> str:
        return json.dumps(self.to_dict(version), indent=4)

    def convert(self, version: str) -> "Result":
        """A copy of this result as it reads after a round trip through ``version``."""
        return Result.from_dict(self.to_dict(version), version)
