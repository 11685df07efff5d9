"""Run configuration: one frozen object, built from defaults < config file < command line.

No torch here: the CLI imports this for ``--help`` and option parsing.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from fgcli.errors import UsageError

T = TypeVar("T")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


OUTPUT_KINDS = ("heatmap", "overlay", "map", "decomp")
# fgcli.engine.PSI_CHOICES, repeated here so that option parsing needs no torch
PSI_NAMES = ("abs-rescale", "signed", "abs", "positive")
# overlay styles (fgcli.render.overlay_style): uniform blend, or heat weighted by saliency
OVERLAY_STYLES = ("blend", "heat")
DEFAULT_SAVE = ("heatmap", "overlay", "map")
# The saliency methods of ``dump --method``, declared here, in the torch-free base layer,
# because option parsing (``--help``, a TOML ``method = ...``) must check a name without
# importing the engine, and nothing here may import a layer above. The engine's registry
# (fgcli.engine.build) implements exactly these: its ``register`` refuses a name not
# declared here, and tests/test_registries.py fails on a declared name it cannot build.
# ``Method`` is the same list as the str enum typer's choices and the config field use.
METHOD_NAMES = ("fullgrad", "simple", "smooth")
Method = enum.Enum("Method", {name: name for name in METHOD_NAMES}, type=str,
                   module=__name__)

# Pillow refuses images above twice its default limit; we keep that threshold.
DEFAULT_MAX_PIXELS = 178_956_970


@dataclass(frozen=True)
class ModelSpec:
    """Which model, with which weights, fed how: the options ``dump``, ``eval`` (and, in
    part, ``check``) share. Field names are the long option names and TOML keys;
    :func:`fgcli.models.load.load` turns a spec into a placed, frozen model.

    ``model`` may be empty here: each command says in its own words that it is required.
    """

    model: str = ""
    weights: str = "DEFAULT"
    model_args: tuple[str, ...] = ()  # key=value, values TOML literals (see parse_model_args)
    trust_pickle: bool = False
    size: int | None = None
    crop: bool = False
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    labels: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        check_not_blank({"--labels": self.labels, "--weights": self.weights})
        if self.size is not None and self.size < 8:
            raise UsageError("--size must be >= 8")
        if self.max_pixels < 1:
            raise UsageError("--max-pixels must be >= 1")
        parse_model_args(self.model_args)  # malformed key=value pairs fail here, early
        check_normalisation(self.mean, self.std)

    @property
    def arguments(self) -> dict[str, Any]:
        """``model_args`` as keyword arguments (:func:`parse_model_args`)."""
        return parse_model_args(self.model_args)


SPEC_FIELDS = tuple(f.name for f in fields(ModelSpec))


@dataclass(frozen=True)
class RunConfig:
    """Everything ``fullgrad dump`` needs. Field names are the long option names."""

    inputs: tuple[str, ...] = ()
    files_from: str | None = None
    null: bool = False
    spec: ModelSpec = field(default_factory=ModelSpec)  # model, weights, size, mean, ...
    method: Method = Method.fullgrad
    psi: str = "abs-rescale"  # post-processing of each term: abs-rescale, signed, abs, positive
    layers: str | None = None  # layers in the map: name patterns (a,b) or K (the last K)
    samples: int = 25
    sigma: float = 0.15
    seed: int = 0
    device: str = "auto"
    batch_size: int | None = None  # None: 32 on a GPU, 8 on the CPU
    workers: int | None = None  # None: min(4, cores - 1), at least 1
    target: str = "pred"
    topk: int | None = None
    out: str = "fullgrad-out"
    save: tuple[str, ...] = DEFAULT_SAVE
    colormap: str = "inferno"
    alpha: float = 0.5
    overlay: str = "blend"  # overlay style: blend (uniform alpha) or heat (see render)
    amp: bool = False
    channels_last: bool = False
    device_jpeg: bool | None = None  # None: on where devicejpeg.available(device)
    overwrite: bool = False
    fail_fast: bool = False
    shard: str | None = None  # "I/N": the images whose key hashes to I mod N
    ray: bool = False  # run on Ray Data
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a local Ray
    ray_actors: int | None = None  # None: one per GPU, else one per (cores - 1)
    dist_timeout: float = 600.0  # seconds a rank without progress is waited for
    gallery: bool = False  # build OUT/index.html after the run (fgcli.gallery)
    boxes: str | None = None  # object annotations (fgcli.audit.annotations): boxes ...
    masks: str | None = None  # ... or masks; adds the pointing game and energy to records
    point_tolerance: float = 15.0  # pixels (Zhang et al. 2016)
    quiet: bool = False
    json: bool = False
    debug: bool = False
    command: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        check_not_blank({"--out": self.out, "--files-from": self.files_from,
                         "--target": self.target, "--layers": self.layers,
                         "--shard": self.shard, "--ray-address": self.ray_address,
                         "--boxes": self.boxes, "--masks": self.masks})
        if "" in self.inputs:
            raise UsageError("an input is an empty path; give a file, a directory or -")
        bad = [s for s in self.save if s not in OUTPUT_KINDS]
        if bad:
            raise UsageError(f"--save: unknown output {bad[0]!r}; choose from "
                             f"{', '.join(OUTPUT_KINDS)}")
        if not self.save:
            raise UsageError("--save: name at least one of " + ", ".join(OUTPUT_KINDS))
        checks = [
            (self.batch_size is None or self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.workers is None or self.workers >= 0, "--workers must be >= 0"),
            (self.topk is None or self.topk >= 1, "--topk must be >= 1"),
            (self.samples >= 1, "--samples must be >= 1"),
            (self.sigma >= 0, "--sigma must be >= 0"),
            (0.0 <= self.alpha <= 1.0, "--alpha must be between 0 and 1"),
            (self.ray_actors is None or self.ray_actors >= 1, "--ray-actors must be >= 1"),
            (self.dist_timeout > 0, "--dist-timeout must be > 0"),
            (self.point_tolerance >= 0, "--point-tolerance must be >= 0"),
            (self.boxes is None or self.masks is None,
             "--boxes and --masks exclude each other: give one annotation source"),
            (bool(self.spec.model.strip()), "--model is required (see `fullgrad models`)"),
            (bool(self.inputs) or self.files_from is not None,
             "give at least one input: a directory, an image, - for a list on stdin, "
             "or --files-from FILE"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if self.topk is not None and self.target != "pred":
            raise UsageError("--topk and --target exclude each other")
        if self.psi not in PSI_NAMES:
            raise UsageError(f"--psi: unknown {self.psi!r}; choose from {', '.join(PSI_NAMES)}")
        if self.overlay not in OVERLAY_STYLES:
            raise UsageError(f"--overlay: unknown {self.overlay!r}; choose from "
                             f"{', '.join(OVERLAY_STYLES)}")

    def settings_fingerprint(self, weights_identity: str, interpolation: str = "bilinear",
                             annotations: str | None = None) -> str:
        """A hash of every setting that changes an output file (for resuming).

        Batch size, workers, device, memory format and verbosity are not part of
        it: they change results by float rounding at most. ``--amp`` is: reduced
        precision changes maps visibly. ``--model-arg`` values and the resize
        interpolation count where they are used (absent or bilinear, the hash is the
        one earlier versions wrote, so their runs still resume). So do ``--psi``,
        ``--layers`` and ``--overlay`` when not their defaults, and with ``--boxes`` /
        ``--masks`` what the annotation says (``annotations``: a hash of its content, so an
        edited file recomputes and another spelling of its path does not) and
        ``--point-tolerance`` (the records' ``objects`` depend on them)."""
        spec = self.spec
        keys = ("model", "method", "size", "crop", "mean", "std", "labels", "target",
                "topk", "save", "colormap", "alpha", "amp")
        data: dict[str, Any] = {k: _plain(getattr(spec if k in SPEC_FIELDS else self, k))
                                for k in keys}
        data["weights"] = weights_identity
        if spec.model_args:
            data["model_args"] = sorted(spec.model_args)
        if interpolation != "bilinear":
            data["interpolation"] = interpolation
        if self.method is Method.smooth:
            data.update(samples=self.samples, sigma=self.sigma, seed=self.seed)
        if self.psi != "abs-rescale":  # the defaults leave earlier runs' hashes unchanged
            data["psi"] = self.psi
        if self.layers is not None:
            data["layers"] = self.layers
        if self.overlay != "blend":
            data["overlay"] = self.overlay
        if annotations is not None:  # --boxes / --masks: records gain "objects"
            data.update(annotations=annotations, tolerance=self.point_tolerance)
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# what to give instead of an empty value, per option
_BLANK_HINTS = {
    "--out": "give a directory",
    "--labels": "give a text file of class names",
    "--files-from": "give a file that lists image paths",
    "--weights": "give DEFAULT, a weights name, a checkpoint file, none or random",
    "--target": "give pred, a class index or a class name",
    "--layers": "give all, K (the last K layers) or name patterns",
    "--shard": "give I/N",
    "--ray-address": "give auto or ray://HOST:PORT, or leave the option out",
    "--config": "give a TOML file",
    "--boxes": "give a folder of XML files, a COCO .json or a .csv of boxes",
    "--masks": "give a folder of mask PNGs",
    "OUT": "give the output directory of a dump",
}


def check_not_blank(values: Mapping[str, str | None]) -> None:
    """Options given as an empty or blank string are usage errors: an empty ``--out``
    would silently mean the current directory, an empty ``--labels`` no labels at all."""
    for option, value in values.items():
        if value is not None and not value.strip():
            hint = _BLANK_HINTS.get(option, "give a value")
            raise UsageError(f"{option}: empty value; {hint}")


def normalisation_fault(value: tuple[float, ...], positive: bool = False) -> str | None:
    """What is wrong with a mean or std, if anything: ``"count"`` (not three numbers),
    ``"finite"`` (a NaN or an infinity) or, with ``positive`` (a std), ``"positive"`` (a
    value <= 0); None when it is fine. The one check of both ``--mean`` / ``--std`` and a
    user model's ``MEAN`` / ``STD``; each caller words its own message."""
    if len(value) != 3:
        return "count"
    if not all(math.isfinite(v) for v in value):
        return "finite"
    if positive and min(value) <= 0:
        return "positive"
    return None


def check_normalisation(mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> None:
    """--mean / --std: three finite numbers each, every std > 0 (a NaN or a zero std
    would make every image's input, and so its map, NaN or infinite)."""
    for name, value in (("mean", mean), ("std", std)):
        fault = None if value is None else normalisation_fault(value, name == "std")
        if fault == "count":
            raise UsageError(f"--{name} takes three numbers (R,G,B), got {value!r}")
        if fault == "finite":
            raise UsageError(f"--{name}: {','.join(str(v) for v in value)} holds a "
                             "non-finite number; give three finite numbers (R,G,B)")
        if fault == "positive":
            raise UsageError("--std values must be > 0")


def parse_model_args(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``--model-arg key=value`` pairs as keyword arguments.

    Values are TOML literals (``depth=4``, ``drop=0.1``, ``pretrained=false``,
    ``dims=[64, 128]``, ``name="x"``); a value that is not one is taken as a plain
    string (``act=gelu``). Keys must be Python identifiers; a key given twice is an error.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"--model-arg: expected key=value with a Python name as key, "
                             f"got {pair!r}")
        if key in out:
            raise UsageError(f"--model-arg: {key} is given twice")
        text = text.strip()
        try:
            out[key] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = text
    return out


def model_arg_pairs(args: Mapping[str, Any]) -> tuple[str, ...]:
    """Keyword arguments as the ``key=value`` pairs :func:`parse_model_args` reads back."""
    return tuple(f"{k}={_toml_literal(v)}" for k, v in args.items())


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Turn a TOML value into the field's type, with a clear error."""
    if name == "method":
        try:
            return Method(str(value))
        except ValueError as exc:
            raise UsageError(f"config: method must be one of {', '.join(METHOD_NAMES)}; "
                             f"got {value!r}") from exc
    if name == "model_args":
        if isinstance(value, dict):  # a TOML table: [model-args] depth = 4
            return model_arg_pairs(value)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UsageError("config: model-args must be a table or a list of key=value strings")
        return tuple(value)
    if name in ("inputs", "save"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UsageError(f"config: {name} must be a list of strings")
        return tuple(str(v) for v in value)
    if name in ("mean", "std"):
        if isinstance(value, str):
            value = value.split(",")
        try:
            return tuple(float(v) for v in value)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"config: {name} must be three numbers") from exc
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UsageError(f"config: {name} must be true or false, got {value!r}")
        return value
    if name == "target" and isinstance(value, int):
        return str(value)
    expected = {"samples": int, "seed": int, "batch_size": int, "workers": int, "size": int,
                "topk": int, "max_pixels": int, "sigma": float, "alpha": float,
                "ray_actors": int, "dist_timeout": float}
    kind = expected.get(name)
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise UsageError(f"config: {name} must be an integer, got {value!r}")
    if kind is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UsageError(f"config: {name} must be a number, got {value!r}")
        return float(value)
    if kind is None and not isinstance(value, str):
        raise UsageError(f"config: {name} must be a string, got {value!r}")
    return value


def _toml_literal(value: Any) -> str:
    """A TOML value written back as the literal --model-arg parses."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a TOML file: top-level keys are long option names (dashes or underscores)."""
    check_not_blank({"--config": str(path)})
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UsageError(f"--config: {p}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config: {p}: cannot read it ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config: {p}: not valid TOML ({exc})") from exc
    defaults = {f.name: f.default for f in (*fields(ModelSpec), *fields(RunConfig))}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in defaults or name in ("command", "spec"):
            raise UsageError(f"--config: {p}: unknown option {key!r}")
        out[name] = _coerce(name, value, defaults[name])
    return out


def from_options(cls: type[T], values: Mapping[str, Any], config_file: str | None = None) -> T:
    """A command's configuration from its options: defaults, overridden by the TOML file,
    overridden by the options given on the command line.

    ``values`` is keyed by long option names with underscores (the configs' field names);
    None means "not given". The one place a command's parameters become its config: the
    CLI passes what it parsed, nothing is mapped by hand.
    """
    merged: dict[str, Any] = {}
    if config_file is not None:
        merged.update(read_config_file(config_file))
    for key, value in values.items():
        if value is not None:
            merged[key] = value
    try:
        return cls(**_nest_spec(cls, merged))
    except TypeError as exc:  # pragma: no cover - programming error
        raise UsageError(str(exc)) from exc


def _nest_spec(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the :class:`ModelSpec` option names (``model``, ``size``...) moved
    into a ``spec`` field, for a config class that has one (RunConfig, EvalConfig)."""
    if "spec" not in {f.name for f in fields(cls)}:
        return values
    flat = {k: v for k, v in values.items() if k in SPEC_FIELDS}
    rest = {k: v for k, v in values.items() if k not in SPEC_FIELDS}
    if flat:
        base = rest.get("spec", ModelSpec())
        rest["spec"] = dataclasses.replace(base, **flat)
    return rest


def build_config(cli: Mapping[str, Any], config_file: str | None = None) -> RunConfig:
    """``fullgrad dump``'s configuration (see :func:`from_options`)."""
    return from_options(RunConfig, cli, config_file)


def replace(cfg: T, **changes: Any) -> T:
    """``cfg`` with some options changed; model spec names (``size=64``) change its spec."""
    nested = _nest_spec(type(cfg), {"spec": cfg.spec, **changes} if any(
        k in SPEC_FIELDS for k in changes) else changes)
    return dataclasses.replace(cfg, **nested)  # type: ignore[type-var]
