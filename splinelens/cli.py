"""The ``splinelens`` console command.

    splinelens check [--dtype float64] [--device cpu]   # exactness self-check on a small CNN
    splinelens sweep --dataset fashion-mnist --arch small-cnn --lambdas 0,0.01,0.1,1 \
                     --seeds 15 --epochs 30 --out runs/fmnist [--backend local|ray]
    splinelens plot-sweep runs/fmnist                   # Figure 3 and the significance table
    splinelens demo --out demo                          # every figure on MNIST + report.html
    splinelens analyze --dataset D --arch A --checkpoint W --out DIR   # on your trained model
    splinelens --version

The sweep's options are generated from ``TrainConfig``'s fields (see splinelens.train).

>>> main(["check", "--batch", "2"])  # doctest: +ELLIPSIS
splinelens ...
OK: max |f(x) - (A x + B)| = ...
0
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

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


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field (except lam and seed, which the sweep sets)."""
    from .data import DATASETS
    from .models import MODELS
    from .train import TrainConfig

    choices = {"dataset": sorted(DATASETS), "arch": sorted(MODELS)}
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("lam", "seed"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(
                flag,
                type=type(f.default),
                default=f.default,
                choices=choices.get(f.name),
                help=f"default: {f.default}",
            )


def _sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep
    from .train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    base = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    lambdas = [float(v) for v in args.lambdas.split(",")]
    rows = run_sweep(
        base, lambdas, args.seeds, args.out, args.backend, args.address, args.checkpoints
    )
    done = sum(r["status"] == "finished" for r in rows)
    print(f"{done} finished, {len(rows) - done} failed runs; results in {args.out}/results.csv")
    return 0


def _plot_sweep(args: argparse.Namespace) -> int:
    from .sweep_report import report

    rows = report(args.dir)
    print((Path(args.dir) / "table.md").read_text())
    print(f"wrote {args.dir}/fig3a.png, fig3b.png, table.md, table.csv ({len(rows)} lambdas)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    page = run_demo(args.out, epochs=args.epochs, lam=args.lam)
    print(f"report: {page.resolve()}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .analyze import analyze
    from .train import TrainConfig, load_checkpoint, load_data, make_model

    cfg = TrainConfig(
        dataset=args.dataset,
        arch=args.arch,
        data_dir=args.data_dir,
        batchnorm=args.batchnorm,
        bias=args.bias,
    )
    data = load_data(cfg)
    model = load_checkpoint(make_model(cfg, data), args.checkpoint).eval()
    what = tuple(w.strip() for w in args.what.split(","))
    facts = analyze(model, data, args.out, what, args.n)
    print(f"wrote {', '.join(facts)} into {args.out} (figures as PNG, data as CSV / JSON)")
    return 0


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
    demo = sub.add_parser("demo", help="the paper's figures on MNIST, with report.html")
    demo.add_argument("--out", default="splinelens-demo")
    demo.add_argument("--epochs", type=int, default=2)
    demo.add_argument("--lam", type=float, default=1.0)
    demo.set_defaults(run=_demo)
    from .analyze import ANALYSES
    from .data import DATASETS
    from .models import MODELS

    an = sub.add_parser("analyze", help="the paper's analyses on a trained checkpoint")
    an.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    an.add_argument("--arch", required=True, choices=sorted(MODELS))
    an.add_argument("--checkpoint", required=True, help=".safetensors or .pt state dict")
    an.add_argument("--out", required=True)
    an.add_argument("--what", default=",".join(ANALYSES), help="comma-separated subset")
    an.add_argument("--n", type=int, default=1000, help="test examples to analyse")
    an.add_argument("--data-dir", default="")
    an.add_argument("--batchnorm", action=argparse.BooleanOptionalAction, default=True)
    an.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True)
    an.set_defaults(run=_analyze)
    sweep = sub.add_parser("sweep", help="train one run per (lambda, seed); resumable")
    sweep.add_argument("--lambdas", default="0,0.01,0.1,1", help="comma-separated")
    sweep.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per lambda")
    sweep.add_argument("--out", required=True, help="sweep directory (re-run to resume)")
    sweep.add_argument("--backend", choices=["local", "ray"], default="local")
    sweep.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    sweep.add_argument(
        "--checkpoints",
        action="store_true",
        help="keep each trained model as DIR/runs/<run id>.safetensors",
    )
    _add_train_options(sweep)
    sweep.set_defaults(run=_sweep)
    plot = sub.add_parser("plot-sweep", help="Figure 3 and a Welch t-test table of a sweep")
    plot.add_argument("dir")
    plot.set_defaults(run=_plot_sweep)
    args = ap.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
