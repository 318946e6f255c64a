"""A model's float64 twin: a float64 copy kept per model, for exact geometry of any model.

``float64_twin(model)`` is ``float64_copy(model)`` made once and kept while the model lives (so
its capture is reused), given the model's current floating values and modes at every call, and
copied again when the model's structure changes. Its other tensors (integer index buffers,
boolean masks, also in lists and dicts) are copied from the model's at every call too.
``made_in_float64(twin)`` makes the context its capture runs in: tensors its forward makes in the
default dtype (``torch.ones(6, 6)``, ``torch.tensor(0.5)``) are made float64, as a float64
model's own constants would be.

>>> import torch.nn as nn
>>> net = nn.Linear(2, 1)
>>> twin = float64_twin(net)
>>> _ = net.weight.data.fill_(0.5)  # through .data: the twin follows at the next call
>>> float64_twin(net) is twin, twin.weight.dtype, float(twin.weight[0, 0].detach())
(True, torch.float64, 0.5)
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from splinelens._lock import held
from splinelens._reach import refers_to
from splinelens._structure import Structure, module_list, structure
from splinelens._tensors import float64_copy, model_dtype, model_state, plain_attributes

__all__ = ["float64_twin", "made_in_float64", "said_of_twin"]

_TWINS: weakref.WeakKeyDictionary[nn.Module, tuple[Structure, nn.Module]] = (
    weakref.WeakKeyDictionary()
)
_MADE: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # every twin, kept in _TWINS or not
# the functions that make a tensor in the default dtype when not given one
_FACTORIES = frozenset(
    getattr(torch, name)
    for name in [
        "tensor",
        "as_tensor",
        "scalar_tensor",
        "ones",
        "zeros",
        "full",
        "empty",
        "arange",
        "linspace",
        "logspace",
        "eye",
        "rand",
        "randn",
    ]
)


def float64_twin(model: nn.Module) -> nn.Module:
    """The model itself if it is float64, else its float64 twin (see the module); a ValueError
    naming why if it cannot be copied (deep-copied, then converted). One twin per model for all
    threads."""
    with held():
        return _twin_of(model)


def _twin_of(model: nn.Module) -> nn.Module:
    if all(t.dtype == torch.float64 for _, t in model_state(model)):
        _TWINS.pop(model, None)  # (a twin made before model.double() is no longer used)
        return model
    now = structure(model)
    held = _TWINS.get(model)
    if held is not None and held[0] == now and _refresh(model, held[1]):
        return held[1]
    try:
        twin = float64_copy(model)
    except Exception as e:  # (a lock, a file handle, an object that refuses to be copied)
        raise ValueError(
            f"the model cannot be copied to float64 ({type(e).__name__}: {e}); pass "
            f"model.double() and float64 inputs"
        ) from e
    _MADE.add(twin)
    if not refers_to([twin, now.held()], model):  # (kept, either would keep the model alive)
        _TWINS[model] = (now, twin)
    return twin


def _refresh(model: nn.Module, twin: nn.Module) -> bool:
    """Copy the model's tensors (floating ones converted) and modes into its twin's; False if
    they no longer match."""
    ours, theirs = list(model_state(model)), list(model_state(twin))
    pairs = list(zip(ours, theirs, strict=False))
    if len(ours) != len(theirs) or any(a != b or t.shape != u.shape for (a, t), (b, u) in pairs):
        return False
    others, twins = _other_tensors(model), _other_tensors(twin)
    if len(others) != len(twins) or any(t.shape != u.shape for t, u in zip(others, twins)):
        return False
    with torch.no_grad():
        for (_, t), (_, u) in pairs:
            u.copy_(t)
        for t, u in zip(others, twins):
            u.copy_(t)
    for (_, m), (_, twin_m) in zip(module_list(model), module_list(twin), strict=True):
        twin_m.training = m.training  # (not in the structure: the checks refuse it by module)
    return True


def _other_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The model's non-floating tensors (index buffers, masks; also in list, tuple and dict
    attributes), in the order of its modules: float64_copy leaves them as they are, and a
    refresh copies them into the twin's."""
    out: list[torch.Tensor] = []

    def walk(v: object, depth: int) -> None:
        if isinstance(v, torch.Tensor):
            if not v.is_floating_point():
                out.append(v)
        elif depth < 4 and type(v) in (list, tuple, dict):
            for u in v.values() if type(v) is dict else v:
                walk(u, depth + 1)

    for _, m in module_list(model):
        walk([*m._parameters.values(), *m._buffers.values()], 0)
        walk([v for _, v in plain_attributes(m)], 0)
    return out


def made_in_float64(model: nn.Module) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """For a twin, the context its forward is captured in (a function making it, which does not
    hold the twin): a tensor made in the default dtype (``torch.ones(6, 6)`` in forward) is made
    float64, with the same values (a float32 model's float32 constants keep theirs). For any
    other model, a context that does nothing.

    >>> twin = float64_twin(nn.Linear(2, 1))
    >>> with made_in_float64(twin)():
    ...     torch.ones(2).dtype
    torch.float64
    """
    return _Float64Factories if model in _MADE else contextlib.nullcontext


@contextlib.contextmanager
def said_of_twin(model: nn.Module, twin: nn.Module, x: torch.Tensor) -> Iterator[None]:
    """Errors of ``twin``'s capture on x that blame the inputs, said of the float64 copy when
    they are of dtypes and the model itself runs on x (in its own dtype): a tensor its forward
    makes with a fixed float32 dtype meets float64 ones."""
    try:
        yield
    except ValueError as e:
        cause = e.__cause__
        if twin is model or cause is None or not str(e).startswith("the model does not run"):
            raise
        if not re.search(r"dtype|double|scalar type", str(cause), re.I) or not _runs(model, x):
            raise
        raise ValueError(
            f"splinelens computes the geometry of a model that is not float64 through a float64 "
            f"copy of it, and the copy does not run ({type(cause).__name__}: "
            f"{str(cause).splitlines()[0] if str(cause) else ''}): its forward makes a tensor "
            f"with a fixed dtype (dtype=torch.float32, .float()); make it in the input's dtype "
            f"(dtype=x.dtype, .to(x))"
        ) from e


def _runs(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether the model runs on x in the dtype of its weights."""
    dt = model_dtype(model)
    try:
        with torch.no_grad():
            model(x.to(dt[0] if dt is not None else x.dtype))
    except Exception:
        return False
    return True


class _Float64Factories(TorchFunctionMode):
    """Tensors made by torch's factories without a dtype, in the default one, made float64
    (thread-local, unlike ``torch.set_default_dtype``)."""

    def __torch_function__(
        self, func: Callable[..., Any], types: object, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (
            func in _FACTORIES
            and kwargs.get("dtype") is None
            and isinstance(out, torch.Tensor)
            and out.dtype == torch.get_default_dtype()
            and not (args and isinstance(args[0], torch.Tensor))  # (a tensor's own dtype)
        ):
            return out.to(torch.float64)
        return out
