"""A model's float64 twin: a float64 copy kept per model, for exact geometry of any model.

``float64_twin(model)`` is ``float64_copy(model)`` made once and kept while the model lives (so
its capture is reused), given the model's current floating values and modes at every call, and
copied again when the model's structure changes. Its other tensors (integer index buffers,
boolean masks, also in lists and dicts) are copied from the model's at every call too.

>>> import torch.nn as nn
>>> net = nn.Linear(2, 1)
>>> twin = float64_twin(net)
>>> _ = net.weight.data.fill_(0.5)  # through .data: the twin follows at the next call
>>> float64_twin(net) is twin, twin.weight.dtype, float(twin.weight[0, 0].detach())
(True, torch.float64, 0.5)
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from splinelens._reach import refers_to
from splinelens._structure import Structure, module_list, structure
from splinelens._tensors import float64_copy, model_state, plain_attributes

__all__ = ["float64_twin"]

_TWINS: weakref.WeakKeyDictionary[nn.Module, tuple[Structure, nn.Module]] = (
    weakref.WeakKeyDictionary()
)


def float64_twin(model: nn.Module) -> nn.Module:
    """The model itself if it is float64, else its float64 twin (see the module); a ValueError
    naming why if it cannot be copied (deep-copied, then converted)."""
    if all(t.dtype == torch.float64 for _, t in model_state(model)):
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
