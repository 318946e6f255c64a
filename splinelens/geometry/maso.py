"""Each layer as an explicit max-affine spline operator (Sec. 3, Propositions 1-4, Theorem 1).

Layer l maps the previous layer's output h to K units; unit k outputs max_r <A_k,r, h> + B_k,r
over its R pieces, and its piece is the argmax. ``layer_maso`` returns that operator as a module:
slopes (K, R, D) and offsets (K, R) as dense tensors for small layers, and as an operator (the
frozen affine ops before the nonlinearity) for large ones.

Pieces: ReLU [0, z], leaky ReLU / PReLU [a z, z] (a <= 1), abs [-z, z], clamp(min=t) [t, z],
max-pooling and max over dims: the window's entries, maximum(a, b): [b, a], a convex spline
activation (``sl.splinify``): its own pieces [s_r z + b_r]. Hardtanh, min-type
ops and slopes above 1 are piecewise affine but concave somewhere, so they are no MASO: they are
refused here (their partitions, codes and affine maps stay exact elsewhere in splinelens).

>>> import torch, torch.nn as nn, splinelens as sl
>>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double().eval()
>>> maso = sl.layer_maso(net, torch.randn(1, 3, dtype=torch.float64), 0)
>>> maso.slopes.shape, maso.offsets.shape          # (K, R, D), (K, R)
(torch.Size([4, 2, 3]), torch.Size([4, 2]))
>>> h = torch.randn(5, 3, dtype=torch.float64)
>>> torch.allclose(maso(h), net[1](net[0](h)))
True
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from splinelens._capture import Layer, Pairwise, Sign, Spline
from splinelens._precision import exact_matmul
from splinelens.geometry.units import UnitTable, slot_tangents, slot_values, unit_table
from splinelens.view import SplineView, view_of

__all__ = ["MASO", "NotAMasoError", "layer_maso", "start_node"]

Tensor = torch.Tensor
_DENSE = 1 << 24  # slot-Jacobian entries up to which W is materialised


class NotAMasoError(ValueError):
    """A layer that is piecewise affine but not max-affine (not convex in its input)."""


class MASO(nn.Module):
    """One layer as a MASO: K units of R affine pieces each, on inputs h (N, *input_shape).

    ``forward(h)`` gives the layer's output (N, *output_shape); ``argmax(h)`` the piece of every
    unit (N, K). Pieces read ``slots`` z = W h + b (the pre-activations): piece r of unit k is
    sum_t scale[k, r, t] z[idx[k, r, t]] + const[k, r].
    """

    def __init__(
        self, name: str, input_shape, output_shape, table: UnitTable, tie_last: bool, pre
    ) -> None:
        super().__init__()
        self.name, self.input_shape, self.output_shape = name, input_shape, output_shape
        self.table, self.tie_last = table, tie_last  # the true pieces, not just their boundaries
        self._pre = pre  # h (N, D) -> slots (N, S)
        self.W: Tensor | None = None  # (S, D) when dense
        self.b: Tensor | None = None  # (S,) when dense

    def __getstate__(self) -> dict[str, Any]:
        """A dense MASO pickles (``torch.save``) as its table, W and b; one too large for dense
        slopes runs the model's capture for its slots, which does not pickle: refused."""
        if self.W is None:
            raise TypeError(
                f"layer {self.name!r}'s MASO is too large for dense slopes: it computes its "
                "pre-activations with the model's capture, which is neither pickled nor saved. "
                "Make it again with sl.layer_maso(model, x, layer) where you need it"
            )
        return {**self.__dict__, "_pre": None}  # (slots read W and b)

    def __copy__(self) -> MASO:
        """A shallow copy, sharing the attributes (and the capture), as ``copy.copy`` of any
        module (which would go through ``__getstate__``: refused for a large MASO)."""
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        return twin

    def __deepcopy__(self, memo: dict[int, Any]) -> MASO:
        """A copy whose attributes are copies, sharing the capture (``_pre``) as before."""
        twin = object.__new__(type(self))
        memo[id(self)] = twin
        twin.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return twin

    def pieces(self, h: Tensor) -> Tensor:
        """Every piece's value, (N, K, R) (-inf for window positions outside the input)."""
        return self.table.values(self.slots(h))

    def slots(self, h: Tensor) -> Tensor:
        """The pre-activations z = W h + b, (N, S)."""
        shape = tuple(self.input_shape)
        if not isinstance(h, Tensor) or h.dim() == 0 or tuple(h.shape[1:]) != shape:
            got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise ValueError(
                f"layer {self.name!r}'s MASO takes h of shape (N, "
                f"{', '.join(map(str, shape))}), the previous layer's output; got {got}"
            )
        dt = self.W.dtype if self.W is not None else getattr(self, "input_dtype", h.dtype)
        if h.dtype != dt:
            raise ValueError(f"h is {h.dtype}, the MASO {dt}: call h.to(...) to match")
        if self.W is not None:
            return h.reshape(len(h), math.prod(shape)) @ self.W.T + self.b
        if len(h) == 0:
            return h.new_zeros(0, int(self.table.idx.max()) + 1)
        return self._pre(h)

    def forward(self, h: Tensor) -> Tensor:
        return self.pieces(h).amax(-1).view(len(h), *self.output_shape)

    def argmax(self, h: Tensor) -> Tensor:
        """(N, K) each unit's piece; ties go to the first piece (to a in maximum(a, b))."""
        vals = self.pieces(h)
        if self.tie_last:
            return vals.shape[-1] - 1 - vals.flip(-1).argmax(-1)
        return vals.argmax(-1)

    @property
    def slopes(self) -> Tensor:
        """A (K, R, D): piece r of unit k is <A[k, r], h> + B[k, r]."""
        if self.W is None:
            raise ValueError(
                f"layer {self.name!r} is too large for dense slopes; use maso(h) / .pieces(h)"
            )
        idx, scale, _, _ = self.table.tensors(self.W.device)
        return (self.W[idx] * scale.to(self.W)[..., None]).sum(2)

    @property
    def offsets(self) -> Tensor:
        """B (K, R) (-inf for window positions outside the input)."""
        if self.b is None:
            raise ValueError(f"layer {self.name!r} is too large for dense offsets")
        return self.table.values(self.b)


