"""Greedy template matching and its optimality gap (Sec. 5.1, Theorem 2, Corollary 1, eq. (11)).

A MASO network picks, layer by layer, the piece whose template matches best: a greedy,
hierarchical template matching. The paper says it is globally optimal only when the network is
convex: then f(x) = max over all regions r of A_r x + B_r, every region's affine map being a
lower bound of f. ``template_matching_gap`` measures it: for each input x it evaluates the affine
maps of the regions of some candidate inputs x' at x, A[x'] x + B[x'] per class, takes the max
over x' (x's own region included, so the gap is >= 0) and subtracts f(x). Zero, to rounding,
for a convex network; positive where greedy matching misses a better template.

Each value A[x'] x + B[x'] is the network with x''s pieces frozen, run on x, so no (N, C, D)
tensor of slopes is ever formed: inputs and candidates go through in chunks.

>>> import torch, torch.nn as nn, splinelens as sl
>>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double().eval()
>>> x = torch.randn(5, 3, dtype=torch.float64)
>>> gap = sl.template_matching_gap(net, x, torch.randn(20, 3, dtype=torch.float64))
>>> gap.gap.shape, bool((gap.gap >= 0).all())
(torch.Size([5, 2]), True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from splinelens._checks import check_input
from splinelens._precision import exact_matmul
from splinelens.view import SplineView, view_of

__all__ = ["TemplateMatchingGap", "greedy_is_optimal", "template_matching_gap"]

Tensor = torch.Tensor
_SAMPLES_PER_PASS = 1 << 12  # (input, candidate) pairs run through the frozen network at once


@dataclass(frozen=True)
class TemplateMatchingGap:
    """max over candidate regions r (x's own included) of A_r x + B_r, minus f(x).

    ``gap`` (N, C) >= 0; ``best`` (N, C) the max itself; ``changes_class`` (N,): whether the
    best templates' top class differs from f(x)'s; ``argbest`` (N, C): the candidate whose
    region gives the max (-1: x's own region)."""

    gap: Tensor
    best: Tensor
    changes_class: Tensor
    argbest: Tensor


def template_matching_gap(
    model: nn.Module, x: Tensor, candidates: Tensor, chunk: int = _SAMPLES_PER_PASS
) -> TemplateMatchingGap:
    """For each x (N, ...): max over the regions of ``candidates`` (M, ...) and of x's own of
    A[x'] x + B[x'], minus f(x) (logits, before a trailing softmax). See the module docstring.

    >>> import torch, torch.nn as nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    >>> x = torch.randn(5, 3)
    >>> gap = template_matching_gap(net, x[:2], x[2:])
    >>> bool((gap.gap >= 0).all())  # x's own region is among the candidates
    True
    """
    view = view_of(model, x)
    check_input("candidates", candidates)
    if candidates.shape[1:] != x.shape[1:] or candidates.dtype != x.dtype or len(candidates) == 0:
        like = ", ".join(map(str, x.shape[1:]))
        raise ValueError(
            f"candidates must be a batch of inputs like x, (M >= 1, {like}) in {x.dtype}; "
            f"got {tuple(candidates.shape)} in {candidates.dtype}"
        )
    f = _logits(view, x)  # (N, C)
    best, arg = f.clone(), torch.full(f.shape, -1, dtype=torch.long, device=f.device)
    per = max(1, chunk // len(x))
    for s in range(0, len(candidates), per):
        vals = _values_at(view, x, candidates[s : s + per])  # (N, m, C)
        top, idx = vals.max(1)
        better = top > best
        best, arg = torch.where(better, top, best), torch.where(better, idx + s, arg)
    changes = best.argmax(1) != f.argmax(1)
    return TemplateMatchingGap(best - f, best, changes, arg)


def _logits(view: SplineView, x: Tensor) -> Tensor:
    prog = view.program
    with torch.no_grad(), exact_matmul():
        out = prog.record(x)[0][prog.output_name]
    return prog.per_sample(prog.output_name, out).reshape(len(x), -1)


def _values_at(view: SplineView, x: Tensor, cands: Tensor) -> Tensor:
    """A[x'_j] x_i + B[x'_j] for every pair: (N, m, C), the network with x'_j's pieces frozen."""
    prog, n, m = view.program, len(x), len(cands)
    with torch.no_grad(), exact_matmul():
        _, states = prog.record(cands)
        pairs = x.repeat_interleave(m, 0)  # (N * m, ...): x_i for candidates 0..m-1, then x_i+1
        out = prog.frozen(pairs, prog.tile_states(states, n))[prog.output_name]
    return prog.per_sample(prog.output_name, out).reshape(n, m, -1)


def greedy_is_optimal(gap: TemplateMatchingGap, f_scale: float | None = None) -> bool:
    """Whether every gap is zero to rounding: at most 1e4 machine epsilons of ``f_scale``
    (default: the largest |value|, at least 1: a gap is the difference of two passes, whose
    intermediate terms can exceed the values; pass ``f_scale`` for outputs far below 1)."""
    if f_scale is not None and not (math.isfinite(f_scale) and f_scale >= 0):
        raise ValueError(f"f_scale must be a finite number >= 0, got {f_scale!r}")
    scale = f_scale if f_scale is not None else max(float(gap.best.abs().max()), 1.0)
    return bool((gap.gap <= 1e4 * torch.finfo(gap.gap.dtype).eps * scale).all())
