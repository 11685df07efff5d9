"""Issue #17, item 3: NaN or infinite results are never ``ok``. A non-finite logit, map,
residual or probability fails that image (one line, no files), other images stay ok;
manifest lines and eval.json are strict JSON; non-finite ``--mean`` / ``--std`` are usage
errors; ``check`` names a NaN model's failure."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import cli, model_file, one_error_line, reject_constant, strict_lines
from PIL import Image

NAN_WEIGHTS = """
def build():
    model = Net()
    with torch.no_grad():
        model.conv.bias[0] = float("nan")
    return model
"""

# NaN (or +inf) logits for the white image only: content, not batch position, decides,
# so perturbed copies of the other images in eval stay finite
ON_WHITE = """
class OnWhite(Net):
    def forward(self, x):
        out = super().forward(x)
        white = x.flatten(1).amin(1) > 1.5
        return out + torch.where(white, float("{value}"), 0.0)[:, None]
def build():
    return OnWhite()
"""

# +inf logits for the odd images of each batch (a model whose output depends on position)
ODD_INF = """
class OddInf(Net):
    def forward(self, x):
        odd = torch.arange(x.shape[0], device=x.device) % 2 == 1
        return super().forward(x) + torch.where(odd, float("inf"), 0.0)[:, None]
def build():
    return OddInf()
