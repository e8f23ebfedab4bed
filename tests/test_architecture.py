"""The package's layering, checked against its real import graph.

Every module under ``src/formerlab`` is parsed with ``ast`` (nothing is imported) and every
``formerlab.*`` import it makes is collected: module-level ones, the lazy ones inside
functions, relative ones, and the registry packages' ``importlib.import_module(
f"{__name__}.{name}")`` loops (an edge from the package to each of its submodules).
``from formerlab.x import y`` counts as an import of the module ``formerlab.x.y`` when that
module exists, else of the package ``formerlab.x``. Implicit imports of a parent package
(importing ``formerlab.train.loop`` runs ``formerlab/train/__init__.py``) are not edges.

The rules (README, Layout: "Lower layers never import higher ones"):

1. no import cycle between modules (lazy imports count: a cycle broken only by an import
   inside a function is still a cycle of the design);
2. a layer (a top-level package or module of ``formerlab``) imports only the layers below
   it, ``LAYER_DEPS`` (made transitive). The spine is linalg <- attention <- mixers <-
   models <- integrations <- train <- experiments <- cli; solvers and deq sit between linalg
   and models; data is used by train; bench by cli; errors / registry at the bottom;
   ``formerlab.testing`` is a helper for tests that no library module imports.

A failure lists every offending import with its file and line.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = "formerlab"

#: the layers each layer may import directly; what they may import is allowed too. The root
#: package (``formerlab/__init__.py``, only ``__version__``) is below everything.
LAYER_DEPS: dict[str, set[str]] = {
    "formerlab": set(),
    "errors": set(),
    "registry": set(),
    "testing": set(),  # a test helper: torch only; never imported by the library
    "linalg": {"errors", "registry"},
    "attention": {"linalg"},
    "mixers": {"attention"},
    "solvers": {"linalg"},
    "deq": {"solvers"},
    "models": {"mixers", "deq"},
    "data": {"errors", "registry"},
    "integrations": {"models"},
    "train": {"integrations", "data"},
    "bench": {"train"},
    "experiments": {"train"},
    "cli": {"experiments", "bench"},
    "__main__": {"cli"},
}

#: imported by tests only, never by a library module
TEST_ONLY = {"testing"}

#: known imports against the layering, kept visible until they are fixed (a stale entry
#: fails ``test_known_violations_are_still_there``): (importer, imported module) -> why
KNOWN_LAYER_VIOLATIONS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted module name (a module or a package's __init__)
    path: str  # as shown in messages: src/formerlab/...
    line: int
    lazy: bool  # inside a function

    def where(self) -> str:
        kind = " (inside a function)" if self.lazy else ""
        return f"{self.path}:{self.line}: {self.importer} imports {self.target}{kind}"


def _modules(src: Path = SRC) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's __init__) for every module of the package."""
    found = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


