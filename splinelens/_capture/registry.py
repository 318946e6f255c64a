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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch._decomp import decomposition_table

from splinelens._capture import arguments, mixing
from splinelens._capture.rewrites import (
    by_torch,
    clamp_tensor,
    copy_into,
    eval_batch_norm,
    reshape_view,
    rnn_relu_cell,
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
    bicubic interpolation's); ``view``: a view or copy through which a parameter keeps its name.
    ``family``: the MASO kind built by ``make_maso``. ``rewrite``: the function run in place of the
    op (canonicalisation). ``why``/``fix``: the refusal. ``vmap_backward``: PyTorch batches its
    backward under ``vmap`` (convolutions and max-pooling loop over the vmapped rows instead).
    ``mixes``: the dims of an operand that one output entry reads several entries along
    (``mixing``), which must not hold the batch; None for ops that keep every dim apart.
    ``check``: the refusal of arguments that make the op something else (``arguments``);
    ``cast``: a dtype cast (refused when it rounds the activations). ``renames``: overloads that
    are another op of the table (``max.other`` is ``maximum``). ``terms``: for sums, (argument
    position, sign, keyword that scales it) of each term. ``slice_start``: where a slice's
    start, end and step arguments begin. ``decompose``: overloads written out before capture.
    ``random``: draws random numbers (refused wherever it is, on activations or not).
    ``identity``: returns its first argument's values (graphs are compared without it).
    """

    name: str
    kind: str
    operands: tuple[int, ...] = ()
    regroups: bool = False
    coefficients: str = ""
    bias: int | None = None
    terms: tuple[tuple[int, float, str], ...] = ()
    view: bool = False
    family: str = ""
    rewrite: Callable[..., Any] | None = None
    vmap_backward: bool = True
    mixes: mixing.Rule | None = None
    check: Callable[[arguments.Call], arguments.Refusal] | None = None
    cast: bool = False
    renames: tuple[tuple[str, str], ...] = ()
    slice_start: int | None = None
    decompose: tuple[tuple[Any, Callable[..., Any]], ...] = ()
    random: bool = False
    identity: bool = False
    why: str = ""
    fix: str = ""

    @property
    def signed(self) -> bool:
        """A sum whose terms carry signs (a subtracted convex term breaks convexity)."""
        return bool(self.terms)


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
_add("scatter_add", "affine", mixes=mixing.added_into("src"), check=arguments.scatter_add)
_add("index_add", "affine", terms=((0, 1.0, ""), (3, 1.0, "alpha")), check=arguments.index_add)
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
_add("cat concat stack", "affine")
_add("where masked_fill", "affine", check=arguments.selection)
# Sums: (argument position, sign, keyword that scales it) of each term.
_add("add", "affine", terms=((0, 1.0, ""), (1, 1.0, "alpha")))
_add("sub", "affine", terms=((0, 1.0, ""), (1, -1.0, "alpha")))
_add("rsub", "affine", terms=((0, -1.0, "alpha"), (1, 1.0, "")))
_add("neg", "affine", terms=((0, -1.0, ""),))
# Products: affine as long as at most one of these argument positions holds an activation.
_add("linear", "affine", operands=(0, 1), coefficients="weights", bias=2)
for _nd in ["1d", "2d", "3d"]:
    _add(
        f"conv{_nd} conv_transpose{_nd}", "affine", operands=(0, 1), coefficients="weights", bias=2
    )
_add("convolution", "affine", operands=(0, 1), coefficients="weights", bias=2)
_add("mm bmm matmul mv", "affine", operands=(0, 1), coefficients="weights")
_add(
    "addmm baddbmm addmv",
    "affine",
    operands=(1, 2),
    coefficients="weights",
    bias=0,
    terms=((0, 1.0, "beta"),),
)
_add("einsum", "affine", operands=(1,), coefficients="weights")
_add("mul", "affine", operands=(0, 1), coefficients="scalars")
_add("div true_divide", "affine", operands=(1,), coefficients="scalars", check=arguments.div)
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
_add("clip", "maso", family="clip", renames=(("default", "clamp"),))
_set("clamp_min", decompose=((torch.ops.aten.clamp_min.Tensor, torch.maximum),))
_set("clamp_max", decompose=((torch.ops.aten.clamp_max.Tensor, torch.minimum),))
_set(  # tensor bounds: two pairwise MASOs (``clamp_tensor``)
    "clamp clip",
    decompose=(
        (torch.ops.aten.clamp.Tensor, clamp_tensor),
        (torch.ops.aten.clip.Tensor, clamp_tensor),
    ),
)
_add(
    "max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices "
    "max_pool3d_with_indices adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d",
    "maso",
    family="pool",
)
_add("amax amin", "maso", family="reduce")
_add("max", "maso", family="reduce", check=arguments.extreme, renames=(("other", "maximum"),))
_add("min", "maso", family="reduce", check=arguments.extreme, renames=(("other", "minimum"),))
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
# Arguments that make an op something else (``arguments``), casts, slices.
_set("clamp clip", check=arguments.clamp)
_set("threshold", check=arguments.threshold)
_set("rrelu", check=arguments.rrelu)
_set(
    "batch_norm dropout feature_dropout alpha_dropout feature_alpha_dropout",
    check=arguments.training,
)
_set("native_dropout", check=arguments.native_dropout)
_set("_to_copy to type_as", cast=True)
_set("alias detach clone contiguous lift_fresh_copy", identity=True)
_set("slice slice_copy", slice_start=2)
_set("slice_scatter", slice_start=3)
# What each op mixes: the batch dimension must not be among those dims (``mixing``).
_set("mm", mixes=mixing.contracts({"self": (1,), "mat2": (0,)}))
_set("addmm", mixes=mixing.contracts({"mat1": (1,), "mat2": (0,)}))
_set("bmm", mixes=mixing.contracts({"self": (2,), "mat2": (1,)}))
_set("baddbmm", mixes=mixing.contracts({"batch1": (2,), "batch2": (1,)}))
_set("mv", mixes=mixing.contracts({"self": (1,), "vec": (0,)}))
_set("addmv", mixes=mixing.contracts({"mat": (1,), "vec": (0,)}))
_set("linear", mixes=mixing.contracts({"input": (-1,), "weight": (-1,)}))
_set("channel_shuffle", mixes=mixing.contracts({"self": (1,)}))
_set("matmul", mixes=mixing.matmul)
_set("einsum", mixes=mixing.einsum)
_set("index", mixes=mixing.indexed)
_set("repeat tile", mixes=mixing.repeated)
_set("repeat_interleave", mixes=mixing.interleaved)
_set("cumsum", mixes=mixing.along("dim"))
_set("index_add", mixes=mixing.added_into("source"))
# (slice_scatter: src written into a slice of self; a full slice mixes nothing)
_set("slice slice_copy slice_scatter", mixes=mixing.sliced)
_set("select_scatter", mixes=mixing.scattered)
_set("copy", mixes=mixing.along())  # (src broadcast over dst: each entry from one entry)
_set("roll", mixes=mixing.rolled)
_set("sum mean amax amin", mixes=mixing.reduced)
_set("max min", mixes=mixing.extreme)
_set("constant_pad_nd pad", mixes=mixing.padded)
_set("flip", mixes=mixing.along("dims"))
_set("diagonal", mixes=mixing.along("dim1", "dim2"))
_set("unfold", mixes=mixing.along("dimension"))
_set("gather", mixes=mixing.gathered)
_set(
    "index_select narrow select select_copy split split_with_sizes chunk unbind cat concat",
    mixes=mixing.along("dim"),
)
_set(
    "conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d convolution",
    mixes=mixing.conv,
)
for _nd in (1, 2, 3):
    _set(
        f"avg_pool{_nd}d adaptive_avg_pool{_nd}d max_pool{_nd}d max_pool{_nd}d_with_indices "
        f"adaptive_max_pool{_nd}d upsample_nearest{_nd}d _upsample_nearest_exact{_nd}d",
        mixes=mixing.spatial(_nd),
    )
    _set(f"reflection_pad{_nd}d replication_pad{_nd}d", mixes=mixing.padded)
_set(
    "_adaptive_avg_pool2d upsample_bilinear2d _upsample_bilinear2d_aa upsample_bicubic2d "
    "_upsample_bicubic2d_aa col2im",
    mixes=mixing.spatial(2),
)
_set("upsample_linear1d", mixes=mixing.spatial(1))
_set(
    "upsample_trilinear3d _adaptive_avg_pool3d pixel_shuffle pixel_unshuffle im2col",
    mixes=mixing.spatial(3),
)
# Written out as linear maps and ReLUs before capture (torch keeps them whole).
_add(
    "rnn_relu rnn_relu_cell",
    "refused",
    why="is an RNN the capture writes out before it walks the graph, yet it was left whole",
    decompose=(
        (torch.ops.aten.rnn_relu.input, decomposition_table[torch.ops.aten.rnn_relu.input]),
        (torch.ops.aten.rnn_relu.data, decomposition_table[torch.ops.aten.rnn_relu.data]),
        (torch.ops.aten.rnn_relu_cell.default, rnn_relu_cell),
    ),
)
# Linear ops torch keeps whole, written out by torch's own decompositions (``by_torch``).
for _name, _pairs in by_torch().items():
    _add(_name, "refused", why="is written out before capture, yet was left", decompose=_pairs)
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
    "bernoulli rand rand_like randn randn_like randint randint_like normal uniform exponential "
    "cauchy log_normal geometric multinomial randperm poisson normal_functional random",
    "refused",
    random=True,
    why="draws random numbers (dropout in training mode, noise), so the network is not one "
    "function of its input",
    fix="call model.eval(), give functional dropouts training=False, remove the noise",
)
_add(
    "gt lt ge le eq ne sign heaviside round floor ceil trunc frac remainder fmod",
    "refused",
    why="is a step function of the activations (a comparison, a rounding), which splinelens "
    "cannot split into MASO pieces",
    fix="use relu / max / clamp instead (torch.where(h > 0, h, 0) is torch.relu(h))",
)
_add(
    "layer_norm native_layer_norm group_norm native_group_norm instance_norm rms_norm "
    "_fused_rms_norm",
    "refused",
    why="divides by a statistic of the activations, which is not piecewise affine",
)
_add(
    "linalg_vector_norm norm frobenius_norm cdist _cdist_forward _euclidean_dist cosine_similarity",
    "refused",
    why="is a norm, distance or cosine of the activations: a Euclidean one is not piecewise "
    "affine, and splinelens reads the others only written out",
    fix="an L1 or max norm is piecewise affine: write it as h.abs().sum(dim) or h.abs().amax(dim)",
)
_add(
    "tan atan asin acos sinh cosh asinh acosh atanh atan2 hypot logit logsumexp glu xlogy",
    "refused",
    why="is a smooth function of the activations, not piecewise affine",
)
_add(
    "lstm gru lstm_cell gru_cell bilinear _trilinear",
    "refused",
    why="multiplies activation-dependent tensors (an LSTM's or GRU's gates, a bilinear form), "
    "which is not piecewise affine",
    fix="use nn.RNN(nonlinearity='relu'), linear layers and ReLUs",
)


def decompositions() -> dict[Any, Callable[..., Any]]:
    """Overload -> function: the ops written out before capture (``OpInfo.decompose``)."""
    return {op: fn for entry in _TABLE.values() for op, fn in entry.decompose}


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