"""


def dump(imgs: Path, out: Path, spec: str, *extra: str):
    return cli("dump", str(imgs), "-o", str(out), "--model", spec, "--workers", "0",
               "--save", "heatmap,map,decomp", *extra)


def files_of(out: Path) -> set[str]:
    return {p.name for sub in ("heatmaps", "maps", "decomp") if (out / sub).is_dir()
            for p in (out / sub).iterdir()}


def test_nan_weights_fail_every_image(imgs, tmp_path):
    out = tmp_path / "out"
    result = dump(imgs, out, model_file(tmp_path, NAN_WEIGHTS))
    assert result.exit_code == 1, result.output
    records = strict_lines(out / "manifest.jsonl")
    assert len(records) == 4
    for rec in records:
        assert rec["status"] == "failed" and rec["outputs"] == {}
        assert rec["error"] == "non-finite logit (nan) from the model"
    assert "fullgrad: failed:" in result.stderr and "non-finite logit (nan)" in result.stderr
    assert files_of(out) == set()
    run_json = json.loads((out / "run.json").read_text(), parse_constant=reject_constant)
    assert run_json["counts"] == {"ok": 0, "failed": 4, "skipped": 0}


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_for_one_image_only(value, imgs, tmp_path):
    out = tmp_path / "out"
    spec = model_file(tmp_path, ON_WHITE.format(value=value))
    result = dump(imgs, out, spec, "--weights", "random")  # seeded: a rerun resumes
    assert result.exit_code == 1, result.output
    records = {r["key"]: r for r in strict_lines(out / "manifest.jsonl")}
    assert records["white.png"]["status"] == "failed"
    assert records["white.png"]["error"] == f"non-finite logit ({value}) from the model"
    for key in ("a.png", "b.png", "c.png"):
        assert records[key]["status"] == "ok"
        assert all(math.isfinite(records[key][f]) for f in ("logit", "prob", "residual"))
    assert files_of(out) == {f"{k}.{ext}" for k in ("a.png", "b.png", "c.png")
                             for ext in ("png", "npy", "npz")}
    # the rerun recomputes the failed image only (and it fails again, alone)
    again = dump(imgs, out, spec, "--weights", "random")
    assert again.exit_code == 1
    lines = strict_lines(out / "manifest.jsonl")
    assert sorted(r["status"] for r in lines) == ["failed", "skipped", "skipped", "skipped"]


def test_inf_for_odd_batch_positions(imgs, tmp_path):
    out = tmp_path / "out"
    result = dump(imgs, out, model_file(tmp_path, ODD_INF), "-b", "4")
    assert result.exit_code == 1, result.output
    records = {r["key"]: r for r in strict_lines(out / "manifest.jsonl")}
    assert {k: r["status"] for k, r in records.items()} == {
        "a.png": "ok", "b.png": "failed", "c.png": "ok", "white.png": "failed"}
    assert records["b.png"]["error"] == "non-finite logit (inf) from the model"


def test_topk_gives_one_failed_line_per_image(imgs, tmp_path):
    out = tmp_path / "out"
    result = dump(imgs, out, model_file(tmp_path, ON_WHITE.format(value="nan")), "--topk", "2")
    assert result.exit_code == 1, result.output
    records = strict_lines(out / "manifest.jsonl")
    assert [r["key"] for r in records if r["status"] == "failed"] == ["white.png"]
    assert sorted((r["key"], r["rank"]) for r in records if r["status"] == "ok") == [
        (k, rank) for k in ("a.png", "b.png", "c.png") for rank in (1, 2)]


def _explanation(n: int = 3, **broken: int) -> SimpleNamespace:
    """A finite Explanation of n images; ``broken``: field -> image made NaN there."""
    exp = SimpleNamespace(logits=torch.randn(n, 4), target=torch.zeros(n, dtype=torch.long),
                          residual=torch.zeros(n, dtype=torch.float64),
                          maps=torch.rand(n, 1, 8, 8), compact=None)
    for name, j in broken.items():
        getattr(exp, name)[j].view(-1)[0] = float("nan")
    exp.logit = exp.logits[:, 0]
    return exp


@pytest.mark.parametrize("field, reason", [
    ("logits", "non-finite logit (nan) from the model"),
    ("residual", "non-finite completeness residual (nan)"),
    ("maps", "non-finite saliency map"),
])
def test_each_non_finite_result_names_its_reason(field, reason):
    from fgcli.dump.host import to_host as _to_host

    host = _to_host(_explanation(**{field: 1}))
    assert host["nonfinite"] == [None, reason, None]


def test_non_finite_decomposition_term():
    from fgcli.dump.host import to_host as _to_host
    from fgcli.engine import CompactDecomposition

    exp = _explanation()
    layers = {"conv": torch.zeros(3, 1, 8, 8)}
    layers["conv"][2, 0, 0, 0] = float("inf")
    exp.compact = CompactDecomposition(torch.zeros(3, 1, 8, 8), layers, {})
    assert _to_host(exp)["nonfinite"] == [None, None, "non-finite decomposition term"]


@pytest.mark.parametrize("command", ["dump", "eval"])
@pytest.mark.parametrize("option, value", [
    ("--std", "nan,1,1"), ("--std", "0,1,1"), ("--mean", "0,inf,0"), ("--mean", "nan,0,0")])
def test_non_finite_or_zero_normalisation_is_a_usage_error(command, option, value, imgs,
                                                           tmp_path):
    spec = model_file(tmp_path, "def build():\n    return Net()\n")
    line = one_error_line(cli(command, str(imgs), "-o", str(tmp_path / "out"), "--model", spec,
                              f"{option}={value}"))
    assert option in line
    assert not (tmp_path / "out").exists()


def test_non_finite_std_in_a_model_file(imgs, tmp_path):
    spec = model_file(tmp_path, "STD = (float('nan'), 1, 1)\ndef build():\n    return Net()\n")
    line = one_error_line(cli("dump", str(imgs), "-o", str(tmp_path / "out"), "--model", spec))
    assert "STD must be three finite numbers" in line


def test_eval_leaves_non_finite_images_out_and_writes_strict_json(imgs, tmp_path):
    out = tmp_path / "ev"
    result = cli("eval", str(imgs), "-o", str(out), "--model",
                 model_file(tmp_path, ON_WHITE.format(value="nan")), "--methods",
                 "fullgrad,random", "--metrics", "perturbation,deletion", "--ks", "50",
                 "--steps", "2", "-q")
    assert result.exit_code == 0, result.output
    assert "fullgrad: failed:" in result.stderr and "white.png" in result.stderr
    data = json.loads((out / "eval.json").read_text(), parse_constant=reject_constant)
    assert [Path(p).name for p in data["images"]] == ["a.png", "b.png", "c.png"]
    assert [(Path(f["input"]).name, f["error"]) for f in data["failed"]] == [
        ("white.png", "non-finite logit (nan) from the model")]
    for per in data["results"].values():
        for summary in per.values():
            assert summary["n"] == 3


def test_eval_nan_model_everywhere(imgs, tmp_path):
    """Every image left out: each gets its failed line, then the run stops (exit 2)."""
    result = cli("eval", str(imgs), "-o", str(tmp_path / "ev"), "--model",
                 model_file(tmp_path, NAN_WEIGHTS), "--methods", "random",
                 "--metrics", "perturbation", "--ks", "50", "-q")
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 5 and "Traceback" not in result.output
    assert all(line.endswith(": non-finite logit (nan) from the model") for line in lines[:4])
    assert lines[4].startswith("fullgrad: error: eval needs at least two") and "0 readable" in lines[4]


def test_eval_json_guard_writes_null_for_non_finite():
    from fgcli.tree.atomic import finite as strict

    data = {"a": [1.0, float("nan")], "b": {"c": float("-inf"), "d": 2}, "e": (float("inf"),)}
    text = json.dumps(strict(data), allow_nan=False)
    assert json.loads(text) == {"a": [1.0, None], "b": {"c": None, "d": 2}, "e": [None]}


def test_check_on_a_nan_model_fails_with_a_message(tmp_path):
    result = cli("check", "--model", model_file(tmp_path, NAN_WEIGHTS))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "fullgrad: failed: random(seed=1)#0: non-finite logit (nan) from the model" \
        in result.stderr


def test_white_png_is_white(imgs):
    """The fixture's premise: only white.png reaches the ON_WHITE threshold."""
    x = np.asarray(Image.open(imgs / "white.png"))
    assert x.min() == 255
    assert all(np.asarray(Image.open(imgs / f"{k}.png")).min() < 200 for k in "abc")
