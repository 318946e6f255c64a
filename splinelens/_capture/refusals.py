"""Why an operation cannot be part of a piecewise-affine network, said where it happens.

Each check reads the op's registry entry and the graph node, and raises
``UnsupportedOperationError`` naming the ATen op, the module path and source line, the reason
and the fix.

>>> # used by splinelens._capture.compiler while it walks the exported graph
"""

from __future__ import annotations

from typing import Any

import torch

from splinelens._capture.batch_axis import holding
from splinelens._capture.registry import OpInfo, bound_args, info
from splinelens.errors import UnsupportedOperationError

Node = torch.fx.Node


def error(node: Node, name: str, why: str, fix: str = "") -> UnsupportedOperationError:
    """The refusal of ``node`` (ATen op ``name``), located at its module and source line."""
    return UnsupportedOperationError(f"aten.{name}", location(node), why, fix)


def check_kind(node: Node, name: str, precision: torch.dtype | None = None) -> str:
    """The op's kind ('affine' or 'maso'), or its refusal (g inside the net, refused, integer,
    a cast to less precision than both its input and ``precision``, the input x's dtype)."""
    entry = info(name)
    kind = entry.kind
    if name in ("max", "min"):
        kind = _max_overload(node, name)
    if kind in ("g", "refused"):
        raise error(node, name, entry.why, entry.fix)
    if not _floating(node):
        raise error(
            node,
            name,
            "turns activations into integers or booleans (a step function), which is not "
            "piecewise affine",
        )
    if name in _CASTS:
        _check_widening(node, name, precision)
    if name in ("threshold", "rrelu", "clamp"):
        _check_arguments(node, name)
    return kind


def _check_arguments(node: Node, name: str) -> None:
    """Refuse arguments that make an op of the table something else: a threshold whose value is
    not its threshold (a jump), rrelu in training mode (random slopes), a clamp with constant
    min > max (the constant max)."""
    args = [*node.args, None, None, None][:4]
    bounds = [a for a in args[1:3] if isinstance(a, (int, float))]
    if name == "clamp" and len(bounds) == 2 and bounds[0] > bounds[1]:
        raise error(
            node,
            name,
            f"has min {bounds[0]} > max {bounds[1]}: torch.clamp is then the constant max, "
            f"not a clip",
            "write the constant, or give min <= max",
        )
    if name == "threshold" and args[1] != args[2]:
        raise error(
            node,
            name,
            f"jumps from {args[2]} to {args[1]} at its threshold (a step), so it is not "
            f"piecewise affine",
            "use nn.Threshold(t, t), which is max(x, t), or a ReLU",
        )
    if name == "rrelu" and (args[3] or node.kwargs.get("training")):
        raise error(node, name, "draws random slopes in training mode", "call model.eval()")


_CASTS = frozenset({"_to_copy", "to", "type_as"})


def _check_widening(node: Node, name: str, precision: torch.dtype | None) -> None:
    """Refuse a cast of activations to a floating dtype of less precision than theirs and x's
    (``h.half()``, ``torch.autocast``): it rounds them, a step function; A x + B would miss f(x)
    by more than x's precision. (Back to x's dtype after a wider one is x's own rounding.)"""
    src, out = node.args[0].meta.get("val"), node.meta.get("val")
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return
    if not src.dtype.is_floating_point:
        return
    eps = torch.finfo(out.dtype).eps
    if eps > torch.finfo(src.dtype).eps and eps > torch.finfo(precision or src.dtype).eps:
        raise error(
            node,
            name,
            f"rounds the activations from {src.dtype} to {out.dtype} (a cast to less precision, "
            f"as .half() or torch.autocast make), so A x + B would miss f(x) by the rounding",
            f"remove the cast (or the autocast), or run the whole model and x in {out.dtype}",
        )


