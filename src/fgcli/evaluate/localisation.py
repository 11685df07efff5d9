"""``fullgrad eval --boxes / --masks``: pointing-game accuracy and energy in the objects,
for every method eval compares.

Each method's map of each evaluated image is scored by the dump's own definitions
(:func:`fgcli.audit.localise.locate`, docs/audit.md), against the region of the original
image the model saw (the whole image, or the centre crop with ``--crop``), so boxes stay in
original pixels. Per method: pointing accuracy = hits / located records (match "class" or
"any" with an object), its standard error sqrt(p (1 - p) / n); mean energy over the
located records whose energy is defined, its standard error sample std / sqrt(n). Images
without an annotation are left out of both (and counted); "absent" records (the labels
name classes, none of the target's) are counted apart; a mask that cannot be read, or is
smaller than its image, leaves the image out of both, with the reason (``mask_errors``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fgcli.audit import pointing_accuracy
from fgcli.audit.annotations import Annotations, ImageObjects
from fgcli.evaluate.summary import summarise


@dataclass
class _MaskRead(ImageObjects):
    """An image's mask read once, for every method's map (``locate`` asks each time)."""

    array: np.ndarray | None = None

    def mask_array(self) -> np.ndarray:
        return self.array if self.array is not None else super().mask_array()


@dataclass
class _PerMethod:
    hits: list[bool] = field(default_factory=list)
    energy: list[float] = field(default_factory=list)
    absent: int = 0


def pointing_summary(hits: Sequence[bool]) -> tuple[float | None, float | None]:
    """(accuracy, its binomial standard error); None without records
    (:func:`fgcli.audit.localise.pointing_accuracy`)."""
    return pointing_accuracy(sum(hits), len(hits))


def mean_se(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample std / sqrt(n)); None without values, se 0 for one value
    (:func:`fgcli.evaluate.summary.summarise`, as every eval number)."""
    if not values:
        return None, None
    summary = summarise(np.asarray(values, dtype=np.float64))
    return summary.mean[0], summary.se[0]


class Localiser:
    """The pointing game and energy of every method's maps, image by image, tallied."""

    def __init__(self, annotations: Annotations, categories: Sequence[str] | None,
                 n_classes: int, tolerance: float, methods: Sequence[str]) -> None:
        self.annotations = annotations
        self.categories = tuple(categories) if categories else None
        self.tolerance = float(tolerance)
        self.by_class = annotations.names_classes(categories, n_classes)
        self.methods = {m: _PerMethod() for m in methods}
        self.keys: list[str] = []
        self.annotated = 0
        self.mask_errors: list[tuple[str, str]] = []  # (image path, one-line reason)

    def target_name(self, target: int) -> str:
        if self.categories is not None and 0 <= target < len(self.categories):
            return self.categories[target]
        return str(target)

    def add(self, key: str, path: str, region: Any, target: int,
            maps: dict[str, np.ndarray]) -> None:
        """One evaluated image: ``maps`` (method -> (h, w) map over ``region``, the
        :class:`fgcli.data.decode.Box` of the original the model saw) for ``target``."""
        from fgcli.audit.localise import locate

        self.keys.append(key)
        objects = self.annotations.find(key)
        if objects is None:
            return
        try:
            if objects.mask is not None:
                objects = _MaskRead(objects.name, [], objects.mask, objects.mask_array())
            records = {name: locate(m, region, objects, target, self.target_name(target),
                                    self.tolerance, by_class=self.by_class)
                       for name, m in maps.items()}
        except ValueError as exc:  # a mask that cannot be read, or not the image's size
            self.mask_errors.append((path, str(exc).splitlines()[0]))
            return
        self.annotated += 1
        for name, rec in records.items():
            tally = self.methods[name]
            if rec["match"] == "absent" or not rec["boxes"]:
                tally.absent += 1
                continue
            if rec["hit"] is not None:  # None: a constant map, no peak to point with
                tally.hits.append(bool(rec["hit"]))
            if rec["energy"] is not None:
                tally.energy.append(float(rec["energy"]))

    def summary(self) -> str:
        """One line: the annotations' match counts over the evaluated images, and what
        pointing and energy are averaged over."""
        line = self.annotations.summary(self.keys, self.by_class)
        if self.mask_errors:
            n = len(self.mask_errors)
            line += f"; {n} mask{'s' if n != 1 else ''} not usable (eval.json: mask_errors)"
        return (line + f"; pointing and energy over the {self.annotated} annotated "
                f"image{'s' if self.annotated != 1 else ''}")

    def result(self) -> dict[str, Any]:
        """eval.json's ``localisation``: settings, counts and, per method, ``located``,
        ``hits``, ``pointing`` ± ``pointing_se``, ``energy`` ± ``energy_se`` (over
        ``energy_n`` records) and ``absent``."""
        per: dict[str, Any] = {}
        for name, t in self.methods.items():
            p, p_se = pointing_summary(t.hits)
            e, e_se = mean_se(t.energy)
            per[name] = {"located": len(t.hits), "hits": sum(t.hits), "pointing": p,
                         "pointing_se": p_se, "energy": e, "energy_se": e_se,
                         "energy_n": len(t.energy), "absent": t.absent}
        return {"source": self.annotations.source, "path": str(self.annotations.path),
                "tolerance": self.tolerance, "by_class": self.by_class,
                "images": len(self.keys), "annotated": self.annotated,
                "unannotated": len(self.keys) - self.annotated - len(self.mask_errors),
                "mask_errors": [{"image": p, "error": r} for p, r in self.mask_errors],
                "summary": self.summary(), "results": per}