def _resolve(name: str, modules: dict) -> str | None:
    """The module ``name`` refers to: itself, or the nearest enclosing package/module."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _is_dynamic_submodule_import(node: ast.AST) -> bool:
    """``importlib.import_module(f"{__name__}.{...}")`` (the registry packages' loop)."""
    if not (isinstance(node, ast.Call) and node.args):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    arg = node.args[0]
    return (
        name == "import_module" and isinstance(arg, ast.JoinedStr) and bool(arg.values)
        and isinstance(arg.values[0], ast.FormattedValue)
        and isinstance(arg.values[0].value, ast.Name) and arg.values[0].value.id == "__name__"
    )


def _module_imports(module: str, path: Path, is_package: bool, modules: dict, shown: str) -> list[Import]:
    """The ``formerlab`` imports of one module (``shown``: its path in messages)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if is_package else module.rpartition(".")[0]
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node

    def lazy(node: ast.AST) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                return True
        return False

    found: list[Import] = []

    def add(target: str | None, node: ast.AST) -> None:
        imp = Import(module, target or "", shown, node.lineno, lazy(node))
        if target is not None and target != module and imp not in found:
            found.append(imp)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(_resolve(alias.name, modules), node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the current package, up level - 1
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not (source == PACKAGE or source.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                add(submodule if submodule in modules else _resolve(source, modules), node)
        elif is_package and _is_dynamic_submodule_import(node):
            for other in modules:
                parent, _, name = other.rpartition(".")
                if parent == module and not name.startswith("_"):
                    add(other, node)
    return found


def collect_imports(src: Path = SRC) -> list[Import]:
    """Every ``formerlab`` import of every module under ``src/formerlab``."""
    modules = _modules(src)
    imports: list[Import] = []
    for module, (path, is_package) in modules.items():
        shown = str(path.relative_to(src.parent))
        imports += _module_imports(module, path, is_package, modules, shown)
    return imports


@cache
def _imports() -> tuple[Import, ...]:
    return tuple(collect_imports())


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def allowed_layers(layer: str) -> set[str]:
    """The layers ``layer`` may import: ``LAYER_DEPS`` made transitive, plus the root."""
    seen: set[str] = set()
    stack = list(LAYER_DEPS[layer])
    while stack:
        below = stack.pop()
        if below not in seen:
            seen.add(below)
            stack.extend(LAYER_DEPS[below])
    return seen | {layer, PACKAGE}


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    nodes = sorted(set(edges) | {t for ts in edges.values() for t in ts})
    for root in nodes:  # iterative Tarjan
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return sorted(components)


def _shortest_cycle(start: str, edges: dict[str, set[str]], members: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside ``members`` (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges.get(node, ())):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    return []


def cycle_report(imports: list[Import] | tuple[Import, ...], within: str | None = None,
                 shown: int = 6) -> list[str]:
    """One entry per group of modules that import each other in a circle: its members and
    its shortest cycles (up to ``shown``), each import with the file and line(s) making it."""
    chosen = [i for i in imports if within is None
              or (i.importer.startswith(within) and i.target.startswith(within))]
    edges: dict[str, set[str]] = defaultdict(set)
    where: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for imp in chosen:
        edges[imp.importer].add(imp.target)
        where[imp.importer, imp.target].append(imp)
    report = []
    for component in strongly_connected(edges):
        members = set(component)
        cycles: dict[frozenset, list[str]] = {}
        for member in component:
            cycle = _shortest_cycle(member, edges, members)
            cycles.setdefault(frozenset(zip(cycle, cycle[1:], strict=False)), cycle)
        lines = [f"{len(component)} modules in a circle: {', '.join(component)}"]
        for cycle in sorted(cycles.values(), key=len)[:shown]:
            lines.append(" -> ".join(cycle) + ":")
            for a, b in zip(cycle, cycle[1:], strict=False):
                imps = where[a, b]
                lazy = " (inside a function)" if all(i.lazy for i in imps) else ""
                lines.append(f"    {imps[0].path}:{','.join(str(n) for n in sorted(i.line for i in imps))}: "
                             f"{a} imports {b}{lazy}")
        report.append("\n  ".join(lines))
    return report


def layer_violations(imports: list[Import] | tuple[Import, ...]) -> list[Import]:
    bad = []
    for imp in imports:
        importer, target = layer_of(imp.importer), layer_of(imp.target)
        if target in TEST_ONLY and importer != target:
            bad.append(imp)
        elif target not in allowed_layers(importer):
            bad.append(imp)
    return bad


# --- the tests ------------------------------------------------------------------------------


def test_the_graph_is_read():
    imports = _imports()
    pairs = {(i.importer, i.target) for i in imports}
    # module-level, lazy (inside a function), package-submodule and registry-loop imports
    assert ("formerlab.experiments.run", "formerlab.train") in pairs
    assert ("formerlab.experiments.report", "formerlab.experiments.plots") in pairs
    assert any(i.lazy and i.importer.startswith("formerlab.cli.") for i in imports)
    assert ("formerlab.attention", "formerlab.attention.softmax") in pairs


def test_relative_imports_are_resolved(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "top.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import a\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from ..top import x\n    from .b import y\n")
    (pkg / "sub" / "b.py").write_text("import formerlab.sub.a\n")
    pairs = {(i.importer, i.target, i.lazy) for i in collect_imports(tmp_path)}
    assert pairs == {
        ("formerlab.sub", "formerlab.sub.a", False),
        ("formerlab.sub.a", "formerlab.top", True),
        ("formerlab.sub.a", "formerlab.sub.b", True),
        ("formerlab.sub.b", "formerlab.sub.a", False),
    }
    assert cycle_report(collect_imports(tmp_path)) and "formerlab/sub/b.py:1" in cycle_report(
        collect_imports(tmp_path))[0]


def test_every_layer_is_placed():
    layers = {layer_of(m) for m in _modules()}
    unplaced = sorted(layers - set(LAYER_DEPS))
    assert not unplaced, f"place these in LAYER_DEPS (tests/test_architecture.py): {unplaced}"
    assert not strongly_connected({k: set(v) for k, v in LAYER_DEPS.items()}), "LAYER_DEPS has a cycle"


def test_no_import_cycles_in_experiments():
    cycles = cycle_report(_imports(), within=f"{PACKAGE}.experiments")
    assert not cycles, "import cycles in experiments/ (move what both sides need below them):\n" + "\n".join(cycles)


def test_no_module_import_cycles():
    cycles = cycle_report(_imports())
    assert not cycles, "import cycles between modules:\n" + "\n".join(cycles)


def test_lower_layers_never_import_higher_ones():
    bad = [i for i in layer_violations(_imports())
           if (i.importer, i.target) not in KNOWN_LAYER_VIOLATIONS]
    lines = []
    for imp in bad:
        layer = layer_of(imp.importer)
        may = sorted(allowed_layers(layer) - {layer, PACKAGE})
        lines.append(f"{imp.where()}  [layer {layer} -> {layer_of(imp.target)}; {layer} may "
                     f"import only {', '.join(may) or 'nothing'}]")
    assert not bad, f"{len(bad)} import(s) against the layering:\n" + "\n".join(lines)


def test_known_violations_are_still_there():
    present = {(i.importer, i.target) for i in layer_violations(_imports())}
    stale = sorted(set(KNOWN_LAYER_VIOLATIONS) - present)
    assert not stale, f"fixed: drop these from KNOWN_LAYER_VIOLATIONS: {stale}"
