"""``SplineView``: a network captured once, seen as a composition of MASOs; and the plain functions.

>>> import torch, torch.nn as nn, splinelens as sl
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
...                     nn.Linear(8, 3)).eval()
>>> view = sl.SplineView(net, torch.randn(2, 4))
>>> [(layer.name, layer.kind, layer.units) for layer in view.layers]
[('1', 'relu', 8), ('3', 'relu', 8)]
>>> view.affine_map(torch.randn(5, 4), start=0, end=1).A.shape   # the MASO of layer 2
torch.Size([5, 8, 8])
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from splinelens._capture import Layer, Program, apply_g, capture, check_eval_mode, mode_modules
from splinelens._checks import (
    HoldsCapture,
    check_dtype,
    check_finite,
    check_input,
    check_overflow,
    check_positive_int,
    layer_index,
    map_rtol,
    term_sizes,
    unwrap_model,
    warn_uncached,
)
from splinelens._fingerprint import ModelTensors, check_model_finite
from splinelens._guard import structure_guard
from splinelens._lock import held
from splinelens._precision import exact_matmul
from splinelens._reach import refers_to
from splinelens._structure import Structure, structure
from splinelens._structure_diff import describe_change
from splinelens._sums import all_finite
from splinelens._tensors import model_dtype, model_state, model_tensors
from splinelens._twin import made_in_float64
from splinelens.affine import AffineMap
from splinelens.codes import LayerCodes, PartitionCodes
from splinelens.errors import StaleCaptureError

__all__ = [
    "SplineView",
    "Verification",
    "affine_map",
    "layer_codes",
    "partition_codes",
    "verify",
    "view_of",
]

Tensor = torch.Tensor
LayerKey = int | str | None


class SplineView(HoldsCapture):
    """A piecewise-affine network, captured once with torch.export and reused.

    The capture reads the model's parameters at every call, so it stays valid while the model
    trains (in place); it must be in eval mode whenever it is used. If the model's structure
    changes (a submodule replaced, added or removed, a setting or hook changed, a parameter
    re-registered), the view refuses with ``StaleCaptureError``: make a new one. A
    ``torch.compile``d model is captured through the module it wraps.
    """

    copy_refusal: ClassVar[str] = (
        "a SplineView holds its model's capture (generated code, weak references to the "
        "modules) and is neither pickled nor deep-copied: make a new sl.SplineView(model, x) "
        "where you need one (in another process, or for a copy of the model)"
    )

    def __init__(self, model: nn.Module, example_input: Tensor) -> None:
        model = unwrap_model(model)
        check_input("example_input", example_input)
        check_dtype(model, example_input, "example_input")
        inference = [name for name, t in model_tensors(model) if t.is_inference()]
        if inference:
            raise ValueError(
                f"the model's {inference[0]} was created under torch.inference_mode(), which "
                f"torch.export cannot trace; build or load the model outside inference mode"
            )
        self._model: nn.Module | None = model
        self._model_ref = weakref.ref(model)
        check_model_finite(model)  # before exporting it; the float64 twin makes float64 constants
        self.program = capture(model, example_input, within=made_in_float64(model))
        self._owners: tuple[nn.Module, ...] = self.program.hold()  # (a cached view: none)
        # after the capture's forward (lazy modules get their weights), while the structure holds
        self.structure = structure(model)
        self.guard = structure_guard(model, self.structure)  # (None: the walk at every call)
        self.tensors = ModelTensors(_program_state(model, self.program))
        self.input_shape = tuple(example_input.shape[1:])
        self.dtype = model_dtype(model)  # (the structure records dtypes)
        # held weakly: a cached view must not keep its model alive
        self.mode_modules = [weakref.ref(m) for _, m in mode_modules(model)]

    @property
    def model(self) -> nn.Module:
        """The captured model (the cache holds it weakly, so a dropped model is freed)."""
        model = self._model or self._model_ref()
        if model is None:
            raise ReferenceError("the model of this SplineView no longer exists")
        return model

    @property
    def layers(self) -> tuple[Layer, ...]:
        """The Definition-1 layers (each MASO nonlinearity), in execution order."""
        return tuple(self.program.layers)

    def layer(self, key: int | str) -> Layer:
        """A layer by index (negative counts from the end) or by name."""
        return self.program.layers[layer_index(key, [la.name for la in self.program.layers])]

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The network's output before g, (N, *out), and every MASO's state for x."""
        self.check(x)
        with torch.no_grad(), exact_matmul():
            values, states = self.program.record(x)
        out = self.program.per_sample(self.program.output_name, values[self.program.output_name])
        check_overflow(out)
        return out, states

    def affine_map(self, x: Tensor, start: LayerKey = None, end: LayerKey = None) -> AffineMap:
        """The exact affine map of x's region from ``start`` to ``end``.

        ``start``/``end``: None (the input / the output before g), a layer index or a layer name
        (that layer's output). ``start=l-1, end=l`` is layer l's MASO A^(l)[x], B^(l)[x].
        The weights are checked (finite) and fingerprinted when the map is first used, in one
        pass; from then on the map refuses any change of them.
        """
        self.check(x, weights=False)  # (the map checks the weights at its first use)
        return self._affine_map(x, start, end)

    def _affine_map(self, x: Tensor, start: LayerKey, end: LayerKey) -> AffineMap:
        s, e = self._node(start, is_start=True), self._node(end, is_start=False)
        if self._position(end, len(self.layers)) < self._position(start, -1):
            raise ValueError(f"end={end!r} comes before start={start!r}; the map runs forward")
        return AffineMap(self.program, self.model, x, s, e, tensors=self.tensors)

    def partition_codes(self, x: Tensor, batch_size: int = 1024) -> PartitionCodes:
        """Per-layer partition codes of the inputs x, computed in batches (Sec. 7, eq. (14)).

        x and the weights are checked for NaN and inf together with the result, in one
        synchronisation (the passes are NaN-safe); anything non-finite is refused as before.
        """
        self.check(x, values=False)
        return self._checked_codes(x, batch_size)

    def _checked_codes(self, x: Tensor, batch_size: int) -> PartitionCodes:
        """Codes whose x, weights and last layer are checked for NaN and inf with the result."""
        if not self.program.layers:
            raise ValueError(
                "the network has no MASO nonlinearity (it is affine): every input lies in its "
                "one region, and there are no partition codes to compute"
            )
        sums: list[Tensor] = [x.detach().sum(), *self.tensors.sums()]
        codes = self._partition_codes(x, batch_size, sums)
        if not all_finite(sums):  # say what: x or a weight (by name), or an overflow
            self.check(x)
            return self._partition_codes(x, batch_size)
        return codes

    def _partition_codes(
        self, x: Tensor, batch_size: int, sums: list[Tensor] | None = None
    ) -> PartitionCodes:
        """Codes batch by batch; ``sums``: append the last layer's sums there instead of
        refusing an overflow at once."""
        batch_size = check_positive_int("batch_size", batch_size)
        if len(x) <= batch_size:
            return self._codes(x, sums)
        chunks = range(0, len(x), batch_size)
        return PartitionCodes.cat([self._codes(x[i : i + batch_size], sums, i) for i in chunks])

    def _codes(self, x: Tensor, sums: list[Tensor] | None = None, first: int = 0) -> PartitionCodes:
        """The codes of x, inputs ``first`` on of the batch."""
        prog = self.program
        last = prog.layers[-1].step if prog.layers else None
        with torch.no_grad(), exact_matmul():
            values, states = prog.record(x, stop=last)
        if last is not None:  # a nan there would have given wrong pieces on the way
            value = values[last][0] if isinstance(values[last], tuple) else values[last]
            if sums is None:
                check_overflow(value.movedim(prog.bdims[last], 0), first)
            else:
                sums.append(value.detach().sum())
        return layer_codes(prog, states, len(x))

    def _position(self, key: LayerKey, default: int) -> int:
        return default if key is None else self.layer(key).index

    def _node(self, key: LayerKey, is_start: bool) -> str:
        if key is None:
            return self.program.input_name if is_start else self.program.output_name
        return self.layer(key).node

    def check(self, x: Tensor, name: str = "x", weights: bool = True, values: bool = True) -> None:
        """Refuse what the capture cannot answer exactly: see ``check_input`` and the model
        (``weights``: also non-finite weights; ``values``: False checks neither x's values nor
        the weights', for a caller that checks them with its result)."""
        check_input(name, x, values)
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{name} has per-sample shape {tuple(x.shape[1:])} but the network was "
                f"captured for {self.input_shape}; pass a batch (N, "
                f"{', '.join(map(str, self.input_shape))})"
            )
        changed = self._changed(self.model)
        check_dtype(self.model, x, name, self.dtype if changed is None else None)
        self._check_model(len(x), changed, weights and values)

    def _changed(self, model: nn.Module) -> Structure | None:
        """``model``'s structure now if not the captured one, else None (its guard, or a walk)."""
        if self.guard is not None and self.guard(model):
            return None
        now = structure(model)
        return None if now == self.structure else now

    def _check_model(self, n: int, changed: Structure | None = None, weights: bool = True) -> None:
        """The model as captured (``changed``: its structure now, where it differs), in eval
        mode, finite (``weights``); n in the batch range."""
        model = self.model
        if changed is not None or any(getattr(r(), "training", False) for r in self.mode_modules):
            check_eval_mode(model)  # (refuses training mode first, naming the modules)
        if changed is not None:
            raise StaleCaptureError(
                f"the model changed after this SplineView captured it: "
                f"{describe_change(self.structure, changed)}. Make a new sl.SplineView(model, x) "
                f"(the plain functions such as sl.affine_map capture again by themselves)"
            )
        if weights:
            self.tensors.check_finite()
        self.program.batch.check(n)


