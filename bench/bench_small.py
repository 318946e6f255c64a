"""Speed where Python overhead dominates: batches of 1 and 8 on the CPU (issue 10).

The paper's smallCNN (3x32x32) and an MLP 784-256-256-10, float32, each measure a ratio against
a baseline run back to back in the same repeat (median over repeats):

* partition codes / one forward pass (target <= 3);
* B / one forward pass (target <= 4);
* A (all classes) / a per-class ``autograd.grad`` loop (target <= 1.5), and A / ``vmap(jacrev)``
  (target < 1).

Each splinelens call goes through a held ``SplineView`` (its per-call checks included); two
rows per case show codes and B from ``Program.record`` / ``Program.frozen`` alone, without the
checks (what the executors cost), and one row the checks alone: the structure check (its
guard) and the finiteness of x and of every weight, which each call pays (the floor under the
codes' ratio).
Run:

    python bench/bench_small.py [--repeats 30] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn
from bench_core import baselines, small_cnn

import splinelens as sl
from splinelens.view import layer_codes


def mlp(*widths: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def ratio(ours: Callable[[], object], base: Callable[[], object], repeats: int) -> float:
    """Median of time(ours) / time(base); each timing is the best of 5 back-to-back calls."""

    def best(fn: Callable[[], object]) -> float:
        out = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return min(out)

    ours(), base()
    return statistics.median(best(ours) / best(base) for _ in range(repeats))


def unchecked(view: sl.SplineView, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Codes and B from the program's executors alone, without the per-call checks."""
    prog = view.program
    last = prog.layers[-1].step

    def codes() -> object:
        with torch.no_grad():
            return layer_codes(prog, prog.record(x, stop=last)[1], len(x))

    def offsets() -> object:
        with torch.no_grad():
            values, states = prog.record(x)
            zero = torch.zeros_like(values[prog.input_name])
            return prog.frozen(x, states, at={prog.input_name: zero})[prog.output_name]

    def checks() -> None:  # what every codes call adds: structure (guard), x and weights finite
        view.check(x, values=False)
        bool(torch.stack([x.sum(), *view.tensors.sums()]).isfinite().all())

    return {"codes": codes, "B": offsets, "checks": checks}


def rows(name: str, model: nn.Module, shape: tuple[int, ...], n: int, repeats: int) -> list:
    x = torch.randn(n, *shape)
    base = baselines(model, x)
    view = sl.SplineView(model, x)
    bare = unchecked(view, x)
    cases = [  # (measure, ours, baseline, target)
        ("codes / forward", lambda: view.partition_codes(x), "forward", "<= 3"),
        ("B / forward", lambda: view.affine_map(x).B, "forward", "<= 4"),
        ("A / grad loop", lambda: view.affine_map(x).A, "grad_loop", "<= 1.5"),
        ("A / vmap(jacrev)", lambda: view.affine_map(x).A, "jacrev", "< 1"),
        ("codes, no checks / forward", bare["codes"], "forward", "(executor)"),
        ("B, no checks / forward", bare["B"], "forward", "(executor)"),
        ("per-call checks alone / forward", bare["checks"], "forward", "(floor)"),
    ]
    return [
        (f"{name} N={n}: {what}", ratio(ours, base[b], repeats), target)
        for what, ours, b, target in cases
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    torch.set_num_threads(1)
    nets = [
        ("smallCNN", small_cnn(), (3, 32, 32)),
        ("MLP 784-256-256-10", mlp(784, 256, 256, 10), (784,)),
    ]
    print(f"torch={torch.__version__} threads={torch.get_num_threads()}")
    for (name, model, shape), n in itertools.product(nets, args.batches):
        for label, value, target in rows(name, model, shape, n, args.repeats):
            print(f"{label:<48} {value:6.2f}   target {target}", flush=True)


if __name__ == "__main__":
    main()
