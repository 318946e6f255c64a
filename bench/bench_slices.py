"""Exact slice partitions against a dense-grid pattern count measured in the same run.

Three networks in float64 (the issue's anchors, then a CNN that SplineCam cannot take):

* MLP 2-64-64-64-2 (torch.manual_seed(0), default init) on [-3, 3]^2 (SplineCam: 14,439
  regions, about 25 s on 2 CPU cores);
* MLP 784-256-256-10 (seed 0) on the square plane through three Gaussian inputs (SplineCam:
  about 61,700 regions in 100 s; a 2000 x 2000 grid found 55,000 of them in 60 s);
* a small CNN with max-pooling and a residual block, 1x12x12 inputs, on a random plane.

For each: the exact count and time (cold: the first call, capture included; warm: a second
call), and a G x G grid of plane points whose distinct partition codes are counted, with its
time. Also region_radius's cost as units and input size grow. Run:

    python bench/bench_slices.py [--device cpu|cuda] [--grids 500 1000 2000]
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch
import torch.nn as nn

import splinelens as sl


def mlp(*widths: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).double().eval()


class ResidualCNN(nn.Module):
    """conv-ReLU-maxpool, a residual block (conv-ReLU-conv + skip, ReLU), linear to 10."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.c1, self.c2 = nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.stem(x)))
        h = torch.relu(h + self.c2(torch.relu(self.c1(h))))
        return self.fc(h.flatten(1))


def grid_count(part: sl.SlicePartition, model: nn.Module, g: int) -> tuple[int, float]:
    """Distinct partition codes on a g x g grid of the slice's domain, and the seconds taken."""
    u0, u1, v0, v1 = part.bounds
    start = time.perf_counter()
    us, vs = np.linspace(u0, u1, g), np.linspace(v0, v1, g)
    seen: set[bytes] = set()
    rows = max(1, 200_000 // g)
    for i in range(0, g, rows):
        uu, vv = np.meshgrid(us, vs[i : i + rows], indexing="xy")
        x = part.to_input(np.c_[uu.ravel(), vv.ravel()])
        codes = sl.partition_codes(model, x, batch_size=8192)
        keys = np.concatenate(
            [la.data.reshape(len(x), -1).cpu().numpy().view(np.uint8) for la in codes.layers], 1
        )
        seen.update(map(bytes, np.unique(keys, axis=0)))
    return len(seen), time.perf_counter() - start


def case(name: str, model: nn.Module, grids: list[int], **plane) -> None:
    t0 = time.perf_counter()
    sl.slice_partition(model, **plane)
    cold = time.perf_counter() - t0
    part = sl.slice_partition(model, **plane)
    print(f"\n{name}: {len(part)} regions exact; cold {cold:.2f} s, warm {part.seconds:.2f} s")
    print(f"  per layer: {[len(la) for la in part.layers]}")
    for g in grids:
        found, secs = grid_count(part, model, g)
        print(
            f"  grid {g}x{g}: {found} patterns ({found / len(part):.1%}) in {secs:.2f} s; "
            f"grid / exact-warm time = {secs / part.seconds:.1f}x"
        )


def radius_scaling(device: str) -> None:
    print("\nregion_radius, 64 inputs (float64): seconds")
    for d, w in [(64, 64), (256, 64), (784, 64), (784, 256), (784, 1024)]:
        model = mlp(d, w, w, 10).to(device)
        x = torch.randn(64, d, dtype=torch.float64, device=device)
        sl.region_radius(model, x[:2])
        t = time.perf_counter()
        sl.region_radius(model, x)
        print(f"  MLP {d}-{w}-{w}-10: {time.perf_counter() - t:.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--grids", type=int, nargs="+", default=[500, 1000, 2000])
    ap.add_argument("--skip-radius", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    eye = torch.eye(2, dtype=torch.float64, device=dev)
    zero = torch.zeros(2, dtype=torch.float64, device=dev)
    case("MLP 2-64-64-64-2", mlp(2, 64, 64, 64, 2).to(dev), args.grids, origin=zero, directions=eye)
    big = mlp(784, 256, 256, 10).to(dev)
    xs = torch.randn(3, 784, dtype=torch.float64).to(dev)  # after the model's seed-0 init
    case("MLP 784-256-256-10", big, args.grids, points=tuple(xs))
    torch.manual_seed(0)
    cnn = ResidualCNN().double().eval().to(dev)
    g = torch.Generator().manual_seed(1)
    origin = torch.randn(1, 12, 12, generator=g, dtype=torch.float64).to(dev)
    dirs = torch.randn(2, 1, 12, 12, generator=g, dtype=torch.float64).to(dev)
    case(
        "ResidualCNN (max-pool + skip)",
        cnn,
        args.grids,
        origin=origin,
        directions=dirs,
        bounds=(-0.5, 0.5, -0.5, 0.5),
    )
    if not args.skip_radius:
        radius_scaling(args.device)


if __name__ == "__main__":
    main()
