"""The structure of a module tree, cheap to compare: a capture is valid while it is unchanged.

A module class may name small tensors its graph depends on in ``__splinelens_values__``
(a spline activation's knots and pieces): they are recorded by value.

A capture (``torch.export``) freezes the graph of the model as it was: which submodules run,
their settings (strides, slopes, ``inplace``...), hooks, plain tensor attributes (exported as
constants) and the identity, shape and dtype of parameters and buffers. Parameter *values* are
read live at every call, so training in place keeps a capture valid; anything else that changes
invalidates it. ``structure(model)`` records all of that as a ``Structure``: nested tuples of
plain values in which objects appear by id, and the objects behind the ids, held weakly;
``describe_change`` (``_structure_diff``) names the first difference.

>>> import torch.nn as nn
>>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
>>> before = structure(net)
>>> before == structure(net)
True
>>> net[1] = nn.Sigmoid()
>>> before == structure(net)
False
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import operator
import threading
import types
import weakref
import zlib
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.modules import module as _module
from torch.nn.utils import prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

_OWN = frozenset({"_parameters", "_buffers", "_modules", "training", "_non_persistent_buffers_set"})
_PLAIN = (int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.device)
PLAIN_TYPES = frozenset(_PLAIN)
_DEPTH = 6  # how deep attribute values are looked into
_BUDGET = 4096  # objects recorded in one walk, past which values are taken by identity
_OPAQUE = (logging.Logger, logging.Manager, type(threading.Lock()))
_DICTS = frozenset({dict, collections.OrderedDict})
EAGER = frozenset({torch.Tensor, nn.Parameter})  # not lazy: has a shape
GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_forward_hooks_always_called",
    "_global_forward_hooks_with_kwargs",
)
# What nn.Module.__init__ sets, in its order. Most modules hold it as it was made (hook dicts
# empty, flags unset); its image is then a constant, cheap to make and to compare (_attrs).
_BASE = {k: v for k, v in vars(nn.Module()).items() if k not in _OWN}
_BASE_KEYS = list(vars(nn.Module()))
_BASE_FAST = all(  # (else the fast path is never taken)
    type(v) in PLAIN_TYPES or (type(v) in _DICTS and not v) for v in _BASE.values()
)
base_values = operator.itemgetter(*_BASE)
BASE_VALUES = base_values(_BASE)
BASE_IMAGE = tuple((k, () if type(v) in _DICTS else v) for k, v in _BASE.items())


class Structure:
    """What ``structure`` returns: ``tree``, nested tuples of plain values in which objects
    (modules, parameters, hooks...) appear as their ids, and ``objects``, id -> weak reference.
    Two are equal when their trees are and all their objects are alive: an id is reused only
    after its object died, so equal ids of live objects are the same objects. Objects without
    weak references (a ``SimpleNamespace``) are held (``held``): one that leads back to the model
    would keep it alive in a cache, which therefore checks them."""

    __slots__ = ("objects", "tree")

    def __init__(self, tree: tuple, objects: dict[int, weakref.ref]) -> None:
        self.tree, self.objects = tree, objects

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Structure)
            and self.tree == other.tree
            and self.alive()
            and other.alive()
        )

    __hash__ = None  # type: ignore[assignment]

    def alive(self) -> bool:
        """Whether every object it refers to still exists."""
        return all(r() is not None for r in self.objects.values())

    def held(self) -> list[Any]:
        """The objects it holds (those without weak references, kept so their ids stay theirs):
        a cache must not keep one that leads back to the model."""
        return [r.obj for r in self.objects.values() if isinstance(r, _Held)]

    def dead(self) -> set[int]:
        """The ids of the objects that no longer exist (a later object may have the id)."""
        return {i for i, r in self.objects.items() if r() is None}


def structure(model: nn.Module) -> Structure:
    """Everything about ``model`` that its captured graph depends on, cheap to compare."""
    objects: dict[int, weakref.ref] = {}
    modules = module_list(model, remove_duplicate=False)
    classes: dict[tuple[type, ...], tuple] = {}  # class attributes, read once per call
    rows = tuple([_row(name, m, objects, classes=classes) for name, m in modules])
    hooks = tuple([tuple(getattr(_module, h, ())) for h in GLOBAL_HOOKS])
    # (the dtype of constants a forward makes with torch.tensor / torch.full)
    return Structure((rows, hooks, torch.get_default_dtype()), objects)


def _row(
    name: str, m: nn.Module, objects: dict, depth: int = 0, classes: dict | None = None
) -> tuple:
    """(name, id, class, attributes, parameters, buffers) of one module (``classes``: the
    class attributes already read in this walk)."""
    objects[id(m)] = weakref.ref(m)
    d = vars(m)  # (not m._parameters: a class's property or __getattribute__ could answer)
    params, buffers = d["_parameters"], d["_buffers"]
    row = (
        name,
        id(m),
        type(m),
        _attrs(m, objects, depth, classes),
        _tensors(params, objects, depth) if params else (),
        _tensors(buffers, objects, depth) if buffers else (),
    )
    values = by_value(type(m))
    if not values:
        return row
    return row + tuple((k, tuple(getattr(m, k).tolist())) for k in values)


@functools.lru_cache(maxsize=1024)
def by_value(cls: type) -> tuple[str, ...]:
    """The tensors a module class asks to be recorded by value (``__splinelens_values__``)."""
    return tuple(getattr(cls, "__splinelens_values__", ()))


def module_list(model: nn.Module, remove_duplicate: bool = True) -> list[tuple[str, nn.Module]]:
    """``list(model.named_modules(remove_duplicate=...))``, in the same order, without its
    nested generators."""
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def visit(prefix: str, m: nn.Module) -> None:
        if remove_duplicate:
            if id(m) in seen:
                return
            seen.add(id(m))
        out.append((prefix, m))
        for name, sub in vars(m)["_modules"].items():  # (as _row reads them)
            if sub is not None:
                visit(f"{prefix}.{name}" if prefix else name, sub)

    visit("", model)
    return out


def _keep(obj: Any, objects: dict[int, weakref.ref]) -> int:
    """id(obj), with obj in ``objects``: weakly, or held if it has no weak references."""
    try:
        objects[id(obj)] = weakref.ref(obj)
    except TypeError:  # a few builtins (SimpleNamespace, object())
        objects[id(obj)] = _Held(obj)
    return id(obj)


class _Held(weakref.ref):
    """Holds an object without weak references: a reference (to this class) that never dies."""

    __slots__ = ("obj",)

    def __new__(cls, obj: Any) -> _Held:
        self = super().__new__(cls, _Held)
        self.obj = obj
        return self

    def __init__(self, obj: Any) -> None:
        super().__init__(_Held)


def _attrs(m: nn.Module, objects: dict, depth: int = 0, classes: dict | None = None) -> tuple:
    """The module's own attributes (settings by value, hooks by key, objects by identity and
    contents), and the class attributes of classes of your own (settings and methods)."""
    d = vars(m)
    added = added_attributes(d)
    if added is not None:  # most modules: the image of nn.Module's attributes is a constant
        own = BASE_IMAGE + _pairs(added, objects, depth)
    else:
        redone = _recomputed(m)
        items = [
            (k, ("recomputed", v.shape, v.dtype, v.device) if k in redone else v)
            for k, v in d.items()
            if k not in _OWN
        ]
        own = _pairs(items, objects, depth)
    mine = user_classes(type(m).__mro__)
    if not mine:
        return own, ()
    if classes is None:
        return own, _class_attrs(mine, objects)
    if mine not in classes:
        classes[mine] = _class_attrs(mine, objects)
    return own, classes[mine]


_RECOMPUTING = (prune.BasePruningMethod, WeightNorm, SpectralNorm)


def _recomputed(m: nn.Module) -> set[str]:
    """The tensor attributes that a forward pre-hook of pruning, or of the old weight_norm or
    spectral_norm, binds anew at every call (``weight = weight_orig * weight_mask``): the graph
    computes them from the registered tensors, so only their shape and dtype are recorded."""
    names = set()
    for hook in m._forward_pre_hooks.values():
        if isinstance(hook, _RECOMPUTING):
            name = getattr(hook, "_tensor_name", None) or getattr(hook, "name", None)
            if isinstance(getattr(m, str(name), None), torch.Tensor):
                names.add(name)
    return names


def added_attributes(d: dict[str, Any]) -> list[tuple[str, Any]] | None:
    """The (name, value) attributes of a module (``vars(m)``) after those nn.Module.__init__
    sets, if those are still as it set them (no hooks, flags unset): most modules'; else None.

    >>> added_attributes(vars(nn.Linear(2, 3)))
    [('in_features', 2), ('out_features', 3)]
    """
    n, keys = len(_BASE_KEYS), list(d)
    # (nn.Module's own usually first; after those set before nn.Module.__init__: PReLU's)
    start = 0 if keys[:n] == _BASE_KEYS else _base_start(keys)
    if not _BASE_FAST or start is None or base_values(d) != BASE_VALUES:
        return None
    return [(k, d[k]) for k in keys[:start] + keys[start + n :]]


def _base_start(keys: list[str]) -> int | None:
    """Where nn.Module.__init__'s attributes start in ``keys``, if they are there in order."""
    n = len(_BASE_KEYS)
    start = keys.index(_BASE_KEYS[0]) if _BASE_KEYS[0] in keys else None
    return start if start is not None and keys[start : start + n] == _BASE_KEYS else None