def _max_overload(node: Node, name: str) -> str:
    if node.target._overloadname in ("other", "dim"):
        return "maso"
    raise error(
        node,
        name,
        "reduces over every dimension, the batch included",
        "reduce over the feature dimensions only",
    )


def check_affine(node: Node, name: str, act: set[str]) -> None:
    """Refuse affine-looking ops used non-affinely: products of two activations, division by one,
    rounding, selections by an activation-dependent condition, training-mode batchnorm."""
    entry, a = info(name), bound_args(node)
    if entry.operands:
        _check_product(node, name, entry, list(a.values()), act)
        if name == "div" and a.get("rounding_mode") is not None:
            raise error(node, name, "rounds the quotient (a step function)")
    elif name in ("where", "masked_fill"):
        if _is_act(a.get("condition", a.get("mask")), act):
            raise error(
                node,
                name,
                "selects with a condition computed from the activations (a step function), "
                "which splinelens cannot split into MASO pieces",
                "use relu / max / clamp instead",
            )
    elif name in ("batch_norm", "dropout", "native_dropout") and a.get("train", a.get("training")):
        raise error(node, name, "runs in training mode", "call model.eval()")


def _check_product(node: Node, name: str, entry: OpInfo, vals: list[Any], act: set[str]) -> None:
    flat = [v for i in entry.operands if i < len(vals) for v in _flat(vals[i])]
    if sum(isinstance(v, Node) and v.name in act for v in flat) > 1:
        raise error(
            node, name, "multiplies two activation-dependent tensors, which is not piecewise affine"
        )
    if name == "div" and _is_act(vals[1], act):
        raise error(
            node,
            name,
            "divides by an activation, which is not affine",
            "softsign x / (1 + |x|)? sl.splinify(model) replaces nn.Softsign / F.softsign by a "
            "certified spline",
        )


def check_batch_kept(node: Node, name: str, act: set[str], symbol: str) -> None:
    """Refuse an op that mixes an activation's batch dimension (registry ``mixes``): a dim whose
    size holds the batch size ``symbol`` (the batch, or a dim it was merged into) that one
    output entry reads several entries along (a contraction, a convolution, a pool, an index,
    a reduction, a partial slice...): samples would be mixed, reordered or dropped."""
    rule = info(name).mixes
    if rule is None:
        return
    a = bound_args(node)
    for which, pos, dep in _activations(a, act):
        val = dep.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        held = set(holding(val.shape, symbol))
        mixed = rule(a, which, pos, val.dim()) if held else set()
        if mixed is None or held & mixed:
            raise error(
                node,
                name,
                "works along the batch dimension, so samples are mixed, reordered or dropped",
                "each input must pass through the network on its own",
            )


def _activations(a: dict[str, Any], act: set[str]) -> list[tuple[str, int, Node]]:
    """(argument name, position in a list argument, node) of each activation argument."""
    out = []
    for which, v in a.items():
        for pos, u in enumerate(v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(u, Node) and u.name in act:
                out.append((which, pos, u))
    return out


def module_of(node: Node) -> tuple[str, str]:
    """(module path, class name) of the innermost module the node was traced in."""
    stack = node.meta.get("nn_module_stack") or {}
    path, cls = list(stack.values())[-1] if stack else ("", "")
    cls = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path, cls.rsplit(".", 1)[-1]


def location(node: Node) -> str:
    """Where a node comes from: its module and the last source line of its stack trace."""
    path, cls = module_of(node)
    where = f"module '{path}' ({cls})" if path else "the model's forward"
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    files = [ln.strip() for ln in trace if ln.strip().startswith("File ")]
    return where + (f", {files[-1]}" if files else "")


def _flat(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (tuple, list)) else [v]


def _is_act(v: Any, act: set[str]) -> bool:
    return any(isinstance(u, Node) and u.name in act for u in _flat(v))


def _floating(node: Node) -> bool:
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    tensors = [v for v in vals if isinstance(v, torch.Tensor)]
    return not tensors or tensors[0].dtype.is_floating_point
