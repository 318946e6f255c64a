"""Every figure writer honours the contract of ``splinelens.paper.figures``: data in, ``path``
right after the data, the image and a CSV of the numbers it draws written atomically beside each
other, the figure closed, ``path`` returned."""

from __future__ import annotations

import csv
import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn as nn

import splinelens as sl
from splinelens.paper import figures

matplotlib.use("Agg")  # no display
Rows = list[dict[str, str]]
_gen = torch.Generator().manual_seed(0)


def _pixels(rows: Rows) -> np.ndarray:
    """The image values of CSV panel rows (columns p0, p1, ...), in row order."""
    width = sum(k.startswith("p") and k[1:].isdigit() for k in rows[0])
    return np.array([[float(r[f"p{i}"]) for i in range(width)] for r in rows])


def _flat(*images: torch.Tensor) -> np.ndarray:
    return np.stack([im.double().flatten().numpy() for im in images])


def _templates() -> tuple[tuple, dict, Callable[[Rows], list[tuple[np.ndarray, np.ndarray]]]]:
    x, t = torch.randn(2, 1, 4, 4, generator=_gen), torch.randn(2, 3, 1, 4, 4, generator=_gen)
    resp = torch.randn(2, 3, generator=_gen)
    data = (x, t, resp, [[0, 1, 2], [2, 0, 1]], ["a", "b", "c"])
    panels = [im for i in range(2) for im in (x[i], *t[i])]

    def numbers(rows: Rows) -> list[tuple[np.ndarray, np.ndarray]]:
        got = [float(r["response"]) for r in rows if r["col"] != "0"]
        return [(_pixels(rows), _flat(*panels)), (np.array(got), resp.flatten().numpy())]

    return data, {}, numbers


def _bimodality() -> tuple[tuple, dict, Callable]:
    r, y = torch.randn(10, 3, generator=_gen), torch.randint(0, 3, (10,), generator=_gen)

    def numbers(rows: Rows) -> list[tuple[np.ndarray, np.ndarray]]:
        got = np.array([[float(row["response"]), int(row["correct"])] for row in rows])
        want = [[r[i, c].item(), int(c == y[i])] for i in range(10) for c in range(3)]
        return [(got, np.array(want))]

    return (r, y), {}, numbers


def _neighbors() -> tuple[tuple, dict, Callable]:
    q, nb = torch.randn(3, 5, generator=_gen), [torch.randn(4, 3, 5, generator=_gen)] * 2
    panels = [im for layer in nb for im in (q, *layer)]
    return (q, nb, ["1", "2"]), {}, lambda rows: [(_pixels(rows), _flat(*panels))]


def _groups() -> dict[float, list[dict[str, Any]]]:
    """Run records as ``report.by_lambda`` groups them: two seeds per lambda, three epochs."""

    def run(seed: int, lam: float) -> dict[str, Any]:
        acc = [0.5 + 0.1 * e + 0.01 * seed - 0.02 * lam for e in (1, 2, 3)]
        hist = [{"test_acc": a, "train_err": 0.5 / e + 0.01 * seed} for e, a in enumerate(acc, 1)]
        return {"test_acc": acc[-1], "history": hist}

    return {lam: [run(s, lam) for s in (0, 1)] for lam in (0.0, 0.1, 1.0)}


def _sweep_accuracy() -> tuple[tuple, dict, Callable]:
    g = _groups()
    mean = [np.mean([r["test_acc"] for r in runs]) for runs in g.values()]
    best = [max(h["test_acc"] for r in runs for h in r["history"]) for runs in g.values()]

    def numbers(rows: Rows) -> list[tuple[np.ndarray, np.ndarray]]:
        got = np.array([[float(r[k]) for k in ("lam", "mean", "max_any_epoch")] for r in rows])
        return [(got, np.array([list(g), mean, best]).T)]

    return (g,), {}, numbers


