"""Each analysis of the paper on one trained model and data: figures plus the data behind them.

Used by ``splinelens demo`` and by ``splinelens analyze`` (a checkpoint of a registered
architecture on a registered dataset); every function takes any ``nn.Module``.

    splinelens analyze --dataset mnist-5k --arch small-cnn --checkpoint run.safetensors \
        --out analysis --what templates,bimodality,neighbors,regions,convexity
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from splinelens._io import array_sha256, write_npz
from splinelens.geometry.convexity import convexity, convexity_gap, make_input_convex
from splinelens.paper import figures
from splinelens.paper.data import Data
from splinelens.paper.files import write_csv, write_json
from splinelens.paper.neighbors import neighbor_stats, others, region_stats
from splinelens.paper.templates import bimodality, template_responses, template_stats
from splinelens.paper.train import reproducible
from splinelens.view import partition_codes, view_of

__all__ = [
    "ANALYSES",
    "ANALYSIS_THREADS",
    "analyze",
    "bimodality_figure",
    "convexity_example",
    "partition_figures",
    "templates_figure",
    "weights_sha256",
]

ANALYSES = ("templates", "bimodality", "neighbors", "regions", "convexity")


ANALYSIS_THREADS = 2  # fixed, as training's: results independent of the machine


def analyze(
    model: nn.Module,
    data: Data,
    out: str | Path,
    what: tuple[str, ...] = ANALYSES,
    n: int = 1000,
    *,
    lam: float | None = None,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the chosen analyses on n test examples (a fixed random subset); write into out.

    They run with ``ANALYSIS_THREADS`` CPU threads, so their float32 numbers are the same on any
    machine and under any OMP_NUM_THREADS (a sum's rounding depends on how it is split).
    ``lam``: the lambda the model was trained with, if known (Figure 2's files name it);
    ``source``: where the model comes from (a checkpoint and its sha256), for analysis.json.
    A folder holds the analyses of one model, data and n: analyses of the same add to it (its
    ``model`` entry in analysis.json says which), another is refused.
    """
    with reproducible(ANALYSIS_THREADS, torch.device("cpu")):
        return _analyze(model, data, out, what, n, lam, source or {})


def _analyze(
    model: nn.Module,
    data: Data,
    out: str | Path,
    what: tuple[str, ...],
    n: int,
    lam: float | None,
    source: dict[str, Any],
) -> dict[str, Any]:
    out = Path(out)
    pick = torch.randperm(len(data.test_y), generator=torch.Generator().manual_seed(0))[:n]
    several = sorted({"bimodality", "neighbors", "regions"} & set(what))
    if len(pick) < 2 and several:  # (before anything is written)
        raise ValueError(f"{', '.join(several)} need at least 2 inputs (--n 2 or more)")
    me = {"weights_sha256": weights_sha256(model), "dataset": getattr(data, "name", None)}
    me.update(n=len(pick), data_sha256=_data_sha256(data, pick), lam=lam, **source)
    facts = {**_earlier(out, me), "model": me, "test_indices": pick.tolist()}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "analysis.json", facts)  # the folder is this model's before any figure
    x, y = data.test_x[pick], data.test_y[pick]  # datasets may be stored class by class
    if "templates" in what:
        facts["templates"] = templates_figure(model, x, data, out)
    if "bimodality" in what:
        facts["bimodality"] = bimodality_figure(model, x, y, out, lam)
    if "neighbors" in what or "regions" in what:
        facts["neighbors"], facts["regions"] = partition_figures(model, x, y, out)
    if "convexity" in what:
        facts["convexity"] = convexity_example(model, x[:200])
    write_json(out / "analysis.json", facts)
    return facts


def weights_sha256(model: nn.Module) -> str:
    """The sha256 of the model's state (names, dtypes, shapes and bytes of its tensors).

    >>> weights_sha256(nn.Linear(2, 1)) == weights_sha256(nn.Linear(2, 1))  # random weights
    False
    """
    each = "".join(
        f"{name}:{t.dtype}:{tuple(t.shape)}:{array_sha256(_bytes(t))};"
        for name, t in model.state_dict().items()
    )
    return hashlib.sha256(each.encode()).hexdigest()


def _bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a uint8 array (any dtype, bfloat16 too, which numpy lacks)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _earlier(out: Path, me: dict[str, Any]) -> dict[str, Any]:
    """The facts already in ``out`` (of the same model, data and n), or a ValueError."""
    path = out / "analysis.json"
    if not path.exists():
        return {}
    keys = ("weights_sha256", "dataset", "n", "data_sha256")  # (the data's: since 2026-11-29)
    try:
        facts = json.loads(path.read_text())
        held = {k: facts["model"].get(k, me[k]) for k in keys}
    except (ValueError, KeyError, TypeError, AttributeError):
        held = None
    if held != {k: me[k] for k in keys}:
        raise ValueError(
            f"{out} holds the analysis of another model, dataset, data or n ({path} says "
            f"{held or 'nothing readable'}); use another --out, or remove the folder"
        )
    return facts