def add_batch(localiser: Localiser, samples: Sequence[Any], keys: Sequence[str],
              paths: Sequence[str], targets: Any, maps: dict[str, Any]) -> None:
    """A batch's images into ``localiser``: ``samples`` (with ``.box``), their keys and
    paths, ``targets`` (n,) and ``maps`` method -> (n, h, w) tensors, row i = image i."""
    arrays = {name: m.detach().float().cpu().numpy() for name, m in maps.items()}
    for i, (sample, key, path) in enumerate(zip(samples, keys, paths)):
        localiser.add(key, path, sample.box, int(targets[i]),
                      {name: a[i] for name, a in arrays.items()})


def csv_rows(loc: dict[str, Any]) -> list[list[Any]]:
    """eval.csv's rows (method, metric, k, mean, se, n) for pointing and energy; empty
    mean and se where no image counted."""
    rows: list[list[Any]] = []
    for method, r in loc["results"].items():
        for metric, n in (("pointing", r["located"]), ("energy", r["energy_n"])):
            mean, se = r[metric], r[f"{metric}_se"]
            rows.append([method, metric, "", "" if mean is None else f"{mean:.6g}",
                         "" if se is None else f"{se:.3g}", n])
    return rows


def cells(loc: dict[str, Any], method: str) -> list[str]:
    """The table's pointing and energy cells of ``method``: mean±se, or - without data."""
    r = loc["results"][method]
    return [("-" if r[m] is None else f"{r[m]:.3f}±{r[f'{m}_se']:.3f}")
            for m in ("pointing", "energy")]


def draw(ax: Any, loc: dict[str, Any]) -> None:
    """One plot panel: pointing accuracy and mean energy per method, ±1 SE bars."""
    methods = list(loc["results"])
    ys = np.arange(len(methods))
    for offset, metric, colour in ((-0.2, "pointing", "tab:blue"),
                                   (0.2, "energy", "tab:orange")):
        values = [loc["results"][m][metric] for m in methods]
        errors = [loc["results"][m][f"{metric}_se"] for m in methods]
        ax.barh(ys + offset, [0.0 if v is None else v for v in values], height=0.4,
                xerr=[0.0 if e is None else e for e in errors], color=colour, alpha=0.8,
                label=metric, error_kw={"elinewidth": 1, "capsize": 2})
    ax.set_yticks(ys, methods, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.05)
    ax.set_xlabel("pointing accuracy / mean energy in the objects")
    ax.set_title(f"localisation ({loc['annotated']} annotated images, "
                 f"{loc['tolerance']:g} px; higher is better)")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7)
