"""Lambda-sweeps over seeds, resumable, shareable, on one machine or a Ray cluster.

Each (lambda, seed) is one run with a stable id (a hash of its full configuration). Finished runs
are written to ``DIR/runs/<id>.json`` (history and config) and gathered into ``DIR/results.csv``;
every file is written to a temporary name and renamed, so an interrupted sweep leaves no
half-written file, and re-running the same command skips finished runs. A record that is not
valid (truncated, edited: its config must hash to its name, its numbers follow from its
history) is named in a warning and re-run. A diverged run (NaN loss) is recorded as failed with
its reason. The runs of one folder differ only in lambda and seed: a sweep of other settings, or
records of them, are refused.

Several processes, on one machine or on many sharing the folder, may run the same sweep: each
claims a run with the lock file ``DIR/runs/<id>.lock`` before training it, so no run is trained
twice; the run of a process that died is taken over (at once on the same host, after
``lock_timeout`` seconds of silence from another host).

>>> import tempfile
>>> base = TrainConfig(dataset="digits", arch="mlp", epochs=1, progress=False)
>>> out = tempfile.mkdtemp()
>>> rows = run_sweep(base, lambdas=[0.0, 0.1], seeds=1, out=out)
>>> [(r["lam"], r["status"]) for r in rows]
[(0.0, 'finished'), (0.1, 'finished')]
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from splinelens._io import Locks, file_sha256
from splinelens.paper.config import TrainConfig
from splinelens.paper.files import write_csv, write_json
from splinelens.paper.records import (
    CONFIG_KEYS,
    RunRecordWarning,
    check_devices,
    read_record,
    run_id,
    valid_records,
)
from splinelens.paper.train import (
    DivergedError,
    checkpoint_problem,
    load_data,
    runtime,
    save_checkpoint,
    summarize,
    train,
)

__all__ = ["COLUMNS", "MAX_RUNS", "RunRecordWarning", "grid_problem", "load_runs", "out_problem"]
__all__ += ["configs", "run_id", "run_one", "run_sweep", "unfinished", "write_results"]

COLUMNS = [
    "run_id",
    "dataset",
    "arch",
    "lam",
    "penalty_kind",
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


MAX_RUNS = 1_000_000  # runs in one sweep: len(lambdas) * seeds (the grid is built in memory)


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
        failed = {"status": "failed", "error": str(e), "history": [], "runtime": runtime(cfg)}
        return {**record, **failed}
    if save_dir:
        path = Path(save_dir) / f"{record['run_id']}.safetensors"
        save_checkpoint(result.model, path)
        record["checkpoint_sha256"] = file_sha256(path)  # (the record vouches for these bytes)
    summary = summarize(result.history)
    finished = {"status": "finished", "history": result.history, "runtime": result.runtime}
    return {**record, **finished, **summary}


def run_sweep(
    base: TrainConfig,
    lambdas: Iterable[float],
    seeds: int,
    out: str | Path,
    backend: str = "local",
    address: str | None = None,
    checkpoints: bool = False,
    lock_timeout: float | None = None,
) -> list[dict[str, Any]]:
    """Run every missing (lambda, seed) of the sweep; return the rows of results.csv.

    Runs that other processes hold are left to them (not waited for): see ``unfinished``.
    ``checkpoints``: also keep each trained model as ``DIR/runs/<run id>.safetensors``.
    ``lock_timeout``: seconds without a heartbeat after which another host's claim on a run is
    void (default: the environment variable SPLINELENS_LOCK_TIMEOUT, else 120).
    """
    if backend not in ("local", "ray"):
        raise ValueError(f"unknown backend {backend!r}; choose 'local' or 'ray'")
    out, lambdas, timeout = Path(out), list(map(float, lambdas)), _lock_timeout(lock_timeout)
    why = grid_problem(len(lambdas), seeds) or out_problem(out)
    if why:
        raise ValueError(why)
    grid = configs(base, lambdas, seeds)  # refuses a bad lambda before anything is written
    (out / "runs").mkdir(parents=True, exist_ok=True)
    save = str(out.resolve() / "runs") if checkpoints else None
    with Locks(timeout) as locks:
        with _held(locks, out / "sweep.json.lock"):  # (two sweeps started at once: one checks)
            _check_same_sweep(out, base)
            new = not (out / "sweep.json").exists()
            write_json(
                out / "sweep.json", {"base": asdict(base), "lambdas": lambdas, "seeds": seeds}
            )
        todo = [c for c in grid if not _done(out, c, checkpoints=checkpoints)]
        try:
            if backend == "local":
                _run_local(out, todo, locks, save)
            else:
                _run_ray(out, todo, locks, address, save)
        except BaseException:  # a new sweep that failed before any run (its data, say): no claim
            if new and not any((out / "runs").glob("*.json")):
                (out / "sweep.json").unlink(missing_ok=True)
            raise
    return write_results(out)


@contextlib.contextmanager
def _held(locks: Locks, path: Path, wait: float = 60.0) -> Iterator[None]:
    """Hold the lock ``path`` for the block, waiting up to ``wait`` seconds for another holder."""
    deadline = time.monotonic() + wait
    while not locks.acquire(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} is held by another process; is a sweep starting there?")
        time.sleep(0.05)
    try:
        yield
    finally:
        locks.release(path)


def unfinished(
    base: TrainConfig, lambdas: Iterable[float], seeds: int, out: str | Path
) -> list[TrainConfig]:
    """The runs of the sweep without a valid record (e.g. running in other processes)."""
    return [c for c in configs(base, lambdas, seeds) if not _done(Path(out), c, warn=False)]


def grid_problem(n_lambdas: int, seeds: Any) -> str:
    """What is wrong with a sweep of ``n_lambdas`` lambdas x ``seeds`` seeds ("" if nothing).

    >>> grid_problem(4, 10**12)
    '4 lambdas x 1000000000000 seeds is 4,000,000,000,000 runs; a sweep holds at most 1,000,000'
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        return f"seeds: expected an integer >= 1, got {seeds!r}"
    if n_lambdas * seeds > MAX_RUNS:
        total = n_lambdas * seeds
        return (
            f"{n_lambdas} lambdas x {seeds} seeds is {total:,} runs; "
            f"a sweep holds at most {MAX_RUNS:,}"
        )
    return ""


