"""Exact affine maps of a network's region: f(x) = A[x] x + B[x] (Sec. 4, eqs. (5)-(9)).

An ``AffineMap`` holds the partition states of a batch of inputs (ReLU masks, max-pool argmaxes).
Frozen at those states, the network is affine; ``B`` is that network evaluated at zero (a couple
of forward passes), ``A`` (the slopes; row c of the end-to-end map is the class-c template, Sec.
5) is materialised lazily by reverse-mode differentiation of the frozen network, in chunks.

>>> import torch, torch.nn as nn, splinelens as sl
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
>>> x = torch.randn(5, 4)
>>> amap = sl.affine_map(net, x)
>>> amap.A.shape, amap.B.shape
(torch.Size([5, 3, 4]), torch.Size([5, 3]))
>>> torch.allclose(torch.einsum("ncd,nd->nc", amap.A, x) + amap.B, net(x), atol=1e-5)
True
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ._precision import exact_matmul

if TYPE_CHECKING:
    from .view import SplineView

Tensor = torch.Tensor
_GRAPH_BUDGET = 1 << 30  # bytes of retained activations per chunk when A is materialised


@dataclass
class AffineMap:
    """The affine map z_end = A z_start + B of x's region, from node ``start`` to node ``end``.

    ``start``/``end`` are the input, a layer's output, or the network's output (before the
    output nonlinearity g). Nodes that feed ``end`` without passing through ``start`` (skip
    connections around it) are held at their value for x and land in ``B``.
    """

    view: SplineView
    x: Tensor  # (N, *input_shape)
    start: str
    end: str
    states: dict[str, Tensor]
    z_start: Tensor  # (N, *start_shape): the start node's value for x
    output: Tensor  # (N, *end_shape): the end node's value for x

    @property
    def start_shape(self) -> tuple[int, ...]:
        return tuple(self.z_start.shape[1:])

    @property
    def end_shape(self) -> tuple[int, ...]:
        return tuple(self.output.shape[1:])

    @functools.cached_property
    def B(self) -> Tensor:
        """Offsets, (N, *end_shape): the frozen network with z_start = 0."""
        return self(torch.zeros_like(self.z_start))

    @functools.cached_property
    def A(self) -> Tensor:
        """Slopes, (N, *end_shape, *start_shape); end to end, row c is the class-c template."""
        return self.templates().reshape(len(self.x), *self.end_shape, *self.start_shape)

    def __call__(self, z: Tensor) -> Tensor:
        """Apply the frozen map to other start values z, (N, *start_shape) -> (N, *end_shape)."""
        prog = self.view.program
        with torch.no_grad(), exact_matmul():
            env = prog.run(
                self.x, states=self.states, inject=(self.start, self._node(z)), stop=self.end
            )
        return prog.per_sample(self.end, env[self.end])

    def templates(self, rows: Sequence[int] | None = None, chunk_size: int | None = None) -> Tensor:
        """Rows of A (classes, end to end) for every input: (N, len(rows), *start_shape).

        ``rows`` index the flattened end shape (default: all). Inputs are processed in chunks of
        ``chunk_size`` (default: sized to keep about 1 GiB of activations alive).
        """
        rows = list(range(math.prod(self.end_shape))) if rows is None else list(rows)
        n = len(self.x)
        out = self.z_start.new_empty(n, len(rows), *self.start_shape)  # (N, R, *start_shape)
        step = chunk_size or self.view._chunk_for_grad()
        with exact_matmul():
            for s in range(0, n, step):
                out[s : s + step] = self._chunk_rows(s, min(s + step, n), rows)
        return out

    def _chunk_rows(self, s: int, e: int, rows: list[int]) -> Tensor:
        prog = self.view.program
        states = self.view._slice_states(self.states, s, e)
        leaf = self.z_start[s:e].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            env = prog.run(
                self.x[s:e], states=states, inject=(self.start, self._node(leaf)), stop=self.end
            )
            y = prog.per_sample(self.end, env[self.end]).reshape(e - s, -1)  # (n, R_total)
            out = leaf.new_zeros(e - s, len(rows), *self.start_shape)
            if not y.requires_grad:
                return out  # end does not depend on start: A = 0
            for j, r in enumerate(rows):
                (g,) = torch.autograd.grad(
                    y[:, r].sum(), leaf, retain_graph=j < len(rows) - 1, allow_unused=True
                )
                if g is not None:
                    out[:, j] = g
        return out

    def _node(self, z: Tensor) -> Tensor:
        return self.view.program.from_sample(self.start, z)