def _data_sha256(data: Data, pick: torch.Tensor) -> str:
    """The sha256 of the analysed test inputs and labels (one dataset name, other data: a
    --data-dir elsewhere)."""
    x, y = data.test_x[pick], data.test_y[pick]
    return hashlib.sha256((array_sha256(_bytes(x)) + array_sha256(_bytes(y))).encode()).hexdigest()


def templates_figure(
    model: nn.Module,
    x: torch.Tensor,
    data: Data,
    out: Path,
    classes: list[int] | None = None,
    n: int = 4,
) -> dict[str, Any]:
    """Fig. 1 for the first n inputs: templates of ``classes`` (default: the predicted class
    and the two runners-up of each input), with template statistics over 200 inputs."""
    xs = x[:n]
    amap = view_of(model, xs).affine_map(xs)
    resp_all = (amap.output - amap.B).reshape(len(xs), -1)  # (n, C): <A[x]_c, x>
    if classes is None:
        top = amap.output.reshape(len(xs), -1).topk(3, dim=1).indices  # (n, 3)
        a = amap.A.reshape(len(xs), resp_all.shape[1], *xs.shape[1:])
        picked = torch.stack([a[i, top[i]] for i in range(len(xs))])
    else:
        top = torch.tensor(classes).expand(len(xs), -1)
        picked = amap.templates(rows=classes)  # only these rows of A
    resp = resp_all.gather(1, top)
    figures.plot_templates(xs, picked, resp, top.tolist(), data.classes, out / "templates.png")
    write_npz(  # the figure's data
        out / "templates.npz",
        x=xs.numpy(),
        templates=picked.detach().numpy(),
        responses=resp.detach().numpy(),
        classes=top.numpy(),
    )
    stats = _template_summary(model, x[:200])
    write_json(out / "template_stats.json", stats)
    return stats


def _template_summary(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Means over ``x`` of |cos(A[x]_c, x)|, ||A[x]_c|| and |cos| between classes' templates."""
    st = template_stats(model, x)
    gram = st["gram"]
    norms = gram.diagonal(dim1=1, dim2=2).sqrt()
    cosg = gram / (norms[:, :, None] * norms[:, None, :])
    off = ~torch.eye(gram.shape[1], dtype=torch.bool)
    return {
        "mean_abs_cos_with_x": float(st["cos"].abs().mean()),
        "mean_norm": float(st["norm"].mean()),
        "mean_abs_cos_between_classes": float(cosg[:, off].abs().mean()),
    }


def bimodality_figure(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, out: Path, lam: float | None
) -> dict[str, float]:
    """Fig. 2 for the model trained with ``lam`` (None: not known): the histogram of template
    responses, one row per input of them in ``responses_lam<lam>.csv`` (``responses.csv``);
    returns Prop. 5's statistics."""
    r = template_responses(model, x)
    tag = "" if lam is None else f"_lam{lam:g}"
    figures.plot_bimodality(r, y, out / f"bimodality{tag}.png")
    write_csv(
        out / f"responses{tag}.csv",
        [
            {"label": int(y[i]), **{f"class{c}": float(r[i, c]) for c in range(r.shape[1])}}
            for i in range(len(y))
        ],
    )
    return bimodality(r, y)


def partition_figures(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, out: Path
) -> tuple[list, list]:
    """Fig. 4 for the first input (neighbors.png, the test indices in neighbors_grid.json), and
    the per-layer neighbour and region statistics (neighbor_stats.csv, regions.csv)."""
    if len(x) < 2:
        raise ValueError("the partition analyses need at least 2 inputs (--n 2 or more)")
    codes = partition_codes(model, x)
    k = min(8, len(x) - 1)  # neighbours other than the input itself
    nb = neighbor_stats(codes, x, y, k=k)
    regions = region_stats(codes)
    names = [c.name for c in codes.layers]
    idx = [others(codes, i, k)[0] for i in range(len(names))]  # query: the first input
    figures.plot_neighbors(x[0], [x[i] for i in idx], names, out / "neighbors.png")
    write_json(
        out / "neighbors_grid.json",
        {"query": 0, "layers": names, "neighbors": [i.tolist() for i in idx]},
    )
    write_csv(out / "neighbor_stats.csv", nb)
    write_csv(out / "regions.csv", regions)
    return nb, regions


def convexity_example(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Theorem 2 on ``model``: why it is not convex, and a constrained copy that is."""
    before = convexity(model, x)
    convex = copy.deepcopy(model)
    constrained = make_input_convex(convex, x)
    after = convexity(convex, x)
    return {
        "reasons": before.reasons[:6],
        "n_reasons": len(before.reasons),
        "gap_before": convexity_gap(model, x),
        "constrained": constrained,
        "is_convex_after": after.is_convex,
        "gap_after": convexity_gap(convex, x),
    }
