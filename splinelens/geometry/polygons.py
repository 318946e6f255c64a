"""Batches of convex polygons in float64, padded to a common vertex count, and their operations.

A batch is ``V`` (M, W, 2) vertices, counter-clockwise, with ``n`` (M,) of them valid per polygon
(the rest is padding). Everything is vectorised over the batch with numpy.

>>> V, n = square((-1.0, 1.0, -1.0, 1.0))
>>> s = V[..., 0] - 0.0                      # the half-plane u >= 0
>>> H, m = clip(V, n, s)
>>> float(areas(H, m)[0])
2.0
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "areas",
    "clean",
    "clip",
    "extremes",
    "interior",
    "locate",
    "next_vertex",
    "pad",
    "snap",
    "square",
    "valid",
    "values",
]

Array = np.ndarray


def square(bounds: tuple[float, float, float, float]) -> tuple[Array, Array]:
    """The rectangle (u0, u1, v0, v1) as a batch of one polygon."""
    u0, u1, v0, v1 = (float(b) for b in bounds)
    V = np.array([[[u0, v0], [u1, v0], [u1, v1], [u0, v1]]], dtype=np.float64)  # (1, 4, 2)
    return V, np.array([4])


def next_vertex(n: Array, width: int) -> tuple[Array, Array]:
    """Per polygon: the index of each vertex's successor, and which vertices are valid."""
    idx = np.arange(width)[None, :]  # (1, W)
    return np.where(idx + 1 < n[:, None], idx + 1, 0), valid(n, width)


def valid(n: Array, width: int) -> Array:
    """(M, W): which padded vertex slots are real vertices."""
    return np.arange(width)[None, :] < n[:, None]


def clip(V: Array, n: Array, s: Array) -> tuple[Array, Array]:
    """The part {s >= 0} of each polygon, s (M, W) being an affine function at its vertices.

    Sutherland-Hodgman against one line: keep the vertices with s >= 0 and add the crossing point
    of every edge whose ends have strictly opposite signs. Values meant to be on the line must
    already be exactly 0 (see ``snap``). Returns (V', n'); an empty part has n' < 3.
    """
    m, w = s.shape
    nxt, valid = next_vertex(n, w)
    Vn = np.take_along_axis(V, nxt[..., None], 1)  # (M, W, 2) successors
    sn = np.take_along_axis(s, nxt, 1)
    keep = valid & (s >= 0)
    cross = valid & (((s > 0) & (sn < 0)) | ((s < 0) & (sn > 0)))
    t = s / np.where(cross, s - sn, 1.0)
    P = V + t[..., None] * (Vn - V)  # (M, W, 2) crossing points
    out = np.stack([V, P], 2).reshape(m, 2 * w, 2)
    mask = np.stack([keep, cross], 2).reshape(m, 2 * w)
    order = np.argsort(~mask, axis=1, kind="stable")  # valid entries first, in order
    count = mask.sum(1)
    width = max(int(count.max(initial=0)), 1)
    return np.take_along_axis(out, order[:, :width, None], 1), count


def snap(s: Array, tol: Array) -> Array:
    """Values within ``tol`` (M, 1) of the line set to exactly 0."""
    return np.where(np.abs(s) <= tol, 0.0, s)


def values(V: Array, coef: Array) -> Array:
    """An affine function a u + b v + c, coef (M, 3), at every vertex: (M, W)."""
    return V[..., 0] * coef[:, 0:1] + V[..., 1] * coef[:, 1:2] + coef[:, 2:3]


def extremes(s: Array, n: Array) -> tuple[Array, Array]:
    """Minimum and maximum of s (M, W) over each polygon's valid vertices."""
    ok = valid(n, s.shape[1])
    return np.where(ok, s, np.inf).min(1), np.where(ok, s, -np.inf).max(1)


def areas(V: Array, n: Array) -> Array:
    """Shoelace areas (M,), positive for counter-clockwise polygons."""
    nxt, valid = next_vertex(n, V.shape[1])
    Vn = np.take_along_axis(V, nxt[..., None], 1)
    cross = V[..., 0] * Vn[..., 1] - Vn[..., 0] * V[..., 1]
    return 0.5 * np.where(valid, cross, 0.0).sum(1)


def interior(V: Array, n: Array) -> Array:
    """The vertex mean of each polygon, (M, 2): strictly inside a non-degenerate convex polygon."""
    return (V * valid(n, V.shape[1])[..., None]).sum(1) / np.maximum(n, 1)[:, None]


def edges(V: Array, n: Array) -> Array:
    """Every polygon's edges as segments, (E, 2, 2)."""
    nxt, valid = next_vertex(n, V.shape[1])
    Vn = np.take_along_axis(V, nxt[..., None], 1)
    return np.stack([V[valid], Vn[valid]], 1)


