"""Figures of the paper's objects (matplotlib, Agg; the maths lives in the other modules).

Every figure writer here (every public function but ``plot_slice``) honours one contract:

1. it takes data (tensors, arrays, run records, a ``SlicePartition``), never a model: what it
   draws was computed elsewhere;
2. ``path``, the image to write (PNG; the format follows the suffix), comes right after the
   data; options, with defaults, follow it;
3. it writes the image atomically and, beside it, the numbers it draws as a CSV with the same
   stem (``fig.png`` -> ``fig.csv``), also atomically;
4. it closes its matplotlib figure, also when drawing fails;
5. it returns ``path`` as a ``Path``.

Image panels (templates, neighbours) are one CSV row each: the panel's place and title, its
``shape`` ("1x28x28") and its values in C order as columns p0, p1, ... ``plot_slice(part, ax)`` is
the drawing primitive behind ``slice_figure``, for your own layouts: it draws on the axes it is
given and writes nothing; ``slice_figure`` is its figure writer.

>>> import torch, tempfile, os
>>> p = plot_bimodality(torch.randn(20, 3), torch.randint(0, 3, (20,)),
...                     os.path.join(tempfile.mkdtemp(), "b.png"))
>>> sorted(f.name for f in p.parent.iterdir())
['b.csv', 'b.png']
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from splinelens._checks import layer_index
from splinelens._io import atomic_path
from splinelens.paper.files import write_csv

__all__ = [
    "Rows",
    "plot_bimodality",
    "plot_neighbors",
    "plot_slice",
    "plot_sweep_accuracy",
    "plot_sweep_curves",
    "plot_templates",
    "slice_figure",
]

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from splinelens.geometry.slices import SlicePartition

Tensor = torch.Tensor
Rows = list[dict[str, Any]]  # the CSV beside a figure, one dict per row


def plot_templates(
    x: Tensor,
    templates: Tensor,
    responses: Tensor,
    classes: Sequence[Sequence[int]],
    names: Sequence[str],
    path: str | Path,
) -> Path:
    """One row per input: the input, then its templates A[x]_c with <A[x]_c, x> above each.

    x: (N, *shape); templates: (N, K, *shape); responses: (N, K); classes: (N, K) indices.
    CSV: one row per panel (row, col, class, name, response, shape, p0, ...).
    """
    n, k = templates.shape[:2]
    rows: Rows = []
    with _figure(n, k + 1, figsize=(1.9 * (k + 1), 1.9 * n)) as (fig, axes):
        for i in range(n):
            _show(axes[i, 0], x[i], signed=False)
            axes[i, 0].set_title("input", fontsize=8)
            rows.append(_panel({"row": i, "col": 0, "name": "input"}, x[i]))
            for j in range(k):
                c, r = int(classes[i][j]), float(responses[i, j])
                _show(axes[i, j + 1], templates[i, j], signed=True)
                axes[i, j + 1].set_title(f"{names[c]}: {r:.2f}", fontsize=8)
                meta = {"row": i, "col": j + 1, "class": c, "name": names[c], "response": r}
                rows.append(_panel(meta, templates[i, j]))
        fig.tight_layout()
        return _save(fig, path, rows, ["row", "col", "class", "name", "response"])


def plot_bimodality(responses: Tensor, labels: Tensor, path: str | Path) -> Path:
    """Histograms of <A[x]_c, x> for the correct class and for the other classes (Fig. 2).

    responses: (N, C); labels: (N,). CSV: one row per (example, class) with its response.
    """
    r = responses.detach().cpu().double()
    mask = torch.zeros_like(r, dtype=torch.bool).scatter_(1, labels.cpu()[:, None], True)
    with _figure(figsize=(5, 3)) as (fig, ax):
        ax.hist(r[~mask].numpy(), bins=60, alpha=0.6, density=True, label="other")
        ax.hist(r[mask].numpy(), bins=60, alpha=0.6, density=True, label="correct")
        ax.set_xlabel("<A[x]_c, x>")
        ax.legend()
        fig.tight_layout()
        rows = [
            {"example": i, "class": c, "label": int(y), "correct": int(c == y), "response": v}
            for i, (y, values) in enumerate(zip(labels.tolist(), r.tolist()))
            for c, v in enumerate(values)
        ]
        return _save(fig, path, rows)


def plot_neighbors(
    query: Tensor, neighbors: Sequence[Tensor], layer_names: Sequence[str], path: str | Path
) -> Path:
    """Fig. 4: the query, then its nearest inputs in each layer's partition distance (rows).

    query: (*shape); neighbors: per layer (K, *shape), nearest first. CSV: one row per panel
    (row, layer, rank, shape, p0, ...), rank 0 being the query.
    """
    k = len(neighbors[0])
    rows: Rows = []
    size = (1.3 * (k + 1), 1.4 * len(neighbors))
    with _figure(len(neighbors), k + 1, figsize=size) as (fig, axes):
        for r, (name, nb) in enumerate(zip(layer_names, neighbors)):
            _show(axes[r, 0], query, signed=False)
            axes[r, 0].set_ylabel(f"layer {name}", fontsize=8)
            rows.append(_panel({"row": r, "layer": name, "rank": 0}, query))
            for j in range(k):
                _show(axes[r, j + 1], nb[j], signed=False)
                rows.append(_panel({"row": r, "layer": name, "rank": j + 1}, nb[j]))
        fig.tight_layout()
        return _save(fig, path, rows)


def plot_sweep_accuracy(groups: dict[float, list[dict[str, Any]]], path: str | Path) -> Path:
    """Fig. 3 (a): test accuracy against lambda over a sweep's finished runs (``groups``: run
    records by lambda): the mean over seeds, +/- one std (a band), and the max over runs and
    epochs. Lambda is on a log axis, 0 placed one decade below the smallest non-zero value.

    CSV: one row per lambda (lam, x: its position on the axis, runs, mean, std, max_any_epoch).
    """
    rows = [_accuracy_row(lam, runs, x) for (lam, runs), x in zip(groups.items(), _xpos(groups))]
    xs, mean, std = (np.array([r[k] for r in rows]) for k in ("x", "mean", "std"))
    std = np.nan_to_num(std)  # one run: no band
    with _figure(figsize=(5, 3.5)) as (fig, ax):
        ax.fill_between(xs, mean - std, mean + std, alpha=0.25, label="mean ± std")
        ax.plot(xs, mean, "o-", label="mean over seeds")
        ax.plot(xs, [r["max_any_epoch"] for r in rows], "^--", label="max over runs and epochs")
        ax.set_xticks(xs, [f"{lam:g}" for lam in groups])
        ax.set_xlabel("λ (orthogonality penalty)")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return _save(fig, path, rows, dpi=120)


def plot_sweep_curves(groups: dict[float, list[dict[str, Any]]], path: str | Path) -> Path:
    """Fig. 3 (b): training error (log scale) and test accuracy per epoch, means over seeds;
    lambda = 0 in bold black against the other lambdas (``groups``: run records by lambda).

    CSV: one row per (lambda, epoch): lam, epoch, train_err, test_acc.
    """
    rows = [row for lam, runs in groups.items() for row in _curve_rows(lam, runs)]
    with _figure(1, 2, figsize=(9, 3.5)) as (fig, axes):
        ax1, ax2 = axes[0]
        for lam in groups:
            mine = [r for r in rows if r["lam"] == lam]
            epochs = [r["epoch"] for r in mine]
            style = {"lw": 2.5, "color": "k"} if lam == 0 else {"lw": 1.2}
            for ax, key in ((ax1, "train_err"), (ax2, "test_acc")):
                ax.plot(epochs, [r[key] for r in mine], label=f"λ={lam:g}", **style)
        ax1.set(xlabel="epoch", ylabel="training error", yscale="log")
        ax2.set(xlabel="epoch", ylabel="test accuracy")
        ax2.legend(fontsize=8)
        fig.tight_layout()
        return _save(fig, path, rows, dpi=120)


def slice_figure(part: SlicePartition, path: str | Path, color: str = "class") -> Path:
    """One panel per layer (how each subdivides the last, Sec. 7.1), then the final regions
    coloured by ``color`` with the decision boundary.

    CSV: one row per polygon vertex drawn (panel, layer, kind "region" / "boundary" / "anchor",
    item, vertex, u, v, value: the number the region's colour shows).
    """
    k = len(part.layers) + 1
    rows: Rows = []
    with _figure(1, k, figsize=(3.2 * k, 3.4)) as (fig, axes):
        for i, la in enumerate(part.layers):
            rows += _draw_slice(part, axes[0, i], "random", i, panel=i)
            axes[0, i].set_title(f"after {la.name}: {len(la)} regions", fontsize=8)
        rows += _draw_slice(part, axes[0, -1], color, -1, panel=k - 1)
        axes[0, -1].set_title(f"{len(part)} regions by {color}, decision boundary", fontsize=8)
        fig.tight_layout()
        return _save(fig, path, rows, dpi=130)


def plot_slice(
    part: SlicePartition, ax: Axes | None = None, color: str = "random", layer: int | str = -1
) -> Axes:
    """Draw a ``SlicePartition``'s regions after ``layer`` on ``ax`` (a new figure's if None);
    return ``ax``. Writes nothing: ``slice_figure`` writes a figure with its data. ``layer``: an
    index (negative from the end) or a layer's name, as everywhere.

    ``color``: "random" (one colour per region), "class" (top class at the region's interior
    point; regions the decision boundary crosses take their interior point's class) or "slope"
    (||d f / d(u, v)||); "class" and "slope" describe the final regions (``layer=-1`` only). The
    decision boundary (black) and the anchor points are drawn on top.
    """
    ax = ax or _plt().subplots(figsize=(5, 5))[1]
    _draw_slice(part, ax, color, layer)
    return ax


# --- drawing and writing helpers ------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def _figure(*grid: int, figsize: tuple[float, float]) -> Iterator[tuple[Any, Any]]:
    """A new figure and its axes (one, or a 2-D array for a ``grid`` of rows, cols); closed
    when the block ends, also by an exception."""
    plt = _plt()
    fig, axes = plt.subplots(*grid, figsize=figsize, squeeze=not grid)
    try:
        yield fig, axes
    finally:
        plt.close(fig)


def _save(
    fig, path: str | Path, rows: Rows, columns: Sequence[str] | None = None, dpi: int = 110
) -> Path:
    """Write ``fig`` to ``path`` and ``rows`` to the CSV beside it, each atomically.

    ``columns``: the CSV's leading columns when rows differ in keys (the rest follow in the
    order they first appear)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        raise ValueError(f"{path}: a figure's path; its data goes beside it as {path.stem}.csv")
    names = dict.fromkeys(columns or ())
    for row in rows:
        names.update(dict.fromkeys(row))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix[1:].lower() or "png")
    write_csv(path.with_suffix(".csv"), rows, names)
    return path


