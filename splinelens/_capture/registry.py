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

import functools
from collections.abc import Callable
from typing import Any

import torch

from splinelens._capture import arguments, mixing, refused
from splinelens._capture.opinfo import OpInfo, add, amend
from splinelens._capture.rewrites import clamp_tensor, copy_into, eval_batch_norm, reshape_view

__all__ = ["OpInfo", "decompositions", "entries", "info"]

_TABLE: dict[str, OpInfo] = {}
_add = functools.partial(add, _TABLE)
_set = functools.partial(amend, _TABLE)


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
# writes at constant places: a constant written over self, or activations added there (an
# activation written over self is refused: PyTorch's backward counts a place written twice twice)
_add("index_put", "affine", mixes=mixing.put, check=arguments.index_put)
_add("scatter", "affine", mixes=mixing.gathered, check=arguments.scatter)
_add("index_fill", "affine", mixes=mixing.along("dim"), check=arguments.index_fill)
_add("index_copy", "affine", mixes=mixing.along("dim"), check=arguments.index_copy)
# detach would hide paths from autograd; it is the identity
_add("detach", "affine", rewrite=torch.ops.aten.alias.default, view=True)
_add(
    "_native_batch_norm_legit_no_training",
    "affine",
    coefficients="bn_weight",
    rewrite=eval_batch_norm,
)
_set("batch_norm", coefficients="bn_weight")
# on running statistics (eval mode), instance norm is batchnorm's per-channel affine map
_add("instance_norm", "affine", coefficients="bn_weight", check=arguments.input_stats)
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
_add("spline_activation", "maso", family="spline")
# entry by entry on any view (not PReLU: its weight is read along dim 1)
_set(
    "relu leaky_relu abs clamp_min clamp_max rrelu threshold hardtanh relu6 clamp clip",
    elementwise=True,
)  # splinelens' own op (``sl.splinify``)
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
_TABLE.update(refused.TABLE)  # (none of them is read)


def decompositions() -> dict[Any, Callable[..., Any]]:
    """Overload -> function: the ops written out before capture (``OpInfo.decompose``)."""
    return {op: fn for entry in _TABLE.values() for op, fn in entry.decompose}


def entries() -> tuple[OpInfo, ...]:
    """Every entry of the table, in the order they were added."""
    return tuple(_TABLE.values())


def known(name: str) -> bool:
    """Whether the table has an entry for this ATen packet name."""
    return name in _TABLE


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
