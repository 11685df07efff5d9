"""One model spec, one registry per kind: model sources, saliency methods, and the spec's
round trip through options and TOML (issue 18, item 4)."""

from __future__ import annotations

import pytest
import torch
from helpers import ROOT

from fgcli.config import (
    METHOD_NAMES,
    Method,
    ModelSpec,
    RunConfig,
    from_options,
    read_config_file,
    replace,
)
from fgcli.errors import UsageError

WEIGHTS = ROOT / "examples" / "weights" / "squeezenet1_1_imagenet.pth"
TINYNET = str(ROOT / "examples" / "models" / "tinynet.py") + ":build"


def test_the_source_registry_refuses_a_duplicate_name():
    import fgcli.models.load  # noqa: F401 - registers the sources
    from fgcli.models.sources import register_source, source_names

    assert set(source_names()) == {"torchvision", "timm", "code", "pickle"}
    with pytest.raises(ValueError, match="already registered"):
        register_source("timm", claims=lambda spec: False)(lambda *a, **k: None)
    with pytest.raises(ValueError, match="fallback"):
        register_source("another")(lambda *a, **k: None)
    assert set(source_names()) == {"torchvision", "timm", "code", "pickle"}


def test_the_method_registry_refuses_a_duplicate_or_undeclared_name():
    from fgcli.engine import METHODS, FullGrad
    from fgcli.engine.saliency import register

    with pytest.raises(ValueError, match="already registered"):
        register("fullgrad")(FullGrad)
    with pytest.raises(ValueError, match="METHOD_NAMES"):
        register("brand-new")(FullGrad)
    assert list(METHODS) == list(METHOD_NAMES)


def test_every_method_builds_and_is_a_cli_choice():
    from typer.testing import CliRunner

    from fgcli.cli import app
    from fgcli.engine import METHODS, build

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3))
    shown = CliRunner().invoke(app, ["dump", "--help"], env={"COLUMNS": "200"}).output
    assert list(METHODS) == [m.value for m in Method]
    assert f"<{'|'.join(METHODS)}>" in shown  # the choices of --method
    x = torch.randn(2, 3, 16, 16)
    for name in METHODS:
        engine = build(name, model, psi="signed", samples=2, seed=0)
        assert type(engine) is METHODS[name] and engine.psi == "signed"
        assert engine.saliency(x).shape == (2, 1, 16, 16)
    smooth = build("smooth", model, samples=3, sigma=0.2, seed=7)
    assert (smooth.n_samples, smooth.sigma, smooth.seed) == (3, 0.2, 7)
    with pytest.raises(ValueError, match="unknown saliency method"):
        build("nope", model)


def test_a_toml_method_outside_the_registry_is_the_same_usage_error(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('method = "nope"\n')
    with pytest.raises(UsageError, match="config: method must be one of fullgrad, simple, "
                                         "smooth; got 'nope'"):
        read_config_file(toml)


def test_the_model_spec_round_trips_through_options_and_toml(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('model = "resnet18"\nweights = "none"\nsize = 64\ncrop = true\n'
                    'mean = [0.5, 0.5, 0.5]\nstd = "0.25,0.25,0.25"\nmax-pixels = 1000\n'
                    'trust-pickle = true\n[model-args]\ndepth = 4\n')
    cfg = from_options(RunConfig, {"inputs": ("x",), "labels": "names.txt"}, str(toml))
    want = ModelSpec("resnet18", "none", ("depth=4",), True, 64, True, (0.5, 0.5, 0.5),
                     (0.25, 0.25, 0.25), "names.txt", 1000)
    assert cfg.spec == want
    flat = from_options(RunConfig, {"inputs": ("x",), "model": "resnet18", "weights": "none",
                                    "model_args": ("depth=4",), "trust_pickle": True,
                                    "size": 64, "crop": True, "mean": (0.5, 0.5, 0.5),
                                    "std": (0.25, 0.25, 0.25), "labels": "names.txt",
                                    "max_pixels": 1000})
    assert flat == cfg and flat.settings_fingerprint("w") == cfg.settings_fingerprint("w")
    assert not hasattr(cfg, "model") and not hasattr(cfg, "max_pixels")  # one home: the spec
    assert replace(cfg, size=32).spec.size == 32 and replace(cfg, size=32).out == cfg.out
    with pytest.raises(UsageError, match="--size must be >= 8"):
        from_options(RunConfig, {"inputs": ("x",), "model": "m", "size": 4})
    with pytest.raises(UsageError, match="--std values must be > 0"):
        ModelSpec("m", std=(1.0, 0.0, 1.0))


def test_eval_shares_the_spec():
    from fgcli.evaluate.run import EvalConfig

    cfg = from_options(EvalConfig, {"inputs": ("a", "b"), "model": "resnet18", "size": 64,
                                    "methods": ("fullgrad",)})
    assert cfg.spec == ModelSpec("resnet18", size=64)
    with pytest.raises(UsageError, match="--model is required"):
        from_options(EvalConfig, {"inputs": ("a", "b"), "model": " "})


def test_load_gives_a_frozen_model_on_the_device_with_its_config():
    from fgcli.models.base import ModelConfig, model_info
    from fgcli.models.load import load

    loaded = load(ModelSpec("squeezenet1_1", str(WEIGHTS), size=64, crop=True), "cpu")
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())
    config = loaded.config
    assert isinstance(config, ModelConfig)
    assert (config.size, config.crop, config.resize, config.num_classes) == \
        ((64, 64), True, 73, 1000)
    assert config.source == "torchvision" and config.categories[0] == "tench"
    info = model_info(config)
    assert list(info) == ["source", "classes", "labels", "checkpoint", "preprocessing"]
    assert info["preprocessing"] == {"size": [64, 64], "crop": True, "resize": 73,
                                     "mean": [0.485, 0.456, 0.406],
                                     "std": [0.229, 0.224, 0.225],
                                     "interpolation": "bilinear"}
    tiny = load(ModelSpec(TINYNET, "random"), "cpu", smallest=True).config
    assert tiny.source == "code" and tiny.num_classes >= 1
