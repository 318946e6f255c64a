"""How far a splinified network is from the smooth one, measured on inputs.

``approximation_error(model, splined, x)`` runs both networks on x and reports the largest and
mean absolute differences of the outputs, the same relative to each sample's output scale
(max_c |f(x)_c|), and how often the top-1 class agrees. The certified bounds of the single
activations (``SplineActivation.sup_error``) say how good each spline is on all of R; this says
what they add up to through a trained network.

>>> import torch, torch.nn as nn, splinelens as sl
>>> net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
>>> err = sl.approximation_error(net, sl.splinify(net, tol=1e-4), torch.randn(64, 4))
>>> err.max_abs < 1e-3, err.top1_agreement
(True, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from splinelens._capture import check_eval_mode
from splinelens._checks import (
    check_dtype,
    check_finite,
    check_input,
    check_positive_int,
    check_untransformed,
)

__all__ = ["ApproximationError", "approximation_error"]

Tensor = torch.Tensor


@dataclass(frozen=True)
class ApproximationError:
    """|f(x) - f~(x)| over n inputs: max and mean, absolute and relative to max_c |f(x)_c|;
    the fraction of inputs whose top-1 class agrees (None for outputs without classes)."""

    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    top1_agreement: float | None
    n: int


def approximation_error(
    model: nn.Module, splined: nn.Module, x: Tensor, batch_size: int = 1024
) -> ApproximationError:
    """Compare ``model`` and ``splined`` (``sl.splinify(model)``) on inputs x (N, ...).

    Models returning a tuple (an ``nn.RNN``: output, last hidden state) are compared on its first
    tensor. A NaN or inf output of either is refused, naming the input, rather than averaged;
    so are models in training mode (random dropout; batchnorm would change its statistics).

    >>> import torch, torch.nn as nn, splinelens as sl
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    >>> err = approximation_error(net, sl.splinify(net, tol=1e-3), torch.randn(5, 3))
    >>> err.max_abs < 1e-2
    True
    """
    floating = isinstance(x, Tensor) and x.is_floating_point()  # (else token ids: embeddings)
    if isinstance(x, Tensor) and not floating and x.dim() and len(x):
        check_untransformed("x", x)
    else:
        check_input("x", x)
    batch_size = check_positive_int("batch_size", batch_size)
    for m in (model, splined):  # (dropout would make the numbers random, batchnorm's statistics
        check_eval_mode(m)  # would move)
        if floating:
            check_dtype(m, x)
    diffs, rels, agree = [], [], []
    with torch.no_grad():
        for i, chunk in enumerate(x.split(batch_size)):
            f, g = _first(model(chunk)), _first(splined(chunk))
            for name, out in (("model", f), ("splined", g)):
                check_finite(
                    f"the {name}'s output (inputs from {i * batch_size} on)",
                    out,
                    "values overflow: rescale the inputs or weights, or use float64",
                )
            if f.shape != g.shape:
                raise ValueError(
                    f"the outputs differ in shape: {tuple(f.shape)} vs {tuple(g.shape)}"
                )
            d = (f - g).abs().reshape(len(chunk), -1)  # (n, C)
            scale = f.abs().reshape(len(chunk), -1).amax(1).clamp_min(torch.finfo(f.dtype).tiny)
            diffs.append(d)
            rels.append(d.amax(1) / scale)
            if f.dim() == 2 and f.shape[1] > 1:
                agree.append(f.argmax(1) == g.argmax(1))
    d, rel = torch.cat(diffs).double(), torch.cat(rels).double()
    return ApproximationError(
        float(d.max()),
        float(d.mean()),
        float(rel.max()),
        float(rel.mean()),
        float(torch.cat(agree).double().mean()) if agree else None,
        len(x),
    )


def _first(out: object) -> Tensor:
    """A model's output tensor: itself, or the first of a tuple or list (an RNN's sequence)."""
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, Tensor):
        raise TypeError(f"the model returned {type(out).__name__}, not a tensor")
    return out
