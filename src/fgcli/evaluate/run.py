"""``run_eval(config) -> EvalResult``: images -> batches -> every method's maps -> metrics.

Memory stays bounded whatever the number of images: images stream through in batches;
per image only the metric values are kept (a few floats per method). Deterministic: the
same images, model and seed give the same numbers (random and noisy methods are seeded;
the metrics have no randomness).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fgcli.config import ModelSpec, check_not_blank
from fgcli.errors import SetupError, UsageError
from fgcli.evaluate.summary import Summary, summarise  # one home; also imported from here

METRICS = ("perturbation", "deletion", "insertion")
DEFAULT_KS = (10.0, 30.0, 50.0, 70.0, 90.0)


@dataclass(frozen=True)
class EvalConfig:
    """Everything ``fullgrad eval`` needs; the model spec is ``dump``'s (build it with
    :func:`fgcli.config.from_options`, which takes the spec's options by their flat names)."""

    inputs: tuple[str, ...]
    spec: ModelSpec
    device: str = "auto"
    target: str = "pred"
    out: str = "fullgrad-eval"
    methods: tuple[str, ...] = ()  # empty: every method (fgcli.evaluate.methods.ALL_METHODS)
    metrics: tuple[str, ...] = METRICS
    ks: tuple[float, ...] = DEFAULT_KS
    steps: int = 20
    batch_size: int = 4
    samples: int = 25
    seed: int = 0
    layers: str | None = None
    boxes: str | None = None  # --boxes / --masks: pointing game and energy per method
    masks: str | None = None  # (fgcli.evaluate.localisation)
    point_tolerance: float = 15.0  # pixels (Zhang et al. 2016)
    sanity: bool = False  # --sanity: cascading randomisation (fgcli.evaluate.sanity)
    sanity_steps: int = 6
    command: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        from fgcli.evaluate.methods import parse_methods

        check_not_blank({"--out": self.out, "--target": self.target, "--layers": self.layers,
                         "--boxes": self.boxes, "--masks": self.masks})
        if "" in self.inputs:
            raise UsageError("an input is an empty path; give a file or a directory")

        try:
            object.__setattr__(self, "methods", tuple(parse_methods(
                ",".join(self.methods) if self.methods else None)))
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        bad = [m for m in self.metrics if m not in METRICS]
        if bad or not self.metrics:
            raise UsageError(f"--metrics: unknown metric {bad[0] if bad else ''!r}; choose "
                             f"from {', '.join(METRICS)}")
        outside = [k for k in self.ks if not 0.0 < k < 100.0]
        if outside or not self.ks:
            raise UsageError(f"--ks: each k is a percentage strictly between 0 and 100, got "
                             f"{outside[0] if outside else 'none'}")
        checks = [(self.steps >= 1, "--steps must be >= 1"),
                  (self.batch_size >= 1, "--batch-size must be >= 1"),
                  (self.samples >= 1, "--samples must be >= 1"),
                  (self.point_tolerance >= 0, "--point-tolerance must be >= 0"),
                  (self.boxes is None or self.masks is None,
                   "--boxes and --masks exclude each other: give one annotation source"),
                  (self.sanity_steps >= 2, "--sanity-steps must be >= 2"),
                  (bool(self.inputs), "give the images to evaluate on (two or more)"),
                  (bool(self.spec.model.strip()), "--model is required")]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)


@dataclass
class EvalResult:
    model: str
    weights: str
    images: list[str]
    failed: list[tuple[str, str]]  # (input, one-line reason): not evaluated
    methods: list[str]
    ks: list[float]
    steps: int
    # method -> metric -> Summary (perturbation: one value per k; deletion/insertion: AUC)
    results: dict[str, dict[str, Summary]]
    # method -> "deletion" / "insertion" -> mean curve over images (steps + 1 points), and
    # its standard error at each point
    curves: dict[str, dict[str, list[float]]]
    curves_se: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    # --boxes / --masks: fgcli.evaluate.localisation.Localiser.result(), else None
    localisation: dict[str, Any] | None = None


def run_eval(cfg: EvalConfig, progress: Callable[[int, int], None] | None = None,
             on_failure: Callable[[str, str], None] | None = None) -> EvalResult:
    """Evaluate every method of ``cfg.methods`` on every image with every metric.

    ``progress(done, total)`` after each batch; ``on_failure(input, reason)`` for each
    image that cannot be read (it is left out; fewer than two readable images is an
    error). ``cfg.out`` is created and checked for writing first (SetupError), and the
    inputs listed, before the model loads; a folder made for ``cfg.out`` goes again
    when the evaluation fails.
    """
    from fgcli.tree.atomic import remove_created, writable_dir

    created = writable_dir(cfg.out, "--out")
    try:
        return _evaluate(cfg, progress, on_failure)
    except BaseException:
        remove_created(cfg.out, created)
        raise


