"""What kind of operation is this? The classification of every ATen operation splinelens meets.

An operation on activations is either affine in them (kept as it is), a MASO nonlinearity (one of
``_maso_ops``), the output nonlinearity g (a trailing softmax, excluded as in Sec. 2), or refused.

>>> classify_name("conv2d"), classify_name("relu"), classify_name("gelu")
('affine', 'maso', 'other')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from splinelens._capture.pieces import Clip, MasoOp, Pairwise, Pool, Reduce, Sign, _adaptive_width

# Linear in every activation argument (sums, concatenations, selections by constant condition).
ADDITIVE = {"add", "sub", "rsub", "cat", "concat", "stack", "neg", "where", "masked_fill"}

# Products: affine as long as at most one of these argument positions holds an activation.
PRODUCT_ARGS: dict[str, tuple[int, ...]] = {
    "mul": (0, 1),
    "div": (1,),
    "linear": (0, 1),
    "conv1d": (0, 1),
    "conv2d": (0, 1),
    "conv3d": (0, 1),
    "convolution": (0, 1),
    "conv_transpose1d": (0, 1),
    "conv_transpose2d": (0, 1),
    "conv_transpose3d": (0, 1),
    "addmm": (1, 2),
    "mm": (0, 1),
    "bmm": (0, 1),
    "matmul": (0, 1),
    "baddbmm": (1, 2),
    "addmv": (1, 2),
    "mv": (0, 1),
    "einsum": (1,),
}

# Linear maps of one activation: shape changes, copies, padding, pooling by averages, eval norms.
UNARY = {
    "view",
    "reshape",
    "_unsafe_view",
    "permute",
    "transpose",
    "t",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "expand",
    "slice",
    "select",
    "narrow",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "clone",
    "contiguous",
    "alias",
    "detach",
    "_to_copy",
    "to",
    "type_as",
    "flip",
    "roll",
    "repeat",
    "tile",
    "constant_pad_nd",
    "pad",
    "reflection_pad1d",
    "reflection_pad2d",
    "reflection_pad3d",
    "replication_pad1d",
    "replication_pad2d",
    "replication_pad3d",
    "dropout",
    "native_dropout",
    "feature_dropout",
    "alpha_dropout",
    "feature_alpha_dropout",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "_adaptive_avg_pool2d",
    "_adaptive_avg_pool3d",
    "mean",
    "sum",
    "upsample_nearest1d",
    "upsample_nearest2d",
    "upsample_nearest3d",
    "upsample_bilinear2d",
    "upsample_linear1d",
    "pixel_shuffle",
    "pixel_unshuffle",
    "index_select",
    "index",
    "gather",
    "_native_batch_norm_legit_no_training",
    "batch_norm",
    "movedim",
    "swapaxes",
    "expand_as",
    "view_as",
    "reshape_as",
    "unfold",
    "im2col",
    "col2im",
    "channel_shuffle",
    "lift_fresh_copy",
    "diagonal",
    "getitem",
    "squeeze_copy",
    "view_copy",
    "permute_copy",
    "unsqueeze_copy",
    "expand_copy",
    "slice_copy",
    "select_copy",
}

# Depend on an activation's shape only, never its values.
SHAPE_ONLY = {
    "sym_size",
    "sym_numel",
    "sym_stride",
    "size",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "new_zeros",
    "new_ones",
    "new_empty",
    "new_full",
    "_assert_tensor_metadata",
}

# Ops that take a dimension and move data along it: refused along the batch dimension.
ALONG_DIM = {
    "flip",
    "roll",
    "index_select",
    "gather",
    "narrow",
    "select",
    "slice",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "index",
    "diagonal",
    "unfold",
}

SIGN = {"relu", "leaky_relu", "prelu", "_prelu_kernel", "abs", "clamp_min", "clamp_max"}
CLIP = {"hardtanh", "relu6", "clamp"}
POOL = {
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "max_pool1d_with_indices",
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
}
REDUCE = {"amax", "amin", "max", "min"}
PAIRWISE = {"maximum", "minimum", "fmax", "fmin"}
MASO = SIGN | CLIP | POOL | REDUCE | PAIRWISE
OUTPUT_G = {"softmax", "_softmax", "log_softmax", "_log_softmax"}


def apply_g(g: str | None, logits: torch.Tensor) -> torch.Tensor:
    """The excluded output nonlinearity g (softmax or log-softmax over the last dim), or none."""
    if g is None:
        return logits
    return torch.log_softmax(logits, -1) if "log" in g else torch.softmax(logits, -1)


TRAINING_ONLY = {"_native_batch_norm_legit", "_native_batch_norm_legit_functional"}
NORMS = {"layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "instance_norm"}


def op_name(target: Any) -> str:
    """ATen packet name of a graph target: ``aten.conv2d.default`` -> ``conv2d``."""
    name = getattr(target, "__name__", str(target))
    packet = getattr(target, "_overloadpacket", None)
    return packet.__name__ if packet is not None else name.split(".")[0]


def classify_name(name: str) -> str:
    """'affine', 'maso', 'shape', 'g' or 'other' for an ATen packet name."""
    if name in ADDITIVE or name in PRODUCT_ARGS or name in UNARY:
        return "affine"
    if name in MASO:
        return "maso"
    if name in SHAPE_ONLY:
        return "shape"
    return "g" if name in OUTPUT_G else "other"


def bound_args(node: torch.fx.Node) -> dict[str, Any]:
    """Arguments of an ATen node by schema name, defaults filled in."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {str(i): a for i, a in enumerate(node.args)}
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


