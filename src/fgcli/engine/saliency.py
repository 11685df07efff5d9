"""FullGrad, SimpleFullGrad and SmoothFullGrad on top of the traced pass.

The methods differ only in what each layer contributes to the map, so each
subclass holds just that piece of maths; tracing, hooks and model state live in
:mod:`fgcli.engine.decompose`.
"""

from __future__ import annotations

import fnmatch
import re
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fgcli.config import METHOD_NAMES
from fgcli.engine.decompose import (
    LayerInfo,
    PassResult,
    check_input,
    eval_forward,
    resolve_target,
    run_pass,
)
from fgcli.engine.positions import Positions
from fgcli.engine.postprocess import (
    MapAccumulator,
    check_psi,
    grid_sum,
    per_image_sum,
    psi_channel_sum,
)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _accum_dtype(device: torch.device) -> torch.dtype:
    """Completeness sums in float64 where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in _LOW_PRECISION else t


LayerSelection = int | str | Sequence[str] | None
"""Which spatial layers enter a FullGrad-family map: None (all), a shell pattern
(:func:`fnmatch.fnmatchcase` on :attr:`LayerInfo.name`, e.g. ``'features.*'``) or a sequence
of patterns (a layer enters if any matches), or an int K (the last K spatial layers in
forward order; all of them when the model has fewer)."""


def check_layers(layers: LayerSelection) -> None | int | tuple[str, ...]:
    """A layer selection in normal form (None, an int >= 1 or a tuple of patterns), or a
    ValueError / TypeError saying what is wrong with it."""
    if layers is None:
        return None
    if isinstance(layers, bool):
        raise TypeError("layers must be None, an int K (the last K spatial layers) or "
                        f"layer-name patterns, got {layers!r}")
    if isinstance(layers, int):
        if layers < 1:
            raise ValueError(f"layers={layers}: the number of last spatial layers to map "
                             "must be at least 1")
        return layers
    if isinstance(layers, str):
        patterns: tuple[Any, ...] = (layers,)
    elif isinstance(layers, Sequence) or hasattr(layers, "__iter__"):
        patterns = tuple(layers)
    else:
        raise TypeError("layers must be None, an int K (the last K spatial layers) or "
                        f"layer-name patterns, got {type(layers).__name__}")
    if not patterns:
        raise ValueError("layers: an empty list of patterns selects no layer; "
                         "pass None for every spatial layer")
    for p in patterns:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"layers: each pattern must be a non-empty string, got {p!r}")
    return patterns


def parse_layers(text: str | None) -> None | int | tuple[str, ...]:
    """A layer selection from text (a command-line option): empty or ``all`` -> None,
    an integer -> the last K spatial layers, else comma-separated name patterns."""
    if text is None or not text.strip() or text.strip().lower() == "all":
        return None
    text = text.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return check_layers(int(text))
    return check_layers([p.strip() for p in text.split(",") if p.strip()])


def _names(infos: Sequence[LayerInfo], limit: int = 6) -> str:
    shown = ", ".join(info.name for info in infos[:limit])
    return shown + (f", ... ({len(infos)} in all)" if len(infos) > limit else "")


def select_map_layers(layers: Sequence[LayerInfo],
                      selection: LayerSelection) -> frozenset[int] | None:
    """Indices (into ``layers``, forward order) of the spatial layers ``selection`` puts in
    the map; None for every spatial layer. A pattern that matches no spatial layer is a
    ValueError naming some layers it could have matched."""
    selection = check_layers(selection)
    if selection is None:
        return None
    spatial = [i for i, info in enumerate(layers) if info.in_map]
    if isinstance(selection, int):
        return frozenset(spatial[-selection:])
    chosen: set[int] = set()
    for pattern in selection:
        hits = [i for i in spatial if fnmatch.fnmatchcase(layers[i].name, pattern)]
        if not hits:
            others = [info for info in layers if fnmatch.fnmatchcase(info.name, pattern)]
            why = ("it matches only layers that are not in the map ("
                   + ", ".join(f"{o.name}: {o.excluded}" for o in others[:4])
                   + (", ..." if len(others) > 4 else "") + ")") if others else                 "it matches no layer name"
            raise ValueError(
                f"layer pattern {pattern!r} selects no spatial layer: {why}; the spatial "
                f"layers are {_names([layers[i] for i in spatial]) or 'none'}")
        chosen.update(hits)
    return frozenset(chosen)


@dataclass(frozen=True)
class CompactDecomposition:
    """A small, signed summary of the decomposition, per image.

    input: (N, H, W) the input term summed over colour channels. layers: for
    each bias-carrying layer, its bias-gradient summed over channels (over every
    element of a pixel, for a tracked layer), (N, h, w), when the layer is spatial,
    else its total, (N,). offgrid: for spatial layers with elements that are not
    pixels (a class token, Swin's padding), the sum of those elements, (N,).
    ``input.sum + sum of every layer + sum of offgrid + residual == logit``.
    """

    input: torch.Tensor
    layers: OrderedDict[str, torch.Tensor]
    offgrid: OrderedDict[str, torch.Tensor] = field(default_factory=OrderedDict)


@dataclass(frozen=True)
class Explanation:
    """Saliency maps for a batch, with what a manifest needs to trust them.

    maps: (N, 1, H, W) float32, reference semantics (not renormalised).
    residual: (N,) completeness residual ``logit - input term - bias terms``
    (float64; for SmoothFullGrad the mean over the noisy samples).
    """

    maps: torch.Tensor
    logits: torch.Tensor
    target: torch.Tensor
    residual: torch.Tensor
    layers: tuple[LayerInfo, ...]
    compact: CompactDecomposition | None = None

    @property
    def logit(self) -> torch.Tensor:
        return self.logits.gather(1, self.target[:, None])[:, 0]


@dataclass(frozen=True)
class Decomposition:
    """The full-gradient decomposition ``logit = sum(input_term) + sum(bias_terms) + residual``.

    bias_terms maps each bias-carrying layer's name (forward order) to its
    signed bias-gradient ``grad_z f * b``, in the layer's own output shape.
    """

    logits: torch.Tensor  # (N, K)
    logit: torch.Tensor  # (N,)
    target: torch.Tensor  # (N,)
    input_grad: torch.Tensor  # (N, C, H, W)
    input_term: torch.Tensor  # (N, C, H, W) = input_grad * x
    bias_terms: OrderedDict[str, torch.Tensor]
    layers: tuple[LayerInfo, ...]
    residual: torch.Tensor  # (N,) float64 (float32 on MPS)
    # for layers in the ``tracked`` layout: each element's pixel (fgcli.engine.positions)
    positions: dict[str, Positions] = field(default_factory=dict)


class _Sink:
    """Base sink: the per-image sum of every bias term, for the completeness check."""

    def __init__(self, x: torch.Tensor, method: _FullGradFamily | None = None) -> None:
        self.n = x.shape[0]
        self.size = (x.shape[2], x.shape[3])
        self.acc = _accum_dtype(x.device)
        self.bias_sum = torch.zeros(self.n, dtype=self.acc, device=x.device)
        self.method = method
        self.selected: frozenset[int] | None = None  # None: every spatial layer

    def begin(self, layers: list[LayerInfo]) -> None:
        """Called once the forward pass has named the layers: resolve the method's layer
        selection (an unmatched pattern raises here, before the backward pass)."""
        if self.method is not None:
            self.selected = select_map_layers(layers, self.method.layers)

    def mapped(self, index: int, info: LayerInfo) -> bool:
        """Whether the layer enters the map (every layer enters completeness)."""
        return info.in_map and (self.selected is None or index in self.selected)

    def term(self, info: LayerInfo, grad: torch.Tensor, bias: torch.Tensor,
             images: torch.Tensor | None = None,
             scratch: Scratch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's bias term and its per-image sum (added to the completeness sum),
        split by ``images`` where the forward pass followed them. With ``scratch`` the term
        is written into that reused buffer (valid until the next layer's)."""
        out = scratch.like(grad, bias) if scratch is not None else None
        term = _wide(grad) * _wide(bias) if out is None else torch.mul(grad, bias, out=out)
        total = per_image_sum(term, info.layout, self.n, self.acc, images)
        self.bias_sum += total
        return term, total

    def residual(self, result: PassResult, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input term, completeness residual) for the pass that fed this sink."""
        input_term = _wide(result.input_grad) * _wide(x)
        total = input_term.reshape(self.n, -1).sum(1, dtype=self.acc) + self.bias_sum
        return input_term, result.logit.to(self.acc) - total


class Scratch:
    """One reused buffer for the bias terms a sink consumes within its hook.

    A fresh full-size tensor per layer costs the page faults of new memory (on this
    project's CPU a product into fresh memory took 2.7x as long as into a reused
    buffer); the map needs each term only until its psi is summed, so every layer of a
    pass (and, kept per thread, every pass) writes into the same buffer. CPU only: it
    holds the largest layer's size (38 MB for ConvNeXt-T's MLP at batch 8) for the
    thread's life.
    """

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def like(self, grad: torch.Tensor, bias: torch.Tensor) -> torch.Tensor | None:
        """A view of the buffer shaped and strided as ``grad * bias`` will be, or None
        where that product needs a new tensor (broadcast, low precision, odd strides)."""
        if grad.device.type != "cpu" or grad.dtype != torch.float32 or \
                bias.dtype != torch.float32 or \
                torch.broadcast_shapes(grad.shape, bias.shape) != grad.shape:
            return None  # GPU allocators reuse memory already: keep nothing there
        if grad.is_contiguous():
            stride = None
        elif grad.dim() == 4 and grad.is_contiguous(memory_format=torch.channels_last):
            stride = grad.stride()
        else:
            return None
        n = grad.numel()
        buf = self.buffer
        if buf is None or buf.numel() < n or buf.device != grad.device:
            buf = self.buffer = torch.empty(n, dtype=torch.float32, device=grad.device)
        view = buf[:n]
        return view.view(grad.shape) if stride is None else view.as_strided(grad.shape, stride)


_SCRATCH = threading.local()


def _thread_scratch() -> Scratch:
    """This thread's :class:`Scratch`, kept between passes (engines on one thread run
    one pass at a time; another thread gets its own)."""
    scratch = getattr(_SCRATCH, "value", None)
    if scratch is None:
        scratch = _SCRATCH.value = Scratch()
    return scratch


class _MapSink(_Sink):
    """Builds a FullGrad-family map during the backward pass (see ``layer_map_input``)."""

    def __init__(self, x: torch.Tensor, method: "_FullGradFamily", compact: bool) -> None:
        super().__init__(x, method)
        self.maps = MapAccumulator(self.n, self.size, x.device, method.psi)
        self.compact: dict[int, torch.Tensor] | None = {} if compact else None
        self.offgrid: dict[int, torch.Tensor] = {}

    def layer(self, index: int, info: LayerInfo, grad: torch.Tensor, bias: torch.Tensor,
              positions: Positions | None = None, images: torch.Tensor | None = None) -> None:
        term, total = self.term(info, grad, bias, images, _thread_scratch())
        if self.compact is not None:  # signed, so before psi may overwrite the term
            grid = grid_sum(term, info.layout, self.n, positions) if info.in_map \
                else total.float()
            if info.layout.off_grid:
                self.offgrid[index] = (total - grid.reshape(self.n, -1).sum(1, dtype=total.dtype)
                                       ).float()
            self.compact[index] = grid
        if self.mapped(index, info):  # psi only for the layers in the map
            source = self.method.layer_map_input(grad, term)
            # the bias term is ours to overwrite; an autograd gradient is not
            self.maps.add_layer(source, info.layout, inplace=source is term, positions=positions)

    def compact_result(self, layers: list[LayerInfo],
                       input_term: torch.Tensor) -> CompactDecomposition | None:
        if self.compact is None:
            return None
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        offgrid: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, info in enumerate(layers):
            term = self.compact.get(i)
            if term is None:  # the layer's output did not reach the logit
                shape = (self.n, *info.layout.grid) if info.in_map else (self.n,)
                term = input_term.new_zeros(shape)
            out[info.name] = term
            if info.layout.off_grid:
                offgrid[info.name] = self.offgrid.get(i, input_term.new_zeros(self.n))
        return CompactDecomposition(input_term.sum(1), out, offgrid)


class _KeepSink(_Sink):
    """Keeps (or, over several passes, sums) every layer's full bias term; with a
    ``method``, only the terms of the layers in its map (the others are summed for
    completeness only)."""

    def __init__(self, x: torch.Tensor, method: _FullGradFamily | None = None) -> None:
        super().__init__(x, method)
        self.terms: dict[int, torch.Tensor] = {}
        self.positions: dict[int, Positions] = {}

    def layer(self, index: int, info: LayerInfo, grad: torch.Tensor, bias: torch.Tensor,
              positions: Positions | None = None, images: torch.Tensor | None = None) -> None:
        term, _ = self.term(info, grad, bias, images)
        if self.method is not None and not self.mapped(index, info):
            return
        if positions is not None:  # the same in every pass: the model's structure
            self.positions[index] = positions
        if index in self.terms:
            self.terms[index] += term
        else:
            self.terms[index] = term

    def ordered(self, layers: list[LayerInfo], like: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Terms by layer name; a layer whose output did not reach the logit has a zero term."""
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, info in enumerate(layers):
            term = self.terms.get(i)
            out[info.name] = term if term is not None else like.new_zeros(info.shape)
        return out


