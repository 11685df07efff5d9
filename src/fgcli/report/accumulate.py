"""Per-class running statistics and the off-object lists, fed one record at a time in
memory bounded by the number of classes (and K), never by the number of records.

Means and spreads are merged chunk by chunk (count, mean and sum of squared deviations,
Chan, Golub and LeVeque 1979), which stays exact where a sum of squares would cancel
(peak coordinates of hundreds of pixels that vary by a few).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import numpy as np

from fgcli.audit import STAT_NAMES, pointing_accuracy

# the manifest's `stats` keys (spec20.md; fgcli.audit.stats.STAT_NAMES once merged)
STATS = STAT_NAMES
LOCATED = ("class", "any")  # objects.match values that count for the pointing game
_COLUMNS = (*STATS, "energy")
_CHUNK = 8192  # records buffered before they are folded into the class arrays


def number(value: Any) -> float:
    """A finite number as float; NaN for null, missing, booleans and anything else."""
    if type(value) in (int, float) and math.isfinite(value):
        return float(value)
    return math.nan


def gallery_link(key: str, rank: int | None) -> str:
    """The gallery's deep link to one image (and --topk rank), from ``OUT/report/``."""
    link = f"../index.html#image={quote(key, safe='')}"
    return link if rank is None else f"{link}&rank={rank}"


class ClassTable:
    """Per target class: records, count / mean / M2 of every stat and of the energy in
    the boxes, and the pointing game's located, hits and absent counts."""

    def __init__(self) -> None:
        self.index: dict[int, int] = {}  # target -> row
        self.names: list[str | None] = []
        width = len(_COLUMNS)
        self.n = np.zeros((0, width))
        self.mean = np.zeros((0, width))
        self.m2 = np.zeros((0, width))
        self.counts = np.zeros((0, 4), dtype=np.int64)  # records, located, hits, absent
        self._rows: list[int] = []
        self._values: list[list[float]] = []
        self._flags: list[tuple[int, int, int, int]] = []

    def row(self, target: int, name: Any) -> int:
        """The row of a class (added on first sight; its first non-null name kept)."""
        row = self.index.get(target)
        if row is None:
            row = self.index[target] = len(self.names)
            self.names.append(None)
        if self.names[row] is None and isinstance(name, str):
            self.names[row] = name
        return row

    def add(self, row: int, stats: dict[str, Any] | None, objects: dict[str, Any] | None
            ) -> None:
        """One record of class ``row``: its stats (None: none) and objects (None: none)."""
        values = [number(stats.get(s)) for s in STATS] if stats else [math.nan] * len(STATS)
        located = hit = absent = 0
        energy = math.nan
        if objects:
            match = objects.get("match")
            located = int(match in LOCATED and isinstance(objects.get("hit"), bool))
            # (a constant map, hit null, has no peak: not in the pointing game)
            hit = int(located and objects.get("hit") is True)
            absent = int(match == "absent")
            if located:
                energy = number(objects.get("energy"))
        values.append(energy)
        self._rows.append(row)
        self._values.append(values)
        self._flags.append((1, located, hit, absent))
        if len(self._rows) >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        """Fold the buffered records into the per-class arrays."""
        classes = len(self.names)
        if self.n.shape[0] < classes:
            grow = classes - self.n.shape[0]
            self.n, self.mean, self.m2 = (np.vstack([a, np.zeros((grow, a.shape[1]))])
                                          for a in (self.n, self.mean, self.m2))
            self.counts = np.vstack([self.counts, np.zeros((grow, 4), dtype=np.int64)])
        if not self._rows:
            return
        rows = np.asarray(self._rows, dtype=np.int64)
        np.add.at(self.counts, rows, np.asarray(self._flags, dtype=np.int64))
        x = np.asarray(self._values, dtype=np.float64)
        self._rows, self._values, self._flags = [], [], []
        width = x.shape[1]
        valid = ~np.isnan(x)
        cell = (rows[:, None] * width + np.arange(width))[valid]
        vals = x[valid]
        size = classes * width
        nb = np.bincount(cell, minlength=size).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mb = np.where(nb > 0, np.bincount(cell, vals, minlength=size) / nb, 0.0)
        m2b = np.bincount(cell, (vals - mb[cell]) ** 2, minlength=size)
        na, ma, m2a = self.n.ravel(), self.mean.ravel(), self.m2.ravel()
        total = na + nb
        delta = mb - ma
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(total > 0, nb / total, 0.0)
            cross = np.where(total > 0, delta * delta * na * nb / total, 0.0)
        self.mean = (ma + delta * share).reshape(classes, width)
        self.m2 = (m2a + m2b + cross).reshape(classes, width)
        self.n = total.reshape(classes, width)

    def rows(self) -> list[dict[str, Any]]:
        """One summary per class, by target: the report's rows (see docs/report.md)."""
        self.flush()
        out = []
        for target, row in sorted(self.index.items()):
            records, located, hits, absent = (int(v) for v in self.counts[row])
            mean, std = {}, {}
            for col, name in enumerate(_COLUMNS):
                n = self.n[row, col]
                mean[name] = float(self.mean[row, col]) if n > 0 else None
                std[name] = float(math.sqrt(self.m2[row, col] / (n - 1))) if n > 1 else None
            energy, energy_std = mean.pop("energy"), std.pop("energy")
            n_energy = self.n[row, len(STATS)]
            pointing, pointing_se = pointing_accuracy(hits, located)
            out.append({
                "target": target, "name": self.names[row] or str(target),
                "records": records, "mean": mean, "std": std,
                "located": located, "hits": hits, "pointing": pointing,
                "pointing_se": pointing_se,
                "energy": energy,
                "energy_se": (energy_std / math.sqrt(n_energy)
                              if energy_std is not None else None),
                "absent": absent})
        return out


