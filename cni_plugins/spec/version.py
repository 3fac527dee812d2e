"""CNI specification versions: which exist, how to compare them, what each allows."""

from __future__ import annotations

from cni_plugins.spec.errors import ERR_DECODE, ERR_INCOMPATIBLE_VERSION, CNIError

SUPPORTED_VERSIONS: tuple[str, ...] = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CURRENT_VERSION = "1.1.0"
# A configuration without cniVersion is 0.1.0, as the spec and libcni say.
IMPLICIT_VERSION = "0.1.0"


def parse_version(version: str) -> tuple[int, int, int]:
    """Parse 'MAJOR.MINOR.PATCH' (a missing minor or patch counts as 0)."""
    if not isinstance(version, str) or not version:
        raise CNIError(ERR_DECODE, f"invalid version {version!r}: expected a string like '1.0.0'")
    parts = version.split(".")
    if len(parts) > 3:
        raise CNIError(ERR_DECODE, f"invalid version {version!r}: too many parts")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise CNIError(ERR_DECODE, f"invalid version {version!r}: parts must be numbers") from None
    if any(n < 0 for n in numbers):
        raise CNIError(ERR_DECODE, f"invalid version {version!r}: parts must not be negative")
    while len(numbers) < 3:
        numbers.append(0)
    return numbers[0], numbers[1], numbers[2]


def at_least(version: str, minimum: str) -> bool:
    return parse_version(version) >= parse_version(minimum)


def is_legacy(version: str) -> bool:
    """True for 0.1.0/0.2.0, whose results use the ip4/ip6 form."""
    return parse_version(version) < (0, 3, 0)


def config_version(conf: dict) -> str:
    """The cniVersion a parsed network configuration asks for."""
    version = conf.get("cniVersion", "")
    if version in ("", None):
        return IMPLICIT_VERSION
    if not isinstance(version, str):
        raise CNIError(ERR_DECODE, f"cniVersion must be a string, got {version!r}")
    parse_version(version)
    return version


def require_supported(version: str, supported: tuple[str, ...] = SUPPORTED_VERSIONS) -> None:
    if version not in supported:
        raise CNIError(
            ERR_INCOMPATIBLE_VERSION,
            "incompatible CNI versions",
            f"config is {version!r}, plugin supports {list(supported)}",
        )


def version_info(supported: tuple[str, ...] = SUPPORTED_VERSIONS) -> dict:
    return {"cniVersion": CURRENT_VERSION, "supportedVersions": list(supported)}
