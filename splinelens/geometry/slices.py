"""The exact partition of a network on a 2-D slice of its input space, layer by layer (Sec. 7).

On the plane x = origin + u d1 + v d2, every region of the network is a convex polygon in (u, v).
``slice_partition`` builds them exactly, one layer at a time: inside a region of the layers so far
each unit's candidates are affine in (u, v) (``geometry.units``), so a unit cuts the region
along the lines where its argmax changes (a ReLU's z = 0, a max-pool's z_i = z_j): ``plane``
runs the network on the plane, ``cutting`` splits the cells. Everything runs in float64.

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

import numpy as np
import torch
import torch.nn as nn

from splinelens._checks import check_finite, unwrap_model
from splinelens._twin import float64_twin, said_of_twin
from splinelens.codes import PartitionCodes
from splinelens.geometry import polygons as poly
from splinelens.geometry.cutting import check_in_range, cut, decision_boundary
from splinelens.geometry.plane import Plane, cell_chunks, make_plane
from splinelens.geometry.units import unit_table
from splinelens.view import layer_codes, view_of

__all__ = ["LayerSlice", "SlicePartition", "slice_partition"]

Tensor = torch.Tensor
Array = np.ndarray


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
        return poly.locate(self.vertices, self.counts, _plane_points(uv))

    def to_input(self, uv: Array) -> Tensor:
        """Plane points (P, 2) as network inputs (P, *input_shape)."""
        uv_t = torch.as_tensor(_plane_points(uv)).to(self.origin)
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
    A float32 model is analysed through a float64 copy (kept per model: see ``float64_twin``).

    >>> import torch, torch.nn as nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    >>> origin, dirs = torch.zeros(2), torch.eye(2)  # the plane of the two inputs
    >>> part = slice_partition(net, origin, dirs, bounds=(-1.0, 1.0, -1.0, 1.0))
    >>> len(part) >= 1, len(part.layers)
    (True, 1)
    """
    start = time.perf_counter()
    model64 = float64_twin(unwrap_model(model))
    origin, dirs, bounds, anchors = make_plane(model64, origin, directions, bounds, points, margin)
    # computed about the window's centre (u, v) = c, so that tolerances are those of its size
    c = np.array([(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2])
    centre = origin + float(c[0]) * dirs[0] + float(c[1]) * dirs[1]
    three = torch.stack([centre, centre + dirs[0], centre + dirs[1]])
    with said_of_twin(unwrap_model(model), model64, three):
        view = view_of(model64, three)
    plane = Plane(view, centre, dirs)
    local = (bounds[0] - c[0], bounds[1] - c[0], bounds[2] - c[1], bounds[3] - c[1])
    V, n = poly.square(local)
    scale = max(abs(b) for b in local)
    layers = []
    for layer in view.layers:
        with np.errstate(over="ignore", invalid="ignore"):  # (an overflow is refused in cut)
            V, n, parent = cut(plane, unit_table(view.program, layer), V, n, scale)
        V = poly.clean(V, n)  # (the padding held stale points)
        layers.append(LayerSlice(layer.name, V, n, parent))
    logits, codes = _outputs(plane, V, n)  # (R, C, 3), the regions' codes
    _check_resolved(codes)
    boundary = decision_boundary(V, n, logits, scale)
    layers = [LayerSlice(la.name, la.vertices + c, la.counts, la.parent) for la in layers]
    with np.errstate(over="ignore", invalid="ignore"):  # refused below
        logits[..., 2] -= logits[..., 0] * c[0] + logits[..., 1] * c[1]  # (a, b, c) in (u, v)
    check_in_range(logits)
    part = SlicePartition(origin, dirs, bounds, layers, codes, logits, boundary + c, anchors, 0.0)
    part.seconds = time.perf_counter() - start
    return part


def _outputs(plane: Plane, V: Array, n: Array) -> tuple[Array, PartitionCodes]:
    """Each region's output as functions of (u, v), (R, C, 3), and its partition code."""
    prog, table = plane.view.program, unit_table(plane.view.program, None)
    logits, codes = [], []
    for s, e in cell_chunks(len(V), table, 1):
        uv = poly.interior(V[s:e], n[s:e])
        (coef,), states = plane.slots([table], uv)
        logits.append(coef)
        codes.append(layer_codes(prog, states, e - s))
    return np.concatenate(logits), PartitionCodes.cat(codes)


def _check_resolved(codes: PartitionCodes) -> None:
    """Refuse a partition two of whose regions share a code: one region's (convex) pieces that
    a cut passing within the resolution of a vertex (``cutting``'s 1e-10 of the window) left
    apart, where a narrower region was dropped."""
    if not codes.layers:  # (an affine network: one region)
        return
    rows = np.ascontiguousarray(np.concatenate([la.data.cpu().numpy() for la in codes.layers], 1))
    keys = rows.view(np.dtype((np.void, rows.strides[0])))  # (R, 1): each row as bytes
    if len(np.unique(keys)) < len(keys):  # (10x faster than np.unique of rows of numbers)
        raise ValueError(
            "this slice has regions narrower than its resolution (about 1e-10 of the window: "
            "boundaries that pass that close to each other's crossings), so its partition "
            "cannot be computed exactly; narrow the bounds around the small regions"
        )


def _plane_points(uv: object) -> Array:
    """Plane points as a float64 (P, 2) array; what is not (P, 2) finite numbers is refused."""
    if isinstance(uv, Tensor):
        uv = uv.detach().cpu()
    try:
        arr = np.asarray(uv, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"uv must be plane points (P, 2) of numbers: {e}") from None
    if arr.shape == (2,):
        raise ValueError(
            f"uv must be plane points (P, 2), got one point of shape (2,): write it as "
            f"[[{arr[0]}, {arr[1]}]]"
        )
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"uv must be plane points (P, 2), got shape {arr.shape}")
    check_finite("uv", torch.from_numpy(arr), "the points must be on the plane")
    return arr
