"""The engine's op table (fgcli.engine.optable): one row per op, a rule for every op the
tracer sees, and the same dispatch as the name sets it replaced.

``OLD`` is a frozen copy of the 24 name sets that held the engine's op knowledge before
the table (engine/ops.py and engine/positions.py), and the ``_old_*`` functions replay
their order-dependent if-chains: every op they named must get the same rule from the
table, column by column.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from fgcli.engine import FullGrad, decompose
from fgcli.engine import images as images_mod
from fgcli.engine import ops as ops_mod
from fgcli.engine import positions as positions_mod
from fgcli.engine.optable import (
    BIAS_RULES,
    CLOSED_RULES,
    IMAGE_RULES,
    PASSTHROUGH_RULES,
    POSITION_RULES,
    ROW_RULES,
    ROWS,
    TABLE,
    ZERO_RULES,
    Dim,
    OpRule,
    build,
    dim_arg,
    rule_of,
)


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


OLD = {
    "PASSTHROUGH": _names(
        "__bool__ __deepcopy__ __eq__ __format__ __ge__ __get__ __gt__ __hash__ __le__ __len__ "
        "__lt__ __ne__ __reduce_ex__ __repr__ __set__ __setitem__ __setstate__ argmax argmin "
        "argsort data_ptr detach detach_ dim element_size empty_like eq full_like ge gt "
        "is_complex is_contiguous is_floating_point isfinite isinf isnan item le lt ne new_empty "
        "new_full new_ones new_tensor new_zeros numel numpy ones_like rand_like randn_like "
        "register_hook requires_grad_ sign size storage_offset stride tolist zeros_like"),
    "STRUCTURAL": _names(
        "__getitem__ __neg__ __pos__ abs abs_ adaptive_avg_pool1d adaptive_avg_pool2d "
        "adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool1d_with_indices "
        "adaptive_max_pool2d adaptive_max_pool2d_with_indices adaptive_max_pool3d alpha_dropout "
        "amax amin avg_pool1d avg_pool2d avg_pool3d bfloat16 channel_shuffle chunk clone "
        "contiguous cpu cuda cumsum diagonal double dropout dropout1d dropout2d dropout3d "
        "dropout_ expand expand_as feature_alpha_dropout feature_dropout flatten flip float fmax "
        "fmin gather half index_select interpolate leaky_relu leaky_relu_ max max_pool1d "
        "max_pool1d_with_indices max_pool2d max_pool2d_with_indices max_pool3d "
        "max_pool3d_with_indices maximum mean min minimum moveaxis movedim nansum narrow "
        "native_channel_shuffle neg neg_ permute pixel_shuffle pixel_unshuffle positive relu "
        "relu_ repeat repeat_interleave reshape reshape_as roll select split squeeze squeeze_ sum "
        "swapaxes swapdims t take_along_dim tensor_split tile to transpose transpose_ type "
        "type_as unbind unflatten unfold unsqueeze unsqueeze_ upsample upsample_bilinear "
        "upsample_nearest view view_as"),
    "ADDITIVE_PAIR": _names(
        "__add__ __iadd__ __isub__ __radd__ __rsub__ __sub__ add add_ sub sub_ subtract"),
    "ADDITIVE_SEQ": _names(
        "cat column_stack concat concatenate dstack hstack stack vstack"),
    "PRODUCT_PAIR": _names(
        "__imul__ __matmul__ __mul__ __rmatmul__ __rmul__ bmm dot inner kron matmul mm mul mul_ "
        "multiply mv outer tensordot"),
    "QUOTIENT": _names(
        "__itruediv__ __truediv__ div div_ divide true_divide"),
    "UNARY": _names(
        "gelu hardsigmoid hardswish relu6 sigmoid silu tanh"),
    "CHANNELS_FIRST": _names(
        "adaptive_avg_pool2d adaptive_max_pool2d adaptive_max_pool2d_with_indices avg_pool2d "
        "batch_norm channel_shuffle conv1d conv2d conv3d conv_transpose1d conv_transpose2d "
        "conv_transpose3d group_norm instance_norm interpolate local_response_norm max_pool2d "
        "max_pool2d_with_indices native_channel_shuffle pixel_shuffle pixel_unshuffle upsample "
        "upsample_bilinear upsample_nearest"),
    "MOVES_PIXELS": _names(
        "flatten flip fliplr flipud gather index_add index_put index_select moveaxis movedim "
        "reshape reshape_as roll rot90 scatter swapaxes swapdims t take_along_dim transpose "
        "transpose_ unflatten view view_as"),
    "MOVES": _names(
        "__getitem__ cat channel_shuffle chunk clone concat concatenate contiguous expand "
        "expand_as flatten flip moveaxis movedim narrow native_channel_shuffle pad permute "
        "pixel_shuffle pixel_unshuffle repeat reshape reshape_as roll select split squeeze stack "
        "swapaxes swapdims t tensor_split tile transpose unbind unflatten unsqueeze view view_as"),
    "ELEMENTWISE_EXTRA": _names(
        "__add__ __iadd__ __imul__ __isub__ __itruediv__ __mul__ __neg__ __pos__ __radd__ "
        "__rmul__ __rsub__ __sub__ __truediv__ abs abs_ add add_ alpha_dropout batch_norm "
        "bfloat16 div div_ divide double dropout dropout1d dropout2d dropout_ "
        "feature_alpha_dropout float half leaky_relu leaky_relu_ masked_fill mul mul_ multiply "
        "neg neg_ positive prelu relu relu_ sub sub_ subtract to true_divide type_as where"),
    "SAME_GRID": _names(
        "avg_pool1d avg_pool2d conv1d conv2d conv3d max_pool1d max_pool2d max_pool2d_with_indices"),
    "MIX_LAST": _names(
        "layer_norm linear log_softmax normalize rms_norm softmax softmin"),
    "RESCALE": _names(
        "log_softmax normalize softmax softmin"),
    "CONTRACT": _names(
        "__matmul__ bmm einsum matmul"),
    "QUERY_FIRST": _names(
        "multi_head_attention_forward scaled_dot_product_attention"),
    "CONVERSIONS": _names(
        "bfloat16 double float half to type_as"),
    "POOLING": _names(
        "amax amin max mean min sum"),
    "PER_SAMPLE": _names(
        "adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d "
        "adaptive_max_pool1d_with_indices adaptive_max_pool2d adaptive_max_pool2d_with_indices "
        "adaptive_max_pool3d adaptive_max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d "
        "batch_norm conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d fold "
        "grid_sample group_norm instance_norm interpolate local_response_norm lp_pool1d lp_pool2d "
        "max_pool1d max_pool1d_with_indices max_pool2d max_pool2d_with_indices max_pool3d "
        "max_pool3d_with_indices upsample upsample_bilinear upsample_nearest"),
    "REDUCTIONS": _names(
        "amax amin cummax cummin cumprod cumsum logcumsumexp logsumexp max mean median min "
        "nanmean nansum prod std sum var"),
    "CUMULATIVE": _names(
        "cummax cummin cumprod cumsum logcumsumexp"),
    "IMAGE_ELEMENTWISE": _names(
        "addcdiv addcmul arctan asinh atan ceil clamp_max clamp_min cos cosh exp2 expm1 floor "
        "fmax fmin frac hardtanh lerp log10 log1p log2 logit maximum minimum nan_to_num "
        "reciprocal round sgn sigmoid sign sin sinh softplus square square_ trunc"),
    "IMAGE_MOVES": _names(
        "diagonal gather index_select repeat_interleave take_along_dim unfold"),
    "RESHAPES": _names(
        "flatten reshape reshape_as unflatten view view_as"),
}
OLD_CATEGORY = {
    "normalisation": _names(
        "batch_norm group_norm instance_norm layer_norm local_response_norm normalize rms_norm"),
    "attention": _names(
        "log_softmax multi_head_attention_forward scaled_dot_product_attention softmax softmin"),
    "activation": _names(
        "__pow__ celu celu_ clamp clamp_ clip clip_ elu elu_ erf exp gelu gelu_ glu hardshrink "
        "hardsigmoid hardsigmoid_ hardswish hardswish_ hardtanh hardtanh_ log logsigmoid mish "
        "mish_ pow relu6 relu6_ rrelu rsqrt selu selu_ sigmoid sigmoid_ silu silu_ softplus "
        "softshrink softsign sqrt tanh tanh_ tanhshrink threshold threshold_"),
}


def _old(key: str) -> frozenset[str]:
    return OLD[key]


def _old_activation() -> frozenset[str]:
    return OLD_CATEGORY["activation"]


def _old_bias(n: str) -> str:
    if n in _old("PASSTHROUGH"):
        return "overwrites" if n == "__setitem__" else "passthrough"
    for key, rule in (("STRUCTURAL", "structural"), ("ADDITIVE_PAIR", "additive"),
                      ("ADDITIVE_SEQ", "additive_seq"), ("PRODUCT_PAIR", "product")):
        if n in _old(key):
            return rule
    if n == "einsum":
        return "einsum"
    if n in _old("QUOTIENT"):
        return "quotient"
    if n in ("pad", "prelu"):
        return n
    if n.startswith("conv"):
        return "conv"
    if n in ("linear", "batch_norm"):
        return n
    return "implicit"


NEW_FAST = {"layer_norm": "layer_norm", "rms_norm": "rms_norm", "softmax": "softmax",
            "scaled_dot_product_attention": "sdpa", "multi_head_attention_forward": "mha",
            **dict.fromkeys(["add", "__add__", "__radd__", "__iadd__", "add_", "sub",
                             "__sub__", "__rsub__", "__isub__", "sub_", "subtract"], "shift")}
"""Closed forms added after the table was made (#19): tested against forward AD in
tests/test_engine.py."""


def _old_fast(n: str) -> str | None:
    if n in NEW_FAST:
        return NEW_FAST[n]
    if n.rstrip("_") in _old("UNARY"):
        return "unary"
    if n in _old("PRODUCT_PAIR") or n == "einsum":
        return "bilinear"
    return "quotient" if n in _old("QUOTIENT") else None


def _old_category(n: str) -> str:
    for category, names in OLD_CATEGORY.items():
        if n in names:
            return category
    if n in _old("PRODUCT_PAIR") or n in _old("QUOTIENT") or n == "einsum":
        return "operands"
    if n in _old("ADDITIVE_PAIR") | _old("ADDITIVE_SEQ") | {"pad", "where", "masked_fill"}:
        return "constant"
    return "other"


def _old_layout(n: str) -> str:
    if n in _old("CHANNELS_FIRST"):
        return "nchw"
    if n == "layer_norm":
        return "layer_norm"
    if n in _old("MOVES_PIXELS"):
        return "moves"
    return {"__getitem__": "getitem", "permute": "permute"}.get(n, "inherit")


def _old_elementwise() -> frozenset[str]:
    return _old_activation() | _old("ELEMENTWISE_EXTRA")


def _old_tracked() -> frozenset[str]:
    return (_old("MOVES") | _old_elementwise() | _old("MIX_LAST") | _old("CONTRACT")
            | _old("QUERY_FIRST") | _old("SAME_GRID"))


def _old_position(n: str) -> str | None:
    if n not in _old_tracked() and n not in _old("POOLING"):
        return None
    if n in _old("MOVES"):
        if n in _old("RESHAPES"):
            return "reshape"
        return {"contiguous": "copy", "clone": "copy", "cat": "join", "concat": "join",
                "concatenate": "join", "stack": "join", "pad": "pad"}.get(n, "move")
    if n in _old("POOLING") and n not in _old_elementwise():
        return "pooled"
    if n in _old("CONVERSIONS"):
        return "conversion"
    if n in _old_elementwise():
        return "elementwise"
    if n in _old("SAME_GRID"):
        return "same_grid"
    if n in _old("MIX_LAST"):
        if n in _old("RESCALE"):
            return "mix_dim"
        return "mix_norm" if n in ("layer_norm", "rms_norm") else "mix_last"
    if n in _old("QUERY_FIRST"):
        return "query_first"
    return "einsum" if n == "einsum" else "contract"


def _old_images(n: str) -> str | None:
    if n == "unfold":
        return "unfold"
    if n in _old("PER_SAMPLE"):
        return "per_sample"
    if n in _old("IMAGE_ELEMENTWISE"):
        return "elementwise"
    if n in ("max", "min"):
        return "minmax"
    if n in _old("REDUCTIONS"):
        return "cumulative" if n in _old("CUMULATIVE") else "reduction"
    if n in ("cat", "concat", "concatenate", "pad"):
        return "cat" if n != "pad" else "pad"
    if n in _old_tracked():
        return "positions"
    return "contract" if n in _old("IMAGE_MOVES") else None


def _old_rows(n: str) -> str | None:
    if n in _old("RESHAPES"):
        return "reshape"
    if n in _old("PER_SAMPLE") | _old_elementwise() | _old("IMAGE_ELEMENTWISE") | {
            "contiguous", "clone"}:
        return "glu" if n == "glu" else "keep"
    named = {"linear": "mix_last", "layer_norm": "mix_norm", "rms_norm": "mix_norm",
             "softmax": "dim", "log_softmax": "dim", "softmin": "dim", "normalize": "dim",
             "chunk": "dim", "split": "dim", "unbind": "dim", "matmul": "batched",
             "__matmul__": "batched", "bmm": "batched",
             "scaled_dot_product_attention": "batched", "permute": "permute",
             "transpose": "transpose", "swapaxes": "transpose", "swapdims": "transpose",
             "roll": "roll", "pad": "pad"}
    return named.get(n)


def _old_dim(n: str) -> Dim | None:
    """Where the old code looked for each op's ``dim`` (six places)."""
    named = {"softmax": Dim(1), "log_softmax": Dim(1), "softmin": Dim(1),
             "normalize": Dim(2, 1), "glu": Dim(1, -1), "chunk": Dim(2, 0),
             "split": Dim(2, 0), "unbind": Dim(1, 0), "cat": Dim(1, 0), "concat": Dim(1, 0),
             "concatenate": Dim(1, 0)}
    if n in named:
        return named[n]
    return Dim(1) if n in _old("REDUCTIONS") | _old("POOLING") else None


def _old_names() -> set[str]:
    names = set().union(*OLD.values()).union(*OLD_CATEGORY.values())
    return names | {"einsum", "pad", "prelu", "where", "masked_fill", "layer_norm", "permute",
                    "__getitem__", "unfold", "linear", "batch_norm", "conv1d", "conv2d",
                    "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}


COLUMNS = {"bias": _old_bias, "fast": _old_fast, "category": _old_category,
           "layout": _old_layout, "position": _old_position, "images": _old_images,
           "rows": _old_rows, "dim": _old_dim}


@pytest.mark.parametrize("column", sorted(COLUMNS))
def test_table_gives_every_old_op_its_old_rule(column):
    """Every op the old name sets named is in the table, with the rule the old if-chains
    gave it (ops that pass through never reach the other columns)."""
    missing = sorted(_old_names() - set(TABLE))
    assert not missing
    wrong = {}
    for name in sorted(_old_names()):
        row = TABLE[name]
        if column not in ("bias",) and row.bias in PASSTHROUGH_RULES:
            continue
        old, new = COLUMNS[column](name), getattr(row, column)
        if old != new:
            wrong[name] = (old, new)
    assert not wrong, f"{column}: name -> (old rule, table's rule): {wrong}"


def test_one_row_per_op():
    """No op is claimed by two rows (so no column has two rules for it)."""
    counted = [name for row in ROWS for name in row.names]
    assert len(counted) == len(set(counted)) == len(TABLE)
    with pytest.raises(ValueError, match="two rows"):
        build([OpRule(("relu",)), OpRule(("relu",), bias="structural")])
    with pytest.raises(ValueError, match="unknown position rule"):
        build([OpRule(("relu",), position="nowhere")])


def test_every_rule_value_has_its_function():
    """Each column value the table may hold is applied by exactly one function."""
    bias_handled = set(ops_mod.ZERO_BIAS) | set(ops_mod.CLOSED_FORM) | set(PASSTHROUGH_RULES)
    assert bias_handled | {"implicit"} == set(BIAS_RULES)
    assert set(ops_mod.ZERO_BIAS) == set(ZERO_RULES)
    assert set(ops_mod.CLOSED_FORM) == set(CLOSED_RULES)
    assert set(positions_mod.RULES) == set(POSITION_RULES)
    assert set(images_mod.RULES) == set(IMAGE_RULES)
    assert set(images_mod.ROW_RULES) == set(ROW_RULES)


def test_rows_are_consistent():
    """Columns that read other columns find them: the image rule ``positions`` needs a
    position rule, and rules that read ``dim`` know where it sits."""
    for row in ROWS:
        if row.images == "positions":
            assert row.position is not None, row.names
        if row.rows in ("dim", "glu") or row.position in ("pooled", "mix_dim") or \
                row.images in ("minmax", "reduction", "cumulative", "cat"):
            assert row.dim is not None, row.names
        if row.fast is not None:
            assert row.bias in ("implicit", "product", "einsum", "quotient", "additive"), \
                row.names


def test_dim_arg_reads_keyword_position_and_default():
    row = rule_of("softmax")
    assert dim_arg(row, (None, 2), {}) == 2
    assert dim_arg(row, (None,), {"dim": -1}) == -1
    assert dim_arg(row, (None,), {}) is None
    assert dim_arg(rule_of("normalize"), (None,), {}) == 1
    assert dim_arg(rule_of("relu"), (None, 3), {}) is None


def _small_models() -> dict[str, torch.nn.Module]:
    tv = torchvision.models
    return {
        **{name: tv.get_model(name, weights=None) for name in (
            "resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
            "shufflenet_v2_x0_5", "squeezenet1_1", "convnext_tiny")},
        "vit": tv.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                    hidden_dim=16, mlp_dim=32),
        "swin": tv.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 1],
                                   num_heads=[1, 2], window_size=[2, 2]),
        "maxvit": tv.MaxVit(input_size=(64, 64), stem_channels=8, partition_size=2,
                            block_channels=[8, 16], block_layers=[1, 1], head_dim=4,
                            stochastic_depth_prob=0.0),
    }


