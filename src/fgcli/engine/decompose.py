"""The full-gradient decomposition: one traced forward, one backward.

A forward pass runs under a ``TorchFunctionMode`` (:class:`BiasTracer`) that
sees every torch function call. For each call whose output depends on the
input image it reads the op's row in the op table (:mod:`fgcli.engine.optable`),
decides by its bias rule (:mod:`fgcli.engine.ops`) whether the op carries a
bias, and if so records the bias (a per-channel vector for conv / linear /
batch norm, the linearisation residual ``phi(u) - J u`` for any other op,
:mod:`fgcli.engine.implicit`) and registers a tensor hook on the op's output. During the
single backward pass each hook receives ``grad_z f`` for its op and hands
``(grad, bias)`` to a *sink*, which does the method's maths right away, so a
layer's full bias-gradient need not outlive its hook.

Tensor hooks fire with the gradient of the value the tensor had when the hook
was registered, so in-place ops applied later (``ReLU(inplace=True)``,
``out += identity``) do not corrupt what is recorded.

All model state touched for the call (training flags, parameters'
``requires_grad``, naming hooks, the function mode) lives in
:func:`traced_model` and is restored in ``finally``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from fgcli.engine.images import IMG_ATTR, images_of
from fgcli.engine.implicit import implicit_biases, jvp_before_inplace, residual
from fgcli.engine.layout import LAYOUT_ATTR, Layout, batch_layout, layout_of, layout_tag
from fgcli.engine.ops import (
    CLOSED_FORM_KINDS,
    closed_form,
    implicit_category,
    is_activation,
    is_inplace,
    zero_bias,
)
from fgcli.engine.optable import PASSTHROUGH_RULES, OpRule, rule_of
from fgcli.engine.positions import POS_ATTR, Positions, positions_of
from fgcli.engine.postprocess import compact_index
from fgcli.engine.tracker import PositionTracker, forget
from fgcli.models.outputs import checked_logits, frozen_eval


@dataclass(frozen=True)
class LayerInfo:
    """One bias-carrying op seen during the forward pass.

    name: dotted module path (``layer1.0.bn1``); when one module runs several
    bias-carrying ops, ``path:op`` (``features.1.0.block.1:mul``) and, if an op
    repeats, ``path:op.k``. Ops run by the model's own ``forward`` have no path.
    kind: ``conv`` / ``linear`` / ``norm`` (closed form) or one of
    ``activation``, ``normalisation``, ``attention``, ``product``, ``constant``,
    ``other`` (implicit bias from the linearisation residual).
    split: how the layer's terms are split between the images of the batch for the
    per-image completeness sums: ``images`` (each element's image was followed through
    the forward pass: exact in any layout) or ``shape`` (the batch dim read from the
    layout; with one image there is nothing to split).
    """

    name: str
    module: str
    op: str
    kind: str
    shape: tuple[int, ...]
    layout: Layout
    split: str = "shape"

    @property
    def closed_form(self) -> bool:
        return self.kind in CLOSED_FORM_KINDS

    @property
    def in_map(self) -> bool:
        """Spatial layers enter the saliency map; all layers enter completeness."""
        return self.layout.spatial

    @property
    def excluded(self) -> str | None:
        """Why the layer is not in the map (None if it is): ``vector`` ((N, K), a
        classifier or pooled features), ``ambiguous`` (two readings of the shape fit the
        input grid equally and nothing tracked it), ``off-grid`` (followed from the grid,
        but no element is a pixel: a class token's own layers), ``untracked`` (no op
        placed its elements on the grid, e.g. channel-by-channel attention)."""
        if self.in_map:
            return None
        kind = self.layout.kind
        return kind if kind in ("vector", "ambiguous", "off-grid") else "untracked"


class Sink(Protocol):
    """Receives each layer's gradient and bias during the backward pass (and, for a
    layer in the ``tracked`` layout, its pixel positions; where followed, which image
    each element belongs to)."""

    def layer(self, index: int, info: LayerInfo, grad: torch.Tensor, bias: torch.Tensor,
              positions: Positions | None, images: torch.Tensor | None = None) -> None:
        ...

    # optional: ``begin(layers)`` is called with every LayerInfo once the forward pass is
    # over, before the backward pass (a ValueError raised there stops the pass)


@dataclass
class _Record:
    module: str
    op: str
    kind: str
    shape: tuple[int, ...]
    bias: torch.Tensor | None  # broadcastable to the output; dropped once used
    hint: str | None  # layout implied by the op (nchw / nhwc) or None
    positions: Positions | None = None  # tracked pixel positions of the output
    images: torch.Tensor | None = None  # each element's image (broadcastable), if followed
    images_lead: bool = False  # followed, and the batch is dim 0 (no index needed)
    off_grid: bool = False  # followed from the grid, but none of its elements is a pixel
    tokens_agree: bool = False  # a token reading of the shape matches the positions
    whole: bool = False  # tracked, and each image's elements are its batch-major block
    info: LayerInfo | None = None


class BiasTracer(TorchFunctionMode):
    """Records every bias-carrying op of a forward pass (see module docstring)."""

    def __init__(self, module_stack: list[str]) -> None:
        super().__init__()
        self._stack = module_stack
        self.records: list[_Record] = []
        self._sink: Sink | None = None
        self._positions: PositionTracker | None = None

    def begin(self, n: int, height: int, width: int) -> None:
        """Set the batch shape before the forward pass (pixel positions need it)."""
        self._positions = PositionTracker(n, height, width)

    def start_images(self, x: torch.Tensor) -> None:
        """Follow which image each element belongs to, from the input batch ``x`` on."""
        if self._positions is not None:
            self._positions.start_images(x)

    def _track(self, out: Any, func, name: str, row: OpRule, args: Any,
               kwargs: dict[str, Any], leaves: list[Any]) -> Any:
        if self._positions is not None:
            self._positions.after(name, row, func, args, kwargs, leaves, out)
        return out

    # -- forward ----------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        row = rule_of(name)
        if row.bias in PASSTHROUGH_RULES:
            if row.bias == "overwrites" and args:
                forget(args[0])  # x[i] = y: x's elements at i now come from elsewhere
            return func(*args, **kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        act_idx = [i for i, leaf in enumerate(leaves) if is_activation(leaf)]
        if not act_idx:
            return func(*args, **kwargs)
        if zero_bias(row, args, kwargs, leaves):
            out = self._tagged(func(*args, **kwargs), row, args, kwargs, leaves)
            return self._track(out, func, name, row, args, kwargs, leaves)

        handled, cf = closed_form(row, args, kwargs)
        if handled:
            out = self._tagged(func(*args, **kwargs), row, args, kwargs, leaves)
            self._track(out, func, name, row, args, kwargs, leaves)
            if cf is not None and is_activation(out):
                self._record(out, name, row, cf.kind, cf.broadcast(out.dim()))
            return out

        inplace = is_inplace(name, kwargs)
        early = jvp_before_inplace(name, row, args, kwargs, [leaves[i] for i in act_idx]) \
            if inplace else None
        saved = [leaves[i].detach().clone() for i in act_idx] \
            if inplace and early is None else None
        if row.dense_inputs:
            args, kwargs, leaves = _dense_activations(leaves, spec, act_idx)
        out = self._tagged(func(*args, **kwargs), row, args, kwargs, leaves)
        self._track(out, func, name, row, args, kwargs, leaves)
        out_leaves = pytree.tree_leaves(out)
        out_idx = [j for j, o in enumerate(out_leaves) if is_activation(o)]
        if not out_idx:
            return out
        kind = implicit_category(row, args, kwargs)
        outs = [out_leaves[j] for j in out_idx]
        biases = [residual(outs[0], early)] if early is not None else \
            implicit_biases(func, name, row, args, kwargs, leaves, spec, act_idx, saved,
                            outs, out_idx)
        for o, b in zip(outs, biases):
            self._record(o, name, row, kind, b)
        return out

    @staticmethod
    def _tagged(out: Any, row: OpRule, args: Any, kwargs: dict[str, Any],
                leaves: list[Any]) -> Any:
        """Mark a 4-D activation output with the layout its op implies (see layout_tag)."""
        if isinstance(out, tuple) and out:  # e.g. max_pool2d_with_indices
            BiasTracer._tagged(out[0], row, args, kwargs, leaves)
        elif isinstance(out, torch.Tensor) and out.dim() == 4 and out.requires_grad:
            tag = layout_tag(row, args, kwargs, leaves, out)
            if tag is not None:
                setattr(out, LAYOUT_ATTR, tag)
            elif hasattr(out, LAYOUT_ATTR):
                delattr(out, LAYOUT_ATTR)  # an in-place op changed what it holds
        return out

    def _record(self, out: torch.Tensor, op: str, row: OpRule, kind: str,
                bias: torch.Tensor) -> None:
        index = len(self.records)
        module = self._stack[-1] if self._stack else ""
        images = images_of(out)
        # plain batch-in-dim-0 indices need no tensor: the shape's leading batch is exact
        lead = self._positions is not None and self._positions.is_lead(images)
        self.records.append(_Record(module, op.strip("_"), kind, tuple(out.shape), bias,
                                    getattr(out, LAYOUT_ATTR, None), positions_of(out),
                                    None if images is None or lead else images.index,
                                    images_lead=lead))
        fmt = _grad_format(out) if row.grad_format else None
        out.register_hook(lambda grad, i=index, fmt=fmt: self._on_grad(i, grad, fmt))

    # -- backward ---------------------------------------------------------------
    def finalise(self, n: int, height: int, width: int) -> list[LayerInfo]:
        """Name the records (see :class:`LayerInfo`) once the forward pass is over."""
        by_shape = [layout_of(r.shape, n, height, width, r.hint) for r in self.records]
        _host_checks(self.records, by_shape, n)
        per_module = Counter(r.module for r in self.records)
        per_op = Counter((r.module, r.op) for r in self.records)
        seen: Counter[tuple[str, str]] = Counter()
        infos = []
        for r, shape_layout in zip(self.records, by_shape):
            key = (r.module, r.op)
            if per_module[r.module] == 1 and r.module:
                name = r.module
            else:
                name = f"{r.module}:{r.op}" if r.module else r.op
                if per_op[key] > 1:
                    name = f"{name}.{seen[key]}"
            seen[key] += 1
            r.info = LayerInfo(name, r.module, r.op, r.kind, r.shape,
                               _layout(r, shape_layout, n),
                               "images" if r.images is not None or r.images_lead
                               else "shape")
            if r.info.layout.kind != "tracked":
                r.positions = None
            infos.append(r.info)
        return infos

    def attach(self, sink: Sink) -> None:
        self._sink = sink

    def _on_grad(self, index: int, grad: torch.Tensor,
                 fmt: torch.memory_format | None = None) -> torch.Tensor | None:
        """Hand the layer's gradient to the sink; for a batch norm, return it in the
        output's memory format (see :func:`_grad_format`) for the rest of the backward."""
        dense = None
        if fmt is not None and not grad.is_contiguous(memory_format=fmt):
            grad = dense = grad.contiguous(memory_format=fmt)
        rec = self.records[index]
        if self._sink is None or rec.info is None or rec.bias is None:
            return dense
        bias, rec.bias = rec.bias, None  # each op's gradient arrives once; free its bias
        positions, rec.positions = rec.positions, None
        images, rec.images = rec.images, None
        self._sink.layer(index, rec.info, grad, bias, positions, images)
        return dense


