"""The model's output: the node the maps end at, and the output nonlinearity g after it.

Sec. 2 excludes a final softmax (or log-softmax) g: the maps are of the logits before it. What
follows g and only passes its values on (a cast such as ``.double()``, ``.clone()``,
``.contiguous()``) belongs to g too.

>>> # split_output(exported.graph) -> (logits node, softmax node or None, nodes after g)
"""

from __future__ import annotations

import torch

from splinelens._capture.nodes import op_name
from splinelens._capture.registry import info

Node = torch.fx.Node


def split_output(graph: torch.fx.Graph) -> tuple[Node, Node | None, set[Node]]:
    """(the node the maps end at, g's node if the model ends with one, the nodes after g:
    identities, float casts, and the checks export attaches to them)."""
    node = next(n for n in graph.nodes if n.op == "output")
    outs = node.args[0]
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    if len(outs) != 1 or not isinstance(outs[0], Node):
        raise ValueError(
            f"the model returns {len(outs)} values; splinelens needs forward(x) "
            "to return one tensor (e.g. the logits)"
        )
    g, after = outs[0], []
    while _passes_on(g):
        after.append(g)
        g = g.args[0]
    if not (g.op == "call_function" and info(op_name(g.target)).kind == "g"):
        return outs[0], None, set()
    tail = {g, *after}
    checks = {u for n in tail for u in n.users if not u.users and set(u.all_input_nodes) <= tail}
    return g.args[0], g, {*after, *checks}


def _passes_on(node: Node) -> bool:
    """Whether ``node`` passes its first argument's values on to the output, as floats, and is
    that argument's one use (apart from checks of it)."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], Node):
        return False
    entry = info(op_name(node.target))
    val = node.meta.get("val")
    if not (entry.identity or entry.cast) or not isinstance(val, torch.Tensor):
        return False
    uses = [u for u in node.args[0].users if u.users or u.op == "output"]
    return val.is_floating_point() and uses == [node]
