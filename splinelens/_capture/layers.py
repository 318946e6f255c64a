"""Definition-1 layers: each MASO nonlinearity of the graph (its piece, from the registry's
family and the node's arguments), named after the module it runs in.

>>> # used by splinelens._capture.compiler while it walks the exported graph
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import Any

import torch

from splinelens._capture.batch_axis import BatchAxes
from splinelens._capture.nodes import bound_args, ints
from splinelens._capture.pieces import (
    Clip,
    MasoOp,
    Pairwise,
    Pool,
    Reduce,
    Sign,
    Spline,
    adaptive_width,
)
from splinelens._capture.program import Layer
from splinelens._capture.refusals import error, module_of
from splinelens._capture.registry import info

Node = torch.fx.Node
_ACTIVATION_MODULES = {
    "ReLU",
    "LeakyReLU",
    "PReLU",
    "ReLU6",
    "Hardtanh",
    "SplineActivation",
    "MaxPool1d",
    "MaxPool2d",
    "MaxPool3d",
    "AdaptiveMaxPool1d",
    "AdaptiveMaxPool2d",
    "AdaptiveMaxPool3d",
}


def maso_layer(node: Node, name: str, maso: MasoOp, axes: BatchAxes, index: int) -> Layer:
    """The layer of MASO node ``node`` (ATen op ``name``), checked against the batch axis."""
    src = node.args[0]
    out = _tuple_value(node, name) if isinstance(node.meta["val"], (tuple, list)) else node
    if node.name not in axes.bdims:
        raise error(
            node,
            name,
            "acts on a tensor without a single batch dimension "
            "(the batch is merged with other dimensions)",
            "keep the batch dimension separate, e.g. reshape to (N, ...) before it",
        )
    bdim, rank = axes.bdims[node.name], src.meta["val"].dim()
    if getattr(maso, "nd", 0) and bdim != 0:
        raise error(node, name, "pools a tensor whose first dimension is not the batch")
    dims = [d % rank for d in getattr(maso, "dims", ())]
    if dims and axes.bdims[src.name] in dims:  # (a pairwise op's src may be a constant)
        raise error(
            node,
            name,
            "reduces over the batch dimension",
            "reduce over the feature dimensions only",
        )
    state_bdim = bdim - (sum(d < bdim for d in dims) if getattr(maso, "keepdim", False) else 0)
    shape = axes.shapes[node.name]
    label = _label(node, maso.kind)
    return Layer(
        index,
        label,
        maso.kind,
        shape,
        math.prod(shape),
        maso.pieces,
        out.name,
        node.name,
        state_bdim,
    )


def _tuple_value(node: Node, name: str) -> Node:
    """The getitem node holding the values of an op returning (values, indices)."""
    users = {u.args[1]: u for u in node.users if u.target is operator.getitem}
    if 1 in users and users[1].users:
        raise error(
            node,
            name,
            "uses the argmax indices as data (max_unpool, or indexing by them), which splinelens "
            "does not read",
            "keep only the values (to upsample, use F.interpolate or a transposed conv rather "
            "than max_unpool)",
        )
    if 0 not in users:
        raise error(node, name, "has no used output")
    return users[0]


def _label(node: Node, kind: str) -> str:
    path, cls = module_of(node)
    if path and cls in _ACTIVATION_MODULES:
        return path
    return f"{path}.{kind}" if path else kind


def unique_names(layers: list[Layer]) -> tuple[Layer, ...]:
    """Layers whose names repeat get ``[i]`` suffixes, in execution order."""
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer.name] = counts.get(layer.name, 0) + 1
    seen: dict[str, int] = {}
    out = []
    for layer in layers:
        name = layer.name
        if counts[name] > 1:
            seen[name] = seen.get(name, -1) + 1
            name = f"{name}[{seen[name]}]"
        out.append(dataclasses.replace(layer, name=name))
    return tuple(out)


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


def _make_sign(name: str, a: dict[str, Any]) -> Sign:
    if name == "leaky_relu":
        return Sign(name, float(a["negative_slope"]))
    if name == "rrelu":  # in eval (training mode is refused): the mean of its slopes
        return Sign("leaky_relu", (float(a.get("lower", 0.125)) + float(a.get("upper", 1 / 3))) / 2)
    if name == "threshold":  # x above t, else t (another value is refused): max(x, t)
        t = float(a["threshold"])
        return Sign("relu", 0.0) if t == 0 else Sign("clamp_min", None, t)
    if name in ("prelu", "_prelu_kernel"):
        return Sign("prelu", None)
    if name in ("clamp_min", "clamp_max"):  # (tensor bounds are maximum / minimum: registry)
        return Sign(name, None, float(a["min" if name == "clamp_min" else "max"]))
    return Sign(name, 0.0 if name == "relu" else -1.0)


def _make_clip(name: str, a: dict[str, Any]) -> Sign | Clip:
    if name == "relu6":
        return Clip(name, 0.0, 6.0)
    lo, hi = (a["min_val"], a["max_val"]) if name == "hardtanh" else (a["min"], a["max"])
    # (scalar bounds: tensor ones are max and min, ``rewrites.clamp_tensor``)
    if lo is None:
        return Sign("clamp_max", None, float(hi))
    if hi is None:
        return Sign("clamp_min", None, float(lo))
    return Clip(name, float(lo), float(hi))


def _make_pool(name: str, a: dict[str, Any], in_shape: Sequence[int]) -> Pool:
    nd = int(name.split("pool")[1][0])
    spatial = tuple(int(s) for s in in_shape[-nd:])
    if name.startswith("adaptive"):
        out = ints(a["output_size"], nd)
        out = tuple(o if o is not None else s for o, s in zip(out, spatial))
        widths = [adaptive_width(s, o) for s, o in zip(spatial, out)]
        return Pool(name, nd, output_size=out, pieces=math.prod(widths), in_spatial=spatial)
    k = ints(a["kernel_size"], nd)
    pool = Pool(
        name,
        nd,
        kernel=k,
        stride=ints(a["stride"], nd, k),
        padding=ints(a["padding"], nd, 0),
        dilation=ints(a["dilation"], nd, 1),
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
