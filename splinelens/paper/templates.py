"""Templates (Sec. 5): statistics of A[x]_c, and the bimodality of <A[x]_c, x> (Prop. 5).

<A[x]_c, x> = f(x)_c - B[x]_c, so the template responses over a dataset need no template at
all: a recording pass and a frozen pass per batch, streamed.

>>> import torch, torch.nn as nn
>>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
>>> x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
>>> r = template_responses(net, x, batch_size=16)        # (50, 3): <A[x_n]_c, x_n>
>>> stats = bimodality(r, y)
>>> round(stats["predicted_ratio"], 3)
-0.5
"""

from __future__ import annotations

import torch
import torch.nn as nn

from splinelens._checks import check_positive_int
from splinelens.view import view_of

__all__ = ["bimodality", "template_responses", "template_stats"]

Tensor = torch.Tensor


def template_responses(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """<A[x_n]_c, x_n> for every input and class, (N, C), as f(x) - B[x] in batches."""
    view = view_of(model, x)
    batch_size = check_positive_int("batch_size", batch_size)
    parts = []
    for i in range(0, len(x), batch_size):
        amap = view.affine_map(x[i : i + batch_size])
        parts.append((amap.output - amap.B).reshape(len(amap.x), -1))  # (n, C)
    return torch.cat(parts)


def bimodality(responses: Tensor, labels: Tensor) -> dict[str, float]:
    """Correct-class against other-class responses, and Proposition 5's prediction.

    Prop. 5: memorising templates are +sqrt((C-1)a/C) x for the correct class and
    -sqrt(a/(C(C-1))) x for the others, so mean(wrong) / mean(correct) = -1/(C-1).
    """
    c = responses.shape[1]
    correct = responses.gather(1, labels[:, None]).squeeze(1)  # (N,)
    mask = torch.ones_like(responses, dtype=torch.bool).scatter_(1, labels[:, None], False)
    wrong = responses[mask]  # (N * (C - 1),)
    return {
        "mean_correct": float(correct.mean()),
        "mean_wrong": float(wrong.mean()),
        "ratio": float(wrong.mean() / correct.mean()),
        "predicted_ratio": -1.0 / (c - 1),
        "std_correct": float(correct.std()),
        "std_wrong": float(wrong.std()),
    }


def template_stats(model: nn.Module, x: Tensor, batch_size: int = 64) -> dict[str, Tensor]:
    """Per input and class: the template's cosine with x and its norm; per input the Gram
    matrix of the templates across classes (how orthogonal they are).

    Returns ``cos`` (N, C), ``norm`` (N, C), ``gram`` (N, C, C).
    """
    view = view_of(model, x)
    batch_size = check_positive_int("batch_size", batch_size)
    cos, norm, gram = [], [], []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        a = view.affine_map(xb).A.reshape(len(xb), -1, xb[0].numel())  # (n, C, D)
        flat = xb.reshape(len(xb), 1, -1)  # (n, 1, D)
        norm.append(a.norm(dim=2))
        cos.append(torch.nn.functional.cosine_similarity(a, flat, dim=2))
        gram.append(a @ a.transpose(1, 2))
    return {"cos": torch.cat(cos), "norm": torch.cat(norm), "gram": torch.cat(gram)}
