"""A guard for a stored ``structure``: made once, it tells at every later call, in a few
microseconds, that ``structure(model)`` is still equal to it, without the walk.

The guard is a function generated for one model (straight-line code, its constants bound as
globals) that re-reads everything the image of a module on the common path is made of: the
module tree (``_modules``: names, order, identities, None entries), each module's class, its
attribute names in order, nn.Module's own attributes as ``nn.Module.__init__`` set them, its
added attributes (plain values, tuples and lists of them, compared as the image compares them,
against the stored image), its parameters and buffers (identity, type, no attributes set, shape,
stride, dtype, device), the global module hooks and the default dtype; and, for each class of
your own (``user_classes`` of its MRO, compared class by class), its class attributes: their
names in order and their values (plain values, tuples of them, functions, properties,
staticmethods and classmethods) by identity, at every call (a class attribute can change at any
time: a patched ``forward``). Objects are compared by identity through weak references: a guard
keeps nothing alive but the classes, and is False once one of them died. True means
``structure(model) == stored``; False only that it cannot tell (compare them). A model off that
path (a hook, another kind of attribute, class attribute or tensor) gets no guard.

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
import types
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
    value_image,
)

Guard = Callable[[nn.Module], bool]
_DICT_NAMES = {"c": "_modules", "p": "_parameters", "b": "_buffers"}  # (variables of the code)
_MISSING = object()  # an attribute looked up in the guard and not found


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
    classes = dict.fromkeys(map(type, modules))
    for cls in classes:
        _class_checks(code, cls)
    for cls in dict.fromkeys(c for k in classes for c in user_classes(k.__mro__)):
        _class_attribute_checks(code, cls)
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
    """Whether a module's image is made by the common path only: a torch class or classes of
    your own with simple class attributes (``_simple_class``), nn.Module's own attributes as it
    set them, other attributes plain values or tuples or lists of them, parameters and buffers
    (or None) of types with a shape and without attributes set, in dicts; every name a ``str``."""
    d = vars(m)
    added = added_attributes(d)
    return (
        added is not None
        and all(map(_simple_class, user_classes(type(m).__mro__)))
        and not by_value(type(m))
        and all(_plain_or_sequence(v) for _, v in added)
        and all(type(d[k]) is dict for k in ("_modules", "_parameters", "_buffers"))
        and all(type(k) is str for k in itertools.chain(d, *map(d.get, _DICT_NAMES.values())))
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


def _simple_class(c: type) -> bool:
    """Whether a class's attributes are all cheap to re-check at every call (by identity, with
    the same image): every name a ``str``, and each value (but dunders, which the image leaves
    out) a plain value, a tuple of them, a function, a property of functions, a staticmethod or
    classmethod of a function. Not a list or dict (changed in place), nor another object."""
    d = vars(c)
    return all(type(k) is str for k in d) and all(
        _simple_attribute(v) for k, v in d.items() if not k.startswith("__")
    )


def _simple_attribute(v: Any) -> bool:
    """Whether a class attribute is one ``_simple_class`` accepts."""
    kind = type(v)
    if kind is types.FunctionType or kind in PLAIN_TYPES:
        return True
    if kind is tuple:
        return PLAIN_TYPES.issuperset(map(type, v))
    if kind is property:
        return all(f is None or type(f) is types.FunctionType for f in (v.fget, v.fset))
    return (kind is staticmethod or kind is classmethod) and type(v.__func__) is types.FunctionType


def dunder_free(d: Any) -> tuple[str, ...]:
    """The names in a class's ``vars`` that its image reads (all but dunders), in order."""
    return tuple([k for k in d if not k.startswith("__")])


def _attribute_differs(code: _Code, image: Any, now: Any) -> str:
    """An expression that is False only if ``v`` (the generated code's variable: an added
    attribute's value) has the stored image ``image`` (``now``: the value at build time): the
    same object (not for a list, changed in place), or of the same type with entries of the
    same types and equal (inline: an attribute that ``torch.export`` replaced with an equal
    copy, a conv's padding), or else equal as the images compare (``same_value``: 1 == 1.0)."""
    slow = f"not same_value(v, {code.const(image)})"
    if type(image) is tuple:  # ("tuple" | "list", entries)
        kind, entries = type(now), image[1]
        same = (
            f"type(v) is {code.const(kind)} and tuple(map(type, v)) == "
            f"{code.const(tuple(map(type, entries)))} and tuple(v) == {code.const(entries)}"
        )
        if kind is list:
            return f"not ({same}) and {slow}"
        return f"v is not {code.const(entries)} and not ({same}) and {slow}"
    k, kind = code.const(image), code.const(type(image))
    return f"v is not {k} and not (type(v) is {kind} and v == {k}) and {slow}"


def same_value(v: Any, image: Any) -> bool:
    """Whether an attribute's value v has the stored image ``image``, as the images compare.

    >>> same_value(1.0, 1), same_value((1, 2), ("tuple", (1, 2))), same_value([1], ("tuple", (1,)))
    (True, True, False)
    """
    return value_image(v) == image