def _grad_format(out: torch.Tensor) -> torch.memory_format:
    """The memory format a batch norm's output gradient is given back in.

    torch 2.14's CPU batch-norm backward (eval mode) returns a wrong input gradient
    for a batch of one NCHW image whose output gradient arrives channels-last, as it
    does when the output is flattened and transposed into tokens (LeViT's and
    EfficientViT-M's stems): measured up to 5.7 absolute against the exact gradient
    in float64, where batch 2 is exact. A gradient in the output's own format avoids
    it (a copy only when the formats differ).
    """
    if out.dim() == 4 and out.is_contiguous(memory_format=torch.channels_last) \
            and not out.is_contiguous():
        return torch.channels_last
    if out.dim() == 5 and out.is_contiguous(memory_format=torch.channels_last_3d) \
            and not out.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _host_checks(records: list[_Record], by_shape: list[Layout], n: int) -> None:
    """One host sync for all records: keep image indices only where every element has
    one, mark tracked records none of whose elements is a pixel (``off_grid``), and
    whether a token reading of a tracked record's shape puts every token where its
    positions say (``tokens_agree``; Hiera's unrolled tokens are not row-major), and
    whether each image's elements are its batch-major block (``whole``)."""
    images = [r for r in records if r.images is not None]
    tracked = [r for r in records if r.positions is not None]
    blocks = [r for r in tracked if r.shape and r.shape[0] % n == 0]
    tokens = [(r, s) for r, s in zip(records, by_shape) if r.positions is not None
              and s.kind == "tokens" and s.grid == r.positions.grid]
    if not images and not tracked:
        return
    flags = torch.stack([(compact_index(r.images) >= 0).all() for r in images]
                        + [(compact_index(r.positions.index) >= 0).any() for r in tracked]
                        + [_tokens_agree(r, s, n) for r, s in tokens]
                        + [_whole(r, n) for r in blocks]).tolist()
    for r, ok in zip(images, flags):
        if not ok:
            r.images = None
    for r, ok in zip(tracked, flags[len(images):]):
        if not ok:
            r.positions, r.off_grid = None, True
    for (r, _), ok in zip(tokens, flags[len(images) + len(tracked):]):
        r.tokens_agree = bool(ok)
    for r, ok in zip(blocks, flags[len(images) + len(tracked) + len(tokens):]):
        r.whole = bool(ok) and r.positions is not None