def _panel(meta: dict[str, Any], img: Tensor) -> dict[str, Any]:
    """The CSV row of an image panel: ``meta``, its shape, its values in C order."""
    values = img.detach().cpu().double().flatten().tolist()
    shape = "x".join(str(d) for d in img.shape)
    return {**meta, "shape": shape, **{f"p{i}": v for i, v in enumerate(values)}}


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


def _xpos(lams: Sequence[float]) -> list[float]:
    """Lambda on a log axis with lambda = 0 placed one decade below the smallest non-zero."""
    nonzero = [x for x in lams if x > 0]
    low = min(nonzero) / 10 if nonzero else 1.0
    return [math.log10(x if x > 0 else low) for x in lams]


def _accuracy_row(lam: float, runs: list[dict[str, Any]], x: float) -> dict[str, Any]:
    """Fig. 3 (a) at one lambda: final test accuracy over seeds, and the best of any epoch."""
    acc = np.array([r["test_acc"] for r in runs])
    return {
        "lam": lam,
        "x": x,
        "runs": len(acc),
        "mean": float(acc.mean()),
        "std": float(acc.std(ddof=1)) if len(acc) > 1 else float("nan"),  # as in the table
        "max_any_epoch": max(h["test_acc"] for r in runs for h in r["history"]),
    }


