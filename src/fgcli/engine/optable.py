"""The engine's op table: everything the engine knows about a torch op, in one row.

Every torch function call seen by the tracer (:mod:`fgcli.engine.decompose`) is
looked up by its name (``func.__name__``) in :data:`TABLE`; an op or op family has
one :class:`OpRule` row, whose columns say

* ``bias`` -- how its bias is found (:data:`BIAS_RULES`): ``passthrough`` (no
  activation output worth looking at), a *zero-bias* rule (``structural``,
  ``additive``, ``product``, ...: exactly zero when the rule's operand check holds,
  else the generic path), a *closed form* (``conv``, ``linear``, ``batch_norm``), or
  ``implicit`` (the linearisation residual by forward-mode AD,
  :mod:`fgcli.engine.implicit`);
* ``fast`` -- a closed form of the implicit bias that saves the forward-AD pass
  (``unary``, ``bilinear``, ``quotient``, ``shift``, ``layer_norm``, ``rms_norm``,
  ``softmax``, ``sdpa``, ``mha``: :mod:`fgcli.engine.implicit`,
  :mod:`fgcli.engine.attention`), ``category`` -- the kind reported for an implicit bias
  (``operands``: ``product`` or ``constant`` by the operands);
* ``layout`` -- the layout tag of its 4-D output (:mod:`fgcli.engine.layout`);
* ``position`` -- how pixel positions follow it (:mod:`fgcli.engine.positions`);
  None: tracking ends there;
* ``images`` -- how image indices follow it (:mod:`fgcli.engine.images`), and
  ``rows`` -- whether it keeps row r of dim 0 at row r (the cheap path for a batch
  in dim 0 or merged batch-major with windows);
* ``dim`` -- where its ``dim`` argument sits (:func:`dim_arg` reads it).

An op with no row is handled as :data:`UNKNOWN`: the generic implicit path, which
is exact for any op (a missing row costs speed, never correctness), and no
position or image tracking. The module that applies a column keeps one function
per column value; ``tests/test_op_table.py`` checks both sides match.

To add an op: add its name to the row of its family, or add a row. A name may
appear in one row only (building :data:`TABLE` raises on a duplicate).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

BIAS_RULES = ("passthrough", "overwrites", "structural", "additive", "additive_seq",
              "product", "einsum", "quotient", "pad", "prelu", "conv", "linear",
              "batch_norm", "implicit")
PASSTHROUGH_RULES = ("passthrough", "overwrites")  # overwrites: x[i] = y
ZERO_RULES = ("structural", "additive", "additive_seq", "product", "einsum", "quotient",
              "pad", "prelu")
CLOSED_RULES = ("conv", "linear", "batch_norm")
FAST_RULES = ("unary", "bilinear", "quotient", "layer_norm", "rms_norm", "softmax", "shift",
              "sdpa", "mha")
CATEGORIES = ("activation", "normalisation", "attention", "operands", "constant", "other")
LAYOUT_RULES = ("inherit", "nchw", "layer_norm", "moves", "getitem", "permute")
POSITION_RULES = ("move", "reshape", "copy", "join", "pad", "pooled", "conversion",
                  "elementwise", "same_grid", "mix_last", "mix_dim", "mix_norm",
                  "query_first", "einsum", "contract")
IMAGE_RULES = ("per_sample", "elementwise", "minmax", "reduction", "cumulative", "cat", "pad",
               "positions", "contract", "unfold")
ROW_RULES = ("keep", "glu", "reshape", "mix_last", "mix_norm", "dim", "batched", "permute",
             "transpose", "roll", "pad")


@dataclass(frozen=True)
class Dim:
    """Where an op's ``dim`` argument sits: keyword ``dim``, else positional ``pos``,
    else ``default``."""

    pos: int
    default: Any = None


@dataclass(frozen=True)
class OpRule:
    """One op family's row (see the module docstring for the columns)."""

    names: tuple[str, ...]
    bias: str = "implicit"
    fast: str | None = None
    category: str = "other"
    layout: str = "inherit"
    position: str | None = None
    images: str | None = None
    rows: str | None = None
    dim: Dim | None = None
    dense_inputs: bool = False  # run on dense copies of its activation inputs (speed)
    grad_format: bool = False  # its output gradient is given back in the output's format