def _program_state(model: nn.Module, program: Program) -> list[tuple[str, Tensor]]:
    """The model's floating tensors (``model_state``) and the program's other floating constants
    (tensors a hook's closure holds): what the checks and fingerprints cover."""
    named = list(model_state(model))
    seen = {id(t) for _, t in named}
    return named + [
        (f"constant '{name}' of the captured graph", t)
        for name, t in program.constant_tensors.items()
        if t.is_floating_point() and id(t) not in seen
    ]


def layer_codes(program: Program, states: dict[str, Tensor], n: int) -> PartitionCodes:
    """The partition codes of n inputs from their recorded MASO states (Sec. 7, eq. (14))."""
    return PartitionCodes(
        tuple(
            LayerCodes.encode(la.name, la.kind, la.pieces, program.unit_codes(la, states, n))
            for la in program.layers
        )
    )


@dataclass(frozen=True)
class Verification:
    """How exactly f(x) = A[x] x + B[x] holds: the worst absolute and relative error."""

    max_abs_error: float
    max_rel_error: float
    tolerance: float
    ok: bool
    through_g: bool = False  # compared after the output nonlinearity g: g(f(x)), g(A x + B)

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        what = "g(f(x)) - g(A x + B)" if self.through_g else "f(x) - (A x + B)"
        return (
            f"{verdict}: max |{what}| = {self.max_abs_error:.3g} "
            f"(relative {self.max_rel_error:.3g}, tolerance {self.tolerance:.3g})"
        )


