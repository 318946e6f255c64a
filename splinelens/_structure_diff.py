"""What changed between two ``structure`` results, in one sentence (a stale capture's error).

>>> import torch.nn as nn
>>> from splinelens._structure import structure
>>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
>>> before = structure(net)
>>> net[1] = nn.Sigmoid()
>>> describe_change(before, structure(net))
"module '1' was replaced (ReLU -> Sigmoid)"
"""

from __future__ import annotations

from typing import Any

from splinelens._structure import Structure


def describe_change(old: Structure, new: Structure) -> str:
    """A short sentence naming the first difference between two ``structure`` results."""
    if old.tree[1] != new.tree[1]:
        return "a global module hook was registered or removed"
    if old.tree[2] != new.tree[2]:
        return f"torch's default dtype changed ({old.tree[2]} -> {new.tree[2]})"
    dead = old.dead() | new.dead()  # replaced objects: their ids may be equal, they are not

    def differs(a: Any, b: Any) -> bool:
        return a != b or _mentions(a, dead)

    before, after = {m[0]: m for m in old.tree[0]}, {m[0]: m for m in new.tree[0]}
    for name in after:
        if name not in before:
            return f"module '{name}' was added"
    for name, o in before.items():
        n = after.get(name)
        if n is None:
            return f"module '{name}' was removed"
        if differs(o[1:3], n[1:3]):
            kind = f"{o[2].__name__} -> {n[2].__name__}" if o[2] is not n[2] else "another one"
            return f"module '{_label(name)}' was replaced ({kind})"
        if differs(o[6:], n[6:]):  # (``__splinelens_values__``)
            keys = ", ".join(_keys(o[6:], n[6:], differs))
            return f"module '{_label(name)}' changed the values of {keys}"
        if differs(o[3], n[3]):
            i = 0 if differs(o[3][0], n[3][0]) else 1
            which = "attribute(s)" if i == 0 else "class attribute(s)"
            keys = _keys(o[3][i], n[3][i], differs)
            return f"module '{_label(name)}' changed its {which} {', '.join(keys)}"
        for what, i in (("parameter", 4), ("buffer", 5)):
            if differs(o[i], n[i]):
                keys = _keys(o[i], n[i], differs)
                where = f"{name}." if name else ""
                names = ", ".join(f"'{where}{k}'" for k in keys)
                return (
                    f"{what}(s) {names} re-registered or changed shape / memory layout / dtype / "
                    f"device"
                )
    return "the model changed"


def _label(name: str) -> str:
    return name or "<top level>"


def _keys(a: tuple, b: tuple, differs: Any) -> list[str]:
    """The names that differ between two tuples of (name, value) pairs."""
    da, db = dict(a), dict(b)
    changed = {k for k in da.keys() & db.keys() if differs(da[k], db[k])}
    return sorted(da.keys() ^ db.keys() | changed)


def _mentions(image: Any, ids: set[int]) -> bool:
    """Whether an image holds one of these ids."""
    if type(image) is tuple:
        return any(_mentions(u, ids) for u in image)
    return type(image) is int and image in ids
