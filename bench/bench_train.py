"""Training throughput: with the eq. (13) penalty against without, and splinelens's training
loop against a plain PyTorch loop with the same model and batch (ratios measured in one run).

    python bench/bench_train.py [--arch small-cnn] [--device cpu|cuda] [--steps 30]

Targets (issue 3): with penalty >= 0.97x the throughput without; on a GPU, large-cnn on
CIFAR-sized input at the plain loop's speed.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

import torch
import torch.nn.functional as F
from bench_core import clock

from splinelens.paper.config import TrainConfig
from splinelens.paper.data import Data
from splinelens.paper.models import build_model
from splinelens.paper.train import train_epoch
from splinelens.penalty import orthogonality_penalty


def fake_data(n: int, shape: tuple[int, int, int], device: str) -> Data:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Data("bench", x, y, x[:10], y[:10], [str(i) for i in range(10)]).to(device)


def plain_epoch(
    model: torch.nn.Module, opt: torch.optim.Optimizer, data: Data, batch: int, lam: float
) -> None:
    """The reference: the loop anyone would write, penalty included."""
    model.train()
    perm = torch.randperm(len(data.train_y), device=data.train_y.device)
    for idx in perm.split(batch):
        loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
        loss = loss + lam * orthogonality_penalty(model.classifier.weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="small-cnn")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=30, help="batches per timed epoch")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    data = fake_data(args.steps * args.batch, (3, args.size, args.size), args.device)
    model = build_model(args.arch, 3, args.size, 10).to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    cfg = TrainConfig(batch_size=args.batch, progress=False)
    dev = torch.device(args.device)
    ours = {
        lam: (lambda lam=lam: train_epoch(model, opt, data, replace(cfg, lam=lam), gen, dev))
        for lam in (0.0, 0.1)
    }
    plain = lambda: plain_epoch(model, opt, data, args.batch, 0.1)  # noqa: E731
    for fn in (*ours.values(), plain):
        fn()  # warm-up
    pen, loop = [], []
    for _ in range(args.repeats):  # back to back each repeat: noise hits both alike
        t0, t1, tp = (
            clock(ours[0.0], args.device),
            clock(ours[0.1], args.device),
            clock(plain, args.device),
        )
        pen.append(t0 / t1)
        loop.append(tp / t1)
    print(f"device={args.device} arch={args.arch} batch={args.batch} steps={args.steps}")
    print(
        f"throughput with penalty / without          {statistics.median(pen):5.3f}  target >= 0.97"
    )
    print(f"throughput splinelens loop / plain loop    {statistics.median(loop):5.3f}  target ~1.0")


if __name__ == "__main__":
    main()
