"""Your own model (issue #10): checkpoints of any head size in every container, whole pickled
models, TorchScript, factories from files and modules, timm, and their errors."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import PHOTOS, ROOT, assert_complete, cli, randomise

from fgcli.config import parse_model_args
from fgcli.errors import SetupError, UsageError
from fgcli.models.sources import checkpoint as ckpt


def load_spec(model: str, weights: str = "DEFAULT", *, model_args: dict | None = None,
              **options):
    """``--model`` / ``--weights`` / other model options loaded as the commands load them
    (:func:`fgcli.models.load.load`), on the CPU."""
    from fgcli.config import ModelSpec, model_arg_pairs
    from fgcli.models.load import load

    return load(ModelSpec(model, weights, model_arg_pairs(model_args or {}), **options), "cpu")

PHOTO = str(PHOTOS / "coffee.png")


def invoke(args: list[str]):
    return cli(*args)


def fine_tuned(name: str, classes: int, **kwargs) -> torch.nn.Module:
    """A torchvision architecture with a ``classes``-way head and non-trivial weights."""
    torch.manual_seed(0)
    return randomise(torchvision.models.get_model(name, weights=None, num_classes=classes,
                                                  **kwargs))


@pytest.fixture(scope="module")
def resnet7() -> torch.nn.Module:
    return fine_tuned("resnet18", 7)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- containers and prefixes --------------------------------------------------------------

def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


CONTAINERS = {
    "plain": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 3},
    "model": lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
    "model_state_dict": lambda sd: {"model_state_dict": sd, "epoch": 1},
    "net": lambda sd: {"net": sd},
    "ema": lambda sd: {"ema": sd, "step": 10},
    "nested": lambda sd: {"checkpoint": {"weights": sd}, "meta": {"note": "x"}},
    "lightning": lambda sd: {"epoch": 4, "global_step": 100, "pytorch-lightning_version": "2.4",
                             "state_dict": {**_prefixed(sd, "model."),
                                            "criterion.weight": torch.ones(7)},
                             "optimizer_states": [{"state": {}, "param_groups": []}],
                             "lr_schedulers": [], "hyper_parameters": {"lr": 0.01}},
    "module.": lambda sd: _prefixed(sd, "module."),
    "_orig_mod.": lambda sd: _prefixed(sd, "_orig_mod."),
    "net.": lambda sd: {"state_dict": _prefixed(sd, "net.")},
    "module._orig_mod.": lambda sd: _prefixed(sd, "module._orig_mod."),
    "model._orig_mod.": lambda sd: {"state_dict": _prefixed(sd, "model._orig_mod.")},
}


@pytest.mark.parametrize("container", CONTAINERS)
def test_checkpoint_containers_and_prefixes(container, resnet7, tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save(CONTAINERS[container](resnet7.state_dict()), path)
    loaded = load_spec("resnet18", str(path), size=64)
    assert loaded.config.num_classes == 7 and loaded.config.source == "torchvision"
    assert same_weights(loaded.model, resnet7)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), resnet7.eval()(x), atol=1e-5)
    info = loaded.config.checkpoint
    assert info["kind"] == "state_dict" and info["file"] == str(path)
    expected_prefix = {"lightning": "model.", "net.": "net."}.get(
        container, container if container.endswith(".") else "")
    assert info["prefix"] == expected_prefix


def test_safetensors_with_a_compile_prefix(resnet7, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in resnet7.state_dict().items()}, path)
    loaded = load_spec("resnet18", str(path))
    assert loaded.config.num_classes == 7 and same_weights(loaded.model, resnet7)
    assert loaded.config.checkpoint["kind"] == "safetensors"
    assert loaded.config.checkpoint["prefix"] == "_orig_mod."


def test_the_prefix_is_found_not_guessed(resnet7, tmp_path):
    """An unusual prefix no list would name, beside other modules' keys."""
    state = {**_prefixed(resnet7.state_dict(), "teacher_student.student.backbone."),
             "teacher_student.loss.weight": torch.ones(3)}
    torch.save({"my_weights": state}, tmp_path / "w.pt")
    loaded = load_spec("resnet18", str(tmp_path / "w.pt"))
    assert loaded.config.checkpoint["prefix"] == "teacher_student.student.backbone."
    assert loaded.config.checkpoint["entry"] == "my_weights"
    assert same_weights(loaded.model, resnet7)


