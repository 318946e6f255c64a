"""Certified continuous piecewise-affine (PWL) fits of activations on all of R.

``fit_activation(name, tol=... | pieces=...)`` returns a ``SplineFit``: K affine pieces, the two
outer ones unbounded, joined continuously, with ``sup_error`` a *computed* upper bound of
sup over x in R of |f(x) - p(x)| ("A Spline Theory of Deep Networks", Balestriero & Baraniuk
2018, Sec. 4: smooth activations are approximated arbitrarily closely by affine splines).

Construction (for K pieces). The tails have the asymptotes' slopes; their end knots sit where the
tail error |r|/2 reaches a level, r = f - asymptote, balanced against the inner error by a damped
fixed point. The K-2 inner pieces get knots equidistributing sqrt(E_j)/h_j (de Boor, E_j the
interpolation error of piece j; about a density sqrt|f''|), forced knots (where f' jumps) kept.
The vertex values then solve a minimax LP (HiGHS) on a grid, the tails' errors included, moving
them off the curve: a best approximation, about half the interpolant's error.

Certificate: ``sup_error`` is computed by ``splinelens.smooth.certificate`` (its docstring says
how and why it bounds the error on all of R).

>>> fit = fit_activation("gelu", pieces=16)
>>> fit.pieces, tuple(fit.knots.shape)
(16, (15,))
>>> x = torch.linspace(-100, 100, 20001, dtype=torch.float64)
>>> bool((fit(x) - torch.nn.functional.gelu(x)).abs().max() <= fit.sup_error < 0.01)
True
>>> fit_activation("hardsigmoid", tol=1e-6).sup_error
0.0
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import scipy.optimize
import scipy.sparse
import torch

from splinelens.smooth.activations import (
    ACTIVATIONS,
    Curve,
    Exact,
    activation,
    activation_function,
)
from splinelens.smooth.certificate import bound, residual

__all__ = ["ACTIVATIONS", "SplineFit", "activation_function", "certify", "fit_activation"]

Tensor = torch.Tensor
F64 = torch.float64
MAX_PIECES = 4096  # largest K fitted (the LP grows like K)
LP_POINTS = 16  # grid points per inner piece in the minimax LP
PILOT = 512  # pieces of the fine mesh that seeds the knot placement
Params = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class SplineFit:
    """A continuous piecewise-affine function with K pieces (two unbounded tails included)."""

    name: str  # activation name, e.g. "gelu"
    knots: Tensor  # (K-1,) float64, strictly increasing
    slopes: Tensor  # (K,) float64
    intercepts: Tensor  # (K,) float64; piece k = bucketize(x, knots): (knots[k-1], knots[k]]
    sup_error: float  # certified bound of sup_R |f - p| (0.0 for exactly PWL functions)

    @property
    def pieces(self) -> int:
        """K, the number of affine pieces."""
        return int(self.slopes.numel())

    def __call__(self, x: Tensor) -> Tensor:
        """p(x) elementwise, computed in float64 and returned in x's floating dtype."""
        x64 = x.to(F64)
        k = torch.bucketize(x64, self.knots.to(x.device))
        slope = self.slopes.to(x.device)[k]
        x64 = torch.where((slope == 0) & x64.isinf(), 0.0, x64)  # (a flat tail at +-inf: 0 * inf)
        y = slope * x64 + self.intercepts.to(x.device)[k]
        return y.to(x.dtype) if x.is_floating_point() else y