def _whole(r: _Record, n: int) -> torch.Tensor:
    """Whether every element of a tracked record is a pixel of the image whose
    batch-major block of dim 0 holds it (a 0-dim bool tensor): then each image's min and
    max run over its block, without a scatter (see ``psi_tracked``)."""
    index = compact_index(r.positions.index)
    if index.dim() == 0 or index.shape[0] % n:
        return torch.tensor(False, device=index.device)
    h, w = r.positions.grid
    image = torch.arange(n, device=index.device).view(n, 1)
    return (index.reshape(n, -1).div(h * w, rounding_mode="floor") == image).all()


def _tokens_agree(r: _Record, layout: Layout, n: int) -> torch.Tensor:
    """Whether tracked positions equal the row-major token reading (a 0-dim bool tensor)."""
    index = compact_index(r.positions.index)
    h, w = layout.grid
    expected = torch.arange(n * h * w, device=index.device).view(n, h * w)
    if layout.skip:
        expected = torch.cat([expected.new_full((n, layout.skip), -1), expected], 1)
    expected = expected.unsqueeze(-1) if layout.batch == "lead" else expected.t().unsqueeze(-1)
    if index.dim() != 3 or expected.shape[:2] != index.shape[:2]:
        return torch.tensor(False, device=index.device)
    return (index == expected).all()


