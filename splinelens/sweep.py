"""Lambda-sweeps over seeds, resumable, on one machine or a Ray cluster.

Each (lambda, seed) is one run with a stable id (a hash of its full configuration). Finished runs
are written to ``DIR/runs/<id>.json`` (history and config) and gathered into ``DIR/results.csv``;
every file is written to a temporary name and renamed, so an interrupted sweep leaves no
half-written file, and re-running the same command skips finished runs. A diverged run (NaN
loss) is recorded as failed with its reason.

>>> import tempfile
>>> base = TrainConfig(dataset="digits", arch="mlp", epochs=1, progress=False)
>>> out = tempfile.mkdtemp()
>>> rows = run_sweep(base, lambdas=[0.0, 0.1], seeds=1, out=out)
>>> [(r["lam"], r["status"]) for r in rows]
[(0.0, 'finished'), (0.1, 'finished')]
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ._io import atomic_path
from .train import DivergedError, TrainConfig, load_data, save_checkpoint, summarize, train

COLUMNS = [
    "run_id",
    "dataset",
    "arch",
    "lam",
    "seed",
    "epochs",
    "status",
    "test_acc",
    "best_test_acc",
    "train_err",
    "penalty",
    "seconds",
    "error",
]


def run_id(cfg: TrainConfig) -> str:
    """Stable id of a run: the hash of every field that defines its result."""
    blob = json.dumps(cfg.identity(), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def configs(base: TrainConfig, lambdas: Iterable[float], seeds: int) -> list[TrainConfig]:
    return [replace(base, lam=float(lam), seed=s) for lam in lambdas for s in range(seeds)]


def run_one(cfg: TrainConfig, data: Any = None, save_dir: str | None = None) -> dict[str, Any]:
    """Train one run and return its record (never raises for a diverged run).

    With ``save_dir``, the trained weights go to ``save_dir/<run id>.safetensors``.
    """
    record: dict[str, Any] = {"run_id": run_id(cfg), "config": asdict(cfg)}
    try:
        result = train(cfg, data)
    except DivergedError as e:
        return {**record, "status": "failed", "error": str(e), "history": []}
    if save_dir:
        save_checkpoint(result.model, Path(save_dir) / f"{record['run_id']}.safetensors")
    return {**record, "status": "finished", "history": result.history, **summarize(result.history)}


def run_sweep(
    base: TrainConfig,
    lambdas: Iterable[float],
    seeds: int,
    out: str | Path,
    backend: str = "local",
    address: str | None = None,
    checkpoints: bool = False,
) -> list[dict[str, Any]]:
    """Run every missing (lambda, seed) of the sweep; return the rows of results.csv.

    ``checkpoints``: also keep each trained model as ``DIR/runs/<run id>.safetensors``.
    """
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    _check_same_sweep(out, base)
    _write_json(
        out / "sweep.json",
        {"base": asdict(base), "lambdas": list(map(float, lambdas)), "seeds": seeds},
    )
    todo = [c for c in configs(base, lambdas, seeds) if not _done(out, c)]
    save = str(out.resolve() / "runs") if checkpoints else None
    if backend == "local":
        data = load_data(base) if todo else None
        for cfg in todo:
            _finish(out, run_one(cfg, data, save))
    elif backend == "ray":
        _run_ray(out, todo, address, save)
    else:
        raise ValueError(f"unknown backend {backend!r}; choose 'local' or 'ray'")
    return write_results(out)


def _check_same_sweep(out: Path, base: TrainConfig) -> None:
    """Refuse to mix runs of different settings (other than lambda and seed) in one folder."""
    path = out / "sweep.json"
    if not path.exists():
        return
    old = TrainConfig(**json.loads(path.read_text())["base"]).identity()
    new = base.identity()
    diff = [k for k in new if k not in ("lam", "seed") and old.get(k) != new[k]]
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in diff)
        raise ValueError(
            f"{out} holds a sweep with other settings ({changes}); use another "
            "--out, or the same settings to resume it"
        )


def _run_ray(out: Path, todo: list[TrainConfig], address: str | None, save: str | None) -> None:
    try:
        import ray
    except ImportError as e:
        raise ImportError("--backend ray needs Ray: pip install 'splinelens[ray]'") from e
    import torch

    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    gpus = 1 if torch.cuda.is_available() else 0
    task = ray.remote(num_gpus=gpus)(run_one)
    pending = [task.remote(cfg, None, save) for cfg in todo]
    while pending:  # write each run as soon as it finishes
        done, pending = ray.wait(pending, num_returns=1)
        _finish(out, ray.get(done[0]))


def _done(out: Path, cfg: TrainConfig) -> bool:
    return (out / "runs" / f"{run_id(cfg)}.json").exists()


def _finish(out: Path, record: dict[str, Any]) -> None:
    _write_json(out / "runs" / f"{record['run_id']}.json", record)
    write_results(out)


def load_runs(out: str | Path) -> list[dict[str, Any]]:
    """Every finished or failed run record of a sweep directory."""
    paths = sorted((Path(out) / "runs").glob("*.json"))
    return [json.loads(p.read_text()) for p in paths]


def write_results(out: str | Path) -> list[dict[str, Any]]:
    """Rebuild DIR/results.csv from the run records (one row per run, atomically)."""
    rows = []
    for rec in load_runs(out):
        cfg = rec["config"]
        row = {k: rec.get(k, "") for k in COLUMNS}
        row.update({k: cfg[k] for k in ("dataset", "arch", "lam", "seed", "epochs")})
        rows.append(row)
    rows.sort(key=lambda r: (r["lam"], r["seed"]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    _write_text(Path(out) / "results.csv", buf.getvalue())
    return rows


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=1))


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
