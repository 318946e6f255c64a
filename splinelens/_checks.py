"""Input validation shared by every entry point: finite values, layer keys, float64 copies.

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

import copy
import math
import operator
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

Tensor = torch.Tensor
_REGISTERED = ("_parameters", "_buffers", "_modules")  # a module's own bookkeeping


class LayerNotFoundError(KeyError, IndexError):
    """A ``layer=`` key (index or name) that names no layer; lists the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def check_finite(name: str, t: Tensor, fix: str = "") -> None:
    """Refuse NaN or infinite entries of ``t``, naming the argument and the first bad index."""
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


def check_overflow(out: Tensor) -> None:
    """Finite inputs and weights can still overflow (float32 at 1e30): refuse, naming the input.

    ``out`` is (N, ...) with the batch first.
    """
    if not bool(torch.isfinite(out).all()):
        i = int(torch.nonzero(~torch.isfinite(out.reshape(len(out), -1)))[0, 0])
        raise ValueError(
            f"the network's values overflow to inf / nan for input {i} (its entries are finite "
            f"but too large for {out.dtype}); rescale the input or use float64"
        )


def check_finite_numbers(name: str, values: Sequence[float]) -> None:
    """Refuse NaN or infinite numbers in a short sequence (bounds, radii)."""
    for i, v in enumerate(values):
        if not math.isfinite(float(v)):
            raise ValueError(
                f"{name} holds {float(v)} at index {i}; splinelens needs finite values"
            )


def model_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Every floating parameter and buffer of ``model``, with its qualified name."""
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if not isinstance(t, nn.parameter.UninitializedTensorMixin) and t.is_floating_point():
            yield name, t


def model_dtype(model: nn.Module) -> tuple[torch.dtype, torch.device] | None:
    """(dtype, device) of the model's first floating parameter or buffer; None if it has none."""
    t = next((t for _, t in model_tensors(model)), None)
    return None if t is None else (t.dtype, t.device)


def model_state(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Every floating tensor the model computes with: parameters, buffers and the tensor
    attributes of its modules, also inside lists, tuples and dicts (constants of the graph)."""
    yield from model_tensors(model)
    for prefix, m in model.named_modules():
        for k, v in vars(m).items():
            if k not in _REGISTERED:
                yield from _float_tensors_in(f"{prefix}.{k}" if prefix else k, v)


def _float_tensors_in(name: str, v: object, depth: int = 0) -> Iterator[tuple[str, Tensor]]:
    if isinstance(v, Tensor) and v.is_floating_point():
        yield name, v
    elif depth < 4 and type(v) in (list, tuple):
        for i, u in enumerate(v):
            yield from _float_tensors_in(f"{name}[{i}]", u, depth + 1)
    elif depth < 4 and type(v) is dict:
        for k, u in v.items():
            yield from _float_tensors_in(f"{name}[{k!r}]", u, depth + 1)


def weights_fingerprint(model: nn.Module) -> tuple[tuple, list[float]]:
    """Identities and per-tensor sums of the model's state: any change of its values (in place,
    through ``.data``, or by replacement) changes it, short of a change that keeps every sum."""
    named = list(model_state(model))
    ids = tuple((name, id(t), t._version, t.data_ptr()) for name, t in named)
    return ids, _sums([t for _, t in named])


def _sums(tensors: list[Tensor]) -> list[float]:
    """Each tensor's sum in float64, with one synchronisation per device."""
    if not tensors:
        return []
    parts = [t.detach().sum(dtype=torch.float64) for t in tensors]
    devices = {p.device for p in parts}
    if len(devices) == 1:
        return torch.stack(parts).tolist()
    return [float(p) for p in parts]


def check_model_finite(model: nn.Module) -> None:
    """Refuse NaN or inf anywhere in the model's state, naming the tensor and the index: one
    float64 sum per tensor, and a search for the bad entry only when a sum is not finite."""
    named = list(model_state(model))
    if all(map(math.isfinite, _sums([t for _, t in named]))):
        return
    for name, t in named:
        check_finite(f"model parameter or buffer '{name}'", t.detach(), "the model diverged?")


def float64_copy(model: nn.Module) -> nn.Module:
    """``model`` itself if every floating tensor in it is float64, else a float64 deep copy.

    Parameters, buffers and plain tensor attributes (constants used by ``forward``) are all
    converted, so a model whose weights are buffers works too.
    """
    if all(t.dtype == torch.float64 for _, t in model_state(model)):
        return model
    model = copy.deepcopy(model).double()
    for m in model.modules():
        for k, v in list(vars(m).items()):
            if k not in _REGISTERED:
                setattr(m, k, _to_float64(v))
    return model


def _to_float64(v: object, depth: int = 0) -> object:
    """Floating tensors in v (also inside lists, tuples and dicts) as float64."""
    if isinstance(v, Tensor):
        return v.double() if v.is_floating_point() else v
    if depth < 4 and type(v) in (list, tuple):
        return type(v)(_to_float64(u, depth + 1) for u in v)
    if depth < 4 and type(v) is dict:
        return {k: _to_float64(u, depth + 1) for k, u in v.items()}
    return v


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile`` wrapper (splinelens captures the eager model)."""
    while hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
        model = model._orig_mod
    return model


def layer_index(key: object, names: Sequence[str], what: str = "layer") -> int:
    """The position of a layer given by index (negative counts from the end) or name."""
    if isinstance(key, str):
        if key in names:
            return list(names).index(key)
        raise LayerNotFoundError(f"no {what} named {key!r}; {_valid(names)}")
    if isinstance(key, bool) or not hasattr(key, "__index__"):
        raise TypeError(f"{what} must be an int index or a name, got {type(key).__name__}")
    i = operator.index(key)
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
