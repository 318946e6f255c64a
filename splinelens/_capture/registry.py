"""What every ATen operation is, to splinelens: the single table that capture, convexity and
refusals read.

An operation on activations is affine in them (kept as it is), a MASO nonlinearity (one of the
``pieces``), the output nonlinearity g (a trailing softmax, excluded as in Sec. 2), shape-only,
or refused with the reason and the fix. Each entry also says how the op treats the batch axis and
a convex input (Theorem 2), and what canonicalisation replaces it by.

>>> info("conv2d").kind, info("relu").kind, info("gelu").kind
('affine', 'maso', 'refused')
>>> info("conv2d").coefficients, info("conv2d").bias
('weights', 2)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from splinelens._capture import mixing
from splinelens._capture.pieces import (
    Clip,
    MasoOp,
    Pairwise,
    Pool,
    Reduce,
    Sign,
    Spline,
    adaptive_width,
    copy_into,
    eval_batch_norm,
    reshape_view,
)


@dataclass(frozen=True)
class OpInfo:
    """One ATen operation (by packet name) as splinelens sees it.

    ``kind``: "affine", "maso", "shape" (reads only the activation's shape), "g" (the output
    nonlinearity) or "refused". ``operands``: for products, the argument positions of which at most
    one may hold an activation. ``regroups``: a view that may merge or split dims, so it may
    reinterpret the batch (``batch_axis``'s layout must say it does not). Theorem 2:
    ``coefficients`` names the constants that multiply a convex input ("weights": every constant
    operand but the bias at ``bias``; "scalars": the constant factors of mul/div; "bn_weight":
    batchnorm's scale), which must be nonnegative ("kernel": the op's own weights are not, as
    bicubic interpolation's); ``signed``: a sum whose terms carry signs (a subtracted convex term
    breaks convexity); ``view``: a view or copy through which a parameter keeps its name.
    ``family``: the MASO kind built by ``make_maso``. ``rewrite``: the function run in place of the
    op (canonicalisation). ``why``/``fix``: the refusal. ``vmap_backward``: PyTorch batches its
    backward under ``vmap`` (convolutions and max-pooling loop over the vmapped rows instead).
    ``mixes``: the dims of an operand that one output entry reads several entries along
    (``mixing``), which must not hold the batch; None for ops that keep every dim apart.
    """

    name: str
    kind: str
    operands: tuple[int, ...] = ()
    regroups: bool = False
    coefficients: str = ""
    bias: int | None = None
    signed: bool = False
    view: bool = False
    family: str = ""
    rewrite: Callable[..., Any] | None = None
    vmap_backward: bool = True
    mixes: mixing.Rule | None = None
    why: str = ""
    fix: str = ""


_TABLE: dict[str, OpInfo] = {}


def _add(names: str, kind: str, **fields: Any) -> None:
    for name in names.split():
        _TABLE[name] = OpInfo(name, kind, **fields)


def _set(names: str, **fields: Any) -> None:
    """Add fields to entries already in the table."""
    for name in names.split():
        old = _TABLE[name]
        _TABLE[name] = OpInfo(**{**old.__dict__, **fields})


# Linear maps of one activation: shape changes, copies, padding, pooling by averages, eval norms.
_add(
    "view reshape _unsafe_view permute transpose t flatten unflatten squeeze unsqueeze expand "
    "slice select narrow split split_with_sizes chunk unbind clone contiguous alias _to_copy to "
    "type_as flip roll repeat tile constant_pad_nd pad reflection_pad1d reflection_pad2d "
    "reflection_pad3d replication_pad1d replication_pad2d replication_pad3d dropout "
    "native_dropout feature_dropout alpha_dropout feature_alpha_dropout avg_pool1d avg_pool2d "
    "avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d "
    "_adaptive_avg_pool2d _adaptive_avg_pool3d mean sum upsample_nearest1d upsample_nearest2d "
    "upsample_nearest3d upsample_bilinear2d upsample_linear1d upsample_trilinear3d "
    "_upsample_nearest_exact1d _upsample_nearest_exact2d _upsample_nearest_exact3d "
    "_upsample_bilinear2d_aa upsample_bicubic2d _upsample_bicubic2d_aa repeat_interleave cumsum "
    "pixel_shuffle pixel_unshuffle "
    "index_select index gather batch_norm movedim swapaxes expand_as view_as reshape_as unfold "
    "im2col col2im channel_shuffle lift_fresh_copy diagonal getitem squeeze_copy view_copy "
    "permute_copy unsqueeze_copy expand_copy slice_copy select_copy",
    "affine",
)
# in-place writes, functionalised: copy(self, src) is src (broadcast) written over self, linear in
# src alone; slice_scatter / select_scatter write src into a slice of self along dim
_add("copy", "affine", rewrite=copy_into)
_add("slice_scatter select_scatter", "affine")
# detach would hide paths from autograd; it is the identity
_add("detach", "affine", rewrite=torch.ops.aten.alias.default, view=True)
_add(
    "_native_batch_norm_legit_no_training",
    "affine",
    coefficients="bn_weight",
    rewrite=eval_batch_norm,
)
_set("batch_norm", coefficients="bn_weight")
# cubic kernels weigh some neighbours negatively: they do not keep a convex input convex
_set("upsample_bicubic2d _upsample_bicubic2d_aa", coefficients="kernel")
# views replayed on any memory layout (export saw the example's layout)
_set("view _unsafe_view view_copy", rewrite=reshape_view)
# Views that may reinterpret the batch dim (merge it with others, or split it): checked by layout.
_set("view reshape _unsafe_view view_copy flatten unflatten", regroups=True)
_set(
    "t permute transpose view reshape _unsafe_view clone contiguous expand alias unsqueeze "
    "squeeze flatten _to_copy",
    view=True,
)
# Linear in every activation argument (sums, concatenations, selections by constant condition).
_add("cat concat stack where masked_fill", "affine")
_add("add sub rsub neg", "affine", signed=True)
# Products: affine as long as at most one of these argument positions holds an activation.
_add("linear", "affine", operands=(0, 1), coefficients="weights", bias=2)
for _nd in ["1d", "2d", "3d"]:
    _add(
        f"conv{_nd} conv_transpose{_nd}", "affine", operands=(0, 1), coefficients="weights", bias=2
    )
_add("convolution", "affine", operands=(0, 1), coefficients="weights", bias=2)
_add("mm bmm matmul mv", "affine", operands=(0, 1), coefficients="weights")
_add("addmm baddbmm addmv", "affine", operands=(1, 2), coefficients="weights", bias=0, signed=True)
_add("einsum", "affine", operands=(1,), coefficients="weights")
_add("mul", "affine", operands=(0, 1), coefficients="scalars")
_add("div", "affine", operands=(1,), coefficients="scalars")
# Depend on an activation's shape only, never its values.
_add(
    "sym_size sym_numel sym_stride size zeros_like ones_like empty_like full_like new_zeros "
    "new_ones new_empty new_full fill zero _assert_tensor_metadata",
    "shape",
)
# The MASO nonlinearities, by family (``make_maso``).
_add(
    "relu leaky_relu prelu _prelu_kernel abs clamp_min clamp_max rrelu threshold",
    "maso",
    family="sign",
)
_add("hardtanh relu6 clamp", "maso", family="clip")
_add(
    "max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices "
    "max_pool3d_with_indices adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d",
    "maso",
    family="pool",
)
_add("amax amin max min", "maso", family="reduce")
_add("maximum minimum fmax fmin", "maso", family="pairwise")
_add("spline_activation", "maso", family="spline")  # splinelens' own op (``sl.splinify``)
# Backward passes that vmap loops over (``Program.batched_rows``): no batching rule in functorch.
_set(
    "conv1d conv2d conv3d convolution conv_transpose1d conv_transpose2d conv_transpose3d "
    "max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices "
    "max_pool3d_with_indices adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d "
    "_upsample_nearest_exact1d _upsample_nearest_exact2d _upsample_nearest_exact3d",
    vmap_backward=False,
)
# What each op mixes: the batch dimension must not be among those dims.
for _names, _rule in mixing.RULES.items():
    _set(" ".join(n for n in _names.split() if n in _TABLE), mixes=_rule)
_add(
    "softmax _softmax log_softmax _log_softmax",
    "g",
    why="is excluded only as the model's final output nonlinearity g (Sec. 2); here it is "
    "used inside the network",
)
_add(
    "_native_batch_norm_legit _native_batch_norm_legit_functional",
    "refused",
    why="uses batch statistics (training mode, or track_running_stats=False)",
    fix="call model.eval(); batchnorm needs running statistics to be affine",
)
_SPLINIFY = (
    "sl.splinify(model) replaces it by a certified piecewise-affine approximation (its "
    "error bound is the spline's .sup_error); capture the network it returns"
)
_add(
    "sigmoid tanh gelu silu mish elu celu selu softplus log_sigmoid log_sigmoid_forward "
    "hardswish rnn_tanh rnn_tanh_cell",
    "refused",
    why="is a smooth activation, not piecewise affine (Sec. 4: it is approximated arbitrarily "
    "closely by an affine spline, but is not one)",
    fix=_SPLINIFY,
)
_add(
    "hardsigmoid softshrink",
    "refused",
    why="is piecewise affine, but not an op the capture reads",
    fix="sl.splinify(model) represents it exactly (sup_error 0); capture the network it returns",
)
_add(
    "exp log log1p expm1 sqrt rsqrt pow sin cos erf erfc reciprocal",
    "refused",
    why="is a smooth function of the activations, not piecewise affine",
    fix="if it belongs to an activation, use the activation's module or function (torch.tanh, "
    "F.gelu, ...), which " + _SPLINIFY,
)
_add(
    "layer_norm native_layer_norm group_norm native_group_norm instance_norm",
    "refused",
    why="divides by a statistic of the activations, which is not piecewise affine",
)


# Overloads that ``ExportedProgram.run_decompositions`` leaves as they are (no training-IR form,
# no in-place variant, no decomposition in the table splinelens passes): a graph made of these
# only is final as exported, and its decomposition pass (about 0.6 s on first use) is skipped.
_FINAL_IR_NAMES = (
    "linear.default conv1d.default conv2d.default conv3d.default conv_transpose2d.input "
    "relu.default leaky_relu.default hardtanh.default relu6.default clamp.default "
    "prelu.default abs.default add.Tensor sub.Tensor mul.Tensor div.Tensor neg.default "
    "max_pool1d.default max_pool2d.default max_pool3d.default avg_pool2d.default "
    "adaptive_avg_pool2d.default amax.default maximum.default minimum.default cat.default "
    "stack.default pad.default view.default permute.default transpose.int select.int "
    "slice.Tensor unsqueeze.default squeeze.dim sum.dim_IntList mean.dim matmul.default "
    "sym_size.int zeros.default ones.default detach.default softmax.int log_softmax.int"
)
_FINAL_IR = frozenset(f"aten.{name}" for name in _FINAL_IR_NAMES.split()) | {
    "splinelens.spline_activation.default"
}


def final_ir(ep: torch.export.ExportedProgram) -> bool:
    """Whether every op of an exported graph is in its final form (see ``_FINAL_IR``)."""
    return all(str(n.target) in _FINAL_IR for n in ep.graph.nodes if n.op == "call_function")


def entries() -> tuple[OpInfo, ...]:
    """Every entry of the table, in the order they were added."""
    return tuple(_TABLE.values())


def info(name: str) -> OpInfo:
    """The entry of an ATen packet name; an operation not in the table is refused, saying so
    (it may be linear, like ``repeat_interleave`` or bicubic upsampling, or not)."""
    return _TABLE.get(name) or OpInfo(name, "refused", why=_UNKNOWN, fix=_UNKNOWN_FIX)


_UNKNOWN = (
    "is not in splinelens's table of operations, so the capture cannot say whether it is "
    "piecewise affine"
)
_UNKNOWN_FIX = (
    "write it with supported operations (README, 'What is supported'), or report it if it is "
    "affine or a MASO"
)


def apply_g(g: tuple[str, int] | None, logits: torch.Tensor) -> torch.Tensor:
    """The excluded output nonlinearity g = (softmax or log-softmax, its dim) on logits
    (N, *shape), or none.

    >>> apply_g(("softmax", 1), torch.zeros(2, 4)).sum(1)
    tensor([1., 1.])
    """
    if g is None:
        return logits
    name, dim = g
    return torch.log_softmax(logits, dim) if "log" in name else torch.softmax(logits, dim)


def op_name(target: Any) -> str:
    """ATen packet name of a graph target: ``aten.conv2d.default`` -> ``conv2d``."""
    name = getattr(target, "__name__", str(target))
    packet = getattr(target, "_overloadpacket", None)
    return packet.__name__ if packet is not None else name.split(".")[0]


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
    a, family = bound_args(node), info(name).family
    if family == "sign":
        return _make_sign(name, a)
    if family == "clip":
        return _make_clip(name, a)
    if family == "pairwise":
        return Pairwise("maximum" if name in ("maximum", "fmax") else "minimum")
    if family == "pool":
        return _make_pool(name, a, in_shape)
    if family == "spline":
        return Spline("spline", int(node.args[2].meta["val"].shape[0]))
    return _make_reduce(name, a, in_shape)


def _is_tensor_arg(v: Any) -> bool:
    return isinstance(v, (torch.fx.Node, torch.Tensor))


def _make_sign(name: str, a: dict[str, Any]) -> Sign | Pairwise:
    if name == "leaky_relu":
        return Sign(name, float(a["negative_slope"]))
    if name == "rrelu":  # in eval (training mode is refused): the mean of its slopes
        return Sign("leaky_relu", (float(a.get("lower", 0.125)) + float(a.get("upper", 1 / 3))) / 2)
    if name == "threshold":  # x above t, else t (another value is refused): max(x, t)
        t = float(a["threshold"])
        return Sign("relu", 0.0) if t == 0 else Sign("clamp_min", None, t)
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
        widths = [adaptive_width(s, o) for s, o in zip(spatial, out)]
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