def _sweep_curves() -> tuple[tuple, dict, Callable]:
    g = _groups()
    want = [
        [lam, e + 1, np.mean([r["history"][e]["train_err"] for r in runs])]
        for lam, runs in g.items()
        for e in range(3)
    ]

    def numbers(rows: Rows) -> list[tuple[np.ndarray, np.ndarray]]:
        got = np.array([[float(r[k]) for k in ("lam", "epoch", "train_err")] for r in rows])
        return [(got, np.array(want))]

    return (g,), {}, numbers


@functools.cache
def _partition() -> sl.SlicePartition:
    """A small MLP's partition of the plane through three points (built once)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3)).double().eval()
    return sl.slice_partition(net, points=tuple(torch.randn(3, 2, dtype=torch.float64)))


def _slice() -> tuple[tuple, dict, Callable]:
    part = _partition()
    polys = part.layers[-1].polygons

    def numbers(rows: Rows) -> list[tuple[np.ndarray, np.ndarray]]:
        final = [r for r in rows if r["panel"] == str(len(part.layers))]
        region = [r for r in final if r["kind"] == "region"]
        uv = np.array([[float(r["u"]), float(r["v"])] for r in region])
        cls = {int(r["item"]): float(r["value"]) for r in region}
        anchors = [[float(r["u"]), float(r["v"])] for r in final if r["kind"] == "anchor"]
        return [
            (uv, np.concatenate(polys)),
            (np.array([cls[i] for i in range(len(polys))]), np.asarray(part.classes)),
            (np.array(anchors), np.asarray(part.anchors)),
        ]

    return (part,), {"color": "class"}, numbers


WRITERS: dict[str, Callable[[], tuple[tuple, dict, Callable]]] = {
    "plot_templates": _templates,
    "plot_bimodality": _bimodality,
    "plot_neighbors": _neighbors,
    "plot_sweep_accuracy": _sweep_accuracy,
    "plot_sweep_curves": _sweep_curves,
    "slice_figure": _slice,
}
DRAWING_PRIMITIVES = {"plot_slice"}  # draws on a given axes, writes nothing


def test_every_public_function_is_in_the_table() -> None:
    public = {
        name
        for name, fn in inspect.getmembers(figures, inspect.isfunction)
        if not name.startswith("_") and fn.__module__ == figures.__name__
    }
    assert public == set(WRITERS) | DRAWING_PRIMITIVES


@pytest.mark.parametrize("name", list(WRITERS))
def test_figure_writer_contract(tmp_path: Path, name: str) -> None:
    data, options, numbers = WRITERS[name]()
    path = tmp_path / "sub" / f"{name}.png"  # a folder that does not exist yet
    open_before = set(plt.get_fignums())
    out = getattr(figures, name)(*data, path, **options)  # path right after the data
    assert isinstance(out, Path) and out == path
    assert set(plt.get_fignums()) == open_before  # the figure was closed
    assert sorted(p.name for p in path.parent.iterdir()) == [f"{name}.csv", f"{name}.png"]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(path.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(None not in r for r in rows)  # a header over every value
    for got, want in numbers(rows):
        assert got.shape == want.shape
        assert np.array_equal(got, want.astype(np.float64)), name  # written exactly


def test_a_failing_figure_is_closed_and_writes_nothing(tmp_path: Path) -> None:
    (part,), _, _ = _slice()
    open_before = set(plt.get_fignums())
    with pytest.raises(ValueError, match="color must be"):
        figures.slice_figure(part, tmp_path / "s.png", color="rainbow")
    with pytest.raises(ValueError, match="its data goes beside it"):
        figures.plot_bimodality(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), "b.csv")
    assert set(plt.get_fignums()) == open_before
    assert not list(tmp_path.iterdir())


def test_one_run_has_no_std_in_figure_3a_as_in_the_table(tmp_path: Path) -> None:
    """A lambda with one run: fig3a.csv gave std 0.0 where table.csv gives NaN (undefined)."""
    from splinelens.paper.report import table

    groups = {lam: runs[:1] for lam, runs in _groups().items()}
    figures.plot_sweep_accuracy(groups, tmp_path / "a.png")
    with open(tmp_path / "a.csv") as f:
        stds = [float(r["std"]) for r in csv.DictReader(f)]
    assert all(np.isnan(stds)) and all(np.isnan(r["std"]) for r in table(groups))
