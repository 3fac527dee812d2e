"""Every test module carries the markers of what it does, checked statically (no test runs, no root).

- A module that creates network namespaces carries ``integration``: it uses ``netns.create`` /
  ``netns.temporary`` (or `ip netns add`), or a helper or fixture that does. Which helpers and fixtures
  do is derived here from their sources (tests/conftest.py, tests/integration/conftest.py,
  tests/helpers, and the shared modules beside them), by following calls until a namespace is made.
- A module that starts etcd carries ``etcd``: it calls the etcd helpers of tests/cluster_helpers.py
  (``start_etcd`` and what is built on it), directly or through a helper or fixture, or asks
  ``pod_cluster`` for an etcd store.

"Carries" means: in the module's ``pytestmark``, on every test function (or its class), or, for a module
whose etcd runs only in some parameters, on those parameters (``pytest.param(..., marks=pytest.mark.etcd)``).
The markers are those registered in setup.cfg and tests/conftest.py.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
# Where shared helpers and fixtures live: what they make is derived from their source.
HELPER_SOURCES = sorted(
    {
        TESTS / "conftest.py",
        TESTS / "integration" / "conftest.py",
        TESTS / "fuzz" / "conftest.py",
        TESTS / "e2e" / "conftest.py",
        *(TESTS / "helpers").glob("*.py"),
        *TESTS.glob("*.py"),
        *(TESTS / "fuzz").glob("[!t]*.py"),
        *(TESTS / "e2e" / "kit").glob("*.py"),
    }
)
# The tests' own modules, as test modules import them (tests.helpers.netenv, multinode, .harness, ...).
TEST_MODULES = {"tests", "helpers", "kit", "harness", "profiles", "requests"} | {
    path.stem for path in TESTS.glob("*.py")
}
NETNS_CALLS = {("netns", "create"), ("netns", "temporary")}
ETCD_SEEDS = {"start_etcd"}  # every etcd of the tests is started by this (tests/cluster_helpers.py)
# Helpers that start etcd only for some store kinds: a module uses them with etcd when it names "etcd".
ETCD_BY_ARGUMENT = {"pod_cluster"}
# Modules whose namespace use is known not to need the integration marker, and why.
KNOWN_EXCEPTIONS = {
    "tests/unit/test_netns_validation.py": "calls netns.create/temporary only with names they refuse before "
    "anything is created",
    "tests/integration/test_host_local_exec.py": "files only, on purpose without root: its one namespace is the "
    "warm launcher_dir's agent's, and that half skips itself without root",
}
# Findings of this check in modules still to be fixed (by whoever owns them), so that the check stays green
# meanwhile: module -> the markers its namespace- or etcd-using tests lack. Remove an entry once fixed; an
# entry that is no longer needed fails test_pending_entries_are_still_needed.
PENDING: dict[str, set[str]] = {}


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_fixture(node: ast.AST) -> bool:
    return any("fixture" in ast.unparse(d) for d in getattr(node, "decorator_list", []))


def _asks_for_fixtures(node: ast.AST) -> bool:
    """A test or a fixture: its parameters are fixtures."""
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
        node.name.startswith("test") or _is_fixture(node)
    )


def _annotations(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.arg):
        return [node.annotation] if node.annotation is not None else []
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return [node.returns] if node.returns is not None else []
    if isinstance(node, ast.AnnAssign):
        return [node.annotation]
    return []


def _referenced(node: ast.AST, fixtures: set[str] = frozenset(), module: str = "") -> set[str]:
    """What a piece of code uses: the names it calls or reads (not attributes: method and module-attribute
    names like run or shaping are too common to follow); fixtures only where code asks
    for them (a test's or fixture's parameter, request.getfixturevalue("x"), usefixtures("x")), since a
    variable may share a fixture's name. A private name (_x) is qualified by its module ("module:_x")."""
    names: set[str] = set()
    annotations = {id(n) for sub in ast.walk(node) for ann in _annotations(sub) for n in ast.walk(ann)}
    for sub in ast.walk(node):
        if id(sub) in annotations:  # a type named in an annotation is no call
            continue
        if isinstance(sub, ast.Name) and sub.id not in fixtures:
            names.add(f"{module}:{sub.id}" if sub.id.startswith("_") else sub.id)
        elif _asks_for_fixtures(sub):
            names |= {a.arg for a in sub.args.args + sub.args.kwonlyargs}
        elif isinstance(sub, ast.Call) and getattr(sub.func, "attr", "") in ("getfixturevalue", "usefixtures"):
            names |= {a.value for a in sub.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return names


def _creates_netns_directly(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if (
            isinstance(sub, ast.Attribute)
            and isinstance(sub.value, ast.Name)
            and (sub.value.id, sub.attr) in NETNS_CALLS
        ):
            return True
        if isinstance(sub, (ast.List, ast.Tuple)):  # ["ip", "netns", "add", ...]
            words = [e.value for e in sub.elts[:3] if isinstance(e, ast.Constant)]
            if words == "ip netns add".split():
                return True
    return False


def _definitions(tree: ast.Module, module: str = "") -> dict[str, ast.AST]:
    """The module's top-level functions (fixtures included) and classes, by name (private ones qualified by
    the module): what other modules import and call. Methods count as part of their class: their own
    names (run, path, close) are too common to follow across modules."""
    return {
        (f"{module}:{node.name}" if node.name.startswith("_") else node.name): node
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    }


def _closure(definitions: dict[str, tuple[str, ast.AST]], direct: set[str], fixtures: set[str]) -> set[str]:
    """The names of the definitions that, through references among them, reach one in ``direct``."""
    reaching = set(direct)
    uses = {name: _referenced(body, fixtures, module) for name, (module, body) in definitions.items()}
    for _ in range(len(definitions) + 1):  # bounded fixpoint
        more = {name for name, used in uses.items() if name not in reaching and used & reaching}
        if not more:
            break
        reaching |= more
    return reaching


@dataclass
class Helpers:
    netns: set[str] = field(default_factory=set)  # helpers and fixtures that create namespaces
    etcd: set[str] = field(default_factory=set)  # helpers and fixtures that start etcd
    fixtures: set[str] = field(default_factory=set)  # which of all these names are fixtures


@functools.lru_cache(maxsize=None)
def derive_helpers(sources: tuple[Path, ...] = tuple(HELPER_SOURCES)) -> Helpers:
    definitions: dict[str, tuple[str, ast.AST]] = {}
    fixtures: set[str] = set()
    for path in sources:
        if not path.exists() or path.name == "__init__.py":
            continue
        module = str(path.relative_to(TESTS))
        for name, body in _definitions(_parse(path), module).items():
            if name.startswith("test_"):
                continue
            if _is_fixture(body):
                fixtures.add(name)
            if name in definitions:  # the same name twice (two conftests' launcher_dir): either counts
                body = ast.Module(body=[definitions[name][1], body], type_ignores=[])
            definitions[name] = (module, body)
    netns_direct = {name for name, (_m, body) in definitions.items() if _creates_netns_directly(body)}
    # Helpers that start etcd only for some arguments (pod_cluster) do not pass it on to their callers.
    etcd = _closure({k: v for k, v in definitions.items() if k not in ETCD_BY_ARGUMENT}, ETCD_SEEDS, fixtures)
    return Helpers(netns=_closure(definitions, netns_direct, fixtures), etcd=etcd, fixtures=fixtures)


def _marker_names(expr: ast.AST) -> set[str]:
    """The X of every pytest.mark.X (called or not) inside expr."""
    names = set()
    for sub in ast.walk(expr):
        if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Attribute) and sub.value.attr == "mark":
            names.add(sub.attr)
    return names


def _param_marks(tree: ast.Module) -> set[str]:
    """Markers given to parameters: pytest.param(..., marks=...)."""
    names = set()
    for sub in ast.walk(tree):
        if isinstance(sub, ast.Call) and getattr(sub.func, "attr", "") == "param":
            for keyword in sub.keywords:
                if keyword.arg == "marks":
                    names |= _marker_names(keyword.value)
    return names


@dataclass
class Module:
    path: Path
    tree: ast.Module

    @property
    def name(self) -> str:
        return str(self.path.relative_to(TESTS.parent))

    def module_marks(self) -> set[str]:
        marks: set[str] = set()
        for node in self.tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in targets) and node.value is not None:
                    marks |= _marker_names(node.value)
        return marks

    def test_functions(self) -> list[tuple[ast.AST, set[str]]]:
        """Every test function with the markers on it and on its class."""
        found = []
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                found.append((node, set().union(*(_marker_names(d) for d in node.decorator_list))))
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                class_marks = set().union(set(), *(_marker_names(d) for d in node.decorator_list))
                for item in node.body:
                    if isinstance(item, (ast.Assign,)) and any(
                        isinstance(t, ast.Name) and t.id == "pytestmark" for t in item.targets
                    ):
                        class_marks |= _marker_names(item.value)
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith("test"):
                        found.append(
                            (item, class_marks | set().union(set(), *(_marker_names(d) for d in item.decorator_list)))
                        )
        return found

    def marks_of(self, test: ast.AST, all_tests: list[tuple[ast.AST, set[str]]]) -> set[str]:
        """The markers a test carries: the module's, its class's and its own."""
        return self.module_marks() | next(marks for node, marks in all_tests if node is test)

    def _local_reaching(self, flagged: set[str], fixtures: set[str], netns_calls: bool) -> set[str]:
        """The module's own functions, fixtures and classes that reach a flagged shared name (or make a
        namespace themselves, with netns_calls)."""
        local = {name: ("", body) for name, body in _definitions(self.tree).items()}
        direct = {
            name
            for name, (_m, body) in local.items()
            if _referenced(body, fixtures) & flagged or (netns_calls and _creates_netns_directly(body))
        }
        return _closure(local, direct, fixtures)

    def helper_imports(self) -> set[str]:
        """Names the module imports from the tests' own modules (a name like ``shaping`` imported from
        elsewhere is something else)."""
        names = set()
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and (
                node.level > 0 or (node.module or "").split(".")[0] in TEST_MODULES
            ):
                names |= {alias.asname or alias.name for alias in node.names}
        return names

    def tests_that(self, flagged: set[str], helpers: Helpers, netns_calls: bool) -> dict[str, set[str]]:
        """Test name -> why it does it (the flagged helpers/fixtures it reaches), for the tests that do."""
        # Shared helpers count where imported from the tests' modules, fixtures where asked for; the
        # module's own definitions shadow shared ones of the same name.
        shared = (flagged & (self.helper_imports() | helpers.fixtures)) - set(_definitions(self.tree))
        local = self._local_reaching(shared, helpers.fixtures, netns_calls)
        found = {}
        for test, _marks in self.test_functions():
            used = _referenced(test, helpers.fixtures)
            why = used & (shared | local)
            if netns_calls and _creates_netns_directly(test):
                why.add("netns.create/temporary")
            if why:
                found[test.name] = why
        return found

    def unmarked(self, marker: str | tuple[str, ...], doing: dict[str, set[str]], by_param: bool = False) -> dict:
        """Of the tests in ``doing``, those that carry none of ``marker``."""
        wanted = {marker} if isinstance(marker, str) else set(marker)
        if by_param and wanted & _param_marks(self.tree):
            return {}
        tests = self.test_functions()
        return {
            node.name: doing[node.name]
            for node, _marks in tests
            if node.name in doing and not wanted & self.marks_of(node, tests)
        }


