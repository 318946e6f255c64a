"""Every MASO unit as an argmax over affine candidates, and those candidates along directions.

A layer's units all read a few *slots*: the entries of its MASO's tensor operands (a ReLU's
pre-activation; both operands of ``maximum``; a hardtanh's input). Unit k
chooses piece r where candidate r is the largest, candidate r being
``sum_t scale[k, r, t] * slot[idx[k, r, t]] + const[k, r]``. So the partition of one unit is
an argmax of affine functions of the slots, whatever the op:

* ReLU-like (threshold t): [t, z] (state z > t);  hardtanh: [lo - z, 0, z - hi];
* spline activations with knots t_1 < ... < t_{R-1}: [r z - (t_1 + ... + t_r)] for r < R;
* max-pool / max over dims: the window's entries; min-type ops: the entries negated.

Ties go to the lowest candidate; the boundaries are what matters for geometry (``slices``,
``local``), and the codes themselves always come from the network's own forward pass.

``slot_tangents`` evaluates the slots at points x and their derivatives along directions d with
every earlier state frozen at x's: the exact local affine form of each unit's candidates.

>>> import torch, torch.nn as nn, splinelens as sl
>>> view = sl.SplineView(nn.Sequential(nn.Linear(2, 3), nn.ReLU()).eval(), torch.zeros(1, 2))
>>> table = unit_table(view.program, view.layers[0])
>>> table.idx.shape                      # (units, candidates, terms)
(3, 2, 2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from splinelens._capture import Clip, Layer, Pairwise, Pool, Program, Reduce, Ref, Sign, Spline
from splinelens._checks import overflow_error
from splinelens._lock import held
from splinelens._precision import exact_matmul

__all__ = [
    "UnitTable",
    "last_step",
    "slot_differences",
    "slot_tangents",
    "slot_values",
    "unit_table",
]

Tensor = torch.Tensor
OUTPUT = "output"


@dataclass(frozen=True)
class UnitTable:
    """Candidates of every unit of one layer: idx/scale (K, R, 2), const (K, R), valid (K, R)."""

    step: str
    operands: tuple[Any, ...]  # the step's tensor arguments (Refs or constants) that are slots
    elementwise: bool  # slots are the operands broadcast to the output shape
    idx: np.ndarray
    scale: np.ndarray
    const: np.ndarray
    valid: np.ndarray
    chain: bool = False  # slopes increase along the candidates: neighbours decide the argmax

    @property
    def units(self) -> int:
        return self.idx.shape[0]

    def values(self, z: Tensor, tangent: bool = False) -> Tensor:
        """Candidate values from slots z (..., S): (..., K, R), -inf where a window leaves the
        input. ``tangent``: z are slot derivatives, so no constants (and 0 where invalid)."""
        idx, scale, const, valid = self.tensors(z.device)
        vals = (z[..., idx] * scale.to(z)).sum(-1)
        if tangent:
            return torch.where(valid, vals, 0.0)
        return torch.where(valid, vals + const.to(z), -math.inf)

    def tensors(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        cache = self.__dict__.setdefault("_cache", {})  # frozen dataclass: a plain dict cache
        if device not in cache:
            arrays = (self.idx.clip(0), self.scale, self.const, self.valid)
            cache[device] = tuple(torch.as_tensor(a, device=device) for a in arrays)
        return cache[device]

    def coefficients(self, slots: np.ndarray) -> np.ndarray:
        """Candidates from slot coefficients (M, S, C): (M, K, R, C) (C = 3 for a u + b v + c)."""
        terms = slots[:, self.idx.clip(0)] * self.scale[None, ..., None]  # (M, K, R, 2, C)
        out = terms.sum(3)
        out[..., -1] += self.const
        return out


def unit_table(prog: Program, layer: Layer | None) -> UnitTable:
    """The candidate table of a layer (``None``: the output, one unit choosing the top class)."""
    if layer is None:
        c = math.prod(prog.shapes[prog.output_name])
        idx = np.stack([np.arange(c), np.full(c, -1)], 1)[None]  # (1, C, 2)
        return _table(OUTPUT, (Ref(prog.output_name),), False, idx, [1.0, 0.0], 0.0)
    step = prog.step(layer.step)
    maso, k = step.maso, layer.units
    ar = np.arange(k)
    if isinstance(maso, Sign):
        idx = np.stack([np.full(k, -1), ar], 1)
        return _table(step.name, step.args[:1], True, _terms(idx), [1.0, 0.0], [maso.threshold, 0])
    if isinstance(maso, Clip):
        return _clip_table(step, k)
    if isinstance(maso, Spline):
        return _spline_table(step, prog.leaf(step.args[1].name), k)
    if isinstance(maso, Pairwise):
        sign = 1.0 if maso.kind == "maximum" else -1.0
        ops = (step.args[0], step.args[1])
        return _table(step.name, ops, True, _terms(np.stack([ar, ar + k], 1)), [sign, 0.0], 0.0)
    windows = (
        _pool_windows(maso, prog.shapes[step.args[0].name], layer)
        if isinstance(maso, Pool)
        else _reduce_windows(maso, prog, step)
    )
    sign = 1.0 if isinstance(maso, Pool) or maso.largest else -1.0
    return _table(step.name, step.args[:1], False, _terms(windows), [sign, 0.0], 0.0)


def _terms(idx: np.ndarray) -> np.ndarray:
    """One slot term per candidate (K, R) -> (K, R, 2) with an unused second term."""
    return np.stack([idx, np.full_like(idx, -1)], -1)


def _table(step: str, ops: tuple, elementwise: bool, idx: np.ndarray, scale, const) -> UnitTable:
    idx = idx.astype(np.int64)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), idx.shape).copy()
    scale[idx < 0] = 0.0
    const = np.broadcast_to(np.asarray(const, dtype=np.float64), idx.shape[:2]).copy()
    valid = idx[..., 0] != -2  # pool windows mark positions outside the input with -2
    return UnitTable(step, tuple(ops), elementwise, idx, scale, const, valid)


def _clip_table(step: Any, k: int) -> UnitTable:
    maso, ar, none = step.maso, np.arange(k), np.full(k, -1)
    idx = _terms(np.stack([ar, none, ar], 1))  # [lo - z, 0, z - hi]
    scale = [[-1.0, 0.0], [0.0, 0.0], [1.0, 0.0]]
    return _table(step.name, step.args[:1], True, idx, scale, [maso.lo, 0.0, -maso.hi])


def _spline_table(step: Any, knots: Tensor, k: int) -> UnitTable:
    """Candidates r z - (t_1 + ... + t_r), r = 0..R-1: a convex max-affine function whose argmax
    is the piece, switching from r-1 to r exactly at knot t_r (ties to the lower piece)."""
    t = knots.double().cpu().numpy()  # (R-1,)
    r = len(t) + 1
    idx = _terms(np.broadcast_to(np.arange(k)[:, None], (k, r)))
    const = -np.concatenate([[0.0], np.cumsum(t)])
    scale = np.stack([np.arange(r, dtype=np.float64), np.zeros(r)], 1)  # (R, 2)
    return replace(_table(step.name, step.args[:1], True, idx, scale, const), chain=True)


def _pool_windows(pool: Pool, in_shape: tuple[int, ...], layer: Layer) -> np.ndarray:
    """Flat input index of every window entry, (units, R); -2 where the window leaves the input."""
    nd, spatial = pool.nd, in_shape[-pool.nd :]
    out_spatial = layer.shape[-nd:]
    flat = np.zeros((1,) * (2 * nd), dtype=np.int64)  # (O_1..O_nd, R_1..R_nd) once broadcast
    ok = np.ones((1,) * (2 * nd), dtype=bool)
    for i in range(nd):
        pos, valid = _axis_windows(pool, i, out_spatial[i], spatial[i])  # (O_i, R_i)
        shape = [1] * (2 * nd)
        shape[i], shape[nd + i] = pos.shape
        flat = flat + (pos * math.prod(spatial[i + 1 :])).reshape(shape)
        ok = ok & valid.reshape(shape)
    per_plane = np.where(ok, flat, -2).reshape(math.prod(out_spatial), -1)  # (O, R)
    planes = math.prod(in_shape[:-nd])
    offsets = np.arange(planes)[:, None, None] * math.prod(spatial)
    out = np.where(per_plane[None] >= 0, per_plane[None] + offsets, -2)
    return out.reshape(-1, per_plane.shape[1])


def _axis_windows(pool: Pool, i: int, n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    o = np.arange(n_out)[:, None]
    if pool.output_size:
        start, end = (o * n_in) // n_out, -((-(o + 1) * n_in) // n_out)
        r = np.arange(int((end - start).max()))[None]
        pos = start + r
        return pos, pos < end
    r = np.arange(pool.kernel[i])[None]
    pos = o * pool.stride[i] - pool.padding[i] + r * pool.dilation[i]
    return pos, (pos >= 0) & (pos < n_in)


def _reduce_windows(maso: Reduce, prog: Program, step: Any) -> np.ndarray:
    src = step.args[0].name
    shape, b = prog.shapes[src], prog.bdims[src]
    ids = torch.arange(math.prod(shape)).view(shape).unsqueeze(b)  # a batch of one
    flat = maso.flat(ids)  # (..., R) with the batch dimension among the kept ones
    kept_b = b - sum(d % ids.dim() < b for d in maso.dims)
    return flat.movedim(kept_b, 0).reshape(-1, flat.shape[-1]).numpy()


def slot_tangents(
    prog: Program,
    tables: list[UnitTable],
    x: Tensor,
    dirs: Tensor,
    start: str | None = None,
    offset: int = 0,
) -> list[tuple[Tensor, Tensor]]:
    """Slots at x (M, *in) and along dirs, states frozen at x's: [(z, dz)] per table.

    z is (M, S), dz (M, T, S). ``dirs`` (T, ...) move the input, or the node ``start`` (then
    nodes that reach the layers without passing through it keep their values for x). dz is the
    frozen network's derivative along each direction, by forward-mode differentiation (``jvp``,
    all directions in one vmapped pass): products of the slopes only, where the difference
    slots(x + d) - slots(x) lost the digits that large pre-activations or inputs cancel. (That
    difference is the fallback for an op that has no forward-mode rule under vmap.)
    A non-finite slot or derivative (values that overflow) is refused, naming the input
    (``offset``: x's first input's index in the caller's batch).
    """
    out = _tangents(prog, tables, x, dirs, start)
    for z, dz in out:  # (a max-pool's padding is no slot: the table marks it invalid)
        bad = ~(z.isfinite().flatten(1).all(1) & dz.isfinite().flatten(1).all(1))  # (M,)
        if bool(bad.any()):
            raise overflow_error(offset + int(bad.nonzero()[0, 0]), z.dtype)
    return out


def _tangents(
    prog: Program, tables: list[UnitTable], x: Tensor, dirs: Tensor, start: str | None
) -> list[tuple[Tensor, Tensor]]:
    """``slot_tangents``, unchecked."""
    m = len(x)
    stop = last_step(prog, tables)
    start = start or prog.input_name
    with torch.no_grad(), exact_matmul():  # (forward-mode derivatives need no autograd graph)
        env0, states = prog.record(x, stop=stop)
        h0 = prog.per_sample(start, env0[start])  # (M, *start_shape)

        def slots(h: Tensor) -> tuple[Tensor, ...]:
            env = prog.frozen(x, states, at={start: prog.from_sample(start, h)}, stop=stop)
            return tuple(slot_values(prog, table, env, m) for table in tables)

        def along(d: Tensor) -> tuple[Tensor, ...]:  # one direction, the same at every point
            return torch.func.jvp(slots, (h0,), (d.expand_as(h0),))[1]

        try:
            with held():  # (one dual level for the whole process: threads clash)
                dz = torch.func.vmap(along)(dirs) if tables else ()  # per table (T, M, S)
        except (RuntimeError, NotImplementedError):
            moved = (h0.unsqueeze(0) + dirs.unsqueeze(1)).reshape(-1, *h0.shape[1:])  # (T*M, ..)
            at = {start: prog.from_sample(start, moved)}
            xt = x.repeat(len(dirs), *[1] * (x.dim() - 1))
            env1 = prog.frozen(xt, prog.tile_states(states, len(dirs)), at=at, stop=stop)
            return slot_differences(prog, tables, env0, env1, m, len(dirs))
        z0 = [slot_values(prog, table, env0, m) for table in tables]
    return [(z, d.transpose(0, 1)) for z, d in zip(z0, dz, strict=True)]


def slot_differences(
    prog: Program, tables: list[UnitTable], env0: dict, env1: dict, m: int, t: int
) -> list[tuple[Tensor, Tensor]]:
    """Slots of a run at m points and of a frozen run at t moves of each: [(z, dz (m, t, S))]."""
    out = []
    for table in tables:
        z0, z1 = slot_values(prog, table, env0, m), slot_values(prog, table, env1, t * m)
        out.append((z0, (z1.view(t, m, -1) - z0).transpose(0, 1)))
    return out


def last_step(prog: Program, tables: list[UnitTable]) -> str | None:
    """The last step the tables read (None: the output, or no table)."""
    names = {t.step for t in tables}
    if OUTPUT in names or not names:
        return None
    return max(names, key=prog.position.__getitem__)


def slot_values(prog: Program, table: UnitTable, env: dict[str, Any], m: int) -> Tensor:
    """The slot values of one table in a run's environment, (m, S)."""
    vals = [env[a.name] if isinstance(a, Ref) else a for a in table.operands]
    if table.elementwise:
        bdim = prog.bdims[table.step]
        vals = [v if isinstance(v, Tensor) else torch.tensor(v) for v in vals]
        full = torch.broadcast_tensors(*[v.to(vals[0].dtype) for v in vals])
        return torch.cat([f.movedim(bdim, 0).reshape(m, -1) for f in full], 1)
    name = table.operands[0].name
    return prog.per_sample(name, vals[0]).reshape(m, -1)
