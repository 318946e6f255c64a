"""The region around an input: its exact radius, its inequalities, and the local complexity.

x's region is the convex polytope where every unit keeps x's piece. With the earlier layers frozen
at x's states, unit k's candidates are affine in the input, so the region is
{y : g_kj(y) = cand_k,w(y) - cand_k,j(y) >= 0 for every unit k and every other piece j}, w being
x's piece. Its *radius* (the largest ball around x on which the network is one affine map) is the
smallest distance g_kj(x) / ||grad g_kj|| to those hyperplanes.

Cost: the gradients come from forward passes of the frozen network along the input's coordinate
directions, batched: about D + D / T forward passes per input (D input entries, T directions per
pass), whatever the number of units; memory is N x T x the activations of one sample per chunk.

>>> import torch, torch.nn as nn, splinelens as sl
>>> net = nn.Sequential(nn.Linear(2, 1), nn.ReLU()).double().eval()
>>> with torch.no_grad():
...     _ = net[0].weight.copy_(torch.tensor([[3.0, 4.0]])), net[0].bias.zero_()
>>> sl.region_radius(net, torch.tensor([[1.0, 1.0]], dtype=torch.float64))   # |3 + 4| / 5
tensor([1.4000], dtype=torch.float64)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn

from splinelens._checks import (
    check_dtype,
    check_finite,
    check_input,
    check_overflow,
    check_positive_int,
    unwrap_model,
    user_stacklevel,
)
from splinelens._precision import exact_matmul
from splinelens._twin import float64_twin, said_of_twin
from splinelens.geometry.units import UnitTable, slot_tangents, unit_table
from splinelens.view import SplineView, view_of

__all__ = [
    "LocalComplexity",
    "RegionPolytope",
    "local_complexity",
    "region_polytope",
    "region_radius",
    "sampled_local_complexity",
    "unit_distances",
]

Tensor = torch.Tensor
_BUDGET = 1 << 28  # bytes of activations per batched pass


@dataclass(frozen=True)
class _Constraints:
    """One layer's constraints g_kj >= 0 at x: margins (N, K, R) and gradient norms, as
    ``scale * sqrt(sq_norm)`` (scaled as LAPACK's nrm2: the squares neither overflow for weights
    of 1e155 nor vanish for weights of 1e-200)."""

    margin: Tensor
    sq_norm: Tensor  # sum of (gradient / scale)^2
    scale: Tensor  # the largest |gradient entry|

    def distances(self) -> Tensor:
        """(N, K) each unit's distance to its nearest boundary hyperplane (inf: none)."""
        d = (self.margin.clamp_min(0) / self.scale) / self.sq_norm.sqrt()
        return torch.where(self.scale > 0, d, torch.full_like(d, math.inf)).amin(-1)


def _constraints(view: SplineView, x: Tensor, chunk: int, offset: int) -> list[_Constraints]:
    """Margins and squared gradient norms of every layer's constraints at x (one input batch,
    inputs ``offset`` on)."""
    tables = [unit_table(view.program, la) for la in view.layers]
    d = math.prod(x.shape[1:])
    basis = torch.eye(d, dtype=x.dtype, device=x.device).view(d, *x.shape[1:])
    wins: list[Tensor] = []
    margins: list[Tensor] = []
    sums: list[Tensor] = []
    scales: list[Tensor] = []
    for s in range(0, d, chunk):
        res = slot_tangents(view.program, tables, x, basis[s : s + chunk], offset=offset)
        if s == 0:
            for (z, _), table in zip(res, tables):
                cand = table.values(z)  # (N, K, R), -inf for positions outside a window
                win = cand.argmax(-1, keepdim=True)  # x's piece (ties: the first, as PyTorch)
                wins.append(win)
                margins.append(cand.gather(-1, win) - cand)  # +inf against invalid pieces
                sums.append(torch.zeros_like(cand))
                scales.append(torch.zeros_like(cand))
        for i, ((_, dz), table, win) in enumerate(zip(res, tables, wins)):
            dc = table.values(dz, tangent=True)  # (N, T, K, R)
            dg = dc.gather(-1, win.unsqueeze(1).expand(*dc.shape[:-1], 1)) - dc
            new = torch.maximum(scales[i], dg.abs().amax(1))  # (N, K, R)
            safe = torch.where(new > 0, new, torch.ones_like(new))
            sums[i] = sums[i] * (scales[i] / safe) ** 2 + ((dg / safe.unsqueeze(1)) ** 2).sum(1)
            scales[i] = new
    return [_Constraints(m, q, c) for m, q, c in zip(margins, sums, scales)]


