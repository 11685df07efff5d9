"""A computed batch on its way to the host: scores, maps (asynchronously on CUDA), the
maps' statistics (computed on their device), the decomposition arrays, and per image why
it has no finite result."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fgcli.audit.stats import map_stats


class MapOf:
    """One image's map from a :class:`DeviceMaps`, materialised in the writer thread."""

    def __init__(self, maps: DeviceMaps, j: int) -> None:
        self.maps, self.j = maps, j

    def __call__(self) -> np.ndarray:
        return self.maps.image(self.j)



class DeviceMaps:
    """A batch of maps on their way to the host.

    On CUDA the copy goes into pinned memory with ``non_blocking=True`` and an
    event; writer threads wait for that event, so the next batch is queued on
    the device while the maps are still in flight. Elsewhere it is a plain copy.
    """

    def __init__(self, maps: torch.Tensor) -> None:
        maps = maps.detach().float()
        self.event = None
        if maps.device.type == "cuda":
            self.host = torch.empty(maps.shape, dtype=maps.dtype, pin_memory=True)
            with torch.cuda.device(maps.device):  # copy and event on the maps' device
                self.host.copy_(maps, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record(torch.cuda.current_stream(maps.device))
        else:
            self.host = maps.cpu()

    def image(self, j: int) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host[j, 0].numpy()


def first_reasons(per_rank: list[list[str | None]]) -> list[str | None]:
    """Per image, the first reason any rank (``--topk``) gave for failing it."""
    return [next((r for r in reasons if r is not None), None) for reasons in zip(*per_rank)]


def nonfinite(exp: Any, prob: torch.Tensor) -> list[str | None]:
    """Per image of a batch, why its results are not finite numbers (None: all finite).

    A NaN or infinite logit, class probability, completeness residual, map or
    decomposition term makes that image fail: JSON has no NaN, and an all-NaN heatmap
    is no result. Other images of the batch are not affected.
    """
    n = len(exp.target)
    logits = exp.logits.detach().float().cpu()
    rows = torch.isfinite(logits).all(1).tolist()
    residual = exp.residual.detach().cpu()
    maps_ok = torch.isfinite(exp.maps.detach()).reshape(n, -1).all(1).cpu().tolist()
    prob_ok = torch.isfinite(prob.detach()).cpu().tolist()
    terms_ok = [True] * n
    if exp.compact is not None:
        parts = [exp.compact.input, *exp.compact.layers.values(), *exp.compact.offgrid.values()]
        for part in parts:
            ok = torch.isfinite(part.detach()).reshape(n, -1).all(1).cpu().tolist()
            terms_ok = [a and b for a, b in zip(terms_ok, ok)]
    reasons: list[str | None] = []
    for j in range(n):
        if not rows[j]:
            value = logits[j][~torch.isfinite(logits[j])][0].item()
            reasons.append(f"non-finite logit ({value}) from the model")
        elif not bool(torch.isfinite(residual[j])):
            reasons.append(f"non-finite completeness residual ({residual[j].item()})")
        elif not maps_ok[j]:
            reasons.append("non-finite saliency map")
        elif not prob_ok[j]:
            reasons.append("non-finite class probability")
        elif not terms_ok[j]:
            reasons.append("non-finite decomposition term")
        else:
            reasons.append(None)
    return reasons


def to_host(exp: Any) -> dict[str, Any]:
    """Scores (small, synchronous) and maps (asynchronous on CUDA) for one batch, and
    per image why it has no finite result (``nonfinite``: None when it has one)."""
    logit = exp.logit
    prob = torch.softmax(exp.logits.float(), dim=1).gather(1, exp.target[:, None])[:, 0]
    host: dict[str, Any] = {
        "nonfinite": nonfinite(exp, prob),
        "maps": DeviceMaps(exp.maps),
        "target": exp.target.cpu().numpy(),
        "logit": logit.double().cpu().numpy(),
        "prob": prob.cpu().numpy(),
        "residual": exp.residual.double().cpu().numpy(),
        "stats": map_stats(exp.maps).cpu().numpy(),  # on the maps' device, then small
    }
    if exp.compact is not None:
        host["compact_input"] = exp.compact.input.float().cpu().numpy()
        host["compact_layers"] = {k: v.float().cpu().numpy()
                                  for k, v in exp.compact.layers.items()}
        host["compact_offgrid"] = {k: v.float().cpu().numpy()
                                   for k, v in exp.compact.offgrid.items()}
    return host


def decomp_arrays(host: dict[str, Any], j: int, cls: int) -> dict[str, np.ndarray]:
    arrays = {
        "input": host["compact_input"][j],
        "logit": np.float64(host["logit"][j]),
        "target": np.int64(cls),
        "residual": np.float64(host["residual"][j]),
        "layers": np.array(list(host["compact_layers"]), dtype=str),
    }
    for name, value in host["compact_layers"].items():
        arrays[f"bias/{name}"] = value[j]
    for name, value in host["compact_offgrid"].items():
        arrays[f"offgrid/{name}"] = np.float32(value[j])
    return arrays
