"""``--overlay blend|heat``: the heat style's formula, its NumPy and torch twins (bit for bit),
the option's validation and fingerprint, and ``fullgrad dump`` writing it on every path."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PHOTOS, SQUEEZENET, SQUEEZENET_WEIGHTS, cli
from PIL import Image

from fgcli import render
from fgcli.config import OVERLAY_STYLES, ModelSpec, RunConfig, build_config, replace
from fgcli.data import decode, devicejpeg
from fgcli.errors import UsageError
from fgcli.render import device as device_render

# torchvision 0.29 deprecates its codecs (devicejpeg filters this; pytest resets filters)
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning")

NAMES = ("grace_hopper.jpg", "rocket.jpg")
SMALL = [*SQUEEZENET, "--workers", "0", "--quiet"]
# settings_fingerprint of RunConfig(spec=ModelSpec("squeezenet1_1"), inputs=("x",)) with weights
# identity "w", computed before --overlay existed: default runs must keep resuming
FINGERPRINT_BEFORE_OVERLAY = "1e0428164f79192e"


# ------------------------------------------------------------------------------ formula

def test_heat_weights_table():
    w = render.heat_weights(0.5)
    assert w.shape == (256,) and w[0] == 0 and w[255] == 256
    assert w[128] == 129  # round(256 * 128 / 255) = round(128.50)
    assert np.all(np.diff(w) >= 0)
    assert np.all(render.heat_weights(0.0) == 0)
    full = render.heat_weights(1.0)  # w = min(1, 2 s): opaque from s = 1/2 on
    assert full[127] == 255 and full[128] == 256 and full[255] == 256
    with pytest.raises(ValueError, match="alpha"):
        render.heat_weights(1.5)


def test_overlay_heat_on_hand_made_pixels():
    image = np.array([[[100, 20, 250], [100, 20, 250], [100, 20, 250]]], dtype=np.uint8)
    heat = np.array([[[200, 40, 0], [200, 40, 0], [200, 40, 0]]], dtype=np.uint8)
    indices = np.array([[0, 255, 128]], dtype=np.uint8)
    out = render.overlay_heat(image, heat, indices, 0.5)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.array_equal(out[0, 0], image[0, 0])  # s = 0: the photo, exactly
    assert np.array_equal(out[0, 1], heat[0, 1])  # s = 1, alpha 0.5: the heat, exactly
    # s = 128/255, w = 129/256: (100*127 + 200*129 + 128) >> 8 = 150 (float: 150.2),
    # (20*127 + 40*129 + 128) >> 8 = 30 (30.04), (250*127 + 0 + 128) >> 8 = 124 (124.5)
    assert out[0, 2].tolist() == [150, 30, 124]
    # alpha 0.25 at s = 1: w = 1/2, halfway; alpha 0: the photo everywhere
    quarter = render.overlay_heat(image, heat, indices, 0.25)
    assert quarter[0, 1].tolist() == [150, 30, 125]
    assert np.array_equal(render.overlay_heat(image, heat, indices, 0.0), image)


def test_overlay_heat_is_the_float_formula_to_a_grey_level():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    heat = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, (17, 23), dtype=np.uint8)
    for alpha in (0.2, 0.5, 0.8):
        w = np.minimum(1.0, 2 * alpha * indices / 255.0)[..., None]
        exact = (1 - w) * image + w * heat
        got = render.overlay_heat(image, heat, indices, alpha).astype(np.float64)
        assert np.abs(got - exact).max() <= 1.0


def test_overlay_style_dispatches_and_rejects_unknown():
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    heat = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    assert np.array_equal(render.overlay_style("blend", image, heat, indices, 0.3),
                          render.overlay(image, heat, 0.3))
    assert np.array_equal(render.overlay_style("heat", image, heat, indices, 0.3),
                          render.overlay_heat(image, heat, indices, 0.3))
    with pytest.raises(ValueError, match="choose from blend, heat"):
        render.overlay_style("foo", image, heat, indices, 0.3)
    with pytest.raises(ValueError, match="must match"):
        render.overlay_heat(image, heat, indices[:4], 0.3)


def test_numpy_and_torch_heat_are_bit_identical():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (31, 47, 3), dtype=np.uint8)
    heat = rng.integers(0, 256, (31, 47, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, (31, 47), dtype=np.uint8)
    chw = (torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(heat).permute(2, 0, 1))
    for alpha in (0.0, 0.1, 0.3, 0.5, 0.77, 1.0):
        got = device_render.blend_heat(*chw, torch.from_numpy(indices), alpha)
        assert got.dtype == torch.uint8
        assert np.array_equal(got.permute(1, 2, 0).numpy(),
                              render.overlay_heat(image, heat, indices, alpha)), alpha


def test_encode_overlays_heat_style():
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    heat = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    (blob,) = device_render.encode_overlays([image], [heat], 0.5, style="heat", indices=[indices])
    (same,) = device_render.encode_overlays([torch.from_numpy(image).permute(2, 0, 1)], [heat],
                                         0.5, style="heat",
                                         indices=[torch.from_numpy(indices)])
    assert blob == same  # array or tensor inputs: one result
    expected = render.overlay_heat(image, heat, indices, 0.5)
    (direct,) = device_render._encode_jpegs([torch.from_numpy(expected).permute(2, 0, 1)], 90)
    assert blob == direct.numpy().tobytes()  # the encode of exactly the NumPy overlay
    # the existing positional call is still the uniform blend
    (plain,) = device_render.encode_overlays([image], [heat], 0.5)
    assert plain != blob
    with pytest.raises(ValueError, match="style heat needs one indices map per original"):
        device_render.encode_overlays([image], [heat], 0.5, style="heat")
    with pytest.raises(ValueError, match=r"overlay 0: expected \(24, 32\) uint8 indices"):
        device_render.encode_overlays([image], [heat], 0.5, style="heat", indices=[indices[:3]])
    with pytest.raises(ValueError, match="unknown overlay style 'foo'"):
        device_render.encode_overlays([image], [heat], 0.5, style="foo")


# ------------------------------------------------------------------------------ config

def test_config_validates_and_reads_the_toml_key(tmp_path):
    assert OVERLAY_STYLES == ("blend", "heat")
    assert RunConfig(spec=ModelSpec("m"), inputs=("x",)).overlay == "blend"
    with pytest.raises(UsageError, match=r"^--overlay: unknown 'foo'; choose from blend, heat$"):
        RunConfig(spec=ModelSpec("m"), inputs=("x",), overlay="foo")
    toml = tmp_path / "run.toml"
    toml.write_text('model = "m"\ninputs = ["x"]\noverlay = "heat"\n')
    assert build_config({}, str(toml)).overlay == "heat"
    assert build_config({"overlay": "blend"}, str(toml)).overlay == "blend"  # CLI wins
    toml.write_text('model = "m"\ninputs = ["x"]\noverlay = 1\n')
    with pytest.raises(UsageError, match="overlay must be a string"):
        build_config({}, str(toml))


def test_fingerprint_changes_only_for_heat():
    cfg = RunConfig(spec=ModelSpec("squeezenet1_1"), inputs=("x",))
    assert cfg.settings_fingerprint("w") == FINGERPRINT_BEFORE_OVERLAY
    assert replace(cfg, overlay="blend").settings_fingerprint("w") == FINGERPRINT_BEFORE_OVERLAY
    assert replace(cfg, overlay="heat").settings_fingerprint("w") != FINGERPRINT_BEFORE_OVERLAY


# ------------------------------------------------------------------------------ fullgrad dump

def invoke(*args: str):
    return cli("dump", *SMALL, *args)


def statuses(out: Path) -> dict[str, str]:
    lines = (out / "manifest.jsonl").read_text().splitlines()
    return {rec["key"]: rec["status"] for rec in map(json.loads, lines)}


def settings(out: Path) -> set[str]:
    lines = (out / "manifest.jsonl").read_text().splitlines()
    return {json.loads(line)["settings"] for line in lines}


def decoded(path: Path | bytes) -> np.ndarray:
    with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def pillow_roundtrip(rgb: np.ndarray) -> np.ndarray:
    """What the writer's own JPEG encode (Pillow, quality 90) does to an exact overlay."""
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, "JPEG", quality=90)
    return decoded(buf.getvalue())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One tree dumped with the default blend, then resumed with --overlay heat (twice),
    and a --device-jpeg heat tree forced on the CPU."""
    tmp = tmp_path_factory.mktemp("overlay")
    src = tmp / "in"
    src.mkdir()
    for name in NAMES:
        shutil.copy(PHOTOS / name, src / name)
    out, dev = tmp / "out", tmp / "dev"
    found: dict = {"src": src, "out": out, "dev": dev}
    assert invoke(str(src), "--out", str(out)).exit_code == 0
    found["blend_settings"] = settings(out)
    found["blend_overlays"] = {n: (out / "overlays" / f"{n}.jpg").read_bytes() for n in NAMES}
    found["blend_run"] = json.loads((out / "run.json").read_text())
    assert invoke(str(src), "--out", str(out), "--overlay", "heat").exit_code == 0
    found["heat_statuses"] = statuses(out)
    found["heat_settings"] = settings(out)
    assert invoke(str(src), "--out", str(out), "--overlay", "heat").exit_code == 0
    found["again_statuses"] = statuses(out)
    assert invoke(str(src), "--out", str(dev), "--overlay", "heat",
                  "--device-jpeg").exit_code == 0
    return found


def heat_formula(original: np.ndarray, heatmap_png: Path, alpha: float = 0.5) -> np.ndarray:
    """The heat overlay recomputed from the original and the written heatmap's indices."""
    with Image.open(heatmap_png) as png:
        assert png.mode == "P"
        indices = np.asarray(png)
    heat = render.colormap_table("inferno")[indices]
    return render.overlay_heat(original, heat, indices, alpha)


