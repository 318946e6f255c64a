"""Which part of the template penalty, if any, matters? Three penalties against one control.

Reads three finished sweeps of one dataset and architecture (RESULTS.md: the paper's small CNN on
Fashion-MNIST and CIFAR-10, its large CNN on CIFAR-10 on a GPU; ``splinelens sweep
--checkpoints``), one folder per penalty kind
(``splinelens.penalty``): ``eq13`` (eq. (13) as printed), ``reference`` (the 2018 code's
``ortho_loss2``) and ``row-norm`` (its diagonal term alone). The lambda = 0 runs, in the eq13
folder, are the control of every arm (kind, lambda > 0). Writes into --out:

1. ``arms.csv/.md/.png``: per arm, test accuracy and the generalisation gap
   (1 - train_err) - test_acc against the control: difference of means with a Welch 95% CI,
   Welch's p and Holm's p over all arms (per outcome); the final penalty, the classifier rows'
   mean norm and mean |cos| between rows (from the checkpoints); the smallest difference
   detectable at the observed sd; and (exploratory, added after seeing the table) each kind's
   dose-response slope per decade of lambda, fitted per seed.
2. ``prop5.csv/.md``: Proposition 5 / Figure 2 in float64 on n training and n test inputs, for
   the control and lambda = --lam of each kind (--prop5-all: every arm):
   mean(wrong-class <A[x]_c, x>) / mean(correct-class) against -1/(C-1), and cos(A[x]_c, x) for
   the correct class and the mean over the others; per arm, mean and 95% CI over seeds, and the
   train - test difference (paired by seed). Per model: ``prop5_models.csv``.
3. ``fig4.csv/.md``: Figure 4 for the control and one penalised arm (--kind at --lam): per
   layer, the label agreement of the k = 5 nearest training inputs in partition distance to n
   test queries, and their Euclidean rank among all training inputs (divided by the training set
   size); a linear slope over the layer index with its CI over seeds (``fig4_slopes.csv``).
4. ``gap.csv/.md``: Corollary 1's template matching gap (``sl.template_matching_gap``) for the
   same arms and for an input-convex copy of each of the control's models
   (``sl.make_input_convex``, fine-tuned briefly), relative to the mean |f(x)|.
5. ``run.json``: command, sizes, seeds, timings, versions, notes on missing arms
   (``run-PARTS.json`` when --parts runs only some parts).

Run (missing arms are skipped with a note, so it works on a sweep still in progress):

    python bench/exp_penalty_kinds.py [--runs runs/penalty-kinds] [--out results/penalty-kinds]
        [--n 200] [--gap-n 100] [--gap-m 200] [--lam 1] [--kind eq13] [--prop5-all]
        [--threads 2] [--device cuda] [--parts arms,prop5,fig4,gap]

The defaults take about 6 minutes on 2 free CPU cores (Prop. 5: ~2.5 s per model, Fig. 4: ~3 s,
the gap: ~22 s per model at 100 x 200), two to three times that on a shared machine; n = 500
and a 200 x 200 gap would take about 12 minutes on free cores.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from scipy import optimize, stats

import splinelens as sl
from splinelens.paper import templates
from splinelens.paper.config import TrainConfig
from splinelens.paper.data import Data
from splinelens.paper.files import write_csv, write_json, write_text
from splinelens.paper.models import build_model
from splinelens.paper.sweep import load_runs
from splinelens.paper.train import evaluate, load_checkpoint, load_data
from splinelens.penalty import orthogonality_penalty

KINDS = ("eq13", "reference", "row-norm")
LAMBDAS = (0.01, 0.1, 0.22, 0.67, 1.0, 2.0)
CONTROL = ("control", 0.0)
K_NEIGHBOURS = 5
FT_EPOCHS, FT_LR, FT_BATCH = 5, 1e-3, 64  # fine-tuning of the input-convex copies
Arms = dict[tuple[str, float], list[dict[str, Any]]]


# ----------------------------------------------------------------------------- runs and models
def finished_runs(root: Path, notes: list[str]) -> list[dict[str, Any]]:
    """The finished runs of the three folders that have checkpoints, each with its arm's key
    (CONTROL, or (kind, lambda)) and checkpoint path; a note for each that is left out."""
    runs = []
    for kind in KINDS:
        folder = root / kind / "runs"
        for rec in load_runs(folder.parent) if folder.is_dir() else []:
            ckpt = folder / f"{rec['run_id']}.safetensors"
            if rec["status"] != "finished" or not ckpt.exists():
                notes.append(f"{folder}/{rec['run_id']}: not finished or no checkpoint, skipped")
                continue
            lam = float(rec["config"]["lam"])
            key = CONTROL if lam == 0 else (rec["config"]["penalty_kind"], lam)
            runs.append({**rec, "ckpt": ckpt, "key": key})
    return runs


def load_arms(root: Path) -> tuple[Arms, list[str]]:
    """The runs grouped into arms (in the order of the grid, each by seed), arms of one run left
    out; and notes on what is missing."""
    notes: list[str] = []
    arms: Arms = defaultdict(list)
    for rec in sorted(finished_runs(root, notes), key=lambda r: r["config"]["seed"]):
        arms[rec["key"]].append(rec)
    grid = [CONTROL] + [(k, lam) for k in KINDS for lam in LAMBDAS]
    notes += [f"arm {arm_name(k)}: no finished runs, skipped" for k in grid if k not in arms]
    notes += [f"arm {arm_name(k)}: only 1 run, skipped" for k, v in arms.items() if len(v) < 2]
    order = {key: i for i, key in enumerate(grid)}
    keep = sorted((k for k, v in arms.items() if len(v) > 1), key=lambda k: order.get(k, 99))
    return {k: arms[k] for k in keep}, notes


def load_model(rec: dict[str, Any], data: Data) -> nn.Module:
    """The run's trained model, shaped for ``data``, float64, in eval mode, on data's device."""
    cfg, (c, h, _) = rec["config"], data.shape
    model = build_model(cfg["arch"], c, h, data.num_classes, cfg["batchnorm"], cfg["bias"])
    model = load_checkpoint(model, rec["ckpt"]).double().eval()
    return model.to(data.train_x.device)


def arm_name(key: tuple[str, float]) -> str:
    return "control (lambda 0)" if key == CONTROL else f"{key[0]} {key[1]:g}"


# ----------------------------------------------------------------------------- statistics
def mean_ci(values: Any) -> tuple[float, float, float]:
    """Mean and its 95% t interval (NaN bounds for fewer than 2 values)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()) if len(v) else np.nan, np.nan, np.nan
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def welch(a: Any, b: Any) -> dict[str, float]:
    """mean(a) - mean(b), its 95% CI with Welch-Satterthwaite df, and Welch's two-sided p."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff, se = a.mean() - b.mean(), np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.975, df) * se
    p = 2 * stats.t.sf(abs(diff) / se, df)
    return {"diff": diff, "lo": diff - half, "hi": diff + half, "p": p, "df": df}


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given)."""
    order = np.argsort(pvalues)
    adjusted, running = np.empty(len(pvalues)), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted.tolist()