def _layout(r: _Record, by_shape: Layout, n: int) -> Layout:
    """A layer's layout: the op's exact tag first, then a token sequence read from the
    shape where tracked positions agree with it, then tracked pixel positions, then the
    shape alone (``by_shape``, see ``layout_of``)."""
    if r.off_grid and by_shape.kind != "vector" and not (r.hint in ("nchw", "nhwc")
                                                         and by_shape.spatial):
        return Layout("off-grid", by_shape.batch)  # e.g. a class token's own layers
    if r.positions is None or not r.shape:
        return by_shape
    if r.hint in ("nchw", "nhwc") and by_shape.spatial:
        return by_shape  # the op's own layout (not a conv on windows merged into the batch)
    if by_shape.kind == "tokens" and r.tokens_agree:
        return by_shape  # the same reading, and cheaper to map
    # tracked tensors come from (N, ...) grid tensors by moves that keep the images in
    # dim 0, whole (N, ...) or image-major merged with windows (N * windows, ...): never
    # guess another dim of size N (Swin's heads) as the batch
    if r.shape[0] == n:
        batch = "lead"
    elif r.shape[0] % n == 0:
        batch = "merged"
    else:
        batch = batch_layout(r.shape, n)
    return Layout("tracked", batch, r.positions.grid,
                  whole=r.whole and batch in ("lead", "merged"))


def _dense_activations(leaves: list[Any], spec: Any, act_idx: list[int]
                       ) -> tuple[Any, dict[str, Any], list[Any]]:
    """The call's arguments with non-contiguous activations copied dense; one copy per
    tensor, so ``query is key is value`` (self-attention's packed projection) survives."""
    copies: dict[int, torch.Tensor] = {}
    leaves = list(leaves)
    for i in act_idx:
        t = leaves[i]
        if not t.is_contiguous():
            if id(t) not in copies:
                copies[id(t)] = dense = t.contiguous()
                for attr in (LAYOUT_ATTR, POS_ATTR, IMG_ATTR):  # same elements, places
                    if hasattr(t, attr):
                        setattr(dense, attr, getattr(t, attr))
            leaves[i] = copies[id(t)]
    args, kwargs = pytree.tree_unflatten(leaves, spec)
    return args, kwargs, leaves


@contextlib.contextmanager
def _entered(mode: TorchFunctionMode) -> Iterator[None]:
    """``with mode:``, except that an exception already on its way out (a second stop
    signal's, raised by its handler at whatever bytecode runs, possibly while torch has
    the mode popped for a dispatch) is not replaced by the mode stack's "trying to pop
    from empty mode stack" on the way out."""
    mode.__enter__()
    try:
        yield
    except BaseException:
        with contextlib.suppress(RuntimeError):
            mode.__exit__(None, None, None)
        raise
    mode.__exit__(None, None, None)


