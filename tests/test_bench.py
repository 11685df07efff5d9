"""scripts/bench.py: its --models parsing, and the whole script on a tiny model (one
round, a 6- vs 12-image dump) writing both tables and its JSON."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module
    spec.loader.exec_module(module)
    return module


def test_models_list_and_batches(bench):
    assert bench.parse_models("resnet50,vgg16_bn,swin_t") == [
        ("resnet50", 16), ("vgg16_bn", 16), ("swin_t", 8)]  # the reference batches
    assert bench.parse_models("resnet50, timm:resnet18:4,timm:vit_tiny", 2) == [
        ("resnet50", 2), ("timm:resnet18", 4), ("timm:vit_tiny", 2)]
    assert [b for _, b in bench.parse_models(bench.DEFAULT_MODELS)] == [16, 16, 8, 8, 8, 8]
    with pytest.raises(ValueError, match="at least one"):
        bench.parse_models(" , ")
    with pytest.raises(ValueError, match=">= 1"):
        bench.parse_models("resnet50:0")
    args = bench.parse_args(["--dump-images", "6,12"])
    assert args.dump_images == (6, 12) and args.batch_size is None
    with pytest.raises(SystemExit):
        bench.parse_args(["--dump-images", "12,6"])


def test_whole_script_on_a_tiny_model(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench.main(["--models", "squeezenet1_1:2", "--size", "64", "--repeats", "1",
                         "--dump-model", "squeezenet1_1", "--dump-images", "6,12",
                         "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| model | batch | floor img/s | FullGrad img/s | engine/floor |" in printed
    assert "| squeezenet1_1 | 2 |" in printed
    assert "dump/dump-floor" in printed and "| squeezenet1_1 | 8 | map |" in printed
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    (row,) = result["engine"]
    assert row["floor_img_s"] > 0 and row["fullgrad_img_s"] > 0 and row["engine_floor"] > 0
    assert [d["save"] for d in result["dump"]] == ["default", "map"]
    default, only_map = result["dump"]
    for d in (default, only_map):
        # a 6- vs 12-image difference on a tiny model is within timing noise on a loaded
        # machine (CI once measured t12 < t6): the ratio's sign is not asserted
        assert d["dump_floor_img_s"] > 0 and d["io_floor_ms"] > 0
        assert math.isfinite(d["ratio"]) and d["t12"] > 0 and d["t6"] > 0
    # encoding a heatmap and an overlay costs more than one .npy
    assert default["io_floor_ms"] > only_map["io_floor_ms"]