def fit_activation(
    name: str, *, tol: float | None = None, pieces: int | None = None, **params: float
) -> SplineFit:
    """The certified PWL fit of ``name``: fewest pieces with ``sup_error <= tol``, or ``pieces``.

    Deterministic and cached per (name, parameters, tol | pieces); each call gets its own tensors.

    >>> fit = fit_activation("tanh", tol=1e-2)
    >>> fit.sup_error <= 1e-2
    True
    """
    entry = activation(name)
    spec = entry.spec(**params)  # ValueError on unknown or bad parameters
    key: Params = tuple(sorted({**entry.defaults, **params}.items()))
    kmin = min_pieces(spec)
    if (tol is None) == (pieces is None):
        raise ValueError("fit_activation needs exactly one of tol= or pieces=")
    if pieces is not None:
        if isinstance(pieces, bool) or not isinstance(pieces, int):
            raise ValueError(f"pieces must be an int, got {pieces!r}")
        if not kmin <= pieces <= MAX_PIECES:
            raise ValueError(
                f"{name}: pieces must be in [{kmin}, {MAX_PIECES}] "
                f"(two tails and a piece between consecutive forced knots), got {pieces}"
            )
        fit = _fit_pieces(name, key, pieces)
    else:
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
            raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
        fit = _fit_tol(name, key, float(tol))
    _check_fit(name, params, fit)
    return replace(
        fit, knots=fit.knots.clone(), slopes=fit.slopes.clone(), intercepts=fit.intercepts.clone()
    )


def _check_fit(name: str, params: dict[str, float], fit: SplineFit) -> None:
    """Refuse a fit that broke down (knots out of order, slopes past float64) rather than
    return it with a bound that does not describe it: parameters far outside the fitter's
    scale (softplus with beta 1e12, CELU with alpha 1e-9)."""
    pieces = torch.cat([fit.knots, fit.slopes, fit.intercepts])
    if bool((fit.knots.diff() > 0).all()) and bool(torch.isfinite(pieces).all()):
        return
    raise ValueError(
        f"{name} with {params or 'its defaults'}: the fit breaks down at this scale (its knots "
        f"would not increase, or its slopes overflow); bring the parameters nearer to 1 "
        f"(softplus(x, beta) = softplus(beta x) / beta: scale the layer before it instead)"
    )


def min_pieces(spec: Curve | Exact) -> int:
    """The fewest pieces a fit of ``spec`` can have: two tails and one per forced segment."""
    if isinstance(spec, Exact):
        return len(spec.knots) + 1
    return 3 + sum(spec.x_left < t < spec.x_right for t in spec.forced)


@functools.lru_cache(maxsize=256)
def _fit_tol(name: str, params: Params, tol: float) -> SplineFit:
    """Doubling/model-guided search then bisection over K: K meets tol, K-1 does not."""
    spec = activation(name).spec(**dict(params))
    kmin = min_pieces(spec)
    if isinstance(spec, Exact):
        return _fit_pieces(name, params, kmin)
    floor = _switch_floor(spec)
    if tol <= floor:
        raise ValueError(
            f"{name}: tol={tol:g} is below {floor:.3g}, half the gap where PyTorch switches to x "
            "(raise threshold)"
        )
    lo, hi, k = kmin - 1, None, max(kmin, 16)  # lo misses tol (or is too few), hi meets it
    for step in range(64):
        err = _fit_pieces(name, params, k).sup_error
        lo, hi = (lo, k) if err <= tol else (k, hi)
        if hi is not None and hi - lo <= 1:
            return _fit_pieces(name, params, hi)
        if hi is None and k >= MAX_PIECES:
            raise ValueError(f"{name}: tol={tol:g} needs more than {MAX_PIECES} pieces")
        # error ~ (K-2)^-2: aim straight at tol, bisect once the model stops closing in
        guess = 2 + math.ceil((k - 2) * math.sqrt((err - floor) / (tol - floor)))
        if hi is not None and step >= 5:
            guess = (lo + hi) // 2
        k = min(max(guess, lo + 1), MAX_PIECES if hi is None else hi - 1)
    raise RuntimeError("K search did not converge")  # unreachable: (lo, hi) shrinks every step


@functools.lru_cache(maxsize=1024)
def _fit_pieces(name: str, params: Params, k: int) -> SplineFit:
    """The fit with exactly k pieces, certified."""
    spec = activation(name).spec(**dict(params))
    if isinstance(spec, Exact):
        return _exact(name, spec, k)
    knots = _on_grid(_layout(spec, k), spec.switch)  # (k-1,)
    values = _best_values(spec, knots)  # (k-1,)
    slopes, intercepts = _coefficients(spec, knots, values)
    err = bound(spec, knots, slopes, intercepts)
    return SplineFit(name, knots, slopes, intercepts, err)


