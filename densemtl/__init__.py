"""densemtl: multi-task dense scene understanding in PyTorch.

``densemtl.load(PATH)`` (a checkpoint or an exported model folder) gives a model whose ``predict(image)``
returns every task's map; see :mod:`densemtl.api`. It is imported on first use, so importing a submodule
does not import torch models and the engine.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from densemtl.api import load

        return load
    raise AttributeError(f"module 'densemtl' has no attribute {name!r}")
