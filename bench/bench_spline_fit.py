"""Certified PWL fits of smooth activations (splinelens.smooth.fit): bound vs dense error.

For each smooth activation and K in (8, 16, 32, 64, 128, 256): the certified ``sup_error`` on all
of R and the max error found by dense float64 evaluation against PyTorch's own function (1M
points on [-60, 60], 256 per piece over the knots' span, +-1e3, +-1e4, +-1e6). For sigmoid, tanh,
GELU and SiLU at K = 64 also the issue's reference interpolants on [-8, 8], measured densely on
[-8, 8]: uniform knots; knots equidistributing sqrt|f''| (the issue's "equidistributed", about
C^2/(8K^2)); and knots equalising the interpolation error itself (de Boor iterations, nearer
C^2/(8K^2) still). First, the time of ``fit_activation(name, tol=1e-3)`` per activation, cold
cache. Run:

    python bench/bench_spline_fit.py [--out bench/results/spline_fit.csv] [--threads N]
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Callable
from pathlib import Path

import torch

from splinelens.smooth.activations import Curve
from splinelens.smooth.fit import ACTIVATIONS, SplineFit, activation_function, fit_activation

F64 = torch.float64
KS = (8, 16, 32, 64, 128, 256)
REFERENCE = {  # the K = 64 interpolants on [-8, 8]: (uniform, equidistributed)
    "sigmoid": (7.5e-4, 1.9e-4),
    "tanh": (6.0e-3, 4.5e-4),
    "gelu": (6.1e-3, 4.1e-4),
    "silu": (3.9e-3, 4.0e-4),
}
SMOOTH = [n for n, a in ACTIVATIONS.items() if isinstance(a.spec(), Curve)]
Fn = Callable[[torch.Tensor], torch.Tensor]


def dense_error(fit: SplineFit, f: Fn) -> float:
    """max |f - p| over 1M points on [-60, 60], 256 per piece on the knots' span, far points."""
    k = fit.knots
    lam = torch.linspace(0, 1, 256, dtype=F64)
    span = (k[:-1, None] + lam * k.diff()[:, None]).flatten()
    far = torch.tensor([1e3, 1e4, 1e6], dtype=F64)
    x = torch.cat([torch.linspace(-60, 60, 1_000_001, dtype=F64), span, k, far, -far])
    return (f(x) - fit(x)).abs().max().item()


