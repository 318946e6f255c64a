"""The ``splinelens`` console command.

    splinelens check [--dtype float64] [--device cpu]   # exactness self-check on a small CNN
    splinelens --version

>>> main(["check", "--batch", "2"])  # doctest: +ELLIPSIS
splinelens ...
OK: max |f(x) - (A x + B)| = ...
0
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
import torch.nn as nn

from . import __version__
from .view import SplineView, verify


def _example_cnn() -> nn.Module:
    """A small CNN with batchnorm, ReLU, max-pooling and a residual-free head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    ).eval()


def _check(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype)
    model = _example_cnn().to(args.device, dtype)
    x = torch.randn(args.batch, 3, 32, 32, device=args.device, dtype=dtype)
    view = SplineView(model, x)
    print(f"splinelens {__version__}, torch {torch.__version__}, {args.device}, {args.dtype}")
    for layer in view.layers:
        print(
            f"  layer {layer.index}: {layer.name:<4} {layer.kind:<11} units={layer.units:<6} "
            f"pieces={layer.pieces}"
        )
    report = verify(model, x)
    print(report)
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``splinelens`` command; returns the exit status."""
    ap = argparse.ArgumentParser(
        prog="splinelens", description="Exact spline views of piecewise-affine PyTorch networks."
    )
    ap.add_argument("--version", action="version", version=f"splinelens {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="verify f(x) = A[x] x + B[x] on a small CNN")
    check.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    check.add_argument("--device", default="cpu")
    check.add_argument("--batch", type=int, default=8)
    check.set_defaults(run=_check)
    args = ap.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
