"""Issue 10's GPU targets, in one run on a CUDA device (ratios against baselines in the same run).

* the paper's smallCNN, N = 128, float32, TF32 off: all-class A against ``vmap(jacrev)``
  (target: at least as fast, ratio <= 1), A against a per-class ``autograd.grad`` loop
  (<= 1.15), partition codes against one forward pass (<= 2); and A with its rows by tiling
  (``splinelens.affine.rows_by_tiling``, the default on CUDA) against one row per backward
  pass (the default on the CPU);
* the paper's largeCNN (``splinelens.paper.models``), N = 64, C = 100, 3x32x32: A against the
  per-class loop (<= 0.8) and A's peak device memory (<= 2 GB); ``--jacrev-large`` also runs
  ``vmap(jacrev)`` there (about 58 GB).

Run on a GPU machine:

    python bench/bench_gpu.py [--device cuda] [--repeats 5] [--jacrev-large]

``--device cpu --small`` runs the same code at small sizes (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn as nn
from bench_core import baselines, ratio, small_cnn

import splinelens as sl
from splinelens import affine
from splinelens.paper.models import build_model


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak device memory allocated while ``fn`` runs (0 off CUDA)."""
    if device != "cuda":
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def loop(model: nn.Module, x: torch.Tensor, classes: int) -> Callable[[], torch.Tensor]:
    """The per-class ``autograd.grad`` loop for any number of classes."""

    def run() -> torch.Tensor:
        xx = x.detach().requires_grad_()
        y = model(xx)
        rows = [
            torch.autograd.grad(y[:, c].sum(), xx, retain_graph=c < classes - 1)[0]
            for c in range(classes)
        ]
        return torch.stack(rows, 1)

    return run


def tiling(on: bool, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with rows of A by tiling (on) or one row per backward pass (off)."""

    def run() -> object:
        saved = affine.rows_by_tiling
        affine.rows_by_tiling = lambda program, x: on
        try:
            return fn()
        finally:
            affine.rows_by_tiling = saved

    return run


def small_rows(device: str, n: int, repeats: int) -> list[tuple[str, float, str]]:
    model = small_cnn().to(device)
    x = torch.randn(n, 3, 32, 32, device=device)
    base, view = baselines(model, x), sl.SplineView(model, x)
    a = lambda: view.affine_map(x).A  # noqa: E731
    return [
        (f"smallCNN N={n}: A / vmap(jacrev)", ratio(a, base["jacrev"], repeats, device), "<= 1"),
        (f"smallCNN N={n}: A / grad loop", ratio(a, base["grad_loop"], repeats, device), "<= 1.15"),
        (
            f"smallCNN N={n}: codes / forward",
            ratio(lambda: view.partition_codes(x), base["forward"], repeats, device),
            "<= 2",
        ),
        (
            f"smallCNN N={n}: A tiled / A row by row",
            ratio(tiling(True, a), tiling(False, a), repeats, device),
            "",
        ),
    ]


def large_rows(device: str, n: int, classes: int, repeats: int, jacrev: bool) -> list:
    model = build_model("large-cnn", in_channels=3, image_size=32, num_classes=classes)
    model = model.to(device).eval()
    x = torch.randn(n, 3, 32, 32, device=device)
    view = sl.SplineView(model, x)
    a = lambda: view.affine_map(x).A  # noqa: E731
    rows = [
        (
            f"largeCNN N={n} C={classes}: A / grad loop",
            ratio(a, loop(model, x, classes), repeats, device),
            "<= 0.8",
        ),
        (f"largeCNN N={n} C={classes}: A peak GB", peak_bytes(a, device) / 1e9, "<= 2"),
        (
            f"largeCNN N={n} C={classes}: A tiled / A row by row",
            ratio(tiling(True, a), tiling(False, a), repeats, device),
            "",
        ),
        (
            f"largeCNN N={n} C={classes}: A row by row, peak GB",
            peak_bytes(tiling(False, a), device) / 1e9,
            "",
        ),
    ]
    if jacrev:
        jac = lambda: torch.func.vmap(torch.func.jacrev(lambda xi: model(xi[None])[0]))(x)  # noqa: E731
        rows.append((f"largeCNN N={n}: vmap(jacrev) peak GB", peak_bytes(jac, device) / 1e9, ""))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="small sizes: a smoke test")
    ap.add_argument("--jacrev-large", action="store_true")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the setting: TF32 off
    torch.backends.cudnn.allow_tf32 = False
    n_small, n_large, classes = (4, 2, 10) if args.small else (128, 64, 100)
    rows = small_rows(args.device, n_small, args.repeats)
    rows += large_rows(args.device, n_large, classes, args.repeats, args.jacrev_large)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device={args.device} ({name}) torch={torch.__version__}")
    for label, value, target in rows:
        print(f"{label:<48} {value:7.2f}   target {target}", flush=True)


if __name__ == "__main__":
    main()
