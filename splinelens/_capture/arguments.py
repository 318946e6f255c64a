"""Arguments that make an op of the registry something else: the checks its entries name.

Each check reads one call (arguments by schema name, the overload, which values depend on the
activations) and returns why the call is not piecewise affine and how to fix it, or None. The
registry gives each op its check (``OpInfo.check``); ``refusals`` raises the error.

>>> clamp(Call({"min": 1.0, "max": 0.0}))[0]
'has min 1.0 > max 0.0: torch.clamp is then the constant max, not a clip'
>>> threshold(Call({"threshold": 0.0, "value": 0.0})) is None
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Refusal = tuple[str, str] | None  # (why, fix)


@dataclass(frozen=True)
class Call:
    """One call of an op: ``args`` by schema name, the ``overload`` (``max.other``: "other"),
    and ``is_act``, whether a value (or any in a list) depends on the activations."""

    args: dict[str, Any]
    overload: str = ""
    is_act: Callable[[Any], bool] = field(default=lambda v: False)


def clamp(c: Call) -> Refusal:
    """A clamp with constant min > max is the constant max."""
    lo, hi = c.args.get("min"), c.args.get("max")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo > hi:
        return (
            f"has min {lo} > max {hi}: torch.clamp is then the constant max, not a clip",
            "write the constant, or give min <= max",
        )
    return None


def threshold(c: Call) -> Refusal:
    """``threshold(x, t, v)`` jumps from v to t at t unless v == t (then it is max(x, t))."""
    t, v = c.args.get("threshold"), c.args.get("value")
    if t != v:
        return (
            f"jumps from {v} to {t} at its threshold (a step), so it is not piecewise affine",
            "use nn.Threshold(t, t), which is max(x, t), or a ReLU",
        )
    return None


_TRAINING = ("runs in training mode", "call model.eval()")


def training(c: Call) -> Refusal:
    """Batchnorm and dropout in training mode."""
    return _TRAINING if c.args.get("train", c.args.get("training")) else None


def native_dropout(c: Call) -> Refusal:
    """``native_dropout``'s ``train=None`` means training, as in ATen."""
    return _TRAINING if c.args.get("train") in (None, True) else None


def rrelu(c: Call) -> Refusal:
    """rrelu draws random slopes in training mode."""
    if c.args.get("training"):
        return "draws random slopes in training mode", "call model.eval()"
    return None


def extreme(c: Call) -> Refusal:
    """``max`` / ``min`` of a whole tensor (not ``other=`` or ``dim=``) reduces over the batch."""
    if c.overload in ("other", "dim"):
        return None
    return (
        "reduces over every dimension, the batch included",
        "reduce over the feature dimensions only",
    )


def div(c: Call) -> Refusal:
    """Division by an activation, or with rounding."""
    if c.is_act(c.args.get("other")):
        return (
            "divides by an activation, which is not affine",
            "softsign x / (1 + |x|)? sl.splinify(model) replaces nn.Softsign / F.softsign by a "
            "certified spline",
        )
    if c.args.get("rounding_mode") is not None:
        return "rounds the quotient (a step function)", ""
    return None


def selection(c: Call) -> Refusal:
    """``where`` / ``masked_fill`` with a condition computed from the activations."""
    if c.is_act(c.args.get("condition", c.args.get("mask"))):
        return (
            "selects with a condition computed from the activations (a step function), which "
            "splinelens cannot split into MASO pieces",
            "use relu / max / clamp instead",
        )
    return None


def scatter_add(c: Call) -> Refusal:
    """``scatter_add`` with an index smaller than an activation src (PyTorch cannot
    differentiate it), or an index computed from the activations."""
    index, src = c.args.get("index"), c.args.get("src")
    if c.is_act(index):
        return "scatters by indices computed from the activations", "use constant indices"
    shapes = [getattr(v, "meta", {}).get("val") for v in (index, src)]
    if c.is_act(src) and None not in shapes and str(shapes[0].shape) != str(shapes[1].shape):
        return (
            f"reads only part of src (index {tuple(shapes[0].shape)}, src "
            f"{tuple(shapes[1].shape)}), which PyTorch's backward pass cannot differentiate",
            "slice src to the index's shape first",
        )
    return None


def index_add(c: Call) -> Refusal:
    """``index_add`` at places computed from the activations."""
    if c.is_act(c.args.get("index")):
        return "adds at places computed from the activations", "use constant indices"
    return None