def _pieces(view: SplineView, layer: Layer, table: UnitTable, x: Tensor) -> tuple[UnitTable, bool]:
    """The true pieces of the layer's nonlinearity (``table`` only locates their boundaries),
    and whether ties go to the last piece."""
    step = view.program.step(layer.step)
    maso, k = step.maso, layer.units
    args = _arguments(view, step, x) if isinstance(maso, (Sign, Spline)) else step.args
    if not maso.shape(args)[1]:  # (only signs and splines read their arguments' values)
        raise NotAMasoError(
            f"layer {layer.name!r} ({maso.kind}) is piecewise affine but not convex in its "
            "input, so it is no MASO (Propositions 1-4 cover max-affine operators only)"
        )
    if isinstance(maso, Spline):
        return _spline_pieces(view, step, table, layer), False
    if isinstance(maso, Pairwise):  # [b, a]: the argmax is 1 where a wins, as in the codes
        rev = {"idx": table.idx[:, ::-1].copy(), "scale": table.scale[:, ::-1].copy()}
        return replace(table, **rev), True
    if not isinstance(maso, Sign) or maso.kind == "clamp_min":
        return table, False
    slope = _negative_slopes(view, step, args, k)
    if (slope == 1).any():  # (as a spline with two pieces on one line)
        raise NotAMasoError(
            f"layer {layer.name!r} ({maso.kind}) has slope 1 on both sides of 0: its two pieces "
            "lie on one line, so a max over them cannot tell them apart while its partition "
            "codes do; it has no MASO form with the same partition"
        )
    ar, none = np.arange(k), np.full(k, -1)
    idx = np.stack([np.stack([ar, none], 1), np.stack([ar, none], 1)], 1)  # (K, 2, 2): [a z, z]
    scale = np.stack([np.stack([slope, 0 * slope], 1), np.stack([1 + 0 * slope, 0 * slope], 1)], 1)
    valid = np.ones((k, 2), bool)
    return replace(table, idx=idx, scale=scale, const=np.zeros((k, 2)), valid=valid), False


