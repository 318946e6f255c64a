"""Which modules compute differently in training mode, and the refusal of a model in it.

Batchnorm, dropout, RNNs and the like; torch's classes whose ``forward`` reads ``.training``
(spectral norm's parametrization); and classes of your own whose code reads it anywhere (in a
helper method too). Read from the source's syntax tree: a docstring, a comment or a config key
named "training" does not count. A function outside the class that reads a module's mode is not
seen.

>>> import torch.nn as nn
>>> [n for n, _ in mode_modules(nn.Sequential(nn.Linear(2, 2), nn.Dropout()))]
['1']
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import weakref
from typing import Any

import torch
import torch.nn as nn

from splinelens._structure import user_classes
from splinelens.errors import UnsupportedOperationError

_MODE_DEPENDENT = (
    nn.modules.batchnorm._NormBase,  # batchnorm and instance norm
    nn.modules.dropout._DropoutNd,
    nn.RNNBase,
    nn.RReLU,
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


def check_eval_mode(model: nn.Module) -> None:
    """Refuse a model in training mode: its batchnorm / dropout would not be affine per input.

    Only modules whose forward depends on the mode count (see the module's doc); a fresh
    ``nn.Linear`` left in training mode computes the same either way.
    """
    names = [n or type(model).__name__ for n, m in mode_modules(model) if m.training]
    if names:
        raise UnsupportedOperationError(
            "training mode",
            ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""),
            "is in training mode, and computes otherwise in it (batchnorm would use batch "
            "statistics, dropout would be random; a module of yours reads self.training), so "
            "the network is not a fixed spline of its input",
            "Call model.eval() first; splinelens never switches modes for you",
        )


def mode_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of ``model`` whose forward depends on the training mode: while
    the model's structure holds, ``check_eval_mode`` need only look at these."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if (_mode_dependent(type(m)) and not _no_dropout_rnn(m))
        or isinstance(m, torch.jit.ScriptModule)
    ]


def _no_dropout_rnn(m: nn.Module) -> bool:
    """An RNN whose mode changes nothing: dropout (between its layers) is its only use of it."""
    return isinstance(m, nn.RNNBase) and (m.dropout == 0 or m.num_layers == 1)


_KNOWN: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _mode_dependent(cls: type) -> bool:
    """Whether a module class computes differently in training mode (the module's doc); known
    once per class, which it does not keep alive (a class made in a function, closing over
    tensors)."""
    known = _KNOWN.get(cls)
    if known is None:
        known = _KNOWN[cls] = _reads_mode_of(cls)
    return known


def _reads_mode_of(cls: type) -> bool:
    if issubclass(cls, _MODE_DEPENDENT):
        return True
    if cls.__module__.startswith("torch."):
        return _reads_mode(cls.forward, unreadable=False)
    return any(_reads_mode(c, unreadable=True) for c in user_classes(cls.__mro__))


def _reads_mode(code: Any, unreadable: bool) -> bool:
    """Whether a class's or function's code reads ``x.training`` or ``getattr(x, "training")``
    (``unreadable``: the answer without source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(code)))
    except (OSError, TypeError, SyntaxError):
        return unreadable
    return any(_is_mode_read(node) for node in ast.walk(tree))


def _is_mode_read(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute):
        return node.attr == "training"
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "hasattr")
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and node.args[1].value == "training"
    )
