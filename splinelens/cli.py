"""The ``splinelens`` console command.

    splinelens check [--dtype float64] [--device cpu]   # exactness self-check on a small CNN
    splinelens sweep --dataset fashion-mnist --arch small-cnn --lambdas 0,0.01,0.1,1 \
                     --seeds 15 --epochs 30 --out runs/fmnist [--backend local|ray]
    splinelens plot-sweep runs/fmnist                   # Figure 3 and the significance table
    splinelens demo --out demo                          # every figure on MNIST + report.html
    splinelens analyze --dataset D --arch A --checkpoint W --out DIR   # on your trained model
    splinelens --version
    splinelens --debug COMMAND ...                      # tracebacks (or SPLINELENS_DEBUG=1)

The sweep's options are generated from ``TrainConfig``'s fields (see splinelens.paper.train), and
checked by the same rules as the Python API. A user error (a bad option, a missing file) is one
line on stderr, ``splinelens: error: ...``, with exit status 2; an internal error also one line,
with status 1; Ctrl-C exits with 130.

>>> main(["check", "--batch", "2"])  # doctest: +ELLIPSIS
splinelens ...
OK: max |f(x) - (A x + B)| = ...
0
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn as nn

from splinelens import __version__
from splinelens.view import SplineView, verify


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
    from splinelens.paper.train import resolve_device

    dtype, device = getattr(torch, args.dtype), resolve_device(args.device)
    model = _example_cnn().to(device, dtype)
    x = torch.randn(args.batch, 3, 32, 32, device=device, dtype=dtype)
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
_LAMBDAS = "expected comma-separated non-negative numbers such as 0,0.01,0.1"


class _UsageError(Exception):
    """A command line that argparse refused (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors end up as one line (``main`` prints them), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message.removeprefix("argument "))


def _lambdas(text: str) -> list[float]:
    """``--lambdas``: distinct finite non-negative numbers, comma-separated.

    >>> _lambdas("0, 0.01,1")
    [0.0, 0.01, 1.0]
    >>> _lambdas("0,,1")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: an empty value in '0,,1'; expected comma-separated ...
    """
    if not text.strip():
        raise argparse.ArgumentTypeError(f"no values; {_LAMBDAS}")
    values: list[float] = []
    items = [t.strip() for t in text.split(",")]
    for item in items:
        value = _lambda(item, text)
        if value in values:
            same = items[values.index(value)]
            how = "appears twice" if same == item else f"equals {same!r} as a number"
            raise argparse.ArgumentTypeError(f"{item!r} {how} in {text!r}; {_LAMBDAS}")
        values.append(value)
    return values


def _lambda(item: str, text: str) -> float:
    """One value of ``--lambdas`` (the whole ``text`` is quoted in errors)."""
    from splinelens.paper.train import parse_number

    if not item:
        raise argparse.ArgumentTypeError(f"an empty value in {text!r}; {_LAMBDAS}")
    try:
        value = parse_number(item)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{item!r} is not a number; {_LAMBDAS}") from None
    if not math.isfinite(value) or value < 0:
        why = "negative" if value < 0 else "not finite"
        raise argparse.ArgumentTypeError(f"{item!r} is {why}; {_LAMBDAS}")
    return value + 0.0  # -0.0 is 0.0 (and the same run id)


def _count(text: str) -> int:
    """A positive integer that fits a C int, in plain digits (``--seeds``, ``--n``, ``--batch``).

    >>> _count("3")
    3
    >>> _count("1_000")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected an integer >= 1 and <= 2147483647, got '1_000'
    """
    from splinelens.paper.train import INT_MAX, parse_number

    try:
        value = parse_number(text, int)
    except ValueError:
        value = 0
    if not 1 <= value <= INT_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 and <= {INT_MAX}, got {text!r}")
    return value


def _field(name: str) -> Callable[[str], Any]:
    """The option parser of TrainConfig field ``name``: the rules of ``train.field_value``."""
    from splinelens.paper.train import field_value

    def parse(text: str) -> Any:
        try:
            return field_value(name, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _device(text: str) -> str:
    """``--device``: "auto" or a device that this machine has (the rules of
    ``train.resolve_device``), checked before any work starts.

    >>> _device("cpu")
    'cpu'
    """
    from splinelens.paper.train import resolve_device

    try:
        resolve_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"device {text!r}: ")) from None
    return text


def _out_dir(text: str) -> str:
    """``--out``: a directory that exists or can be created, and that we can write into."""
    path = Path(text).absolute()
    if not text:
        raise argparse.ArgumentTypeError("expected a directory path, got ''")
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; expected a directory")
    base = next(p for p in (path, *path.parents) if p.exists())
    if not base.is_dir():
        raise argparse.ArgumentTypeError(f"{base} is a file, so {text} cannot be a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{base} is not writable; expected a directory you own")
    return text


def _sweep_dir(text: str) -> str:
    """``sweep --out``: an ``--out`` directory in which runs/, sweep.json and results.csv can be
    written (not a file runs, nor a directory results.csv)."""
    from splinelens.paper.sweep import out_problem

    why = out_problem(_out_dir(text))
    if why:
        raise argparse.ArgumentTypeError(why)
    return text


def _data_dir(text: str) -> str:
    """``--data-dir``: "" (the dataset's default) or an existing directory or archive; part of
    a run's id, so a path that does not exist is refused even where a dataset ignores it."""
    if text and not Path(text).exists():
        raise argparse.ArgumentTypeError(
            f"{text}: not found; expected an existing directory or archive"
        )
    return text


