"""Whether an object leads back to a model: what a cache keyed weakly by the model must not hold.

A weak dictionary's values are held strongly: a value that reaches its key keeps the key alive
for the whole process. ``refers_to`` walks from a value to the model's modules.

>>> import torch.nn as nn
>>> net = nn.Linear(2, 1)
>>> refers_to([{"owner": net}], net), refers_to([nn.Linear(2, 1)], net)
(True, False)
"""

from __future__ import annotations

import gc
import types
from typing import Any

import torch.nn as nn

from splinelens._structure import module_list

__all__ = ["refers_to"]

_WALK = 200_000  # objects looked at for a way back to the model
_ATOMS = frozenset({str, bytes, int, float, bool, complex, type(None)})  # (no referents)


def refers_to(start: Any, model: nn.Module) -> bool:
    """Whether ``start``'s objects lead back to one of the model's modules (a function that
    deepcopy shares, closing over the model; a config object holding it); or more objects than
    ``_WALK`` to tell. Functions' globals and modules are not followed (they are not the
    start's); classes are (deepcopy shares them, and a class made in ``__init__`` may close over
    the model)."""
    targets = {id(m) for _, m in module_list(model)}
    seen, todo = {id(start)}, [start]
    while todo:
        obj = todo.pop()
        if id(obj) in targets:
            return True
        if isinstance(obj, types.FunctionType):
            nxt = [obj.__closure__, obj.__defaults__, obj.__kwdefaults__, obj.__dict__]
        elif isinstance(obj, types.ModuleType) or obj is object or obj is type:
            continue
        else:
            nxt = gc.get_referents(obj)
        for o in nxt:
            if type(o) not in _ATOMS and id(o) not in seen:
                seen.add(id(o))
                todo.append(o)
        if len(seen) > _WALK:
            return True
    return False
