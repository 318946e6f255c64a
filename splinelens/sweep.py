"""Lambda-sweeps over seeds, resumable, shareable, on one machine or a Ray cluster.

Each (lambda, seed) is one run with a stable id (a hash of its full configuration). Finished runs
are written to ``DIR/runs/<id>.json`` (history and config) and gathered into ``DIR/results.csv``;
every file is written to a temporary name and renamed, so an interrupted sweep leaves no
half-written file, and re-running the same command skips finished runs. A record that is not
valid (truncated, edited) is named in a warning and re-run. A diverged run (NaN loss) is
recorded as failed with its reason.

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
import csv
import hashlib
import io
import json
import math
import os
import reprlib
import warnings
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ._io import Locks, atomic_path
from .train import (
    DivergedError,
    TrainConfig,
    load_data,
    runtime,
    save_checkpoint,
    summarize,
    train,
)

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


_CONFIG_KEYS = ("dataset", "arch", "lam", "seed", "epochs")  # the config's columns in results.csv


class RunRecordWarning(UserWarning):
    """A run record that is not valid JSON or lacks what a record holds; it is re-run."""


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
        failed = {"status": "failed", "error": str(e), "history": [], "runtime": runtime(cfg)}
        return {**record, **failed}
    if save_dir:
        save_checkpoint(result.model, Path(save_dir) / f"{record['run_id']}.safetensors")
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
    if seeds < 1:
        raise ValueError(f"seeds: expected an integer >= 1, got {seeds!r}")
    out, lambdas, timeout = Path(out), list(map(float, lambdas)), _lock_timeout(lock_timeout)
    grid = configs(base, lambdas, seeds)  # refuses a bad lambda before anything is written
    (out / "runs").mkdir(parents=True, exist_ok=True)
    _check_same_sweep(out, base)
    _write_json(out / "sweep.json", {"base": asdict(base), "lambdas": lambdas, "seeds": seeds})
    todo = [c for c in grid if not _done(out, c)]
    save = str(out.resolve() / "runs") if checkpoints else None
    with Locks(timeout) as locks:
        if backend == "local":
            _run_local(out, todo, locks, save)
        else:
            _run_ray(out, todo, locks, address, save)
    return write_results(out)


def unfinished(
    base: TrainConfig, lambdas: Iterable[float], seeds: int, out: str | Path
) -> list[TrainConfig]:
    """The runs of the sweep without a valid record (e.g. running in other processes)."""
    return [c for c in configs(base, lambdas, seeds) if not _done(Path(out), c, warn=False)]


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


def _claim(out: Path, cfg: TrainConfig, locks: Locks) -> bool:
    """Lock the run for this process; False if another holds it or it finished meanwhile."""
    lock = _lock_path(out, cfg)
    if not locks.acquire(lock):
        return False
    if _done(out, cfg, warn=False):  # finished by another process since we looked
        locks.release(lock)
        return False
    return True


def _lock_path(out: Path, cfg: TrainConfig) -> Path:
    return out / "runs" / f"{run_id(cfg)}.lock"


def _run_local(out: Path, todo: list[TrainConfig], locks: Locks, save: str | None) -> None:
    """Claim, train, write, release: one run at a time."""
    data = None
    for cfg in todo:
        if not _claim(out, cfg, locks):
            continue
        try:
            data = load_data(cfg) if data is None else data  # once, for the first run we own
            _finish(out, run_one(cfg, data, save))
        finally:
            locks.release(_lock_path(out, cfg))


def _check_same_sweep(out: Path, base: TrainConfig) -> None:
    """Refuse to mix runs of different settings (other than lambda and seed) in one folder."""
    path = out / "sweep.json"
    if not path.exists():
        return
    try:
        old = TrainConfig(**json.loads(path.read_text())["base"])
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(
            f"{path} does not describe a sweep ({type(e).__name__}: {e}); "
            "remove it, or use another --out"
        ) from e
    keys = [k for k in {**old.identity(), **base.identity()} if k not in ("lam", "seed")]
    diff = [k for k in keys if getattr(old, k) != getattr(base, k)]
    if diff:
        changes = ", ".join(f"{k}: {getattr(old, k)!r} -> {getattr(base, k)!r}" for k in diff)
        raise ValueError(
            f"{out} holds a sweep with other settings ({changes}); use another "
            "--out, or the same settings to resume it"
        )


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
    mine = [cfg for cfg in todo if _claim(out, cfg, locks)]
    pending = [task.remote(cfg, None, save) for cfg in mine]
    while pending:  # write each run as soon as it finishes
        done, pending = ray.wait(pending, num_returns=1)
        record = ray.get(done[0])
        _finish(out, record)
        locks.release(out / "runs" / f"{record['run_id']}.lock")
    # locks of runs that raised are released when ``locks`` closes


def _done(out: Path, cfg: TrainConfig, warn: bool = True) -> bool:
    """Whether the run has a valid record (an invalid one is named in a warning)."""
    path = out / "runs" / f"{run_id(cfg)}.json"
    return _read_record(path, "it will be re-run" if warn else "") is not None


def _finish(out: Path, record: dict[str, Any]) -> None:
    _write_json(out / "runs" / f"{record['run_id']}.json", record)
    write_results(out)


def _read_record(path: Path, then: str = "skipped") -> dict[str, Any] | None:
    """The run record at ``path``; None if missing, or invalid (then, a warning ``then``)."""
    try:
        rec = json.loads(path.read_text())
        why = _problem(rec, path.stem)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as e:  # unreadable, not UTF-8, not JSON
        rec, why = None, f"{type(e).__name__}: {e}"
    if not why:
        return rec
    if then:
        msg = f"{path} is not a valid run record ({why}); {then}"
        warnings.warn(msg, RunRecordWarning, stacklevel=3)
    return None


def _problem(rec: Any, stem: str) -> str:
    """What is wrong with a run record; "" when it is valid."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    missing = [k for k in ("run_id", "config", "status") if k not in rec]
    if missing:
        return f"no {', '.join(missing)}"
    if rec["run_id"] != stem:
        return f"run_id {rec['run_id']!r} is not the file's name"
    why = _config_problem(rec["config"])
    if why or rec["status"] == "failed":
        return why
    if rec["status"] != "finished":
        return f"unknown status {rec['status']!r}"
    return _finished_problem(rec)


