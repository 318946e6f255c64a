"""Cutting polygon cells by the units of one layer, and the decision boundary (Sec. 7).

Inside a cell, each unit's candidates are affine in (u, v), so the unit cuts the cell along the
lines where its argmax changes. ``cut`` finds the (cell, unit) pairs whose argmax changes inside
the cell and splits those cells in place, unit by unit.

>>> # used by splinelens.geometry.slices.slice_partition
"""

from __future__ import annotations

import numpy as np

from splinelens.geometry import polygons as poly
from splinelens.geometry.plane import Plane, cell_chunks
from splinelens.geometry.units import UnitTable

__all__ = ["check_in_range", "cut", "decision_boundary"]

Array = np.ndarray
_REL_TOL = 1e-10  # a line closer than this (relative) to a vertex does not cut there


def cut(
    plane: Plane, table: UnitTable, V: Array, n: Array, scale: float
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
        pieces = _argmax_pieces(
            cells.V[sel], cells.n[sel], coef, table.valid[unit], scale, table.chain
        )
        cells.split(sel, *pieces)
    return cells.arrays()


def _ambiguous(
    plane: Plane, table: UnitTable, V: Array, n: Array, scale: float
) -> tuple[Array, Array, Array]:
    """The (cell, unit) pairs whose argmax changes inside the cell, with their candidates."""
    parents, units, coefs = [], [], []
    for s, e in cell_chunks(len(V), table, V.shape[1]):
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
    with np.errstate(over="ignore", invalid="ignore"):  # refused below
        size = (np.abs(coef[..., 0]) + np.abs(coef[..., 1])) * scale + np.abs(coef[..., 2])
    check_in_range(size)
    return _REL_TOL * size + 1e-300


def check_in_range(values: Array) -> None:
    """Refuse values of the slice (coefficients, their sizes on the window) that overflowed.

    >>> check_in_range(np.array([1.0, np.inf]))
    Traceback (most recent call last):
    ...
    ValueError: the network's values on this slice overflow float64 ...
    """
    if not np.isfinite(values).all():
        raise ValueError(
            "the network's values on this slice overflow float64 (an affine function of (u, v) "
            "exceeds 1.8e308 within the bounds), so its regions cannot be computed exactly; "
            "narrow the bounds, or rescale the model's weights or the directions"
        )


def _argmax_pieces(
    V: Array, n: Array, coef: Array, valid: Array, scale: float, chain: bool = False
) -> tuple[Array, list[tuple[Array, Array]]]:
    """Split cells (m, W, 2) by the argmax of candidates coef (m, R, 3).

    Returns, per cell, whether it really splits (m,), and for each candidate its piece
    {candidate i >= every other; > every earlier one} as (V, n) with n < 3 where it is empty.
    ``chain``: the candidates' slopes increase in one slot (a spline unit), so candidate i wins
    where it beats i - 1 and i + 1 (the max is convex in the slot): 2 cuts per piece, not R - 1.
    """
    pieces = []
    ids = np.nonzero(valid)[0]
    for i in ids:
        P, k, alive = V, n.copy(), np.ones(len(V), dtype=bool)
        for j in (j for j in ids if j != i and (not chain or abs(j - i) == 1)):
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


def decision_boundary(V: Array, n: Array, logits: Array, scale: float) -> Array:
    """Segments (S, 2, 2) where the top class changes: inside the regions, and along their
    edges where the change falls exactly on a region's edge (logits that end in a ReLU)."""
    c = logits.shape[1]
    if c < 2:
        return np.zeros((0, 2, 2))
    tol = _tolerance(logits, scale).max(1)
    inside, split = _inside_boundary(V, n, logits, scale, tol)
    return np.concatenate([inside, _edge_boundary(V, n, logits, tol, split, scale)])


def _edge_boundary(
    V: Array, n: Array, logits: Array, tol: Array, split: Array, scale: float
) -> Array:
    """Region edges on which two classes tie (so the top class may change across them: the
    logits are continuous) and across which it does change, each edge once: from the region
    whose class is the lower, tested 1e-4 of the edge's length to either side (across, at
    least as far as ``polygons.locate`` tells the sides apart on a window of half-size
    ``scale``). Regions the boundary crosses (``split``) are left to ``_boundary_edges``."""
    nxt, ok = poly.next_vertex(n, V.shape[1])
    f = np.matmul(V, logits[..., :2].transpose(0, 2, 1)) + logits[:, None, :, 2]  # (m, W, C)
    top = f >= f.max(-1, keepdims=True) - 1e2 * tol[:, None, None]  # classes top at a vertex
    both = top & np.take_along_axis(top, nxt[..., None], 1)  # ... and at the edge's other end
    tied = ok & (both.sum(-1) >= 2)  # two classes top at both ends
    tied[split] = False
    cell, w = np.nonzero(tied)
    if not len(cell):
        return np.zeros((0, 2, 2))
    a, b = V[cell, w], V[cell, nxt[cell, w]]  # (E, 2) counter-clockwise: the region to the left
    outward = np.stack([b[:, 1] - a[:, 1], a[:, 0] - b[:, 0]], 1)  # (E, 2), |edge| long
    length = np.linalg.norm(outward, axis=1, keepdims=True)
    far = np.maximum(1e-4, 2e-12 * scale / np.maximum(length, 1e-300))  # (x |edge|: 2e-12 scale)
    mid = (a + b) / 2
    mine = _class_at(logits[cell], mid - 1e-4 * outward)
    other = poly.locate(V, n, mid + far * outward)
    across = _class_at(logits[np.maximum(other, 0)], mid + far * outward)
    change = (other >= 0) & (other != cell) & (mine < across)
    return np.stack([a[change], b[change]], 1)


def _class_at(logits: Array, pts: Array) -> Array:
    """The top class of each of P affine outputs (P, C, 3) at its point (P, 2)."""
    return np.einsum("pck,pk->pc", logits, np.c_[pts, np.ones(len(pts))]).argmax(1)


def _inside_boundary(
    V: Array, n: Array, logits: Array, scale: float, tol: Array
) -> tuple[Array, Array]:
    """Segments (S, 2, 2) where the top class changes inside the regions, and those regions."""
    c = logits.shape[1]
    sel = np.nonzero(_changes(logits[:, None], V, n, np.ones((1, c), bool), scale)[:, 0])[0]
    splits, pieces = _argmax_pieces(V[sel], n[sel], logits[sel], np.ones(c, bool), scale)
    segs = []
    for i, (P, k) in enumerate(pieces):
        on = splits & (k >= 3)
        if on.any():
            segs.append(_boundary_edges(P[on], k[on], logits[sel][on], i, tol[sel][on]))
    return (np.concatenate(segs) if segs else np.zeros((0, 2, 2))), sel[splits]


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
