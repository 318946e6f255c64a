"""Speed of the foundation against baselines measured in the same run (ratios, not seconds).

The paper's smallCNN (3x3 convs 32/64, 1x1 conv 128, batchnorm, ReLU, 2x2 max-pooling, linear to
10 classes) on 3x32x32 inputs, float32. Run:

    python bench/bench_core.py [--device cpu|cuda] [--repeats 5] [--db 20000]

Targets (issue 2): templates >= 3x faster than vmap(jacrev) and <= 1.15x a per-class
autograd.grad loop; B alone <= 4x one forward pass; codes for 512 inputs <= 2x one forward pass;
exact top-k within 1.5x of FAISS IndexBinaryFlat on the same bits.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

import splinelens as sl


def small_cnn() -> nn.Module:
    def block(cin: int, cout: int, k: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, k, padding=k // 2),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    torch.manual_seed(0)
    model = nn.Sequential(
        *block(3, 32, 3),
        *block(32, 64, 3),
        *block(64, 128, 1),
        nn.Flatten(),
        nn.Linear(128 * 4 * 4, 10),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def clock(fn: Callable[[], object], device: str) -> float:
    """Seconds one call of ``fn`` takes, the device's queue drained before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def ratio(
    ours: Callable[[], object], base: Callable[[], object], repeats: int, device: str
) -> float:
    """Median over repeats of time(ours) / time(base), the two run back to back each repeat
    (so that a shared, noisy machine slows both alike). One warm-up call each first."""
    ours(), base()
    return statistics.median(clock(ours, device) / clock(base, device) for _ in range(repeats))


def baselines(model: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    def jacrev() -> torch.Tensor:
        return torch.func.vmap(torch.func.jacrev(lambda xi: model(xi[None])[0]))(x)

    def grad_loop() -> torch.Tensor:
        xx = x.detach().requires_grad_()
        y = model(xx)
        rows = [torch.autograd.grad(y[:, c].sum(), xx, retain_graph=c < 9)[0] for c in range(10)]
        return torch.stack(rows, 1)

    return {"forward": forward, "jacrev": jacrev, "grad_loop": grad_loop}


def bench_maps(model: nn.Module, device: str, repeats: int) -> list[tuple[str, float, str]]:
    x = torch.randn(128, 3, 32, 32, device=device)
    x512 = torch.randn(512, 3, 32, 32, device=device)
    base, base512 = baselines(model, x), baselines(model, x512)
    view = sl.SplineView(model, x)
    a = lambda: view.affine_map(x).A  # noqa: E731
    return [
        (
            "vmap(jacrev) / templates A (speed-up)",
            1 / ratio(a, base["jacrev"], repeats, device),
            ">= 3",
        ),
        (
            "templates A / per-class grad loop",
            ratio(a, base["grad_loop"], repeats, device),
            "<= 1.15",
        ),
        (
            "B alone / one forward (128)",
            ratio(lambda: view.affine_map(x).B, base["forward"], repeats, device),
            "<= 4",
        ),
        (
            "codes / one forward (512)",
            ratio(lambda: view.partition_codes(x512), base512["forward"], repeats, device),
            "<= 2",
        ),
    ]


def bench_topk(model: nn.Module, device: str, repeats: int, n_db: int) -> list:
    try:
        import faiss
    except ImportError:
        print("faiss is not installed here: the top-k row is skipped")
        return []

    g = torch.Generator().manual_seed(0)
    xs = torch.randn(n_db, 3, 32, 32, generator=g).to(device)
    view = sl.SplineView(model, xs[:2])
    db = view.partition_codes(xs, batch_size=512)
    query = db[:200]
    layer = 4  # the third ReLU: 128 x 8 x 8 = 8192 units, 1 KiB per code
    bits_db = db.layers[layer].data.cpu().numpy()
    bits_q = query.layers[layer].data.cpu().numpy()

    def raw_faiss() -> object:
        index = faiss.IndexBinaryFlat(bits_db.shape[1] * 8)
        index.add(bits_db)
        return index.search(bits_q, 16)

    ours = lambda: sl.nearest_neighbors(query, db, layer=layer, k=16)  # noqa: E731
    r = ratio(ours, raw_faiss, repeats, device)
    d_ours, _ = sl.nearest_neighbors(query, db, layer=layer, k=16)
    d_faiss = raw_faiss()[0] / db.layers[layer].units
    assert np.allclose(d_ours.cpu().numpy(), d_faiss), "top-k distances differ from FAISS"
    return [(f"top-16, 200 queries, {n_db} codes / FAISS IndexBinaryFlat", r, "<= 1.5")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--db", type=int, default=20000, help="database size for top-k")
    args = ap.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # splinelens must switch it off itself
        torch.backends.cudnn.allow_tf32 = True
    model = small_cnn().to(args.device)
    rows = bench_maps(model, args.device, args.repeats)
    rows += bench_topk(model, args.device, args.repeats, args.db)
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    for name, value, target in rows:
        print(f"{name:<58} {value:6.2f}   target {target}")


if __name__ == "__main__":
    main()
