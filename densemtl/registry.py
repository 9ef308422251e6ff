"""The tables of pluggable parts: tasks, datasets, architectures and loss balancers, by name.

Each table maps a name (what a config says, e.g. ``model.arch: mtcp``) to where the part is defined,
as ``"module:attribute"``; the module is imported only when the part is first used, so this bottom
layer knows every name without importing anything above it. Config validation, the CLI's choices and
the builders all read these tables, so adding a part is one new file plus one row here. Code outside
the package (a plugin, a test) registers a part at run time with :meth:`Registry.register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

from densemtl.errors import ConfigError

T = TypeVar("T")


class Registry(Mapping[str, Any]):
    """A read-mostly mapping ``name -> part`` whose entries are imported on first access.

    ``kind`` names a part in messages ("task"), ``key`` the config key that selects one ("data.tasks").
    """

    def __init__(self, kind: str, key: str, rows: dict[str, str]) -> None:
        self.kind = kind
        self.key = key
        self._rows: dict[str, str | Any] = dict(rows)
        self._loaded: dict[str, Any] = {}

    def register(self, name: str, part: T | None = None) -> Any:
        """Add ``part`` under ``name``; without ``part``, a class decorator doing the same."""
        if part is None:
            def decorate(obj: T) -> T:
                self.register(name, obj)
                return obj

            return decorate
        self._rows[name] = part
        self._loaded[name] = part
        return part

    def unregister(self, name: str) -> None:
        """Remove an entry added with :meth:`register` (tests restore the built-in tables with it)."""
        self._rows.pop(name, None)
        self._loaded.pop(name, None)

    def __getitem__(self, name: str) -> Any:
        if name not in self._rows:
            raise KeyError(name)
        if name not in self._loaded:
            module, _, attribute = self._rows[name].partition(":")
            self._loaded[name] = getattr(importlib.import_module(module), attribute)
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def known(self) -> str:
        """The names as one comma-separated string, for messages."""
        return ", ".join(self._rows)

    def check(self, name: str, source: str | None = None) -> None:
        """Raise a :class:`ConfigError` naming the key and the known names when ``name`` is not a row."""
        if name not in self._rows:
            where = f"{source}: " if source else ""
            raise ConfigError(f"{where}key '{self.key}': unknown {self.kind} '{name}' (known: {self.known()})")

    def lookup(self, name: str, source: str | None = None) -> Any:
        """The part called ``name`` (imported now if need be); an unknown name fails as :meth:`check` says."""
        self.check(name, source)
        return self[name]


TASKS = Registry("task", "data.tasks", {
    "semseg": "densemtl.tasks:SemsegTask",
    "depth": "densemtl.tasks:DepthTask",
    "normals": "densemtl.tasks:NormalsTask",
    "edge": "densemtl.tasks:EdgeTask",
    "saliency": "densemtl.tasks:SaliencyTask",
    "human_parts": "densemtl.tasks:HumanPartsTask",
})

DATASETS = Registry("dataset", "data.dataset", {
    "synthetic": "densemtl.data.synthetic.dataset:SyntheticDataset",
    "nyud": "densemtl.data.nyud:NYUDDataset",
    "pascal": "densemtl.data.pascal:PascalContextDataset",
})

ARCHITECTURES = Registry("architecture", "model.arch", {
    "multitask": "densemtl.models.multitask:MULTITASK",
    "single": "densemtl.models.multitask:SINGLE",
    "mtcp": "densemtl.models.mtcp:MTCP",
    "sharing": "densemtl.models.sharing.architecture:SHARING",
})

BALANCERS = Registry("balancer", "loss.balancer", {
    "fixed": "densemtl.losses.balancers.fixed:FixedBalancer",
    "uncertainty": "densemtl.losses.balancers.uncertainty:UncertaintyBalancer",
    "dwa": "densemtl.losses.balancers.dwa:DWABalancer",
    "lps": "densemtl.losses.balancers.lps:LPSBalancer",
    "gradnorm": "densemtl.losses.balancers.gradnorm:GradNormBalancer",
    "pcgrad": "densemtl.losses.balancers.pcgrad:PCGradBalancer",
    "cagrad": "densemtl.losses.balancers.cagrad:CAGradBalancer",
    "mgda": "densemtl.losses.balancers.mgda:MGDABalancer",
    "nashmtl": "densemtl.losses.balancers.nashmtl:NashMTLBalancer",
})

