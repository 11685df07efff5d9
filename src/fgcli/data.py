"""Finding images, decoding them, and batching them. No model code here.

Discovery rules (documented in the README):

* a directory argument is walked recursively in sorted order; files whose
  extension Pillow reads are kept (case-insensitive); symlinked directories are
  followed once (loops are cut); a *directory* whose name has an image
  extension inside a walk (``x.png/``) is reported as a failure, not entered;
* a file argument is taken as it is, whatever its extension;
* ``-`` reads paths from stdin, ``--files-from FILE`` from a file, one per line
  (``--null``: NUL-separated, for names containing newlines).

Each input gets a *key*, the relative path its outputs mirror: relative to
the directory argument it was found in (prefixed with that directory's name
when several inputs are given), the file name for a file argument, and for
listed paths the path relative to the working directory (or the absolute
path without its root). Two inputs with the same key would overwrite each
other's outputs, so the second one fails.

Names are bytes on POSIX and any name the OS allows is taken: non-UTF-8 bytes, newlines,
control characters, leading dashes. ``Item.path`` is the OS string (undecodable bytes
held as surrogates, as ``os.fsdecode`` gives them; lists are read as bytes the same way),
and the key is valid Unicode text where each byte that is not UTF-8 is written ``\\xNN``
(:func:`fgcli.names.text`), so output files get valid UTF-8 names and a name is never
lost: the manifest's ``input`` is that text too, and ``input_bytes`` (base64 of the raw
path) is added for such names only (:func:`fgcli.names.record_fields`). A real
``\\xff`` in one name and the byte 0xff in another give the same key: the second fails
as above. A failure for a taken key (that one, or an unreadable input's) is recorded under
that key plus ``~dup-`` and a hash of its path (:func:`fgcli.names.duplicate_key`): the
manifest keeps one line per key, and both images keep theirs.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from fgcli import names

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff",
     ".gif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k", ".pcx", ".sgi",
     ".qoi", ".dds", ".avif", ".heic"}
)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey block


@dataclass(frozen=True)
class Item:
    """One input: where it is, the relative name its outputs mirror, or why it failed."""

    path: str
    key: str
    error: str | None = None


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _os_reason(exc: OSError) -> str:
    import errno

    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ENOENT:
        return "no such file (or a broken symlink)"
    return exc.strerror or str(exc)


def _walk(root: Path, prefix: str, seen: set[str]) -> Iterator[Item]:
    try:
        real = os.path.realpath(root)
        if real in seen:
            return  # a symlinked directory we already walked (or the output tree): skip
        seen.add(real)
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        yield Item(str(root), prefix or root.name, f"cannot list directory: {_os_reason(exc)}")
        return
    for entry in entries:
        key = f"{prefix}/{entry.name}" if prefix else entry.name
        path = Path(entry.path)
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
            is_file = entry.is_file(follow_symlinks=True)
        except OSError as exc:
            is_dir = is_file = False
            if _is_image_name(entry.name):
                yield Item(str(path), key, _os_reason(exc))
                continue
        if is_dir:
            if _is_image_name(entry.name):
                yield Item(str(path), key, "is a directory, not an image file (pass it as "
                                           "an argument of its own to process its contents)")
            else:
                yield from _walk(path, key, seen)
        elif _is_image_name(entry.name):
            if is_file:
                yield Item(str(path), key)
            elif entry.is_symlink():
                try:
                    os.stat(path)
                    reason = "not a regular file"
                except OSError as exc:
                    reason = _os_reason(exc)
                yield Item(str(path), key, reason)
            else:
                yield Item(str(path), key, "not a regular file")


def _listed_key(path: str) -> str:
    p = Path(path)
    absolute = Path(os.path.abspath(p))
    try:
        return absolute.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return absolute.relative_to(absolute.anchor).as_posix()


def _read_list(stream: io.TextIOBase | Any, null: bool) -> Iterator[str]:
    """The paths of a list (one a line, or NUL-separated), read as bytes where the stream
    has them: a name that is not UTF-8 becomes the OS string ``os.fsdecode`` gives."""
    source = getattr(stream, "buffer", stream)
    read = getattr(source, "read1", None) or source.read  # what is there: lists may be endless
    sep = b"\0" if null else b"\n"
    buf = b""
    while True:
        chunk = read(65536)
        if not chunk:
            break
        buf += chunk if isinstance(chunk, bytes) else os.fsencode(chunk)
        *parts, buf = buf.split(sep)
        yield from _list_names(parts, null)
    yield from _list_names([buf], null)


def _list_names(parts: list[bytes], null: bool) -> Iterator[str]:
    """The OS paths of a list's entries; blank lines (not NUL-separated names) skipped."""
    for part in parts:
        if not null:
            part = part.rstrip(b"\r")
        if part.strip() if not null else part:
            yield os.fsdecode(part)


