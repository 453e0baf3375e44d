"""The project's structural rules, checked on the source: layer direction, framework-free
lower layers, module and function length limits, every preset loads."""

import ast
from pathlib import Path

import pytest

from pipelines.config import all_presets, load_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
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
            if len(source.splitlines()) > 600:
                too_long.append(f"{path.name}: {len(source.splitlines())} lines")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = node.end_lineno - node.lineno + 1
                    if length > 80:
                        too_long.append(f"{path.name}:{node.name}: {length} lines")
    assert too_long == []


@pytest.mark.parametrize("preset", all_presets(), ids=lambda path: path.stem)
def test_every_shipped_preset_loads(preset):
    config = load_config(str(preset))
    assert config.run.name == preset.stem
