"""scripts/gpu_check.py on the CPU: its refusal without CUDA, its tables and JSON, how a
failing or slow section is recorded, the synthetic photos (the GPU numbers need a GPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT
from PIL import Image

SCRIPT = ROOT / "scripts" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up
_spec.loader.exec_module(gpu_check)


def env() -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_WAIT_POLICY": "PASSIVE",
            "PYTHONPATH": str(ROOT / "src")}


def test_without_cuda_one_line_and_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], env=env(), check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == ("gpu_check: no CUDA device (torch.cuda.is_available() is False); "
                           "run it on a GPU machine\n")
    assert proc.stdout == ""
    assert not out.exists()


RESULTS = {
    "meta": {"command": ["scripts/gpu_check.py", "--out", "o"], "device": "cuda",
             "gpu": "NVIDIA H200", "cpu_count": 16, "torch": "2.11.0"},
    "sections": {
        "maps": {"status": "ok", "rows": [
            {"model": "resnet50", "weights": "random", "tf32": "on", "images": 6,
             "max_rel_diff": 0.000123}]},
        "engine": {"status": "partial", "reason": "OutOfTime: time cap reached before vit_b_16",
                   "rows": [{"model": "resnet50", "batch": 32, "floor_img_s": 1234.56,
                             "engine_img_s": 1000.0, "engine_floor": 0.81,
                             "floor_peak_mb": 2048.4, "engine_peak_mb": None}],
                   "notes": ["vgg16_bn: RuntimeError: boom"]},
        "torchrun": {"status": "skipped", "reason": "OutOfTime: torchrun still running",
                     "rows": [], "notes": []},
    },
}

EXPECTED = """\
## gpu_check: NVIDIA H200, 16 CPU cores, torch 2.11.0

`scripts/gpu_check.py --out o`

### GPU vs CPU maps (examples/photos)

| model | weights | cuDNN TF32 | images | max abs(GPU − CPU) / max abs(CPU) |
|---|---|---|---|---|
| resnet50 | random | on | 6 | 1.2e-04 |

### Engine / floor (random weights)

partial: OutOfTime: time cap reached before vit_b_16

| model | batch | floor img/s | engine img/s | engine / floor | peak MB floor | peak MB engine |
|---|---|---|---|---|---|---|
| resnet50 | 32 | 1234.6 | 1000.0 | 0.81 | 2048 | – |

- vgg16_bn: RuntimeError: boom

### torchrun --nproc-per-node 1

skipped: OutOfTime: torchrun still running
"""


def test_markdown_tables_exact() -> None:
    assert gpu_check.markdown(RESULTS) == EXPECTED


def test_write_results_json_and_markdown(tmp_path: Path) -> None:
    gpu_check.write_results(RESULTS, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text()) == RESULTS
    assert (tmp_path / "out" / "gpu_check.md").read_text() == EXPECTED
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.json",
                                                                      "gpu_check.md"]


def plan(tmp_path: Path, *argv: str) -> object:
    return gpu_check.make_plan(gpu_check.parse(["--out", str(tmp_path), *argv]))


def test_plan_sizes(tmp_path: Path) -> None:
    full, quick = plan(tmp_path), plan(tmp_path, "--quick")
    assert (full.models, full.batches, full.images, full.torchrun_images, full.repeats) == (
        gpu_check.ENGINE_MODELS, (32, 64), 2000, 256, 5)
    assert (quick.images, quick.torchrun_images, quick.repeats) == (200, 64, 3)
    assert full.cuda and not plan(tmp_path, "--device", "cpu").cuda
    assert full.budget == 420 and sum(gpu_check.CAPS.values()) < 480  # 8 minutes


def test_failing_and_partial_sections_are_recorded_and_written(tmp_path: Path) -> None:
    p = plan(tmp_path, "--device", "cpu")
    results = {"meta": RESULTS["meta"], "sections": {}}

    def fails(plan: object, section: object) -> None:
        raise RuntimeError("no nccl here\nsecond line")

    def half(plan: object, section: object) -> None:
        section.rows.append({"model": "m", "batch": 2})
        raise ValueError("model two broke")

    gpu_check.run_section(results, p, "torchrun", fails, time.monotonic() + 60)
    gpu_check.run_section(results, p, "engine", half, time.monotonic() + 60)
    gpu_check.run_section(results, p, "maps", half, time.monotonic() - 1)  # budget spent
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert sections["torchrun"]["status"] == "skipped"
    assert sections["torchrun"]["reason"] == "RuntimeError: no nccl here"
    assert sections["engine"]["status"] == "partial"
    assert sections["engine"]["rows"] == [{"model": "m", "batch": 2}]
    assert sections["maps"] == {"status": "skipped", "reason": "OutOfTime: time cap reached "
                                "before maps", "seconds": 0.0, "rows": [], "notes": []}
    assert "skipped: RuntimeError: no nccl here" in (tmp_path / "gpu_check.md").read_text()


def test_synthetic_photos(tmp_path: Path) -> None:
    folder = gpu_check.write_photos(tmp_path / "photos", 9)
    names = sorted(p.name for p in folder.iterdir())
    assert names == [gpu_check.photo_name(i) for i in range(9)]
    for i, name in enumerate(names):
        with Image.open(folder / name) as img:
            assert img.format == ("PNG" if i == 7 else "JPEG")
            assert img.size == gpu_check.PHOTO_SIZES[i % len(gpu_check.PHOTO_SIZES)]
    before = (folder / names[0]).stat().st_mtime_ns
    gpu_check.write_photos(folder, 9)  # kept, not rewritten
    assert (folder / names[0]).stat().st_mtime_ns == before


def test_run_counts_sum_shards(tmp_path: Path) -> None:
    assert gpu_check.run_counts(tmp_path) == (None, None)
    for i, (ok, secs) in enumerate(((5, 2.0), (7, 3.5))):
        shard = tmp_path / "shards" / f"{i}-of-2"
        shard.mkdir(parents=True)
        (shard / "run.json").write_text(json.dumps({"counts": {"ok": ok}, "seconds": secs}))
    assert gpu_check.run_counts(tmp_path) == (12, 3.5)


def test_relative_residual() -> None:
    exp = SimpleNamespace(logit=torch.tensor([0.5, -4.0]),
                          residual=torch.tensor([1e-3, -2e-2], dtype=torch.float64))
    assert gpu_check.relative_residual(exp) == pytest.approx(5e-3)


@pytest.mark.slow
def test_dry_run_on_the_cpu(tmp_path: Path) -> None:
    """Every section on the CPU at tiny sizes (the developer's --device cpu)."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--device", "cpu", "--quick",
         "--models", "resnet18", "--batches", "2", "--size", "64", "--images", "8",
         "--dump-model", "resnet18"], env=env(), check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {k: v["status"] for k, v in results["sections"].items()} == dict.fromkeys(
        ("maps", "residuals", "engine", "dump", "torchrun"), "ok")
    assert [r["ok"] for r in results["sections"]["dump"]["rows"]] == [8, 8]
    assert results["sections"]["torchrun"]["rows"][0]["exit"] == 0
