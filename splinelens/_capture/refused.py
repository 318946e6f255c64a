"""The ops splinelens refuses, each with why and the fix (``registry`` reads them with the rest):
smooth functions, steps, statistics of the activations, random draws, products of activations;
and the linear ops written out before capture (an entry left in the graph was not).

>>> TABLE["gelu"].kind, TABLE["softmax"].kind
('refused', 'g')
"""

from __future__ import annotations

import functools

import torch
from torch._decomp import decomposition_table

from splinelens._capture.opinfo import OpInfo, add
from splinelens._capture.rewrites import by_torch, rnn_relu_cell

TABLE: dict[str, OpInfo] = {}
_add = functools.partial(add, TABLE)

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
    fix="call model.eval(), and build batchnorm with track_running_stats=True (the default): "
    "it is affine only with running statistics",
)
_SPLINIFY = (
    "sl.splinify(model) replaces it by a certified piecewise-affine approximation (its "
    "error bound is the spline's .sup_error); capture the network it returns, whole (in a "
    "splinified copy, functional calls are replaced when the copy runs, not when one of its "
    "submodules runs alone; nn.RNNCell and torch.ops.aten spellings are not replaced)"
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
    "hardshrink",
    "refused",
    why="jumps from 0 to +-lambda at +-lambda (a step), so it is not piecewise affine",
    fix="F.softshrink is its continuous counterpart, which sl.splinify(model) represents exactly",
)
_add(
    "exp log log1p expm1 sqrt rsqrt pow square sin cos erf erfc reciprocal",
    "refused",
    why="is a smooth function of the activations, not piecewise affine",
    fix="if it belongs to an activation, use the activation's module or function (torch.tanh, "
    "F.gelu, ...): " + _SPLINIFY,
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
    "layer_norm native_layer_norm group_norm native_group_norm rms_norm _fused_rms_norm",
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
_add(
    "sort topk kthvalue median nanmedian cummax cummin msort",
    "refused",
    why="orders the activations (a sort, a k-th largest, a running maximum): piecewise affine, "
    "but not made of the max-affine pieces splinelens reads",
    fix="a largest entry is h.amax(dim) and a largest entry per window max-pooling, both MASOs",
)
_add(
    "argsort argmax argmin",
    "refused",
    why="gives indices computed from the activations (a step function of them), which is not "
    "piecewise affine",
    fix="a largest entry is h.amax(dim), and a largest entry per window max-pooling, both MASOs",
)
_add(
    "masked_scatter put",
    "refused",
    why="writes values at places given by a mask or by flat indices over the whole batch, which "
    "splinelens does not read",
    fix="write at constant places of the features: h.index_fill(dim, idx, 0).index_add(dim, "
    "idx, v), or h * keep + v * (1 - keep) with a constant 0/1 mask",
)
_add(
    "index_reduce scatter_reduce",
    "refused",
    why="combines values by a reduction at given places ('sum', 'prod', 'mean', 'amax' or "
    "'amin'), which splinelens does not read",
    fix="for sums write index_add / scatter_add (a mean: then divide by the constant counts); "
    "a largest entry is h.amax(dim), or max-pooling",
)
_add(
    "nan_to_num",
    "refused",
    why="replaces NaN and inf, which splinelens never computes with (it refuses non-finite "
    "inputs and weights, and values that overflow), so it would only hide an overflow",
    fix="remove it from the forward pass you capture",
)
