"""`fullgrad dump` end to end through Typer's CliRunner (in process)."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import PHOTOS, ROOT, SQUEEZENET, SQUEEZENET_WEIGHTS, cli, manifest
from PIL import Image
from typer.testing import CliRunner

from fgcli.cli import app

BASE = [*SQUEEZENET, "--workers", "0"]


def invoke(args: list[str], **kwargs):
    """Run `fullgrad dump` with the small squeezenet set-up unless the args pick a model."""
    extra = BASE if "--model" not in args and "--config" not in args else []
    return cli("dump", *extra, *args, **kwargs)  # args win


def by_key(out: Path) -> dict[str, dict]:
    return {rec["key"]: rec for rec in manifest(out)}


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _make_bad_tree(root: Path) -> Path:
    """Every row of the issue's bad-input table, next to good images."""
    root.mkdir()
    photo = (PHOTOS / "grace_hopper.jpg").read_bytes()
    (root / "good.jpg").write_bytes(photo)
    (root / "truncated.jpg").write_bytes(photo[: len(photo) // 3])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n")
    (root / "x.png").mkdir()
    (root / "x.png" / "inside.png").write_bytes((PHOTOS / "coffee.png").read_bytes())
    (root / "unreadable.png").write_bytes((PHOTOS / "coffee.png").read_bytes())
    os.symlink("loop.jpg", root / "loop.jpg")
    _png_header_only(root / "bomb.png", 30000, 30000)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "one_pixel.png")
    Image.fromarray(np.full((40, 50), 40000, dtype=np.uint16)).save(root / "sixteen.png")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    pal = Image.new("P", (40, 30), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (0, 0, 20, 30))
    pal.save(root / "palette.png", transparency=0)
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:])
    (root / "with space ü.jpg").write_bytes(photo)
    (root / "new\nline.jpg").write_bytes(photo)
    return root


BAD = {
    "truncated.jpg": "corrupt image",
    "empty.jpg": "empty file",
    "text.jpg": "not an image",
    "x.png": "is a directory",
    "unreadable.png": "permission denied",
    "loop.jpg": "symlink loop",
    "bomb.png": "decompression bomb",
}
GOOD = ["good.jpg", "one_pixel.png", "sixteen.png", "cmyk.jpg", "palette.png", "animated.gif",
        "with space ü.jpg", "new\nline.jpg"]


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory) -> tuple[Path, Path, object]:
    """One dump over the bad-input tree; the tests below check it row by row."""
    import fgcli.data.decode

    tmp = tmp_path_factory.mktemp("bad")
    tree = _make_bad_tree(tmp / "in")
    unreadable = str(tree / "unreadable.png")
    os.chmod(unreadable, 0)
    real_open = open

    def guarded_open(path, *args, **kwargs):  # root ignores chmod 0: refuse like the OS would
        if str(path) == unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    fgcli.data.decode.open = guarded_open
    try:
        out = tmp / "out"
        result = invoke([str(tree), "--out", str(out), "--quiet"])
    finally:
        del fgcli.data.decode.open
    return tree, out, result


def test_bad_input_run_exits_1_and_records_every_image(bad_run):
    tree, out, result = bad_run
    assert result.exit_code == 1, result.stderr
    assert set(by_key(out)) == set(BAD) | set(GOOD)
    assert not (out / ".tmp").exists()


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_row_is_a_failed_line(bad_run, name):
    _, out, _ = bad_run
    rec = by_key(out)[name]
    assert rec["status"] == "failed", rec
    assert BAD[name] in rec["error"] and "\n" not in rec["error"], rec["error"]
    assert rec["outputs"] == {} and rec["input"].endswith(name)


@pytest.mark.parametrize("name", GOOD)
def test_good_input_row_is_written(bad_run, name):
    tree, out, _ = bad_run
    rec = by_key(out)[name]
    assert rec["status"] == "ok", rec
    assert set(rec["outputs"]) == {"heatmap", "overlay", "map"}
    for rel in rec["outputs"].values():
        assert (out / rel).is_file()
    original = Image.open(tree / name)
    assert Image.open(out / rec["outputs"]["heatmap"]).size == original.size
    assert Image.open(out / rec["outputs"]["overlay"]).size == original.size
    assert np.load(out / rec["outputs"]["map"]).shape == (64, 64)
    # names with spaces, unicode and newlines keep their names in the output tree
    assert rec["outputs"]["heatmap"] == f"heatmaps/{name}.png"