@functools.lru_cache(maxsize=None)
def all_test_modules() -> list[Module]:
    return [Module(path, _parse(path)) for path in sorted(TESTS.rglob("test_*.py")) if "__pycache__" not in path.parts]


def missing_markers(modules: list[Module], helpers: Helpers) -> list[str]:
    problems = []
    for module in modules:
        netns_tests = module.tests_that(helpers.netns, helpers, netns_calls=True)
        if module.name not in KNOWN_EXCEPTIONS:
            # e2e tests create namespaces through the runtimes they drive; their marker implies root as well.
            for test, why in module.unmarked(("integration", "e2e"), netns_tests).items():
                problems.append(
                    f"{module.name}::{test} creates network namespaces ({', '.join(sorted(why))}) "
                    f"but does not carry the integration marker"
                )
        etcd_tests = module.tests_that(helpers.etcd | ETCD_SEEDS, helpers, netns_calls=False)
        if _referenced(module.tree, helpers.fixtures) & ETCD_BY_ARGUMENT and any(
            isinstance(c, ast.Constant) and c.value == "etcd" for c in ast.walk(module.tree)
        ):
            for test, why in module.tests_that(ETCD_BY_ARGUMENT, helpers, netns_calls=False).items():
                etcd_tests.setdefault(test, set()).update(f"{name}(..., 'etcd')" for name in why)
        for test, why in module.unmarked("etcd", etcd_tests, by_param=True).items():
            problems.append(
                f"{module.name}::{test} starts etcd ({', '.join(sorted(why))}) but does not carry the etcd marker"
            )
    return problems