def _readable(cfg: EvalConfig, on_failure: Callable[[str, str], None] | None
              ) -> tuple[list[Any], list[tuple[str, str]]]:
    """The inputs' images and the inputs that failed (with reasons); fewer than two
    readable images is a UsageError naming the others and why."""
    from fgcli.data.decode import DecodeError, decode
    from fgcli.data.discover import discover

    failed: list[tuple[str, str]] = []
    items = []
    for item in discover(cfg.inputs, exclude=cfg.out):
        if item.error is not None:
            failed.append((item.path, item.error))
            if on_failure:
                on_failure(item.path, item.error)
        else:
            items.append(item)
    if len(items) < 2:  # say which of so few cannot be decoded (cheap: one at most)
        found = len(items) + len(failed)
        for item in items:
            try:
                decode(item.path, cfg.spec.max_pixels)
            except DecodeError as exc:
                failed.append((item.path, str(exc)))
                if on_failure:
                    on_failure(item.path, str(exc))
        _too_few(found, found - len(failed), failed)
    return items, failed


def _too_few(found: int, usable: int, failed: list[tuple[str, str]]) -> None:
    """UsageError: eval needs two images; names up to three inputs that failed."""
    named = "; ".join(f"{path}: {reason}" for path, reason in failed[:3])
    more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
    raise UsageError(f"eval needs at least two readable images for a standard error; found "
                     f"{found} input(s), {usable} readable" + (f" ({named}{more})" if named
                                                                  else ""))


def _evaluate(cfg: EvalConfig, progress: Callable[[int, int], None] | None,
              on_failure: Callable[[str, str], None] | None) -> EvalResult:
    """:func:`run_eval` once the output place is known to be writable."""
    from fgcli.evaluate.localisation import add_batch
    from fgcli.models.sources.usercode import FORWARD_HINT, user_code

    started = time.perf_counter()
    annotations = _annotations(cfg)  # a malformed file: refused before the model loads
    items, failed = _readable(cfg, on_failure)

    def fail(path: str, reason: str) -> None:
        failed.append((path, reason))
        if on_failure:
            on_failure(path, reason)

    setup = _Setup(cfg)
    tally = _Tally(cfg)
    localiser = _localiser(cfg, annotations, setup)
    done = 0
    for batch in setup.batches(items, fail):
        if batch.x is None:
            continue
        paths = [items[s.index].path for s in batch.samples]
        kept: list[Any] | None = None if localiser is None else []
        with user_code(f"model {cfg.spec.model}", "computing a batch", FORWARD_HINT):
            scores, reasons = _score_batch(cfg, setup.model, setup.methods,
                                           batch.x.to(setup.device), setup.fixed, setup.norm,
                                           kept)
        for images, targets, maps in kept or ():
            chosen = [batch.samples[j] for j in images]
            add_batch(localiser, chosen, [items[c.index].key for c in chosen],
                      [items[c.index].path for c in chosen], targets, maps)
        for path, reason in zip(paths, reasons):
            if reason is not None:  # left out, like an unreadable image
                fail(path, reason)
        tally.add(scores, [p for p, r in zip(paths, reasons) if r is None])
        done += len(batch.samples)
        if progress:
            progress(done, len(items))
    if len(tally.evaluated) < 2:
        _too_few(len(tally.evaluated) + len(failed), len(tally.evaluated), failed)
    result = tally.result(cfg, setup.loaded.config.weights, failed, 0.0)
    result.localisation = None if localiser is None else localiser.result()
    if cfg.sanity:
        from fgcli.evaluate.sanity import run_sanity

        scored = set(tally.evaluated)
        result.extra["sanity"] = run_sanity(cfg, setup, [i for i in items if i.path in scored],
                                            _ahead(progress, done, len(scored)))
    result.seconds = time.perf_counter() - started
    return result


def _ahead(progress: Callable[[int, int], None] | None, done: int, more: int
           ) -> Callable[[int], None] | None:
    """``progress`` continued for ``more`` items after ``done``: a per-batch count."""
    if progress is None:
        return None
    count = [done]

    def step(n: int) -> None:
        count[0] += n
        progress(count[0], done + more)

    return step


def _annotations(cfg: EvalConfig) -> Any:
    """--boxes / --masks read (UsageError naming a malformed file), or None."""
    if cfg.boxes is None and cfg.masks is None:
        return None
    from fgcli.audit.annotations import read_annotations

    return read_annotations(boxes=cfg.boxes, masks=cfg.masks)