def _row(names: str, **columns: Any) -> OpRule:
    return OpRule(tuple(names.split()), **columns)


_STRUCT = {"bias": "structural"}
_EW = {"position": "elementwise", "images": "positions", "rows": "keep"}
_PER_SAMPLE = {"images": "per_sample", "rows": "keep"}
_REDUCE = {"dim": Dim(1)}
_ACT = {"category": "activation", **_EW}

ROWS: tuple[OpRule, ...] = (
    # -- calls that produce no activation worth looking at
    _row("__get__ __set__ dim size numel __len__ stride storage_offset is_floating_point "
         "is_complex is_contiguous data_ptr element_size __format__ __repr__ __bool__ "
         "__hash__ __eq__ __ne__ __lt__ __le__ __gt__ __ge__ item tolist numpy detach "
         "detach_ requires_grad_ register_hook __setstate__ __reduce_ex__ __deepcopy__ eq ne "
         "lt le gt ge argmax argmin argsort isnan isinf isfinite sign new_zeros new_ones "
         "new_empty new_full new_tensor zeros_like ones_like empty_like full_like rand_like "
         "randn_like _assert", bias="passthrough"),
    _row("__setitem__", bias="overwrites"),
    # -- views and moves: zero bias, positions rerun the op
    _row("view view_as reshape reshape_as flatten unflatten", **_STRUCT, layout="moves",
         position="reshape", images="positions", rows="reshape"),
    _row("permute", **_STRUCT, layout="permute", position="move", images="positions",
         rows="permute"),
    _row("transpose swapaxes swapdims", **_STRUCT, layout="moves", position="move",
         images="positions", rows="transpose"),
    _row("roll", **_STRUCT, layout="moves", position="move", images="positions",
         rows="roll"),
    _row("flip movedim moveaxis t", **_STRUCT, layout="moves", position="move",
         images="positions"),
    _row("transpose_", **_STRUCT, layout="moves"),
    _row("squeeze unsqueeze expand expand_as repeat tile narrow select tensor_split",
         **_STRUCT, position="move", images="positions"),
    _row("__getitem__", **_STRUCT, layout="getitem", position="move", images="positions"),
    _row("chunk split", **_STRUCT, position="move", images="positions", rows="dim",
         dim=Dim(2, 0)),
    _row("unbind", **_STRUCT, position="move", images="positions", rows="dim", dim=Dim(1, 0)),
    _row("contiguous clone", **_STRUCT, position="copy", images="positions", rows="keep"),
    _row("squeeze_ unsqueeze_ cpu cuda type", **_STRUCT),
    # moves by index: image indices take the matrix-product rule (the fall-through of
    # the position rules), not a rerun of the op
    _row("gather index_select take_along_dim", **_STRUCT, layout="moves", images="contract"),
    _row("repeat_interleave diagonal", **_STRUCT, images="contract"),
    _row("unfold", **_STRUCT, images="unfold"),  # Tensor.unfold and F.unfold (im2col)
    _row("pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle", **_STRUCT,
         layout="nchw", position="move", images="positions"),
    _row("to float double half bfloat16 type_as", **_STRUCT, position="conversion",
         images="positions", rows="keep"),
    # ops that move pixels without being followed
    _row("fliplr flipud rot90 scatter index_put index_add", layout="moves"),
    # -- positively homogeneous elementwise ops
    _row("relu relu_ leaky_relu leaky_relu_ abs abs_ neg neg_ __neg__ positive __pos__ "
         "dropout dropout_ dropout1d dropout2d alpha_dropout feature_alpha_dropout",
         **_STRUCT, **_EW),
    _row("dropout3d feature_dropout", **_STRUCT),
    _row("maximum minimum fmax fmin", **_STRUCT, images="elementwise", rows="keep"),
    # -- reductions
    _row("max min", **_STRUCT, position="pooled", images="minmax", **_REDUCE),
    _row("amax amin mean sum", **_STRUCT, position="pooled", images="reduction", **_REDUCE),
    _row("nansum", **_STRUCT, images="reduction", **_REDUCE),
    _row("cumsum", **_STRUCT, images="cumulative", **_REDUCE),
    _row("nanmean logsumexp prod std var median", images="reduction", **_REDUCE),
    _row("cumprod logcumsumexp cummax cummin", images="cumulative", **_REDUCE),
    # -- pooling and resampling
    _row("max_pool2d max_pool2d_with_indices avg_pool2d", **_STRUCT, layout="nchw",
         position="same_grid", **_PER_SAMPLE),
    _row("max_pool1d avg_pool1d", **_STRUCT, position="same_grid", **_PER_SAMPLE),
    _row("adaptive_avg_pool2d adaptive_max_pool2d adaptive_max_pool2d_with_indices "
         "interpolate upsample upsample_nearest upsample_bilinear", **_STRUCT, layout="nchw",
         **_PER_SAMPLE),
    _row("max_pool3d max_pool1d_with_indices max_pool3d_with_indices avg_pool3d "
         "adaptive_avg_pool1d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool3d "
         "adaptive_max_pool1d_with_indices", **_STRUCT, **_PER_SAMPLE),
    _row("adaptive_max_pool3d_with_indices lp_pool1d lp_pool2d grid_sample fold",
         **_PER_SAMPLE),
    # -- sums, products, quotients of operands
    _row("add __add__ __radd__ __iadd__ add_ sub __sub__ __rsub__ __isub__ sub_ subtract",
         bias="additive", fast="shift", category="constant", **_EW),
    _row("cat concat concatenate", bias="additive_seq", category="constant", position="join",
         images="cat", dim=Dim(1, 0)),
    _row("stack", bias="additive_seq", category="constant", position="join",
         images="positions"),
    _row("hstack vstack dstack column_stack", bias="additive_seq", category="constant"),
    _row("mul __mul__ __rmul__ __imul__ mul_ multiply", bias="product", fast="bilinear",
         category="operands", **_EW),
    _row("matmul __matmul__ bmm", bias="product", fast="bilinear", category="operands",
         position="contract", images="positions", rows="batched"),
    _row("__rmatmul__ mm mv dot inner outer kron tensordot", bias="product", fast="bilinear",
         category="operands"),
    _row("einsum", bias="einsum", fast="bilinear", category="operands", position="einsum",
         images="positions"),
    _row("div __truediv__ __itruediv__ div_ true_divide divide", bias="quotient",
         fast="quotient", category="operands", **_EW),
    _row("pad", bias="pad", category="constant", position="pad", images="pad", rows="pad"),
    _row("prelu", bias="prelu", **_EW),
    _row("where masked_fill", category="constant", **_EW),
    # -- closed-form biases
    _row("conv1d conv2d conv3d", bias="conv", layout="nchw", position="same_grid",
         **_PER_SAMPLE),
    _row("conv_transpose1d conv_transpose2d conv_transpose3d", bias="conv", layout="nchw",
         **_PER_SAMPLE),
    _row("linear", bias="linear", position="mix_last", images="positions", rows="mix_last"),
    # eval-mode batch norm: a per-channel affine map of each element
    _row("batch_norm", bias="batch_norm", category="normalisation", layout="nchw",
         position="elementwise", grad_format=True, **_PER_SAMPLE),
    # -- normalisation and attention (implicit biases)
    _row("layer_norm", fast="layer_norm", category="normalisation", layout="layer_norm",
         position="mix_norm", images="positions", rows="mix_norm"),
    _row("rms_norm", fast="rms_norm", category="normalisation", position="mix_norm",
         images="positions", rows="mix_norm"),
    _row("group_norm instance_norm local_response_norm", category="normalisation",
         layout="nchw", **_PER_SAMPLE),
    _row("normalize", category="normalisation", position="mix_dim", images="positions",
         rows="dim", dim=Dim(2, 1)),
    _row("softmax", fast="softmax", category="attention", position="mix_dim",
         images="positions", rows="dim", dim=Dim(1)),
    _row("log_softmax softmin", category="attention", position="mix_dim",
         images="positions", rows="dim", dim=Dim(1)),
    _row("scaled_dot_product_attention", fast="sdpa", category="attention",
         position="query_first", images="positions", rows="batched"),
    _row("multi_head_attention_forward", fast="mha", category="attention",
         position="query_first", images="positions", dense_inputs=True),
    # -- activations (implicit biases)
    _row("silu silu_ gelu gelu_ hardswish hardswish_ hardsigmoid hardsigmoid_ relu6 relu6_ "
         "sigmoid_ tanh tanh_", fast="unary", **_ACT),
    _row("sigmoid", fast="unary", **{**_ACT, "images": "elementwise"}),
    _row("hardtanh softplus", **{**_ACT, "images": "elementwise"}),
    _row("glu", **{**_ACT, "rows": "glu"}, dim=Dim(1, -1)),
    _row("hardtanh_ elu elu_ selu selu_ celu celu_ mish mish_ logsigmoid tanhshrink "
         "softsign hardshrink softshrink rrelu clamp clamp_ clip clip_ exp log sqrt rsqrt "
         "pow __pow__ erf threshold threshold_", **_ACT),
    _row("square square_ reciprocal sin cos log1p expm1 lerp addcmul addcdiv nan_to_num "
         "floor ceil round trunc frac sgn log2 log10 exp2 atan arctan sinh cosh asinh logit "
         "clamp_min clamp_max", images="elementwise", rows="keep"),
    _row("__ipow__"),
    # seen in timm models, rightly on the generic path: factories and masks have no
    # activation input, and ``c ** x`` is not homogeneous
    _row("zeros arange __invert__ __rpow__"),
)

