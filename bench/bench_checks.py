"""What each per-call check costs at a batch of 1, against one forward pass in the same run.

For the MLP 784-256-256-10 and the paper's smallCNN (float32, 1 thread): the view's check of x
and of the model's structure (its guard, ``_guard``), a map's first-use
check (finite + fingerprint), the fingerprint every later use compares, the view's finiteness
check, and B and the partition codes through a held view. Each time is the median of 9 x 200
calls; printed in microseconds and as a ratio to one forward pass. Run:

    python bench/bench_checks.py
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from bench_core import small_cnn
from bench_small import mlp
from bench_trust import clock

import splinelens as sl


def us(fn: Callable[[], object]) -> float:
    """Median microseconds per call over 9 rounds of 200 calls (``bench_trust.clock``)."""
    return clock(fn, repeats=9, number=200) * 1e6


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch={torch.__version__} threads={torch.get_num_threads()}")
    nets = [
        ("MLP 784-256-256-10", mlp(784, 256, 256, 10), torch.randn(1, 784)),
        ("smallCNN", small_cnn(), torch.randn(1, 3, 32, 32)),
    ]
    for name, model, x in nets:
        view = sl.SplineView(model, x)
        with torch.no_grad():
            forward = us(lambda m=model, x=x: m(x))
        cases = {
            "view's input and structure": lambda v=view, x=x: v.check(x, values=False),
            "map's first-use check": view.tensors.check,
            "fingerprint (later uses)": view.tensors.fingerprint,
            "view's finiteness check": view.tensors.check_finite,
            "B through a held view": lambda v=view, x=x: v.affine_map(x).B,
            "codes through a held view": lambda v=view, x=x: v.partition_codes(x),
        }
        print(f"{name} N=1: forward {forward:.0f} us")
        for what, fn in cases.items():
            t = us(fn)
            print(f"  {what:<28} {t:8.0f} us  {t / forward:6.2f} x forward", flush=True)


if __name__ == "__main__":
    main()
