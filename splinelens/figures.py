"""Figures of the paper's objects (matplotlib; the maths lives in the other modules).

Every function writes a PNG and returns its path.

>>> import torch, tempfile, os
>>> p = plot_bimodality(torch.randn(20, 3), torch.randint(0, 3, (20,)),
...                     os.path.join(tempfile.mkdtemp(), "b.png"))
>>> os.path.exists(p)
True
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

Tensor = torch.Tensor


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _show(ax, img: Tensor, signed: bool) -> None:
    """Draw a (C, H, W) image or a (C, L) signal. Signed maps use a symmetric diverging scale."""
    img = img.detach().cpu().double()
    ax.set_xticks([])
    ax.set_yticks([])
    if img.dim() == 2 and img.shape[0] <= 3 and img.shape[1] > 3:  # 1-D signal(s)
        for ch in img:
            ax.plot(ch.numpy(), lw=1)
        return
    scale = float(img.abs().max()) or 1.0
    if img.shape[0] == 1:
        kw = {"cmap": "RdBu_r", "vmin": -scale, "vmax": scale} if signed else {"cmap": "gray"}
        ax.imshow(img[0].numpy(), **kw)
    else:  # colour: 0 maps to grey, the sign to the direction away from it
        ax.imshow((0.5 + img.permute(1, 2, 0) / (2 * scale)).clamp(0, 1).numpy())


def plot_templates(
    x: Tensor,
    templates: Tensor,
    responses: Tensor,
    classes: Sequence[int],
    names: Sequence[str],
    path: str | Path,
) -> Path:
    """One row per input: the input, then its templates A[x]_c with <A[x]_c, x> above each.

    x: (N, *shape); templates: (N, K, *shape); responses: (N, K); classes: (N, K) indices.
    """
    plt = _plt()
    n, k = templates.shape[:2]
    fig, axes = plt.subplots(n, k + 1, figsize=(1.9 * (k + 1), 1.9 * n), squeeze=False)
    for i in range(n):
        _show(axes[i, 0], x[i], signed=False)
        axes[i, 0].set_title("input", fontsize=8)
        for j in range(k):
            _show(axes[i, j + 1], templates[i, j], signed=True)
            c = int(classes[i][j])
            axes[i, j + 1].set_title(f"{names[c]}: {float(responses[i, j]):.2f}", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_bimodality(responses: Tensor, labels: Tensor, path: str | Path) -> Path:
    """Histograms of <A[x]_c, x> for the correct class and for the other classes (Fig. 2)."""
    plt = _plt()
    mask = torch.zeros_like(responses, dtype=torch.bool).scatter_(1, labels[:, None], True)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(responses[~mask].cpu().numpy(), bins=60, alpha=0.6, density=True, label="other")
    ax.hist(responses[mask].cpu().numpy(), bins=60, alpha=0.6, density=True, label="correct")
    ax.set_xlabel("<A[x]_c, x>")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_neighbors(
    query: Tensor, neighbors: Sequence[Tensor], layer_names: Sequence[str], path: str | Path
) -> Path:
    """Fig. 4: the query, then its nearest inputs in each layer's partition distance (rows)."""
    plt = _plt()
    k = len(neighbors[0])
    fig, axes = plt.subplots(
        len(neighbors), k + 1, figsize=(1.3 * (k + 1), 1.4 * len(neighbors)), squeeze=False
    )
    for r, (name, nb) in enumerate(zip(layer_names, neighbors)):
        _show(axes[r, 0], query, signed=False)
        axes[r, 0].set_ylabel(f"layer {name}", fontsize=8)
        for j in range(k):
            _show(axes[r, j + 1], nb[j], signed=False)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path