def test_overlay_colours_are_rgb(tmp_path):
    """A pure red image stays red in the overlay (no BGR swap); heatmap colours from the LUT."""
    Image.new("RGB", (64, 48), (255, 0, 0)).save(tmp_path / "red.png")
    out = tmp_path / "out"
    invoke([str(tmp_path / "red.png"), "--out", str(out), "--alpha", "0.0",
            "--colormap", "gray"])
    overlay = np.asarray(Image.open(out / "overlays" / "red.png.jpg"))
    assert overlay[..., 0].mean() > 240 and overlay[..., 1:].mean() < 15
    heat = np.asarray(Image.open(out / "heatmaps" / "red.png.png").convert("RGB")).astype(int)
    assert (heat[..., 0] == heat[..., 1]).all() and (heat[..., 1] == heat[..., 2]).all()
    assert heat.min() == 0 and heat.max() == 255  # min-max normalised, gray LUT


def test_image_modes_convert_correctly():
    from fgcli.data.decode import _to_rgb_float

    white16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.allclose(_to_rgb_float(white16), 1.0)
    half16 = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert np.allclose(_to_rgb_float(half16), 32768 / 65535)
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 0))  # fully transparent red -> background
    assert np.allclose(_to_rgb_float(rgba), 1.0)
    la = Image.new("LA", (2, 2), (0, 255))  # opaque black stays black
    assert np.allclose(_to_rgb_float(la), 0.0)
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    rgb = _to_rgb_float(pal)
    assert np.allclose(rgb[0, 0], 1.0) and np.allclose(rgb[0, 1], [0, 0, 1])
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    assert np.allclose(_to_rgb_float(cmyk)[0, 0], [1, 0, 0], atol=0.02)


def test_exif_orientation_is_applied(tmp_path):
    from fgcli.data.decode import decode

    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert decode(str(tmp_path / "rot.jpg"), 10**8).shape[:2] == (40, 20)


def test_outputs_manifest_and_run_json(tmp_path, squeezenet):
    out = tmp_path / "out"
    result = invoke([str(PHOTOS), "--out", str(out), "--save", "heatmap,overlay,map,decomp",
                     "--size", "224"])
    assert result.exit_code == 0, result.stderr
    records = by_key(out)
    assert sorted(records) == sorted(p.name for p in PHOTOS.iterdir())
    rec = records["coffee.png"]
    assert rec["status"] == "ok" and rec["target"] == 967 and rec["target_name"] == "espresso"
    assert 0 < rec["prob"] <= 1 and abs(rec["residual"]) <= 1e-4 * max(1, abs(rec["logit"]))
    assert rec["seconds"] > 0 and rec["error"] is None

    # the map file is the engine's exact output for that image
    from fgcli import FullGrad
    from fgcli.data.decode import decode, preprocess
    from fgcli.models.base import IMAGENET_MEAN, IMAGENET_STD

    x, _ = preprocess(decode(str(PHOTOS / "coffee.png"), 10**9), (224, 224), False, 256,
                      IMAGENET_MEAN, IMAGENET_STD)
    expected = FullGrad(squeezenet).saliency(x[None])[0, 0].numpy()
    saved = np.load(out / rec["outputs"]["map"])
    assert saved.dtype == np.float32 and saved.shape == (224, 224)
    np.testing.assert_allclose(saved, expected, rtol=1e-5, atol=1e-5 * expected.max())

    # the compact decomposition sums back to the logit
    with np.load(out / rec["outputs"]["decomp"]) as d:
        total = d["input"].astype(np.float64).sum() + float(d["residual"]) + sum(
            d[f"bias/{name}"].astype(np.float64).sum() for name in d["layers"]) + sum(
            float(d[key]) for key in d.files if key.startswith("offgrid/"))
        assert abs(total - float(d["logit"])) <= 1e-4 * abs(float(d["logit"]))
        assert int(d["target"]) == 967 and d["input"].shape == (224, 224)
        assert len(d["layers"]) == 26

    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"ok": 6, "failed": 0, "skipped": 0}
    assert run["model"] == "squeezenet1_1" and run["method"] == "fullgrad"
    assert {"torch", "torchvision", "fgcli", "python"} <= set(run["versions"])
    assert run["device"] == "cpu" and run["input_size"] == [224, 224]