@dataclass
class TopList:
    """The ``k`` entries with the smallest sort keys, in order; a buffer of at most 2k
    between prunes, and a threshold that turns most records away without building an
    entry."""

    k: int
    items: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    limit: tuple[Any, ...] | None = None  # the k-th smallest key after the last prune

    def wants(self, sort_key: tuple[Any, ...]) -> bool:
        return self.k > 0 and (self.limit is None or sort_key < self.limit)

    def offer(self, sort_key: tuple[Any, ...], entry: dict[str, Any]) -> None:
        self.items.append((sort_key, entry))
        if len(self.items) >= 2 * self.k:
            self._prune()

    def _prune(self) -> None:
        self.items.sort(key=lambda item: item[0])
        del self.items[self.k:]
        if self.items and len(self.items) == self.k:
            self.limit = self.items[-1][0]

    def result(self) -> list[dict[str, Any]]:
        self._prune()
        return [entry for _, entry in self.items]


class OffObject:
    """The three off-object lists: highest ``stats.border``, lowest ``objects.energy``
    (records whose boxes were used), and pointing-game misses by ``prob``, highest first.
    Ties go by key, then rank."""

    def __init__(self, k: int) -> None:
        self.lists = {"border": TopList(k), "energy": TopList(k), "misses": TopList(k)}

    def add(self, rec: dict[str, Any], stats: dict[str, Any] | None,
            objects: dict[str, Any] | None, picture: str | None) -> None:
        key, rank = rec["key"], rec.get("rank")
        tie = (key, rank or 0)
        prob = number(rec.get("prob"))
        offers = []
        border = number(stats.get("border")) if stats else math.nan
        if not math.isnan(border):
            offers.append(("border", (-border, *tie), border))
        if objects and objects.get("match") in LOCATED:
            energy = number(objects.get("energy"))
            if not math.isnan(energy):
                offers.append(("energy", (energy, *tie), energy))
            if objects.get("hit") is False:
                offers.append(("misses", (-prob if not math.isnan(prob) else math.inf, *tie),
                               None if math.isnan(prob) else prob))
        for name, sort_key, value in offers:
            top = self.lists[name]
            if top.wants(sort_key):
                top.offer(sort_key, {
                    "key": key, "rank": rank, "target": rec.get("target"),
                    "target_name": rec.get("target_name"), "value": value,
                    "prob": None if math.isnan(prob) else prob,
                    "link": gallery_link(key, rank), "picture": picture})

    def result(self) -> dict[str, list[dict[str, Any]]]:
        return {name: top.result() for name, top in self.lists.items()}
