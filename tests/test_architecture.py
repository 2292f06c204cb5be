"""The package's folders are its layers (docs/architecture.md): every import of a dropstudy module
points down the layers, no modules import each other in a circle, nothing private is imported
across modules, and only the commands import inside functions (start-up time: --help and bad
input load no torch). Read from the source with ast, so a lazy import cannot hide a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dropstudy"
# Bottom to top: a package may import the ones before it.
LAYERS = ("config", "store", "tracking", "data", "model", "engine", "report", "runs", "sweeps", "commands", "cli")
# Where importing inside a function is the point: the CLI answers --help and bad input before torch
# loads, and `dropstudy demo --list` (or a bad demo name) needs no torch either.
LAZY_ALLOWED = ("dropstudy.cli", "dropstudy.commands.", "dropstudy.report.demos")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import of a dropstudy module in the file, and whether it sits inside a function."""
    return source_imports(path.read_text())


def source_imports(source: str) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    tree = ast.parse(source)
    inner = {id(node) for func in ast.walk(tree) if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
             for node in ast.walk(func)}
    return [(node, id(node) in inner) for node in ast.walk(tree) if targets(node)]


def targets(node: ast.AST) -> list[str]:
    """The dropstudy modules an import statement names (none for any other statement)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "dropstudy"]
    if not isinstance(node, ast.ImportFrom) or node.level or not (node.module or "").startswith("dropstudy"):
        return []
    if node.module == "dropstudy":
        return [f"dropstudy.{a.name}" for a in node.names if a.name != "__version__"]
    return [node.module]


def package(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}
GRAPH = {m: {t for node, _ in imports(p) for t in targets(node)} for m, p in MODULES.items()}


def test_every_package_is_a_layer():
    found = {package(m) for m in MODULES if m.count(".")} - {"__main__", "__init__"}
    assert found <= set(LAYERS), f"packages that are no layer: {sorted(found - set(LAYERS))}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    if package(module) not in LAYERS:
        return
    rank = LAYERS.index(package(module))
    up = sorted(t for t in GRAPH[module] if package(t) in LAYERS and LAYERS.index(package(t)) > rank)
    assert not up, f"{module} imports a layer above it: {up}"


def test_no_modules_import_each_other_in_a_circle():
    """Tarjan's strongly connected components over every import, lazy ones included."""
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in MODULES:
                continue
            if w not in index:
                visit(w)
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
            if len(component) > 1:
                circles.append(sorted(component))

    for module in MODULES:
        if module not in index:
            visit(module)
    assert circles == []


def test_nothing_private_is_imported_across_modules():
    private = [f"{m}: {a.name} from {node.module}" for m, p in MODULES.items() for node, _ in imports(p)
               for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    assert private == []


def test_only_the_commands_import_inside_functions():
    lazy = [f"{m}:{node.lineno} {targets(node)}" for m, p in MODULES.items() for node, inner in imports(p)
            if inner and not m.startswith(LAZY_ALLOWED)]
    assert lazy == []


def test_imports_name_their_module_from_the_package_root():
    """Relative imports would hide from these checks (and from a reader's grep)."""
    relative = [f"{m}:{node.lineno}" for m, p in MODULES.items() for node in ast.walk(ast.parse(p.read_text()))
                if isinstance(node, ast.ImportFrom) and node.level]
    assert relative == []


def test_the_checks_see_a_circle_and_an_upward_import():
    """Not vacuous: one import from store up to runs (which imports store) is both."""
    global GRAPH
    real = GRAPH
    GRAPH = {**real, "dropstudy.store.rundir": real["dropstudy.store.rundir"] | {"dropstudy.runs.execute"}}
    try:
        with pytest.raises(AssertionError):
            test_no_modules_import_each_other_in_a_circle()
        with pytest.raises(AssertionError):
            test_imports_point_down_the_layers("dropstudy.store.rundir")
    finally:
        GRAPH = real
    # Both forms of import are seen, inside a function too.
    found = source_imports("import torch\ndef f():\n    import dropstudy.runs.execute\n    from dropstudy.store import rundir\n")
    assert [(targets(node), inner) for node, inner in found] == [
        (["dropstudy.runs.execute"], True), (["dropstudy.store"], True)]
