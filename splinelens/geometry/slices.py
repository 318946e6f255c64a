"""The exact partition of a network on a 2-D slice of its input space, layer by layer (Sec. 7).

On the plane x = origin + u d1 + v d2, every region of the network is a convex polygon in (u, v).
``slice_partition`` builds them exactly, one layer at a time: inside a region of the layers so far
each unit's candidates are affine in (u, v) (``_units``), so a unit cuts the region along the lines
where its argmax changes (a ReLU's z = 0, a max-pool's z_i = z_j). Everything runs in float64.

>>> import torch, torch.nn as nn, splinelens as sl
>>> torch.manual_seed(0)
<torch._C.Generator object at ...>
>>> net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2)).double().eval()
>>> part = sl.slice_partition(net, torch.zeros(2, dtype=torch.float64),
...                           torch.eye(2, dtype=torch.float64), bounds=(-3, 3, -3, 3))
>>> round(float(part.areas.sum()), 9), len(part) == len(set(map(bytes, part.codes.layers[0].data)))
(36.0, True)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

from splinelens._capture.program import Program
from splinelens._checks import (
    check_finite,
    check_finite_numbers,
    float64_copy,
    model_dtype,
    unwrap_compiled,
)
from splinelens._precision import exact_matmul
from splinelens.codes import PartitionCodes
from splinelens.geometry import polygons as poly
from splinelens.geometry.units import UnitTable, last_step, slot_differences, unit_table
from splinelens.view import SplineView, layer_codes, view_of

if TYPE_CHECKING:
    pass

Tensor = torch.Tensor
Array = np.ndarray
_REL_TOL = 1e-10  # a line closer than this (relative) to a vertex does not cut there
_WORK = 1 << 23  # float64 entries of candidate values per chunk (64 MiB)
_MAX_CELLS = 4096  # cells per network run: small enough for the activations to stay in cache


@dataclass
class LayerSlice:
    """The partition after one layer: its cells, and the cell of the previous layer each is in."""

    name: str
    vertices: Array  # (M, W, 2), counter-clockwise, padded
    counts: Array  # (M,) valid vertices per cell
    parent: Array  # (M,) index into the previous layer's cells (the domain before layer 0)

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def polygons(self) -> list[Array]:
        return [v[:k] for v, k in zip(self.vertices, self.counts)]


@dataclass
class SlicePartition:
    """The regions of a network on the plane x = origin + u d1 + v d2 within ``bounds``.

    ``layers[l]`` is the partition after layer l (Sec. 7.1: how each layer subdivides the one
    before); the regions are the last of them. ``logits`` holds each region's output as affine
    functions of (u, v), (R, C, 3) as (a, b, c); ``boundary`` the decision boundary segments
    (S, 2, 2) where the top class changes; ``anchors`` the (u, v) of the points the plane was
    built from, if any.
    """

    origin: Tensor  # (*input_shape)
    directions: Tensor  # (2, *input_shape)
    bounds: tuple[float, float, float, float]
    layers: list[LayerSlice]
    codes: PartitionCodes
    logits: Array
    boundary: Array
    anchors: Array | None
    seconds: float

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def vertices(self) -> Array:
        """(R, W, 2) padded vertex arrays of the regions."""
        return self.layers[-1].vertices if self.layers else poly.square(self.bounds)[0]

    @property
    def counts(self) -> Array:
        return self.layers[-1].counts if self.layers else np.array([4])

    @property
    def polygons(self) -> list[Array]:
        """One (V_i, 2) float64 array per region, counter-clockwise, in (u, v)."""
        return [v[:k] for v, k in zip(self.vertices, self.counts)]

    @property
    def areas(self) -> Array:
        """(R,) region areas in (u, v); they sum to the domain's area."""
        return poly.areas(self.vertices, self.counts)

    @property
    def interior(self) -> Array:
        """(R, 2) one point strictly inside each region (its vertex mean)."""
        return poly.interior(self.vertices, self.counts)

    @property
    def classes(self) -> Array:
        """(R,) the top class at each region's interior point."""
        return self._outputs(self.interior).argmax(1)

    @property
    def slope_norms(self) -> Array:
        """(R,) the Frobenius norm of the output's slope within the plane, ||d f / d(u, v)||."""
        return np.sqrt((self.logits[..., :2] ** 2).sum((1, 2)))

    def locate(self, uv: Array) -> Array:
        """(P,) the region holding each plane point (P, 2); -1 outside the bounds."""
        return poly.locate(self.vertices, self.counts, np.asarray(uv, dtype=np.float64))

    def to_input(self, uv: Array) -> Tensor:
        """Plane points (P, 2) as network inputs (P, *input_shape)."""
        uv_t = torch.as_tensor(np.asarray(uv), dtype=self.origin.dtype, device=self.origin.device)
        flat = self.origin.reshape(1, -1) + uv_t @ self.directions.reshape(2, -1)
        return flat.view(len(uv_t), *self.origin.shape)

    def _outputs(self, uv: Array) -> Array:
        return np.einsum("rck,rk->rc", self.logits, np.c_[uv, np.ones(len(uv))])


