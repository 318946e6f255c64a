"""The structure of a module tree, cheap to compare: a capture is valid while it is unchanged.

A capture (``torch.export``) freezes the graph of the model as it was: which submodules run,
their settings (strides, slopes, ``inplace``...), hooks, plain tensor attributes (exported as
constants) and the identity, shape and dtype of parameters and buffers. Parameter *values* are
read live at every call, so training in place keeps a capture valid; anything else that changes
invalidates it. ``structure(model)`` records all of that as nested tuples; ``describe_change``
names the first difference.

>>> import torch.nn as nn
>>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
>>> before = structure(net)
>>> net[1] = nn.Sigmoid()
>>> describe_change(before, structure(net))
"module '1' was replaced (ReLU -> Sigmoid)"
"""

from __future__ import annotations

import collections
import functools
import types
import weakref
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules import module as _module

_OWN = frozenset({"_parameters", "_buffers", "_modules", "training", "_non_persistent_buffers_set"})
_PLAIN = (int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.device)
_PLAIN_TYPES = frozenset(_PLAIN)
_DEPTH = 6  # how deep attribute values are looked into
_DICTS = (dict, collections.OrderedDict)
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_forward_hooks_always_called",
    "_global_forward_hooks_with_kwargs",
)


def structure(model: nn.Module) -> tuple:
    """Everything about ``model`` that its captured graph depends on, as comparable tuples."""
    mods = tuple(
        (name, _Same(m), type(m), _attrs(m), _tensors(m._parameters), _tensors(m._buffers))
        for name, m in model.named_modules(remove_duplicate=False)
    )
    hooks = tuple(tuple(getattr(_module, h, {})) for h in _GLOBAL_HOOKS)
    return mods, hooks


def describe_change(old: tuple, new: tuple) -> str:
    """A short sentence naming the first difference between two ``structure`` results."""
    if old[1] != new[1]:
        return "a global module hook was registered or removed"
    before, after = {m[0]: m for m in old[0]}, {m[0]: m for m in new[0]}
    for name in after:
        if name not in before:
            return f"module '{name}' was added"
    for name, o in before.items():
        n = after.get(name)
        if n is None:
            return f"module '{name}' was removed"
        if o[1:3] != n[1:3]:
            kind = f"{o[2].__name__} -> {n[2].__name__}" if o[2] is not n[2] else "another one"
            return f"module '{_label(name)}' was replaced ({kind})"
        if o[3] != n[3]:
            which = "attribute(s)" if o[3][0] != n[3][0] else "class attribute(s)"
            i = 0 if o[3][0] != n[3][0] else 1
            keys = _keys(o[3][i], n[3][i])
            return f"module '{_label(name)}' changed its {which} {', '.join(keys)}"
        for what, i in (("parameter", 4), ("buffer", 5)):
            if o[i] != n[i]:
                keys = _keys(o[i], n[i])
                where = f"{name}." if name else ""
                names = ", ".join(f"'{where}{k}'" for k in keys)
                return f"{what}(s) {names} re-registered or changed shape / dtype / device"
    return "the model changed"


def _label(name: str) -> str:
    return name or "<top level>"


def _keys(a: tuple, b: tuple) -> list[str]:
    """The names that differ between two tuples of (name, value) pairs."""
    da, db = dict(a), dict(b)
    return sorted(da.keys() ^ db.keys() | {k for k in da.keys() & db.keys() if da[k] != db[k]})


def _attrs(m: nn.Module, depth: int = 0) -> tuple:
    """The module's own attributes (settings by value, hooks by key, objects by identity and
    contents), and the plain class attributes of classes of your own."""
    own = tuple((k, _value(v, depth)) for k, v in vars(m).items() if k not in _OWN)
    return own, _class_attrs(type(m))


def _class_attrs(cls: type) -> tuple:
    return tuple(
        (k, v)
        for c in cls.__mro__
        if not c.__module__.startswith(("torch.", "builtins"))
        for k, v in vars(c).items()
        if type(v) in _PLAIN_TYPES and not k.startswith("__")
    )


class _Same:
    """Compares equal only to the very same object, which it holds weakly: a replaced object
    that was freed compares unequal (its id may be reused, its weak reference is dead), and a
    cached capture never keeps the model alive."""

    __slots__ = ("ref", "strong")

    def __init__(self, obj: Any) -> None:
        try:
            self.ref, self.strong = weakref.ref(obj), None
        except TypeError:  # no weak references (a few builtins): hold it
            self.ref, self.strong = None, obj

    def get(self) -> Any:
        return self.ref() if self.ref is not None else self.strong

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Same):
            return False
        obj = self.get()
        return obj is not None and obj is other.get()

    __hash__ = None  # type: ignore[assignment]


def _tensors(d: dict[str, Any], depth: int = 0) -> tuple:
    return tuple((k, None if t is None else _tensor(t, depth)) for k, t in d.items())


def _tensor(t: torch.Tensor, depth: int) -> tuple:
    if isinstance(t, nn.parameter.UninitializedTensorMixin):  # lazy: no shape yet
        return ("lazy", _Same(t))
    extra = _value(vars(t), depth + 1) if vars(t) else ()  # attributes set on a parameter
    return (_Same(t), t.shape, t.dtype, t.device, extra)


def _value(v: Any, depth: int = 0) -> Any:
    """A comparable image of an attribute's value: plain values themselves, containers and
    plain objects (config objects, partials, closures) by their contents, down to _DEPTH."""
    kind = type(v)
    if kind in _PLAIN_TYPES:
        return v
    if kind in _DICTS and not v:  # most of a module's attributes: its empty hook dicts
        return ()
    if isinstance(v, _PLAIN):
        return v
    if depth >= _DEPTH:
        return _Same(v)
    d = depth + 1
    if isinstance(v, dict):  # hook dicts: handles are never reused
        return ("dict", tuple((k, _value(u, d)) for k, u in v.items()))
    if isinstance(v, (tuple, list)):
        return (kind.__name__, tuple(_value(u, d) for u in v))
    if isinstance(v, torch.Tensor):
        return ("tensor", *_tensor(v, d))
    if isinstance(v, nn.Module):  # a module outside _modules (in a list, say)
        return ("module", _Same(v), kind, _attrs(v, d), _tensors(v._parameters, d))
    if isinstance(v, functools.partial):
        return ("partial", _Same(v.func), _value(v.args, d), _value(v.keywords, d))
    if isinstance(v, types.FunctionType):
        cells = tuple(_cell(c) for c in v.__closure__ or ())
        return ("function", _Same(v), _value((v.__defaults__, v.__kwdefaults__, cells), d))
    if isinstance(v, types.MethodType):
        return ("method", _Same(v.__func__), _Same(v.__self__))
    if hasattr(v, "__dict__") and not isinstance(v, (type, types.ModuleType)):
        return ("object", _Same(v), _value(vars(v), d))  # SimpleNamespace, dataclasses, ...
    return _Same(v)


def _cell(c: Any) -> Any:
    try:
        return c.cell_contents
    except ValueError:  # an empty cell
        return None
