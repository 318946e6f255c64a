"""Orthogonal templates (Sec. 6): the penalty of eq. (13), its reference code's variant, and a
one-line way to use them.

The last linear layer's rows W_c are the templates' final factor; the paper adds
lambda * sum over c1 != c2 of <W_c1, W_c2>^2 to the cross-entropy to make them orthogonal
(``kind="eq13"``, the printed equation). The paper's reference code (RandallBalestriero/DNN,
``ortho_loss2``) computes something else: with W (D inputs, C classes),
mean over the C x C entries of (W^T W - diag(mean over D of W * W))^2, that is

    [ sum over c1 != c2 of <w_c1, w_c2>^2  +  (1 - 1/D)^2 sum over c of ||w_c||^4 ] / C^2

(``kind="reference"``): the off-diagonal terms scaled by 1/C^2, plus a fourth-power decay of the
rows' norms. ``kind="row-norm"`` is that diagonal term alone.

>>> import torch, torch.nn as nn
>>> w = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
>>> float(orthogonality_penalty(w))     # <w0, w1>^2 counted for (0, 1) and (1, 0)
2.0
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
>>> classifier(net) is net[2]
True
>>> loss = template_penalty(net, lam=0.1)   # add to any loss; differentiable
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from splinelens._checks import LayerNotFoundError, layer_index
from splinelens._sums import fixed_sum

__all__ = ["PENALTY_KINDS", "classifier", "orthogonality_penalty", "template_penalty"]

Tensor = torch.Tensor


PENALTY_KINDS = ("eq13", "reference", "row-norm")


def orthogonality_penalty(weight: Tensor, kind: str = "eq13") -> Tensor:
    """The penalty without lambda, for a (C, D) classifier weight (rows: classes).

    ``eq13``: sum over c1 != c2 of <W_c1, W_c2>^2, exactly the printed eq. (13).
    ``reference``: the reference code's ``ortho_loss2`` on W^T (its (D, C) layout), its
    normalisation and diagonal included; ``row-norm``: only its diagonal term,
    (1 - 1/D)^2 sum_c ||W_c||^4 / C^2. Rows beyond the first dimension are flattened.

    >>> w = torch.tensor([[1.0, 0.0], [1.0, 1.0]])   # C = 2, D = 2
    >>> [round(float(orthogonality_penalty(w, k)), 4) for k in PENALTY_KINDS]
    [2.0, 0.8125, 0.3125]
    """
    if not isinstance(weight, Tensor) or weight.dim() < 2 or 0 in weight.shape:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(
            f"weight must be a (C, D, ...) tensor with at least one class and one input, got "
            f"{got}; pass the classifier's weight (rows: classes)"
        )
    if not weight.is_floating_point():  # (complex: the products are not conjugated)
        raise TypeError(f"weight must be a real floating tensor, got {weight.dtype}")
    w = weight.reshape(weight.shape[0], -1)  # (C, D)
    if w.element_size() < 4:  # 16-bit: sums past 65504 overflow
        w = w.float()  # (the result is float32; the gradient reaches the weight in its dtype)
    gram = w @ w.T  # (C, C): <W_c1, W_c2>
    sq = gram.diagonal()  # (C,): ||W_c||^2
    if kind == "eq13":
        return fixed_sum((gram - torch.diag_embed(sq)).pow(2))  # the diagonal zeroed exactly
    if kind == "reference":
        return fixed_sum((gram - torch.diag_embed(sq / w.shape[1])).pow(2)) / gram.numel()
    if kind == "row-norm":
        return fixed_sum((sq * (1 - 1 / w.shape[1])).pow(2)) / len(sq) ** 2
    raise ValueError(f"unknown penalty kind {kind!r}; choose one of {', '.join(PENALTY_KINDS)}")


def classifier(model: nn.Module, layer: int | str | None = None) -> nn.Linear:
    """The classifier layer: ``layer`` among the model's ``nn.Linear`` modules (an index, negative
    from the end, or the module's name, as ``layer=`` everywhere), else the submodule called
    ``classifier`` (as in ``splinelens.paper.models``) or the last ``nn.Linear``.

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> classifier(net) is net[2], classifier(net, 0) is net[0], classifier(net, "2") is net[2]
    (True, True, True)
    """
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if layer is not None:
        try:
            return linears[layer_index(layer, [name for name, _ in linears], "classifier layer")][1]
        except LayerNotFoundError as e:  # (a ValueError here: the model has no such layer)
            raise ValueError(f"{e}: pass layer= the index or module path of an nn.Linear") from None
    named = getattr(model, "classifier", None)
    if isinstance(named, nn.Linear):
        return named
    if not linears:
        raise ValueError("no classifier layer found: the model has no nn.Linear")
    return linears[-1][1]


def template_penalty(
    model: nn.Module, lam: float, layer: int | str | None = None, kind: str = "eq13"
) -> Tensor:
    """lam * the penalty (eq. (13) by default) on the model's classifier weight:
    ``loss = ce + template_penalty(m, 0.1)``; ``layer`` picks the classifier as in
    ``classifier``; ``kind`` as in ``orthogonality_penalty``.

    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> template_penalty(net, 0.1).shape  # a scalar to add to the loss (the last linear's rows)
    torch.Size([])
    """
    return _checked_lam(lam) * orthogonality_penalty(classifier(model, layer).weight, kind)


def _checked_lam(lam: object) -> float | Tensor:
    """lam if it is a finite int or float >= 0 (or a 0-d floating tensor), else a ValueError."""
    real = isinstance(lam, (int, float)) and not isinstance(lam, bool)  # (a Fraction cannot
    scalar = isinstance(lam, Tensor) and lam.dim() == 0 and lam.is_floating_point()  # scale)
    if not (real or scalar) or not (math.isfinite(float(lam)) and float(lam) >= 0):
        raise ValueError(
            f"lam must be a finite number >= 0, got {lam!r}; it weighs the penalty in the loss "
            "(0 turns it off)"
        )
    return lam