UNKNOWN = OpRule(())
"""The row of an op the table does not name: generic implicit bias, nothing tracked."""


def build(rows: Iterable[OpRule]) -> dict[str, OpRule]:
    """Name -> row; a ValueError when two rows claim one name or a column has an
    unknown value."""
    table: dict[str, OpRule] = {}
    for row in rows:
        _check(row)
        for name in row.names:
            if name in table:
                raise ValueError(f"op {name!r} has two rows: {table[name].names} and "
                                 f"{row.names}")
            table[name] = row
    return table


def _check(row: OpRule) -> None:
    columns = (("bias", row.bias, BIAS_RULES), ("fast", row.fast, FAST_RULES),
               ("category", row.category, CATEGORIES), ("layout", row.layout, LAYOUT_RULES),
               ("position", row.position, POSITION_RULES),
               ("images", row.images, IMAGE_RULES), ("rows", row.rows, ROW_RULES))
    for column, value, allowed in columns:
        if value is not None and value not in allowed:
            raise ValueError(f"row {row.names}: unknown {column} rule {value!r}")


TABLE: dict[str, OpRule] = build(ROWS)


def rule_of(name: str) -> OpRule:
    """The op's row (:data:`UNKNOWN` if the table does not name it)."""
    return TABLE.get(name, UNKNOWN)


def dim_arg(row: OpRule, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """The op's ``dim`` argument as passed (keyword ``dim`` or its position in the
    row's ``dim`` column), else the column's default; None for an op without one."""
    if row.dim is None:
        return None
    pos = row.dim.pos
    return kwargs.get("dim", args[pos] if len(args) > pos else row.dim.default)