def _exact(name: str, spec: Exact, k: int) -> SplineFit:
    """An exactly PWL activation with k pieces: its own, the span between its two knots split."""
    own = torch.tensor(spec.knots, dtype=F64)  # (2,): the catalogue's exact entries
    inner = torch.linspace(own[0], own[-1], k - own.numel() + 1, dtype=F64)[1:-1]
    knots = torch.cat([own[:1], _on_grid(inner, math.inf), own[1:]]) if len(inner) else own
    mid = torch.cat([knots[:1] - 1, (knots[1:] + knots[:-1]) / 2, knots[-1:] + 1])  # (k,)
    idx = torch.bucketize(mid, own)  # the own piece holding each new piece
    slopes = torch.tensor(spec.slopes, dtype=F64)[idx]
    intercepts = torch.tensor(spec.intercepts, dtype=F64)[idx]
    return SplineFit(name, knots, slopes, intercepts, 0.0)


def _on_grid(knots: Tensor, switch: float) -> Tensor:
    """The knots moved onto a grid of step 2^-e <= min gap / 8 (inner ones to the nearest
    point, the end ones outward, never past ``switch``), so that a spline activation finds
    each input's piece by an exact table lookup (``splinelens._capture.spline_op``).

    The values and the certificate are computed for the moved knots; moving them by at most
    1/16 of the smallest gap costs nothing measurable."""
    if len(knots) < 2:
        return knots
    gap = float(knots.diff().min())
    step = 2.0 ** min(0, max(-40, math.floor(math.log2(gap / 8))))
    m = torch.round(knots / step)
    m[0] = math.floor(float(knots[0]) / step)
    m[-1] = math.ceil(float(knots[-1]) / step)
    if m[-1] * step > switch:
        m[-1] = math.floor(switch / step)
    return m * step


def _switch_floor(c: Curve) -> float:
    """|r(switch)|/2: a right tail starting at or before the switch has at least this error."""
    if math.isinf(c.switch):
        return 0.0
    return residual(c, torch.tensor([c.switch], dtype=F64), 1).abs().item() / 2


def _tail_knot(c: Curve, side: int, level: float) -> float:
    """The end knot nearest c's monotone threshold whose lone tail error |r|/2 is <= level.

    |r| is nonincreasing outward: the first of 256 geometric steps out to 1e12 that meets the
    level brackets it, 256 even steps within the bracket close in on it (two calls of f).
    """
    x0 = c.x_left if side < 0 else c.x_right
    d = torch.cat([torch.zeros(1, dtype=F64), torch.logspace(-4, 12, 255, dtype=F64)])  # (256,)
    for rnd in range(2):
        ok = torch.nonzero(residual(c, x0 + side * d, side).abs() / 2 <= level).flatten()
        i = int(ok[0]) if ok.numel() else d.numel() - 1
        if i == 0 or rnd == 1:
            break
        d = torch.linspace(d[i - 1].item(), d[i].item(), 256, dtype=F64)
    return x0 + side * d[i].item()


def _layout(c: Curve, k: int) -> Tensor:
    """(k-1,) knots: the tails' level balanced against half the inner interpolation error."""
    level = 0.25 / (k - 2) ** 2
    for _ in range(8):
        tl, tr = _tail_knot(c, -1, level), min(_tail_knot(c, 1, level), c.switch)
        tl = min(tl, tr - 1e-3)  # at least one inner piece of some width
        knots, e_int = _inner_knots(c, tl, tr, k - 2)
        new = math.sqrt(level * e_int / 2)  # damped step toward the best approximation's error
        if abs(new / level - 1) < 0.02:
            break
        level = new
    return knots