def _ints(v: Any, nd: int, default: int | Sequence[int] | None = None) -> tuple[int, ...]:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        v = default
    if isinstance(v, int):
        return (v,) * nd
    v = tuple(int(i) for i in v)  # type: ignore[union-attr]
    return v * nd if len(v) == 1 else v


def make_maso(name: str, node: torch.fx.Node, in_shape: Sequence[int]) -> MasoOp:
    """The MASO of one graph node. ``in_shape``: the activation's concrete shape."""
    a = bound_args(node)
    if name in SIGN:
        return _make_sign(name, a)
    if name in CLIP:
        return _make_clip(name, a)
    if name in PAIRWISE:
        return Pairwise("maximum" if name in ("maximum", "fmax") else "minimum")
    if name in POOL:
        return _make_pool(name, a, in_shape)
    return _make_reduce(name, a, in_shape)


def _is_tensor_arg(v: Any) -> bool:
    return isinstance(v, (torch.fx.Node, torch.Tensor))


def _make_sign(name: str, a: dict[str, Any]) -> Sign | Pairwise:
    if name == "leaky_relu":
        return Sign(name, float(a["negative_slope"]))
    if name in ("prelu", "_prelu_kernel"):
        return Sign("prelu", None)
    if name in ("clamp_min", "clamp_max"):
        bound = a["min" if name == "clamp_min" else "max"]
        if _is_tensor_arg(bound):  # a tensor bound: an elementwise max / min with it
            return Pairwise("maximum" if name == "clamp_min" else "minimum")
        return Sign(name, None, float(bound))
    return Sign(name, 0.0 if name == "relu" else -1.0)


def _make_clip(name: str, a: dict[str, Any]) -> Sign | Clip | Pairwise:
    if name == "relu6":
        return Clip(name, 0.0, 6.0)
    lo, hi = (a["min_val"], a["max_val"]) if name == "hardtanh" else (a["min"], a["max"])
    if _is_tensor_arg(lo) or _is_tensor_arg(hi):  # clamp.Tensor: bounds come from the args
        if lo is None or hi is None:
            return Pairwise(
                "maximum" if hi is None else "minimum", bound_arg=1 if hi is None else 2
            )
        return Clip(name, None, None)
    if lo is None:
        return Sign("clamp_max", None, float(hi))
    if hi is None:
        return Sign("clamp_min", None, float(lo))
    return Clip(name, float(lo), float(hi))


def _make_pool(name: str, a: dict[str, Any], in_shape: Sequence[int]) -> Pool:
    nd = int(name.split("pool")[1][0])
    spatial = tuple(int(s) for s in in_shape[-nd:])
    if name.startswith("adaptive"):
        out = _ints(a["output_size"], nd)
        out = tuple(o if o is not None else s for o, s in zip(out, spatial))
        widths = [_adaptive_width(s, o) for s, o in zip(spatial, out)]
        return Pool(name, nd, output_size=out, pieces=math.prod(widths), in_spatial=spatial)
    k = _ints(a["kernel_size"], nd)
    pool = Pool(
        name,
        nd,
        kernel=k,
        stride=_ints(a["stride"], nd, k),
        padding=_ints(a["padding"], nd, 0),
        dilation=_ints(a["dilation"], nd, 1),
        ceil_mode=bool(a["ceil_mode"]),
        pieces=math.prod(k),
        in_spatial=spatial,
    )
    return pool


def _make_reduce(name: str, a: dict[str, Any], in_shape: Sequence[int]) -> Reduce:
    dims = a.get("dim")
    dims = (dims,) if isinstance(dims, int) else tuple(dims or range(len(in_shape)))
    pieces = math.prod(int(in_shape[d]) for d in dims)
    largest = name in ("amax", "max")
    return Reduce(name, dims, bool(a.get("keepdim") or False), largest, pieces)
