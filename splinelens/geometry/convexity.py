"""Convexity of a MASO network (Theorem 2, Corollary 1), checked on the captured graph.

A network is a globally convex MASO of its input when the affine maps of layers 2..L have
nonnegative weights and every nonlinearity after layer 1 is convex and non-decreasing (ReLU,
leaky ReLU with slope in [0, 1], max-pooling, max, spline activations whose slopes are
nonnegative and increasing, as ``sl.splinify`` makes of softplus). Layer 1 may use any convex
activation (abs too). ``convexity`` walks the graph and says where and why a network is not convex;
``make_input_convex`` constrains a model to satisfy Theorem 2; ``convexity_gap`` checks it
numerically (every region's affine map must be a global lower bound of f).

>>> import torch, torch.nn as nn
>>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
>>> report = convexity(net, torch.randn(4, 3))
>>> report.is_convex, report.reasons[0].startswith("2.weight has negative entries")
(False, True)
>>> _ = make_input_convex(net, torch.randn(4, 3))
>>> convexity(net, torch.randn(4, 3)).is_convex
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from splinelens._capture import (
    Program,
    Ref,
    Step,
    info,
    refs_in,
)
from splinelens.view import view_of

__all__ = ["ConvexityReport", "convexity", "convexity_gap", "make_input_convex"]

Tensor = torch.Tensor


@dataclass
class ConvexityReport:
    """Whether the network meets Theorem 2, and the reasons where it does not.

    ``layers``: per Definition-1 layer, whether it keeps a convex input convex (nonnegative
    slopes into it and a convex non-decreasing nonlinearity), the condition under which the
    composition of the MASOs so far stays a convex MASO. ``constrained``: the parameters that
    must be nonnegative for Theorem 2 (used by ``make_input_convex``).
    """

    is_convex: bool
    reasons: list[str]
    layers: list[tuple[str, bool]] = field(default_factory=list)
    constrained: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        head = "convex (Theorem 2 holds)" if self.is_convex else "not shown convex"
        return "\n".join([head, *("  - " + r for r in self.reasons)])


def convexity(model: nn.Module, example_input: Tensor) -> ConvexityReport:
    """Check Theorem 2 on the model's graph, with its current parameter values.

    >>> import torch, torch.nn as nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    >>> x = torch.randn(5, 3)
    >>> convexity(net, x).is_convex  # a negative weight after the ReLU
    False
    """
    view = view_of(model, example_input)
    with torch.no_grad():
        env, _ = view.program.record(example_input[:1])
    return _Walk(view.program, env).run()


class _Walk:
    """One pass over the steps: each activation node is 'affine', 'convex' or 'other'."""

    def __init__(self, program: Program, env: dict[str, Any]) -> None:
        self.p, self.env = program, env
        self.status: dict[str, str] = {program.input_name: "affine"}
        self.reasons: list[str] = []
        self.constrained: list[str] = []
        self.segment_ok = True
        self.layers: list[tuple[str, bool]] = []
        self.by_step = {layer.step: layer for layer in program.layers}
        self.steps = {st.name: st for st in program.steps}

    def run(self) -> ConvexityReport:
        for step in self.p.steps:
            ins = [self.status[r.name] for r in refs_in(step.args) if r.name in self.status]
            if not ins:
                continue
            self.status[step.name] = (
                self._maso(step, ins) if step.maso is not None else self._affine(step, ins)
            )
        if self.status.get(self.p.output_name, "other") == "other" and not self.reasons:
            self.reasons.append("the output is not a convex function of the input")
        return ConvexityReport(not self.reasons, self.reasons, self.layers, self.constrained)

    def _affine(self, step: Step, ins: list[str]) -> str:
        if "other" in ins:
            return "other"
        if "convex" not in ins:
            return "affine"
        name = step.op
        coeffs = self._coefficients(step, name)
        for r in coeffs:
            label = self._label(r)
            if isinstance(r, Ref) and label in self.p.param_fqn.values():
                self.constrained += [label] if label not in self.constrained else []
        if info(name).coefficients == "kernel":
            self._fail(f"{step.name} ({name}) weighs some inputs negatively (a cubic kernel)")
        negative = [self._label(r) for r in coeffs if self._negative(r)]
        if negative:  # recorded; the walk goes on to find every offending parameter
            self._fail(
                f"{', '.join(negative)} has negative entries, applied to a convex "
                "(non-affine) input"
            )
        for arg, sign in _signed_terms(step, name):
            if sign < 0 and isinstance(arg, Ref) and self.status.get(arg.name) == "convex":
                self._fail(f"{step.name} ({name}) subtracts a convex term")
        return "convex"

    def _coefficients(self, step: Step, name: str) -> list[Any]:
        """The constants that multiply a convex input: they must be nonnegative."""
        acts = {r.name for r in refs_in(step.args) if r.name in self.status}
        consts = [r for r in refs_in(step.args) if r.name not in acts]
        entry = info(name)
        if entry.coefficients == "weights":
            pos = entry.bias
            bias = step.args[pos] if pos is not None and pos < len(step.args) else None
            scale = [step.kwargs["alpha"]] if "alpha" in step.kwargs else []
            return [r for r in consts if r != bias] + scale
        if entry.coefficients == "bn_weight":
            return [step.args[1]] if isinstance(step.args[1], Ref) else []
        if entry.coefficients == "scalars":
            return [
                a
                for a in step.args
                if isinstance(a, (int, float)) or (isinstance(a, Ref) and a.name not in self.status)
            ]
        return []

    def _negative(self, c: Any) -> bool:
        if isinstance(c, (int, float)):
            return c < 0
        v = self.env.get(c.name) if isinstance(c, Ref) else None
        return isinstance(v, Tensor) and v.is_floating_point() and bool((v < 0).any())

    def _maso(self, step: Step, ins: list[str]) -> str:
        layer = self.by_step[step.name]
        maso = step.maso
        monotone, convex = maso.shape(
            [self.env.get(a.name) if isinstance(a, Ref) else a for a in step.args]
        )
        if "other" in ins:
            return "other"
        if not convex:
            self._fail(f"layer {layer.name} ({layer.kind}) is not a convex function")
        elif "convex" in ins and not monotone:
            self._fail(
                f"layer {layer.name} ({layer.kind}) is not non-decreasing, so it does "
                "not keep a convex input convex"
            )
        keeps = convex and (monotone or "convex" not in ins)  # layer 1 needs no monotonicity
        self.layers.append((layer.name, self.segment_ok and keeps))
        self.segment_ok = True
        return "convex"  # the walk goes on, assuming convexity, to list every reason

    def _fail(self, reason: str) -> None:
        self.segment_ok = False
        if reason not in self.reasons:
            self.reasons.append(reason)

    def _label(self, ref: Any) -> str:
        """The parameter behind a constant (through transposes and views), else its name."""
        if not isinstance(ref, Ref):
            return str(ref)
        while ref.name not in self.p.param_fqn and ref.name in self.steps:
            st = self.steps[ref.name]
            if not info(st.op).view or not isinstance(st.args[0], Ref):
                break
            ref = st.args[0]
        return self.p.param_fqn.get(ref.name, ref.name)


def _signed_terms(step: Step, name: str) -> list[tuple[Any, float]]:
    """(argument, sign of its coefficient) of each term of a sum (registry ``terms``)."""
    a, kw = step.args, step.kwargs
    terms = info(name).terms
    return [(a[i], sign * float(kw.get(by, 1))) for i, sign, by in terms if i < len(a)]


class _NonNegative(nn.Module):
    """weight -> |weight|: a nonnegative parametrisation that keeps gradients everywhere."""

    def forward(self, w: Tensor) -> Tensor:
        return w.abs()

    def right_inverse(self, w: Tensor) -> Tensor:
        return w.abs()


def make_input_convex(model: nn.Module, example_input: Tensor) -> list[str]:
    """Make the model satisfy Theorem 2 by parametrising every weight that acts after the first
    nonlinearity as its absolute value (initial weights are replaced by their magnitudes).

    Returns the constrained parameter names. Activations must already be convex and
    non-decreasing after layer 1; ``convexity`` says which are not.

    >>> import torch, torch.nn as nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    >>> x = torch.randn(5, 3)
    >>> _ = make_input_convex(net, x)  # |W| for the layers after the first
    >>> convexity(net, x).is_convex
    True
    """
    names = convexity(model, example_input).constrained  # parameters, traced through views
    for name in names:
        owner_path, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_path)
        parametrize.register_parametrization(owner, attr, _NonNegative())
        owner.parametrizations.train(owner.training)  # keep the model's mode
    report = convexity(model, example_input)
    if not report.is_convex:  # (a coefficient that is no parameter, a non-convex activation)
        for name in reversed(names):  # the model as it was: the change is all or nothing
            owner_path, _, attr = name.rpartition(".")
            parametrize.remove_parametrizations(
                model.get_submodule(owner_path), attr, leave_parametrized=False
            )
        raise ValueError(
            f"make_input_convex cannot make this model convex by constraining its parameters, "
            f"and left it as it was: {report}. Constrain those coefficients or activations "
            f"yourself (a weight computed in forward, a weight_norm: parametrise its parameters)"
        )
    return names


def convexity_gap(model: nn.Module, x: Tensor) -> float:
    """max over i, j, c of A[x_i]_c x_j + B[x_i]_c - f(x_j)_c, relative to max |f(x)|.

    <= 0 up to rounding (about 1e-6 in float32, 1e-15 in float64) for a convex network, where
    each region's affine map is a global lower bound of f; > 0 shows a non-convexity."""
    amap = view_of(model, x).affine_map(x)
    a = amap.A.reshape(len(x), amap.A.shape[1], -1)  # (N, C, D)
    lower = torch.einsum("icd,jd->ijc", a, x.reshape(len(x), -1)) + amap.B[:, None]  # (N, N, C)
    scale = float(amap.output.abs().max()) or 1.0
    return float((lower - amap.output[None]).max()) / scale