def _inner_knots(c: Curve, tl: float, tr: float, m: int, iters: int = 5) -> tuple[Tensor, float]:
    """(m+1,) knots on [tl, tr] equalising interpolation errors (de Boor), and their max error."""
    inside = [t for t in c.forced if tl < t < tr]
    breaks = torch.tensor([tl, *inside, tr], dtype=F64)  # (s+1,) segment ends, always knots
    knots = _pilot(breaks)
    for _ in range(iters):
        e = _interp_errors(c, knots)  # (n,)
        rho = e.clamp(min=max(1e-6 * e.max().item(), 1e-300)).sqrt() / knots.diff()
        knots = _equidistribute(knots, rho, breaks, m)
    return knots, _interp_errors(c, knots).max().item()


def _pilot(breaks: Tensor) -> Tensor:
    """A fine mesh of about PILOT pieces, uniform in asinh(x) within each segment."""
    u = torch.asinh(breaks)  # (s+1,)
    counts = (u.diff() / (u[-1] - u[0]) * PILOT).ceil().clamp(min=8).long().tolist()
    parts = []
    for i, n in enumerate(counts):
        part = torch.sinh(torch.linspace(u[i], u[i + 1], n + 1, dtype=F64))[:-1]
        part[0] = breaks[i]
        parts.append(part)
    return torch.cat([*parts, breaks[-1:]])


def _interp_errors(c: Curve, knots: Tensor, n: int = 9) -> Tensor:
    """(m,) max |f - chord| over n interior sample points of each piece."""
    lam = torch.linspace(0, 1, n + 2, dtype=F64)[1:-1]  # (n,)
    x = knots[:-1, None] + lam * knots.diff()[:, None]  # (m, n)
    fx = c.f(torch.cat([knots, x.flatten()]))  # one call: knots, then samples
    fk, fx = fx[: knots.numel()], fx[knots.numel() :].view_as(x)
    return (fx - (fk[:-1, None] + lam * fk.diff()[:, None])).abs().amax(1)


def _equidistribute(knots: Tensor, rho: Tensor, breaks: Tensor, m: int) -> Tensor:
    """(m+1,) knots with equal mass of the piecewise-constant density rho (n,); breaks kept."""
    cdf = torch.cat([rho.new_zeros(1), (rho * knots.diff()).cumsum(0)])  # (n+1,)
    at = cdf[torch.searchsorted(knots, breaks)]  # (s+1,) breaks are knots
    out = [breaks[:1]]
    for s, count in enumerate(_allocate(at.diff(), m)):
        levels = at[s] + at[s + 1 : s + 2].sub(at[s]) * torch.arange(1, count, dtype=F64) / count
        i = torch.searchsorted(cdf, levels).clamp(1, cdf.numel() - 1)  # (count-1,)
        w = (levels - cdf[i - 1]) / (cdf[i] - cdf[i - 1])
        out += [knots[i - 1] + w * (knots[i] - knots[i - 1]), breaks[s + 1 : s + 2]]
    return torch.cat(out)


def _allocate(mass: Tensor, m: int) -> list[int]:
    """m pieces over segments in proportion to mass, at least one each (largest remainders)."""
    raw = (mass / mass.sum() * m).tolist()
    counts = [max(1, math.floor(r)) for r in raw]
    while sum(counts) < m:
        counts[max(range(len(raw)), key=lambda i: raw[i] - counts[i])] += 1
    while sum(counts) > m:
        big = [i for i in range(len(raw)) if counts[i] > 1]
        counts[max(big, key=lambda i: counts[i] - raw[i])] -= 1
    return counts


