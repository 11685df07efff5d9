"""The FullGrad engine: tensors in, tensors out, on the model's device.

Nothing here knows about files or terminals.
"""

from fgcli.engine.decompose import LayerInfo
from fgcli.engine.postprocess import PSI_CHOICES
from fgcli.engine.saliency import (
    METHODS,
    CompactDecomposition,
    Decomposition,
    Explanation,
    FullGrad,
    LayerSelection,
    SimpleFullGrad,
    SmoothFullGrad,
    check_layers,
    parse_layers,
    select_map_layers,
)

__all__ = [
    "METHODS",
    "PSI_CHOICES",
    "CompactDecomposition",
    "Decomposition",
    "Explanation",
    "FullGrad",
    "LayerInfo",
    "LayerSelection",
    "SimpleFullGrad",
    "SmoothFullGrad",
    "check_layers",
    "parse_layers",
    "select_map_layers",
]
