"""Cost of the checks every call makes (issue 9), against one forward pass in the same run.

A capture is valid while the model's structure is unchanged (``splinelens._structure``); every
call compares it, checks eval mode, the inputs' finiteness and the parameters' (re-checked only
after they change). Target: the structure check under 2% of one forward pass of the paper's
smallCNN at N = 128 (3x32x32, float32). Run:

    python bench/bench_trust.py [--repeats 21] [--batch 128]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from bench_core import small_cnn

import splinelens as sl
from splinelens._structure import structure


def clock(fn: Callable[[], object], repeats: int, number: int) -> float:
    """Median seconds per call over ``repeats`` rounds of ``number`` calls (after a warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    model, x = small_cnn(), torch.randn(args.batch, 3, 32, 32)
    view = sl.SplineView(model, x)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    fwd = clock(forward, args.repeats, 3)
    rows = {
        "structure check": clock(lambda: structure(model), args.repeats, 200),
        "every check of a call (view.check)": clock(lambda: view.check(x), args.repeats, 50),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N = {args.batch}")
    print(f"one forward pass: {fwd * 1e3:.2f} ms")
    print("| what | time | / forward |\n|---|---|---|")
    for name, t in rows.items():
        print(f"| {name} | {t * 1e6:.0f} us | {100 * t / fwd:.2f}% |")


if __name__ == "__main__":
    main()