def _localiser(cfg: EvalConfig, annotations: Any, setup: _Setup) -> Any:
    """The pointing game and energy tally of every method, or None without annotations."""
    if annotations is None:
        return None
    from fgcli.evaluate.localisation import Localiser

    config = setup.loaded.config
    return Localiser(annotations, config.categories, config.num_classes,
                     cfg.point_tolerance, list(setup.methods))


class _Setup:
    """The model (placed, frozen, copying its input), its normalisation, the target and
    the methods of one evaluation."""

    def __init__(self, cfg: EvalConfig) -> None:
        from fgcli.evaluate import metrics as M
        from fgcli.evaluate.methods import build
        from fgcli.models.device import resolve_device
        from fgcli.models.load import load
        from fgcli.models.targets import resolve_target

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.loaded = load(cfg.spec, self.device)
        self.model = self.loaded.model
        self.model.register_forward_pre_hook(_copy_input)
        config = self.loaded.config
        self.norm = M.Normalisation(tuple(config.mean), tuple(config.std))
        self.fixed = resolve_target(cfg.target, config.categories, config.num_classes)
        self.layers = _layers(cfg.layers)
        self.methods = {name: build(name, self.model, samples=cfg.samples, seed=cfg.seed,
                                    mean=tuple(config.mean), std=tuple(config.std),
                                    psi_layers=self.layers)
                        for name in cfg.methods}

    def batches(self, items: list[Any], fail: Callable[[str, str], None]) -> Iterator[Any]:
        """The images decoded lazily, ``batch_size`` at a time (memory does not grow with
        their number); an image that cannot be decoded goes to ``fail``."""
        from fgcli.data.decode import ImageDataset, collate

        c, size = self.loaded.config, self.cfg.batch_size
        dataset = ImageDataset(items, c.size, c.crop, c.resize, c.mean, c.std, False,
                               self.cfg.spec.max_pixels, c.interpolation)
        for start in range(0, len(items), size):
            batch = collate([dataset[i] for i in range(start, min(len(items), start + size))])
            for f in batch.failures:
                fail(items[f.index].path, f.error)
            yield batch


class _Tally:
    """Per method and metric, the values (and curves) of the images evaluated so far."""

    def __init__(self, cfg: EvalConfig) -> None:
        self.values: dict[str, dict[str, list[np.ndarray]]] = {
            m: {k: [] for k in cfg.metrics} for m in cfg.methods}
        self.curves: dict[str, dict[str, list[np.ndarray]]] = {
            m: {k: [] for k in ("deletion", "insertion") if k in cfg.metrics}
            for m in cfg.methods}
        self.evaluated: list[str] = []

    def add(self, scores: dict[str, dict[str, tuple[np.ndarray, Any]]],
            paths: list[str]) -> None:
        for name, per in scores.items():
            for metric, arrays in per.items():
                self.values[name][metric].append(arrays[0])
                if metric in self.curves[name]:
                    self.curves[name][metric].append(arrays[1])
        self.evaluated.extend(paths)

    def result(self, cfg: EvalConfig, weights: str, failed: list[tuple[str, str]],
               seconds: float) -> EvalResult:
        results = {m: {k: summarise(np.concatenate(v)) for k, v in per.items()}
                   for m, per in self.values.items()}
        stats = {m: {k: summarise(np.concatenate(c)) for k, c in per.items()}
                 for m, per in self.curves.items()}
        return EvalResult(cfg.spec.model, weights, self.evaluated, failed, list(cfg.methods),
                          list(cfg.ks), cfg.steps, results,
                          {m: {k: st.mean for k, st in per.items()} for m, per in stats.items()},
                          {m: {k: st.se for k, st in per.items()} for m, per in stats.items()},
                          seconds=seconds)


def _copy_input(_module: Any, args: tuple) -> tuple | None:
    """A forward pre-hook: the model gets a copy of its input, so a forward that modifies
    its input in place (``x.mul_(2)``) neither changes the batch every method and metric
    reads nor fails on captum's leaf inputs. The engine's traced pass feeds the model its
    own copy already (marked with its layout tag): that one is not copied twice."""
    from fgcli.engine.layout import LAYOUT_ATTR

    if args and hasattr(args[0], "clone") and not hasattr(args[0], LAYOUT_ATTR):
        return (args[0].clone(), *args[1:])
    return None


def _nonfinite_rows(t: Any) -> list[bool]:
    """Per image (dim 0): whether any value of ``t`` is NaN or infinite."""
    import torch

    return (~torch.isfinite(t.detach().float()).reshape(len(t), -1).all(1)).cpu().tolist()


