"""The facts about a dataset that tasks, metrics and models need, without reading its files."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DatasetInfo:
    """Which tasks a dataset labels, its class counts and names, and its boundary tolerance."""

    name: str
    tasks: tuple[str, ...]
    num_classes: dict[str, int] = field(default_factory=dict)  # for class-map tasks
    class_names: dict[str, list[str]] = field(default_factory=dict)
    boundary_max_dist: float = 0.011  # maxDist of the boundary protocol, fraction of the diagonal
