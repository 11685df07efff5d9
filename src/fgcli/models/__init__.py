"""Models: a :class:`fgcli.config.ModelSpec` becomes a frozen model on its device
(:func:`fgcli.models.load.load`).

``fgcli.models.load_model``, the Python API documented since 0.1, is re-exported lazily
from :mod:`fgcli.models.load`, so that importing a submodule does not load every source.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["load_model"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        return importlib.import_module("fgcli.models.load").load_model
    raise AttributeError(f"module 'fgcli.models' has no attribute {name!r}")