# ---- the checks ----------------------------------------------------------------------------------


def test_the_derived_helpers_include_the_known_ones():
    """A sanity check of the derivation (if a helper is renamed, the derivation must still find it)."""
    helpers = derive_helpers()
    assert {
        "make_node",
        "make_pod",
        "node",
        "temporary_node",
        "temporary_pod",
        "cluster_topology",
        "pod_cluster",
        "fresh_netns",
        "etcd_in_netns",
        "running_agent",
        "plugin_set",
    } <= helpers.netns, sorted(helpers.netns)
    assert {"start_etcd", "etcd_member", "etcd_in_netns", "etcd_cluster"} <= helpers.etcd, sorted(helpers.etcd)
    assert "pod_cluster" not in helpers.etcd  # only with an etcd store: decided per module


def test_the_markers_are_registered():
    from tests.conftest import MARKERS

    setup_cfg = (TESTS.parent / "setup.cfg").read_text(encoding="utf-8")
    for name in ("integration", "etcd"):
        assert name in MARKERS and f"    {name}: " in setup_cfg


@functools.lru_cache(maxsize=None)
def _problems() -> tuple[str, ...]:
    return tuple(missing_markers(all_test_modules(), derive_helpers()))


def _pending(problem: str) -> bool:
    module = problem.split("::")[0]
    return any(f"carry the {marker} marker" in problem for marker in PENDING.get(module, ()))