def slice_partition(
    model: nn.Module,
    origin: Tensor | None = None,
    directions: Tensor | None = None,
    bounds: tuple[float, float, float, float] = (-3.0, 3.0, -3.0, 3.0),
    *,
    points: tuple[Tensor, Tensor, Tensor] | None = None,
    margin: float = 0.5,
) -> SlicePartition:
    """The exact partition of ``model`` on a plane of its input space, layer by layer.

    Either ``origin`` (one input) and ``directions`` (2, *input_shape) with ``bounds`` =
    (u0, u1, v0, v1), or ``points``: three inputs; the plane through them gets an orthonormal
    basis (Gram-Schmidt of x1 - x0, x2 - x0), its origin at their mean, and a square domain
    centred on them whose half-side is (1 + margin) times their largest offset from its centre.
    A float32 model is analysed through a float64 copy.
    """
    start = time.perf_counter()
    model64 = float64_copy(unwrap_compiled(model))
    origin, dirs, bounds, anchors = _plane(model64, origin, directions, bounds, points, margin)
    view = view_of(model64, torch.stack([origin, origin + dirs[0], origin + dirs[1]]))
    plane = _Plane(view, origin, dirs)
    V, n = poly.square(bounds)
    scale = max(abs(b) for b in bounds)
    layers = []
    for layer in view.layers:
        V, n, parent = _cut(plane, unit_table(view.program, layer), V, n, scale)
        layers.append(LayerSlice(layer.name, V, n, parent))
    logits, codes = _outputs(plane, V, n)  # (R, C, 3), the regions' codes
    boundary = _decision_boundary(V, n, logits, scale)
    part = SlicePartition(origin, dirs, bounds, layers, codes, logits, boundary, anchors, 0.0)
    part.seconds = time.perf_counter() - start
    return part


def _outputs(plane: _Plane, V: Array, n: Array) -> tuple[Array, PartitionCodes]:
    """Each region's output as functions of (u, v), (R, C, 3), and its partition code."""
    prog, table = plane.view.program, unit_table(plane.view.program, None)
    logits, codes = [], []
    for s, e in _chunks(len(V), table, 1):
        uv = poly.interior(V[s:e], n[s:e])
        (coef,), states = plane.slots([table], uv)
        logits.append(coef)
        codes.append(layer_codes(prog, states, e - s))
    return np.concatenate(logits), PartitionCodes.cat(codes)


