"""The FullGrad engine: tensors in, tensors out, on the model's device.

Nothing here knows about files or terminals.
"""

from fgcli.engine.decompose import LayerInfo
from fgcli.engine.saliency import (
    METHODS,
    CompactDecomposition,
    Decomposition,
    Explanation,
    FullGrad,
    SimpleFullGrad,
    SmoothFullGrad,
)

__all__ = [
    "METHODS",
    "CompactDecomposition",
    "Decomposition",
    "Explanation",
    "FullGrad",
    "LayerInfo",
    "SimpleFullGrad",
    "SmoothFullGrad",
]
