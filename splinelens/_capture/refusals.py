"""Why an operation cannot be part of a piecewise-affine network, said where it happens.

Each check reads the op's registry entry (its kind, whether it is a cast or a product, the
check of its arguments from ``arguments``) and the graph node, and raises
``UnsupportedOperationError`` naming the ATen op, the module path and source line, the reason
and the fix.

>>> # used by splinelens._capture.compiler while it walks the exported graph
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from splinelens._capture.arguments import Call
from splinelens._capture.batch_axis import holding
from splinelens._capture.nodes import bound_args, op_name, overload
from splinelens._capture.registry import OpInfo, info, known
from splinelens.errors import UnsupportedOperationError

Node = torch.fx.Node


def error(node: Node, name: str, why: str, fix: str = "") -> UnsupportedOperationError:
    """The refusal of ``node`` (ATen op ``name``), located at its module and source line, naming
    the op the user wrote where a decomposition wrote it out (``lerp`` as sums and a ``ge``);
    where that op is refused in the registry (``F.softshrink`` written out as a ``gt``), for
    its own reason."""
    original = node.meta.get("original_aten")
    source = f"aten.{op_name(original)}" if original is not None else f"aten.{name}"
    fn = str((node.meta.get("torch_fn") or ("", name))[1]).rsplit(".", 1)[-1]
    if source == f"aten.{name}" and fn != name and known(fn) and info(fn).kind == "refused":
        source, why, fix = f"torch's {fn}", info(fn).why, info(fn).fix  # ('module.softshrink')
    if source == f"aten.{name}":
        what = source
    elif source.startswith("torch's"):  # (an op refused by itself, written out before capture)
        what = f"{source} (written out as aten.{name})"
    else:
        what = f"aten.{name} (from {source})"
    return UnsupportedOperationError(what, location(node), why, fix)


def check_op(node: Node, name: str, act: set[str], precision: torch.dtype | None = None) -> str:
    """The op's kind ('affine' or 'maso'), or its refusal: g inside the net, refused, integer,
    a cast to less precision than both its input and ``precision`` (the input x's dtype), a
    product of two activations, arguments its registry ``check`` refuses (``arguments``), or an
    output whose size depends on tensor values."""
    entry = info(name)
    if entry.kind in ("g", "refused"):
        raise error(node, name, entry.why, entry.fix)
    if not _floating(node):
        val = node.meta.get("val")
        complex_ = isinstance(val, torch.Tensor) and val.is_complex()
        raise error(
            node,
            name,
            "turns activations into complex numbers, which splinelens does not follow"
            if complex_
            else "turns activations into integers or booleans (a step function), which is not "
            "piecewise affine",
        )
    a = bound_args(node)
    if entry.cast:
        _check_widening(node, name, precision)
    if entry.operands:
        _check_product(node, name, entry, list(a.values()), act)
    refusal = (
        entry.check(Call(a, overload(node), lambda v: _is_act(v, act))) if entry.check else None
    )
    if refusal is not None:
        raise error(node, name, *refusal)
    _check_batch_values(node, name, a, act)
    _check_sizes(node, name)
    return entry.kind


_SHAPES = frozenset({"size", "shape", "sizes"})  # arguments that give a shape, not values


def _check_batch_values(node: Node, name: str, a: dict[str, Any], act: set[str]) -> None:
    """Refuse an op that computes with values made from the batch size (``h * (N // 6)``,
    indices ``arange(N) // 6``): an input's output then depends on its batch, and the
    batch-agreement probe tries only a few sizes. Sizes used as shapes (``idx.expand(N, -1)``,
    ``h.view(N, -1)``) are not values; activations were checked where they were made."""
    data = [u for k, v in a.items() if k not in _SHAPES for u in _flat(v)]
    seen = {n: False for n in act}  # (the walk stops at activations)
    if any(isinstance(u, Node) and (_sym(u) or _batch_valued(u, seen)) for u in data):
        raise error(
            node,
            name,
            "computes with a number or tensor made from the batch size (x.shape[0], an arange "
            "to it: indices, factors), so samples are mixed: an input's output depends on its "
            "batch",
            "use constants (indices made outside forward, or expanded to the batch)",
        )


def _batch_valued(v: Node, seen: dict[str, bool]) -> bool:
    """Whether a tensor's values depend on a symbolic size (the batch's, the only dynamic one):
    some op before it takes a size as data (arange's end, a fill value), not as a shape."""
    if v.name not in seen:
        seen[v.name] = False
        args = bound_args(v) if hasattr(v.target, "_schema") else {}
        data = [u for k, u in args.items() if k not in _SHAPES]
        sized = any(isinstance(u, Node) and _sym(u) for x in data for u in _flat(x))
        seen[v.name] = sized or any(_batch_valued(u, seen) for u in v.all_input_nodes)
    return seen[v.name]


def _sym(v: Node) -> bool:
    return isinstance(v.meta.get("val"), torch.SymInt)


def _check_sizes(node: Node, name: str) -> None:
    """Refuse an op on activations whose output size depends on tensor values (a boolean mask,
    ``nonzero``, repeats given as a tensor): export cannot say which entries it keeps."""
    if free_unbacked_symbols(node.meta.get("val")):
        raise error(
            node,
            name,
            "makes a tensor whose size depends on the values of another (a boolean mask, "
            "nonzero, repeats given as a tensor), so the capture cannot say which entries it keeps",
            "index with positions fixed outside forward: a tensor of indices kept as a buffer",
        )


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


def _check_product(node: Node, name: str, entry: OpInfo, vals: list[Any], act: set[str]) -> None:
    flat = [v for i in entry.operands if i < len(vals) for v in _flat(vals[i])]
    if sum(isinstance(v, Node) and v.name in act for v in flat) > 1:
        raise error(
            node, name, "multiplies two activation-dependent tensors, which is not piecewise affine"
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