def _batches(view: SplineView, x: Tensor) -> tuple[int, int]:
    """(inputs, directions) per pass so that one pass holds about _BUDGET bytes."""
    per_sample = sum(math.prod(s) for s in view.program.shapes.values()) * x.element_size()
    d = math.prod(x.shape[1:])
    t = max(1, min(d, _BUDGET // max(1, per_sample * 4)))
    return max(1, _BUDGET // max(1, per_sample * (t + 1))), t


def unit_distances(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Per layer, (N, K): each unit's distance from x to its boundary hyperplanes, states frozen.

    Exact for the first layer; for deeper ones it is the distance to the unit's hyperplane as
    seen from x's region (the linearised local geometry). ``inf``: the unit is constant there.
    Computed in float64 (``_exact_view``), returned in x's dtype.
    """
    view, x64, _twin = _exact_view(model, x)
    return [d.to(x.dtype) for d in _unit_distances(view, x64)]


def _exact_view(model: nn.Module, x: Tensor) -> tuple[SplineView, Tensor, nn.Module]:
    """The view of the model's float64 twin (``float64_twin``) and x in float64, after checking
    x against the model: the region geometry runs in float64 whatever the model's dtype. (In
    float32 a margin near a boundary is a difference of nearly equal numbers: a radius came out
    1% off, and changed with the other inputs of the batch.) Also the twin: a cached view holds
    its model weakly, and a twin that is not kept lives as long as the caller holds it."""
    model = unwrap_model(model)
    check_input("x", x, values=False)  # (its values: by view_of, as for any view)
    check_dtype(model, x)
    try:
        twin = float64_twin(model)
    except ValueError as e:  # a model that cannot be copied: in its own dtype, as said
        warnings.warn(f"{e}; computing in {x.dtype} instead", stacklevel=user_stacklevel())
        return view_of(model, x), x, model
    x64 = x.double()
    with said_of_twin(model, twin, x):
        return view_of(twin, x64), x64, twin


def _unit_distances(view: SplineView, x: Tensor) -> list[Tensor]:
    n_chunk, t = _batches(view, x)
    parts = [_constraints(view, x[i : i + n_chunk], t, i) for i in range(0, len(x), n_chunk)]
    return [torch.cat([p[layer].distances() for p in parts]) for layer in range(len(view.layers))]


def region_radius(model: nn.Module, x: Tensor) -> Tensor:
    """(N,) the exact radius of the largest ball around each x inside its region of the
    partition (one partition code): the smallest distance from x to the hyperplanes of its
    region's units (Sec. 7), computed in float64 whatever the model's dtype and returned in
    x's; ``inf`` for an affine network. The network is affine on that ball, and may be on a
    larger one where a unit's change does not reach the output.

    >>> import torch, torch.nn as nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    >>> x = torch.randn(5, 3)
    >>> r = region_radius(net, x)  # (N,): the largest ball around x inside its region
    >>> r.shape, bool((r > 0).all())
    (torch.Size([5]), True)
    """
    dists = unit_distances(model, x)
    out = torch.full((len(x),), math.inf, dtype=x.dtype, device=x.device)
    for d in dists:
        if d.shape[1]:
            out = torch.minimum(out, d.amin(1))
    return out


@dataclass(frozen=True)
class LocalComplexity:
    """Unit hyperplanes near inputs: ``counts`` (N, L, len(radii)) per layer and radius."""

    radii: Tensor
    counts: Tensor
    layers: tuple[str, ...]

    @property
    def total(self) -> Tensor:
        """(N, len(radii)) all layers together."""
        return self.counts.sum(1)


def local_complexity(model: nn.Module, x: Tensor, radii: Tensor | list[float]) -> LocalComplexity:
    """How many unit hyperplanes lie within distance r of each x, per layer (linearised, exact
    for layer 1): a density of the partition around the data.

    >>> import torch, torch.nn as nn, splinelens as sl
    >>> net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2)).double().eval()
    >>> lc = sl.local_complexity(net, torch.randn(4, 3, dtype=torch.float64), [0.1, 1.0, 100.0])
    >>> lc.counts.shape, bool((lc.counts[..., -1] <= 16).all())
    (torch.Size([4, 1, 3]), True)
    """
    radii = _radii(radii, x)
    view, x64, _twin = _exact_view(model, x)
    dists = _unit_distances(view, x64)
    counts = [(d[..., None] <= radii.double()).sum(1) for d in dists]
    counts = torch.stack(counts, 1) if counts else radii.new_zeros(len(x), 0, len(radii)).long()
    return LocalComplexity(radii, counts, tuple(la.name for la in view.layers))


def sampled_local_complexity(
    model: nn.Module, x: Tensor, radii: Tensor | list[float], directions: int = 32, seed: int = 0
) -> LocalComplexity:
    """The sampled estimate of the literature: units whose piece is not the same at x and at the
    2P vertices x +- r q_i of a random cross-polytope (P orthonormal directions q_i).

    It counts the hyperplanes that cross the polytope, which lies inside the ball of radius r, so
    in layer 1 it never exceeds ``local_complexity``.

    >>> import torch, torch.nn as nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    >>> x = torch.randn(5, 3)
    >>> lc = sampled_local_complexity(net, x, radii=[0.1, 1.0])
    >>> lc.counts.shape  # (N, layers, radii)
    torch.Size([5, 1, 2])
    """
    view, x64, _twin = _exact_view(model, x)
    radii = _radii(radii, x)
    directions = check_positive_int("directions", directions)
    d = math.prod(x.shape[1:])
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, min(directions, d), generator=g, dtype=torch.float64))
    q = torch.cat([q.T, -q.T]).to(x64)  # (2P, D)
    x = x64
    counts = []
    for r in radii.double():
        pts = x.reshape(len(x), 1, d) + r * q  # (N, 2P, D)
        pts = torch.cat([x.reshape(len(x), 1, d), pts], 1).reshape(-1, *x.shape[1:])
        codes = [c.view(len(x), -1, c.shape[1]) for c in _unit_codes(view, pts, len(x))]
        per_layer = [(c != c[:, :1]).any(1).sum(1) for c in codes]  # units whose piece changes
        counts.append(torch.stack(per_layer, 1) if codes else x.new_zeros(len(x), 0).long())
    layers = tuple(la.name for la in view.layers)
    return LocalComplexity(radii, torch.stack(counts, -1), layers)


def _radii(radii: Tensor | list[float], x: Tensor) -> Tensor:
    """Radii as a 1-D tensor like x: finite and non-negative numbers, or a ValueError."""
    check_input("x", x, values=False)  # (first: a radius takes x's dtype and device)
    given = torch.as_tensor(radii)
    if given.dim() > 1 or given.dtype == torch.bool:
        raise ValueError(f"radii must be one number or a list of numbers, got {radii}")
    r = given.to(dtype=x.dtype, device=x.device).reshape(-1)
    check_finite("radii", r)
    if len(r) == 0 or bool((r < 0).any()):
        raise ValueError(f"radii must be one or more non-negative numbers, got {radii}")
    return r


def _unit_codes(view: SplineView, x: Tensor, inputs: int) -> list[Tensor]:
    """Per layer, (N, K): every unit's piece for x, the points of ``inputs`` inputs in turn (the
    output checked for an overflow, which would give plausible pieces)."""
    prog = view.program
    with torch.no_grad(), exact_matmul():
        values, states = prog.record(x)
    out = prog.per_sample(prog.output_name, values[prog.output_name])  # (N, *out)
    check_overflow(out.reshape(inputs, -1))
    return [view.program.unit_codes(la, states, len(x)) for la in view.layers]


@dataclass(frozen=True)
class RegionPolytope:
    """x's region as {y : A y <= b} (H-representation), one row per (unit, other piece).

    ``layer``/``unit``/``piece`` name each row's unit and the piece it keeps x away from.
    """

    A: Tensor  # (M, D)
    b: Tensor  # (M,)
    layer: Tensor
    unit: Tensor
    piece: Tensor
    input_shape: tuple[int, ...]
    point: Tensor | None = None  # (D,) x, a point inside (``minimal`` measures from it)

    def contains(self, y: Tensor, tol: float = 0.0) -> Tensor:
        """(P,) whether each y (P, *input_shape) satisfies every inequality (up to tol)."""
        lhs = y.reshape(len(y), -1).to(self.A) @ self.A.T
        return (lhs <= self.b + tol).all(1)

    def minimal(self) -> RegionPolytope:
        """The rows that are facets (the others are implied): one linear program per row.

        Rows are tested one by one against the rows still kept, so of two equal rows one stays;
        each is measured from x (``point``) in units of its own distance to x, so the answer does
        not depend on the scale of the weights or on where the region lies.
        """
        from scipy.optimize import linprog

        A, b = self.A.double().cpu().numpy(), self.b.double().cpu().numpy()
        big = np.abs(A).max(axis=1, initial=0.0)  # (each row over its largest entry first:
        live = big > 0  # the norm of a row of 1e160 overflowed; a zero row, 0 <= b, holds)
        big = np.where(live, big, 1.0)
        norms = np.where(live, np.linalg.norm(A / big[:, None], axis=1), 1.0)
        a, dist = A / big[:, None] / norms[:, None], b / big / norms  # unit normals: a y <= dist
        c = np.maximum(dist - a @ self._inside(a, dist), 0.0)  # each row's distance to x
        kept = [i for i in range(len(A)) if live[i]]
        for i in list(kept):
            others = [j for j in kept if j != i]
            if not others:
                continue
            s = c[i] if c[i] > 0 else (c.max() or 1.0)  # (x on this facet: the polytope's scale)
            res = linprog(-a[i], A_ub=a[others], b_ub=c[others] / s, bounds=(None, None))
            if res.status == 0 and -res.fun <= c[i] / s + 1e-9:
                kept.remove(i)  # implied by the rows kept: the polytope stays the same
        k = torch.as_tensor(kept, dtype=torch.long)
        return replace(
            self,
            A=self.A[k],
            b=self.b[k],
            layer=self.layer[k],
            unit=self.unit[k],
            piece=self.piece[k],
        )

    def _inside(self, a: np.ndarray, dist: np.ndarray) -> np.ndarray:
        """(D,) a point of {y : a y <= dist} (unit normals): x, or else the centre of its
        largest ball (radius at most 1)."""
        if self.point is not None:
            return self.point.double().cpu().numpy().reshape(-1)
        from scipy.optimize import linprog

        d = a.shape[1]
        lhs = np.hstack([a, np.ones((len(a), 1))])  # a . y + r <= dist
        bounds = [(None, None)] * d + [(0, 1)]
        res = linprog(np.r_[np.zeros(d), -1.0], A_ub=lhs, b_ub=dist, bounds=bounds)
        if res.status != 0:
            raise ValueError("the polytope is empty: no point satisfies every row")
        return res.x[:d]


def region_polytope(model: nn.Module, x: Tensor, max_rows: int = 1_000_000) -> RegionPolytope:
    """The H-representation of the region of one input x (1, *input_shape); for small models.

    >>> import torch, torch.nn as nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    >>> x = torch.randn(5, 3)
    >>> poly = region_polytope(net, x[:1])  # {y : A y <= b}, x's region
    >>> bool((poly.A @ x[0] <= poly.b).all())
    True
    """
    view, x64, _twin = _exact_view(model, x)
    if len(x) != 1:
        raise ValueError(f"region_polytope takes one input (1, ...), got a batch of {len(x)}")
    dtype, x = x.dtype, x64
    max_rows = check_positive_int("max_rows", max_rows)
    d = math.prod(x.shape[1:])
    basis = torch.eye(d, dtype=x.dtype, device=x.device).view(d, *x.shape[1:])
    tables = [unit_table(view.program, la) for la in view.layers]
    res = slot_tangents(view.program, tables, x, basis)
    rows = [_layer_rows(i, z[0], dz[0], t, x) for i, ((z, dz), t) in enumerate(zip(res, tables))]
    if sum(len(r[0]) for r in rows) > max_rows:
        raise ValueError("the region has more than max_rows inequalities; raise max_rows")
    if not rows:  # no MASO layer: the network is affine, its one region is the whole space
        none = torch.zeros(0, dtype=torch.long, device=x.device)
        rows = [(x.new_zeros(0, d), x.new_zeros(0), none, none, none)]
    A, b, layer, unit, piece = (torch.cat([r[i] for r in rows]) for i in range(5))
    shape = tuple(x.shape[1:])
    return RegionPolytope(
        A.to(dtype), b.to(dtype), layer, unit, piece, shape, x.reshape(-1).to(dtype)
    )


def _layer_rows(li: int, z: Tensor, dz: Tensor, table: UnitTable, x: Tensor) -> tuple[Tensor, ...]:
    """One layer's rows -grad g . y <= g(x) - grad g . x, for each unit and each other piece."""
    cand = table.values(z)  # (K, R)
    grad = table.values(dz, tangent=True)  # (D, K, R)
    win = cand.argmax(-1)
    k = torch.arange(len(win), device=z.device)
    others = (cand > -math.inf) & (torch.arange(cand.shape[1], device=z.device) != win[:, None])
    unit, piece = torch.nonzero(others, as_tuple=True)
    g = cand[k, win][unit] - cand[unit, piece]  # margins (M,)
    dg = (grad[:, k, win][:, unit] - grad[:, unit, piece]).T  # (M, D) gradient of g
    return -dg, g - dg @ x.reshape(-1), torch.full_like(unit, li), unit, piece