def _config_problem(config: Any) -> str:
    """What is wrong with a record's config (the columns of results.csv); "" if nothing."""
    if not isinstance(config, dict) or not set(_CONFIG_KEYS) <= config.keys():
        return f"config lacks one of {', '.join(_CONFIG_KEYS)}"
    for key in ("dataset", "arch"):
        if not isinstance(config[key], str):
            return _not(config, key, "a name", "config.")
    if not (_is_number(config["lam"]) and config["lam"] >= 0):
        return _not(config, "lam", "a finite number >= 0", "config.")
    for key in ("seed", "epochs"):
        if not (isinstance(config[key], int) and not isinstance(config[key], bool)):
            return _not(config, key, "an integer", "config.")
    return ""


def _finished_problem(rec: dict[str, Any]) -> str:
    """What is wrong with a finished run's numbers and history; "" if nothing."""
    hist = rec.get("history")
    if not (isinstance(hist, list) and hist):
        return "a finished run without history"
    for key in ("test_acc", "best_test_acc", "train_err"):
        if not _is_number(rec.get(key)):
            return _not(rec, key, "a finite number")
    for i, step in enumerate(hist):
        if not isinstance(step, dict):
            return f"history[{i}] is {reprlib.repr(step)}, not an object"
        for key in ("epoch", "test_acc", "train_err"):
            if not _is_number(step.get(key)):
                return _not(step, key, "a finite number", f"history[{i}].")
    return ""


def _not(obj: dict[str, Any], key: str, expected: str, where: str = "") -> str:
    """``where.key`` is missing, or its value is not ``expected``: said in a few words."""
    if key not in obj:
        return f"no {where}{key}"
    return f"{where}{key} is {reprlib.repr(obj[key])}, not {expected}"


def _is_number(x: Any) -> bool:
    """A finite int or float, not a bool (JSON's true is not 1.0; NaN is no result).

    >>> [_is_number(x) for x in (1, 0.5, True, "1", float("nan"), None)]
    [True, True, False, False, False, False]
    """
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond any float
        return False


def load_runs(out: str | Path) -> list[dict[str, Any]]:
    """Every valid finished or failed run record of a sweep directory (others: warned, skipped)."""
    paths = sorted((Path(out) / "runs").glob("*.json"))
    records = (_read_record(p, "skipped (splinelens sweep re-runs it)") for p in paths)
    return [r for r in records if r is not None]


def write_results(out: str | Path) -> list[dict[str, Any]]:
    """Rebuild DIR/results.csv from the run records (one row per run, atomically).

    With several writers, the last one sees every record: after writing, it looks again and
    rewrites if a record was added or changed meanwhile.
    """
    while True:
        before = _record_stamps(out)
        rows = _rows(load_runs(out))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        _write_text(Path(out) / "results.csv", buf.getvalue())
        if _record_stamps(out) == before:
            return rows


def _rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for rec in records:
        row = {k: rec.get(k, "") for k in COLUMNS}
        row.update({k: rec["config"][k] for k in _CONFIG_KEYS})
        rows.append(row)
    return sorted(rows, key=lambda r: (r["lam"], r["seed"]))


def _record_stamps(out: str | Path) -> set[tuple[str, int, int]]:
    """Name, mtime and size of each run record: changes when any record is written."""
    stamps = set()
    for p in (Path(out) / "runs").glob("*.json"):
        with contextlib.suppress(FileNotFoundError):
            st = p.stat()
            stamps.add((p.name, st.st_mtime_ns, st.st_size))
    return stamps


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=1))


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
