"""`fullgrad dump --psi / --layers`: the map is the engine's, resumes know the setting."""

from __future__ import annotations

import json

import numpy as np
import torch
from helpers import PHOTOS
from test_cli_dump import by_key, invoke

from fgcli.data.decode import decode, preprocess
from fgcli.engine import FullGrad


def _input(size: int = 64) -> torch.Tensor:
    rgb = decode(str(PHOTOS / "coffee.png"), 10**9)
    x, _ = preprocess(rgb, (size, size), False, size, (0.485, 0.456, 0.406),
                      (0.229, 0.224, 0.225))
    return x[None]


def test_psi_and_layers_reach_the_map_and_the_fingerprint(tmp_path, squeezenet):
    out = tmp_path / "out"
    plain = invoke([str(PHOTOS / "coffee.png"), "--out", str(out), "--save", "map"])
    assert plain.exit_code == 0
    default_map = np.load(out / "maps" / "coffee.png.npy")
    signed = invoke([str(PHOTOS / "coffee.png"), "--out", str(out), "--save", "map",
                     "--psi", "signed", "--layers", "features.1*,classifier.*"])
    assert signed.exit_code == 0
    rec = by_key(out)["coffee.png"]
    assert rec["status"] == "ok"  # recomputed: psi and layers are in the fingerprint
    got = np.load(out / "maps" / "coffee.png.npy")
    want = FullGrad(squeezenet, psi="signed", layers=["features.1*", "classifier.*"]
                    ).saliency(_input())[0, 0].numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert np.abs(got - default_map).max() > 0.1 * np.abs(default_map).max()
    assert got.min() < 0  # signed maps keep their sign
    run = json.loads((out / "run.json").read_text())
    assert run["psi"] == "signed" and run["layers"] == "features.1*,classifier.*"
    again = invoke([str(PHOTOS / "coffee.png"), "--out", str(out), "--save", "map",
                    "--psi", "signed", "--layers", "features.1*,classifier.*"])
    assert again.exit_code == 0 and by_key(out)["coffee.png"]["status"] == "skipped"


def test_default_psi_keeps_the_earlier_fingerprint(tmp_path):
    from fgcli.config import ModelSpec, RunConfig

    base = RunConfig(inputs=("x",), spec=ModelSpec("squeezenet1_1"))
    explicit = RunConfig(inputs=("x",), spec=ModelSpec("squeezenet1_1"), psi="abs-rescale")
    assert base.settings_fingerprint("w") == explicit.settings_fingerprint("w")
    other = RunConfig(inputs=("x",), spec=ModelSpec("squeezenet1_1"), psi="abs")
    assert other.settings_fingerprint("w") != base.settings_fingerprint("w")


def test_bad_psi_and_layers_are_usage_errors(tmp_path):
    bad = invoke([str(PHOTOS / "coffee.png"), "--out", str(tmp_path / "a"), "--psi", "log"])
    assert bad.exit_code == 2 and "--psi: unknown 'log'" in bad.stderr
    none = invoke([str(PHOTOS / "coffee.png"), "--out", str(tmp_path / "b"),
                   "--layers", "nothing.*"])
    assert none.exit_code == 2 and "--layers:" in none.stderr and "features.0" in none.stderr
    assert not (tmp_path / "b" / "manifest.jsonl").exists()