def value_image(v: Any) -> Any:
    """The image of one attribute's value, as a module's row holds it (``_pairs``).

    >>> value_image(3), value_image((1, 2)), value_image([1])
    (3, ('tuple', (1, 2)), ('list', (1,)))
    """
    return _pairs([("", v)], {}, 0)[0][1]


def _pairs(items: list[tuple[str, Any]], objects: dict, depth: int) -> tuple:
    """(name, _value(value)) of each (name, value), with its commonest cases inline."""
    out = []
    for k, v in items:
        kind = type(v)
        if kind in PLAIN_TYPES:
            out.append((k, v))
        elif kind is tuple and depth < _DEPTH and PLAIN_TYPES.issuperset(map(type, v)):
            out.append((k, ("tuple", v)))  # kernel sizes, strides, paddings
        else:
            out.append((k, _value(v, objects, depth)))
    return tuple(out)


def _class_attrs(classes: tuple[type, ...], objects: dict) -> tuple:
    """Read at every call, a class attribute can change: the settings (values, containers and
    objects by their contents) and the functions and descriptors (a patched ``forward``, a
    replaced property or staticmethod) by identity, of each class."""
    return tuple(
        [
            (k, _class_attr(v, objects))
            for c in classes
            for k, v in vars(c).items()
            if not k.startswith("__")
        ]
    )


