"""Cold start: the first slice_partition in a new process against a second one (issue 10).

The MLP 2-64-64-64-2 in float64 (torch.manual_seed(0), default init) on the plane of its two
input axes, [-3, 3]^2, as in bench_slices.py. Each run is a fresh interpreter
(``subprocess.run([sys.executable, "-c", ...])``) that measures

* ``import splinelens`` (torch included, and torch alone);
* cold: the first ``sl.slice_partition`` call (capture, torch.export's own lazy imports and
  every first-use cost included);
* warm: a second call in the same process (the capture is cached);
* with ``--breakdown``, the seconds of the cold call spent importing modules (torch.export
  loads torch._dynamo and sympy on first use), in torch.export.export (its imports included) and
  in ExportedProgram.run_decompositions.

Target: cold <= 2 * warm + 1 s; the ratio cold / (2 warm + 1 s) is printed (<= 1 meets it),
in wall-clock seconds and in the process's CPU seconds (steadier on a shared machine; torch's
threads add up there). Medians over the runs. Run:

    python bench/bench_cold.py [--runs 3] [--breakdown] [--threads N] [--src DIR]

``--src`` puts DIR first on the child's sys.path (an edited copy of the package to compare).
``--threads 1`` steadies the numbers on a busy machine: with torch's default threads, the warm
call of this small network slows several-fold when other processes share the cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
sys.path.insert(0, {src!r})
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
if {threads}:
    torch.set_num_threads({threads})
import splinelens as sl
t2 = time.perf_counter()
import torch.nn as nn

spent = {{}}

def timed(owner, name, key):
    fn = getattr(owner, name)
    def wrapper(*a, **k):
        s = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - s
    setattr(owner, name, wrapper)

if {breakdown}:
    import builtins
    real_import, depth = builtins.__import__, [0]
    def clocked_import(*a, **k):  # time the outermost imports that load new modules
        if depth[0]:
            return real_import(*a, **k)
        depth[0], before, s = 1, len(sys.modules), time.perf_counter()
        try:
            return real_import(*a, **k)
        finally:
            depth[0] = 0
            if len(sys.modules) > before:
                spent["imports"] = spent.get("imports", 0.0) + time.perf_counter() - s
    builtins.__import__ = clocked_import
    timed(torch.export, "export", "export")
    timed(torch.export.ExportedProgram, "run_decompositions", "decompositions")

torch.manual_seed(0)
layers = [nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
          nn.Linear(64, 2)]
model = nn.Sequential(*layers).double().eval()
origin, dirs = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
s, c = time.perf_counter(), time.process_time()
part = sl.slice_partition(model, origin, dirs, (-3.0, 3.0, -3.0, 3.0))
cold, cold_cpu = time.perf_counter() - s, time.process_time() - c
s, c = time.perf_counter(), time.process_time()
again = sl.slice_partition(model, origin, dirs, (-3.0, 3.0, -3.0, 3.0))
warm, warm_cpu = time.perf_counter() - s, time.process_time() - c
assert len(again) == len(part)
print(json.dumps(dict(torch=t1 - t0, splinelens=t2 - t0, cold=cold, warm=warm, cold_cpu=cold_cpu,
                      warm_cpu=warm_cpu, regions=len(part), **spent)))
"""


def one_run(src: str, breakdown: bool, threads: int) -> dict[str, float]:
    code = CHILD.format(src=src, breakdown=breakdown, threads=threads)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=src
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--src", default=str(Path(__file__).resolve().parent.parent))
    args = ap.parse_args()
    runs = []
    for i in range(args.runs):
        r = one_run(args.src, args.breakdown, args.threads)
        runs.append(r)
        extra = "".join(
            f", {k} {r[k]:.2f}" for k in ("imports", "export", "decompositions") if k in r
        )
        print(
            f"run {i + 1}: import torch {r['torch']:.2f} s, import splinelens {r['splinelens']:.2f}"
            f" s; cold {r['cold']:.2f} s{extra}; warm {r['warm']:.2f} s; CPU seconds: cold "
            f"{r['cold_cpu']:.2f}, warm {r['warm_cpu']:.2f} ({r['regions']} regions)"
        )

    def med(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in runs)

    cold, warm = med("cold"), med("warm")
    print(
        f"\nMLP 2-64-64-64-2, median of {args.runs}: import splinelens {med('splinelens'):.2f} s "
        f"(torch {med('torch'):.2f} s); cold {cold:.2f} s, warm {warm:.2f} s; "
        f"cold / (2 warm + 1 s) = {cold / (2 * warm + 1):.2f} (target <= 1); in CPU seconds "
        f"{med('cold_cpu'):.2f} / (2 x {med('warm_cpu'):.2f} + 1) = "
        f"{med('cold_cpu') / (2 * med('warm_cpu') + 1):.2f}"
    )
    if args.breakdown:
        print(
            f"  in the cold call: imports {med('imports'):.2f} s, torch.export.export "
            f"{med('export'):.2f} s, run_decompositions {med('decompositions'):.2f} s"
        )


if __name__ == "__main__":
    main()
