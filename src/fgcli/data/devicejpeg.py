"""JPEG decode, preprocessing and overlay encoding on the model's device.

Used by ``fullgrad dump`` when ``--device-jpeg`` is on (by default: on a CUDA device where
:func:`available` says nvjpeg works): :class:`fgcli.data.decode.ImageDataset` hands JPEGs over as
bytes, :func:`decode_into` turns a batch's bytes into model input on the device, and the
writer encodes overlays with :func:`encode_overlays`. On a GPU box the CPU stages of a dump
(Pillow decode, float conversion and resize at full resolution, overlay blend
and JPEG encode) cost more core-time per image than the engine costs GPU-time
(``docs/scaling-analysis.md``). This module moves the JPEG part of that work to
the GPU with torchvision's nvjpeg bindings:

* DataLoader workers only read file bytes (:func:`file_bytes`), and route files
  that are not JPEG (:func:`is_jpeg`) to the Pillow path of :mod:`fgcli.data.decode`;
* the main process decodes a batch of JPEGs on the device in one call
  (:func:`decode_batch`), EXIF orientation applied, corrupt files reported one by
  one, with the same ``--max-pixels`` guard as the Pillow path;
* :func:`preprocess_on_device` resizes and normalises each image on the device and
  returns the same tensor and :class:`~fgcli.data.decode.Box` as
  :func:`fgcli.data.decode.preprocess` (same maths: antialiased interpolation of
  ``uint8 / 255`` floats);
* the uint8 originals stay on the device for the overlays; each writer thread
  sends its image's colormapped heatmap (built on the CPU, as for the heatmap PNG)
  to the device, where :func:`encode_overlays` blends it exactly as
  :func:`fgcli.render.overlay` does (integer 1/256 steps of alpha; with ``--overlay heat``
  as :func:`fgcli.render.overlay_heat`, from the heatmap's indices) and encodes it;
  only the JPEG's bytes come back. (The function takes lists, so a batched encode is
  one call away; the writer encodes image by image, as it writes them.)

Everything here runs on the CPU too, because torchvision's ``decode_jpeg`` and
``encode_jpeg`` take CPU tensors: that is how it is tested without a GPU. But
on the CPU it is no faster than Pillow, so :func:`available` says to use it only
on a CUDA device where torchvision's GPU decode actually works; the Pillow path
stays the default everywhere else.

Decoders differ: nvjpeg, torchvision's libjpeg and Pillow's libjpeg-turbo may
disagree by a grey level or two (IDCT and chroma upsampling), so maps from the
two paths agree to float noise, not bit for bit.

torchvision 0.29 marks its image codecs as deprecated in favour of TorchCodec;
its deprecation warning for the calls made here is silenced by a filter that
matches only that message. A later move to TorchCodec changes only
``_decode_jpegs`` and ``_encode_jpegs``.
"""

from __future__ import annotations

import functools
import re
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fgcli.data.decode import Batch, Box, DecodeError, is_jpeg, resize_normalise

__all__ = [
    "JpegHeader",
    "apply_orientation",
    "available",
    "decode_batch",
    "jpeg_header",
    "preprocess_on_device",
]


warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision",
    category=DeprecationWarning)

# torchvision prefixes its C++ errors with "function, /path/file.cpp:123, "
_SOURCE_PREFIX = re.compile(r"^\s*[\w.:]+, \S+:\d+, ")


# ------------------------------------------------------------------------------ inputs