def _class_attr(v: Any, objects: dict) -> Any:
    """The image of one class attribute (``_class_attrs``)."""
    if type(v) is types.FunctionType:
        return ("function", _keep(v, objects))
    if isinstance(v, property):
        return ("property", *(_keep(f, objects) if f else None for f in (v.fget, v.fset)))
    if isinstance(v, (staticmethod, classmethod)):
        return (type(v).__name__, _keep(v.__func__, objects))
    return _value(v, objects)


@functools.lru_cache(maxsize=1024)
def user_classes(mro: tuple[type, ...]) -> tuple[type, ...]:
    """The classes of your own in an MRO (torch's own modules have none)."""
    return tuple(c for c in mro if not c.__module__.startswith(("torch.", "builtins")))


def _tensors(d: dict[str, Any], objects: dict, depth: int = 0) -> tuple:
    """(name, _tensor(t)) of each registered parameter or buffer, with the common case inline,
    by name (re-registering in another order, as ``remove_parametrizations`` does, changes
    nothing that the graph reads)."""
    out = []
    for k, t in d.items():
        if type(t) in EAGER and not vars(t):
            objects[id(t)] = weakref.ref(t)
            out.append((k, (id(t), t.shape, t.stride(), t.dtype, t.device, ())))
        else:
            out.append((k, None if t is None else _tensor(t, objects, depth)))
    if len(out) > 1:
        out.sort()  # (by name: names are unique)
    return tuple(out)