def _class_checks(code: _Code, cls: type) -> None:
    """Lines that check a class is still without ``__splinelens_values__`` and has the same
    classes of your own in its MRO (``__bases__`` can be reassigned), as ``_row`` and ``_attrs``
    read them (through the same caches), each the same class."""
    c, mine = code.const(cls), user_classes(cls.__mro__)
    if not mine:
        code.line(f"if by_value({c}) or user_classes({c}.__mro__): return False")
        return
    same = (f"u[{i}] is not {code.const(k)}" for i, k in enumerate(mine))
    code.line(f"u = user_classes({c}.__mro__)")
    code.line(f"if by_value({c}) or len(u) != {len(mine)} or {' or '.join(same)}: return False")


def _class_attribute_checks(code: _Code, cls: type) -> None:
    """Lines that check a class of your own has the same attributes (names in order, values by
    identity) as it had when its image was made: the same image (``_class_attrs``). A property's
    fget and fset and a staticmethod's or classmethod's ``__func__`` are read-only attributes,
    but ``__init__`` called again rebinds them: they are read at every call too."""
    d = vars(cls)
    keys = dunder_free(d)
    c, k = code.const(cls), code.const(keys)
    code.line(f"d = {c}.__dict__")  # (all names first: cheaper than leaving dunders out)
    code.line(f"if tuple(d) != {code.const(tuple(d))} and dunder_free(d) != {k}: return False")
    if not keys:
        return
    bound = [f"v{i}" for i in range(len(keys))]
    if len(keys) == 1:
        code.line(f"v0 = d[{keys[0]!r}]")
    else:
        code.line(f"{', '.join(bound)} = {code.const(operator.itemgetter(*keys))}(d)")
    differs = " or ".join(_differs(code, v, d[key]) for v, key in zip(bound, keys, strict=True))
    code.line(f"if {differs}: return False")


def _differs(code: _Code, var: str, value: Any) -> str:
    """An expression that is True unless the value of ``var`` is ``value`` (an attribute that
    ``_simple_attribute`` accepts), or one with the same image: functions held weakly."""
    kind = type(value)
    if kind is property:
        fget, fset = (_other(code, f"{var}.{f}", getattr(value, f)) for f in ("fget", "fset"))
        return f"type({var}) is not {code.const(property)} or {fget} or {fset}"
    if kind is staticmethod or kind is classmethod:
        func = _other(code, f"{var}.__func__", value.__func__)
        return f"type({var}) is not {code.const(kind)} or {func}"
    if kind is types.FunctionType:
        return _other(code, var, value)
    return f"{var} is not {code.const(value)}"  # (plain values and tuples of them: immutable)


def _other(code: _Code, expr: str, f: types.FunctionType | None) -> str:
    """An expression that is True unless ``expr`` is the function f (through the weak
    reference in the stored image: None once f died) or None where f is."""
    if f is None:
        return f"{expr} is not None"
    return f"{expr} is not {code.const(code.stored.objects[id(f)])}() or {expr} is None"


def _module_checks(code: _Code, names: dict[int, str], m: nn.Module, row: tuple) -> None:
    """Lines that check one module against its stored row (see ``_row``)."""
    d, var = vars(m), names[id(m)]
    code.line(f"if type({var}) is not {code.const(type(m))}: return False")
    code.line(f"d = {var}.__dict__")
    code.line(f"if [*d] != {code.const(list(d))} or base(d) != BASE: return False")
    code.line("c, p, b = dicts(d)")
    code.line("if type(c) is not dict or type(p) is not dict or type(b) is not dict: return False")
    for k, image in row[3][0][len(BASE_IMAGE) :]:  # the added attributes' images
        code.line(f"v = d.get({k!r}, MISSING)")  # (a key equal to k of another hash)
        code.line(f"if {_attribute_differs(code, image, d[k])}: return False")
    empty = [k for k in ("c", "p", "b") if not d[_DICT_NAMES[k]]]
    if empty:
        code.line(f"if {' or '.join(empty)}: return False")
    if d["_modules"]:
        _children(code, [names.get(id(c), "None") for c in d["_modules"].values()], d)
    for key, i in (("p", 4), ("b", 5)):
        if d[_DICT_NAMES[key]]:
            images = dict(row[i])
            bound = _same_keys(code, key, d[_DICT_NAMES[key]])
            for t, k in zip(bound, d[_DICT_NAMES[key]], strict=True):
                _tensor_checks(code, t, images[k], code.stored)


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
            "dunder_free": dunder_free,
            "MISSING": _MISSING,
            "same_value": same_value,
            "dicts": operator.itemgetter("_modules", "_parameters", "_buffers"),
        }
        self.names: dict[int, str] = {}

    def line(self, text: str) -> None:
        """Append one line of the guard's body."""
        self.lines.append(f"    {text}")

    def const(self, value: Any) -> str:
        """A global name bound to ``value`` (one per object)."""
        if id(value) not in self.names:
            self.names[id(value)] = name = f"k{len(self.names)}"
            self.globals[name] = value
        return self.names[id(value)]

    def compile(self) -> Guard:
        """The guard: ``guard(model) -> bool``, compiled from the lines."""
        source = "\n".join(["def guard(model):", *self.lines])
        exec(compile(source, "<splinelens structure guard>", "exec"), self.globals)
        return self.globals["guard"]
