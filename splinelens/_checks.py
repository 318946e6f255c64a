"""Input validation shared by every entry point: finite values, overflow, layer keys, counts.

splinelens answers exactly or refuses; these helpers make the refusals say what was wrong, where,
and how to fix it.

>>> import torch
>>> check_finite("x", torch.tensor([[1.0, float("nan")]]))
Traceback (most recent call last):
...
ValueError: x holds nan at index (0, 1); splinelens needs finite values ...
>>> layer_index(-1, ["1", "3"])
1
"""

from __future__ import annotations

import math
import operator
import sys
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.optim.swa_utils

from splinelens._tensors import model_dtype

Tensor = torch.Tensor


class LayerNotFoundError(KeyError, IndexError):
    """A ``layer=`` key (index or name) that names no layer; lists the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def check_finite(name: str, t: Tensor, fix: str = "") -> None:
    """Refuse NaN or infinite entries of ``t``, naming the argument and the first bad index
    (and a tensor without values: on the meta device)."""
    if t.is_meta:
        raise ValueError(f"{name} is on the meta device, which holds shapes but no values")
    if not (t.is_floating_point() or t.is_complex()):
        return
    if t.numel() and math.isfinite(abs(t.detach().sum().item())):  # fast: no temporary tensor
        return  # (a non-finite entry makes the sum non-finite; overflow is checked below)
    if bool(torch.isfinite(t).all()):
        return
    idx = tuple(int(i) for i in torch.nonzero(~torch.isfinite(t))[0])
    fix = fix or f"replace or drop the non-finite entries of {name}"
    raise ValueError(
        f"{name} holds {t[idx].item()} at index {idx}; splinelens needs finite values ({fix})"
    )


def check_untransformed(name: str, t: Tensor) -> None:
    """Refuse a tensor traced by a ``torch.func`` transform (vmap, grad, jacrev, jvp): the maps
    are computed outside autograd, so a transform would see constant results (zero derivatives,
    with no error)."""
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    if wrapped is not None and wrapped(t):
        raise ValueError(
            f"{name} is traced by a torch.func transform (vmap, grad, jacrev, jvp...): "
            f"splinelens computes its maps and codes outside autograd, so the transform would "
            f"see zero derivatives. Call it outside the transform, on a batch (A is already "
            f"the Jacobian: sl.affine_map(model, x).A)"
        )


def check_overflow(out: Tensor, offset: int = 0) -> None:
    """Finite inputs and weights can still overflow (float32 at 1e30): refuse, naming the input.

    ``out`` is (N, ...) with the batch first: inputs ``offset`` to ``offset + N - 1``.
    """
    if out.numel() and math.isfinite(abs(out.detach().sum().item())):  # fast: one reduction
        return
    if not bool(torch.isfinite(out).all()):
        i = offset + int(torch.nonzero(~torch.isfinite(out.reshape(len(out), -1)))[0, 0])
        raise overflow_error(i, out.dtype)


def overflow_error(i: int, dtype: torch.dtype) -> ValueError:
    """The refusal of values that overflow to inf / nan for input i of finite entries."""
    wider = ", use float64" if dtype != torch.float64 else ""
    return ValueError(
        f"the network's values overflow to inf / nan for input {i}, though its entries and "
        f"the weights are finite: a value too large for {dtype}, or a division by a "
        f"constant that holds a zero; rescale the input{wider}, or divide by nonzero constants"
    )


def check_finite_numbers(name: str, values: Sequence[float]) -> None:
    """Refuse NaN or infinite numbers, and what is no number, in a short sequence (bounds)."""
    for i, v in enumerate(values):
        if isinstance(v, (bool, str, bytes)) or not hasattr(v, "__float__"):
            raise TypeError(f"{name} must hold numbers, got {v!r} at index {i}")
        if not math.isfinite(float(v)):
            raise ValueError(
                f"{name} holds {float(v)} at index {i}; splinelens needs finite values"
            )


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes ``warnings.warn``, called here in splinelens, name the
    first caller outside the package (the user's line), however deep the call came from.

    >>> user_stacklevel() >= 1
    True
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "splinelens":
        frame, level = frame.f_back, level + 1
    return level


def default_rtol(dtype: torch.dtype) -> float:
    """The relative tolerance of ``verify`` and the other exactness checks: 1e4 machine
    epsilons of ``dtype``, at most 1e-2.

    >>> default_rtol(torch.float64) < 1e-11 < default_rtol(torch.float32) < 1e-2
    True
    """
    return min(1e4 * torch.finfo(dtype).eps, 1e-2)


def map_rtol(x: torch.dtype, out: torch.dtype) -> float:
    """``default_rtol`` for a map from inputs of dtype x to outputs of dtype ``out``: the less
    precise of the two (a float64 net may return float32 through a final cast)."""
    return max(default_rtol(x), default_rtol(out))


def term_sizes(a: Tensor, x: Tensor, b: Tensor) -> Tensor:
    """|A| |x| + |B| in float64, (N, R), for A (N, R, D), x (N, D), B (N, R): the size of the
    terms whose rounding A x + B carries, which the exactness checks' tolerances scale with.

    >>> term_sizes(torch.ones(1, 1, 2), torch.tensor([[1.0, -1.0]]), torch.zeros(1, 1))
    tensor([[2.]], dtype=torch.float64)
    """
    return torch.einsum("nrd,nd->nr", a.double().abs(), x.double().abs()) + b.double().abs()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile`` wrapper (splinelens captures the eager model), a
    ``DataParallel`` or ``DistributedDataParallel``, or an ``AveragedModel`` (SWA / EMA): each
    computes its module's function, through a ``forward(*args)`` that export cannot take."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, _WRAPPERS):
            model = model.module
        elif not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module, got {type(model).__name__}: wrap a function "
                f"in a module whose forward calls it"
            )
        else:
            return model


_WRAPPERS = (
    nn.DataParallel,
    nn.parallel.DistributedDataParallel,
    torch.optim.swa_utils.AveragedModel,
)


def layer_index(key: object, names: Sequence[str], what: str = "layer") -> int:
    """The position of a layer given by index (negative counts from the end) or name."""
    if isinstance(key, str):
        if key in names:
            return list(names).index(key)
        raise LayerNotFoundError(f"no {what} named {key!r}; {_valid(names)}")
    if isinstance(key, bool) or not hasattr(key, "__index__"):
        raise TypeError(f"{what} must be an int index or a name, got {type(key).__name__}")
    try:
        i = operator.index(key)
    except TypeError:  # a tensor or array of several entries
        raise TypeError(
            f"{what} must be one int index or a name, got a {type(key).__name__} that is not one "
            f"integer (several layers: pass a list)"
        ) from None
    if not -len(names) <= i < len(names):
        raise LayerNotFoundError(
            f"{what} {i} is out of range: the network has {len(names)} layers; {_valid(names)}"
        )
    return i % len(names)


def _valid(names: Sequence[str]) -> str:
    if not names:
        return "it has no layers (no MASO nonlinearity)"
    n = len(names)
    shown = ", ".join(repr(nm) for nm in names[:20]) + (f", ... ({n} in all)" if n > 20 else "")
    return f"valid: indices {-n}..{n - 1} or the names {shown}"


def check_positive_int(name: str, value: object) -> int:
    """An int >= 1 (not a bool), or a ValueError naming the argument."""
    if isinstance(value, bool) or not hasattr(value, "__index__") or operator.index(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return operator.index(value)


class HoldsCapture:
    """A mixin for objects that hold a model's capture (generated code, weak references to
    modules): a shallow copy shares it and stays valid; pickling and deep copies are refused
    with ``copy_refusal`` (they raised raw errors, or made a copy that refused falsely).

    >>> import copy
    >>> class Held(HoldsCapture):
    ...     copy_refusal = "make a new one"
    >>> copy.deepcopy(Held())
    Traceback (most recent call last):
    ...
    TypeError: make a new one
    """

    copy_refusal: ClassVar[str] = ""

    def __copy__(self) -> Any:
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        return twin

    def __reduce_ex__(self, protocol: object) -> Any:
        raise TypeError(self.copy_refusal)


def check_input(name: str, x: object, values: bool = True) -> None:
    """A batch of inputs: a floating tensor (N, ...) with N >= 1 and finite entries
    (``values``: False leaves the entries to the caller)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension first, e.g. shape (N, ...)")
    if len(x) == 0:
        raise ValueError(f"{name} holds no inputs (batch size 0)")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}; call {name}.float()")
    if x.is_meta:
        check_finite(name, x)  # (refused: no values)
    check_untransformed(name, x)
    dt = _autocast_rounding(x)
    if dt is not None:
        raise ValueError(
            f"splinelens was called inside torch.autocast({x.device.type!r}, {dt}), under which "
            f"the network rounds its activations to {dt}: f(x) = A x + B would not hold. Call "
            f"it outside the autocast block (the maps are exact in the model's own dtype)"
        )
    if values:
        check_finite(name, x)


