"""The package's layout: what grouppo modules import from each other, and what ``import grouppo`` exposes.

Every ``import grouppo...`` and ``from grouppo... import ...`` (relative ones too) of every module of the
installed package is read with ``ast``, at module level and inside functions:

* no module imports a private name (``_x``) from another grouppo module;
* the module graph (module -> module it imports) has no cycle. ``from grouppo.x import y`` points at
  ``grouppo.x.y`` when that is a submodule, else at ``grouppo.x``. Package ``__init__`` modules only
  re-export, so they are sources only: an edge into one is followed to the module that defines the name
  it re-exports (``from grouppo import GroupDPOTrainer`` points at ``grouppo.groupdpo``). Imports under
  ``if TYPE_CHECKING:`` count too: a loop of type-only imports is still two files that know each other;
* every grouppo import anywhere in the repository (the package, experiments, benchmarks, examples, tests)
  resolves: scripts import inside functions, so a moved module would otherwise break one only when it
  runs.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import Trainer, TrainingArguments

import grouppo

PACKAGE = "grouppo"
REPOSITORY = Path(__file__).parents[1]


@dataclass(frozen=True)
class Import:
    """One imported name (``name`` None for ``import grouppo.x``) of ``module``, resolved to ``target``."""

    module: str  # the importing module
    path: Path
    line: int
    source: str  # the module named in the statement, made absolute
    name: str | None  # the name imported from it; None for ``import a.b``
    type_checking: bool

    def where(self) -> str:
        what = f"import {self.source}" if self.name is None else f"from {self.source} import {self.name}"
        return f"{self.path}:{self.line}: {what}"


def module_files(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` under the package directory ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, path: Path, is_package: bool, package: str) -> None:
        self.module, self.path, self.package = module, path, package
        self.anchor = module if is_package else module.rpartition(".")[0]  # where relative imports start
        self.type_checking = 0
        self.imports: list[Import] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.type_checking += 1
            for child in node.body:
                self.visit(child)
            self.type_checking -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def _ours(self, name: str) -> bool:
        return name == self.package or name.startswith(self.package + ".")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if self._ours(alias.name):
                self.imports.append(
                    Import(self.module, self.path, node.lineno, alias.name, None, self.type_checking > 0)
                )

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = node.module or ""
        if node.level:
            base = self.anchor.split(".")
            base = base[: len(base) - (node.level - 1)]
            source = ".".join([*base, source] if source else base)
        if not self._ours(source):
            return
        for alias in node.names:
            self.imports.append(
                Import(self.module, self.path, node.lineno, source, alias.name, self.type_checking > 0)
            )


def collect_imports(root: Path, package: str = PACKAGE) -> list[Import]:
    """Every import of a ``package`` module by a module of the package at ``root``."""
    imports = []
    for module, path in module_files(root, package).items():
        collector = _Collector(module, path, path.name == "__init__.py", package)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        imports.extend(collector.imports)
    return imports


def unresolved_imports(files: list[Path]) -> list[str]:
    """``file:line: statement`` of each grouppo import in ``files`` whose module or name does not exist."""
    found = []
    for path in files:
        collector = _Collector(path.stem, path, False, PACKAGE)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        for imp in collector.imports:
            try:
                module = importlib.import_module(imp.source)
            except ImportError:
                found.append(imp.where())
                continue
            if imp.name in (None, "*") or hasattr(module, imp.name):
                continue
            is_package = hasattr(module, "__path__")
            if not is_package or importlib.util.find_spec(f"{imp.source}.{imp.name}") is None:
                found.append(imp.where())
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(root: Path, package: str = PACKAGE) -> list[str]:
    """``file:line: statement`` of each import of a private name (or private module) of another module."""
    found = []
    for imp in collect_imports(root, package):
        names = imp.source.split(".")[1:] + ([] if imp.name is None else [imp.name])
        if any(_private(name) for name in names) and imp.source != imp.module:
            found.append(imp.where())
    return found


def _targets(imp: Import, modules: dict[str, Path], reexports: dict[str, dict[str, str]]) -> list[str]:
    """The modules an import makes its module depend on (package ``__init__`` modules followed through)."""
    if imp.name is None:
        candidates = [imp.source]
    elif f"{imp.source}.{imp.name}" in modules:
        candidates = [f"{imp.source}.{imp.name}"]
    elif imp.name == "*":
        candidates = sorted(set(reexports.get(imp.source, {}).values())) or [imp.source]
    else:
        candidates = [reexports.get(imp.source, {}).get(imp.name, imp.source)]
    return [c for c in candidates if c in modules and c not in reexports]


def import_graph(root: Path, package: str = PACKAGE) -> dict[str, dict[str, Import]]:
    """module -> {imported module: the first import statement that makes the edge}."""
    modules = module_files(root, package)
    imports = collect_imports(root, package)
    packages = {m for m, path in modules.items() if path.name == "__init__.py"}
    # What each package __init__ re-exports, and from where: resolved until the defining module.
    direct: dict[str, dict[str, str]] = {p: {} for p in packages}
    for imp in imports:
        if imp.module in packages and imp.name is not None:
            target = f"{imp.source}.{imp.name}"
            direct[imp.module][imp.name] = target if target in modules else imp.source

    def resolve(module: str, name: str, seen: frozenset = frozenset()) -> str:
        if module in packages and name in direct[module] and (module, name) not in seen:
            inner = direct[module][name]
            if inner.endswith("." + name) and inner in modules:
                return inner  # a submodule
            return resolve(inner, name, seen | {(module, name)})
        return module

    reexports = {p: {name: resolve(p, name) for name in direct[p]} for p in packages}
    graph: dict[str, dict[str, Import]] = {m: {} for m in modules if m not in packages}
    for imp in imports:
        if imp.module in packages:  # sources only
            continue
        for target in _targets(imp, modules, reexports):
            if target != imp.module:
                graph[imp.module].setdefault(target, imp)
    return graph


def find_cycles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module, or with a
    self edge (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, {}):
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # Shortest way back to start inside the component (breadth first).
        paths = {start: [start]}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        cycle = [*paths[v], start]
                        break
                    if w in members and w not in paths:
                        paths[w] = [*paths[v], w]
                        nxt.append(w)
                if cycle:
                    break
            frontier = nxt
        cycles.append(cycle)
    return cycles


def describe(cycle: list[str], graph: dict[str, dict[str, Import]]) -> str:
    steps = [f"  {a} -> {b}  ({graph[a][b].where()})" for a, b in zip(cycle, cycle[1:], strict=False)]
    return " -> ".join(cycle) + "\n" + "\n".join(steps)


ROOT = Path(grouppo.__file__).parent


# ----------------------------------------------------------------------------------------------- the package
def test_the_walk_sees_the_whole_package():
    modules = module_files(ROOT)
    for name in (
        "grouppo",
        "grouppo.base",
        "grouppo.online",
        "grouppo.online.trainer",
        "grouppo.gdpo.beliefs",
        "grouppo.embedded.instructions",
        "grouppo.apps.cli.train",
    ):
        assert name in modules, name
    imports = collect_imports(ROOT)
    # Module-level, function-level and TYPE_CHECKING imports are all found.
    assert any(i.module == "grouppo.base" and i.source == "grouppo.reference" for i in imports)
    assert any(i.module == "grouppo.apps.cli.train" and i.source == "grouppo.online.trainer" for i in imports)
    graph = import_graph(ROOT)
    assert "grouppo.reference" in graph["grouppo.base"]
    assert "grouppo.online.trainer" in graph["grouppo.apps.cli.train"]  # imported inside a function
    packages = ("grouppo", "grouppo.online", "grouppo.gdpo")  # sources only
    assert not any(p in targets for targets in graph.values() for p in packages)


def test_no_module_imports_a_private_name_of_another():
    found = private_imports(ROOT)
    assert not found, "private names imported across grouppo modules:\n" + "\n".join(found)


def test_the_module_graph_has_no_cycle():
    graph = import_graph(ROOT)
    cycles = find_cycles(graph)
    report = "\n".join(describe(cycle, graph) for cycle in cycles)
    assert not cycles, "import cycles among grouppo modules:\n" + report


CONFIGS = ["PreferenceConfig", "GroupDPOConfig", "OnlineGroupDPOConfig", "GDPOConfig"]
TRAINERS = ["PreferenceTrainer", "GroupDPOTrainer", "OnlineGroupDPOTrainer", "GDPOTrainer"]


def test_import_grouppo_exposes_every_config_and_trainer():
    for name in CONFIGS + TRAINERS:
        assert name in grouppo.__all__ and hasattr(grouppo, name), name
    for name in CONFIGS:
        assert issubclass(getattr(grouppo, name), TrainingArguments), name
    for name in TRAINERS:
        assert issubclass(getattr(grouppo, name), Trainer), name
    g = grouppo
    # Two siblings on the shared base, and the online variant of GroupDPO.
    for base, children in (
        (g.PreferenceTrainer, (g.GroupDPOTrainer, g.GDPOTrainer)),
        (g.PreferenceConfig, (g.GroupDPOConfig, g.GDPOConfig)),
    ):
        for child in children:
            assert base in child.__bases__, (child, child.__bases__)
        assert not issubclass(children[0], children[1]) and not issubclass(children[1], children[0])
    assert g.GroupDPOTrainer in g.OnlineGroupDPOTrainer.__bases__
    assert g.GroupDPOConfig in g.OnlineGroupDPOConfig.__bases__
    assert not issubclass(g.GDPOTrainer, g.GroupDPOTrainer) and not issubclass(g.GDPOConfig, g.GroupDPOConfig)
    # The names are the classes of the modules that define them, not copies.
    from grouppo.base import PreferenceConfig, PreferenceTrainer
    from grouppo.gdpo.trainer import GDPOConfig, GDPOTrainer
    from grouppo.groupdpo import GroupDPOConfig, GroupDPOTrainer
    from grouppo.online.trainer import OnlineGroupDPOConfig, OnlineGroupDPOTrainer

    defined = [
        PreferenceConfig,
        GroupDPOConfig,
        OnlineGroupDPOConfig,
        GDPOConfig,
        PreferenceTrainer,
        GroupDPOTrainer,
        OnlineGroupDPOTrainer,
        GDPOTrainer,
    ]
    assert [getattr(grouppo, name) for name in CONFIGS + TRAINERS] == defined


# ----------------------------------------------------------------------------------------------- the checks
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_the_checks_find_private_imports_and_cycles(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "from pkg.a import A\nfrom pkg.sub import B\n",
            "a.py": "import os\nfrom pkg.b import helper\n\n\ndef f():\n    from pkg.c import _secret\n",
            "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import A\n\n\n"
            "def helper():\n    from pkg import B\n",
            "c.py": "_secret = 1\nfrom . import a\n",
            "sub/__init__.py": "from .d import B\n",
            "sub/d.py": "B = 1\nimport pkg.c as c\n",
        },
    )
    assert private_imports(root, "pkg") == [f"{root / 'a.py'}:6: from pkg.c import _secret"]
    graph = import_graph(root, "pkg")
    assert graph == {
        "pkg.a": {"pkg.b": graph["pkg.a"]["pkg.b"], "pkg.c": graph["pkg.a"]["pkg.c"]},
        # b's TYPE_CHECKING import of a counts; its lazy "from pkg import B" goes through both re-exports.
        "pkg.b": {"pkg.a": graph["pkg.b"]["pkg.a"], "pkg.sub.d": graph["pkg.b"]["pkg.sub.d"]},
        "pkg.c": {"pkg.a": graph["pkg.c"]["pkg.a"]},  # relative: "from . import a"
        "pkg.sub.d": {"pkg.c": graph["pkg.sub.d"]["pkg.c"]},
    }
    assert graph["pkg.b"]["pkg.a"].type_checking
    # a -> b -> a, a -> c -> a and a -> b -> sub.d -> c -> a: one component, reported by a shortest cycle.
    assert find_cycles(graph) in ([["pkg.a", "pkg.b", "pkg.a"]], [["pkg.a", "pkg.c", "pkg.a"]])
    # Without a's imports of b and c, no cycle runs through a; the one left runs through b's import of a
    # name pkg re-exports from pkg.sub.d.
    (root / "a.py").write_text("A = 1\n")
    (root / "c.py").write_text("_secret = 1\nimport pkg.b\n")
    assert find_cycles(import_graph(root, "pkg")) == [["pkg.b", "pkg.sub.d", "pkg.c", "pkg.b"]]
    (root / "c.py").write_text("_secret = 1\n")
    assert find_cycles(import_graph(root, "pkg")) == [] and private_imports(root, "pkg") == []


# A statement, and how it is reported (relative imports made absolute).
PRIVATE = [
    ("from pkg.c import _secret", "from pkg.c import _secret"),
    ("import pkg._hidden", "import pkg._hidden"),
    ("from pkg import _c", "from pkg import _c"),
    ("from ._hidden import x", "from pkg._hidden import x"),
]


@pytest.mark.parametrize("statement,reported", PRIVATE)
def test_every_form_of_private_import_is_found(tmp_path, statement, reported):
    root = _package(
        tmp_path, {"__init__.py": "", "a.py": f"def f():\n    {statement}\n", "c.py": "", "_hidden.py": ""}
    )
    assert private_imports(root, "pkg") == [f"{root / 'a.py'}:2: {reported}"]
    (root / "a.py").write_text("from pkg.c import __doc__, public\n")  # dunders are not private names
    assert private_imports(root, "pkg") == []


def test_every_grouppo_import_in_the_repository_resolves():
    folders = ("src", "experiments", "benchmarks", "examples", "tests")
    files = sorted(p for folder in folders for p in (REPOSITORY / folder).rglob("*.py"))
    assert len(files) > 90 and any(p.parent.name == "experiments" for p in files)
    assert unresolved_imports(files) == []


def test_an_import_of_a_moved_module_or_a_missing_name_is_found(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            from grouppo.models import load_model

            def run():
                from grouppo.trainer import GroupDPOTrainer
                from grouppo.models import load_everything
                from grouppo.apps import cli
                import grouppo.nothing_here
            """
        )
    )
    assert unresolved_imports([script]) == [
        f"{script}:5: from grouppo.trainer import GroupDPOTrainer",
        f"{script}:6: from grouppo.models import load_everything",
        f"{script}:8: import grouppo.nothing_here",
    ]
