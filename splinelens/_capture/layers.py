"""Definition-1 layers: each MASO nonlinearity of the graph, named after the module it runs in.

>>> # used by splinelens._capture.compiler while it walks the exported graph
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch

from splinelens._capture.batch_axis import BatchAxes
from splinelens._capture.pieces import MasoOp
from splinelens._capture.program import Layer
from splinelens._capture.refusals import error, module_of

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
    if axes.bdims[src.name] in dims:
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
        raise error(node, name, "uses the argmax indices as data")
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
