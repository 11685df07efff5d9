"""Decoding images (Pillow, EXIF orientation, pixel limits), preprocessing and batching.

No model code here. Which files are inputs and their keys: :mod:`fgcli.data.discover.discover`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from fgcli.data.discover import Item, os_reason

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey block


# ---------------------------------------------------------------------------- decoding

class DecodeError(Exception):
    """An image that cannot be turned into model input; the message is one line."""


def _to_rgb_float(img: Image.Image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] for any Pillow mode; alpha composited over white."""
    return _to_rgb(img)[0]


def _to_rgb(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`_to_rgb_float`'s pixels and, for 8-bit images without alpha, the (H, W, 3)
    uint8 pixels they came from (read-only; None for other modes), which are exactly
    ``(float * 255 + 0.5)`` as uint8, without that pass."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img, dtype=np.float32)
        scale = 65535.0 if mode != "I" or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / scale, 0.0, 1.0)
        return np.repeat(arr[..., None], 3, axis=2), None
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if arr.max(initial=0) > 1.0:
            arr = arr / 255.0
        return np.repeat(np.clip(arr, 0.0, 1.0)[..., None], 3, axis=2), None
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode in ("P", "L", "RGB") and "transparency" in img.info)
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        a = rgba[..., 3:4]
        return rgba[..., :3] * a + (1.0 - a), None
    pixels = np.asarray(img.convert("RGB"))
    rgb = pixels.astype(np.float32)
    rgb /= 255.0
    return rgb, pixels


def decode(path: str, max_pixels: int) -> np.ndarray:
    """Read an image as (H, W, 3) float32 RGB in [0, 1], EXIF orientation applied."""
    return decode_pixels(path, max_pixels)[0]


def decode_pixels(path: str, max_pixels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`decode`, and the uint8 pixels when the file has plain 8-bit ones
    (:func:`_to_rgb`): the overlay's original without a float round trip."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open(path, "rb") as fh:
                img = Image.open(fh)
                w, h = img.size
                if w * h > max_pixels:
                    raise DecodeError(f"decompression bomb: {w}x{h} pixels is over the "
                                      f"--max-pixels limit of {max_pixels}")
                img.load()
                with contextlib.suppress(Exception):  # broken EXIF: the stored orientation
                    img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"decompression bomb: {exc}".split(". ")[0]) from exc
    except UnidentifiedImageError as exc:
        size = os.path.getsize(path) if os.path.exists(path) else -1
        raise DecodeError("empty file (0 bytes)" if size == 0
                          else "not an image Pillow can read") from exc
    except IsADirectoryError as exc:
        raise DecodeError("is a directory, not an image file") from exc
    except OSError as exc:
        if exc.errno is not None:
            raise DecodeError(os_reason(exc)) from exc
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        raise DecodeError(f"corrupt image: {message}") from exc
    except (SyntaxError, EOFError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DecodeError(f"corrupt image: {message}") from exc
    except (ValueError, MemoryError) as exc:  # e.g. a colour mode Pillow cannot convert
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DecodeError(f"unsupported image: {message}") from exc


@dataclass(frozen=True)
class Box:
    """The region of the original image the model saw: (left, top, right, bottom)."""

    left: int
    top: int
    right: int
    bottom: int


def preprocess(rgb: np.ndarray, size: tuple[int, int], crop: bool, resize: int,
               mean: tuple[float, ...], std: tuple[float, ...],
               interpolation: str = "bilinear") -> tuple[torch.Tensor, Box]:
    """Model input (3, h, w) and the region of the original it covers.

    Default: squash the whole image to ``size`` (the map covers every pixel).
    ``crop``: resize the shorter side to ``resize``, then centre-crop ``size``.
    ``interpolation``: ``bilinear`` or ``bicubic`` (the model's own preprocessing says
    which), antialiased when shrinking, as PIL and torchvision's transforms do.
    """
    t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    return resize_normalise(t, size, crop, resize, mean, std, interpolation)


def resize_normalise(t: torch.Tensor, size: tuple[int, int], crop: bool, resize: int,
                     mean: tuple[float, ...], std: tuple[float, ...],
                     interpolation: str = "bilinear") -> tuple[torch.Tensor, Box]:
    """:func:`preprocess` from a (1, 3, H, W) float tensor in [0, 1] on any device (the
    Pillow path and ``--device-jpeg`` share it, so both give the same input and Box)."""
    import torch.nn.functional as F

    h, w = int(t.shape[2]), int(t.shape[3])
    if crop:
        scale = resize / min(h, w)
        rh, rw = max(size[0], round(h * scale)), max(size[1], round(w * scale))
        t = F.interpolate(t, size=(rh, rw), mode=interpolation, align_corners=False,
                          antialias=True)
        top, left = (rh - size[0]) // 2, (rw - size[1]) // 2
        t = t[:, :, top:top + size[0], left:left + size[1]]
        box = Box(round(left / rw * w), round(top / rh * h),
                  round((left + size[1]) / rw * w), round((top + size[0]) / rh * h))
    else:
        t = F.interpolate(t, size=size, mode=interpolation, align_corners=False,
                          antialias=True)
        box = Box(0, 0, w, h)
    t = t[0].clamp_(0.0, 1.0)
    m = torch.tensor(mean, dtype=torch.float32, device=t.device)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32, device=t.device)[:, None, None]
    return (t - m) / s, box