def detectable(sd: float, n: int, alpha: float, power: float = 0.8) -> float:
    """Smallest true difference of means a two-sided two-sample t test (n per group, common sd)
    finds with the given power at level alpha (noncentral t)."""
    df, se = 2 * n - 2, sd * np.sqrt(2 / n)
    crit = stats.t.ppf(1 - alpha / 2, df)

    def short(d: float) -> float:  # the far tail's share is negligible (and NaN in scipy)
        return stats.nct.sf(crit, df, d / se) - power

    return float(optimize.brentq(short, 1e-9 * se, 20 * se))


# ----------------------------------------------------------------------------- 1. arms
def weight_stats(rec: dict[str, Any]) -> dict[str, float]:
    """The classifier rows W_c of a checkpoint: mean norm, mean |cos| between rows, eq. (13)."""
    w = load_file(rec["ckpt"])["classifier.weight"].double()  # (C, D)
    norms = w.norm(dim=1)
    cos = (w @ w.T) / (norms[:, None] * norms[None])
    off = ~torch.eye(len(w), dtype=torch.bool)
    return {
        "row_norm": float(norms.mean()),
        "abs_cos": float(cos[off].abs().mean()),
        "eq13_value": float(orthogonality_penalty(w, "eq13")),
    }


def per_run(arms: Arms) -> dict[tuple[str, float], dict[str, np.ndarray]]:
    """Per arm, the per-seed test_acc, gap, final penalty and weight statistics."""
    out = {}
    for key, recs in arms.items():
        w = [weight_stats(r) for r in recs]
        out[key] = {
            "test_acc": np.array([r["test_acc"] for r in recs]),
            "gap": np.array([1 - r["train_err"] - r["test_acc"] for r in recs]),
            "train_err": np.array([r["train_err"] for r in recs]),
            "penalty": np.array([r["penalty"] for r in recs]),
            **{k: np.array([x[k] for x in w]) for k in w[0]},
        }
    return out