_Views = dict[tuple, list["SplineView"]]  # (x's per-sample shape, dtype, device type) -> views
_VIEWS: weakref.WeakKeyDictionary[nn.Module, _Views] = weakref.WeakKeyDictionary()


def view_of(model: nn.Module, x: Tensor, values: bool = True) -> SplineView:
    """The cached SplineView of ``model`` for inputs like x, checked against x.

    Captured on first use, and again whenever the model's structure changed or x's batch size
    lies outside the range of every cached capture (a forward that branches on it).
    ``values``: False leaves x's values and the weights' to the caller (as ``SplineView.check``).
    """
    model = unwrap_model(model)
    check_input("x", x, values)
    view = _cached(model, len(x), key := (tuple(x.shape[1:]), x.dtype, x.device.type), False)
    if view is None:  # (lock-free: the model may be in another thread's capture)
        with held():  # (one capture per key: threads wait for the first)
            view = _cached(model, len(x), key) or _captured(model, x, key)
    check_dtype(model, x, known=view.dtype)
    view._check_model(len(x), weights=values)  # a cached view matched ``now``
    return view


def _cached(model: nn.Module, n: int, key: tuple, prune: bool = True) -> SplineView | None:
    """The cached view of ``model`` for n inputs of ``key``, changed ones pruned (``prune`` False,
    no lock, a capture in another thread may be changing the model: None if any changed)."""
    views = _VIEWS.setdefault(model, {}).setdefault(key, [])
    now = structure(model) if len(views) > 1 else None  # (one walk for all; one view: its guard)
    live = [v for v in views if (now is None and v._changed(model) is None) or v.structure == now]
    if len(live) < len(views) and not prune:
        return None
    views[:] = live
    return next((v for v in views if v.program.batch.accepts(n)), None)


