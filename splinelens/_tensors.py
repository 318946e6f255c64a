"""The model's tensors: every floating parameter, buffer and tensor attribute it computes with.

``model_state`` lists them by qualified name (``_fingerprint`` checks them for NaN and inf and
sees whether they changed); ``float64_copy`` is the model in float64, for exact references.

>>> import torch.nn as nn
>>> net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
>>> [name for name, _ in model_state(net)]
['0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean', '1.running_var']
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
import torch.nn as nn

from splinelens._structure import added_attributes, module_list

Tensor = torch.Tensor
_REGISTERED = ("_parameters", "_buffers", "_modules")  # a module's own bookkeeping
_CONTAINERS = frozenset({list, tuple, dict})  # looked into for tensors (model_state)
_NO_TENSORS = frozenset({int, float, bool, str, bytes, type(None), torch.dtype, torch.device})


def model_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Every floating parameter and buffer of ``model``, with its qualified name."""
    params, buffers, _ = _state(model, attributes=False)
    yield from params
    yield from buffers


def model_dtype(model: nn.Module) -> tuple[torch.dtype, torch.device] | None:
    """(dtype, device) of the model's first floating parameter or buffer; None if it has none."""
    t = next((t for _, t in model_tensors(model)), None)
    return None if t is None else (t.dtype, t.device)


def model_state(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Every floating tensor the model computes with: parameters, buffers and the tensor
    attributes of its modules, also inside lists, tuples and dicts (constants of the graph)."""
    params, buffers, attributes = _state(model)
    yield from params
    yield from buffers
    yield from attributes


def _state(model: nn.Module, attributes: bool = True) -> tuple[list, list, list]:
    """model_state as three lists (parameters, buffers, attributes) from one walk of the tree:
    each parameter and buffer once (as ``named_parameters`` and ``named_buffers``)."""
    params: list[tuple[str, Tensor]] = []
    buffers: list[tuple[str, Tensor]] = []
    attrs: list[tuple[str, Tensor]] = []
    seen_params: set[int] = set()
    seen_buffers: set[int] = set()
    for prefix, m in module_list(model):
        dot = f"{prefix}." if prefix else ""
        _registered(m._parameters, dot, seen_params, params)
        _registered(m._buffers, dot, seen_buffers, buffers)
        if attributes:
            d = vars(m)
            items = added_attributes(d)  # (nn.Module's own hold no tensors)
            for k, v in d.items() if items is None else items:
                if type(v) not in _NO_TENSORS and k not in _REGISTERED:
                    _float_tensors_in(dot + k, v, attrs)
    return params, buffers, attrs


def _registered(d: dict[str, Tensor | None], dot: str, seen: set[int], out: list) -> None:
    """Append the floating tensors of a ``_parameters`` or ``_buffers`` dict not seen before."""
    for k, t in d.items():
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        if t.is_floating_point() and not isinstance(t, nn.parameter.UninitializedTensorMixin):
            out.append((dot + k, t))


def _float_tensors_in(name: str, v: object, out: list, depth: int = 0) -> None:
    """Append the floating tensors in v (also inside lists, tuples and dicts) with their names."""
    if isinstance(v, Tensor):
        if v.is_floating_point():
            out.append((name, v))
    elif depth < 4 and type(v) in _CONTAINERS:
        if type(v) is not dict and _NO_TENSORS.issuperset(map(type, v)):
            return  # kernel sizes, strides, paddings
        items = v.items() if type(v) is dict else enumerate(v)
        for k, u in items:
            if type(u) not in _NO_TENSORS:
                key = repr(k) if type(v) is dict else k
                _float_tensors_in(f"{name}[{key}]", u, out, depth + 1)


def version(t: Tensor) -> int:
    """t's version counter (bumped by every in-place op on it); -1 for an inference tensor."""
    return -1 if t.is_inference() else t._version


def float64_copy(model: nn.Module) -> nn.Module:
    """``model`` itself if every floating tensor in it is float64, else a float64 deep copy.

    Parameters, buffers and plain tensor attributes (constants used by ``forward``) are all
    converted, so a model whose weights are buffers works too.
    """
    if all(t.dtype == torch.float64 for _, t in model_state(model)):
        return model
    _check_no_unregistered_modules(model)
    model = copy.deepcopy(model).double()
    for m in model.modules():
        for k, v in plain_attributes(m):  # (written into vars: setattr would register a module)
            if (new := _to_float64(v)) is not v:
                vars(m)[k] = new
    return model


def _check_no_unregistered_modules(model: nn.Module) -> None:
    """Refuse a module with floating tensors held outside ``_modules`` (``object.__setattr__``):
    ``.double()`` does not reach it, and the model's state does not list its tensors."""
    modules = module_list(model)
    tree = {id(m) for _, m in modules}
    for name, m in modules:
        for k, v in plain_attributes(m):
            held = [u for u in (v if type(v) in (list, tuple) else [v]) if isinstance(u, nn.Module)]
            if any(id(u) not in tree and _floating(u) for u in held):
                where = f"{name}.{k}" if name else k
                raise ValueError(
                    f"module attribute '{where}' holds a module outside the module tree; "
                    f"register it (setattr, or an nn.ModuleList) so that it is converted"
                )


def plain_attributes(m: nn.Module) -> list[tuple[str, object]]:
    """The module's attributes other than its registered parameters, buffers and submodules
    (those are walked by their own rule), as (name, value).

    >>> [k for k, _ in plain_attributes(nn.Linear(2, 3))][-2:]
    ['in_features', 'out_features']
    """
    return [(k, v) for k, v in vars(m).items() if k not in _REGISTERED]


def _floating(m: nn.Module) -> bool:
    return any(t.is_floating_point() for t in [*m.parameters(), *m.buffers()])


def _to_float64(v: object, depth: int = 0) -> object:
    """Floating tensors in v (also inside lists, tuples and dicts) as float64."""
    if isinstance(v, Tensor):
        return v.double() if v.is_floating_point() else v
    if depth < 4 and type(v) in (list, tuple):
        return type(v)(_to_float64(u, depth + 1) for u in v)
    if depth < 4 and type(v) is dict:
        return {k: _to_float64(u, depth + 1) for k, u in v.items()}
    return v