def photo(name: str) -> np.ndarray:
    with Image.open(PHOTOS / name) as img:
        return np.asarray(img.convert("RGB"))


def test_blend_run_keeps_its_fingerprint(runs):
    from fgcli.models.load import load

    loaded = load(ModelSpec("squeezenet1_1", str(SQUEEZENET_WEIGHTS), size=64), "cpu")
    cfg = RunConfig(spec=ModelSpec("squeezenet1_1", str(SQUEEZENET_WEIGHTS), size=64),
                    inputs=("x",))
    before = cfg.settings_fingerprint(loaded.config.identity, loaded.config.interpolation)
    assert runs["blend_settings"] == {before}
    heat = replace(cfg, overlay="heat").settings_fingerprint(
        loaded.config.identity, loaded.config.interpolation)
    assert runs["heat_settings"] == {heat} and heat != before
    assert runs["blend_run"]["overlay"] == "blend"
    assert json.loads((runs["out"] / "run.json").read_text())["overlay"] == "heat"


def test_resume_with_heat_recomputes_then_skips(runs):
    assert runs["heat_statuses"] == {n: "ok" for n in NAMES}  # blend tree: recomputed
    assert runs["again_statuses"] == {n: "skipped" for n in NAMES}


def test_heat_overlays_are_the_formula_of_the_written_heatmap(runs):
    out = runs["out"]
    for name in NAMES:
        original = photo(name)
        png = out / "heatmaps" / f"{name}.png"
        indices = np.asarray(Image.open(png))
        # the PNG's indices are the normalised map the writer used
        saliency = np.load(out / "maps" / f"{name}.npy")
        h, w = original.shape[:2]
        assert np.array_equal(indices, render.heatmap_indices(saliency, w, h))
        expected = heat_formula(original, png)
        written = decoded(out / "overlays" / f"{name}.jpg")
        assert written.shape == expected.shape
        # JPEG loss only: the written file is no further from the formula than Pillow's
        # own quality-90 round trip of the formula's output (about a grey level)
        jpeg_loss = np.abs(pillow_roundtrip(expected) - expected).mean()
        error = np.abs(written - expected).mean()
        assert jpeg_loss < 2.0 and error <= jpeg_loss + 0.05, (error, jpeg_loss)
        # and not the blend it replaced: that is several JPEG losses away (the blend's
        # w = 0.5 is the heat's w at the median of these broad 64-pixel maps, so the mean
        # difference is ~10 grey levels, not more)
        blend = decoded(runs["blend_overlays"][name])
        assert np.abs(blend - written).mean() > 3 * jpeg_loss
        # low saliency (s < 0.1, so w < 0.1): heat keeps the photo, while blend (w = 0.5)
        # darkens it with the colormap's near-black low end. Exactly, heat's deviation
        # from the photo there is below 0.1 / 0.5 of blend's; the JPEG adds the photo's own
        # quality-90 noise (a grey level on grace_hopper, three on the grainy rocket)
        low = indices < 26
        assert low.sum() > 1000, name
        keep = np.abs(written[low] - original[low]).mean()
        tint = np.abs(blend[low] - original[low]).mean()
        noise = np.abs(pillow_roundtrip(original)[low] - original[low]).mean()
        assert keep <= noise + 0.2 * tint and tint > 2 * keep, (keep, tint, noise)


