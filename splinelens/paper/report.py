"""Figure 3 of the paper from a sweep directory, and a table with a significance test.

(a) test accuracy against lambda: the mean over seeds (dots), +/- one std (band), and the max
over runs and epochs; (b) training error and test accuracy per epoch, lambda = 0 against the
other lambdas (means over seeds). The table gives, per lambda, the mean, std and max of the
final test accuracy (mean of the last 3 epochs) and Welch's t-test against lambda = 0.

>>> # report(Path("runs/fmnist")) writes fig3a.png, fig3b.png, table.md and table.csv there
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from splinelens.paper.sweep import _write_text, load_runs


def by_lambda(runs: list[dict[str, Any]]) -> dict[float, list[dict[str, Any]]]:
    """Finished runs grouped by lambda, in increasing order."""
    groups: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if r.get("status") == "finished":
            groups[float(r["config"]["lam"])].append(r)
    return dict(sorted(groups.items()))


def table(groups: dict[float, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per lambda: n, mean, std, max of test accuracy; Welch's t and p against lambda = 0."""
    from scipy import stats

    base = [r["test_acc"] for r in groups.get(0.0, [])]
    rows = []
    for lam, runs in groups.items():
        acc = [r["test_acc"] for r in runs]
        t = p = float("nan")
        if lam != 0.0 and len(base) >= 2 and len(acc) >= 2:
            res = stats.ttest_ind(acc, base, equal_var=False)
            t, p = float(res.statistic), float(res.pvalue)
        rows.append(
            {
                "lam": lam,
                "runs": len(acc),
                "mean": float(np.mean(acc)),
                "std": float(np.std(acc, ddof=1)) if len(acc) > 1 else float("nan"),
                "max": float(np.max(acc)),
                "max_any_epoch": max(h["test_acc"] for r in runs for h in r["history"]),
                "diff_vs_0": float(np.mean(acc) - np.mean(base)) if base else float("nan"),
                "welch_t": t,
                "p_value": p,
            }
        )
    return rows


def _markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| lambda | runs | mean test acc | std | max | max (any epoch) | mean - mean(0) | "
        "Welch t | p |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    fmt = (
        "| {lam:g} | {runs} | {mean:.4f} | {std:.4f} | {max:.4f} | {max_any_epoch:.4f} | "
        "{diff_vs_0:+.4f} | {welch_t:.2f} | {p_value:.3g} |\n"
    )
    return head + "".join(fmt.format(**r) for r in rows)


def _xpos(lams: list[float]) -> list[float]:
    """Lambda on a log axis with lambda = 0 placed one decade below the smallest non-zero."""
    nonzero = [x for x in lams if x > 0]
    low = min(nonzero) / 10 if nonzero else 1.0
    return [math.log10(x if x > 0 else low) for x in lams]


def figure_a(groups: dict[float, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = list(groups)
    xs = _xpos(lams)
    acc = [np.array([r["test_acc"] for r in groups[lam]]) for lam in lams]
    mean = np.array([a.mean() for a in acc])
    std = np.array([a.std(ddof=1) if len(a) > 1 else 0.0 for a in acc])  # as in the table
    best = [max(h["test_acc"] for r in groups[lam] for h in r["history"]) for lam in lams]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.fill_between(xs, mean - std, mean + std, alpha=0.25, label="mean ± std")
    ax.plot(xs, mean, "o-", label="mean over seeds")
    ax.plot(xs, best, "^--", label="max over runs and epochs")
    ax.set_xticks(xs, [f"{lam:g}" for lam in lams])
    ax.set_xlabel("λ (orthogonality penalty)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure_b(groups: dict[float, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for lam, runs in groups.items():
        hist = [r["history"] for r in runs]
        n = min(len(h) for h in hist)
        epochs = np.arange(1, n + 1)
        style = {"lw": 2.5, "color": "k"} if lam == 0 else {"lw": 1.2}
        for ax, key in ((ax1, "train_err"), (ax2, "test_acc")):
            vals = np.mean([[h[e][key] for e in range(n)] for h in hist], axis=0)
            ax.plot(epochs, vals, label=f"λ={lam:g}", **style)
    ax1.set(xlabel="epoch", ylabel="training error", yscale="log")
    ax2.set(xlabel="epoch", ylabel="test accuracy")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: str | Path) -> list[dict[str, Any]]:
    """Write fig3a.png, fig3b.png, table.md and table.csv into the sweep directory."""
    out = Path(out)
    groups = by_lambda(load_runs(out))
    if not groups:
        raise ValueError(f"{out} holds no finished runs (expected {out}/runs/*.json)")
    rows = table(groups)
    figure_a(groups, out / "fig3a.png")
    figure_b(groups, out / "fig3b.png")
    _write_text(out / "table.md", _markdown(rows))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    _write_text(out / "table.csv", buf.getvalue())
    return rows