def _existing(kind: str) -> Callable[[str], str]:
    """A path that must already exist as a ``kind`` ("file" or "directory")."""

    def parse(text: str) -> str:
        path = Path(text)
        ok = path.is_file() if kind == "file" else path.is_dir()
        if not ok:
            what = "not found" if not path.exists() else f"not a {kind}"
            raise argparse.ArgumentTypeError(f"{text}: {what}; expected an existing {kind}")
        return text

    return parse


def _analyses(text: str) -> tuple[str, ...]:
    """``--what``: a comma-separated subset of the analyses."""
    from splinelens.paper.analyze import ANALYSES

    what = tuple(w.strip() for w in text.split(","))
    bad = [w for w in what if w not in ANALYSES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"{bad[0]!r} is not an analysis; expected a comma-separated subset of "
            + ",".join(ANALYSES)
        )
    return what


_OPTION_TYPES: dict[str, Callable[[str], Any]] = {  # text fields with rules
    "device": _device,
    "data_dir": _data_dir,
}


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field (except lam and seed, which the sweep sets)."""
    from splinelens.paper.data import DATASETS
    from splinelens.paper.models import MODELS
    from splinelens.paper.train import TrainConfig

    choices = {"dataset": sorted(DATASETS), "arch": sorted(MODELS)}
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("lam", "seed"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            plain = str if isinstance(f.default, str) else _field(f.name)
            kind = _OPTION_TYPES.get(f.name, plain)
            p.add_argument(
                flag,
                type=kind,
                default=f.default,
                choices=choices.get(f.name),
                help=f"default: {f.default}",
            )


def _sweep(args: argparse.Namespace) -> int:
    from splinelens.paper.sweep import grid_problem, run_sweep, unfinished
    from splinelens.paper.train import TrainConfig

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
    print(f"wrote {args.dir}/fig3a.png, fig3b.png, table.md, table.csv ({len(rows)} lambdas)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from splinelens.paper.demo import run_demo

    page = run_demo(args.out, epochs=args.epochs, lam=args.lam)
    print(f"report: {page.resolve()}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from splinelens.paper.analyze import analyze
    from splinelens.paper.train import TrainConfig, load_checkpoint, load_data, make_model

    cfg = TrainConfig(
        dataset=args.dataset,
        arch=args.arch,
        data_dir=args.data_dir,
        batchnorm=args.batchnorm,
        bias=args.bias,
    )
    data = load_data(cfg)
    model = load_checkpoint(make_model(cfg, data), args.checkpoint).eval()
    facts = analyze(model, data, args.out, args.what, args.n)
    print(f"wrote {', '.join(facts)} into {args.out} (figures as PNG, data as CSV / JSON)")
    return 0


def _parser() -> argparse.ArgumentParser:
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
    check.add_argument("--device", type=_device, default="cpu", help="default: cpu")
    check.add_argument("--batch", type=_count, default=8)
    check.set_defaults(run=_check)
    demo = sub.add_parser("demo", help="the paper's figures on MNIST, with report.html")
    demo.add_argument("--out", type=_out_dir, default="splinelens-demo")
    demo.add_argument("--epochs", type=_field("epochs"), default=2)
    demo.add_argument("--lam", type=_field("lam"), default=1.0)
    demo.set_defaults(run=_demo)
    _add_analyze(sub)
    _add_sweep(sub)
    plot = sub.add_parser("plot-sweep", help="Figure 3 and a Welch t-test table of a sweep")
    plot.add_argument("dir", type=_existing("directory"))
    plot.set_defaults(run=_plot_sweep)
    return ap


def _add_analyze(sub: Any) -> None:
    from splinelens.paper.analyze import ANALYSES
    from splinelens.paper.data import DATASETS
    from splinelens.paper.models import MODELS

    an = sub.add_parser("analyze", help="the paper's analyses on a trained checkpoint")
    an.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    an.add_argument("--arch", required=True, choices=sorted(MODELS))
    an.add_argument(
        "--checkpoint", required=True, type=_existing("file"), help=".safetensors or .pt"
    )
    an.add_argument("--out", required=True, type=_out_dir)
    an.add_argument(
        "--what", type=_analyses, default=",".join(ANALYSES), help="comma-separated subset"
    )
    an.add_argument("--n", type=_count, default=1000, help="test examples to analyse")
    an.add_argument("--data-dir", type=_data_dir, default="")
    an.add_argument("--batchnorm", action=argparse.BooleanOptionalAction, default=True)
    an.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True)
    an.set_defaults(run=_analyze)


def _add_sweep(sub: Any) -> None:
    sweep = sub.add_parser("sweep", help="train one run per (lambda, seed); resumable, shareable")
    sweep.add_argument("--lambdas", type=_lambdas, default="0,0.01,0.1,1", help="comma-separated")
    sweep.add_argument("--seeds", type=_count, default=5, help="seeds 0..N-1 per lambda")
    sweep.add_argument(
        "--out", required=True, type=_sweep_dir, help="sweep directory (re-run to resume)"
    )
    sweep.add_argument("--backend", choices=["local", "ray"], default="local")
    sweep.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    sweep.add_argument(
        "--checkpoints",
        action="store_true",
        help="keep each trained model as DIR/runs/<run id>.safetensors",
    )
    _add_train_options(sweep)
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
