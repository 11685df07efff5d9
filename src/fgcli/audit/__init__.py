"""Auditing a dataset's maps: their statistics (:mod:`.stats`), object annotations
(:mod:`.annotations`) and the pointing game (:mod:`.localise`); docs/audit.md.

The statistics' names and the pointing game's accuracy live here, without torch, for the
readers that only show or count them (the gallery, the report, eval's tally)."""

import math

STAT_NAMES = ("peak_x", "peak_y", "com_x", "com_y", "concentration", "entropy", "border",
              "centre")


def pointing_accuracy(hits: int, located: int) -> tuple[float | None, float | None]:
    """The pointing game's accuracy hits / located and its binomial standard error
    sqrt(p (1 - p) / n) (eval and the report); None without located records."""
    if located == 0:
        return None, None
    p = hits / located
    return p, math.sqrt(p * (1.0 - p) / located)
