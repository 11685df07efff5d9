"""fgcli.data.devicejpeg on the CPU (torchvision's codecs take CPU tensors); CUDA tests skip
without a GPU."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from helpers import PHOTOS
from PIL import Image, ImageOps

from fgcli import render
from fgcli.data import decode, devicejpeg
from fgcli.data.decode import Box, DecodeError, preprocess
from fgcli.render import device as device_render

# torchvision 0.29 deprecates its codecs (devicejpeg filters this; pytest resets filters)
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning")

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def jpeg_bytes(rgb: np.ndarray, quality: int = 90, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(rgb, "RGB")
    if orientation is None:
        img.save(buf, "JPEG", quality=quality)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(buf, "JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def hwc(img: torch.Tensor) -> np.ndarray:
    return img.permute(1, 2, 0).cpu().numpy()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """An asymmetric real photo, small enough to keep the tests fast."""
    with Image.open(PHOTOS / "rocket.jpg") as img:
        return np.asarray(img.convert("RGB"))[40:200, 100:340].copy()  # 160 x 240


def test_is_jpeg(tmp_path):
    jpg, png = PHOTOS / "grace_hopper.jpg", PHOTOS / "chelsea.png"
    assert decode.is_jpeg(jpg) and decode.is_jpeg(str(jpg))
    assert not decode.is_jpeg(png)
    assert decode.is_jpeg(jpg.read_bytes())
    assert decode.is_jpeg(decode.file_bytes(jpg))
    assert not decode.is_jpeg(b"\xff\xd8")
    assert not decode.is_jpeg(tmp_path / "missing.jpg")
    disguised = tmp_path / "really-a-jpeg.png"
    disguised.write_bytes(jpg.read_bytes())
    assert decode.is_jpeg(disguised)


@pytest.mark.parametrize("name", ["rocket.jpg", "grace_hopper.jpg"])
def test_decode_matches_pillow_on_a_real_photo(name):
    data = decode.file_bytes(PHOTOS / name)
    (img,) = devicejpeg.decode_batch([data], "cpu")
    with Image.open(PHOTOS / name) as pil:
        ref = np.asarray(pil.convert("RGB")).astype(np.int16)
    assert img.dtype == torch.uint8 and img.shape == (3, *ref.shape[:2])
    diff = np.abs(hwc(img).astype(np.int16) - ref)
    assert diff.mean() < 0.5 and np.percentile(diff, 99.9) <= 2, (diff.mean(), diff.max())


def test_decode_a_batch_of_different_sizes(photo):
    datas = [as_tensor(jpeg_bytes(photo)), as_tensor(jpeg_bytes(photo[:100, :50]))]
    images = devicejpeg.decode_batch(datas, "cpu")
    assert [tuple(i.shape) for i in images] == [(3, 160, 240), (3, 100, 50)]


def test_grayscale_jpeg_comes_out_rgb(photo):
    buf = io.BytesIO()
    Image.fromarray(photo).convert("L").save(buf, "JPEG", quality=90)
    (img,) = devicejpeg.decode_batch([as_tensor(buf.getvalue())], "cpu")
    assert img.shape == (3, 160, 240)
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_honoured(photo, orientation):
    data = jpeg_bytes(photo, orientation=orientation)
    assert devicejpeg.jpeg_header(data) == devicejpeg.JpegHeader(240, 160, orientation)
    (img,) = devicejpeg.decode_batch([as_tensor(data)], "cpu")
    with Image.open(io.BytesIO(data)) as pil:
        ref = np.asarray(ImageOps.exif_transpose(pil).convert("RGB")).astype(np.int16)
    assert hwc(img).shape == ref.shape
    assert np.abs(hwc(img).astype(np.int16) - ref).mean() < 0.5
    # the CUDA path's own transform (torchvision orients on the CPU only) agrees exactly
    from torchvision.io import ImageReadMode, decode_jpeg

    stored = decode_jpeg(as_tensor(data), mode=ImageReadMode.RGB)
    assert torch.equal(devicejpeg.apply_orientation(stored, orientation), img)


def test_header_without_exif_and_big_endian_exif(photo):
    assert devicejpeg.jpeg_header(jpeg_bytes(photo)).orientation == 1
    plain = jpeg_bytes(photo)
    # a hand-made big-endian (Motorola) APP1 with orientation 6 after SOI
    tiff = b"MM\x00*" + (8).to_bytes(4, "big") + (1).to_bytes(2, "big") \
        + bytes.fromhex("0112 0003 00000001 0006 0000") + bytes(4)
    payload = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    data = plain[:2] + app1 + plain[2:]
    assert devicejpeg.jpeg_header(data).orientation == 6
    (img,) = devicejpeg.decode_batch([as_tensor(data)], "cpu")
    assert img.shape == (3, 240, 160)


def test_corrupt_files_give_clear_errors(photo):
    good = as_tensor(jpeg_bytes(photo))
    truncated = good[: len(good) // 3].clone()
    batch = [good, truncated, as_tensor(b"GIF89a not a jpeg"), torch.empty(0, dtype=torch.uint8)]
    out = devicejpeg.decode_batch(batch, "cpu", errors="return")
    assert isinstance(out[0], torch.Tensor) and out[0].shape == (3, 160, 240)
    assert isinstance(out[1], DecodeError)
    assert str(out[1]).startswith("corrupt image: ") and "truncated" in str(out[1])
    assert ".cpp" not in str(out[1]) and "\n" not in str(out[1])
    assert str(out[2]) == "not a JPEG file (no FF D8 FF signature)"
    assert str(out[3]) == "empty file (0 bytes)"
    with pytest.raises(DecodeError, match=r"^image 1 of 2: corrupt image: .*truncated"):
        devicejpeg.decode_batch([good, truncated], "cpu")


def test_max_pixels_refuses_before_decoding(photo):
    data = as_tensor(jpeg_bytes(photo))
    with pytest.raises(DecodeError, match="decompression bomb: 240x160 pixels is over the "
                                          "--max-pixels limit of 1000"):
        devicejpeg.decode_batch([data], "cpu", max_pixels=1000)
    (img,) = devicejpeg.decode_batch([data], "cpu", max_pixels=240 * 160)
    assert img.shape == (3, 160, 240)


@pytest.mark.parametrize("crop", [False, True])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_preprocess_on_device_matches_data_preprocess(photo, crop, interpolation):
    (img,) = devicejpeg.decode_batch([as_tensor(jpeg_bytes(photo))], "cpu")
    pixels = hwc(img)  # the same decoded pixels for both
    ref, ref_box = preprocess(pixels.astype(np.float32) / 255.0, (64, 64), crop, 73, MEAN,
                              STD, interpolation)
    x, box = devicejpeg.preprocess_on_device(img, (64, 64), crop, 73, MEAN, STD,
                                             interpolation)
    assert box == ref_box
    assert x.shape == ref.shape == (3, 64, 64) and x.dtype == torch.float32
    assert (x - ref).abs().max().item() < 1e-5
    if not crop:
        assert box == Box(0, 0, 240, 160)


def test_blend_is_render_overlay_bit_for_bit(photo):
    rng = np.random.default_rng(0)
    heat = rng.integers(0, 256, photo.shape, dtype=np.uint8)
    for alpha in (0.0, 0.3, 0.5, 1.0):
        got = device_render.blend(torch.from_numpy(photo), torch.from_numpy(heat), alpha)
        assert np.array_equal(got.numpy(), render.overlay(photo, heat, alpha))


def test_encode_overlays_decode_back_to_render_overlay(photo):
    sal = np.outer(np.hanning(20), np.hanning(30)).astype(np.float32)
    h, w = photo.shape[:2]
    heat = render.colormap_table("inferno")[render.heatmap_indices(sal, w, h)]
    expected = render.overlay(photo, heat, 0.5)
    (img,) = devicejpeg.decode_batch([as_tensor(jpeg_bytes(photo))], "cpu")
    # originals as decode_batch gives them (CHW tensors) and as the writer holds them (HWC)
    for original in (img, hwc(img)):
        blobs = device_render.encode_overlays([original], [heat], 0.5, quality=90)
        assert len(blobs) == 1 and blobs[0][:3] == decode.JPEG_MAGIC
        with Image.open(io.BytesIO(blobs[0])) as back:
            got = np.asarray(back.convert("RGB")).astype(np.int16)
        exact = render.overlay(hwc(img), heat, 0.5).astype(np.int16)
        pillow = io.BytesIO()
        Image.fromarray(expected).save(pillow, "JPEG", quality=90)
        with Image.open(pillow) as ref:
            pillow_error = np.abs(np.asarray(ref).astype(np.int16) - expected).mean()
        error = np.abs(got - exact).mean()
        assert error < max(2.0, 2 * pillow_error), (error, pillow_error)


def test_encode_overlays_rejects_mismatched_inputs(photo):
    with pytest.raises(ValueError, match="1 originals but 0 heatmaps"):
        device_render.encode_overlays([photo], [], 0.5)
    with pytest.raises(ValueError, match=r"overlay 0: original is \(3, 160, 240\) but heatmap"):
        device_render.encode_overlays([photo], [photo[:10]], 0.5)
    assert device_render.encode_overlays([], [], 0.5) == []


def test_available_is_false_without_cuda():
    assert devicejpeg.available("cpu") is False
    assert devicejpeg.available(torch.device("cpu")) is False
    if not torch.cuda.is_available():
        assert devicejpeg.available("cuda") is False


# ------------------------------------------------------------------------------ CUDA

@pytest.mark.cuda
def test_cuda_available():
    assert devicejpeg.available("cuda")


@pytest.mark.cuda
def test_cuda_decode_matches_cpu_and_orients(photo):
    datas = [decode.file_bytes(PHOTOS / "rocket.jpg"),
             as_tensor(jpeg_bytes(photo, orientation=6)), as_tensor(jpeg_bytes(photo))]
    gpu = devicejpeg.decode_batch(datas, "cuda")
    cpu = devicejpeg.decode_batch(datas, "cpu")
    for g, c in zip(gpu, cpu):
        assert g.device.type == "cuda" and g.shape == c.shape
        assert (g.cpu().to(torch.int16) - c.to(torch.int16)).abs().float().mean() < 1.0


@pytest.mark.cuda
def test_cuda_corrupt_file_in_a_batch(photo):
    good = as_tensor(jpeg_bytes(photo))
    out = devicejpeg.decode_batch([good, good[: len(good) // 3].clone()], "cuda",
                                  errors="return")
    assert isinstance(out[0], torch.Tensor) and out[0].device.type == "cuda"
    assert isinstance(out[1], DecodeError) and str(out[1]).startswith("corrupt image: ")


@pytest.mark.cuda
def test_cuda_preprocess_and_overlays(photo):
    (img,) = devicejpeg.decode_batch([as_tensor(jpeg_bytes(photo))], "cuda")
    x, box = devicejpeg.preprocess_on_device(img, (64, 64), True, 73, MEAN, STD)
    ref, ref_box = devicejpeg.preprocess_on_device(img.cpu(), (64, 64), True, 73, MEAN, STD)
    assert box == ref_box and (x.cpu() - ref).abs().max().item() < 1e-4
    heat = torch.full_like(img, 128)
    (blob,) = device_render.encode_overlays([img], [heat], 0.5)
    with Image.open(io.BytesIO(blob)) as back:
        got = np.asarray(back.convert("RGB")).astype(np.int16)
    exact = render.overlay(hwc(img), hwc(heat), 0.5).astype(np.int16)
    assert np.abs(got - exact).mean() < 2.0


# ---------------------------------------------------------------- wired into `fullgrad dump`

def test_dump_with_device_jpeg_equals_the_pillow_path(tmp_path, images):
    """--device-jpeg forced on the CPU (torchvision's decoder and encoder take CPU tensors):
    the same tree as the default Pillow path, JPEG overlays encoded by the device path."""
    import json

    from PIL import Image
    from test_shards import comparable, dump

    device, pillow = tmp_path / "device", tmp_path / "pillow"
    first = dump(images, device, "--device-jpeg")
    assert dump(images, pillow).exit_code == first.exit_code == 1  # broken.jpg
    assert "broken.jpg: corrupt image:" in first.stderr
    assert json.loads((device / "run.json").read_text())["jpeg"] == "device"
    assert json.loads((pillow / "run.json").read_text())["jpeg"] == "pillow"
    a, b = comparable(device), comparable(pillow)
    assert a.pop(("broken.jpg", None))["status"] == b.pop(("broken.jpg", None))["status"]
    assert a.keys() == b.keys()
    for key in a:
        assert abs(a[key]["logit"] - b[key]["logit"]) <= 1e-3 * max(1, abs(b[key]["logit"]))
        assert a[key]["target"] == b[key]["target"] and a[key]["outputs"] == b[key]["outputs"]
    for jpg in (p for p in images.rglob("*.jpg") if p.name != "broken.jpg"):
        rel = jpg.relative_to(images).as_posix()
        with Image.open(device / "overlays" / f"{rel}.jpg") as ov, Image.open(jpg) as src:
            assert ov.format == "JPEG" and ov.size == src.size
        with Image.open(pillow / "overlays" / f"{rel}.jpg") as other:
            mine = np.asarray(Image.open(device / "overlays" / f"{rel}.jpg"), dtype=np.int16)
            assert np.abs(mine - np.asarray(other, dtype=np.int16)).mean() < 2.0
