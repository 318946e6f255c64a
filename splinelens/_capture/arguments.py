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


def input_stats(c: Call) -> Refusal:
    """Instance norm divides by each input's own statistics unless it uses running ones (eval
    mode with ``track_running_stats=True``): then it is affine, as batchnorm in eval mode."""
    if c.args.get("use_input_stats", True):
        return (
            "divides by a statistic of the activations (each input's own mean and variance), "
            "which is not piecewise affine",
            "with track_running_stats=True, call model.eval(): running statistics make it "
            "affine; else remove the normalisation",
        )
    return None


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


_PLACES = "writes at places computed from the activations", "use constant indices"


def _overwrite(what: str, fix: str) -> tuple[str, str]:
    """The refusal of activations written over self at constant places."""
    return (
        f"writes activations ({what}) over self at constant places: where a place is written "
        "twice, PyTorch keeps one write and its backward pass counts both, so splinelens "
        "cannot differentiate it exactly without knowing the places never repeat",
        f"if every place is written once, add into zeros there instead: {fix}",
    )


def index_put(c: Call) -> Refusal:
    """``h[idx] = v`` (``index_put``): at places computed from the activations, or given by an
    index sized by the batch (other places for other batches); an activation ``values`` written
    over self (not accumulated)."""
    indices = [i for i in c.args.get("indices") or [] if i is not None]
    if any(c.is_act(i) for i in indices):
        return _PLACES
    if any(_batch_sized(i) for i in indices):
        return (
            "writes at places given by an index sized by the batch (built from x.shape[0]), "
            "which differ from one batch to another",
            "index the feature dimensions with constant indices: h[:, idx] = v",
        )
    if c.is_act(c.args.get("values")) and not c.args.get("accumulate"):
        return _overwrite(
            "h[idx] = v",
            "h = h.index_put(idx, zeros).index_put(idx, v, accumulate=True), or for one dim "
            "h.index_fill(dim, idx, 0).index_add(dim, idx, v)",
        )
    return None


def scatter(c: Call) -> Refusal:
    """``scatter``: at places computed from the activations, with a ``reduce`` (no derivative
    in PyTorch), or writing an activation src over self."""
    if c.is_act(c.args.get("index")):
        return _PLACES
    if c.args.get("reduce") is not None:
        return (
            f"scatters with reduce={c.args['reduce']!r}, which PyTorch cannot differentiate",
            "write scatter_add(dim, index, src) for 'add'; multiply by a constant tensor for "
            "'multiply'",
        )
    if c.is_act(c.args.get("src")):
        return _overwrite(
            "scatter's src", "self.scatter(dim, index, 0).scatter_add(dim, index, src)"
        )
    return None


def index_fill(c: Call) -> Refusal:
    """``index_fill`` at places computed from the activations."""
    return _PLACES if c.is_act(c.args.get("index")) else None


def index_copy(c: Call) -> Refusal:
    """``index_copy`` at places computed from the activations, or of an activation source."""
    if c.is_act(c.args.get("index")):
        return _PLACES
    if c.is_act(c.args.get("source")):
        return _overwrite(
            "index_copy's source",
            "self.index_fill(dim, index, 0).index_add(dim, index, source)",
        )
    return None


def _batch_sized(v: Any) -> bool:
    """Whether a graph value's shape holds a symbolic size (the batch's, the only dynamic one)."""
    val = getattr(v, "meta", {}).get("val")
    return val is not None and any(not isinstance(s, int) for s in val.shape)