def _plane(
    model: nn.Module,
    origin: Tensor | None,
    directions: Tensor | None,
    bounds: tuple[float, float, float, float],
    points: tuple[Tensor, Tensor, Tensor] | None,
    margin: float,
) -> tuple[Tensor, Tensor, tuple[float, float, float, float], Array | None]:
    dt = model_dtype(model)
    kw = {"dtype": torch.float64, "device": dt[1] if dt is not None else "cpu"}
    if points is not None:
        if origin is not None or directions is not None:
            raise ValueError("pass either points=(x0, x1, x2) or origin and directions, not both")
        check_finite_numbers("margin", [margin])
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        xs = tuple(torch.as_tensor(x).to(**kw) for x in points)
        for i, x in enumerate(xs):
            check_finite(f"points[{i}]", x)
        return _plane_through(xs, margin)
    if origin is None or directions is None:
        raise ValueError("slice_partition needs origin and directions, or points=(x0, x1, x2)")
    origin, directions = torch.as_tensor(origin).to(**kw), torch.as_tensor(directions).to(**kw)
    check_finite("origin", origin)
    check_finite("directions", directions)
    if len(bounds) != 4:
        raise ValueError(f"bounds must be (u0, u1, v0, v1), got {bounds}")
    check_finite_numbers("bounds", bounds)
    if directions.shape != (2, *origin.shape):
        raise ValueError(
            f"directions must have shape (2, *origin.shape) = {(2, *origin.shape)}, "
            f"got {tuple(directions.shape)}"
        )
    flat = directions.reshape(2, -1)
    gram = flat @ flat.T  # (2, 2); det = |d1|^2 |d2|^2 sin^2(angle), 0 for a zero direction
    if float(torch.linalg.det(gram)) <= 1e-12 * float(gram[0, 0] * gram[1, 1]):
        raise ValueError("directions must span a plane: one is zero or they are parallel")
    u0, u1, v0, v1 = (float(b) for b in bounds)
    if not (u0 < u1 and v0 < v1):
        raise ValueError(f"bounds must be (u0, u1, v0, v1) with u0 < u1 and v0 < v1, got {bounds}")
    return origin, directions, (u0, u1, v0, v1), None


def _plane_through(xs: tuple, margin: float) -> tuple[Tensor, Tensor, tuple, Array]:
    if len(xs) != 3 or any(x.shape != xs[0].shape for x in xs):
        raise ValueError("points must be three inputs of the same shape (x0, x1, x2)")
    if any(torch.equal(xs[i], xs[j]) for i, j in ((0, 1), (0, 2), (1, 2))):
        raise ValueError("points must be three distinct inputs; two of them are equal")
    flat = torch.stack([x.reshape(-1) for x in xs])  # (3, D)
    e1 = flat[1] - flat[0]
    w = flat[2] - flat[0]
    w = w - (w @ e1) / (e1 @ e1) * e1
    if e1.norm() == 0 or w.norm() <= 1e-12 * (flat[2] - flat[0]).norm():
        raise ValueError("the three points are (nearly) on one line: they span no plane")
    basis = torch.stack([e1 / e1.norm(), w / w.norm()])  # (2, D) orthonormal
    origin = flat.mean(0)
    anchors = ((flat - origin) @ basis.T).cpu().numpy()  # (3, 2)
    centre = (anchors.min(0) + anchors.max(0)) / 2
    half = (1 + margin) * np.abs(anchors - centre).max()
    bounds = (centre[0] - half, centre[0] + half, centre[1] - half, centre[1] + half)
    shape = xs[0].shape
    return origin.view(shape), basis.view(2, *shape), tuple(float(b) for b in bounds), anchors