@contextlib.contextmanager
def traced_model(model: nn.Module) -> Iterator[BiasTracer]:
    """:func:`frozen_eval` plus module-path tracking hooks, all removed afterwards.

    The returned tracer is entered by the caller around the forward pass only.
    """
    names: dict[nn.Module, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        names.setdefault(module, path)
    stack: list[str] = []
    handles = []

    def leave(_module: nn.Module, _args: Any, _out: Any) -> None:
        if stack:
            stack.pop()

    with frozen_eval(model):
        try:
            for module, path in names.items():
                handles.append(module.register_forward_pre_hook(
                    lambda _m, _a, path=path: stack.append(path)))
                handles.append(module.register_forward_hook(leave, always_call=True))
            yield BiasTracer(stack)
        finally:
            for h in handles:
                h.remove()


# ---------------------------------------------------------------------------
# One forward + one backward


@dataclass
class PassResult:
    """What one traced forward + backward produced (tensors on the model's device)."""

    logits: torch.Tensor  # (N, K), detached
    target: torch.Tensor  # (N,) long
    input_grad: torch.Tensor  # (N, C, H, W)
    layers: list[LayerInfo] = field(default_factory=list)

    @property
    def logit(self) -> torch.Tensor:
        return self.logits.gather(1, self.target[:, None])[:, 0]


def check_input(model: nn.Module, x: Any) -> torch.Tensor:
    """Validate the image batch: a floating (N, C, H, W) tensor on the model's device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"x must have shape (N, C, H, W) with N >= 1, got {tuple(x.shape)}")
    param = next(model.parameters(), None)
    if param is not None and param.device != x.device:
        raise ValueError(f"x is on {x.device} but the model is on {param.device}; move one of them")
    return x


def resolve_target(target: Any, logits: torch.Tensor) -> torch.Tensor:
    """None -> each image's top-1; int -> same class for all; (N,) ints -> per image."""
    n, k = logits.shape
    if target is None:
        return logits.detach().argmax(1)
    if isinstance(target, bool) or (isinstance(target, torch.Tensor)
                                    and target.dtype == torch.bool):
        raise TypeError("target must be an int, a sequence of ints or a LongTensor, not bool")
    if not isinstance(target, torch.Tensor):
        try:
            target = torch.as_tensor(target)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"target must be an int or a sequence of ints, got {target!r}") \
                from exc
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integers, got dtype {target.dtype}")
    t = target.to(device=logits.device, dtype=torch.long).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"target has {t.numel()} entries but the batch has {n} images")
    bad = (t < 0) | (t >= k)
    if bool(bad.any()):
        raise ValueError(f"target {t[bad][0].item()} is out of range: the model has {k} classes")
    return t.clone()


def eval_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Plain eval-mode logits (no tracing, no graph), model state restored."""
    x = check_input(model, x)
    with frozen_eval(model), torch.no_grad():
        return checked_logits(model(x), x.shape[0])


def run_pass(model: nn.Module, x: torch.Tensor, target: Any, sink: Sink) -> PassResult:
    """Traced forward + backward of the summed target logits; the sink sees every layer."""
    x = check_input(model, x)
    n, _, height, width = x.shape
    with traced_model(model) as tracer, torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        # the model gets a non-leaf copy: a forward that modifies its input in place
        # (x.mul_(2), x += 1) works, its ops are traced like any other, and the input
        # term stays on the original x (the caller's batch is never changed)
        xm = xg.clone()
        setattr(xm, LAYOUT_ATTR, "nchw")
        tracer.begin(n, height, width)
        tracer.start_images(xm)
        with _entered(tracer):
            out = model(xm)
        logits = checked_logits(out, n)
        if not logits.requires_grad:
            raise ValueError("the model's output does not depend differentiably on its input")
        t = resolve_target(target, logits)
        layers = tracer.finalise(n, height, width)
        begin = getattr(sink, "begin", None)
        if begin is not None:  # the layers are known: the sink may check or select them
            begin(layers)
        tracer.attach(sink)
        selected = logits.gather(1, t[:, None]).sum()
        (gx,) = torch.autograd.grad(selected, xg)
    return PassResult(logits.detach(), t, gx, layers)
