"""Checks of each layer against its explicit MASO (``check_masos``, Sec. 3): the layer's values
and its partition code against the MASO's values and argmax, at the inputs given.

>>> import torch, torch.nn as nn
>>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU()).double().eval()
>>> check_masos(net, torch.randn(2, 3, dtype=torch.float64)).ok
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from splinelens._capture import Layer
from splinelens._checks import default_rtol
from splinelens._precision import exact_matmul
from splinelens.geometry.maso import MASO, NotAMasoError, layer_maso, start_node
from splinelens.view import SplineView, view_of

__all__ = ["LayerMasoCheck", "MasoCheck", "check_masos"]

Tensor = torch.Tensor


@dataclass(frozen=True)
class LayerMasoCheck:
    """One layer against its MASO: the worst |MASO(h) - layer(h)| over the inputs, and whether
    the layer's partition code picks a MASO argmax at every input and unit (to the check's
    tolerance where pieces tie)."""

    name: str
    max_abs_error: float
    codes_agree: bool
    tolerance: float | None = None  # this layer's (None: the check's)


@dataclass(frozen=True)
class MasoCheck:
    """How exactly every MASO layer equals its explicit form (``check_masos``).

    ``ok``: every layer's code picks a MASO argmax and every error is at most its layer's
    tolerance (absolute: rtol times the size of that layer's terms, ``check_masos``), or
    ``tolerance`` for a layer without one; ``tolerance`` is the largest.
    ``skipped``: the layers that are no MASO (not convex, or pieces on one line), not checked.

    >>> import torch, torch.nn as nn, splinelens as sl
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU()).double().eval()
    >>> check = sl.check_masos(net, torch.randn(5, 3, dtype=torch.float64))
    >>> check.ok, [layer.name for layer in check.layers]
    (True, ['1', '3'])
    >>> print(check)  # doctest: +ELLIPSIS
    OK: 2 MASO layers, tolerance ...
      '1': OK, max |MASO(h) - layer(h)| = ..., argmax == code
      '3': OK, max |MASO(h) - layer(h)| = ..., argmax == code
    """

    layers: tuple[LayerMasoCheck, ...]
    tolerance: float
    skipped: tuple[str, ...] = ()  # the layers that are no MASO, each with why

    @property
    def ok(self) -> bool:
        """Every layer's codes agree and every error is within ``tolerance``."""
        return all(self._holds(la) for la in self.layers)

    @property
    def max_abs_error(self) -> float:
        """The worst error over all layers (0 when there is no MASO layer)."""
        return max((la.max_abs_error for la in self.layers), default=0.0)

    def _holds(self, la: LayerMasoCheck) -> bool:
        return la.codes_agree and la.max_abs_error <= self._tolerance(la)

    def _tolerance(self, la: LayerMasoCheck) -> float:
        return self.tolerance if la.tolerance is None else la.tolerance

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        head = f"{verdict}: {len(self.layers)} MASO layers, tolerance {self.tolerance:.3g}"
        rows = [
            f"  {la.name!r}: {'OK' if self._holds(la) else 'FAILED'}, max |MASO(h) - layer(h)| "
            f"= {la.max_abs_error:.3g}{_own(la)}, argmax {'==' if la.codes_agree else '!='} code"
            for la in self.layers
        ]
        rows += [f"  skipped, no MASO: {why}" for why in self.skipped]
        return "\n".join([head, *rows])


def _own(la: LayerMasoCheck) -> str:
    return "" if la.tolerance is None else f" (tolerance {la.tolerance:.3g})"


def check_masos(model: nn.Module, x: Tensor, rtol: float | None = None) -> MasoCheck:
    """Each MASO layer of ``model`` at x against the network's own values (Sec. 3).

    Per layer: max |MASO(h(x)) - layer(x)| and whether x's partition code picks a MASO argmax
    (where pieces tie, to the tolerance: "argmax == code" in the report).
    Layers that are no MASO (hardtanh, min-type ops) are skipped. Each layer's tolerance is
    relative to the size of its terms rounded, its largest |output| and |A_k,r| |h| + |B_k,r| of
    any piece (not at least 1, as ``verify``'s): by default 1e4 machine epsilons of x's dtype,
    at most 1e-2, as ``verify``'s rtol.

    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()).eval()
    >>> check_masos(net, torch.randn(3, 1, 6, 6)).ok  # the ReLU layer and the max-pooling one
    True
    """
    if rtol is not None and (isinstance(rtol, bool) or not (math.isfinite(rtol) and rtol > 0)):
        raise ValueError(f"rtol must be a finite positive number, got {rtol!r}")
    view = view_of(model, x)
    with torch.no_grad(), exact_matmul():
        env, states = view.program.record(x)
    masos, skipped = [], []
    for la in view.layers:
        try:
            masos.append((la, layer_maso(model, x, la.index)))
        except NotAMasoError as e:
            skipped.append(str(e))  # the layer and why
    rtol = rtol if rtol is not None else default_rtol(x.dtype)
    out = []
    for la, m in masos:
        tol = rtol * _size(view, m, env, la)
        rows = [_one(view, m, env, states, la, x, i, tol) for i in range(len(x))]
        err, agree = max(r[0] for r in rows), all(r[1] for r in rows)
        out.append(LayerMasoCheck(la.name, err, agree, tol))
    return MasoCheck(tuple(out), max((la.tolerance for la in out), default=0.0), tuple(skipped))


def _size(view: SplineView, m: MASO, env: dict[str, Any], la: Layer) -> float:
    """The size of the terms layer la's values are rounded from, at every input: its outputs
    and its pieces' |A_k,r| |h| + |B_k,r| (slots z = W h + b as |W| |h| + |b| where W is dense,
    else as |z|)."""
    prog, start = view.program, start_node(view, la)
    h = prog.per_sample(start, env[start])  # (N, *input_shape)
    out = env[la.node]
    with torch.no_grad():
        if m.W is not None:
            slots = h.reshape(len(h), -1).abs() @ m.W.abs().T + m.b.abs()  # (N, S)
        else:
            slots = m.slots(h).abs()
        idx, scale, const, valid = m.table.tensors(slots.device)
        terms = (slots[..., idx] * scale.abs().to(slots)).sum(-1) + const.abs().to(slots)
        terms = torch.where(valid, terms, 0.0)  # (N, K, R)
    return max(float(t.abs().max()) if t.numel() else 0.0 for t in (out, terms))


def _one(view, m, env, states, la, x, i, tol: float) -> tuple[float, bool]:
    """Layer la at input i: the MASO built at x_i against the network's own values; the code
    agrees where its piece is the argmax, or ties with it to ``tol`` (equal pieces recomputed
    in another order, as max-pooling after max-pooling makes, differ by rounding)."""
    mi = layer_maso(view.model, x[i : i + 1], la.index) if i else m
    prog, start = view.program, start_node(view, la)
    h = prog.per_sample(start, env[start])[i : i + 1]
    ref = prog.per_sample(la.node, env[la.node])[i : i + 1]
    code = prog.unit_codes(la, states, len(x))[i].long().to(h.device)
    with torch.no_grad():
        err = (mi(h) - ref.reshape(1, *mi.output_shape)).abs().max().item()
        vals = mi.pieces(h)[0]  # (K, R)
        at_code = vals.gather(-1, code[:, None]).squeeze(-1)
        same = (mi.argmax(h)[0] == code) | (vals.amax(-1) - at_code <= tol)
    return err, bool(same.all())
