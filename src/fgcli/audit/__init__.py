"""Auditing a dataset's maps: their statistics (:mod:`.stats`), object annotations
(:mod:`.annotations`) and the pointing game (:mod:`.localise`); docs/audit.md.

The statistics' names live here, without torch, for the readers that only show them
(the gallery, the report)."""

STAT_NAMES = ("peak_x", "peak_y", "com_x", "com_y", "concentration", "entropy", "border",
              "centre")