def pad(V: Array, width: int) -> Array:
    """V padded (with its first vertex) to ``width`` vertices."""
    if V.shape[1] >= width:
        return V
    fill = np.repeat(V[:, :1], width - V.shape[1], 1)
    return np.concatenate([V, fill], 1)


def clean(V: Array, n: Array) -> Array:
    """V with its padding set to each polygon's first vertex (as ``pad`` makes it; ``clip``
    leaves stale points there).

    >>> clean(np.array([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]]), np.array([3]))[0, 3]
    array([0., 0.])
    """
    return np.where(valid(n, V.shape[1])[..., None], V, V[:, :1])


def contains(V: Array, n: Array, pts: Array, tol: float = 0.0) -> Array:
    """Whether pts[i] (M, 2) lies in polygon i (boundary included, up to a distance ``tol``
    outside an edge): (M,)."""
    nxt, valid = next_vertex(n, V.shape[1])
    Vn = np.take_along_axis(V, nxt[..., None], 1)
    e, d = Vn - V, pts[:, None, :] - V  # edge vectors, vertex -> point
    cross = e[..., 0] * d[..., 1] - e[..., 1] * d[..., 0]  # |e| x the distance left of the edge
    # (a distance, not the cross product: that tolerance grew as 1 / |e| for short edges)
    return (np.where(valid, cross, np.inf) >= -tol * np.hypot(e[..., 0], e[..., 1])).all(1)


def locate(V: Array, n: Array, pts: Array, chunk: int = 1 << 16) -> Array:
    """The index of the polygon holding each point (P, 2), -1 outside all: (P,).

    Polygons are bucketed by bounding box on a uniform grid; each point is tested only against
    the polygons of its bucket. With polygons that tile a domain, the answer is exact up to
    points on shared edges (the lower index wins).
    """
    lo, hi = _bboxes(V, n)
    if len(V):  # about the domain's centre: far from (0, 0), tolerances stay those of its size
        centre = (lo.min(0) + hi.max(0)) / 2
        V, pts, lo, hi = V - centre, pts - centre, lo - centre, hi - centre
    g = max(1, int(np.sqrt(len(V))))
    origin, size = lo.min(0), np.maximum(hi.max(0) - lo.min(0), 1e-300)
    cell = lambda p: np.clip(((p - origin) / size * g).astype(np.int64), 0, g - 1)  # noqa: E731
    starts, order = _buckets(cell(lo), cell(hi), g)
    scale = max(np.abs(lo).max(initial=0.0), np.abs(hi).max(initial=0.0)) or 1.0  # half its size
    out = np.full(len(pts), -1, dtype=np.int64)
    for s in range(0, len(pts), chunk):
        p = pts[s : s + chunk]
        out[s : s + chunk] = _locate_chunk(V, n, p, cell(p), g, starts, order, scale)
    return out


def _bboxes(V: Array, n: Array) -> tuple[Array, Array]:
    ok = valid(n, V.shape[1])[..., None]
    return np.where(ok, V, np.inf).min(1), np.where(ok, V, -np.inf).max(1)


def _buckets(lo: Array, hi: Array, g: int) -> tuple[Array, Array]:
    """CSR lists of the polygons overlapping each grid bucket: (starts (g*g+1,), polygon ids)."""
    nx, ny = hi[:, 0] - lo[:, 0] + 1, hi[:, 1] - lo[:, 1] + 1
    reps = nx * ny
    poly = np.repeat(np.arange(len(lo)), reps)
    k = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)  # rank inside a box
    bx = lo[poly, 0] + k % nx[poly]
    by = lo[poly, 1] + k // nx[poly]
    bucket = bx * g + by
    order = np.argsort(bucket, kind="stable")
    starts = np.searchsorted(bucket[order], np.arange(g * g + 1))
    return starts, poly[order]


def _locate_chunk(
    V: Array, n: Array, p: Array, c: Array, g: int, starts: Array, order: Array, scale: float
) -> Array:
    """``locate`` for points p (P, 2) in buckets c; ``scale``: the largest |coordinate| of a
    valid vertex about the domain's centre (the padding holds stale values), setting the
    tolerance on the edge tests: relative to the domain's size, however small."""
    b = c[:, 0] * g + c[:, 1]
    cnt = starts[b + 1] - starts[b]
    pt = np.repeat(np.arange(len(p)), cnt)
    k = np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    poly = order[starts[b][pt] + k]
    inside = contains(V[poly], n[poly], p[pt], tol=1e-12 * scale)
    out = np.full(len(p), -1, dtype=np.int64)
    hit_pt, hit_poly = pt[inside][::-1], poly[inside][::-1]
    out[hit_pt] = hit_poly  # the last write wins: reversed, so the first hit (lowest rank)
    return out