@dataclass
class Sample:
    index: int
    x: torch.Tensor
    original: torch.Tensor | None  # (H, W, 3) uint8 of the box, for overlays
    box: Box
    on_device: bool = False  # original is (3, H, W) on the model's device (--device-jpeg)


@dataclass
class Encoded:
    """A JPEG file's bytes (1-D uint8), to be decoded on the model's device in the main
    process (``--device-jpeg``; see :mod:`fgcli.data.devicejpeg`)."""

    index: int
    data: torch.Tensor


@dataclass
class Failure:
    index: int
    error: str


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses one chunk of items (in DataLoader workers)."""

    def __init__(self, items: list[Item], size: tuple[int, int], crop: bool, resize: int,
                 mean: tuple[float, ...], std: tuple[float, ...], keep_original: bool,
                 max_pixels: int, interpolation: str = "bilinear",
                 encoded_jpeg: bool = False) -> None:
        self.items = items
        self.args = (size, crop, resize, mean, std, interpolation)
        self.keep_original = keep_original
        self.max_pixels = max_pixels
        self.encoded_jpeg = encoded_jpeg  # JPEGs leave as bytes; other formats decode here

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample | Failure | Encoded:
        if self.encoded_jpeg:
            from fgcli.data.decode import file_bytes, is_jpeg

            try:
                data = file_bytes(self.items[index].path)
                if is_jpeg(data):
                    return Encoded(index, data)
            except OSError:
                pass  # the Pillow path below words the error
        try:
            rgb, pixels = decode_pixels(self.items[index].path, self.max_pixels)
            x, box = preprocess(rgb, *self.args)
            original = None
            if self.keep_original and pixels is not None:
                original = torch.from_numpy(np.array(
                    pixels[box.top:box.bottom, box.left:box.right], order="C"))
            elif self.keep_original:
                region = rgb[box.top:box.bottom, box.left:box.right]
                original = torch.from_numpy((region * 255.0 + 0.5).astype(np.uint8))
            return Sample(index, x, original, box)
        except DecodeError as exc:
            return Failure(index, str(exc))
        except Exception as exc:  # noqa: BLE001 - one bad image never stops the run
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return Failure(index, f"{type(exc).__name__}: {text}".rstrip(": "))


@dataclass
class Batch:
    x: torch.Tensor | None  # (n, 3, h, w) of the samples that decoded
    samples: list[Sample]
    failures: list[Failure]
    encoded: list[Encoded] = field(default_factory=list)  # JPEGs still to decode

    def pin_memory(self) -> Batch:
        if self.x is not None:
            self.x = self.x.pin_memory()
        return self


def collate(results: list[Sample | Failure | Encoded]) -> Batch:
    samples = [r for r in results if isinstance(r, Sample)]
    failures = [r for r in results if isinstance(r, Failure)]
    encoded = [r for r in results if isinstance(r, Encoded)]
    x = torch.stack([s.x for s in samples]) if samples else None
    for s in samples:
        s.x = torch.empty(0)  # the batch tensor holds the data now
    return Batch(x, samples, failures, encoded)


JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(source: str | os.PathLike[str] | bytes | bytearray | memoryview | torch.Tensor
            ) -> bool:
    """Whether a file (path) or its bytes start with the JPEG magic ``FF D8 FF``.

    The extension is not looked at: a ``.png`` that is really a JPEG is a JPEG. An
    unreadable path is not a JPEG (the Pillow path then reports why).
    """
    if isinstance(source, torch.Tensor):
        head = bytes(source[:3].cpu().numpy().tobytes()) if source.dtype == torch.uint8 else b""
    elif isinstance(source, (bytes, bytearray, memoryview)):
        head = bytes(source[:3])
    else:
        try:
            with open(source, "rb") as fh:
                head = fh.read(3)
        except OSError:
            return False
    return head == JPEG_MAGIC


def file_bytes(path: str | os.PathLike[str]) -> torch.Tensor:
    """A file's bytes as a 1-D uint8 CPU tensor (what :func:`decode_batch` takes)."""
    data = np.fromfile(path, dtype=np.uint8)
    return torch.from_numpy(data)
