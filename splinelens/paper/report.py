"""Figure 3 of the paper from a sweep directory, and a table with a significance test.

(a) test accuracy against lambda: the mean over seeds (dots), +/- one std (band), and the max
over runs and epochs; (b) training error and test accuracy per epoch, lambda = 0 against the
other lambdas (means over seeds). The table gives, per lambda, the mean, std and max of the
final test accuracy (mean of the last 3 epochs) and Welch's t-test against lambda = 0. The
figures are drawn by ``figures``, each with the numbers it shows beside it as CSV.

>>> # report(Path("runs/fmnist")) writes fig3a.png, fig3b.png, table.md and table.csv there
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from splinelens.paper import figures
from splinelens.paper.files import write_csv, write_text
from splinelens.paper.sweep import load_runs

__all__ = ["by_lambda", "failures", "report", "table"]


def by_lambda(runs: list[dict[str, Any]]) -> dict[float, list[dict[str, Any]]]:
    """Finished runs grouped by lambda, in increasing order."""
    groups: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if r.get("status") == "finished":
            groups[float(r["config"]["lam"])].append(r)
    return dict(sorted(groups.items()))


def failures(runs: list[dict[str, Any]]) -> dict[float, int]:
    """The number of failed (diverged) runs per lambda, in increasing order."""
    counts: dict[float, int] = defaultdict(int)
    for r in runs:
        if r.get("status") == "failed":
            counts[float(r["config"]["lam"])] += 1
    return dict(sorted(counts.items()))


def table(
    groups: dict[float, list[dict[str, Any]]], failed: dict[float, int] | None = None
) -> list[dict[str, Any]]:
    """Per lambda: finished and ``failed`` runs; mean, std, max of test accuracy over the
    finished ones (nan where none finished); Welch's t and p against lambda = 0.

    >>> run = {"test_acc": 0.5, "history": [{"test_acc": 0.5}]}
    >>> [(r["lam"], r["runs"], r["failed"]) for r in table({0.0: [run]}, {1.0: 2})]
    [(0.0, 1, 0), (1.0, 0, 2)]
    """
    failed = failed or {}
    base = [r["test_acc"] for r in groups.get(0.0, [])]
    return [
        _row(lam, groups.get(lam, []), failed.get(lam, 0), base)
        for lam in sorted({*groups, *failed})
    ]


def _row(lam: float, runs: list[dict[str, Any]], failed: int, base: list[float]) -> dict:
    from scipy import stats

    acc = [r["test_acc"] for r in runs]
    nan = float("nan")
    t = p = nan
    if lam != 0.0 and len(base) >= 2 and len(acc) >= 2:
        res = stats.ttest_ind(acc, base, equal_var=False)
        t, p = float(res.statistic), float(res.pvalue)
    return {
        "lam": lam,
        "runs": len(acc),
        "failed": failed,
        "mean": float(np.mean(acc)) if acc else nan,
        "std": float(np.std(acc, ddof=1)) if len(acc) > 1 else nan,
        "max": float(np.max(acc)) if acc else nan,
        "max_any_epoch": max((h["test_acc"] for r in runs for h in r["history"]), default=nan),
        "diff_vs_0": float(np.mean(acc) - np.mean(base)) if base and acc else nan,
        "welch_t": t,
        "p_value": p,
    }


def _markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| lambda | runs | failed | mean test acc | std | max | max (any epoch) | "
        "mean - mean(0) | Welch t | p |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    fmt = (
        "| {lam:g} | {runs} | {failed} | {mean:.4f} | {std:.4f} | {max:.4f} | "
        "{max_any_epoch:.4f} | {diff_vs_0:+.4f} | {welch_t:.2f} | {p_value:.3g} |\n"
    )
    return head + "".join(fmt.format(**r) for r in rows)


def report(out: str | Path, lambdas: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """Write fig3a.png, fig3b.png (with their data, fig3a.csv and fig3b.csv), table.md and
    table.csv into the sweep directory; return the table's rows. ``lambdas``: only the runs of
    these (the demo's, in a folder an earlier call with another lambda also wrote)."""
    out = Path(out)
    runs = load_runs(out)
    groups, failed = by_lambda(runs), failures(runs)
    if lambdas is not None:
        keep = {float(v) for v in lambdas}
        groups = {lam: runs for lam, runs in groups.items() if lam in keep}
        failed = {lam: n for lam, n in failed.items() if lam in keep}
    if not groups:
        raise ValueError(f"{out} holds no finished runs (expected {out}/runs/*.json)")
    rows = table(groups, failed)
    _warn_failed(rows)
    figures.plot_sweep_accuracy(groups, out / "fig3a.png")
    figures.plot_sweep_curves(groups, out / "fig3b.png")
    write_text(out / "table.md", _markdown(rows))
    write_csv(out / "table.csv", rows)
    return rows


def _warn_failed(rows: list[dict[str, Any]]) -> None:
    """Say which lambdas lost runs: their statistics are over the finished runs only."""
    lost = [r for r in rows if r["failed"]]
    if lost:
        total = sum(r["runs"] + r["failed"] for r in rows)
        each = ", ".join(f"{r['lam']:g}: {r['failed']} of {r['runs'] + r['failed']}" for r in lost)
        warnings.warn(
            f"{sum(r['failed'] for r in lost)} of {total} runs failed (lambda {each}); the "
            "table's statistics are over the finished runs only (see its 'failed' column)",
            stacklevel=2,
        )
