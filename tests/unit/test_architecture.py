"""The project's structural rules, checked on the source: layer direction, framework-free
lower layers, no import cycles, module and function length limits, every preset loads."""

import ast
from pathlib import Path

import pytest

from pipelines.config import all_presets, load_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
FORBIDDEN_IMPORTS = {
    "model": {"components", "pipelines", "ray", "mlflow"},
    "components": {"pipelines", "ray"},
}


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported_roots(tree: ast.Module) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN_IMPORTS))
def test_layers_point_one_way(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            _imported_roots(ast.parse(path.read_text())) & FORBIDDEN_IMPORTS[package]
        )
        for path in _modules(package)
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_modules_and_functions_stay_within_limits():
    too_long = []
    for package in ("pipelines", "components", "model"):
        for path in _modules(package):
            source = path.read_text()
            if len(source.splitlines()) > MAX_MODULE_LINES:
                too_long.append(f"{path.name}: {len(source.splitlines())} lines")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        too_long.append(f"{path.name}:{node.name}: {length} lines")
    assert too_long == []


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_imports(tree: ast.Module, known: set[str]) -> set[str]:
    """Project modules a module imports anywhere in it (lazy imports inside functions too):
    `from a.b import c` counts as a.b.c when that is a module, else a.b."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in known else node.module)
    return found & known


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_no_import_cycles():
    paths = [path for package in ("pipelines", "components", "model") for path in _modules(package)]
    known = {_module_name(path) for path in paths}
    graph = {
        _module_name(path): _project_imports(ast.parse(path.read_text()), known)
        - {_module_name(path)}
        for path in paths
    }
    assert _cycles(graph) == []


@pytest.mark.parametrize("preset", all_presets(), ids=lambda path: path.stem)
def test_every_shipped_preset_loads(preset):
    config = load_config(str(preset))
    assert config.run.name == preset.stem