def test_ema_is_taken_only_when_nothing_else_fits(resnet7, tmp_path):
    other = fine_tuned("resnet18", 7)
    with torch.no_grad():
        other.fc.bias.add_(1.0)
    torch.save({"state_dict_ema": other.state_dict(), "state_dict": resnet7.state_dict()},
               tmp_path / "train.pth")
    loaded = load_spec("resnet18", str(tmp_path / "train.pth"))
    assert loaded.config.checkpoint["entry"] == "state_dict" and same_weights(loaded.model, resnet7)


def test_best_prefix_counts_keys():
    keys = ["a.b.conv.weight", "a.b.fc.weight", "x.conv.weight"]
    assert ckpt.best_prefix(keys, {"conv.weight", "fc.weight"}) == ("a.b.", 2)
    assert ckpt.best_prefix(["conv.weight"], {"conv.weight"}) == ("", 1)
    assert ckpt.best_prefix(["q"], {"conv.weight"}) == ("", 0)


def test_keys_that_still_do_not_fit_name_the_first_missing_and_unexpected(resnet7, tmp_path):
    state = dict(resnet7.state_dict())
    state.pop("layer1.0.conv1.weight")
    state["layer9.extra.weight"] = torch.ones(1)
    torch.save({"state_dict": _prefixed(state, "model.")}, tmp_path / "bad.ckpt")
    with pytest.raises(SetupError) as info:
        load_spec("resnet18", str(tmp_path / "bad.ckpt"))
    message = str(info.value)
    assert "does not fit resnet18" in message and "\n" not in message
    assert "missing 'layer1.0.conv1.weight'" in message
    assert "unexpected 'layer9.extra.weight'" in message