def _spline_pieces(view: SplineView, step, table: UnitTable, layer: Layer) -> UnitTable:
    """A spline activation's own pieces [s_r z + b_r], when they form a convex function."""
    slopes = view.program.leaf(step.args[2].name).double().cpu().numpy()  # (R,), increasing
    intercepts = view.program.leaf(step.args[3].name).double().cpu().numpy()
    same = (np.diff(slopes) == 0) & (np.diff(intercepts) == 0)
    if same.any():
        r = int(np.nonzero(same)[0][0])
        raise NotAMasoError(
            f"layer {layer.name!r} (spline activation): pieces {r} and {r + 1} lie on one line, "
            "so a max over its pieces cannot tell them apart while its partition codes do "
            f"(knot {r}); it has no MASO form with the same partition"
        )
    r = len(slopes)
    scale = np.broadcast_to(np.stack([slopes, np.zeros(r)], 1), table.scale.shape).copy()
    const = np.broadcast_to(intercepts, table.const.shape).copy()
    return replace(table, scale=scale, const=const)


def _arguments(view: SplineView, step, x: Tensor) -> list[Any]:
    """The values of a layer's arguments at x's first input (its pre-activation, PReLU's
    slopes, a spline's tables)."""
    with torch.no_grad(), exact_matmul():
        env, _ = view.program.record(x[:1], stop=step.name)
    return [env[a.name] if hasattr(a, "name") else a for a in step.args]


def _negative_slopes(view: SplineView, step, args: list[Any], k: int) -> np.ndarray:
    """(K,) the slope of each unit's piece below 0 (PReLU: per channel)."""
    z = args[0]
    factor = step.maso.factor(args, torch.zeros_like(z, dtype=torch.bool))
    factor = torch.broadcast_to(factor, z.shape)
    return view.program.per_sample(step.args[0].name, factor).reshape(-1)[:k].cpu().double().numpy()


def layer_maso(model: nn.Module, x: Tensor, layer: int | str) -> MASO:
    """Layer ``layer`` of ``model`` as an explicit MASO of the previous layer's output.

    ``x`` (1 or more inputs; the first is used) fixes the values of skip connections from
    earlier layers, which enter the offsets; for a chain of layers the MASO does not depend on x.

    >>> import torch, torch.nn as nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    >>> x = torch.randn(5, 3)
    >>> maso = layer_maso(net, x, 0)  # the ReLU layer as a MASO of the input
    >>> torch.allclose(maso(x), torch.relu(net[0](x)), atol=1e-6)
    True
    """
    view = view_of(model, x)  # checks x
    la = view.layer(layer)
    start = start_node(view, la)
    table = unit_table(view.program, la)
    in_shape = view.program.shapes[start]
    x1 = x[:1].detach().clone()  # (kept by the slots: not a view of the whole batch)
    with torch.no_grad(), exact_matmul():
        _, states = view.program.record(x1, stop=table.step)  # x's pieces, frozen below

    held = view.program.hold()  # the modules the capture reads, held by the MASO (through pre)
    made = view.tensors.fingerprint()  # its pieces are the weights' now: so must its slots be

    def pre(h: Tensor, *, owners: tuple = held) -> Tensor:  # the frozen ops from h to the slots
        if not view.tensors.fingerprint().same_values(made):
            raise ValueError(
                f"the model's parameters or buffers changed after layer {la.name!r}'s MASO was "
                f"made: its pieces are the old weights', its pre-activations would be the new "
                f"ones'. Make it again with sl.layer_maso(model, x, layer)"
            )
        return _run_from(view, table, x1, states, start, h)

    m = MASO(la.name, in_shape, la.shape, *_pieces(view, la, table, x), pre)
    m.input_dtype = x.dtype
    d, s = math.prod(in_shape), table.idx.max() + 1
    if d * s <= _DENSE:
        basis = torch.eye(d, dtype=x.dtype, device=x.device).view(d, *in_shape)
        ((_, dz),) = slot_tangents(view.program, [table], x1, basis, start=start)
        m.W = dz[0].T.contiguous()  # (S, D)
        m.b = pre(x.new_zeros(1, *in_shape))[0]  # (S,): the frozen ops at h = 0
    return m


def start_node(view: SplineView, la: Layer) -> str:
    """The node a layer's MASO reads: the previous layer's output, or the input."""
    prog = view.program
    return prog.layers[la.index - 1].node if la.index else prog.input_name


def _run_from(
    view: SplineView, table: UnitTable, x1: Tensor, states: dict, start: str, h: Tensor
) -> Tensor:
    prog, n = view.program, len(h)
    with torch.no_grad(), exact_matmul():
        env = prog.frozen(
            x1.expand(n, *x1.shape[1:]),
            prog.tile_states(states, n),
            at={start: prog.from_sample(start, h)},
            stop=table.step,
        )
    return slot_values(prog, table, env, n)
