"""The ``splinelens`` console command.

    splinelens check [--dtype float64] [--device cpu]   # exactness self-check on a small CNN
    splinelens sweep --dataset fashion-mnist --arch small-cnn --lambdas 0,0.01,0.1,1 \
                     --seeds 15 --epochs 30 --out runs/fmnist [--backend local|ray]
    splinelens plot-sweep runs/fmnist                   # Figure 3 and the significance table
    splinelens demo --out demo                          # every figure on MNIST + report.html
    splinelens analyze --dataset D --arch A --checkpoint W --out DIR   # on your trained model
    splinelens --version
    splinelens --debug COMMAND ...                      # tracebacks (or SPLINELENS_DEBUG=1)

The sweep's options are generated from ``TrainConfig``'s fields (splinelens.paper.config) and
checked by the same rules as the Python API (the option parsers: splinelens.paper.cli_options).
A user error (a bad option, a missing file) is one line on stderr, ``splinelens: error: ...``,
with exit status 2; an internal error also one line, with status 1; Ctrl-C exits with 130.

>>> main(["check", "--batch", "2"])  # doctest: +ELLIPSIS
splinelens ...
OK: max |f(x) - (A x + B)| = ...
0
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn as nn

from splinelens import __version__
from splinelens.view import SplineView, verify

__all__ = ["main"]


def _example_cnn() -> nn.Module:
    """A small CNN with batchnorm, ReLU, max-pooling and a residual-free head (its own seed:
    the caller's random state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
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
    from splinelens.paper.config import resolve_device

    dtype, device = getattr(torch, args.dtype), resolve_device(args.device)
    model = _example_cnn().to(device, dtype)
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x = x.to(device, dtype)
    view = SplineView(model, x)
    print(f"splinelens {__version__}, torch {torch.__version__}, {device}, {args.dtype}")
    for layer in view.layers:
        print(
            f"  layer {layer.index}: {layer.name:<4} {layer.kind:<11} units={layer.units:<6} "
            f"pieces={layer.pieces}"
        )
    report = verify(model, x)
    print(report)
    return 0 if report.ok else 1


USER_ERRORS = (ValueError, OSError, LookupError, ImportError)  # json errors are ValueErrors


class _UsageError(Exception):
    """A command line that argparse refused (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors end up as one line (``main`` prints them), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message.removeprefix("argument "))


def _sweep(args: argparse.Namespace) -> int:
    from splinelens.paper.config import TrainConfig
    from splinelens.paper.sweep import grid_problem, run_sweep, unfinished

    why = grid_problem(len(args.lambdas), args.seeds)
    if why:
        raise ValueError(f"--seeds/--lambdas: {why}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    base = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    rows = run_sweep(
        base, args.lambdas, args.seeds, args.out, args.backend, args.address, args.checkpoints
    )
    done = sum(r["status"] == "finished" for r in rows)
    busy = len(unfinished(base, args.lambdas, args.seeds, args.out))
    print(
        f"{done} finished, {len(rows) - done} failed, {busy} running in other processes; "
        f"results in {args.out}/results.csv"
    )
    return 0


def _plot_sweep(args: argparse.Namespace) -> int:
    from splinelens.paper.report import report

    rows = report(args.dir)
    print((Path(args.dir) / "table.md").read_text())
    figs = "fig3a.png, fig3b.png (their data: fig3a.csv, fig3b.csv)"
    print(f"wrote {args.dir}/{figs}, table.md, table.csv ({len(rows)} lambdas)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from splinelens.paper.demo import run_demo

    page = run_demo(args.out, epochs=args.epochs, lam=args.lam)
    print(f"report: {page.resolve()}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from splinelens.paper.analyze import analyze
    from splinelens.paper.config import TrainConfig
    from splinelens.paper.records import checkpoint_source
    from splinelens.paper.train import load_checkpoint, load_data, make_model

    cfg = TrainConfig(
        dataset=args.dataset,
        arch=args.arch,
        data_dir=args.data_dir,
        batchnorm=args.batchnorm,
        bias=args.bias,
    )
    data = load_data(cfg)
    model = load_checkpoint(make_model(cfg, data), args.checkpoint).eval()
    expect = {k: getattr(cfg, k) for k in ("dataset", "arch", "batchnorm", "bias")}
    source, lam = checkpoint_source(args.checkpoint, expect)  # (the data it was trained on)
    facts = analyze(model, data, args.out, args.what, args.n, lam=lam, source=source)
    print(f"wrote {', '.join(facts)} into {args.out} (figures as PNG, data as CSV / JSON)")
    return 0


def _parser() -> argparse.ArgumentParser:
    from splinelens.paper import cli_options as opt

    ap = _Parser(
        prog="splinelens", description="Exact spline views of piecewise-affine PyTorch networks."
    )
    ap.add_argument("--version", action="version", version=f"splinelens {__version__}")
    ap.add_argument(
        "--debug", action="store_true", help="show tracebacks (also: SPLINELENS_DEBUG=1)"
    )
    sub = ap.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="verify f(x) = A[x] x + B[x] on a small CNN")
    check.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    check.add_argument("--device", type=opt.device, default="cpu", help="default: cpu")
    check.add_argument("--batch", type=opt.count, default=8)
    check.set_defaults(run=_check)
    demo = sub.add_parser("demo", help="the paper's figures on MNIST, with report.html")
    demo.add_argument("--out", type=opt.out_dir, default="splinelens-demo", help="output folder")
    demo.add_argument(
        "--epochs", type=opt.field_option("epochs"), default=2, help="epochs of each model"
    )
    demo.add_argument(
        "--lam", type=opt.positive_lam, default=1.0, help="penalty weight of the second model"
    )
    demo.set_defaults(run=_demo)
    _add_analyze(sub)
    _add_sweep(sub)
    plot = sub.add_parser("plot-sweep", help="Figure 3 and a Welch t-test table of a sweep")
    plot.add_argument("dir", type=opt.existing("directory"))
    plot.set_defaults(run=_plot_sweep)
    return ap


def _add_analyze(sub: Any) -> None:
    from splinelens.paper import cli_options as opt
    from splinelens.paper.analyze import ANALYSES
    from splinelens.paper.data import DATASETS
    from splinelens.paper.models import MODELS

    an = sub.add_parser("analyze", help="the paper's analyses on a trained checkpoint")
    an.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    an.add_argument("--arch", required=True, choices=sorted(MODELS))
    an.add_argument(
        "--checkpoint", required=True, type=opt.existing("file"), help=".safetensors or .pt"
    )
    an.add_argument("--out", required=True, type=opt.out_dir)
    an.add_argument(
        "--what", type=opt.analyses, default=",".join(ANALYSES), help="comma-separated subset"
    )
    an.add_argument("--n", type=opt.count, default=1000, help="test examples to analyse")
    an.add_argument("--data-dir", type=opt.data_dir, default="")
    an.add_argument("--batchnorm", action=argparse.BooleanOptionalAction, default=True)
    an.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True)
    an.set_defaults(run=_analyze)


def _add_sweep(sub: Any) -> None:
    from splinelens.paper import cli_options as opt

    sweep = sub.add_parser("sweep", help="train one run per (lambda, seed); resumable, shareable")
    sweep.add_argument(
        "--lambdas", type=opt.lambdas, default="0,0.01,0.1,1", help="comma-separated"
    )
    sweep.add_argument("--seeds", type=opt.count, default=5, help="seeds 0..N-1 per lambda")
    sweep.add_argument(
        "--out", required=True, type=opt.sweep_dir, help="sweep directory (re-run to resume)"
    )
    sweep.add_argument("--backend", choices=["local", "ray"], default="local")
    sweep.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    sweep.add_argument(
        "--checkpoints",
        action="store_true",
        help="keep each trained model as DIR/runs/<run id>.safetensors",
    )
    opt.add_train_options(sweep)
    sweep.set_defaults(run=_sweep)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``splinelens`` command; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except _UsageError as e:
        return _fail(str(e), 2)
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    debug = args.debug or os.environ.get("SPLINELENS_DEBUG") == "1"
    with warnings.catch_warnings():
        warnings.showwarning = _warning_line
        try:
            return args.run(args)
        except (Exception, KeyboardInterrupt) as e:
            if debug:
                raise
            return _fail(*_verdict(e))


def _verdict(e: BaseException) -> tuple[str, int]:
    """The one-line message and exit status of an exception that ended a command.

    >>> _verdict(FileNotFoundError(2, "No such file or directory", "w.pt"))
    ('w.pt: No such file or directory', 2)
    >>> _verdict(ZeroDivisionError("division by zero"))[1]
    1
    """
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    elif isinstance(e, KeyError) and len(e.args) == 1:
        text = str(e.args[0])
    else:
        text = str(e) or type(e).__name__
    if isinstance(e, USER_ERRORS):
        return text, 2
    return f"internal error: {type(e).__name__}: {text} (run with --debug for the traceback)", 1


def _fail(message: str, status: int) -> int:
    print(f"splinelens: error: {' '.join(message.split())}", file=sys.stderr)
    return status


def _warning_line(message: Warning | str, *args: object, **kwargs: object) -> None:
    """Warnings as one line each on stderr, like errors."""
    print(f"splinelens: warning: {' '.join(str(message).split())}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
