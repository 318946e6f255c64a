"""The certificate of a PWL fit: a computed upper bound of sup over x in R of |f(x) - p(x)|.

Certificate (what ``sup_error`` is). With p affine on an inner piece [a, b] and f' Lipschitz there
(|f''| <= M, the catalogue's proven bound), e = f - p has |e''| <= M, so between neighbouring grid
points x_i < x_i+1 (gap g) e differs from its chord by at most g^2/8 M, and the chord lies between
e(x_i) and e(x_i+1): sup_[a,b] |e| <= max_grid |e| + g^2/8 M. The grid includes a and b and is fine
enough that g^2/8 M <= 1% of the error found on a rough grid; 64 eps (1 + |f| + |p|'s terms) covers
float64 rounding (PyTorch's own float64 f included). On a tail (-inf, t] the error is r(x) - d, d
the constant offset of p from the asymptote; r is monotone beyond t and tends to 0, so the sup is
exactly max(|d|, |r(t) - d|). ``sup_error`` is the max over all pieces. Softplus: PyTorch returns x
itself (the right asymptote) for beta*x > threshold, so the right tail starts at threshold/beta at
the latest; there its error -d is already counted, and the bound holds for both the smooth f and
PyTorch's. It bounds the error in exact arithmetic; evaluating p at a huge |x| in float64 adds the
rounding of slope*x, a few eps*|x|.
"""

from __future__ import annotations

import torch

from splinelens.smooth.activations import Curve

__all__ = ["bound", "residual"]

Tensor = torch.Tensor
F64 = torch.float64
EPS = torch.finfo(F64).eps
SLACK = 0.01  # certificate grid: g^2/8 * M <= SLACK * the rough error
ROUGH_INTERVALS = 15  # grid intervals per cell of the rough pass that sizes the grid


def residual(c: Curve, x: Tensor, side: int) -> Tensor:
    """r(x) = f(x) - asymptote(x) on the left (side -1) or right (side 1)."""
    slope, intercept = c.left if side < 0 else c.right
    return c.f(x) - (slope * x + intercept)


def bound(c: Curve, knots: Tensor, slopes: Tensor, intercepts: Tensor) -> float:
    """The module docstring's bound of sup_R |f - p| for the PWL p with these knots, slopes
    and intercepts: cells (pieces cut at forced knots), exact tails.

    >>> from splinelens.smooth.activations import activation
    >>> softplus = activation("softplus").spec(beta=1.0, threshold=20.0)
    >>> knots = torch.tensor([0.0], dtype=F64)
    >>> slopes, intercepts = torch.tensor([0.0, 1.0], dtype=F64), torch.zeros(2, dtype=F64)
    >>> round(bound(softplus, knots, slopes, intercepts), 6)  # p = relu: off by softplus(0) = log 2
    0.693147
    """
    lo = min(knots[0].item(), c.x_left, c.switch)  # PyTorch's f = x beyond its switch
    hi = max(knots[-1].item(), c.x_right)
    more = [t for t in (*c.forced, c.switch) if lo < t < hi]
    cuts = torch.cat([knots, torch.tensor([lo, hi, *more], dtype=F64)]).unique()  # sorted
    cuts = cuts[(cuts >= lo) & (cuts <= hi)]
    a, b = cuts[:-1], cuts[1:]  # (m,) cells: p affine, f' Lipschitz on each
    piece = torch.bucketize((a + b) / 2, knots)  # (m,) p's piece on each cell
    s, c0 = slopes[piece], intercepts[piece]
    rough = _cell_errors(c, a, b, s, c0, torch.full_like(a, ROUGH_INTERVALS))[0]  # sizes the grid
    tails = [_tail_error(c, -1, lo, intercepts[0]), _tail_error(c, 1, hi, intercepts[-1])]
    target = max(rough.max().item() if a.numel() else 0.0, *tails, 1e-300)
    curv = c.curvature(a, b)  # (m,) bound of |f''| on each cell
    h = (8 * SLACK * target / curv.clamp(min=1e-300)).sqrt()
    n = ((b - a) / h).ceil().clamp(min=1, max=1e6)  # (m,) grid intervals per cell
    emax, mag = _cell_errors(c, a, b, s, c0, n)
    gap = (b - a) / n  # g^2/8 M bounds e between grid points (module docstring)
    excess = torch.where(a >= c.switch, residual(c, a, 1).abs(), 0.0)  # PyTorch's f = x there
    inner = emax + gap**2 / 8 * curv + 64 * EPS * (1 + mag) + excess
    return max(inner.max().item() if a.numel() else 0.0, *tails)


def _cell_errors(
    c: Curve, a: Tensor, b: Tensor, s: Tensor, c0: Tensor, n: Tensor
) -> tuple[Tensor, Tensor]:
    """(m,) max |f - (s x + c0)| on n+1 even grid points of each [a, b] (ends included), and
    the max of |f| + |s x| + |c0| there (the rounding scale)."""
    n = n.long()
    cell = torch.repeat_interleave(torch.arange(a.numel()), n + 1)  # (N,)
    i = torch.arange(cell.numel()) - (torch.cumsum(n + 1, 0) - (n + 1))[cell]
    x = torch.where(i == n[cell], b[cell], a[cell] + (i / n[cell]) * (b - a)[cell])  # (N,)
    fx, sx = c.f(x), s[cell] * x
    e = (fx - (sx + c0[cell])).abs()
    mag = fx.abs() + sx.abs() + c0[cell].abs()
    emax = torch.zeros_like(a).scatter_reduce(0, cell, e, "amax")
    return emax, torch.zeros_like(a).scatter_reduce(0, cell, mag, "amax")


def _tail_error(c: Curve, side: int, t: float, intercept: Tensor) -> float:
    """max(|d|, |r(t) - d|) + rounding: the sup of |r - d| beyond the end t, d = p - asymptote.

    Right of PyTorch's softplus switch f = x and the error is -d: counted too.
    """
    slope, b = c.left if side < 0 else c.right
    x = torch.tensor([t], dtype=F64)
    d = intercept.reshape(1) - b  # constant: the tail has the asymptote's slope
    r = residual(c, x, side)
    margin = 64 * EPS * (1 + c.f(x).abs() + abs(slope * t) + abs(b) + intercept.abs())
    return (torch.maximum(d.abs(), (r - d).abs()) + margin).item()
