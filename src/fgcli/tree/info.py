"""The versions a result was made with (run.json, eval.json)."""

from __future__ import annotations

import platform

import numpy as np
import torch

from fgcli import __version__


def versions() -> dict[str, str]:
    import PIL
    import torchvision

    return {"fgcli": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__}
