"""The layers of ARCHITECTURE.md held by tests: what each layer may import, no cycles, no torch at the edge."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "llava_worker"

#: Each layer may import its own modules and those of lower rank, never higher ones.
CONTRACTS = {
    "llava_worker",
    "llava_worker.config",
    "llava_worker.errors",
    "llava_worker.protocol",
    "llava_worker.chunks",
}
WORKER = {
    "llava_worker.worker",
    "llava_worker.host_memory",
    "llava_worker.admission",
    "llava_worker.controller",
    "llava_worker.metrics",
}
PROCESS = {"llava_worker.cli", "llava_worker.flags", "llava_worker.logs", "llava_worker.__main__"}
RANKS = {"contracts": 0, "models": 1, "testing": 2, "engine": 2, "worker": 3, "http": 4, "process": 5}


def layer_of(module: str) -> str:
    if module in CONTRACTS:
        return "contracts"
    if module in WORKER:
        return "worker"
    if module in PROCESS:
        return "process"
    layer = module.split(".")[1]
    assert layer in RANKS, f"{module} belongs to no layer; add it to one in this test and in ARCHITECTURE.md"
    return layer


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names[name] = path
    return names


def imports_of(source: str, package: tuple[str, ...], known: set[str]) -> Iterator[tuple[str, int]]:
    """Every module a file of `package` imports (at module level, in functions, or for types only), with the line."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *filter(None, [node.module])])
            for alias in node.names:
                # `from package import module` imports the module; `from module import name` the module.
                submodule = f"{base}.{alias.name}"
                yield (submodule if submodule in known else base), node.lineno


def import_graph() -> dict[str, dict[str, int]]:
    names = module_names()
    graph: dict[str, dict[str, int]] = {}
    for name, path in names.items():
        package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
        graph[name] = dict(imports_of(path.read_text(), package, set(names)))
    return graph


GRAPH = import_graph()


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    violations = []
    for module, targets in graph.items():
        for target, line in targets.items():
            if target in graph and target != module and RANKS[layer_of(target)] > RANKS[layer_of(module)]:
                violations.append(f"{module}:{line} imports {target} ({layer_of(module)} → {layer_of(target)})")
    return violations


def test_every_module_belongs_to_a_layer_and_imports_none_above_it():
    violations = upward_imports(GRAPH)
    assert not violations, "\n".join(violations)


def test_fixture_builders_are_never_imported_by_the_server():
    importers = [
        f"{module}:{line}"
        for module, targets in GRAPH.items()
        if layer_of(module) != "testing"
        for target, line in targets.items()
        if target.startswith("llava_worker.testing")
    ]
    assert not importers


@pytest.mark.parametrize("layer", ["engine", "models"])
def test_the_engine_and_model_layers_know_nothing_of_http(layer):
    web = ("fastapi", "starlette", "uvicorn", "llava_worker.http")
    offenders = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if layer_of(module) == layer
        for target in targets
        if target.startswith(web)
    ]
    assert not offenders


def modules_on_cycles(graph: dict[str, dict[str, int]]) -> list[str]:
    """The modules from which an import chain leads back to themselves."""

    def reachable(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for target in graph[todo.pop()]:
                if target in graph and target not in seen:
                    seen.add(target)
                    todo.append(target)
        return seen

    return sorted(module for module in graph if module in reachable(module))


def test_no_import_cycles_not_even_through_type_only_imports():
    assert not modules_on_cycles(GRAPH)


def test_the_http_layer_and_the_contracts_import_without_torch_or_transformers():
    edge = sorted(name for name in GRAPH if layer_of(name) in ("http", "contracts") or name == "llava_worker.cli")
    assert "llava_worker.http.app" in edge and "llava_worker.http.openai" in edge
    script = (
        "import importlib, sys\n"
        # None in sys.modules makes any import of these packages fail at once.
        "for blocked in ('torch', 'transformers', 'torchvision', 'accelerate', 'safetensors'):\n"
        "    sys.modules[blocked] = None\n"
        f"for name in {edge!r}:\n"
        "    importlib.import_module(name)\n"
        "print('imported', len(sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("imported")


def test_the_rules_see_a_type_only_import_that_breaks_them():
    # Without this the checks above could pass by seeing nothing: a type-only import of the HTTP
    # layer from the engine is found, flagged as going up, and closes a cycle.
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..http.app import create_app\n"
    imported = dict(imports_of(source, ("llava_worker", "engine"), set(GRAPH)))
    assert imported["llava_worker.http.app"] == 3  # the relative import, resolved
    graph = {**GRAPH, "llava_worker.engine.core": {**GRAPH["llava_worker.engine.core"], **imported}}
    assert any("llava_worker.engine.core:3 imports llava_worker.http.app" in v for v in upward_imports(graph))
    assert "llava_worker.engine.core" in modules_on_cycles(graph)
