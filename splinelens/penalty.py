"""Orthogonal templates (Sec. 6): the penalty of eq. (13) and a one-line way to use it.

The last linear layer's rows W_c are the templates' final factor; the paper adds
lambda * sum over c1 != c2 of <W_c1, W_c2>^2 to the cross-entropy to make them orthogonal.

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

import torch
import torch.nn as nn

Tensor = torch.Tensor


def orthogonality_penalty(weight: Tensor) -> Tensor:
    """Eq. (13) without lambda: sum over c1 != c2 of <W_c1, W_c2>^2, for a (C, D) weight.

    Exactly the paper's formula (the 2018 code subtracted the mean of squares from the
    diagonal instead). Rows beyond the first dimension are flattened: a (C, ...) weight works.
    """
    w = weight.reshape(weight.shape[0], -1)  # (C, D)
    gram = w @ w.T  # (C, C): <W_c1, W_c2>
    off = gram - torch.diag_embed(gram.diagonal())  # zero the diagonal (no cancellation)
    return off.pow(2).sum()


def classifier(model: nn.Module, name: str | None = None) -> nn.Linear:
    """The classifier layer: the submodule called ``name``, else the last ``nn.Linear``.

    Models from ``splinelens.paper.models`` name it ``classifier``.
    """
    if name is not None:
        layer = model.get_submodule(name)
    else:
        named = getattr(model, "classifier", None)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        layer = named if isinstance(named, nn.Linear) else (linears[-1] if linears else None)
    if not isinstance(layer, nn.Linear):
        raise ValueError(
            f"no classifier layer found{f' named {name!r}' if name else ''}: "
            "pass name='...' the module path of the last nn.Linear"
        )
    return layer


def template_penalty(model: nn.Module, lam: float, name: str | None = None) -> Tensor:
    """lam * eq. (13) on the model's classifier weight: ``loss = ce + template_penalty(m, 0.1)``."""
    return lam * orthogonality_penalty(classifier(model, name).weight)
