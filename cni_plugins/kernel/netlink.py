"""Loading pyroute2 for a short-lived plugin process without its package-wide imports.

``import pyroute2`` runs a package ``__init__`` that imports every public API
the library has (conntrack, NDB, IPDB, wireless, ...): about 30 ms that a
plugin, which needs only IPRoute, pays on every ADD and DEL. ``IPRoute()``
registers the package without running that ``__init__`` as soon as this
module is imported (so every later ``import pyroute2.x.y`` skips it too);
``IPRoute()`` then imports just ``pyroute2.iproute.linux``. Modules that use
pyroute2 import this one first. Anyone who later asks the package for a public
name (``from pyroute2 import NDB``) triggers the real ``__init__`` then, so
the shortcut never breaks other users of pyroute2 in the same process.
"""

from __future__ import annotations

import sys
from typing import Any


def _register_lean_package() -> None:
    if "pyroute2" in sys.modules:
        return
    import importlib.util
    import types

    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return  # unusual install: let the normal import path report problems
    package = types.ModuleType("pyroute2")
    package.__spec__ = spec
    package.__file__ = spec.origin
    package.__loader__ = spec.loader
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = "pyroute2"
    state = {"complete": False}

    def __getattr__(name: str) -> Any:
        # `from pyroute2 import config` asks for a submodule: let the import system load it.
        if importlib.util.find_spec(f"pyroute2.{name}") is not None:
            raise AttributeError(name)
        if not state["complete"]:
            state["complete"] = True
            del package.__getattr__  # type: ignore[attr-defined]
            spec.loader.exec_module(package)  # the real __init__, run once, in place
            if name in package.__dict__:
                return package.__dict__[name]
        raise AttributeError(f"module 'pyroute2' has no attribute {name!r}")

    package.__getattr__ = __getattr__  # type: ignore[attr-defined]
    sys.modules["pyroute2"] = package


_register_lean_package()


def IPRoute(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - reads like the class it builds
    """A pyroute2 IPRoute socket in the calling thread's network namespace."""
    from pyroute2.iproute.linux import IPRoute as _IPRoute

    return _IPRoute(*args, **kwargs)