METHODS: dict[str, type["_FullGradFamily"]] = {}


def register(name: str):
    """Add a method class to the registry :func:`build` reads. The name must be declared
    in :data:`fgcli.config.METHOD_NAMES` (the torch-free list option parsing and the
    CLI's choices use); a name registered twice is refused."""

    def deco(cls: type[_FullGradFamily]) -> type[_FullGradFamily]:
        if name in METHODS:
            raise ValueError(f"saliency method {name!r} is already registered")
        if name not in METHOD_NAMES:
            raise ValueError(f"saliency method {name!r} is not declared in "
                             "fgcli.config.METHOD_NAMES")
        cls.method_name = name
        METHODS[name] = cls
        return cls

    return deco


def build(name: str, model: nn.Module, *, psi: str = "abs-rescale",
          layers: LayerSelection = None, samples: int = 25, sigma: float = 0.15,
          seed: int | None = None) -> _FullGradFamily:
    """The registered method ``name`` for ``model``, from the options every command
    shares: ``psi`` and ``layers`` for all, ``samples`` / ``sigma`` / ``seed`` for the
    noisy ones (the others ignore them). ValueError for an unknown name."""
    cls = METHODS.get(name)
    if cls is None:
        raise ValueError(f"unknown saliency method {name!r}; choose from {', '.join(METHODS)}")
    return cls.from_options(model, psi=psi, layers=layers, samples=samples, sigma=sigma,
                            seed=seed)


