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

from splinelens._checks import layer_index

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


def plot_slice(part, ax=None, color: str = "random", layer: int = -1):
    """Draw a ``SlicePartition``'s regions after ``layer`` on ``ax``.

    ``color``: "random" (one colour per region), "class" (top class at the region's interior
    point; regions the decision boundary crosses take their interior point's class) or "slope"
    (||d f / d(u, v)||). The decision boundary (black) and the anchor points are drawn on top.
    """
    import numpy as np
    from matplotlib.collections import LineCollection, PolyCollection

    plt = _plt()
    ax = ax or plt.subplots(figsize=(5, 5))[1]
    if part.layers:
        layer = layer_index(layer, [la.name for la in part.layers])
    cells = part.layers[layer] if part.layers else None
    V = cells.vertices if cells else part.vertices
    n = cells.counts if cells else part.counts
    faces = _face_colors(part, color, layer, len(n), plt)
    polys = [v[:k] for v, k in zip(V, n)]
    ax.add_collection(PolyCollection(polys, facecolors=faces, edgecolors=(0, 0, 0, 0.35), lw=0.2))
    if layer in (-1, len(part.layers) - 1) and len(part.boundary):  # after the last layer
        ax.add_collection(LineCollection(part.boundary, colors="k", linewidths=1.2))
    if part.anchors is not None:
        ax.scatter(*np.asarray(part.anchors).T, marker="*", s=120, c="w", edgecolors="k", zorder=3)
    u0, u1, v0, v1 = part.bounds
    ax.set_xlim(u0, u1)
    ax.set_ylim(v0, v1)
    ax.set_aspect("equal")
    return ax


def _face_colors(part, color: str, layer: int, count: int, plt):
    import numpy as np

    if color == "random":
        return plt.cm.tab20(np.random.default_rng(0).integers(0, 20, count))
    if layer not in (-1, len(part.layers) - 1):
        raise ValueError('color="class" and "slope" describe the final regions: use layer=-1')
    if color == "class":
        return plt.cm.tab10(part.classes % 10)
    if color == "slope":
        s = part.slope_norms
        return plt.cm.viridis((s - s.min()) / max(s.max() - s.min(), 1e-300))
    raise ValueError(f'color must be "random", "class" or "slope", got {color!r}')


def slice_figure(part, path: str | Path, color: str = "class") -> Path:
    """One panel per layer (how each subdivides the last, Sec. 7.1), then the final regions
    coloured by ``color`` with the decision boundary; writes a PNG."""
    plt = _plt()
    k = len(part.layers) + 1
    fig, axes = plt.subplots(1, k, figsize=(3.2 * k, 3.4), squeeze=False)
    for i, la in enumerate(part.layers):
        plot_slice(part, axes[0, i], "random", i)
        axes[0, i].set_title(f"after {la.name}: {len(la)} regions", fontsize=8)
    plot_slice(part, axes[0, -1], color, -1)
    axes[0, -1].set_title(f"{len(part)} regions by {color}, decision boundary", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