def _curve_rows(lam: float, runs: list[dict[str, Any]]) -> Rows:
    """Fig. 3 (b) at one lambda: per epoch, the means over seeds (up to the shortest run)."""
    hist = [r["history"] for r in runs]
    n = min(len(h) for h in hist)
    return [
        {
            "lam": lam,
            "epoch": e + 1,
            "train_err": float(np.mean([h[e]["train_err"] for h in hist])),
            "test_acc": float(np.mean([h[e]["test_acc"] for h in hist])),
        }
        for e in range(n)
    ]


def _draw_slice(part, ax, color: str, layer: int, panel: int = 0) -> Rows:
    """Draw the regions after ``layer`` (see ``plot_slice``); return the CSV rows drawn."""
    from matplotlib.collections import PolyCollection

    if part.layers:
        layer = layer_index(layer, [la.name for la in part.layers])
    cells = part.layers[layer] if part.layers else None
    V, n = (cells.vertices, cells.counts) if cells else (part.vertices, part.counts)
    values = _face_values(part, color, layer, len(n))
    polys = [v[:k] for v, k in zip(V, n)]
    faces = _face_colors(values, color)
    ax.add_collection(PolyCollection(polys, facecolors=faces, edgecolors=(0, 0, 0, 0.35), lw=0.2))
    name = cells.name if cells else ""
    rows = _shape_rows(panel, name, "region", polys, values.tolist())
    rows += _draw_overlays(part, ax, layer, panel, name)
    u0, u1, v0, v1 = part.bounds
    ax.set_xlim(u0, u1)
    ax.set_ylim(v0, v1)
    ax.set_aspect("equal")
    return rows


