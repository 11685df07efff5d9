"""Mean and standard error over images: how every ``fullgrad eval`` number is summarised
(the faithfulness metrics of :mod:`.run`, the sanity check of :mod:`.sanity`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Summary:
    """Mean and standard error (sample std / sqrt(n)) over images."""

    mean: list[float]
    se: list[float]
    n: int


def summarise(values: np.ndarray) -> Summary:
    """(n,) or (n, K) per-image values -> mean and standard error per column."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    n = values.shape[0]
    mean = values.mean(0)
    se = values.std(0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros_like(mean)
    return Summary([float(v) for v in mean], [float(v) for v in se], n)
