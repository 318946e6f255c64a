"""Speed of splinified networks (issue 11): the spline forward and the codes, on the CPU.

Two networks people train with smooth activations, float32, splinified at tol 1e-3:
a GELU MLP 784-256-256-10 and the paper's smallCNN with tanh in place of ReLU (3x32x32).
Each ratio is the median over repeats of two timings run back to back (bench_core.ratio):

* splinified forward / original forward (target <= 3);
* partition codes of the splinified network / its forward (target <= 2), through a held
  ``SplineView`` (its per-call checks included) and from the program's executor alone.

Run:

    python bench/bench_splinify.py [--repeats 20] [--batches 1 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn as nn
from bench_core import ratio, small_cnn
from bench_small import unchecked

import splinelens as sl


def gelu_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
        nn.Linear(256, 10),
    ).eval()  # fmt: skip


def tanh_cnn() -> nn.Module:
    model = small_cnn()
    for i, m in enumerate(model):
        if isinstance(m, nn.ReLU):
            model[i] = nn.Tanh()
    return model.eval()


def rows(name: str, model: nn.Module, shape: tuple[int, ...], n: int, repeats: int) -> list:
    x = torch.randn(n, *shape)
    splined = sl.splinify(model, tol=1e-3)
    view = sl.SplineView(splined, x)
    bare = unchecked(view, x)

    def forward(m: nn.Module):
        def run() -> object:
            with torch.no_grad():
                return m(x)

        return run

    cases = [
        ("splinified forward / forward", forward(splined), forward(model), "<= 3"),
        ("codes / splinified forward", lambda: view.partition_codes(x), forward(splined), "<= 2"),
        ("codes, no checks / splinified fwd", bare["codes"], forward(splined), "(executor)"),
    ]
    return [(f"{name} N={n}: {w}", ratio(a, b, repeats, "cpu"), t) for w, a, b, t in cases]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 128])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    nets = [("GELU MLP", gelu_mlp(), (784,)), ("tanh smallCNN", tanh_cnn(), (3, 32, 32))]
    print(f"torch={torch.__version__} threads={torch.get_num_threads()}")
    for (name, model, shape), n in itertools.product(nets, args.batches):
        for label, value, target in rows(name, model, shape, n, args.repeats):
            print(f"{label:<52} {value:6.2f}   target {target}", flush=True)


if __name__ == "__main__":
    main()