def out_problem(out: str | Path) -> str:
    """What keeps directory ``out`` from holding a sweep's files ("" if nothing)."""
    runs = Path(out) / "runs"
    if runs.exists() and not runs.is_dir():
        return f"{runs} is a file; a sweep keeps its runs in that directory"
    for name in ("sweep.json", "results.csv"):
        if (Path(out) / name).is_dir():
            return f"{Path(out) / name} is a directory; a sweep writes that file"
    return ""


def _lock_timeout(seconds: float | None) -> float:
    """The argument, else $SPLINELENS_LOCK_TIMEOUT, else 120 seconds; finite and positive."""
    source = "lock_timeout"
    if seconds is None:
        source, seconds = "SPLINELENS_LOCK_TIMEOUT", os.environ.get("SPLINELENS_LOCK_TIMEOUT", 120)
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{source}: expected a number of seconds > 0, got {seconds!r}")
    return value


def _claim(out: Path, cfg: TrainConfig, locks: Locks, save: str | None) -> bool:
    """Lock the run for this process; False if another holds it or it finished meanwhile."""
    lock = _lock_path(out, cfg)
    if not locks.acquire(lock):
        return False
    if _done(out, cfg, warn=False, checkpoints=save is not None):  # finished meanwhile
        locks.release(lock)
        return False
    return True


def _lock_path(out: Path, cfg: TrainConfig) -> Path:
    return out / "runs" / f"{run_id(cfg)}.lock"


def _run_local(out: Path, todo: list[TrainConfig], locks: Locks, save: str | None) -> None:
    """Claim, train, write, release: one run at a time; then again the runs others held, while
    that trains one (a worker that died meanwhile leaves its run to us)."""
    data = None
    while todo:
        held = []
        for cfg in todo:
            if not _claim(out, cfg, locks, save):
                held.append(cfg)
                continue
            try:
                data = load_data(cfg) if data is None else data  # once, for the first run we own
                _finish(out, run_one(cfg, data, save))
            finally:
                locks.release(_lock_path(out, cfg))
        todo = [] if len(held) == len(todo) else held


def _check_same_sweep(out: Path, base: TrainConfig) -> None:
    """Refuse to mix runs of different settings (other than lambda and seed) in one folder:
    those of sweep.json, and those of the valid run records (sweep.json may have been removed)."""
    old = _sweep_base(out)
    changes = _differences(old, base) if old else ""
    if not changes:
        for path, rec in valid_records(out):
            changes = _differences(_config(rec), base)
            if changes:
                changes += f"; see {path}"
                break
    if changes:
        raise ValueError(
            f"{out} holds a sweep with other settings ({changes}); use another "
            "--out, or the same settings to resume it"
        )


def _sweep_base(out: Path) -> TrainConfig | None:
    """The base config in ``out/sweep.json``; None without the file, ValueError if invalid."""
    path = out / "sweep.json"
    if not path.exists():
        return None
    try:
        return TrainConfig(**json.loads(path.read_text())["base"])
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(
            f"{path} does not describe a sweep ({type(e).__name__}: {e}); "
            "remove it, or use another --out"
        ) from e


def _differences(old: TrainConfig, new: TrainConfig) -> str:
    """The settings apart from lambda and seed that differ, as "key: old -> new, ...". The
    penalty kind counts at lambda = 0 too: a sweep's base has lambda = 0, and its lambda > 0
    runs, and every run's recorded penalty, are of its kind."""
    keys = {**old.identity(), **new.identity(), "penalty_kind": None}
    keys = [k for k in keys if k not in ("lam", "seed")]
    diff = [k for k in keys if getattr(old, k) != getattr(new, k)]
    return ", ".join(f"{k}: {getattr(old, k)!r} -> {getattr(new, k)!r}" for k in diff)