@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG's markers say before decoding: size (None if no frame header was
    found) and EXIF orientation (1..8; 1 when absent or unreadable)."""

    width: int | None
    height: int | None
    orientation: int


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _exif_orientation(payload: bytes) -> int:
    """Orientation tag (0x0112) of IFD0 in an APP1 ``Exif\\0\\0`` payload; 1 if none."""
    if not payload.startswith(b"Exif\x00\x00"):
        return 1
    tiff = payload[6:]
    if tiff[:4] == b"II*\x00":
        order = "<"
    elif tiff[:4] == b"MM\x00*":
        order = ">"
    else:
        return 1
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for i in range(count):
            tag, kind, _, value = struct.unpack_from(order + "HHI4s", tiff, ifd + 2 + 12 * i)
            if tag == 0x0112 and kind == 3:  # SHORT, stored in the first 2 value bytes
                (orientation,) = struct.unpack_from(order + "H", value)
                return orientation if 1 <= orientation <= 8 else 1
    except struct.error:
        pass
    return 1


def jpeg_header(data: bytes | torch.Tensor) -> JpegHeader:
    """Parse the markers up to the first scan: frame size and EXIF orientation.

    Cheap (no entropy decoding): it lets :func:`decode_batch` refuse a decompression
    bomb before allocating it, and apply EXIF orientation on devices whose decoder
    does not (torchvision applies it on the CPU only).
    """
    buf = memoryview(data.cpu().numpy() if isinstance(data, torch.Tensor) else data)
    width = height = None
    orientation = 1
    pos, end = 2, len(buf)
    while pos + 4 <= end:
        if buf[pos] != 0xFF:
            break  # not at a marker: a corrupt header; the decoder will say so
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", buf, pos + 2)
        segment = buf[pos + 4:pos + 2 + length]
        if marker == 0xE1 and orientation == 1:
            orientation = _exif_orientation(bytes(segment))
        elif marker in _SOF and len(segment) >= 5 and width is None:
            height, width = struct.unpack_from(">HH", segment, 1)
        elif marker == 0xDA:  # start of scan: no more headers
            break
        pos += 2 + length
    return JpegHeader(width, height, orientation)


def apply_orientation(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Turn a decoded (C, H, W) image upright for an EXIF orientation (1..8).

    The same transforms as Pillow's ``ImageOps.exif_transpose`` and torchvision's
    ``apply_exif_orientation``; plain tensor ops, so they run on any device.
    """
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-2, -1)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-2, -1)
    if orientation == 6:
        return img.rot90(-1, dims=(-2, -1))
    if orientation == 7:
        return img.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return img.rot90(1, dims=(-2, -1))
    return img


# ------------------------------------------------------------------------------ decoding