def arm_rows(values: dict[tuple[str, float], dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    """One row per arm: descriptive numbers, and tests against the control (Holm per outcome)."""
    ctrl = values[CONTROL]
    rows = []
    for (kind, lam), v in values.items():
        row = {"kind": kind, "lam": lam, "n": len(v["test_acc"])}
        for out in ("test_acc", "gap"):
            row |= {f"{out}_mean": v[out].mean(), f"{out}_sd": v[out].std(ddof=1)}
            if (kind, lam) != CONTROL:
                t = welch(v[out], ctrl[out])
                row |= {f"{out}_{k}": t[k] for k in ("diff", "lo", "hi", "p")}
        row |= {
            k: v[k].mean() for k in ("train_err", "penalty", "row_norm", "abs_cos", "eq13_value")
        }
        rows.append(row)
    tested = [r for r in rows if r["kind"] != "control"]
    for out in ("test_acc", "gap"):
        for r, p in zip(tested, holm([r[f"{out}_p"] for r in tested]), strict=True):
            r[f"{out}_p_holm"] = p
    return rows


def _arm_cells(r: dict[str, Any], out: str) -> list[str]:
    """mean ± sd, and for a penalised arm the difference [CI], p and Holm's p of one outcome."""
    ms = f"{r[f'{out}_mean']:.4f} ± {r[f'{out}_sd']:.4f}"
    if r["kind"] == "control":
        return [ms, "", "", ""]
    ci = f"{r[f'{out}_diff']:+.4f} [{r[f'{out}_lo']:+.4f}, {r[f'{out}_hi']:+.4f}]"
    return [ms, ci, f"{r[f'{out}_p']:.3g}", f"{r[f'{out}_p_holm']:.3g}"]


def arms_markdown(rows: list[dict[str, Any]], notes: list[str]) -> str:
    """The arms table in markdown, then the notes (power, dose-response)."""
    head = ["kind", "λ", "n", "test acc", "Δ acc [95% CI]", "p", "p Holm", "gap", "Δ gap [95% CI]"]
    head += ["p", "p Holm", "train err", "penalty (own kind)", "mean ‖W_c‖", "mean |cos|"]
    lines = [_md_row([*head, "eq13 value"]), _md_row(["---"] * (len(head) + 1))]
    for r in rows:
        cells = [r["kind"], f"{r['lam']:g}", str(r["n"])]
        cells += [*_arm_cells(r, "test_acc"), *_arm_cells(r, "gap"), f"{r['train_err']:.4f}"]
        cells += [f"{r['penalty']:.4g}", f"{r['row_norm']:.3f}", f"{r['abs_cos']:.3f}"]
        lines.append(_md_row([*cells, f"{r['eq13_value']:.4g}"]))
    return "\n".join(lines) + "\n" + "\n".join(notes) + "\n"


def power_notes(values: dict[tuple[str, float], dict[str, np.ndarray]]) -> list[str]:
    """The smallest differences detectable (80% power) at the observed pooled sd, per outcome."""
    n, m = len(values[CONTROL]["test_acc"]), len(values) - 1
    notes = []
    for out in ("test_acc", "gap"):
        sd = float(
            np.sqrt(np.mean([v[out].var(ddof=1) for v in values.values() if len(v[out]) > 1]))
        )
        d05, dholm = detectable(sd, n, 0.05), detectable(sd, n, 0.05 / max(m, 1))
        notes.append(
            f"- {out}: pooled sd {sd:.4f}; with {n} seeds per arm a true difference of "
            f"{d05:.4f} is found with 80% power at alpha 0.05, {dholm:.4f} at alpha 0.05/{m} "
            "(Holm's first step)."
        )
    return notes


def trend_notes(arms: Arms) -> list[str]:
    """Exploratory, added after the pairwise table: per kind and outcome, the slope of the value
    on log10(lambda) over the kind's penalised runs, fitted per seed (the seeds are shared across
    lambdas), then a t test over seeds; Holm over the 6 slopes."""
    fits = []
    for kind, out in ((k, o) for k in KINDS for o in ("test_acc", "gap")):
        per_seed = defaultdict(list)  # seed -> [(log10 lambda, value)]
        for (k, lam), recs in arms.items():
            for r in recs if k == kind else []:
                value = r["test_acc"] if out == "test_acc" else 1 - r["train_err"] - r["test_acc"]
                per_seed[r["config"]["seed"]].append((np.log10(lam), value))
        slopes = [np.polyfit(*np.array(v).T, 1)[0] for v in per_seed.values() if len(v) > 2]
        if len(slopes) > 1:
            fits.append(
                (kind, out, len(slopes), *mean_ci(slopes), stats.ttest_1samp(slopes, 0).pvalue)
            )
    lines = ["Dose-response (exploratory): slope per decade of λ, fitted per seed, mean [95% CI]."]
    for (kind, out, n, b, lo, hi, p), ph in zip(fits, holm([f[-1] for f in fits]), strict=True):
        lines.append(f"- {kind}, {out}: {b:+.4f} [{lo:+.4f}, {hi:+.4f}] per decade ({n} seeds), ")
        lines[-1] += f"p = {p:.3g}, Holm p = {ph:.3g}."
    return lines


def plot_arms(rows: list[dict[str, Any]], path: Path, n_ctrl: int) -> None:
    """Test accuracy and gap (mean, 95% CI) against lambda per kind; the control as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ctrl = next(r for r in rows if r["kind"] == "control")
    for ax, out in zip(axes, ("test_acc", "gap"), strict=True):
        m, lo, hi = _ci_from_sd(ctrl[f"{out}_mean"], ctrl[f"{out}_sd"], n_ctrl)
        ax.axhspan(lo, hi, color="0.85", label="control (λ = 0), 95% CI")
        ax.axhline(m, color="0.5", lw=1)
        for j, kind in enumerate(KINDS):
            rs = [r for r in rows if r["kind"] == kind]
            if not rs:
                continue
            lam = np.array([r["lam"] for r in rs]) * 1.07**j  # offset so the bars do not overlap
            ci = [_ci_from_sd(r[f"{out}_mean"], r[f"{out}_sd"], r["n"]) for r in rs]
            mid = np.array([c[0] for c in ci])
            err = np.abs(np.array([[c[1] for c in ci], [c[2] for c in ci]]) - mid)
            ax.errorbar(lam, mid, yerr=err, marker="o", capsize=3, label=kind)
        ax.set(xscale="log", xlabel="λ", ylabel=out.replace("_", " "))
        ax.set_title("test accuracy" if out == "test_acc" else "(1 - train err) - test acc")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ci_from_sd(mean: float, sd: float, n: int) -> tuple[float, float, float]:
    half = stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n) if n > 1 else np.nan
    return mean, mean - half, mean + half


# ----------------------------------------------------------------------------- 2. Prop. 5
def prop5_one(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Bimodality ratio and template-input cosines (correct class, mean of the others)."""
    bim = templates.bimodality(templates.template_responses(model, x), y)
    cos = templates.template_stats(model, x)["cos"]  # (N, C)
    own = cos.gather(1, y[:, None]).squeeze(1)
    other = (cos.sum(1) - own) / (cos.shape[1] - 1)
    return {
        "ratio": bim["ratio"],
        "cos_correct": float(own.mean()),
        "cos_other": float(other.mean()),
    }


def prop5_models(arms: Arms, data: Data, n: int) -> list[dict[str, Any]]:
    """Per model and split (train, test): prop5_one on the first n inputs of the split."""
    splits = {"train": (data.train_x, data.train_y), "test": (data.test_x, data.test_y)}
    rows = []
    for (kind, lam), recs in arms.items():
        for rec in recs:
            model = load_model(rec, data)
            for split, (x, y) in splits.items():
                got = prop5_one(model, x[:n].double(), y[:n])
                rows.append(
                    {"kind": kind, "lam": lam, "seed": rec["config"]["seed"], "split": split, **got}
                )
    return rows


def prop5_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm: mean and 95% CI over seeds of each measure on train, test, and train - test."""
    out = []
    for key in dict.fromkeys((r["kind"], r["lam"]) for r in rows):
        mine = [r for r in rows if (r["kind"], r["lam"]) == key]
        row = {"kind": key[0], "lam": key[1], "seeds": len(mine) // 2}
        for m in ("ratio", "cos_correct", "cos_other"):
            tr = np.array([r[m] for r in mine if r["split"] == "train"])
            te = np.array([r[m] for r in mine if r["split"] == "test"])
            for split, v in (("train", tr), ("test", te), ("train_minus_test", tr - te)):
                row |= dict(
                    zip(
                        (f"{m}_{split}", f"{m}_{split}_lo", f"{m}_{split}_hi"),
                        mean_ci(v),
                        strict=True,
                    )
                )
        out.append(row)
    return out


def prop5_markdown(rows: list[dict[str, Any]], n: int, c: int) -> str:
    head = ["kind", "λ", "seeds", "measure", "train", "test", "train - test"]
    lines = [
        f"Prop. 5 on {n} training and {n} test inputs per model (float64); predicted ratio "
        f"-1/(C-1) = {-1 / (c - 1):.3f}. Mean [95% CI over seeds].\n",
        _md_row(head),
        _md_row(["---"] * len(head)),
    ]
    for r in rows:
        for m in ("ratio", "cos_correct", "cos_other"):
            cells = [_fmt_ci(r, f"{m}_{s}") for s in ("train", "test", "train_minus_test")]
            lines.append(_md_row([r["kind"], f"{r['lam']:g}", str(r["seeds"]), m, *cells]))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- 3. Figure 4
def fig4_one(model: nn.Module, data: Data, n: int) -> list[dict[str, Any]]:
    """Per layer: label agreement of the k partition-nearest training inputs of n test queries,
    and their Euclidean rank among all training inputs / N (row 0: Euclidean k-NN itself)."""
    xtr, xq, yq = data.train_x.double(), data.test_x[:n].double(), data.test_y[:n]
    eucl = torch.cdist(xq.flatten(1), xtr.flatten(1))  # (n, N)
    codes_tr, codes_q = sl.partition_codes(model, xtr), sl.partition_codes(model, xq)
    picks = [("input (Euclidean)", eucl.topk(K_NEIGHBOURS, largest=False).indices)]
    for i, layer in enumerate(codes_tr.layers):
        _, idx = sl.nearest_neighbors(codes_q, codes_tr, layer=i, k=K_NEIGHBOURS)
        picks.append((layer.name, idx.to(eucl.device)))
    rows = []
    for depth, (name, idx) in enumerate(picks):
        rank = (eucl[:, None, :] < eucl.gather(1, idx)[..., None]).sum(-1) + 1  # (n, k)
        agree = (data.train_y[idx] == yq[:, None]).double().mean()
        rows.append(
            {
                "layer": depth,
                "name": name,
                "agree": float(agree),
                "rank": float(rank.double().mean()) / len(xtr),
            }
        )
    return rows


def fig4_summary(per_seed: dict[str, list[list[dict[str, Any]]]]) -> tuple[list, list]:
    """Per arm and layer: mean and 95% CI over seeds; per arm, the slope over layers 1..L."""
    rows, slopes = [], []
    for arm, seeds in per_seed.items():
        for depth, first in enumerate(seeds[0]):
            row = {"arm": arm, "layer": depth, "name": first["name"], "seeds": len(seeds)}
            for m in ("agree", "rank"):
                row |= dict(
                    zip(
                        (m, f"{m}_lo", f"{m}_hi"),
                        mean_ci([s[depth][m] for s in seeds]),
                        strict=True,
                    )
                )
            rows.append(row)
        for m in ("agree", "rank"):
            per = [np.polyfit(np.arange(1, len(s)), [r[m] for r in s[1:]], 1)[0] for s in seeds]
            mean, lo, hi = mean_ci(per)
            slopes.append({"arm": arm, "measure": m, "slope_per_layer": mean, "lo": lo, "hi": hi})
    return rows, slopes


def fig4_markdown(rows: list, slopes: list, n: int) -> str:
    head = ["arm", "layer", "name", "seeds", "label agreement (k=5)", "Euclidean rank / N"]
    lines = [
        f"Figure 4: {n} test queries, k = {K_NEIGHBOURS} nearest of the training inputs in "
        "partition distance of one layer (layer 0: Euclidean k-NN). Mean [95% CI over seeds].\n",
        _md_row(head),
        _md_row(["---"] * len(head)),
    ]
    for r in rows:
        cells = [r["arm"], str(r["layer"]), r["name"], str(r["seeds"])]
        lines.append(_md_row([*cells, _fmt_ci(r, "agree"), _fmt_ci(r, "rank")]))
    lines += ["", "Linear slope over layers 1..L (per layer), 95% CI over seeds:", ""]
    lines += [_md_row(["arm", "measure", "slope [95% CI]"]), _md_row(["---"] * 3)]
    for s in slopes:
        lines.append(
            _md_row([s["arm"], s["measure"], _fmt_ci(s, "slope_per_layer", "lo", "hi", ".4f")])
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- 4. Corollary 1
def gap_one(model: nn.Module, x: torch.Tensor, cands: torch.Tensor) -> dict[str, float]:
    """Template matching gap over all (input, class) entries relative to mean |f(x)|, and the
    fraction of inputs whose top class would change."""
    g = sl.template_matching_gap(model, x, cands)
    with torch.no_grad():
        scale = float(model(x).abs().mean())
    rel = (g.gap / scale).flatten()
    return {
        "mean": float(rel.mean()),
        "median": float(rel.median()),
        "p95": float(torch.quantile(rel, 0.95)),
        "max": float(rel.max()),
        "changes_class": float(g.changes_class.double().mean()),
        "mean_abs_f": scale,
    }


def input_convex(rec: dict[str, Any], data: Data) -> tuple[nn.Module, dict[str, float]]:
    """A copy of the run's model made input-convex (Theorem 2) and fine-tuned on its training
    set; returns it (float64, eval) and its accuracies before and after fine-tuning."""
    model = load_model(rec, data).float()
    sl.make_input_convex(model, data.train_x[:2])
    before = evaluate(model, data.test_x, data.test_y)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=FT_LR)
    model.train()
    for _ in range(FT_EPOCHS):
        for idx in torch.randperm(len(data.train_y)).split(FT_BATCH):
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    info = {"test_acc_before": before, "test_acc": evaluate(model, data.test_x, data.test_y)}
    info["is_convex"] = sl.convexity(model, data.train_x[:2]).is_convex
    return model.double(), info


def gap_summary(arm: str, per_seed: list[dict[str, float]]) -> dict[str, Any]:
    row = {"arm": arm, "models": len(per_seed)}
    for k in per_seed[0]:
        row |= dict(zip((k, f"{k}_lo", f"{k}_hi"), mean_ci([s[k] for s in per_seed]), strict=True))
    return row


def gap_markdown(rows: list[dict[str, Any]], n: int, m: int, convex: list[dict[str, Any]]) -> str:
    keys = ("mean", "median", "p95", "max", "changes_class")
    head = ["arm", "models", "gap/mean|f| mean", "median", "95th pct", "max", "class changes"]
    lines = [
        f"Corollary 1: {n} test inputs, {m} training inputs as candidate regions (float64); "
        "gap = max over regions of A_r x + B_r minus f(x), over all (input, class) entries, "
        "divided by the model's mean |f(x)|. Mean [95% CI over seeds].\n",
        _md_row(head),
        _md_row(["---"] * len(head)),
    ]
    for r in rows:
        lines.append(
            _md_row([r["arm"], str(r["models"]), *(_fmt_ci(r, k, fmt=".3g") for k in keys)])
        )
    acc = [c["test_acc"] for c in convex]
    lines.append(
        f"\nInput-convex copies of the control's models (seeds {[c['seed'] for c in convex]}): "
        f"test accuracy {np.mean([c['test_acc_before'] for c in convex]):.4f} right after "
        f"make_input_convex, {np.mean(acc):.4f} (min {min(acc):.4f}, max {max(acc):.4f}) after "
        f"{FT_EPOCHS} epochs of fine-tuning (Adam {FT_LR:g}); convexity check: "
        f"{all(c['is_convex'] for c in convex)} for all."
    )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- helpers, main
def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _fmt_ci(r: dict[str, Any], key: str, lo: str = "", hi: str = "", fmt: str = ".3f") -> str:
    lo, hi = lo or f"{key}_lo", hi or f"{key}_hi"
    if np.isnan(r[lo]):
        return f"{r[key]:{fmt}}"
    return f"{r[key]:{fmt}} [{r[lo]:{fmt}}, {r[hi]:{fmt}}]"


def select(arms: Arms, keys: list, notes: list[str], what: str) -> Arms:
    """The arms ``keys`` that have runs; a note for each that has none."""
    notes += [f"{what}: arm {arm_name(k)} has no runs, left out" for k in keys if k not in arms]
    return {k: arms[k] for k in keys if k in arms}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=Path, default=Path("runs/penalty-kinds"))
    p.add_argument("--out", type=Path, default=Path("results/penalty-kinds"))
    p.add_argument(
        "--n", type=int, default=200, help="inputs per split (Prop. 5), queries (Fig. 4)"
    )
    p.add_argument("--gap-n", type=int, default=100, help="inputs of the matching gap")
    p.add_argument("--gap-m", type=int, default=200, help="candidate regions of the matching gap")
    p.add_argument("--lam", type=float, default=1.0, help="penalised lambda of parts 2-4")
    p.add_argument("--kind", default="eq13", choices=KINDS, help="penalty of parts 3-4")
    p.add_argument("--prop5-all", action="store_true", help="Prop. 5 on every arm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--parts", default="arms,prop5,fig4,gap", help="comma-separated subset of the four parts"
    )
    p.add_argument(
        "--device", default="cpu", help="where the float64 analyses run (cuda: TF32 off)"
    )
    return p.parse_args(argv)


def part_arms(arms: Arms, out: Path) -> list[dict[str, Any]]:
    values = per_run(arms)
    rows = arm_rows(values)
    write_csv(out / "arms.csv", rows, columns=list(dict.fromkeys(k for r in rows for k in r)))
    notes = ["", *power_notes(values), "", *trend_notes(arms)]
    write_text(out / "arms.md", arms_markdown(rows, notes))
    plot_arms(rows, out / "arms.png", len(arms[CONTROL]))
    return rows


def part_prop5(arms: Arms, data: Data, n: int, out: Path) -> list[dict[str, Any]]:
    models = prop5_models(arms, data, n)
    rows = prop5_summary(models)
    write_csv(out / "prop5_models.csv", models)
    write_csv(out / "prop5.csv", rows)
    write_text(out / "prop5.md", prop5_markdown(rows, n, data.num_classes))
    return rows


def part_fig4(chosen: Arms, data: Data, n: int, out: Path) -> list[dict[str, Any]]:
    per_seed = {
        arm_name(k): [fig4_one(load_model(r, data), data, n) for r in recs]
        for k, recs in chosen.items()
    }
    rows, slopes = fig4_summary(per_seed)
    write_csv(out / "fig4.csv", rows)
    write_csv(out / "fig4_slopes.csv", slopes)
    write_text(out / "fig4.md", fig4_markdown(rows, slopes, n))
    return rows


def part_gap(chosen: Arms, data: Data, n: int, m: int, out: Path) -> list[dict[str, Any]]:
    """The gap for the chosen arms, and for an input-convex counterpart of every control model."""
    x, cands = data.test_x[:n].double(), data.train_x[:m].double()
    rows = [
        gap_summary(arm_name(k), [gap_one(load_model(r, data), x, cands) for r in recs])
        for k, recs in chosen.items()
    ]
    convex, gaps = [], []
    for rec in chosen[CONTROL]:
        model, info = input_convex(rec, data)
        convex.append({"seed": rec["config"]["seed"], **info})
        gaps.append(gap_one(model, x, cands))
    rows.append(gap_summary("input-convex copies of the control (fine-tuned)", gaps))
    write_csv(out / "gap.csv", rows)
    write_text(out / "gap.md", gap_markdown(rows, n, m, convex))
    return convex


def run_info(args: argparse.Namespace, data: Data, arms: Arms) -> dict[str, Any]:
    """What run.json records besides timings and results: command, sizes, seeds, versions."""
    return {
        "command": " ".join(["python", *sys.argv]),
        "args": {k: str(v) for k, v in vars(args).items()},
        "sizes": {"train": len(data.train_y), "test": len(data.test_y), "n": args.n}
        | {"gap_n": args.gap_n, "gap_m": args.gap_m, "fine_tune_epochs": FT_EPOCHS},
        "seeds": {arm_name(k): [r["config"]["seed"] for r in v] for k, v in arms.items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    arms, notes = load_arms(args.runs)
    if CONTROL not in arms:
        sys.exit(f"no finished lambda = 0 runs under {args.runs}/eq13: nothing to compare against")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    data = load_data(TrainConfig(**arms[CONTROL][0]["config"])).to(args.device)
    every = list(arms) if args.prop5_all else [CONTROL, *((k, args.lam) for k in KINDS)]
    some = select(arms, every, notes, "Prop. 5")
    chosen = select(arms, [CONTROL, (args.kind, args.lam)], notes, "Fig. 4 and the gap")
    timings, results, t0 = {}, {}, time.perf_counter()
    parts = args.parts.split(",")
    for name, part in (
        ("arms", lambda: part_arms(arms, args.out)),
        ("prop5", lambda: part_prop5(some, data, args.n, args.out)),
        ("fig4", lambda: part_fig4(chosen, data, args.n, args.out)),
        ("gap", lambda: part_gap(chosen, data, args.gap_n, args.gap_m, args.out)),
    ):
        if name not in parts:
            continue
        start = time.perf_counter()
        results[name] = part()
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"{name}: {timings[name]} s", flush=True)
    timings["total"] = round(time.perf_counter() - t0, 1)
    info = run_info(args, data, arms) | {"timings_s": timings}
    info |= {"input_convex": results["gap"]} if "gap" in results else {}
    name = "run.json" if len(parts) == 4 else f"run-{'-'.join(parts)}.json"  # keep the full one
    write_json(args.out / name, info | {"notes": notes})
    print("\n".join(notes))


if __name__ == "__main__":
    main()