def interp_error(f: Fn, knots: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Max |f - interpolant| on [knots[0], knots[-1]] (1M points) and per piece (64 points each)."""
    fk = f(knots)
    lam = torch.linspace(0, 1, 64, dtype=F64)
    x = knots[:-1, None] + lam * knots.diff()[:, None]  # (K, 64)
    per_piece = (f(x) - (fk[:-1, None] + lam * fk.diff()[:, None])).abs().amax(1)
    xs = torch.linspace(knots[0].item(), knots[-1].item(), 1_000_001, dtype=F64)
    i = torch.bucketize(xs, knots).clamp(1, knots.numel() - 1)
    w = (xs - knots[i - 1]) / (knots[i] - knots[i - 1])
    dense = (f(xs) - (fk[i - 1] + w * (fk[i] - fk[i - 1]))).abs().max().item()
    return dense, per_piece


def invert(cdf: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """k+1 knots splitting the increasing cdf (on the nodes x) into equal parts, ends kept."""
    levels = torch.linspace(0, cdf[-1].item(), k + 1, dtype=F64)[1:-1]
    i = torch.searchsorted(cdf, levels).clamp(1, x.numel() - 1)
    w = (levels - cdf[i - 1]) / (cdf[i] - cdf[i - 1])
    return torch.cat([x[:1], x[i - 1] + w * (x[i] - x[i - 1]), x[-1:]])


def sqrt_curvature_knots(f: Fn, k: int, lo: float, hi: float) -> torch.Tensor:
    """k+1 knots on [lo, hi] equidistributing sqrt|f''| (autograd f'', trapezoid rule)."""
    x = torch.linspace(lo, hi, 200_001, dtype=F64).requires_grad_(True)
    (g,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    (g2,) = torch.autograd.grad(g.sum(), x)
    rho, x = g2.abs().sqrt(), x.detach()
    cdf = torch.cat([torch.zeros(1, dtype=F64), ((rho[1:] + rho[:-1]) / 2 * x.diff()).cumsum(0)])
    return invert(cdf, x, k)


def equidistributed(f: Fn, k: int, lo: float, hi: float, iters: int = 30) -> torch.Tensor:
    """k+1 knots on [lo, hi] equalising the interpolation error (de Boor: rho = sqrt(E)/h)."""
    knots = torch.linspace(lo, hi, k + 1, dtype=F64)
    for _ in range(iters):
        per_piece = interp_error(f, knots)[1]
        rho = per_piece.clamp(min=1e-12 * per_piece.max().item()).sqrt() / knots.diff()
        knots = invert(torch.cat([rho.new_zeros(1), (rho * knots.diff()).cumsum(0)]), knots, k)
    return knots


def fit_times() -> list[dict]:
    rows = []
    for name in ACTIVATIONS:
        t = time.perf_counter()
        fit = fit_activation(name, tol=1e-3)
        seconds = time.perf_counter() - t
        rows.append(dict(kind="time_tol_1e-3", activation=name, K=fit.pieces,
                         certified=fit.sup_error, seconds=seconds))  # fmt: skip
        print(f"{name:12s} tol=1e-3: K={fit.pieces:4d}  sup_error={fit.sup_error:.3e}  "
              f"{seconds * 1e3:7.1f} ms")  # fmt: skip
    return rows


def fit_table() -> list[dict]:
    rows = []
    print(f"\n{'activation':12s} {'K':>4s} {'certified':>10s} {'dense':>10s} {'ratio':>6s}  span")
    for name in SMOOTH:
        f = activation_function(name)
        for k in KS:
            fit = fit_activation(name, pieces=k)
            dense = dense_error(fit, f)
            span = f"[{fit.knots[0].item():.4g}, {fit.knots[-1].item():.4g}]"
            print(f"{name:12s} {k:4d} {fit.sup_error:10.3e} {dense:10.3e} "
                  f"{fit.sup_error / dense:6.3f}  {span}")  # fmt: skip
            rows.append(dict(kind="fit_R", activation=name, K=k, certified=fit.sup_error,
                             dense=dense))  # fmt: skip
    return rows


def reference_table() -> list[dict]:
    rows = []
    print("\nK = 64 interpolants on [-8, 8] (dense on [-8, 8]; the issue's numbers in brackets)")
    print(f"{'activation':12s} {'uniform':>19s} {'sqrt|f2| knots':>19s} {'de Boor':>9s}"
          f" {'certified on R':>15s}")  # fmt: skip
    for name, (ref_u, ref_e) in REFERENCE.items():
        f = activation_function(name)
        uni = interp_error(f, torch.linspace(-8, 8, 65, dtype=F64))[0]
        curv = interp_error(f, sqrt_curvature_knots(f, 64, -8.0, 8.0))[0]
        boor = interp_error(f, equidistributed(f, 64, -8.0, 8.0))[0]
        ours = fit_activation(name, pieces=64).sup_error
        print(f"{name:12s} {uni:9.2e} ({ref_u:7.1e}) {curv:9.2e} ({ref_e:7.1e}) {boor:9.2e}"
              f" {ours:15.2e}")  # fmt: skip
        for kind, dense, ref in (
            ("uniform_interp_8", uni, ref_u),
            ("sqrt_f2_interp_8", curv, ref_e),
            ("de_boor_interp_8", boor, None),
        ):
            rows.append(dict(kind=kind, activation=name, K=64, dense=dense, reference=ref))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "spline_fit.csv"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    rows = fit_times() + fit_table() + reference_table()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["kind", "activation", "K", "certified", "dense", "reference", "seconds"]
    with args.out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