def _tensor(t: torch.Tensor, objects: dict, depth: int) -> tuple:
    """(id, shape, strides, dtype, device, attributes set on it) of a tensor (strides: a
    model moved to channels_last runs other kernels); ("lazy", id) if lazy."""
    objects[id(t)] = weakref.ref(t)
    if isinstance(t, nn.parameter.UninitializedTensorMixin):  # no shape yet
        return ("lazy", id(t))
    extra = vars(t)  # attributes set on a parameter
    image = _value(extra, objects, depth + 1) if extra else ()
    return (id(t), t.shape, t.stride(), t.dtype, t.device, image)


def _value(v: Any, objects: dict, depth: int = 0) -> Any:
    """A comparable image of an attribute's value: plain values themselves, containers and
    plain objects (config objects, partials, closures) by their contents, down to _DEPTH."""
    kind = type(v)
    if kind in PLAIN_TYPES:
        return v
    if kind in _DICTS and not v:  # most of a module's attributes: its empty hook dicts
        return ()
    if depth < _DEPTH:  # containers of plain values (kernel sizes...), as _image makes them
        if kind in _DICTS and PLAIN_TYPES.issuperset(map(type, v.values())):
            return ("dict", tuple(v.items()))
        if (kind is tuple or kind is list) and PLAIN_TYPES.issuperset(map(type, v)):
            return (kind.__name__, tuple(v))
    return _image(v, objects, depth)


def _image(v: Any, objects: dict, depth: int) -> Any:
    """``_value`` of anything else; past ``_DEPTH``, ``_BUDGET`` objects in this walk, or for
    objects whose state is not a setting (loggers), by identity."""
    kind = type(v)
    if isinstance(v, _PLAIN):
        return v
    if depth >= _DEPTH or len(objects) > _BUDGET or isinstance(v, _OPAQUE):
        return ("same", _keep(v, objects))
    d = depth + 1
    if isinstance(v, dict):  # hook dicts: handles are never reused
        return ("dict", tuple((k, _value(u, objects, d)) for k, u in v.items()))
    if isinstance(v, (tuple, list)):
        return (kind.__name__, tuple(_value(u, objects, d) for u in v))
    if isinstance(v, torch.Tensor):
        return ("tensor", *_tensor(v, objects, d))
    if isinstance(v, nn.Module):  # a module outside _modules (in a list, say)
        return ("module", *_row("", v, objects, d)[1:])
    if isinstance(v, functools.partial):
        args, keywords = _value(v.args, objects, d), _value(v.keywords, objects, d)
        return ("partial", _keep(v.func, objects), args, keywords)
    if isinstance(v, types.FunctionType):  # what it reads, each at the function's own depth
        cells = tuple(_value(_cell(c), objects, d) for c in v.__closure__ or ())
        defaults = _value(v.__defaults__, objects, d), _value(v.__kwdefaults__, objects, d)
        return ("function", _keep(v, objects), *defaults, cells)
    if isinstance(v, types.MethodType):  # the state of the object it is bound to, too
        bound = v.__self__
        state = _keep(bound, objects) if isinstance(bound, nn.Module) else _image(bound, objects, d)
        return ("method", _keep(v.__func__, objects), state)
    if hasattr(v, "__dict__") and not isinstance(v, (type, types.ModuleType)):
        # SimpleNamespace, dataclasses, ...
        return ("object", _keep(v, objects), _pairs(list(vars(v).items()), objects, d))
    if isinstance(v, np.ndarray):  # changed in place: seen by its bytes
        data = np.ascontiguousarray(v).view(np.uint8)  # (no copy if contiguous)
        return ("ndarray", _keep(v, objects), v.shape, str(v.dtype), zlib.crc32(data))
    if dataclasses.is_dataclass(v) and not isinstance(v, type):  # dataclass(slots=True)
        fields = {f.name: getattr(v, f.name, None) for f in dataclasses.fields(v)}
        return ("object", _keep(v, objects), _pairs(list(fields.items()), objects, d))
    return ("same", _keep(v, objects))


def _cell(c: Any) -> Any:
    try:
        return c.cell_contents
    except ValueError:  # an empty cell
        return None
