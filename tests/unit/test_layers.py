"""The layer rule of the project, checked on its import graph.

    netns  <-  cni_plugins.spec  <-  cni_plugins.kernel  <-  cni_plugins.shared  <-  plugin packages  <-  pycni
                         ^                                                            (bridge, portmap, ...)
                         +-- conf                          ipam (beside the plugins)

Every import statement counts, also the ones inside functions: a lazy
import is still a dependency. A module may import its own layer and the
layers below it; plugin packages never import each other (delegation goes
through the registry), and nothing under cni_plugins imports ipam or pycni.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("netns", "cni_plugins", "ipam", "conf", "pycni")
PLUGIN_PACKAGES = ("bridge", "portmap", "bandwidth", "loopback", "vxlan")

BASE = {"netns"}
ALLOWED: dict[str, set[str]] = {
    "netns": BASE,
    "spec": BASE | {"spec"},
    "kernel": BASE | {"spec", "kernel"},
    "shared": BASE | {"spec", "kernel", "shared"},
    "plugin": BASE | {"spec", "kernel", "shared"},  # plus its own package
    "ipam": BASE | {"spec", "kernel", "ipam"},
    "conf": BASE | {"spec", "conf"},
    "pycni": BASE | {"spec", "kernel", "shared", "plugin", "ipam", "conf", "pycni"},
}


def layer_of(module: str) -> tuple[str, str]:
    """(layer, package) of a project module name."""
    parts = module.split(".")
    if parts[0] != "cni_plugins":
        return parts[0], parts[0]
    if len(parts) == 1 or parts[1] in ("spec", "registry"):
        return "spec", "cni_plugins.spec"
    if parts[1] in ("kernel", "shared"):
        return parts[1], f"cni_plugins.{parts[1]}"
    return "plugin", f"cni_plugins.{parts[1]}"


def project_modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports_of(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The project modules ``module`` imports (resolved to the longest known name)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()

    def add(name: str) -> None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                add(full if full in known else target)
    return out


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def test_every_import_points_down():
    wrong = []
    for module, targets in graph().items():
        layer, package = layer_of(module)
        for target in targets:
            t_layer, t_package = layer_of(target)
            if t_layer in ALLOWED[layer] or t_package == package:
                continue
            wrong.append(f"{module} ({layer}) imports {target} ({t_layer})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in edges.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_rule_itself_catches_an_upward_import():
    """The checker is not vacuous: a kernel module importing a plugin is reported."""
    assert "plugin" not in ALLOWED["kernel"] and "ipam" not in ALLOWED["shared"]
    edges = graph()
    assert edges, "no modules found"
    assert "cni_plugins.spec.skel" in edges and "cni_plugins.spec.errors" in edges["cni_plugins.spec.skel"]
    assert layer_of("cni_plugins.bridge.plugin") == ("plugin", "cni_plugins.bridge")
    assert layer_of("cni_plugins.kernel.ip") == ("kernel", "cni_plugins.kernel")