def _reason(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = _SOURCE_PREFIX.sub("", lines[0]).strip() if lines else type(exc).__name__
    return text


def _decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """One torchvision call for the whole list: nvjpeg's batched decode on CUDA."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda":
        images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        # torchvision applies EXIF orientation on the CPU only: do it here
        return [apply_orientation(img, jpeg_header(d).orientation)
                for img, d in zip(images, datas)]
    images = decode_jpeg(datas, mode=ImageReadMode.RGB, device="cpu",
                         apply_exif_orientation=True)
    return [img.to(device) for img in images]


def _check(data: torch.Tensor, max_pixels: int | None) -> str | None:
    """Why these bytes cannot be decoded as a JPEG, before trying; None if they may be."""
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
        return "unsupported input: expected the file's bytes as a 1-D uint8 tensor"
    if data.numel() == 0:
        return "empty file (0 bytes)"
    if not is_jpeg(data):
        return "not a JPEG file (no FF D8 FF signature)"
    if max_pixels is not None:
        header = jpeg_header(data)
        if header.width is not None and header.width * header.height > max_pixels:
            return (f"decompression bomb: {header.width}x{header.height} pixels is over the "
                    f"--max-pixels limit of {max_pixels}")
    return None


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | DecodeError:
    try:
        return _decode_jpegs([data], device)[0]
    except (RuntimeError, ValueError) as exc:
        if device.type != "cuda":
            return DecodeError(f"corrupt image: {_reason(exc)}")
        gpu_reason = _reason(exc)
    # nvjpeg rejects some valid files (unusual sampling, colour spaces): the CPU
    # decoder decides whether the file is really corrupt
    try:
        return _decode_jpegs([data], torch.device("cpu"))[0].to(device)
    except (RuntimeError, ValueError) as exc:
        return DecodeError(f"corrupt image: {_reason(exc)} (on {device}: {gpu_reason})")


def decode_batch(datas: Sequence[torch.Tensor], device: str | torch.device, *,
                 max_pixels: int | None = None,
                 errors: Literal["raise", "return"] = "raise"
                 ) -> list[torch.Tensor | DecodeError]:
    """Decode JPEG file bytes to upright (3, H, W) uint8 RGB tensors on ``device``.

    datas: each file's bytes as a 1-D uint8 CPU tensor (:func:`file_bytes`).
    On CUDA all files go to nvjpeg in one batched call. When that call fails (it
    returns nothing then), each file is decoded alone to find the culprits, and a
    file nvjpeg rejects is tried on the CPU before it is called corrupt.
    Grayscale and CMYK JPEGs come out as RGB. ``max_pixels`` refuses frames larger
    than that from the header, before decoding (``--max-pixels``).

    errors="raise": the first bad file raises :class:`fgcli.data.decode.DecodeError`
    naming its position (``image 3 of 8: corrupt image: ...``). errors="return": a
    bad file's slot holds its DecodeError (one-line reason, same wording as the
    Pillow path) and the other images are returned.
    """
    if errors not in ("raise", "return"):
        raise ValueError(f"errors must be 'raise' or 'return', not {errors!r}")
    device = torch.device(device)
    results: list[torch.Tensor | DecodeError | None] = [None] * len(datas)
    todo: list[int] = []
    for i, data in enumerate(datas):
        reason = _check(data, max_pixels)
        if reason is None:
            todo.append(i)
        else:
            results[i] = DecodeError(reason)
    if todo:
        try:
            images = _decode_jpegs([datas[i] for i in todo], device)
        except (RuntimeError, ValueError):
            images = [_decode_one(datas[i], device) for i in todo]
        for i, image in zip(todo, images):
            results[i] = image
    if errors == "raise":
        for i, result in enumerate(results):
            if isinstance(result, DecodeError):
                raise DecodeError(f"image {i} of {len(results)}: {result}")
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------ preprocessing

def preprocess_on_device(img: torch.Tensor, size: tuple[int, int], crop: bool, resize: int,
                         mean: tuple[float, ...], std: tuple[float, ...],
                         interpolation: str = "bilinear") -> tuple[torch.Tensor, Box]:
    """:func:`fgcli.data.decode.preprocess` for a decoded (3, H, W) uint8 image on any device.

    The same maths in the same order: ``uint8 / 255`` as float32, antialiased
    ``interpolate`` (squash to ``size``, or shorter side to ``resize`` then a centre
    crop), clamp to [0, 1], normalise. On the CPU it matches data.preprocess on the
    same pixels to float rounding; the Box is identical.
    """
    if img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {tuple(img.shape)}")
    t = (img.to(torch.float32) / 255.0)[None]
    return resize_normalise(t, size, crop, resize, mean, std, interpolation)


def decode_into(batch: Batch, device: torch.device, args: tuple[Any, ...],
                keep_original: bool, max_pixels: int) -> Batch:
    """A batch whose JPEGs are still bytes, as one whose input is all on ``device``.

    ``args`` are :class:`fgcli.data.decode.ImageDataset`'s preprocessing arguments (size, crop,
    resize, mean, std, interpolation). Samples decoded by Pillow (other formats) join
    the device-decoded ones; a JPEG that does not decode becomes a Failure with its
    one-line reason; originals of device-decoded images stay on the device, (3, H, W),
    for :func:`encode_overlays`.
    """
    from fgcli.data.decode import Failure, Sample

    images = decode_batch([e.data for e in batch.encoded], device, max_pixels=max_pixels,
                          errors="return")
    samples, rows, failures = [], [], list(batch.failures)
    if batch.x is not None:
        samples.extend(batch.samples)
        rows.append(batch.x.to(device, non_blocking=True))
    decoded = []
    for encoded, image in zip(batch.encoded, images):
        if isinstance(image, Exception):
            failures.append(Failure(encoded.index, str(image)))
            continue
        x, box = preprocess_on_device(image, *args)
        original = None
        if keep_original:  # a crop's copy, so the whole frame is not kept for the writer
            original = image[:, box.top:box.bottom, box.left:box.right]
            if original.shape != image.shape:
                original = original.clone()
        decoded.append(x)
        samples.append(Sample(encoded.index, torch.empty(0), original, box, on_device=True))
    if decoded:
        rows.append(torch.stack(decoded))
    x = torch.cat(rows) if rows else None
    return Batch(x, samples, failures)


# ------------------------------------------------------------------------------ overlays



# ------------------------------------------------------------------------------ choice

def available(device: str | torch.device) -> bool:
    """Whether to use this path on ``device``: only a CUDA device where torchvision's
    nvjpeg decode and encode work (probed once per device on a tiny image).

    False on the CPU (Pillow is as fast there and is the reference), on MPS, and
    where the CUDA build or driver cannot run nvjpeg.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _probe(index)


@functools.cache
def _probe(index: int) -> bool:
    device = torch.device("cuda", index)
    try:
        from torchvision.io import encode_jpeg

        tiny = torch.arange(3 * 16 * 16, dtype=torch.int64).reshape(3, 16, 16) % 251
        data = encode_jpeg(tiny.to(torch.uint8), quality=90)
        (image,) = _decode_jpegs([data], device)
        encoded = encode_jpeg([image.contiguous()], quality=90)[0]  # the overlays' encode
        return (image.device == device and tuple(image.shape) == (3, 16, 16)
                and encoded.numel() > 0)
    except Exception:  # noqa: BLE001 - any failure means: use the Pillow path
        return False
