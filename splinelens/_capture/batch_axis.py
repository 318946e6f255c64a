"""Where the batch axis is in every node: exported shapes carry a symbolic batch size.

``torch.export`` with a dynamic batch marks the batch size as a symbol (``s0``); a node's batch
dimension is the one dimension of that size. Nodes without one (constants, weights) and nodes
that merge the batch with other dimensions have no entry.

>>> # used by splinelens._capture.compiler while it walks the exported graph
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch

Node = torch.fx.Node


class BatchAxes:
    """The batch dimension (``bdims``) and per-sample shape (``shapes``) of each node."""

    def __init__(self, input_node: Node) -> None:
        self.symbol = str(input_node.meta["val"].shape[0])
        self.bdims: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        # (s, r): the one dim holding the batch has size s * N * r, sample n at a * N * r +
        # n * r + c (a < s, c < r); (1, 1) for a batch dim, carried through views (``regroup``)
        # and through ops that keep that dim's size (``record``: they do not mix along it)
        self.layout: dict[str, tuple[int, int]] = {}
        self.record(input_node)

    @property
    def dynamic(self) -> bool:
        """Whether export kept the batch size symbolic (else it specialised on it)."""
        return self.symbol.startswith("s")

    def record(self, node: Node, deps: Sequence[Node] = ()) -> None:
        """Note the node's batch dimension and per-sample shape, if it has exactly one, and its
        ``layout``: (1, 1) for a batch dim; for a batch merged into a dim, that of the ``deps``
        holding the batch in a dim of the same size (they must agree)."""
        val = _first_tensor(node)
        if val is None:
            return
        held = self._holding(val.shape)
        dims = [i for i, s in enumerate(val.shape) if str(s) == self.symbol]
        if len(dims) == 1:
            b = dims[0]
            self.bdims[node.name] = b
            self.shapes[node.name] = tuple(int(s) for i, s in enumerate(val.shape) if i != b)
            if held == [b]:
                self.layout[node.name] = (1, 1)
            return
        if len(held) != 1:
            return
        size = str(val.shape[held[0]])
        found = {self._layout_of(dep, size) for dep in deps if self._holds(dep)}
        if len(found) == 1 and None not in found:
            self.layout[node.name] = found.pop()  # type: ignore[assignment]

    def _layout_of(self, dep: Node, size: str) -> tuple[int, int] | None:
        """dep's layout if it holds the batch in one dim of this size (else None)."""
        dv, lay = _first_tensor(dep), self.layout.get(dep.name)
        if dv is None or lay is None:
            return None
        held = self._holding(dv.shape)
        return lay if len(held) == 1 and str(dv.shape[held[0]]) == size else None

    def regroup(self, node: Node, src: Node) -> bool:
        """Whether a view or reshape of ``src`` keeps the samples apart. It keeps the flat
        order: the batch stays in one dim only if the dims before it group the entries before
        the batch and the dims after it those after ((N, 6) -> (6N,) or (2N, 3) do; (N, 6) ->
        (6, N) reinterprets the samples, (3, 2N) spreads them over two dims: refused by the
        caller)."""
        val, sv, lay = _first_tensor(node), _first_tensor(src), self.layout.get(src.name)
        shape = val.shape if val is not None else ()
        held = self._holding(shape)
        if not held:
            return True
        src_held = self._holding(sv.shape) if sv is not None else []
        if lay is None or len(held) != 1 or len(src_held) != 1:
            return False
        hs, h = src_held[0], held[0]
        pre = _prod(sv.shape[:hs]) * lay[0]  # entries before the sample, one sample's after
        inner = lay[1] * _prod(sv.shape[hs + 1 :])
        before, after = _prod(shape[:h]), _prod(shape[h + 1 :])
        if pre % before or inner % after:
            return False
        out = (pre // before, inner // after)
        if str(shape[h]) == self.symbol and out != (1, 1):
            return False
        self.layout[node.name] = out
        return True

    def _holding(self, shape: Any) -> list[int]:
        return holding(shape, self.symbol)

    def _holds(self, node: Node) -> bool:
        val = _first_tensor(node)
        return val is not None and bool(self._holding(val.shape))

    def has_batch(self, node: Node) -> bool:
        """Whether the batch size appears anywhere in the node's shapes (merged dims too)."""
        val = node.meta.get("val")
        vals = val if isinstance(val, (tuple, list)) else (val,)
        return any(holding(v.shape, self.symbol) for v in vals if isinstance(v, torch.Tensor))


def holding(shape: Any, symbol: str) -> list[int]:
    """The dims of ``shape`` whose size holds the batch size ``symbol`` (the batch, or a dim it
    was merged into: ``8*s0``)."""
    return [i for i, s in enumerate(shape) if re.search(rf"\b{symbol}\b", str(s))]


def _prod(sizes: Any) -> int:
    """The product of sizes that hold no symbol."""
    return math.prod(int(s) for s in sizes)


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