class _Plane:
    """Runs the network on plane points (u, v); the affine steps before any MASO run only once.

    Those steps are affine in x, so on the plane their values are v0 + u du + v dv: three
    evaluations at the start, then one multiply-add per cell instead of, say, a 784 x 256 matmul.
    """

    def __init__(self, view: SplineView, origin: Tensor, dirs: Tensor) -> None:
        self.view, self.origin, self.dirs = view, origin, dirs
        prog = view.program
        _, needed = prog.affine_prefix()
        base = torch.stack([origin, origin + dirs[0], origin + dirs[1]])
        with torch.no_grad(), exact_matmul():
            env, _ = prog.record(base)
        vals = {k: prog.per_sample(k, env[k]) for k in needed}  # (3, *shape)
        self.base = {k: (v[0], v[1] - v[0], v[2] - v[0]) for k, v in vals.items()}

    def _preset(self, uv: Tensor, shift: bool = False) -> dict[str, Tensor]:
        """The values v0 + u du + v dv at plane points uv (m, 2); ``shift``: at uv + e1, uv + e2."""
        if shift:
            uv = torch.cat([uv + uv.new_tensor([1.0, 0.0]), uv + uv.new_tensor([0.0, 1.0])])
        prog, out = self.view.program, {}
        for k, (v0, du, dv) in self.base.items():
            flat = torch.addmm(v0.reshape(1, -1), uv, torch.stack([du.reshape(-1), dv.reshape(-1)]))
            out[k] = prog.from_sample(k, flat.view(len(uv), *v0.shape))
        return out

    def slots(
        self, tables: list[UnitTable], uv: Array
    ) -> tuple[list[tuple[Array, Array]], dict[str, Tensor]]:
        """Slot coefficients (a, b, c) per table, (m, S, 3), at cells with interior points uv."""
        prog, m = self.view.program, len(uv)
        uv_t = torch.as_tensor(uv, dtype=torch.float64, device=self.origin.device)
        stop = last_step(prog, tables)
        with torch.no_grad(), exact_matmul():  # the prefix's values are given: it does not run
            pre = self._preset(uv_t)
            x0 = _dummy(pre, prog, len(uv), uv_t.device)
            env0, states = prog.record(x0, at=pre, stop=stop)
            pre = self._preset(uv_t, shift=True)
            x1 = _dummy(pre, prog, 2 * len(uv), uv_t.device)
            env1 = prog.frozen(x1, prog.tile_states(states, 2), at=pre, stop=stop)
        out = []
        for z0, dz in slot_differences(prog, tables, env0, env1, m, 2):
            z0, dz = z0.cpu().numpy(), dz.cpu().numpy()  # (m, S), (m, 2, S)
            c = z0 - uv[:, 0:1] * dz[:, 0] - uv[:, 1:2] * dz[:, 1]
            out.append(np.stack([dz[:, 0], dz[:, 1], c], -1))
        return out, states

    def coefficients(self, table: UnitTable, uv: Array) -> Array:
        """Every unit's candidates as functions of (u, v) in cells around uv: (m, K, R, 3)."""
        return table.coefficients(self.slots([table], uv)[0][0])


def _dummy(preset: dict[str, Tensor], prog: Program, m: int, device: torch.device) -> Tensor:
    """The input when no later step reads it: a free view with the right shape (sizes are read)."""
    shape = prog.shapes[prog.input_name]
    zero = torch.zeros((), dtype=torch.float64, device=device)
    return preset.get(prog.input_name, zero.expand(m, *shape))