class _FullGradFamily(ABC):
    """Shared interface: ``saliency``, ``explain`` and ``decompose`` for one model.

    Constructing an engine does nothing to the model: no forward pass, no hook.
    Each call runs the model in eval mode with frozen parameters and restores
    its training flags, ``requires_grad`` flags and hooks afterwards, also when
    the call raises.

    psi: the post-processing of the input term and of each mapped layer's term, one of
    :data:`fgcli.engine.PSI_CHOICES` (``abs-rescale``, the reference's, by default; each is
    defined there). layers: which spatial layers enter the
    map (:data:`LayerSelection`; None: all); the input term always does. Neither changes
    the decomposition, the completeness residual or the compact summary: only the map.
    """

    method_name: ClassVar[str]

    @classmethod
    def from_options(cls, model: nn.Module, *, psi: str, layers: LayerSelection,
                     samples: int, sigma: float, seed: int | None) -> _FullGradFamily:
        """This method from :func:`build`'s options (the noise options are ignored)."""
        return cls(model, psi=psi, layers=layers)

    def __init__(self, model: nn.Module, psi: str = "abs-rescale",
                 layers: LayerSelection = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.psi = check_psi(psi)
        self.layers = check_layers(layers)

    def map_layers(self, layers: Sequence[LayerInfo]) -> tuple[LayerInfo, ...]:
        """The layers (e.g. ``Explanation.layers``) that enter this engine's map; a
        ValueError if a pattern matches none of them."""
        selected = select_map_layers(layers, self.layers)
        return tuple(info for i, info in enumerate(layers)
                     if info.in_map and (selected is None or i in selected))

    def saliency(self, x: torch.Tensor, target: Any = None) -> torch.Tensor:
        """(N, 1, H, W) saliency maps for a batch ``x`` of shape (N, C, H, W).

        target: None (each image's top-1 class), an int (one class for all) or
        a LongTensor / sequence of N class indices.
        """
        return self.explain(x, target).maps

    def explain(self, x: torch.Tensor, target: Any = None, *,
                compact: bool = False) -> Explanation:
        """Maps plus logits, targets and completeness residuals, from one pass.

        compact: also return a :class:`CompactDecomposition` (computed in the
        same backward pass).
        """
        sink = _MapSink(check_input(self.model, x), self, compact)
        result = run_pass(self.model, x, target, sink)
        input_term, residual = sink.residual(result, x)
        maps = sink.maps.result() + psi_channel_sum(input_term, psi=self.psi)
        return Explanation(maps, result.logits, result.target, residual, tuple(result.layers),
                           sink.compact_result(result.layers, input_term))

    def decompose(self, x: torch.Tensor, target: Any = None) -> Decomposition:
        """The full-gradient decomposition of each image's target logit."""
        sink = _KeepSink(check_input(self.model, x))
        result = run_pass(self.model, x, target, sink)
        input_term, residual = sink.residual(result, x)
        return Decomposition(
            logits=result.logits,
            logit=result.logit,
            target=result.target,
            input_grad=result.input_grad,
            input_term=input_term,
            bias_terms=sink.ordered(result.layers, input_term),
            layers=tuple(result.layers),
            residual=residual,
            positions={result.layers[i].name: p for i, p in sink.positions.items()},
        )

    @staticmethod
    @abstractmethod
    def layer_map_input(grad: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
        """The method's maths: what a spatial layer feeds into psi, given its output
        gradient and its bias term."""


@register("fullgrad")
class FullGrad(_FullGradFamily):
    """FullGrad (Srinivas & Fleuret, 2019): psi of input-gradient x input plus psi of
    every spatial layer's bias-gradient, upsampled and summed."""

    @staticmethod
    def layer_map_input(grad: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
        return term


@register("simple")
class SimpleFullGrad(_FullGradFamily):
    """SimpleFullGrad: as FullGrad, but layers contribute their raw output gradients
    (not multiplied by the bias). No completeness property for the map itself."""

    @staticmethod
    def layer_map_input(grad: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
        return grad


@register("smooth")
class SmoothFullGrad(FullGrad):
    """SmoothFullGrad: FullGrad aggregation of input and bias-gradient terms averaged
    over ``n_samples`` noisy copies of each image.

    Unlike the reference, the target is chosen once on the clean image, and the
    noise standard deviation is ``sigma * (max - min)`` of each image on its own,
    so an image's map does not depend on its batch-mates. With ``seed`` set, every
    call draws the same noise (reproducible); otherwise the global generator is used.
    """

    def __init__(self, model: nn.Module, n_samples: int = 25, sigma: float = 0.15,
                 seed: int | None = None, psi: str = "abs-rescale",
                 layers: LayerSelection = None) -> None:
        super().__init__(model, psi, layers)
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma!r}")
        self.n_samples = n_samples
        self.sigma = float(sigma)
        self.seed = seed

    @classmethod
    def from_options(cls, model: nn.Module, *, psi: str, layers: LayerSelection,
                     samples: int, sigma: float, seed: int | None) -> SmoothFullGrad:
        """As :func:`build` asks: ``samples`` noisy copies of noise ``sigma``, ``seed``."""
        return cls(model, n_samples=samples, sigma=sigma, seed=seed, psi=psi, layers=layers)

    def explain(self, x: torch.Tensor, target: Any = None, *,
                compact: bool = False) -> Explanation:
        """As FullGrad; ``compact`` summarises the clean image's decomposition (one more pass)."""
        x = check_input(self.model, x)
        logits = eval_forward(self.model, x)
        target = resolve_target(target, logits)
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=x.device).manual_seed(self.seed)
        dims = (1, 2, 3)
        std = self.sigma * (x.amax(dim=dims, keepdim=True) - x.amin(dim=dims, keepdim=True))
        sink = _KeepSink(x, self)  # keeps only the mapped layers' terms
        input_sum = torch.zeros_like(x, dtype=torch.float32)
        residual = torch.zeros(x.shape[0], dtype=sink.acc, device=x.device)
        layers: list[LayerInfo] = []
        for _ in range(self.n_samples):
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            noisy = x + noise * std
            sink.bias_sum.zero_()
            result = run_pass(self.model, noisy, target, sink)
            input_term, res = sink.residual(result, noisy)
            input_sum += input_term
            residual += res
            layers = result.layers
        k = float(self.n_samples)
        acc = MapAccumulator(x.shape[0], sink.size, x.device, self.psi)
        for i, info in enumerate(layers):
            if sink.mapped(i, info) and (info.layout.kind != "tracked" or i in sink.positions):
                term = sink.terms.get(i)
                if term is None:  # the layer's output did not reach the logit
                    term = input_sum.new_zeros(info.shape)
                acc.add_layer(term / k, info.layout, inplace=True,
                              positions=sink.positions.get(i))
        maps = acc.result() + psi_channel_sum(input_sum / k, psi=self.psi)
        summary = FullGrad(self.model).explain(x, target, compact=True).compact if compact \
            else None
        return Explanation(maps, logits, target, residual / k, tuple(layers), summary)
