"""A guard for a stored ``structure``: made once, it tells at every later call, in a few
microseconds, that ``structure(model)`` is still equal to it, without the walk.

The guard is a function generated for one model (straight-line code, its constants bound as
globals) that re-reads everything the image of a module on the common path is made of: the
module tree (``_modules``: names, order, identities, None entries), each module's class, its
attribute names in order, nn.Module's own attributes as ``nn.Module.__init__`` set them, its
added attributes (plain values, tuples and lists of them, compared as the image compares them,
against the stored image), its parameters and buffers (identity, type, no attributes set, shape,
stride, dtype, device), the global module hooks and the default dtype. Objects are compared by
identity through weak references: a guard keeps nothing alive, and is False once one of them
died. True means ``structure(model) == stored``; False only that it cannot tell (compare them).
A model off that path (a class of your own, a hook, another kind of attribute or tensor) gets
no guard.

>>> import torch.nn as nn
>>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
>>> guard = structure_guard(net, structure(net))
>>> guard(net)
True
>>> net[1] = nn.Sigmoid()
>>> guard(net)
False
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules import module as _module

from splinelens._structure import (
    BASE_IMAGE,
    BASE_VALUES,
    EAGER,
    GLOBAL_HOOKS,
    PLAIN_TYPES,
    Structure,
    added_attributes,
    base_values,
    by_value,
    module_list,
    structure,
    user_classes,
)

Guard = Callable[[nn.Module], bool]


def structure_guard(model: nn.Module, stored: Structure) -> Guard | None:
    """A function that is True for ``model`` only if ``structure(model) == stored`` (False: it
    cannot tell); None if ``structure(model) != stored`` now, or a module is off the common path
    (see the module). It holds the model, its modules and tensors weakly."""
    if structure(model) != stored:
        return None
    rows = dict(zip(map(id, (m for _, m in module_list(model, False))), stored.tree[0]))
    modules = [m for _, m in module_list(model)]
    if not all(map(_on_path, modules)):
        return None
    code = _Code(stored)
    names = {id(m): f"m{i}" for i, m in enumerate(modules)}
    for m in modules:
        code.line(f"{names[id(m)]} = {code.const(stored.objects[id(m)])}()")
    code.line(f"if {names[id(model)]} is not model: return False")
    for cls in dict.fromkeys(map(type, modules)):
        _class_checks(code, cls)
    for m in modules:
        _module_checks(code, names, m, rows[id(m)])
    hooks = " or ".join(
        f"tuple(getattr(HOOKS, {h!r}, ())) != {code.const(keys)}"
        for h, keys in zip(GLOBAL_HOOKS, stored.tree[1], strict=True)
    )
    code.line(f"if {hooks} or torch.get_default_dtype() is not {code.const(stored.tree[2])}:")
    code.line("    return False")
    code.line("return True")
    guard = code.compile()
    return guard if guard(model) else None


def _on_path(m: nn.Module) -> bool:
    """Whether a module's image is made by the common path only: a torch class, nn.Module's own
    attributes as it set them, other attributes plain values or tuples or lists of them,
    parameters and buffers (or None) of types with a shape and without attributes set, in
    dicts; every name a ``str``."""
    d = vars(m)
    added = added_attributes(d)
    return (
        added is not None
        and not user_classes(type(m).__mro__)
        and not by_value(type(m))
        and all(_plain_or_sequence(v) for _, v in added)
        and all(type(d[k]) is dict for k in ("_modules", "_parameters", "_buffers"))
        and all(type(k) is str for k in itertools.chain(d, *map(d.get, _DICTS.values())))
        and all(
            t is None or (type(t) in EAGER and not vars(t))
            for t in itertools.chain(d["_parameters"].values(), d["_buffers"].values())
        )
    )


def _plain_or_sequence(v: Any) -> bool:
    """Whether v is a plain value, or a tuple or list of them (kernel sizes, paddings)."""
    kind = type(v)
    return kind in PLAIN_TYPES or (
        (kind is tuple or kind is list) and PLAIN_TYPES.issuperset(map(type, v))
    )


def same_value(v: Any, image: Any) -> bool:
    """Whether an attribute's value v has the stored image ``image``, for a value on the common
    path (a plain value is its own image; a tuple or list of them ``("tuple", (...))``,
    ``("list", (...))``): equal as the images compare, never for any other kind of value.

    >>> same_value(1.0, 1), same_value((1, 2), ("tuple", (1, 2))), same_value([1], ("tuple", (1,)))
    (True, True, False)
    """
    if type(v) in PLAIN_TYPES:
        return v == image
    return _plain_or_sequence(v) and (type(v).__name__, tuple(v)) == image


def _class_checks(code: _Code, cls: type) -> None:
    """Lines that check a class is still a torch class without ``__splinelens_values__``, as
    ``_row`` and ``_attrs`` read it (through the same caches)."""
    c = code.const(cls)
    code.line(f"if by_value({c}) or user_classes({c}.__mro__): return False")


def _module_checks(code: _Code, names: dict[int, str], m: nn.Module, row: tuple) -> None:
    """Lines that check one module against its stored row (see ``_row``)."""
    d, var = vars(m), names[id(m)]
    code.line(f"if type({var}) is not {code.const(type(m))}: return False")
    code.line(f"d = {var}.__dict__")
    code.line(f"if [*d] != {code.const(list(d))} or base(d) != BASE: return False")
    code.line("c, p, b = dicts(d)")
    code.line("if type(c) is not dict or type(p) is not dict or type(b) is not dict: return False")
    for k, image in row[3][0][len(BASE_IMAGE) :]:  # the added attributes' images
        code.line(f"v = d[{k!r}]")
        if type(image) is tuple and image[0] == "list":  # (changed in place: by contents)
            code.line(f"if not same_value(v, {code.const(image)}): return False")
            continue
        value = image[1] if type(image) is tuple else image  # (the object in the stored image)
        code.line(
            f"if v is not {code.const(value)} and not same_value(v, {code.const(image)}): "
            f"return False"
        )
    empty = [k for k in ("c", "p", "b") if not d[_DICTS[k]]]
    if empty:
        code.line(f"if {' or '.join(empty)}: return False")
    if d["_modules"]:
        _children(code, [names.get(id(c), "None") for c in d["_modules"].values()], d)
    for key, i in (("p", 4), ("b", 5)):
        if d[_DICTS[key]]:
            images = dict(row[i])
            bound = _same_keys(code, key, d[_DICTS[key]])
            for t, k in zip(bound, d[_DICTS[key]], strict=True):
                _tensor_checks(code, t, images[k], code.stored)


_DICTS = {"c": "_modules", "p": "_parameters", "b": "_buffers"}


def _children(code: _Code, children: list[str], d: dict[str, Any]) -> None:
    """Lines that check a module's children (``c``): their names, and the modules (variables)
    or None."""
    bound = _same_keys(code, "c", d["_modules"])
    checks = " or ".join(f"{x} is not {c}" for x, c in zip(bound, children, strict=True))
    code.line(f"if {checks}: return False")


def _same_keys(code: _Code, var: str, d: dict[str, Any]) -> list[str]:
    """Lines that check the dict ``var`` has the keys of d, the same objects in the same order
    (by identity: the names of submodules are formatted and those of tensors sorted, which a
    ``str`` subclass could do otherwise than it compares), and bind its values to variables,
    which it returns."""
    bound = [f"{var}{j}" for j in range(len(d))]
    keys = [f"{v}k" for v in bound]
    code.line(f"if len({var}) != {len(d)}: return False")
    code.line(f"{', '.join(f'({k}, {v})' for k, v in zip(keys, bound))}, = {var}.items()")
    same = " or ".join(f"{k} is not {code.const(key)}" for k, key in zip(keys, d))
    code.line(f"if {same}: return False")
    return bound


def _tensor_checks(code: _Code, t: str, image: tuple | None, stored: Structure) -> None:
    """Lines that check a parameter or buffer (the variable ``t``) against its stored image: the
    same object, of the same type, without attributes, with the same shape, strides, dtype and
    device; or None."""
    if image is None:
        code.line(f"if {t} is not None: return False")
        return
    ref = stored.objects[image[0]]
    kind = code.const(type(ref()))
    code.line(
        f"if {t} is not {code.const(ref)}() or type({t}) is not {kind} or {t}.__dict__ or "
        f"({t}.shape, {t}.stride(), {t}.dtype, {t}.device) != {code.const(image[1:5])}: "
        f"return False"
    )


class _Code:
    """The guard's source, line by line, and its constants (bound as globals)."""

    def __init__(self, stored: Structure) -> None:
        self.stored = stored
        self.lines: list[str] = []
        self.globals: dict[str, Any] = {
            "torch": torch,
            "HOOKS": _module,
            "BASE": BASE_VALUES,
            "base": base_values,
            "by_value": by_value,
            "user_classes": user_classes,
            "same_value": same_value,
            "dicts": operator.itemgetter("_modules", "_parameters", "_buffers"),
        }
        self.names: dict[int, str] = {}

    def line(self, text: str) -> None:
        self.lines.append(f"    {text}")

    def const(self, value: Any) -> str:
        """A global name bound to ``value`` (one per object)."""
        if id(value) not in self.names:
            self.names[id(value)] = name = f"k{len(self.names)}"
            self.globals[name] = value
        return self.names[id(value)]

    def compile(self) -> Guard:
        source = "\n".join(["def guard(model):", *self.lines])
        exec(compile(source, "<splinelens structure guard>", "exec"), self.globals)
        return self.globals["guard"]