def _listed_item(path: str) -> Item:
    key = _listed_key(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        return Item(path, key, _os_reason(exc))
    if os.path.isdir(path):
        return Item(path, key, "is a directory, not an image file")
    import stat as stat_mod

    if not stat_mod.S_ISREG(st.st_mode):
        return Item(path, key, "not a regular file")
    return Item(path, key)


def discover(inputs: Iterable[str], files_from: str | None = None, null: bool = False,
             stdin: Any = None, exclude: str | None = None,
             on_empty: Callable[[str], None] | None = None) -> Iterator[Item]:
    """Every input image in a deterministic order, lazily (a list may be endless).

    ``exclude``: a directory never walked into (the output tree, so that
    ``fullgrad dump . --out ./saliency`` does not read its own heatmaps back).
    ``on_empty``: told, in one line, of each input that yielded nothing (a directory
    without image files, an empty list).
    """
    inputs = list(inputs)
    several = len(inputs) + (files_from is not None) > 1
    used: dict[str, str] = {}

    def unique(item: Item) -> Item:
        item = Item(item.path, names.text(item.key), item.error)  # the module docstring
        other = used.get(item.key)
        if other is not None and other != item.path:  # its line must not replace the other's
            return Item(item.path, names.duplicate_key(item.key, item.path), item.error or
                        f"output name {item.key!r} is already used by {names.display(other)}")
        if item.error is None:  # an input that cannot be read claims no name
            used[item.key] = item.path
        return item

    def empty(what: str) -> None:
        if on_empty is not None:
            on_empty(what)

    for arg in inputs:
        count = 0
        if arg == "-":
            for path in _read_list(stdin if stdin is not None else sys.stdin, null):
                count += 1
                yield unique(_listed_item(path))
            if not count:
                empty("-: stdin listed no paths")
            continue
        p = Path(arg)
        if p.is_dir():
            prefix = p.resolve().name if several else ""
            skip = {os.path.realpath(exclude)} if exclude else set()
            for item in _walk(p, prefix, skip):
                count += 1
                yield unique(item)
            if not count:
                empty(f"{names.display(arg)}: no image files in this directory (extensions: "
                      ".jpg, .png, .webp, ... see the README)")
        else:
            item = _listed_item(arg)  # not a FIFO or device: reading one would hang
            yield unique(Item(item.path, p.name, item.error))
    if files_from is not None:
        try:
            fh = open(files_from, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            yield unique(Item(files_from, Path(files_from).name,
                              f"--files-from: {_os_reason(exc)}"))
            return
        count = 0
        with fh:
            for path in _read_list(fh, null):
                count += 1
                yield unique(_listed_item(path))
        if not count:
            empty(f"--files-from {names.display(files_from)}: the file lists no paths")


# ---------------------------------------------------------------------------- decoding

class DecodeError(Exception):
    """An image that cannot be turned into model input; the message is one line."""


def _to_rgb_float(img: Image.Image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] for any Pillow mode; alpha composited over white."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img, dtype=np.float32)
        scale = 65535.0 if mode != "I" or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / scale, 0.0, 1.0)
        return np.repeat(arr[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if arr.max(initial=0) > 1.0:
            arr = arr / 255.0
        return np.repeat(np.clip(arr, 0.0, 1.0)[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode in ("P", "L", "RGB") and "transparency" in img.info)
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        a = rgba[..., 3:4]
        return rgba[..., :3] * a + (1.0 - a)
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def decode(path: str, max_pixels: int) -> np.ndarray:
    """Read an image as (H, W, 3) float32 RGB in [0, 1], EXIF orientation applied."""
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
                try:
                    img = ImageOps.exif_transpose(img)
                except Exception:  # noqa: BLE001 - broken EXIF: keep the stored orientation
                    pass
                return _to_rgb_float(img)
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
            raise DecodeError(_os_reason(exc)) from exc
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
    process (``--device-jpeg``; see :mod:`fgcli.devicejpeg`)."""

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
            from fgcli.devicejpeg import file_bytes, is_jpeg

            try:
                data = file_bytes(self.items[index].path)
                if is_jpeg(data):
                    return Encoded(index, data)
            except OSError:
                pass  # the Pillow path below words the error
        try:
            rgb = decode(self.items[index].path, self.max_pixels)
            x, box = preprocess(rgb, *self.args)
            original = None
            if self.keep_original:
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

    def pin_memory(self) -> "Batch":
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
