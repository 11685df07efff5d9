"""The FullGrad engine: tensors in, tensors out, on the model's device.

Nothing here knows about files or terminals.
"""

from fgcli.engine.decompose import LayerInfo
from fgcli.engine.saliency import (
    METHODS,
    Decomposition,
    Explanation,
    FullGrad,
    SimpleFullGrad,
    SmoothFullGrad,
)

__all__ = [
    "METHODS",
    "Decomposition",
    "Explanation",
    "FullGrad",
    "LayerInfo",
    "SimpleFullGrad",
    "SmoothFullGrad",
]