def _ops_seen(monkeypatch, models: dict[str, tuple[torch.nn.Module, int]]
              ) -> dict[str, set[str]]:
    """Op name -> the models whose FullGrad pass (one image of the given size) called it."""
    seen: dict[str, set[str]] = {}
    current = [""]

    def recording(name: str) -> OpRule:
        seen.setdefault(name, set()).add(current[0])
        return rule_of(name)

    monkeypatch.setattr(decompose, "rule_of", recording)
    torch.manual_seed(0)
    for name, (model, size) in models.items():
        current[0] = name
        FullGrad(model.eval()).saliency(torch.randn(1, 3, size, size))
    return seen


def test_every_op_the_tracer_sees_has_a_row(monkeypatch):
    """A FullGrad pass over one model per torchvision family (small configurations of the
    transformers) meets no op without a row."""
    seen = _ops_seen(monkeypatch, {name: (model, 32 if name in ("vit", "swin") else 64)
                                   for name, model in _small_models().items()})
    assert {"conv2d", "layer_norm", "multi_head_attention_forward", "softmax", "roll"} <= set(seen)
    missing = {name: sorted(models) for name, models in seen.items() if name not in TABLE}
    assert not missing, f"ops without a row in fgcli.engine.optable: {missing}"


def test_every_op_timm_models_use_has_a_row(monkeypatch):
    """The same for timm models whose blocks call ops torchvision's do not (positional
    encodings built on the fly, convolutional attention, spatial-reduction attention)."""
    timm = pytest.importorskip("timm")
    names = ("edgenext_xx_small", "xcit_nano_12_p16_224", "pvt_v2_b0")
    models = {}
    for name in names:
        model = timm.create_model(name, pretrained=False)
        models[name] = (model, model.pretrained_cfg["input_size"][1])
    seen = _ops_seen(monkeypatch, models)
    missing = {name: sorted(models) for name, models in seen.items() if name not in TABLE}
    assert not missing, f"ops without a row in fgcli.engine.optable: {missing}"