def _autocast_rounding(x: Tensor) -> torch.dtype | None:
    """The dtype torch.autocast would round x's float32 activations to, if it is on (it leaves
    float64 alone)."""
    if x.dtype != torch.float32 or not torch.is_autocast_enabled(x.device.type):
        return None
    dt = torch.get_autocast_dtype(x.device.type)
    return dt if torch.finfo(dt).eps > torch.finfo(x.dtype).eps else None


_META_MODEL = (
    "the model's parameters are on the meta device, which holds shapes but no values: give it "
    "weights first (model.to_empty(device=...), then load_state_dict). Or another thread is "
    "capturing this model (a first call for an input shape, a dtype or a batch of 1), and "
    "torch.export has put fake tensors in its place: make those first calls before sharing "
    "the model between threads"
)


def check_model_device(dt: tuple[torch.dtype, torch.device] | None) -> None:
    """Refuse a model on the meta device (``dt``: its ``model_dtype``)."""
    if dt is not None and dt[1].type == "meta":
        raise ValueError(_META_MODEL)


def check_dtype(
    model: nn.Module,
    x: Tensor,
    name: str = "x",
    known: tuple[torch.dtype, torch.device] | None = None,
) -> None:
    """x must have the dtype and device of the model's parameters and buffers (``known``: the
    model's, if already known)."""
    dt = known or model_dtype(model)
    check_model_device(dt)
    if dt is not None and (dt[0] != x.dtype or dt[1] != x.device):
        raise ValueError(
            f"{name} is {x.dtype} on {x.device} but the model's parameters are "
            f"{dt[0]} on {dt[1]}; call {name}.to(...) to match"
        )


def warn_uncached(model: nn.Module) -> None:
    """Warn that ``model``'s capture cannot be cached (``view_of``)."""
    warnings.warn(
        f"{type(model).__name__} holds an object without weak references that leads back "
        f"to it (or too many objects to tell), so splinelens cannot cache its capture and "
        f"captures it at every call; hold that object in a module or a plain class",
        stacklevel=user_stacklevel(),
    )