def _draw_overlays(part, ax, layer: int, panel: int, name: str) -> Rows:
    """The decision boundary (after the last layer) and the anchors; their CSV rows."""
    from matplotlib.collections import LineCollection

    rows: Rows = []
    if layer in (-1, len(part.layers) - 1) and len(part.boundary):  # after the last layer
        ax.add_collection(LineCollection(part.boundary, colors="k", linewidths=1.2))
        rows += _shape_rows(panel, name, "boundary", part.boundary)
    if part.anchors is not None:
        anchors = np.asarray(part.anchors)  # (A, 2)
        ax.scatter(*anchors.T, marker="*", s=120, c="w", edgecolors="k", zorder=3)
        rows += _shape_rows(panel, name, "anchor", anchors[:, None])
    return rows


def _shape_rows(
    panel: int, layer: str, kind: str, shapes: Sequence[np.ndarray], values: Sequence = ()
) -> Rows:
    """One CSV row per vertex (u, v) of each shape (a polygon, a segment, a point)."""
    return [
        {
            "panel": panel,
            "layer": layer,
            "kind": kind,
            "item": i,
            "vertex": j,
            "u": float(u),
            "v": float(v),
            "value": values[i] if len(values) else "",
        }
        for i, shape in enumerate(shapes)
        for j, (u, v) in enumerate(np.asarray(shape).tolist())
    ]


def _face_values(part, color: str, layer: int, count: int) -> np.ndarray:
    """The number each region's colour shows: a random index, its class, or its slope norm."""
    if color == "random":
        return np.random.default_rng(0).integers(0, 20, count)
    if layer not in (-1, len(part.layers) - 1):
        raise ValueError('color="class" and "slope" describe the final regions: use layer=-1')
    if color == "class":
        return np.asarray(part.classes)
    if color == "slope":
        return np.asarray(part.slope_norms)
    raise ValueError(f'color must be "random", "class" or "slope", got {color!r}')


def _face_colors(values: np.ndarray, color: str):
    """The RGBA colours of ``values`` (see ``_face_values``)."""
    cm = _plt().cm
    if color == "random":
        return cm.tab20(values)
    if color == "class":
        return cm.tab10(values % 10)
    return cm.viridis((values - values.min()) / max(values.max() - values.min(), 1e-300))