def _chunks(m: int, table: UnitTable, width: int = 16) -> list[tuple[int, int]]:
    step = min(_MAX_CELLS, max(1, _WORK // max(1, table.idx.size * width)))
    return [(s, min(s + step, m)) for s in range(0, m, step)]


def _cut(
    plane: _Plane, table: UnitTable, V: Array, n: Array, scale: float
) -> tuple[Array, Array, Array]:
    """Subdivide every cell by the units of one layer: (V, n, parent) of the new cells."""
    pair_parent, pair_unit, pair_coef = _ambiguous(plane, table, V, n, scale)
    cells = _Cells(V, n)
    order = np.argsort(pair_unit, kind="stable")
    units, starts = np.unique(pair_unit[order], return_index=True)
    ends = np.r_[starts[1:], len(order)]
    row = np.full(len(V), -1)
    for unit, s, e in zip(units, starts, ends):
        parents = pair_parent[order[s:e]]
        row[parents] = np.arange(e - s)
        r = row[cells.parent[: cells.size]]
        sel = np.nonzero(r >= 0)[0]
        row[parents] = -1
        coef = pair_coef[order[s:e]][r[sel]]  # (m, R, 3)
        cells.split(
            sel, *_argmax_pieces(cells.V[sel], cells.n[sel], coef, table.valid[unit], scale)
        )
    return cells.arrays()


def _ambiguous(
    plane: _Plane, table: UnitTable, V: Array, n: Array, scale: float
) -> tuple[Array, Array, Array]:
    """The (cell, unit) pairs whose argmax changes inside the cell, with their candidates."""
    parents, units, coefs = [], [], []
    for s, e in _chunks(len(V), table, V.shape[1]):
        coef = plane.coefficients(table, poly.interior(V[s:e], n[s:e]))
        p, k = np.nonzero(_changes(coef, V[s:e], n[s:e], table.valid, scale))
        parents.append(p + s)
        units.append(k)
        coefs.append(coef[p, k])
    r = table.idx.shape[1]
    return (
        np.concatenate(parents) if parents else np.zeros(0, np.int64),
        np.concatenate(units) if units else np.zeros(0, np.int64),
        np.concatenate(coefs) if coefs else np.zeros((0, r, 3)),
    )


def _changes(coef: Array, V: Array, n: Array, valid: Array, scale: float) -> Array:
    """(m, K): whether no candidate of the unit is the max at every vertex of the cell."""
    if coef.shape[2] == 2 and valid.all():  # two candidates: does their difference change sign?
        return _sign_changes(coef[:, :, 1] - coef[:, :, 0], V, n, scale)
    Vh = np.concatenate([V, np.ones_like(V[..., :1])], -1).transpose(0, 2, 1)  # (m, 3, W)
    valid_v = poly.valid(n, V.shape[1])
    m, k, r, _ = coef.shape
    vals = np.matmul(coef.reshape(m, k * r, 3), Vh).reshape(m, k, r, -1)  # (m, K, R, W)
    vals = np.where(valid[None, :, :, None], vals, -np.inf)
    tol = _tolerance(coef, scale).max(-1)  # (m, K)
    top = vals.max(2, keepdims=True)
    near = (vals >= top - tol[..., None, None]) | ~valid_v[:, None, None, :]
    return ~near.all(-1).any(-1)


def _sign_changes(d: Array, V: Array, n: Array, scale: float) -> Array:
    """(m, K): whether d (m, K, 3), affine in (u, v), takes both signs in each cell.

    A line farther from the cell's centre than the cell's radius cannot cross it; only the
    other (cell, unit) pairs are tested at the vertices.
    """
    centre = poly.interior(V, n)  # (m, 2)
    valid_v = poly.valid(n, V.shape[1])
    radius = np.where(valid_v, np.linalg.norm(V - centre[:, None], axis=-1), 0).max(1)
    tol = _tolerance(d, scale)  # (m, K)
    at_centre = d[..., 0] * centre[:, :1] + d[..., 1] * centre[:, 1:] + d[..., 2]
    near = np.abs(at_centre) <= radius[:, None] * np.hypot(d[..., 0], d[..., 1]) + tol
    p, k = np.nonzero(near)
    g = poly.values(V[p], d[p, k])  # (pairs, W)
    lo, hi = poly.extremes(g, n[p])
    out = np.zeros(d.shape[:2], dtype=bool)
    out[p, k] = (lo < -tol[p, k]) & (hi > tol[p, k])
    return out


def _tolerance(coef: Array, scale: float) -> Array:
    """How close to 0 an affine function (..., 3) counts as 0 on the domain."""
    size = (np.abs(coef[..., 0]) + np.abs(coef[..., 1])) * scale + np.abs(coef[..., 2])
    return _REL_TOL * size + 1e-300


def _argmax_pieces(
    V: Array, n: Array, coef: Array, valid: Array, scale: float
) -> tuple[Array, list[tuple[Array, Array]]]:
    """Split cells (m, W, 2) by the argmax of candidates coef (m, R, 3).

    Returns, per cell, whether it really splits (m,), and for each candidate its piece
    {candidate i >= every other; > every earlier one} as (V, n) with n < 3 where it is empty.
    """
    pieces = []
    for i in np.nonzero(valid)[0]:
        P, k, alive = V, n.copy(), np.ones(len(V), dtype=bool)
        for j in np.nonzero(valid)[0]:
            if j == i:
                continue
            d = coef[:, i] - coef[:, j]  # (m, 3): candidate i minus candidate j
            tol = _tolerance(d, scale)
            g = poly.values(P, d)
            lo, hi = poly.extremes(g, k)
            flat = (hi <= tol) & (lo >= -tol)  # identical candidates: the earlier one wins
            alive &= ~(((hi <= tol) & ~flat) | (flat & (j < i)))
            cut = alive & (lo < -tol) & (hi > tol)
            if cut.any():
                C, kc = poly.clip(P[cut], k[cut], poly.snap(g[cut], tol[cut, None]))
                width = max(P.shape[1], C.shape[1])
                P = poly.pad(P, width).copy()
                P[cut] = poly.pad(C, width)
                k[cut] = kc
                alive &= k >= 3
        pieces.append((P, np.where(alive, k, 0)))
    splits = sum((k >= 3).astype(int) for _, k in pieces) >= 2
    return splits, pieces


class _Cells:
    """A growable batch of cells with the index of the cell they came from."""

    def __init__(self, V: Array, n: Array) -> None:
        cap = max(16, 2 * len(V))
        self.V = poly.pad(np.zeros((cap, V.shape[1], 2)), V.shape[1])
        self.V[: len(V)] = V
        self.n = np.zeros(cap, dtype=np.int64)
        self.n[: len(V)] = n
        self.parent = np.zeros(cap, dtype=np.int64)
        self.parent[: len(V)] = np.arange(len(V))
        self.size = len(V)

    def split(self, sel: Array, splits: Array, pieces: list[tuple[Array, Array]]) -> None:
        """Replace the cells sel[splits] by their nonempty pieces (the first in place)."""
        first = np.ones(len(sel), dtype=bool)
        for P, k in pieces:
            take = splits & (k >= 3)
            if not take.any():
                continue
            self._widen(P.shape[1])
            rows = sel[take]
            Pw = poly.pad(P[take], self.V.shape[1])
            here = first[take]
            self.V[rows[here]], self.n[rows[here]] = Pw[here], k[take][here]
            self._append(Pw[~here], k[take][~here], self.parent[rows[~here]])
            first[take] = False

    def _widen(self, width: int) -> None:
        if width > self.V.shape[1]:
            self.V = poly.pad(self.V, width)

    def _append(self, P: Array, k: Array, parent: Array) -> None:
        need = self.size + len(k)
        if need > len(self.n):
            cap = 2 * need
            self.V = np.concatenate([self.V, np.zeros((cap - len(self.V), *self.V.shape[1:]))])
            self.n = np.concatenate([self.n, np.zeros(cap - len(self.n), dtype=np.int64)])
            self.parent = np.concatenate([self.parent, np.zeros(cap - len(self.parent), np.int64)])
        self.V[self.size : need], self.n[self.size : need] = P, k
        self.parent[self.size : need] = parent
        self.size = need

    def arrays(self) -> tuple[Array, Array, Array]:
        m = self.size
        width = int(self.n[:m].max())
        return self.V[:m, :width].copy(), self.n[:m].copy(), self.parent[:m].copy()


def _decision_boundary(V: Array, n: Array, logits: Array, scale: float) -> Array:
    """Segments (S, 2, 2) where the top class changes, inside the regions."""
    c = logits.shape[1]
    if c < 2:
        return np.zeros((0, 2, 2))
    tol = _tolerance(logits, scale).max(1)
    sel = np.nonzero(_changes(logits[:, None], V, n, np.ones((1, c), bool), scale)[:, 0])[0]
    splits, pieces = _argmax_pieces(V[sel], n[sel], logits[sel], np.ones(c, bool), scale)
    segs = []
    for i, (P, k) in enumerate(pieces):
        on = splits & (k >= 3)
        if on.any():
            segs.append(_boundary_edges(P[on], k[on], logits[sel][on], i, tol[sel][on]))
    return np.concatenate(segs) if segs else np.zeros((0, 2, 2))


def _boundary_edges(P: Array, k: Array, logits: Array, i: int, tol: Array) -> Array:
    """Edges of class-i pieces lying on a line f_i = f_j with j > i (each edge counted once)."""
    nxt, valid = poly.next_vertex(k, P.shape[1])
    Pn = np.take_along_axis(P, nxt[..., None], 1)
    d = logits[:, i : i + 1] - logits  # (m, C, 3): f_i - f_j
    g0 = np.einsum("mck,mwk->mcw", d, np.concatenate([P, np.ones_like(P[..., :1])], -1))
    g1 = np.einsum("mck,mwk->mcw", d, np.concatenate([Pn, np.ones_like(Pn[..., :1])], -1))
    on = (np.abs(g0) <= 1e2 * tol[:, None, None]) & (np.abs(g1) <= 1e2 * tol[:, None, None])
    on[:, : i + 1] = False  # j > i only
    edge = on.any(1) & valid
    return np.stack([P[edge], Pn[edge]], 1)