def _best_values(c: Curve, knots: Tensor) -> Tensor:
    """(n,) vertex values minimising the max error on LP_POINTS per piece and the tails.

    Variables w = (v - f(knots))/S and z = E/S, S the interpolant's error, so HiGHS works at O(1).
    Each grid point gives |res/S - (1-l) w_j - l w_j+1| <= z (res: f minus the interpolant), each
    tail |r(t)/S + w| <= z (its error at infinity, |v - asymptote(t)|; at t it is a grid point).
    """
    n = knots.numel()
    lam = torch.linspace(0, 1, LP_POINTS, dtype=F64)  # (P,)
    fk = c.f(knots)  # (n,)
    x = knots[:-1, None] + lam * knots.diff()[:, None]  # (n-1, P)
    res = (c.f(x) - (fk[:-1, None] + lam * fk.diff()[:, None])).flatten()  # (G,)
    ends = torch.cat([residual(c, knots[:1], -1), residual(c, knots[-1:], 1)])  # (2,)
    scale = max(res.abs().max().item(), ends.abs().max().item(), 1e-300)
    b = torch.cat([res, -res, torch.stack([-ends[0], ends[0], -ends[1], ends[1]])]) / scale
    cost = [0.0] * n + [1.0]
    a = _lp_matrix(n - 1, lam)
    sol = scipy.optimize.linprog(cost, a, b.numpy(), bounds=(None, None), method="highs")
    if sol.status != 0:
        raise RuntimeError(f"minimax LP failed: {sol.message}")
    return fk + scale * torch.from_numpy(sol.x[:n]).to(F64)


def _lp_matrix(m: int, lam: Tensor) -> scipy.sparse.csr_array:
    """(2G+4, m+2) constraint rows of ``_best_values``: +-grid rows, then the tails'; z is last."""
    g, n = m * lam.numel(), m + 1
    j = torch.arange(m).repeat_interleave(lam.numel())  # (G,) piece of each grid point
    w = lam.repeat(m)  # (G,) its position in the piece
    row = torch.arange(g)
    rows = torch.cat([row, row, row + g, row + g, 2 * g + torch.arange(4)])
    cols = torch.cat([j, j + 1, j, j + 1, torch.tensor([0, 0, n - 1, n - 1])])
    vals = torch.cat([1 - w, w, w - 1, -w, torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=F64)])
    every = torch.arange(2 * g + 4)  # -z in every row
    rows, cols = torch.cat([rows, every]), torch.cat([cols, torch.full_like(every, n)])
    vals = torch.cat([vals, -torch.ones(every.numel(), dtype=F64)])
    coo = scipy.sparse.coo_array((vals.numpy(), (rows.numpy(), cols.numpy())), (2 * g + 4, n + 1))
    return coo.tocsr()


def _coefficients(c: Curve, knots: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(k,) slopes and intercepts of the PWL through (knots, v) with the asymptotes' tail slopes."""
    s = v.diff() / knots.diff()  # (k-2,)
    sl, sr = torch.tensor([c.left[0]], dtype=F64), torch.tensor([c.right[0]], dtype=F64)
    slopes = torch.cat([sl, s, sr])
    intercepts = torch.cat(
        [v[:1] - sl * knots[:1], v[:-1] - s * knots[:-1], v[-1:] - sr * knots[-1:]]
    )
    return slopes, intercepts


def certify(fit: SplineFit, **params: float) -> float:
    """A certified bound of sup_R |f - p| for any PWL ``fit`` (continuous or not) of fit.name's f.

    E.g. for a fit whose coefficients were rounded to float32. Tails whose slopes differ from the
    asymptotes' give inf. Exactly PWL activations are certified the same way (with M = 0).
    """
    spec = activation(fit.name).spec(**params)
    if isinstance(spec, Exact):  # its outer pieces are its asymptotes, its knots forced
        f = activation_function(fit.name, **params)
        left, right = (spec.slopes[0], spec.intercepts[0]), (spec.slopes[-1], spec.intercepts[-1])
        spec = Curve(f, 0.0, left, right, spec.knots[0], spec.knots[-1], forced=spec.knots)
    knots, slopes, intercepts = (
        t.detach().to(F64) for t in (fit.knots, fit.slopes, fit.intercepts)
    )
    if slopes[0] != spec.left[0] or slopes[-1] != spec.right[0]:
        return math.inf
    return bound(spec, knots, slopes, intercepts)
