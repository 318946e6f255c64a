"""Elementwise MASOs on a batch merged with other dims (``h.view(-1, C)``, then a ReLU).

A ReLU (or a leaky ReLU, abs, a clamp with constant bounds) acts entry by entry, so on any view of
its input it is the same function. Where its input holds the batch merged into one dim (sample n
of N at a * N * r + n * r + c, ``BatchAxes.layout`` (s, r)), the compiler writes it on a view
with the batch first, ``(N, ..., s, r, ...)``, and merges the result back: each sample's units
are then its own, as for any other layer, and the ops after it read the same values as before.

>>> # used by splinelens._capture.compiler while it walks the exported graph
"""

from __future__ import annotations

from typing import Any

import torch

from splinelens._capture.batch_axis import BatchAxes, holding
from splinelens._capture.nodes import op_name
from splinelens._capture.registry import info

Node = torch.fx.Node


def merged_input(node: Node, axes: BatchAxes) -> tuple[int, tuple[int, int]] | None:
    """(the dim holding the batch, its layout) of an elementwise MASO whose input holds the
    batch merged into one dim, with constant arguments besides it; None for any other node."""
    if not info(op_name(node.target)).elementwise:  # (registry)
        return None
    z, rest = node.args[0], [*node.args[1:], *node.kwargs.values()]
    if not isinstance(z, Node) or any(isinstance(a, Node) for a in rest):
        return None
    layout, val = axes.layout.get(z.name), z.meta.get("val")
    if layout is None or z.name in axes.bdims or not isinstance(val, torch.Tensor):
        return None
    held = holding(val.shape, axes.symbol)
    return (held[0], layout) if len(held) == 1 else None


def batch_first(
    graph: torch.fx.Graph, node: Node, held: int, layout: tuple[int, int]
) -> list[Node]:
    """Write ``node`` (an elementwise MASO of z) as the same op on z viewed batch first, merged
    back after: z (..., s*N*r, ...) -> (..., s, N, r, ...) -> (N, ..., s, r, ...) -> op -> back
    (s and r left out where 1). The users of ``node`` read the merged-back value; ``node`` is
    left without users. Returns the nodes written (``restore`` takes them out again)."""
    z = node.args[0]
    shape = list(z.meta["val"].shape)
    s, r = layout
    outer, inner = [s] if s > 1 else [], [r] if r > 1 else []  # (sizes 1 left out)
    split = [*shape[:held], *outer, -1, *inner, *shape[held + 1 :]]  # (the batch: -1)
    b = held + len(outer)
    perm = [b, *[d for d in range(len(split)) if d != b]]
    inverse = sorted(range(len(perm)), key=perm.__getitem__)
    merged = [*shape[:held], -1, *shape[held + 1 :]]
    aten = torch.ops.aten
    calls: list[tuple[Any, tuple, dict]] = [
        (aten.view.default, (split,), {}),
        (aten.permute.default, (perm,), {}),
        (node.target, tuple(node.args[1:]), dict(node.kwargs)),
        (aten.permute.default, (inverse,), {}),
        (aten.reshape.default, (merged,), {}),
    ]
    vals = [z.meta["val"]]  # (all computed before the graph changes)
    for target, args, kwargs in calls:
        vals.append(target(vals[-1], *args, **kwargs))
    last, new = node, []
    for (target, args, kwargs), val in zip(calls, vals[1:], strict=True):
        with graph.inserting_after(last):
            last = graph.call_function(target, (new[-1] if new else z, *args), kwargs)
        last.meta = {**node.meta, "val": val}
        new.append(last)
    node.replace_all_uses_with(last)
    return new


def restore(graph: torch.fx.Graph, node: Node, new: list[Node]) -> None:
    """Undo ``batch_first``: the users of the merged-back value read ``node`` again, and the
    nodes written for it are taken out (the program keeps its steps by name)."""
    new[-1].replace_all_uses_with(node)
    for n in reversed(new):
        graph.erase_node(n)
