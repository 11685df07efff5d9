"""Overlays blended and JPEG-encoded on the model's device (nvjpeg on CUDA)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _chw(image: torch.Tensor | np.ndarray, device: torch.device, what: str) -> torch.Tensor:
    """(3, H, W) uint8 on ``device`` from a (3, H, W) tensor or an (H, W, 3) array."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"{what}: expected an (H, W, 3) uint8 array, got "
                             f"{image.dtype} {image.shape}")
        if not image.flags.writeable:  # e.g. render.colormapped's: torch wants writable
            image = image.copy()
        return torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"{what}: expected a (3, H, W) uint8 tensor, got "
                         f"{image.dtype} {tuple(image.shape)}")
    return image.to(device)


def blend(original: torch.Tensor, heat: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * original + alpha * heat`` for uint8 tensors of one shape, on their
    device, bit for bit as :func:`fgcli.render.overlay` (integer 1/256 steps, rounded)."""
    a = round(alpha * 256)
    mixed = original.to(torch.int32) * (256 - a) + heat.to(torch.int32) * a + 128
    return (mixed >> 8).to(torch.uint8)


def blend_heat(original: torch.Tensor, heat: torch.Tensor, indices: torch.Tensor,
               alpha: float) -> torch.Tensor:
    """``(1 - w) * original + w * heat`` with ``w = min(1, 2 * alpha * indices / 255)`` per
    pixel, for (3, H, W) uint8 images and (H, W) uint8 colormap indices on one device, bit
    for bit as :func:`fgcli.render.overlay_heat` (the same 1/256-step weight table)."""
    from fgcli.render import heat_weights

    table = torch.from_numpy(heat_weights(alpha)).to(original.device)
    w = table[indices.to(original.device, torch.int64)][None]
    mixed = original.to(torch.int32) * (256 - w) + heat.to(torch.int32) * w + 128
    return (mixed >> 8).to(torch.uint8)


def _encode_jpegs(images: list[torch.Tensor], quality: int) -> list[torch.Tensor]:
    """One torchvision call: nvjpeg's batched encode for CUDA tensors."""
    from torchvision.io import encode_jpeg

    return encode_jpeg([img.contiguous() for img in images], quality=quality)


def encode_overlays(originals: Sequence[torch.Tensor | np.ndarray],
                    heats: Sequence[torch.Tensor | np.ndarray], alpha: float,
                    quality: int = 90, device: str | torch.device | None = None, *,
                    style: str = "blend",
                    indices: Sequence[torch.Tensor | np.ndarray] | None = None
                    ) -> list[bytes]:
    """Blend each original with its heatmap and encode the overlays as JPEG bytes.

    originals, heats: uint8 images of equal sizes, each a (3, H, W) tensor (as
    :func:`decode_batch` returns; any device) or an (H, W, 3) array (as the writer
    holds them, e.g. ``colormap_table(name)[heatmap_indices(...)]``). They are moved
    to ``device`` (default: the first original's device), blended there with
    :func:`blend` and encoded in one batched call (nvjpeg on CUDA). Returns the
    JPEG files' bytes, in order; quality 90 as ``writer.write_jpeg``.

    style: ``blend`` (:func:`blend`, uniform alpha) or ``heat`` (:func:`blend_heat`, the
    heat weighted by saliency); ``heat`` needs each image's (H, W) uint8 colormap
    ``indices`` (:func:`fgcli.render.heatmap_indices`), as arrays or tensors.
    """
    from fgcli.config import OVERLAY_STYLES

    if style not in OVERLAY_STYLES:
        raise ValueError(f"unknown overlay style {style!r}; choose from "
                         f"{', '.join(OVERLAY_STYLES)}")
    if style == "heat" and (indices is None or len(indices) != len(originals)):
        raise ValueError(f"style heat needs one indices map per original, got "
                         f"{'none' if indices is None else len(indices)} for {len(originals)}")
    if len(originals) != len(heats):
        raise ValueError(f"{len(originals)} originals but {len(heats)} heatmaps")
    if not originals:
        return []
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be 1..100, not {quality}")
    if device is None:
        first = originals[0]
        device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    overlays = []
    for i, (original, heat) in enumerate(zip(originals, heats)):
        o = _chw(original, device, f"original {i}")
        h = _chw(heat, device, f"heatmap {i}")
        if o.shape != h.shape:
            raise ValueError(f"overlay {i}: original is {tuple(o.shape)} but heatmap is "
                             f"{tuple(h.shape)}")
        if style == "blend":
            overlays.append(blend(o, h, alpha))
            continue
        idx = indices[i]
        idx = torch.from_numpy(np.ascontiguousarray(idx)) if isinstance(idx, np.ndarray) else idx
        if idx.dtype != torch.uint8 or tuple(idx.shape) != tuple(o.shape[1:]):
            raise ValueError(f"overlay {i}: expected ({o.shape[1]}, {o.shape[2]}) uint8 "
                             f"indices, got {idx.dtype} {tuple(idx.shape)}")
        overlays.append(blend_heat(o, h, idx, alpha))
    return [t.cpu().numpy().tobytes() for t in _encode_jpegs(overlays, quality)]
