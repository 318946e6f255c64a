"""Figure 3 of the paper from a sweep directory, and a table with a significance test.

(a) test accuracy against lambda: the mean over seeds (dots), +/- one std (band), and the max
over runs and epochs; (b) training error and test accuracy per epoch, lambda = 0 against the
other lambdas (means over seeds). The table gives, per lambda, the mean, std and max of the
final test accuracy (mean of the last 3 epochs) and Welch's t-test against lambda = 0. The
figures are drawn by ``figures``, each with the numbers it shows beside it as CSV.

>>> # report(Path("runs/fmnist")) writes fig3a.png, fig3b.png, table.md and table.csv there
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from splinelens.paper import figures
from splinelens.paper.files import write_csv, write_text
from splinelens.paper.sweep import load_runs

__all__ = ["by_lambda", "report", "table"]


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


def report(out: str | Path, lambdas: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """Write fig3a.png, fig3b.png (with their data, fig3a.csv and fig3b.csv), table.md and
    table.csv into the sweep directory; return the table's rows. ``lambdas``: only the runs of
    these (the demo's, in a folder an earlier call with another lambda also wrote)."""
    out = Path(out)
    groups = by_lambda(load_runs(out))
    if lambdas is not None:
        keep = {float(v) for v in lambdas}
        groups = {lam: runs for lam, runs in groups.items() if lam in keep}
    if not groups:
        raise ValueError(f"{out} holds no finished runs (expected {out}/runs/*.json)")
    rows = table(groups)
    figures.plot_sweep_accuracy(groups, out / "fig3a.png")
    figures.plot_sweep_curves(groups, out / "fig3b.png")
    write_text(out / "table.md", _markdown(rows))
    write_csv(out / "table.csv", rows)
    return rows