def _config(rec: dict[str, Any]) -> TrainConfig:
    """The config of a valid run record."""
    return TrainConfig(**rec["config"])


def _run_ray(
    out: Path, todo: list[TrainConfig], locks: Locks, address: str | None, save: str | None
) -> None:
    """The driver claims each run before submitting it and releases it once written."""
    try:
        import ray
    except ImportError as e:
        raise ImportError("--backend ray needs Ray: pip install 'splinelens[ray]'") from e
    import torch

    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    gpus = 1 if torch.cuda.is_available() else 0
    task = ray.remote(num_gpus=gpus)(run_one)
    mine = [cfg for cfg in todo if _claim(out, cfg, locks, save)]
    pending = [task.remote(cfg, None, save) for cfg in mine]
    while pending:  # write each run as soon as it finishes
        done, pending = ray.wait(pending, num_returns=1)
        record = ray.get(done[0])
        _finish(out, record)
        locks.release(out / "runs" / f"{record['run_id']}.lock")
    # locks of runs that raised are released when ``locks`` closes


def _done(out: Path, cfg: TrainConfig, warn: bool = True, checkpoints: bool = False) -> bool:
    """Whether the run has a valid record (an invalid one is named in a warning) and, with
    ``checkpoints``, a finished one a readable checkpoint (else it is trained again)."""
    path = out / "runs" / f"{run_id(cfg)}.json"
    rec = read_record(path, "it will be re-run" if warn else "")
    if rec is None or not checkpoints or rec["status"] != "finished":
        return rec is not None
    checkpoint = path.with_suffix(".safetensors")
    why = checkpoint_problem(checkpoint)
    want = rec.get("checkpoint_sha256")  # (None in records of older versions)
    if not why and want is not None and want != file_sha256(checkpoint):
        why = "its bytes are not those the run record vouches for (sha256): damaged since"
    if why and warn:
        msg = f"{path.stem}: its checkpoint is missing or unreadable ({why}); it will be re-run"
        warnings.warn(msg, RunRecordWarning, stacklevel=3)
    return not why


def _finish(out: Path, record: dict[str, Any]) -> None:
    write_json(out / "runs" / f"{record['run_id']}.json", record)
    write_results(out)


def load_runs(out: str | Path) -> list[dict[str, Any]]:
    """Every valid finished or failed run record of a sweep directory (others: warned, skipped).

    Runs of different settings (apart from lambda and seed), among themselves or with
    sweep.json, are not one sweep: a ValueError naming two such files and the settings.
    """
    found = valid_records(Path(out), "skipped (splinelens sweep re-runs it)")
    _check_one_sweep(Path(out), found)
    check_devices([rec for _, rec in found])
    return [rec for _, rec in found]


def _check_one_sweep(out: Path, found: list[tuple[Path, dict[str, Any]]]) -> None:
    """Refuse records whose settings differ from sweep.json's, or (without it) each other's."""
    base = _sweep_base(out)
    ref = (out / "sweep.json", base) if base else None
    for path, rec in found:
        cfg = _config(rec)
        ref = ref or (path, cfg)
        changes = _differences(ref[1], cfg)
        if changes:
            raise ValueError(
                f"{ref[0]} and {path} are of different settings ({changes}); the runs of a "
                "sweep differ only in lambda and seed: move the odd ones out, or plot them apart"
            )


def write_results(out: str | Path) -> list[dict[str, Any]]:
    """Rebuild DIR/results.csv from the run records (one row per run, atomically).

    With several writers, the last one sees every record: after writing, it looks again and
    rewrites if a record was added or changed meanwhile.
    """
    while True:
        before = _record_stamps(out)
        rows = _rows(load_runs(out))
        write_csv(Path(out) / "results.csv", rows, COLUMNS)
        if _record_stamps(out) == before:
            return rows


def _rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for rec in records:
        row = {k: rec.get(k, "") for k in COLUMNS}
        row.update({k: rec["config"][k] for k in CONFIG_KEYS})
        row["penalty_kind"] = rec["config"].get("penalty_kind", "eq13")  # older records: eq13
        rows.append(row)
    return sorted(rows, key=lambda r: (r["penalty_kind"], r["lam"], r["seed"]))


def _record_stamps(out: str | Path) -> set[tuple[str, int, int]]:
    """Name, mtime and size of each run record: changes when any record is written."""
    stamps = set()
    for p in (Path(out) / "runs").glob("*.json"):
        with contextlib.suppress(FileNotFoundError):
            st = p.stat()
            stamps.add((p.name, st.st_mtime_ns, st.st_size))
    return stamps