def test_device_jpeg_heat_equals_the_pillow_path(runs):
    dev, out = runs["dev"], runs["out"]
    assert json.loads((dev / "run.json").read_text())["jpeg"] == "device"
    for name in NAMES:
        written = decoded(dev / "overlays" / f"{name}.jpg")
        # exact on its own inputs: torchvision's decode of the photo, its heatmap's indices
        (original,) = devicejpeg.decode_batch([decode.file_bytes(runs["src"] / name)],
                                              "cpu")
        expected = heat_formula(original.permute(1, 2, 0).numpy(), dev / "heatmaps" /
                                f"{name}.png")
        jpeg_loss = np.abs(pillow_roundtrip(expected) - expected).mean()
        error = np.abs(written - expected).mean()
        # torchvision encodes (half a grey level of slack for a libjpeg that is not
        # Pillow's; with torchvision 0.29 on the CPU the two agree exactly)
        assert jpeg_loss < 2.0 and error <= jpeg_loss + 0.5, (error, jpeg_loss)
        # and the Pillow path's overlay, to the decoders' grey level or two
        pillow = decoded(out / "overlays" / f"{name}.jpg")
        assert np.abs(written - pillow).mean() < 2.0


def test_bad_overlay_exits_2_with_one_line(tmp_path):
    result = invoke(str(PHOTOS / NAMES[0]), "--out", str(tmp_path / "o"), "--overlay", "foo")
    assert result.exit_code == 2
    assert result.stderr.strip() == "fullgrad: error: --overlay: unknown 'foo'; choose from " \
                                    "blend, heat"
    assert not (tmp_path / "o").exists()
