"""The FullGrad engine: tensors in, tensors out, on the model's device.

Nothing here knows about files or terminals. :func:`build` makes a registered method
(``fullgrad``, ``simple``, ``smooth``) by name; the names are declared, torch-free, in
:data:`fgcli.config.METHOD_NAMES`, so that option parsing and ``--help`` need no torch.
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
    build,
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
    "build",
    "check_layers",
    "parse_layers",
    "select_map_layers",
]
