"""fgcli: batch FullGrad saliency for torchvision classifiers.

The engine classes are imported lazily so that ``fullgrad --help`` does not
pay for importing torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_ENGINE_NAMES = {
    "FullGrad", "SimpleFullGrad", "SmoothFullGrad", "Decomposition", "Explanation", "CompactDecomposition",
    "LayerInfo", "METHODS",
}

__all__ = sorted(_ENGINE_NAMES | {"__version__"})


def __getattr__(name: str) -> Any:
    if name in _ENGINE_NAMES:
        from fgcli import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'fgcli' has no attribute {name!r}")
