"""``eval.json``, ``eval.csv``, ``eval.png`` and the terminal table of an :class:`EvalResult`.

``eval.json`` (strict JSON: no NaN): the settings, the images evaluated (and those that
failed, with their reasons: also images whose logits, maps or scores are not finite), and
per method and metric the mean and standard error over images
(``perturbation``: one value per k; ``deletion`` / ``insertion``: the AUC) plus the mean
deletion and insertion curves with their standard errors. ``eval.csv``: one row per (method, metric, k) with mean,
se and n. ``eval.png``: one panel per metric, mean curves with ±1 standard-error bands
(pixel perturbation against k; deletion and insertion mean curves against the fraction
of pixels changed, with bands too). With ``--boxes`` / ``--masks``: ``localisation`` in
eval.json, ``pointing`` and ``energy`` rows in eval.csv and one more panel in eval.png
(:mod:`fgcli.evaluate.localisation`). With ``--sanity``: ``eval.json``'s ``sanity`` key,
``sanity.csv`` and ``sanity.png`` (:mod:`fgcli.evaluate.sanity`).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fgcli import names
from fgcli.errors import SetupError
from fgcli.evaluate import sanity
from fgcli.evaluate.run import EvalConfig, EvalResult
from fgcli.tree.atomic import WriteFailed, atomic_write, finite

WHAT = {
    "perturbation": "pixel perturbation |Δf|/|f| after removing the k% least salient pixels "
                    "(lower is better)",
    "deletion": "deletion AUC: class probability as the most salient pixels are removed "
                "(lower is better)",
    "insertion": "insertion AUC: class probability as the most salient pixels are put "
                 "into a blurred copy (higher is better)",
}


def _write(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (:func:`fgcli.tree.atomic.atomic_write`): a full
    disk is its DiskFullError, any other failure a one-line SetupError naming the file."""
    try:
        atomic_write(path, lambda fh: fh.write(data))
    except WriteFailed as exc:
        raise SetupError(f"--out {path.parent}: cannot write {path.name} "
                         f"({exc.reason})") from exc


def as_json(cfg: EvalConfig, result: EvalResult) -> dict[str, Any]:
    from fgcli.tree.info import versions

    return {
        "schema": 1,
        "command": list(cfg.command),
        "model": result.model, "weights": result.weights,
        "target": cfg.target, "ks": result.ks, "steps": result.steps, "seed": cfg.seed,
        "samples": cfg.samples, "layers": cfg.layers,
        # names as fgcli.names writes them: valid text, raw bytes in input_bytes
        "images": [names.text(p) for p in result.images],
        "failed": [{**names.record_fields(p), "error": e} for p, e in result.failed],
        "metrics": {m: WHAT[m] for m in cfg.metrics},
        "results": {method: {metric: asdict(s) for metric, s in per.items()}
                    for method, per in result.results.items()},
        "curves": result.curves, "curves_se": result.curves_se,
        "localisation": result.localisation,
        "seconds": round(result.seconds, 3),
        "versions": versions(),
        **({"sanity": sanity.as_json(result.extra["sanity"])} if "sanity" in result.extra
           else {}),
    }


def rows(result: EvalResult) -> list[list[Any]]:
    out: list[list[Any]] = []
    for method, per in result.results.items():
        for metric, s in per.items():
            ks: list[Any] = result.ks if metric == "perturbation" else [""]
            for k, mean, se in zip(ks, s.mean, s.se):
                out.append([method, metric, k, f"{mean:.6g}", f"{se:.3g}", s.n])
    if result.localisation is not None:
        from fgcli.evaluate.localisation import csv_rows

        out += csv_rows(result.localisation)
    return out


def write(cfg: EvalConfig, result: EvalResult) -> list[Path]:
    """eval.json, eval.csv and eval.png in ``cfg.out``; returns their paths."""
    out = Path(cfg.out)
    data = json.dumps(finite(names.clean(as_json(cfg, result))), indent=2, ensure_ascii=False,
                      allow_nan=False) + "\n"
    _write(out / "eval.json", data.encode("utf-8"))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "metric", "k", "mean", "se", "n"])
    writer.writerows(rows(result))
    _write(out / "eval.csv", buf.getvalue().encode("utf-8"))
    _write(out / "eval.png", plot(result))
    paths = [out / "eval.json", out / "eval.csv", out / "eval.png"]
    if "sanity" in result.extra:  # --sanity: sanity.csv and sanity.png
        s = result.extra["sanity"]
        _write(out / "sanity.csv", sanity.csv_bytes(s))
        _write(out / "sanity.png", sanity.plot(s, f"{result.model}: sanity check, "
                                                   f"{len(result.images)} images"))
        paths += [out / "sanity.csv", out / "sanity.png"]
    return paths


def plot(result: EvalResult) -> bytes:
    """PNG bytes: one panel per metric, curves with ±1 SE bands (AUC ± SE in the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(next(iter(result.results.values())).keys())
    panels = len(metrics) + (result.localisation is not None)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    palette = plt.get_cmap("tab20").colors  # 20 distinct colours: no method shares one
    for ax, metric in zip(axes[0], metrics):
        ax.set_prop_cycle(color=[palette[(2 * i) % 20 + (2 * i) // 20]
                                 for i in range(len(result.results))])
        for method, per in result.results.items():
            s = per[metric]
            if metric == "perturbation":
                (line,) = ax.plot(result.ks, s.mean, marker="o", ms=3, label=method)
                lo = [m - e for m, e in zip(s.mean, s.se)]
                hi = [m + e for m, e in zip(s.mean, s.se)]
                ax.fill_between(result.ks, lo, hi, color=line.get_color(), alpha=0.15)
            else:
                curve = result.curves[method][metric]
                xs = [i / (len(curve) - 1) for i in range(len(curve))]
                (line,) = ax.plot(xs, curve, label=f"{method} ({s.mean[0]:.3f} ± "
                                                   f"{s.se[0]:.3f})")
                se = result.curves_se.get(method, {}).get(metric)
                if se:
                    ax.fill_between(xs, [c - e for c, e in zip(curve, se)],
                                    [c + e for c, e in zip(curve, se)],
                                    color=line.get_color(), alpha=0.12)
        if metric == "perturbation":
            ax.set_xlabel("% of pixels removed (least salient first)")
            ax.set_ylabel("|Δf| / |f|")
            ax.set_title("pixel perturbation (lower is better)")
        else:
            ax.set_xlabel("fraction of pixels " + ("removed" if metric == "deletion"
                                                    else "inserted"))
            ax.set_ylabel("probability of the class")
            better = "lower" if metric == "deletion" else "higher"
            ax.set_title(f"{metric} (AUC, {better} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if result.localisation is not None:
        from fgcli.evaluate.localisation import draw

        draw(axes[0][-1], result.localisation)
    fig.suptitle(f"{result.model}: {len(result.images)} images, mean ± standard error")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
