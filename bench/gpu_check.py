"""Correctness on a CUDA device against the same calls on the CPU: slices, region radii, A
(rows by tiling there), layer MASOs.

Run on a GPU machine: ``python bench/gpu_check.py``. Prints one line per check and exits 1 if
any fails. float64 throughout, with TF32 left at PyTorch's defaults (splinelens turns it off).
"""

from __future__ import annotations

import sys
import time

import torch
from bench_slices import ResidualCNN, mlp

import splinelens as sl

sys.path.insert(0, ".")
from tests import zoo

torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
failures = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'OK  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        failures.append(name)


def main() -> None:
    dev = torch.device("cuda")
    eye = torch.eye(2, dtype=torch.float64)
    t = time.perf_counter()
    part = sl.slice_partition(mlp(2, 64, 64, 64, 2).to(dev), torch.zeros(2).to(dev), eye.to(dev))
    check("anchor MLP slice on cuda", len(part) == 14439, f"{len(part)} regions")
    print(f"     {time.perf_counter() - t:.2f} s cold, then", flush=True)
    for name in ["small_cnn", "resnet", "maxout", "mixed_activations", "rnn"]:
        cpu = zoo.build(name)
        gpu = zoo.build(name).to(dev)
        x = zoo.inputs(name, n=8)
        r_cpu, r_gpu = sl.region_radius(cpu, x), sl.region_radius(gpu, x.to(dev)).cpu()
        err = ((r_cpu - r_gpu).abs() / r_cpu).max().item()
        check(f"region_radius cuda == cpu [{name}]", err < 1e-8, f"max rel diff {err:.2e}")
        g = torch.Generator().manual_seed(0)
        o = torch.randn(zoo.ZOO[name][1], generator=g, dtype=torch.float64)
        d = torch.randn(2, *zoo.ZOO[name][1], generator=g, dtype=torch.float64)
        h = 0.2 if o.numel() > 50 else 1.0
        b = (-h, h, -h, h)
        n_cpu = len(sl.slice_partition(cpu, o, d, b))
        n_gpu = len(sl.slice_partition(gpu, o.to(dev), d.to(dev), b))
        check(f"slice count cuda == cpu [{name}]", n_cpu == n_gpu, f"{n_cpu} vs {n_gpu}")
        a_cpu, a_gpu = sl.affine_map(cpu, x).A, sl.affine_map(gpu, x.to(dev)).A.cpu()
        err = (a_cpu - a_gpu).abs().max().item()  # on cuda: rows of A by tiling, if not vmapped
        check(f"A cuda == cpu [{name}]", err < 1e-10, f"max abs diff {err:.1e}")
        masos = sl.check_masos(gpu, x.to(dev))
        check(
            f"layer MASOs on cuda [{name}]",
            masos.max_abs_error < 1e-10 and all(la.codes_agree for la in masos.layers),
            f"max err {masos.max_abs_error:.1e}",
        )
    cnn = ResidualCNN().double().eval().to(dev)
    x = torch.randn(256, 1, 12, 12, dtype=torch.float64, device=dev)
    torch.cuda.synchronize()
    t = time.perf_counter()
    sl.region_radius(cnn, x)
    torch.cuda.synchronize()
    print(
        f"     region_radius ResidualCNN, 256 inputs, float64 cuda: {time.perf_counter() - t:.3f} s"
    )
    print("FAILED: " + ", ".join(failures) if failures else "all checks passed", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