def test_a_shape_mismatch_is_named(tmp_path):
    model = torchvision.models.resnet18(num_classes=7)
    state = model.state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    torch.save(state, tmp_path / "w.pth")
    result = invoke(["dump", PHOTO, "-m", "resnet18", "--weights", str(tmp_path / "w.pth"),
                     "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "'layer1.0.conv1.weight' has shape (64, 64, 5, 5) in the file" in result.stderr


# -- head sizes on several families ---------------------------------------------------------

def _roundtrip(name: str, classes: int, tmp_path: Path, size: int, **kwargs) -> None:
    model = fine_tuned(name, classes, **kwargs)
    path = tmp_path / f"{name}.pth"
    torch.save({"model": model.state_dict()}, path)
    loaded = load_spec(name, str(path), size=size)
    assert loaded.config.num_classes == classes, name
    assert same_weights(loaded.model, model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = loaded.model(x)
        out = out[0] if isinstance(out, tuple) else out
    assert out.shape == (2, classes)


@pytest.mark.parametrize("name,classes,size", [
    ("squeezenet1_1", 3, 64),  # a conv head
    ("mobilenet_v3_small", 12, 64),  # classifier.3
    ("efficientnet_b0", 5, 64),
    ("googlenet", 4, 64),  # fc + the two auxiliary heads
])
def test_head_size_from_the_checkpoint(name, classes, size, tmp_path):
    kwargs = {"init_weights": False} if name == "googlenet" else {}
    _roundtrip(name, classes, tmp_path, size, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("name,classes,size", [
    ("inception_v3", 6, 75), ("vit_b_32", 10, 224), ("swin_t", 9, 224), ("maxvit_t", 2, 224),
    ("convnext_tiny", 11, 64), ("densenet121", 8, 64), ("regnet_y_400mf", 20, 64),
    ("vgg11_bn", 3, 32), ("shufflenet_v2_x0_5", 7, 64),
])
def test_head_size_from_the_checkpoint_more_families(name, classes, size, tmp_path):
    kwargs = {"init_weights": False} if name == "inception_v3" else {}
    _roundtrip(name, classes, tmp_path, size, **kwargs)


def test_auxiliary_heads_dropped_in_fine_tuning(tmp_path):
    model = fine_tuned("googlenet", 4, aux_logits=False, init_weights=False)
    torch.save(model.state_dict(), tmp_path / "g.pth")
    loaded = load_spec("googlenet", str(tmp_path / "g.pth"), size=64)
    assert loaded.config.num_classes == 4 and not loaded.model.aux_logits
    assert same_weights(loaded.model, model)


# -- labels, run.json, the acceptance command -----------------------------------------------

def test_lightning_checkpoint_with_labels_dump(resnet7, tmp_path):
    """The acceptance: a 7-class Lightning-style checkpoint and its labels."""
    torch.save(CONTAINERS["lightning"](resnet7.state_dict()), tmp_path / "ckpt.ckpt")
    labels = [f"defect-{i}" for i in range(7)]
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n")
    out = tmp_path / "out"
    result = invoke(["dump", str(PHOTOS), "-m", "resnet18", "--weights",
                     str(tmp_path / "ckpt.ckpt"), "--labels", str(tmp_path / "labels.txt"),
                     "--size", "64", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 6 and {r["status"] for r in records} == {"ok"}
    assert all(r["target_name"] == labels[r["target"]] for r in records)
    assert all(abs(r["residual"]) <= 1e-4 * max(1, abs(r["logit"])) for r in records)
    run = json.loads((out / "run.json").read_text())
    assert run["classes"] == 7 and run["labels"] == f"--labels {tmp_path / 'labels.txt'}"
    assert run["checkpoint"]["prefix"] == "model." and run["checkpoint"]["entry"] == "state_dict"
    assert run["source"] == "torchvision"


def test_labels_count_mismatch(resnet7, tmp_path):
    torch.save(resnet7.state_dict(), tmp_path / "w.pth")
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    result = invoke(["dump", PHOTO, "-m", "resnet18", "--weights", str(tmp_path / "w.pth"),
                     "--labels", str(tmp_path / "labels.txt"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "3 class names for a model with 7 classes" in result.stderr
    assert not (tmp_path / "o" / "manifest.jsonl").exists()


def test_torchvision_weights_metadata_names_the_labels(tmp_path):
    weights = ROOT / "examples" / "weights" / "squeezenet1_1_imagenet.pth"
    loaded = load_spec("squeezenet1_1", str(weights))
    assert loaded.config.categories[967] == "espresso"
    assert loaded.config.labels_from.startswith("torchvision weights metadata")


# -- whole pickled models and TorchScript ----------------------------------------------------

def test_whole_pickled_model_is_refused_then_allowed(resnet7, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(resnet7, path)
    refused = invoke(["dump", PHOTO, "-m", "resnet18", "--weights", str(path),
                      "-o", str(tmp_path / "o")])
    assert refused.exit_code == 2
    line = refused.stderr.strip()
    assert "\n" not in line and "--trust-pickle" in line
    assert "unpickling it would run code" in line and "torchvision.models.resnet.ResNet" in line
    allowed = load_spec("resnet18", str(path), trust_pickle=True, size=64)
    assert allowed.config.num_classes == 7 and same_weights(allowed.model, resnet7)
    assert allowed.config.checkpoint["kind"] == "pickled module"
    # the model file itself, as --model
    assert invoke(["dump", PHOTO, "-m", str(path), "--size", "64",
                   "-o", str(tmp_path / "o")]).exit_code == 2
    out = tmp_path / "o2"
    result = invoke(["dump", PHOTO, "-m", str(path), "--trust-pickle", "--size", "64",
                     "-o", str(out), "-q"])
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "run.json").read_text())["source"] == "pickle"


def test_foreign_objects_beside_the_weights_are_skipped_not_run(resnet7, tmp_path):
    """timm's train checkpoints keep their argparse.Namespace; an object whose unpickling
    would call a function of the file's choice must not call it, and the weights still
    load without --trust-pickle."""
    import argparse

    torch.save({"state_dict": resnet7.state_dict(), "epoch": 9,
                "args": argparse.Namespace(model="resnet18", lr=0.1),
                "trap": _Trap()}, tmp_path / "train.pth.tar")
    _TRAPPED.clear()
    torch.load(tmp_path / "train.pth.tar", weights_only=False)  # a plain load springs it
    assert _TRAPPED == [1]
    _TRAPPED.clear()
    loaded = load_spec("resnet18", str(tmp_path / "train.pth.tar"))
    assert same_weights(loaded.model, resnet7) and _TRAPPED == []
    assert loaded.config.checkpoint["kind"] == "state_dict (other objects skipped)"


_TRAPPED: list[int] = []


def _spring(value: int) -> int:
    _TRAPPED.append(value)
    return value


class _Trap:
    """Unpickles by calling ``_spring``: a stand-in for code a file could make run."""

    def __reduce__(self):
        return (_spring, (1,))


def test_a_refused_file_cannot_change_classes_in_this_process(tmp_path):
    """BUILD on an allowed class (here collections.Counter) must not patch the class."""
    import collections
    import zipfile

    body = (b"\x80\x02ccollections\nCounter\nN}X\x0b\x00\x00\x00most_common"
            b"cposix\nsystem\ns\x86b.")
    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
        z.writestr("evil/data.pkl", body)
        z.writestr("evil/byteorder", "little")
        z.writestr("evil/version", "3\n")
    before = collections.Counter.most_common
    with pytest.raises(SetupError):
        load_spec("resnet18", str(tmp_path / "evil.pt"))
    assert collections.Counter.most_common is before


def test_an_ema_copy_beside_the_model_is_not_taken(resnet7, tmp_path):
    other = fine_tuned("resnet18", 7)
    state = {**_prefixed(other.state_dict(), "ema."), **_prefixed(resnet7.state_dict(), "model.")}
    torch.save({"state_dict": state}, tmp_path / "flat_ema.ckpt")
    loaded = load_spec("resnet18", str(tmp_path / "flat_ema.ckpt"))
    assert loaded.config.checkpoint["prefix"] == "model." and same_weights(loaded.model, resnet7)


def test_state_dict_given_as_model_says_what_to_do(resnet7, tmp_path):
    torch.save(resnet7.state_dict(), tmp_path / "sd.pth")
    result = invoke(["dump", PHOTO, "-m", str(tmp_path / "sd.pth"), "--size", "64",
                     "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "holds a state_dict, not a model" in result.stderr


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_is_explained(tmp_path):
    scripted = torch.jit.script(torchvision.models.resnet18(num_classes=3))
    scripted.save(str(tmp_path / "ts.pt"))
    for args in (["-m", "resnet18", "--weights", str(tmp_path / "ts.pt")],
                 ["-m", str(tmp_path / "ts.pt"), "--trust-pickle", "--size", "64"]):
        result = invoke(["dump", PHOTO, *args, "-o", str(tmp_path / "o")])
        assert result.exit_code == 2
        assert "TorchScript archive" in result.stderr and "eager model" in result.stderr


def test_unreadable_checkpoint(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    result = invoke(["dump", PHOTO, "-m", "resnet18", "--weights", str(tmp_path / "junk.pth"),
                     "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "not a readable checkpoint" in result.stderr


# -- your code -----------------------------------------------------------------------------

MYNET = textwrap.dedent('''
    import torch
    from torch import nn

    INPUT_SIZE = 48
    CLASSES = ["cat", "dog", "fox"]

    class Net(nn.Module):
        def __init__(self, width=8, output="tensor"):
            super().__init__()
            self.output = output
            self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width),
                                      nn.GELU(), nn.Conv2d(width, width, 3, padding=1),
                                      nn.SiLU())
            self.head = nn.Linear(width, 3)

        def forward(self, x):
            logits = self.head(self.body(x).mean((2, 3)))
            if self.output == "tuple":
                return logits, x.mean()
            if self.output == "dict":
                return {"logits": logits, "features": x}
            if self.output == "hf":
                return type("Out", (), {"logits": logits})()
            if self.output == "multi":
                return {"a": logits, "b": logits}
            if self.output == "map":
                return self.body(x)
            return logits

    def build(width=8, output="tensor"):
        return Net(width, output)

    def broken():
        raise RuntimeError("cannot build: missing config")

    def not_a_model():
        return {"weights": 1}

    NOT_CALLABLE = 3
''')


@pytest.fixture()
def mynet(tmp_path, monkeypatch):
    path = tmp_path / "mynet.py"
    path.write_text(MYNET)
    monkeypatch.chdir(tmp_path)
    return path


@pytest.mark.parametrize("output", ["tensor", "tuple", "dict", "hf"])
def test_factory_from_a_file(mynet, output):
    loaded = load_spec("./mynet.py:build", "random",
                        model_args=parse_model_args((f'output="{output}"', "width=6")))
    assert loaded.config.source == "code" and loaded.config.num_classes == 3
    assert loaded.config.size == (48, 48) and loaded.config.categories == ("cat", "dog", "fox")
    assert loaded.model.body[0].out_channels == 6
    from fgcli import FullGrad

    exp = FullGrad(loaded.model).explain(torch.randn(2, 3, 48, 48))
    assert exp.maps.shape == (2, 1, 48, 48)
    assert_complete(exp.logit, exp.residual)


def test_factory_from_a_module(tmp_path, monkeypatch):
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(MYNET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        loaded = load_spec("mypkg.nets:build", "none", size=32)
        assert loaded.config.num_classes == 3 and loaded.config.size == (32, 32)
        assert loaded.config.identity.startswith("module:mypkg.nets:build")
    finally:
        for name in ("mypkg", "mypkg.nets"):
            sys.modules.pop(name, None)


def test_user_model_dump_acceptance(mynet, tmp_path):
    """`fullgrad dump ... -m ./mynet.py:build --size 64 --mean ... --std ...`"""
    out = tmp_path / "out"
    result = invoke(["dump", str(PHOTOS), "-m", "./mynet.py:build", "--model-arg", "width=12",
                     "--size", "64", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5",
                     "-o", str(out), "-q"])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 6 and {r["target_name"] for r in records} <= {"cat", "dog", "fox"}
    run = json.loads((out / "run.json").read_text())
    assert run["source"] == "code" and run["model_args"] == {"width": 12}
    assert run["preprocessing"]["size"] == [64, 64] and run["preprocessing"]["mean"] == [0.5] * 3
    assert run["labels"].endswith("CLASSES")
    # another --model-arg value is another model: nothing is skipped as already done
    again = invoke(["dump", str(PHOTOS), "-m", "./mynet.py:build", "--model-arg", "width=10",
                    "--size", "64", "-o", str(out), "--json", "-q"])
    assert again.exit_code == 0
    assert {json.loads(line)["status"] for line in again.stdout.splitlines()} == {"ok"}


@pytest.mark.parametrize("spec,args,message", [
    ("./nope.py:build", [], "nope.py: no such file"),
    ("no_such_package.nets:build", ["--size", "32"], "no module named 'no_such_package'"),
    ("./mynet.py:missing", [], "has no 'missing'"),
    ("./mynet.py:NOT_CALLABLE", [], "is a int, not a function"),
    ("./mynet.py:broken", [], "the factory raised RuntimeError: cannot build: missing config"),
    ("./mynet.py:not_a_model", [], "returned a dict, not a torch.nn.Module"),
    ("./mynet.py:build", ["--model-arg", 'output="map"'],
     "returned a tensor of shape (2, 8, 48, 48) for a batch of 2; expected (N, classes)"),
    ("./mynet.py:build", ["--model-arg", 'output="multi"'], "a dict with keys 'a', 'b'"),
    ("./mynet.py:build", ["--model-arg", "depth=3"], "--model-arg"),
    ("./mynet.py:build", ["--model-arg", "=3"], "expected key=value"),
    ("./mynet.py", [], "expected path/to/file.py:factory"),
])
def test_user_model_errors_are_one_line(mynet, tmp_path, spec, args, message):
    result = invoke(["dump", PHOTO, "-m", spec, *args, "-o", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and message in line, line
    assert not (tmp_path / "o" / "manifest.jsonl").exists()


def test_no_input_size_names_both_ways(tmp_path, monkeypatch):
    (tmp_path / "plain.py").write_text(MYNET.replace("INPUT_SIZE = 48", ""))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="give --size N, or define INPUT_SIZE"):
        load_spec("./plain.py:build", "none")


def test_weights_file_for_a_factory_model(mynet, tmp_path):
    sys.path.insert(0, str(tmp_path))
    try:
        import mynet as module  # noqa: PLC0415 - the user's file

        trained = randomise(module.build(width=8))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mynet", None)
    torch.save({"state_dict": _prefixed(trained.state_dict(), "net.")}, tmp_path / "w.ckpt")
    loaded = load_spec("./mynet.py:build", str(tmp_path / "w.ckpt"))
    assert same_weights(loaded.model, trained) and loaded.config.checkpoint["prefix"] == "net."


def test_model_args_parse_as_toml_literals():
    args = parse_model_args(("depth=4", "drop=0.1", "flag=false", "dims=[64, 128]",
                             'name="a b"', "act=gelu"))
    assert args == {"depth": 4, "drop": 0.1, "flag": False, "dims": [64, 128], "name": "a b",
                    "act": "gelu"}
    with pytest.raises(UsageError, match="given twice"):
        parse_model_args(("a=1", "a=2"))


def test_model_args_from_a_config_file(mynet, tmp_path):
    (tmp_path / "run.toml").write_text('model = "./mynet.py:build"\nsize = 32\n'
                                       '[model-args]\nwidth = 5\noutput = "tuple"\n')
    out = tmp_path / "o"
    result = invoke(["dump", PHOTO, "--config", str(tmp_path / "run.toml"), "-o", str(out),
                     "-q"])
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "run.json").read_text())["model_args"] == {"width": 5,
                                                                       "output": "tuple"}


# -- timm -----------------------------------------------------------------------------------

timm = pytest.importorskip("timm")


def test_timm_model_preprocessing_and_names():
    loaded = load_spec("timm/resnet18", "random", size=64)
    assert loaded.config.source == "timm" and loaded.config.num_classes == 1000
    proc = loaded.config
    assert proc.interpolation == "bicubic" and proc.size == (64, 64)
    assert proc.resize == round(64 / 0.95)  # timm's crop_pct for resnet18.a1_in1k
    assert loaded.config.categories[1].startswith("goldfish")
    vit = load_spec("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", "none")
    assert vit.config.mean == (0.5, 0.5, 0.5) and vit.config.size == (224, 224)


def test_timm_fixed_size_model_is_built_at_the_requested_size():
    loaded = load_spec("timm/vit_tiny_patch16_224", "random", size=96)
    assert loaded.config.size == (96, 96)
    with torch.no_grad():
        assert loaded.model(torch.randn(1, 3, 96, 96)).shape == (1, 1000)


def test_timm_checkpoint_with_another_head(tmp_path):
    torch.manual_seed(0)
    model = randomise(timm.create_model("resnet18", num_classes=5))
    torch.save({"epoch": 2, "arch": "resnet18", "state_dict": model.state_dict(),
                "state_dict_ema": model.state_dict()}, tmp_path / "train.pth.tar")
    loaded = load_spec("timm/resnet18", str(tmp_path / "train.pth.tar"), size=64)
    assert loaded.config.num_classes == 5 and loaded.config.categories is None
    assert same_weights(loaded.model, model) and loaded.config.checkpoint["entry"] == "state_dict"


def test_timm_default_weights_from_the_cache_offline(tmp_path, monkeypatch):
    """--weights DEFAULT finds timm's pretrained weights in the Hugging Face cache without
    any request (the hub is made unreachable)."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    from fgcli.models.sources import timm_source

    torch.manual_seed(0)
    model = randomise(timm.create_model("resnet18"))
    repo = tmp_path / "hub" / "models--timm--resnet18.a1_in1k"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              snapshot / "model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(timm_source, "_hub_reachable", lambda timeout=5.0: False)
    loaded = load_spec("timm/resnet18", "DEFAULT", size=64)
    assert same_weights(loaded.model, model)
    assert loaded.config.weights == "timm pretrained resnet18.a1_in1k"
    # not cached, hub unreachable: one line, exit 2
    result = invoke(["dump", PHOTO, "-m", "timm/resnet34", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "--weights PATH" in result.stderr and "--weights none" in result.stderr
    assert result.stderr.count("\n") == 1


def test_timm_unknown_names():
    result = invoke(["dump", PHOTO, "-m", "timm/resnet1", "--weights", "none"])
    assert result.exit_code == 2 and "did you mean timm/resnet18" in result.stderr
    result = invoke(["dump", PHOTO, "-m", "timm/resnet18.no_such_tag", "--weights", "none"])
    assert result.exit_code == 2 and "a1_in1k" in result.stderr


def test_models_lists_timm():
    result = invoke(["models", "timm/*swin*"])
    assert result.exit_code == 0
    names = [line.split("\t")[0] for line in result.stdout.splitlines()]
    assert "timm/swin_tiny_patch4_window7_224" in names and all("swin" in n for n in names)
    tagged = invoke(["models", "timm/convnext_tiny.*"]).stdout.splitlines()
    assert any(line.startswith("timm/convnext_tiny.fb_in1k\t224") for line in tagged)


def test_check_on_a_timm_model_and_a_table():
    result = invoke(["check", "--model", "timm/resnet18", "--weights", "random", "--size", "64"])
    assert result.exit_code == 0, result.output
    assert result.output.count(" yes") == 2 and "batch 2" in result.output
    table = invoke(["check", "-m", "timm/resnet18", "-m", "resnet18", "--weights", "random",
                    "--size", "32"])
    assert table.exit_code == 0, table.output
    rows = [line for line in table.stdout.splitlines() if " yes " in line]
    assert [r.split()[0] for r in rows] == ["timm/resnet18", "resnet18"]


def test_a_timm_name_without_the_prefix_gets_a_hint():
    result = invoke(["dump", PHOTO, "-m", "convnext_tiny.fb_in1k"])
    assert result.exit_code == 2
    assert "did you mean timm/convnext_tiny.fb_in1k?" in result.stderr


def test_check_reports_why_layers_are_out_of_the_map():
    result = invoke(["check", "-m", "timm/levit_128s", "--weights", "random"])
    assert result.exit_code == 0, result.output
    assert "not in the map, completeness only (4): vector 4" in result.stdout
    assert "vector ((N, K) heads and pooled features: no grid): " in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("random(")]
    assert len(rows) == 2 and all(row[-1] == "yes" for row in rows)
    assert all(abs(float(row[-2])) < 1e-3 for row in rows)  # each image alone, exact too


def test_check_fails_when_an_image_alone_is_not_exact(monkeypatch):
    """A batch-dependent error (one image alone decomposes wrongly) fails the check."""
    import dataclasses

    from fgcli.engine import saliency

    real = saliency.FullGrad.decompose

    def off_when_alone(self, x, target=None):
        dec = real(self, x, target)
        return dataclasses.replace(dec, residual=dec.residual + 1.0) if len(x) == 1 else dec

    monkeypatch.setattr(saliency.FullGrad, "decompose", off_when_alone)
    result = invoke(["check", "-m", "resnet18", "--weights", "random", "--size", "32"])
    assert result.exit_code == 1 and result.stdout.count(" NO") == 2


def test_factory_imports_its_neighbours_lazily(tmp_path, monkeypatch):
    (tmp_path / "lazy.py").write_text("INPUT_SIZE = 32\n\ndef build(n):\n"
                                      "    from lazy_helpers import make\n    return make(n)\n")
    (tmp_path / "lazy_helpers.py").write_text(
        "from torch import nn\n\ndef make(n):\n    return nn.Sequential(nn.Conv2d(3, 4, 3), "
        "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, n))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        missing = invoke(["check", "-m", "lazy.py:build", "--weights", "random"])
        assert missing.exit_code == 2
        assert "missing a required argument: 'n'" in missing.stderr
        assert "--model-arg NAME=VALUE" in missing.stderr
        loaded = load_spec("lazy.py:build", "random", model_args={"n": 5})
        assert loaded.config.num_classes == 5
    finally:
        sys.modules.pop("lazy_helpers", None)


def test_module_classes_of_the_wrong_length_are_named(tmp_path, monkeypatch):
    (tmp_path / "four.py").write_text(MYNET.replace('CLASSES = ["cat", "dog", "fox"]',
                                                    'CLASSES = ["a", "b", "c", "d"]'))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"four.py CLASSES: 4 class names for a model with 3"):
        load_spec("./four.py:build", "random")


def test_weights_a_factory_loads_itself_are_part_of_the_fingerprint(tmp_path, monkeypatch):
    """Same factory file, other weights behind it: the next run recomputes, never skips."""
    (tmp_path / "own.py").write_text(textwrap.dedent('''
        import torch
        from pathlib import Path
        from torch import nn
        INPUT_SIZE = 32

        def build():
            net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                nn.Linear(4, 2))
            net.load_state_dict(torch.load(Path(__file__).with_name("w.pth")))
            return net
    '''))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"

    def run(seed: int) -> set[str]:
        torch.manual_seed(seed)
        net = randomise(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3),
                                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                            torch.nn.Linear(4, 2)), seed)
        torch.save(net.state_dict(), tmp_path / "w.pth")
        result = invoke(["dump", PHOTO, "-m", "own.py:build", "-o", str(out), "--json", "-q"])
        assert result.exit_code == 0, result.stderr
        return {json.loads(line)["status"] for line in result.stdout.splitlines()}

    assert run(0) == {"ok"}
    assert run(0) == {"skipped"}  # the same weights: resumed
    assert run(1) == {"ok"}  # other weights, same file: recomputed


def test_source_of_each_model_form():
    import fgcli.models.load  # noqa: F401 - registers the sources
    from fgcli.models.sources import get_source

    def source_of(spec: str) -> str:
        return get_source(spec).name

    assert source_of("resnet50") == "torchvision"
    assert source_of("timm/convnext_tiny.fb_in1k") == "timm"
    assert source_of("nets/mine.py:build") == "code" and source_of("pkg.mod:make") == "code"
    assert source_of(r"C:\models\net.py:build") == "code"
    assert source_of(r"C:\models\whole.pt") == "pickle" and source_of("m.safetensors") == "pickle"
    assert source_of("./mynet.py") == "code"  # and then asks for the factory


def test_a_weights_name_is_not_taken_for_a_file_of_that_name(tmp_path, monkeypatch):
    from fgcli.models.sources.tvision import looks_like_file

    monkeypatch.chdir(tmp_path)
    (tmp_path / "DEFAULT").write_text("not weights")
    assert not looks_like_file("DEFAULT") and not looks_like_file("ResNet18_Weights.IMAGENET1K_V1")
    assert looks_like_file("w.pth") and looks_like_file("runs/best")


def test_timm_errors_before_any_image(tmp_path):
    no_weights = invoke(["dump", PHOTO, "-m", "timm/cspresnet50d", "-o", str(tmp_path / "o")])
    assert no_weights.exit_code == 2 and "timm has no pretrained weights" in no_weights.stderr
    bad_size = invoke(["check", "-m", "timm/efficientformer_l1", "--weights", "random",
                       "--size", "192"])
    assert bad_size.exit_code == 2
    assert "the model fails on a (2, 3, 192, 192) batch" in bad_size.stderr