def test_every_module_carries_the_markers_of_what_it_does():
    problems = [p for p in _problems() if not _pending(p)]
    assert not problems, "\n".join(problems)


def test_pending_entries_are_still_needed():
    problems = _problems()
    for module, markers in PENDING.items():
        for marker in markers:
            assert any(p.startswith(f"{module}::") and f"carry the {marker} marker" in p for p in problems), (
                f"{module} carries {marker} now: remove it from PENDING"
            )


# ---- the check itself fails when a marker is missing ---------------------------------------------

SAMPLE_NETNS = """
import pytest
{mark}

def test_one(make_node):
    make_node()
"""
SAMPLE_ETCD = """
import pytest
from cluster_helpers import etcd_in_netns
pytestmark = [pytest.mark.integration{etcd}]

def test_one():
    with etcd_in_netns() as member:
        pass
"""


@pytest.mark.parametrize(
    "source, problem",
    [
        (SAMPLE_NETNS.format(mark=""), "does not carry the integration marker"),
        (SAMPLE_NETNS.format(mark="pytestmark = pytest.mark.unit"), "does not carry the integration marker"),
        (SAMPLE_ETCD.format(etcd=""), "does not carry the etcd marker"),
        (SAMPLE_NETNS.format(mark="pytestmark = pytest.mark.integration"), None),
        (SAMPLE_ETCD.format(etcd=", pytest.mark.etcd"), None),
        ("import netns\n\ndef test_one():\n    netns.create('x')\n", "does not carry the integration marker"),
        ("import pytest\n\n@pytest.mark.integration\ndef test_one():\n    import netns\n    netns.create('x')\n", None),
    ],
    ids=[
        "netns-unmarked",
        "netns-other-mark",
        "etcd-unmarked",
        "netns-marked",
        "etcd-marked",
        "netns-call",
        "per-test-mark",
    ],
)
def test_a_missing_marker_is_reported(tmp_path, source, problem):
    path = TESTS / "integration" / "test_sample_for_markers.py"  # only its name is used; nothing is written
    problems = missing_markers([Module(path, ast.parse(source))], derive_helpers())
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0], problems
