"""The package's structure: no import cycle (lazy imports inside functions count too), imports only go down
the layers that docs/architecture.md draws, and no code outside tasks.py branches on a task's name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

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


# docs/architecture.md: errors/constants -> config -> tasks/metrics -> data/models/losses -> engine -> cli/api,
# and the package's __init__ (``densemtl.load``, imported lazily from densemtl.api) on top
PACKAGE = "densemtl"
LAYERS = [
    ("densemtl.errors", "densemtl.constants", "densemtl.registry", "densemtl.dataset_info",
     "densemtl.arrays", "densemtl.atomic", "densemtl.jsonio"),
    ("densemtl.config",),
    ("densemtl.tasks", "densemtl.label_relations", "densemtl.metrics"),
    ("densemtl.data", "densemtl.models", "densemtl.losses"),
    ("densemtl.engine",),
    ("densemtl.cli", "densemtl.api"),
    (PACKAGE,),
]


def covers(prefix: str, name: str) -> bool:
    """Whether ``prefix`` of LAYERS covers module ``name`` (the package itself only covers its __init__)."""
    return name == prefix or (prefix != PACKAGE and name.startswith(prefix + "."))


def layer(name: str) -> int:
    """The layer of a module: the deepest-matching prefix in LAYERS."""
    matches = [(len(prefix), index) for index, prefixes in enumerate(LAYERS) for prefix in prefixes
               if covers(prefix, name)]
    assert matches, f"{name} is in no layer of LAYERS (add it to the table and to docs/architecture.md)"
    return max(matches)[1]


def test_imports_only_go_down_the_layers() -> None:
    upward = sorted(f"{name} -> {target}" for name in MODULES for target in imported(name)
                    if layer(target) > layer(name))
    assert upward == []


TASK_NAMES = "semseg|depth|normals|edge|saliency|human_parts"
BRANCH = re.compile(rf'[=!]= *"({TASK_NAMES})"|"({TASK_NAMES})" *[=!]=|in \(?"({TASK_NAMES})"')


@pytest.mark.parametrize("path", sorted(p for p in ROOT.rglob("*.py") if p.name != "tasks.py"), ids=str)
def test_no_task_name_branch_outside_tasks(path: Path) -> None:
    """Code asks the task (its hooks and attributes in densemtl/tasks.py) instead of comparing task names."""
    hits = [f"{path.name}:{number}: {line.strip()}" for number, line in enumerate(path.read_text().splitlines(), 1)
            if BRANCH.search(line)]
    assert hits == []
