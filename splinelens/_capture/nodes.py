"""Reading a graph node: its ATen op's packet name and its arguments by schema name.

>>> import torch
>>> op_name(torch.ops.aten.conv2d.default)
'conv2d'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def op_name(target: Any) -> str:
    """ATen packet name of a graph target: ``aten.conv2d.default`` -> ``conv2d``."""
    name = getattr(target, "__name__", str(target))
    packet = getattr(target, "_overloadpacket", None)
    return packet.__name__ if packet is not None else name.split(".")[0]


def bound_args(node: torch.fx.Node) -> dict[str, Any]:
    """Arguments of an ATen node by schema name, defaults filled in."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {str(i): a for i, a in enumerate(node.args)}
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


def overload(node: torch.fx.Node) -> str:
    """The overload a node calls (``max.other`` -> ``other``), or '' for other targets."""
    return str(getattr(node.target, "_overloadname", ""))


def ints(v: Any, nd: int, default: int | Sequence[int] | None = None) -> tuple[int, ...]:
    """An int-or-list argument (kernel sizes, strides) as ``nd`` ints; empty or None: default."""
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        v = default
    if isinstance(v, int):
        return (v,) * nd
    v = tuple(int(i) for i in v)  # type: ignore[union-attr]
    return v * nd if len(v) == 1 else v


def pinned_kwargs(node: torch.fx.Node) -> dict[str, Any]:
    """The node's keyword arguments with the dtype it was traced with written in, where the op
    takes a ``dtype`` and was given none (``torch.full``, ``arange``, ``zeros``...): it would
    otherwise follow ``torch.set_default_dtype`` at every later run.

    >>> g = torch.fx.Graph()
    >>> n = g.call_function(torch.ops.aten.full.default, ([2], 0.5), {"device": "cpu"})
    >>> n.meta["val"] = torch.full([2], 0.5, dtype=torch.float64)
    >>> pinned_kwargs(n)
    {'device': 'cpu', 'dtype': torch.float64}
    """
    kwargs = dict(node.kwargs)
    schema = getattr(node.target, "_schema", None)
    val = node.meta.get("val")
    if schema is None or not isinstance(val, torch.Tensor) or kwargs.get("dtype") is not None:
        return kwargs
    names = [a.name for a in schema.arguments]
    if "dtype" in names and names.index("dtype") >= len(node.args):
        kwargs["dtype"] = val.dtype
    return kwargs
