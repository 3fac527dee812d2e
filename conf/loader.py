"""Finding a network's configuration by name, the way libcni does.

Each directory is searched in turn (NETCONFPATH may list several, separated
by ':', the first one holding the network wins). Within a directory the
``*.conflist`` files are read in lexical order and the first whose ``name``
matches wins; failing that, single-plugin ``*.conf``/``*.json`` files are
tried the same way. A file that is not JSON, or has no name, stops the
search with an error (as in libcni): it might have been the network asked for.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

from cni_plugins.spec.errors import ERR_INVALID_CONFIG, ERR_IO

from .errors import ConfError, NetworkNotFoundError
from .netconf import NetworkConfigList, check_network_name, decode_json, parse_conflist, parse_single_conf

DEFAULT_CONF_DIR = "/etc/cni/net.d"
CONFLIST_EXTENSIONS = (".conflist",)
SINGLE_CONF_EXTENSIONS = (".conf", ".json")


def dir_list(value: str | Iterable[str] | None, env_var: str, default: str) -> list[str]:
    """Directories from ``value`` (a ':'-separated string or an iterable), else from
    ``$env_var``, else ``[default]``; empty entries are dropped."""
    if value is None:
        value = os.environ.get(env_var, "")
    parts = value.split(":") if isinstance(value, str) else value
    return [d for d in parts if d] or [default]


def conf_dirs(value: str | Iterable[str] | None = None) -> list[str]:
    """The directories to search: ``value``, else $NETCONFPATH, else /etc/cni/net.d."""
    return dir_list(value, "NETCONFPATH", DEFAULT_CONF_DIR)


def conf_files(directory: str, extensions: tuple[str, ...]) -> list[str]:
    """Regular files in ``directory`` with one of ``extensions``, in lexical order."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfError(f"cannot read directory: {exc.strerror}", directory, code=ERR_IO) from None
    found = []
    for name in sorted(names):
        full = os.path.join(directory, name)
        if os.path.splitext(name)[1] in extensions and os.path.isfile(full):
            found.append(full)
    return found


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ConfError(f"cannot read file: {exc.strerror}", path, code=ERR_IO) from None


def _declared_name(data: bytes, path: str) -> str:
    name = decode_json(data, path).get("name")
    if not isinstance(name, str) or not name:
        raise ConfError("required: a non-empty string naming the network", path, "name")
    return name


def _search(
    directory: str,
    extensions: tuple[str, ...],
    name: str,
    parse: Callable[[bytes, str], NetworkConfigList],
    seen: list[str],
) -> NetworkConfigList | None:
    for path in conf_files(directory, extensions):
        data = _read(path)
        declared = _declared_name(data, path)
        if declared == name:
            return parse(data, path)
        seen.append(declared)
    return None


def load_conflist(name: str, dirs: str | Iterable[str] | None = None) -> NetworkConfigList:
    """Load and validate the network called ``name`` (see the module docstring)."""
    check_network_name(name, None, None)
    searched = conf_dirs(dirs)
    seen: list[str] = []
    for directory in searched:
        found = _search(directory, CONFLIST_EXTENSIONS, name, parse_conflist, seen)
        if found is None:
            found = _search(directory, SINGLE_CONF_EXTENSIONS, name, parse_single_conf, seen)
        if found is not None:
            return found
    described = ", ".join(d if os.path.isdir(d) else f"{d} (missing)" for d in searched)
    others = f"; networks found: {', '.join(sorted(set(seen)))}" if seen else "; no configuration files found"
    raise NetworkNotFoundError(
        f"no network named {name!r} in {described}{others}",
        code=ERR_INVALID_CONFIG,
        details="put a .conflist file declaring that name there, or point NETCONFPATH "
        f"(':'-separated directories, default {DEFAULT_CONF_DIR}) at its directory",
    )


def load_conflist_file(path: str) -> NetworkConfigList:
    """Load one configuration file, whatever its name; .conflist or single-plugin by extension."""
    data = _read(path)
    if path.endswith(CONFLIST_EXTENSIONS):
        return parse_conflist(data, path)
    return parse_single_conf(data, path)