def _score_batch(cfg: EvalConfig, model: Any, methods: dict[str, Any], x: Any,
                 fixed: int | None, norm: Any, kept: list[Any] | None = None
                 ) -> tuple[dict[str, dict[str, tuple[np.ndarray, Any]]], list[str | None]]:
    """Every method's metric values for one batch: method -> metric -> (per-image values,
    per-image curves or None), over the images whose reason is None. An image whose
    logits, any method's map or any score are NaN or infinite gets a reason instead and is
    left out of every method (so every method is averaged over the same images).
    ``kept``: gets (batch positions, targets, method -> their maps) of those images."""
    import torch

    from fgcli.models.outputs import extract_logits, nonfinite_logit

    reasons: list[str | None] = [None] * len(x)
    with torch.no_grad():
        logits = extract_logits(model(x))
    for j, bad in enumerate(_nonfinite_rows(logits)):
        if bad:  # as dump says it: the first such value
            row = logits[j].detach().float()
            reasons[j] = nonfinite_logit(row[~torch.isfinite(row)][0].item())
    keep = [j for j, r in enumerate(reasons) if r is None]
    maps: dict[str, Any] = {}
    for name, method in methods.items():
        if not keep:
            break
        sub = x[keep]
        target = (logits[keep].argmax(1) if fixed is None
                  else torch.full((len(sub),), fixed, dtype=torch.long, device=x.device))
        try:
            maps[name] = method(model, sub, target)
        except SetupError:
            raise
        except RuntimeError as exc:
            text = str(exc).strip().splitlines()
            raise SetupError(f"--methods {name}: {text[0] if text else exc}") from exc
        for i, bad in enumerate(_nonfinite_rows(maps[name])):
            if bad and reasons[keep[i]] is None:
                reasons[keep[i]] = f"non-finite {name} map"
    scores = _metric_values(cfg, model, x, logits, fixed, norm, maps, keep, reasons)
    rows = [i for i, j in enumerate(keep) if reasons[j] is None]
    if kept is not None and rows and maps:
        images = [keep[i] for i in rows]
        targets = logits[images].argmax(1).tolist() if fixed is None else [fixed] * len(rows)
        kept.append((images, targets, {name: m[rows] for name, m in maps.items()}))
    return scores, reasons


def _metric_values(cfg: EvalConfig, model: Any, x: Any, logits: Any, fixed: int | None,
                   norm: Any, maps: dict[str, Any], keep: list[int],
                   reasons: list[str | None]) -> dict[str, dict[str, tuple[np.ndarray, Any]]]:
    """The metrics of :func:`_score_batch` on the images still kept (``reasons`` None);
    marks images whose scores are not finite and leaves them out of the values."""
    import torch

    from fgcli.evaluate import metrics as M

    rows = [i for i, j in enumerate(keep) if reasons[j] is None]  # positions within keep
    if not rows:
        return {}
    images = [keep[i] for i in rows]
    sub = x[images]
    target = (logits[images].argmax(1) if fixed is None
              else torch.full((len(sub),), fixed, dtype=torch.long, device=x.device))
    out: dict[str, dict[str, tuple[np.ndarray, Any]]] = {}
    for name, m in maps.items():
        sal = m[rows]
        per: dict[str, tuple[np.ndarray, Any]] = {}
        if "perturbation" in cfg.metrics:
            per["perturbation"] = (M.pixel_perturbation(
                model, sub, sal, ks=cfg.ks, norm=norm, target=target).cpu().numpy(), None)
        for metric, fn in (("deletion", M.deletion_auc), ("insertion", M.insertion_auc)):
            if metric in cfg.metrics:
                auc, curve = fn(model, sub, sal, norm=norm, target=target, steps=cfg.steps,
                                return_curves=True)
                per[metric] = (auc.cpu().numpy(), curve.cpu().numpy())
        out[name] = per
    finite = np.ones(len(images), dtype=bool)
    for name, per in out.items():
        for metric, (vals, curve) in per.items():
            ok = np.isfinite(vals.reshape(len(images), -1)).all(1)
            if curve is not None:
                ok &= np.isfinite(curve.reshape(len(images), -1)).all(1)
            for i in np.flatnonzero(finite & ~ok):
                reasons[images[i]] = f"non-finite {metric} score ({name})"
            finite &= ok
    return {name: {metric: (vals[finite], None if curve is None else curve[finite])
                   for metric, (vals, curve) in per.items()} for name, per in out.items()}


def _layers(text: str | None) -> Any:
    """``--layers``: the engine's own parser (patterns, or K for the last K layers)."""
    from fgcli.engine import parse_layers

    try:
        return parse_layers(text)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--layers: {exc}") from exc


