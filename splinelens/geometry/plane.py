"""A network evaluated on a plane x = origin + u d1 + v d2 of its input space, in float64.

``make_plane`` checks and builds the plane (from an origin and two directions, or through three
inputs); ``Plane`` runs the captured program on plane points, the affine steps before any MASO
only once, and gives each unit's candidates as affine functions of (u, v) around given cells.

>>> # used by splinelens.geometry.slices.slice_partition
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from splinelens._capture import Program
from splinelens._checks import check_finite, check_finite_numbers, check_model_device
from splinelens._precision import exact_matmul
from splinelens._tensors import model_dtype
from splinelens.geometry.units import UnitTable, last_step, slot_differences
from splinelens.view import SplineView

__all__ = ["Plane", "cell_chunks", "make_plane", "plane_through"]

Tensor = torch.Tensor
Array = np.ndarray
_WORK = 1 << 23  # float64 entries of candidate values per chunk (64 MiB)
_MAX_CELLS = 4096  # cells per network run: small enough for the activations to stay in cache


def make_plane(
    model: nn.Module,
    origin: Tensor | None,
    directions: Tensor | None,
    bounds: tuple[float, float, float, float],
    points: tuple[Tensor, Tensor, Tensor] | None,
    margin: float,
) -> tuple[Tensor, Tensor, tuple[float, float, float, float], Array | None]:
    dt = model_dtype(model)
    check_model_device(dt)
    kw = {"dtype": torch.float64, "device": dt[1] if dt is not None else "cpu"}
    if points is not None:
        if origin is not None or directions is not None:
            raise ValueError("pass either points=(x0, x1, x2) or origin and directions, not both")
        check_finite_numbers("margin", [margin])
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        return plane_through(
            tuple(_finite(f"points[{i}]", x, kw) for i, x in enumerate(points)), margin
        )
    if origin is None or directions is None:
        raise ValueError("slice_partition needs origin and directions, or points=(x0, x1, x2)")
    origin, directions = _finite("origin", origin, kw), _finite("directions", directions, kw)
    if not hasattr(bounds, "__len__") or len(bounds) != 4:
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


def plane_through(xs: tuple, margin: float) -> tuple[Tensor, Tensor, tuple, Array]:
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


class Plane:
    """Runs the network on plane points (u, v); the affine steps before any MASO run only once.

    Those steps are affine in x, so on the plane their values are v0 + u du + v dv: three
    evaluations at the start, then one multiply-add per cell instead of, say, a 784 x 256 matmul.
    """

    def __init__(self, view: SplineView, origin: Tensor, dirs: Tensor) -> None:
        self.view, self.origin, self.dirs = view, origin, dirs
        prog = view.program
        _, needed = prog.affine_prefix
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
        if m == 1:  # run two copies: a batch of 1 would need a capture checked at N = 1
            out, states = self.slots(tables, np.concatenate([uv, uv]))
            return [c[:1] for c in out], prog.slice_states(states, 0, 1)
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


def cell_chunks(m: int, table: UnitTable, width: int = 16) -> list[tuple[int, int]]:
    """Cell ranges per network run: the candidate values of a chunk stay near 64 MiB."""
    step = min(_MAX_CELLS, max(1, _WORK // max(1, table.idx.size * width)))
    return [(s, min(s + step, m)) for s in range(0, m, step)]


def _finite(name: str, t: object, kw: dict) -> Tensor:
    """t as a detached float64 copy (``kw``: its dtype and device), its entries finite (the
    partition keeps it, not a batch it views, nor its graph)."""
    t = torch.as_tensor(t)
    check_finite(name, t)  # (before the copy: a tensor on meta has no values to copy)
    return t.to(**kw).detach().clone()
