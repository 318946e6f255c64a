"""Where the batch axis is in every node: exported shapes carry a symbolic batch size.

``torch.export`` with a dynamic batch marks the batch size as a symbol (``s0``); a node's batch
dimension is the one dimension of that size. Nodes without one (constants, weights) and nodes
that merge the batch with other dimensions have no entry.

>>> # used by splinelens._capture.compiler while it walks the exported graph
"""

from __future__ import annotations

import math

import torch

Node = torch.fx.Node


class BatchAxes:
    """The batch dimension (``bdims``) and per-sample shape (``shapes``) of each node."""

    def __init__(self, input_node: Node) -> None:
        self.symbol = str(input_node.meta["val"].shape[0])
        self.bdims: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.pre: dict[str, int] = {}  # entries before the batch in the flat order, per sample
        self.record(input_node)

    @property
    def dynamic(self) -> bool:
        """Whether export kept the batch size symbolic (else it specialised on it)."""
        return self.symbol.startswith("s")

    def record(self, node: Node, deps: list[Node] = ()) -> None:  # type: ignore[assignment]
        """Note the node's batch dimension and per-sample shape, if it has exactly one; else,
        for a batch merged into another dim, where the batch is in the flat order (kept by an
        elementwise op on one of ``deps`` of the same shape, and by ``regroup``)."""
        val = _first_tensor(node)
        if val is None:
            return
        dims = [i for i, s in enumerate(val.shape) if str(s) == self.symbol]
        if len(dims) == 1:
            b = dims[0]
            self.bdims[node.name] = b
            self.shapes[node.name] = tuple(int(s) for i, s in enumerate(val.shape) if i != b)
            self.pre[node.name] = math.prod(int(s) for s in val.shape[:b])
            return
        for dep in deps:
            dv = _first_tensor(dep)
            if dep.name in self.pre and dv is not None and str(dv.shape) == str(val.shape):
                self.pre[node.name] = self.pre[dep.name]

    def regroup(self, node: Node, src: Node) -> bool:
        """Whether a view or reshape of ``src`` keeps the samples apart: it keeps the flat
        order, so a dim of the batch size is the batch only where as many entries precede it
        (``(N, 6).reshape(6, N)`` reinterprets the samples: refused by the caller)."""
        val, pre = _first_tensor(node), self.pre.get(src.name)
        shape = val.shape if val is not None else ()
        dims = [i for i, s in enumerate(shape) if str(s) == self.symbol]
        if len(dims) != 1:
            if pre is not None:
                self.pre[node.name] = pre  # merged: the batch stays where it was
            return True
        return pre == math.prod(int(s) for s in shape[: dims[0]])

    def has_batch(self, node: Node) -> bool:
        """Whether the batch size appears anywhere in the node's shapes (merged dims too)."""
        val = node.meta.get("val")
        vals = val if isinstance(val, (tuple, list)) else (val,)
        return any(
            self.symbol in str(s) for v in vals if isinstance(v, torch.Tensor) for s in v.shape
        )


def _first_tensor(node: Node) -> torch.Tensor | None:
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        val = val[0]
    return val if isinstance(val, torch.Tensor) else None


def is_tensor(node: Node) -> bool:
    """Whether the node's value is (or holds) a tensor."""
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    return any(isinstance(v, torch.Tensor) for v in vals)