def _captured(model: nn.Module, x: Tensor, key: tuple) -> SplineView:
    """A new view of ``model`` for x, cached unless it would keep the model alive."""
    check_dtype(model, x)
    check_finite("x", x)  # (the capture runs on x)
    view = SplineView(model, x)
    held_objects = view.structure.held()  # (objects without weak references: rare)
    if held_objects and refers_to(held_objects, model):  # kept, it would keep the model alive
        warn_uncached(model)
        return view
    view._model, view._owners = None, ()  # the cache must not keep the model alive
    for others in _VIEWS[model].values():  # (of other inputs, a structure now gone: let go)
        others[:] = [v for v in others if v.structure == view.structure]
    _VIEWS[model][key].append(view)
    return view


def affine_map(
    model: nn.Module, x: Tensor, start: LayerKey = None, end: LayerKey = None
) -> AffineMap:
    """The exact affine map of x's region, A[x] and B[x] (see ``SplineView.affine_map``).

    >>> import torch, torch.nn as nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    >>> x = torch.randn(5, 3)
    >>> amap = affine_map(net, x)
    >>> amap.A.shape, amap.B.shape  # (N, classes, inputs), (N, classes)
    (torch.Size([5, 2, 3]), torch.Size([5, 2]))
    >>> torch.allclose(torch.einsum("ncd,nd->nc", amap.A, x) + amap.B, net(x), atol=1e-6)
    True
    """
    return view_of(model, x)._affine_map(x, start, end)  # view_of checked x


def partition_codes(model: nn.Module, x: Tensor, batch_size: int = 1024) -> PartitionCodes:
    """Per-layer partition codes of x (see ``SplineView.partition_codes``).

    >>> import torch, torch.nn as nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    >>> x = torch.randn(5, 3)
    >>> codes = partition_codes(net, x)
    >>> len(codes), [la.units for la in codes.layers]  # 5 inputs, one layer of 4 ReLUs
    (5, [4])
    """
    return view_of(model, x, values=False)._checked_codes(x, batch_size)


def verify(model: nn.Module, x: Tensor, rtol: float | None = None) -> Verification:
    """Check f(x) = A[x] x + B[x] on x against the model's own forward pass.

    A x + B is computed in float64 and compared with the model's output (after its output
    nonlinearity g, if it has one: g(A x + B) against the softmax it returns, which cannot see
    a shift shared by every logit). The tolerance is relative (by default 1e4 machine epsilons
    of x's dtype, or of the output's where the model returns less, at most 1e-2) to the size of
    the terms rounded: the largest entry of
    |f(x)| and of |A| |x| + |B| (not at least 1: small outputs are held to their own size).

    >>> import torch, torch.nn as nn
    >>> verify(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()).eval(), torch.randn(4, 1, 5, 5)).ok
    True
    """
    if rtol is not None and (isinstance(rtol, bool) or not (math.isfinite(rtol) and rtol > 0)):
        raise ValueError(f"rtol must be a finite positive number, got {rtol!r}")
    view = view_of(model, x)
    amap, prog = view._affine_map(x, None, None), view.program
    with torch.no_grad(), exact_matmul():  # (the model's own values, without TF32 rounding)
        f = view.model(x)
        if not isinstance(f, Tensor):
            raise ValueError(f"the model returns a {type(f).__name__}, not one tensor")
        a = amap.A.reshape(len(x), -1, x[0].numel()).double()
        flat, b = x.reshape(len(x), -1).double(), amap.B.reshape(len(x), -1).double()
        pred = torch.einsum("nrd,nd->nr", a, flat) + b
        terms = term_sizes(a, flat, b)  # (N, R)
        pred = apply_g(prog.output_g, pred.reshape(amap.B.shape)).reshape(len(x), -1)
        out_dtype = f.dtype  # (a model may return less precision than x's: a final cast)
        f = prog.per_sample(prog.output_name, f).reshape(len(x), -1).double()
    err = (f - pred).abs().max().item() if f.numel() else 0.0
    scale = max(f.abs().max().item() if f.numel() else 0.0, 1e-300)
    size = max(scale, terms.max().item() if terms.numel() else 0.0)
    rtol = rtol if rtol is not None else map_rtol(x.dtype, out_dtype)
    tol = rtol * size
    return Verification(err, err / scale, tol, err <= tol, prog.output_g is not None)