def test_rerun_skips_and_settings_change_recomputes(tmp_path):
    out = tmp_path / "out"
    args = [str(PHOTOS / "coffee.png"), str(PHOTOS / "rocket.jpg"), "--out", str(out)]
    assert invoke(args).exit_code == 0
    heat = out / "heatmaps" / "coffee.png.png"
    first = heat.stat().st_mtime_ns
    again = invoke(args)
    assert again.exit_code == 0
    assert {r["status"] for r in manifest(out)} == {"skipped"}
    assert heat.stat().st_mtime_ns == first
    assert len(manifest(out)) == 2  # compacted: one line per image
    # a deleted output is recomputed
    (out / "maps" / "rocket.jpg.npy").unlink()
    invoke(args)
    assert by_key(out)["rocket.jpg"]["status"] == "ok"
    assert by_key(out)["coffee.png"]["status"] == "skipped"
    # other settings: recomputed
    invoke([*args, "--colormap", "viridis"])
    assert {r["status"] for r in manifest(out)} == {"ok"}
    # --overwrite: recomputed even with the same settings
    invoke([*args, "--colormap", "viridis", "--overwrite"])
    assert {r["status"] for r in manifest(out)} == {"ok"}
    assert heat.stat().st_mtime_ns != first


def test_lock_held_by_another_run(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from fgcli.tree.writer import OutputTree; "
         "tree = OutputTree(sys.argv[1]); tree.acquire(['fullgrad', 'dump', 'elsewhere']); "
         "print('held', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = invoke([str(PHOTOS / "coffee.png"), "--out", str(out)])
        assert result.exit_code == 2
        assert f"pid {holder.pid}" in result.stderr and "fullgrad dump elsewhere" in result.stderr
    finally:
        holder.kill()
        holder.wait()
    assert invoke([str(PHOTOS / "coffee.png"), "--out", str(out)]).exit_code == 0


def test_stdin_list_files_from_and_null(tmp_path):
    out = tmp_path / "out"
    listed = f"{PHOTOS / 'coffee.png'}\n\n{PHOTOS / 'rocket.jpg'}\n{tmp_path / 'missing.jpg'}\n"
    result = invoke(["-", "--out", str(out)], input=listed)
    assert result.exit_code == 1
    records = {Path(r["input"]).name: r for r in manifest(out)}
    assert {k: r["status"] for k, r in records.items()} == {
        "coffee.png": "ok", "rocket.jpg": "ok", "missing.jpg": "failed"}
    assert "no such file" in records["missing.jpg"]["error"]

    weird = tmp_path / "a\nb.png"
    weird.write_bytes((PHOTOS / "coffee.png").read_bytes())
    (tmp_path / "list0").write_bytes(str(weird).encode() + b"\0")
    out2 = tmp_path / "out2"
    assert invoke(["--files-from", str(tmp_path / "list0"), "--null", "--out", str(out2)]
                  ).exit_code == 0
    assert manifest(out2)[0]["input"] == str(weird)


def test_duplicate_output_names_never_collide(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "img.png").write_bytes((PHOTOS / "coffee.png").read_bytes())
    (a / "sub" / "img.jpg").write_bytes((PHOTOS / "rocket.jpg").read_bytes())
    out = tmp_path / "out"
    assert invoke([str(a), str(b), "--out", str(out)]).exit_code == 0
    keys = sorted(by_key(out))
    assert keys == ["a/sub/img.jpg", "a/sub/img.png", "b/sub/img.png"]
    assert (out / "heatmaps" / "a" / "sub" / "img.jpg.png").is_file()
    assert (out / "heatmaps" / "a" / "sub" / "img.png.png").is_file()


def test_targets_by_index_name_and_topk(tmp_path):
    out = tmp_path / "out"
    invoke([str(PHOTOS / "coffee.png"), "--out", str(out), "--target", "Egyptian cat"])
    rec = manifest(out)[0]
    assert rec["target"] == 285 and rec["target_name"] == "Egyptian cat"
    out2 = tmp_path / "out2"
    invoke([str(PHOTOS / "coffee.png"), "--out", str(out2), "--target", "3"])
    assert manifest(out2)[0]["target"] == 3
    out3 = tmp_path / "out3"
    invoke([str(PHOTOS / "coffee.png"), "--out", str(out3), "--topk", "3", "--size", "224"])
    recs = manifest(out3)
    assert [r["rank"] for r in recs] == [1, 2, 3] and recs[0]["target"] == 967
    assert recs[0]["prob"] >= recs[1]["prob"] >= recs[2]["prob"]
    for r in recs:
        assert r["outputs"]["heatmap"] == f"heatmaps/coffee.png.top{r['rank']}_{r['target']}.png"
    bad = invoke([str(PHOTOS / "coffee.png"), "--out", str(out), "--target", "espreso"])
    assert bad.exit_code == 2 and "did you mean 'espresso'" in bad.stderr


@pytest.mark.parametrize("args,message", [
    (["--model", "resnet5"], "did you mean resnet50"),
    (["--model", "squeezenet1_1", "--save", "heatmap,png"], "unknown output 'png'"),
    (["--model", "squeezenet1_1", "--colormap", "nope"], "unknown colormap"),
    (["--model", "squeezenet1_1", "--device", "cuda:7"], "cuda"),
    (["--model", "squeezenet1_1", "--weights", "/nonexistent/w.pth"], "no such file"),
    (["--model", "squeezenet1_1", "--weights", "IMAGENET9K"], "has no weights"),
    (["--model", "squeezenet1_1", "--files-from", "/nonexistent/list"], "no such file"),
])
def test_usage_errors_exit_2_with_one_line(tmp_path, args, message):
    result = CliRunner().invoke(app, ["dump", str(PHOTOS / "coffee.png"), "--out",
                                      str(tmp_path / "o"), *args])
    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_offline_default_weights_message(tmp_path):
    result = CliRunner().invoke(app, ["dump", str(PHOTOS / "coffee.png"), "--model",
                                      "resnet18", "--out", str(tmp_path / "o")],
                                env={"TORCH_HOME": str(tmp_path / "torch-home")})
    assert result.exit_code == 2
    assert "--weights PATH" in result.stderr and "--weights none" in result.stderr
    assert not (tmp_path / "o" / "manifest.jsonl").exists()


def test_weights_file_that_does_not_fit(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    result = CliRunner().invoke(app, ["dump", str(PHOTOS / "coffee.png"), "--model",
                                      "squeezenet1_1", "--weights", str(tmp_path / "r18.pth"),
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "does not fit squeezenet1_1" in result.stderr


def test_config_file_and_command_line_override(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "squeezenet1_1"\nweights = "{SQUEEZENET_WEIGHTS}"\n'
                   'size = 64\nsave = ["map"]\ncolormap = "viridis"\nworkers = 0\n')
    out = tmp_path / "out"
    result = invoke([str(PHOTOS / "coffee.png"), "--config", str(cfg), "--out", str(out),
                     "--save", "heatmap"])
    assert result.exit_code == 0, result.stderr
    assert set(manifest(out)[0]["outputs"]) == {"heatmap"}  # command line wins
    assert json.loads((out / "run.json").read_text())["input_size"] == [64, 64]  # from file
    (tmp_path / "bad.toml").write_text('modle = "x"\n')
    bad = invoke([str(PHOTOS / "coffee.png"), "--config", str(tmp_path / "bad.toml")])
    assert bad.exit_code == 2 and "unknown option 'modle'" in bad.stderr


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.toml")))
def test_shipped_presets_parse(preset):
    from fgcli.config import read_config_file

    assert read_config_file(preset)["model"]


def test_json_lines_on_stdout_and_quiet(tmp_path):
    out = tmp_path / "out"
    result = invoke([str(PHOTOS / "coffee.png"), str(PHOTOS / "rocket.jpg"), "--out", str(out),
                     "--json", "--quiet"])
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["key"] for r in lines] == ["coffee.png", "rocket.jpg"]
    assert result.stderr == ""


def test_summary_and_failure_lines_on_stderr(tmp_path):
    (tmp_path / "bad.jpg").write_text("nope")
    result = invoke([str(PHOTOS / "coffee.png"), str(tmp_path / "bad.jpg"), "--out",
                     str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "failed:" in result.stderr and "bad.jpg: not an image" in result.stderr
    assert "ok" in result.stderr and result.stdout == ""


def test_fail_fast_stops_at_first_failure(tmp_path):
    (tmp_path / "a.jpg").write_text("nope")
    (tmp_path / "b.png").write_bytes((PHOTOS / "coffee.png").read_bytes())
    out = tmp_path / "out"
    result = invoke([str(tmp_path), "--out", str(out), "--fail-fast"])
    assert result.exit_code == 1
    assert [r["key"] for r in manifest(out)] == ["a.jpg"]


def test_unexpected_error_is_one_line_unless_debug(tmp_path, monkeypatch):
    import fgcli.engine.saliency as saliency

    def boom(self, *args, **kwargs):
        raise RuntimeError("engine exploded\nsecond line")

    monkeypatch.setattr(saliency.FullGrad, "explain", boom)
    result = CliRunner().invoke(app, ["dump", str(PHOTOS / "coffee.png"), *BASE, "--out",
                                      str(tmp_path / "o")])
    assert result.exit_code == 3
    assert "internal error: RuntimeError: engine exploded" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    debug = CliRunner().invoke(app, ["dump", str(PHOTOS / "coffee.png"), *BASE, "--out",
                                     str(tmp_path / "o2"), "--debug"])
    # --debug adds the traceback and keeps exit 3
    assert debug.exit_code == 3 and "Traceback" in debug.stderr
    assert "internal error: RuntimeError: engine exploded" in debug.stderr
    # the lock is released even so
    assert invoke([str(PHOTOS / "coffee.png"), "--out", str(tmp_path / "o"), "--method",
                   "simple"]).exit_code == 0


def test_methods_and_crop(tmp_path):
    out = tmp_path / "out"
    for method in ("simple", "smooth"):
        result = invoke([str(PHOTOS / "coffee.png"), "--out", str(out / method), "--method",
                         method, "--samples", "2", "--save", "map"])
        assert result.exit_code == 0, result.stderr
    simple = np.load(out / "simple" / "maps" / "coffee.png.npy")
    smooth = np.load(out / "smooth" / "maps" / "coffee.png.npy")
    assert simple.shape == smooth.shape == (64, 64) and not np.allclose(simple, smooth)
    crop = invoke([str(PHOTOS / "rocket.jpg"), "--out", str(out / "crop"), "--crop"])
    assert crop.exit_code == 0
    rocket = Image.open(PHOTOS / "rocket.jpg").size
    heat = Image.open(out / "crop" / "heatmaps" / "rocket.jpg.png").size
    # the centre crop it saw: 64 of the 73 pixels of the resized shorter side
    side = min(rocket) * 64 / 73
    assert abs(heat[0] - side) <= 2 and abs(heat[1] - side) <= 2  # rounding of the resize


def test_models_command():
    result = CliRunner().invoke(app, ["models", "resnet*"])
    assert result.exit_code == 0
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in result.stdout.splitlines()}
    assert rows["resnet50"] == ["224", "grid"] and "vgg16" not in rows
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in CliRunner().invoke(
        app, ["models", "*"]).stdout.splitlines()}
    assert rows["inception_v3"] == ["299", "grid"] and rows["vit_b_16"][1] == "tokens"
    assert len(rows) == len(torchvision.models.list_models(module=torchvision.models))
    assert CliRunner().invoke(app, ["models", "zzz"]).exit_code == 2


def test_out_of_memory_halves_the_batch_and_retries(tmp_path, monkeypatch):
    import fgcli.engine.saliency as saliency

    real = saliency.FullGrad.explain
    sizes = []

    def limited(self, x, *args, **kwargs):
        sizes.append(len(x))
        if len(x) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(saliency.FullGrad, "explain", limited)
    out = tmp_path / "out"
    result = invoke([str(PHOTOS), "--out", str(out), "--batch-size", "6", "--save", "map"])
    assert result.exit_code == 0, result.stderr
    # 6 -> 3 -> 1, logged each time, then kept for the rest of the run
    assert result.stderr.count("warning: out of memory") == 2
    assert sizes[:2] == [6, 3] and max(sizes[2:]) == 1 and sizes.count(1) == 6
    assert {r["status"] for r in manifest(out)} == {"ok"} and len(manifest(out)) == 6
    # the maps equal a run that never ran out of memory (at the batch size the retries
    # settled on: other compositions differ by float rounding, which can flip a near-tied
    # max-pool decision on some CPUs)
    monkeypatch.setattr(saliency.FullGrad, "explain", real)
    clean = tmp_path / "clean"
    invoke([str(PHOTOS), "--out", str(clean), "--batch-size", "1", "--save", "map"])
    for rec in manifest(out):
        np.testing.assert_allclose(np.load(out / rec["outputs"]["map"]),
                                   np.load(clean / rec["outputs"]["map"]), rtol=1e-5, atol=1e-4)


def test_out_of_memory_for_one_image_fails_those_images(tmp_path, monkeypatch):
    import fgcli.engine.saliency as saliency

    def never(self, x, *args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(saliency.FullGrad, "explain", never)
    out = tmp_path / "out"
    result = invoke([str(PHOTOS / "coffee.png"), str(PHOTOS / "rocket.jpg"), "--out", str(out)])
    assert result.exit_code == 1
    assert all("out of memory on cpu even for one image" in r["error"] for r in manifest(out))


def test_amp_and_channels_last(tmp_path):
    base = tmp_path / "base"
    invoke([str(PHOTOS / "coffee.png"), "--out", str(base), "--save", "map", "--size", "224"])
    ref = np.load(base / "maps" / "coffee.png.npy")
    last = tmp_path / "last"
    invoke([str(PHOTOS / "coffee.png"), "--out", str(last), "--save", "map", "--size", "224",
            "--channels-last"])
    np.testing.assert_allclose(np.load(last / "maps" / "coffee.png.npy"), ref, rtol=1e-4,
                               atol=1e-4 * ref.max())
    amp = tmp_path / "amp"
    result = invoke([str(PHOTOS / "coffee.png"), "--out", str(amp), "--save", "map", "--size",
                     "224", "--amp"])
    assert result.exit_code == 0
    low = np.load(amp / "maps" / "coffee.png.npy")
    assert np.isfinite(low).all() and np.corrcoef(low.ravel(), ref.ravel())[0, 1] > 0.9
    rec = manifest(amp)[0]
    assert rec["target"] == 967 and rec["settings"] != manifest(base)[0]["settings"]
    assert abs(rec["residual"]) < 0.05 * abs(rec["logit"])  # bfloat16: ~1e-2 relative


def test_torn_manifest_line_from_a_killed_run(tmp_path):
    out = tmp_path / "out"
    args = [str(PHOTOS / "coffee.png"), str(PHOTOS / "rocket.jpg"), "--out", str(out)]
    invoke(args)
    lines = (out / "manifest.jsonl").read_text().splitlines()
    # a run killed while writing: one whole line, then half of the next one, no newline
    (out / "manifest.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    result = invoke(args)
    assert result.exit_code == 0
    records = by_key(out)
    assert records["coffee.png"]["status"] == "skipped"
    assert records["rocket.jpg"]["status"] == "ok"  # its line was lost: recomputed
    assert len(manifest(out)) == 2


def test_output_tree_inside_the_input_tree_is_not_read_back(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.png").write_bytes((PHOTOS / "coffee.png").read_bytes())
    out = imgs / "saliency"
    assert invoke([str(imgs), "--out", str(out)]).exit_code == 0
    again = invoke([str(imgs), "--out", str(out)])
    assert again.exit_code == 0
    assert [r["key"] for r in manifest(out)] == ["a.png"]
    assert manifest(out)[0]["status"] == "skipped"


def test_fifo_argument_fails_instead_of_hanging(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    result = invoke([str(fifo), str(PHOTOS / "coffee.png"), "--out", str(out)])
    assert result.exit_code == 1
    records = by_key(out)
    assert records["pipe.jpg"]["error"] == "not a regular file"
    assert records["coffee.png"]["status"] == "ok"


def test_out_that_is_a_file_is_a_setup_error(tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    result = invoke([str(PHOTOS / "coffee.png"), "--out", str(tmp_path / "taken")])
    assert result.exit_code == 2 and "--out" in result.stderr and "cannot write" in result.stderr


@pytest.mark.slow  # full tier: transformers' completeness is in the fast tier (test_all_classifiers)
def test_decomposition_of_a_transformer_sums_to_the_logit(tmp_path):
    """ViT's class token is not a pixel: its share of each layer is stored as offgrid/*."""
    out = tmp_path / "out"
    result = invoke([str(PHOTOS / "chelsea.png"), "--model", "vit_b_32", "--weights", "random",
                     "--out", str(out), "--save", "map,decomp", "--quiet"])
    assert result.exit_code == 0, result.stderr
    rec = by_key(out)["chelsea.png"]
    with np.load(out / rec["outputs"]["decomp"]) as d:
        offgrid = {key: float(d[key]) for key in d.files if key.startswith("offgrid/")}
        assert len(offgrid) >= 70 and max(abs(v) for v in offgrid.values()) > 1e-3
        total = d["input"].astype(np.float64).sum() + float(d["residual"]) + sum(
            d[f"bias/{name}"].astype(np.float64).sum() for name in d["layers"]) + sum(
            offgrid.values())
        assert abs(total - float(d["logit"])) <= 1e-4 * max(1.0, abs(float(d["logit"])))
        assert d["bias/encoder.layers.encoder_layer_0.ln_1"].shape == (7, 7)
