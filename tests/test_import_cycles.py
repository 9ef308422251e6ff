"""The package's modules import one another without cycles (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import densemtl

ROOT = Path(densemtl.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in ROOT.rglob("*.py")}


def imported(name: str) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (type-checking-only imports left out)."""
    tree = ast.parse(MODULES[name].read_text())
    typing_only = {id(node) for block in ast.walk(tree)
                   if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def closure(name: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for other in graph[todo.pop()] - seen:
            seen.add(other)
            todo.append(other)
    return seen


def test_no_import_cycle_in_the_package() -> None:
    graph = {name: imported(name) for name in MODULES}
    cycles = sorted(name for name in graph if name in closure(name, graph))
    assert not cycles, f"modules on an import cycle: {', '.join(cycles)}"


def test_evaluation_does_not_depend_on_training() -> None:
    graph = {name: imported(name) for name in MODULES}
    assert "densemtl.engine.trainer" not in closure("densemtl.engine.evaluate", graph)
    assert not any(name.startswith("densemtl.models.sharing") for name in closure("densemtl.engine.evaluate", graph))
