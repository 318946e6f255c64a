"""Run records of a sweep (``DIR/runs/<id>.json``): their ids, and what makes one valid.

A record is trusted only if it is a JSON object whose config rebuilds as a ``TrainConfig`` with
the file's run id, and whose summary numbers are those of its own history: a truncated, edited or
foreign record is named in a ``RunRecordWarning`` and counts as not finished.

>>> from splinelens.paper.config import TrainConfig
>>> run_id(TrainConfig(dataset="digits", arch="mlp", epochs=1))
'1922830b58b8'
"""

from __future__ import annotations

import hashlib
import json
import math
import reprlib
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

from splinelens._io import file_sha256
from splinelens.paper.config import TrainConfig
from splinelens.paper.train import summarize

__all__ = [
    "CONFIG_KEYS",
    "MixedDevicesWarning",
    "RunRecordWarning",
    "check_devices",
    "checkpoint_source",
    "read_record",
    "run_id",
    "valid_records",
]

CONFIG_KEYS = ("dataset", "arch", "lam", "seed", "epochs")  # the config's columns in results.csv
_FIELDS = frozenset(f.name for f in fields(TrainConfig))


class RunRecordWarning(UserWarning):
    """A run record that is not valid JSON or lacks what a record holds; it is re-run."""


class MixedDevicesWarning(UserWarning):
    """The finished runs of one sweep were trained on different kinds of device."""


def check_devices(records: list[dict[str, Any]]) -> None:
    """Warn when finished runs were trained on different kinds of device (cpu, cuda, mps): a
    run's id does not name its device, so a sweep resumed elsewhere takes up the runs it finds,
    but float kernels round otherwise on each kind, so their numbers are not comparable bit for
    bit (each record's ``runtime.device`` says which).

    >>> check_devices([{"status": "finished", "runtime": {"device": "cpu"}}])  # one kind: quiet
    """
    kinds = sorted(
        {
            str(rec["runtime"]["device"]).split(":")[0]
            for rec in records
            if rec.get("status") == "finished" and "device" in (rec.get("runtime") or {})
        }
    )
    if len(kinds) > 1:
        warnings.warn(
            f"the finished runs of this sweep were trained on {' and '.join(kinds)} (each "
            "record's runtime.device): their numbers differ between kinds of device in their "
            "last digits; to compare them bit for bit, delete the records of one kind and run "
            "the sweep again on the other",
            MixedDevicesWarning,
            stacklevel=3,
        )


def run_id(cfg: TrainConfig) -> str:
    """Stable id of a run: the hash of every field that defines its result."""
    blob = json.dumps(cfg.identity(), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def read_record(path: Path, then: str = "skipped") -> dict[str, Any] | None:
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


def valid_records(out: Path, then: str = "") -> list[tuple[Path, dict[str, Any]]]:
    """Each valid run record in ``out/runs`` with its path (invalid ones: warned ``then``)."""
    found = ((p, read_record(p, then)) for p in sorted((out / "runs").glob("*.json")))
    return [(p, rec) for p, rec in found if rec is not None]


def _problem(rec: Any, stem: str) -> str:
    """What is wrong with a run record; "" when it is valid."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    missing = [k for k in ("run_id", "config", "status") if k not in rec]
    if missing:
        return f"no {', '.join(missing)}"
    if rec["run_id"] != stem:
        return f"run_id {rec['run_id']!r} is not the file's name"
    why = _config_problem(rec["config"]) or _identity_problem(rec["config"], stem)
    if why or rec["status"] == "failed":
        return why or _failed_problem(rec)
    if rec["status"] != "finished":
        return f"unknown status {rec['status']!r}"
    return _finished_problem(rec) or _summary_problem(rec)


def _config_problem(config: Any) -> str:
    """What is wrong with a record's config (the columns of results.csv); "" if nothing."""
    if not isinstance(config, dict) or not set(CONFIG_KEYS) <= config.keys():
        return f"config lacks one of {', '.join(CONFIG_KEYS)}"
    for key in ("dataset", "arch"):
        if not isinstance(config[key], str):
            return _not(config, key, "a name", "config.")
    if not (_is_number(config["lam"]) and config["lam"] >= 0):
        return _not(config, "lam", "a finite number >= 0", "config.")
    for key in ("seed", "epochs"):
        if not (isinstance(config[key], int) and not isinstance(config[key], bool)):
            return _not(config, key, "an integer", "config.")
    return ""


def _identity_problem(config: dict[str, Any], stem: str) -> str:
    """Whether ``config`` is a valid TrainConfig whose run id is ``stem`` ("" if so): a config
    edited under the same file name is not."""
    unknown = sorted(set(config) - _FIELDS)
    if unknown:
        return f"config.{unknown[0]} is not a setting of a run"
    try:
        cfg = TrainConfig(**config)
    except ValueError as e:
        return str(e).replace("TrainConfig.", "config.", 1)
    if run_id(cfg) != stem:
        return f"its config is that of run {run_id(cfg)}, not of {stem}: edited after the run?"
    return ""


def _failed_problem(rec: dict[str, Any]) -> str:
    """What is wrong with a failed run's record (its error, no history, no results); "" if
    nothing. (A finished record marked failed kept its numbers, which reached results.csv.)"""
    if not isinstance(rec.get("error"), str) or rec.get("history"):
        return "a failed run without its error, or with a history"
    kept = [k for k in ("test_acc", "best_test_acc", "train_err", "checkpoint_sha256") if k in rec]
    return f"a failed run with results ({', '.join(kept)})" if kept else ""


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


def _summary_problem(rec: dict[str, Any]) -> str:
    """Whether the record's numbers are those its history gives ("" if so): an edited test_acc,
    or a history cut short, is not."""
    hist, epochs = rec["history"], rec["config"]["epochs"]
    if len(hist) != epochs:
        return f"{len(hist)} epochs of history, but config.epochs is {epochs}"
    want = summarize([{"penalty": math.nan, "seconds": 0.0, **h} for h in hist])
    for key in ("test_acc", "best_test_acc", "train_err", "penalty"):
        if key in rec and not _agrees(rec[key], want[key]):
            got = reprlib.repr(rec[key])
            return f"{key} is {got}, but its history gives {reprlib.repr(want[key])}: edited?"
    return ""


def _agrees(got: Any, want: Any) -> bool:
    """``got`` is the number ``want``, within 1e-12 (NaN agrees with NaN).

    >>> _agrees(0.5, 0.5 + 1e-15), _agrees(float("nan"), float("nan")), _agrees(0.5, 0.6)
    (True, True, False)
    """
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (got, want)):
        return False
    try:
        if math.isnan(got) or math.isnan(want):
            return math.isnan(got) and math.isnan(want)
        return got == want or abs(got - want) <= 1e-12
    except OverflowError:  # an int beyond any float
        return False


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


def checkpoint_source(
    path: str | Path, expect: dict[str, Any] | None = None
) -> tuple[dict[str, Any], float | None]:
    """Where a checkpoint comes from: its path and sha256, and (when a valid run record beside
    it, ``<id>.json``, vouches for those bytes) its run id; and that run's lambda, else None.
    ``expect``: the data and model it is used with (``TrainConfig`` fields); a record that
    says otherwise is refused, naming the field.

    >>> # checkpoint_source("runs/fmnist/runs/1922830b58b8.safetensors")
    >>> # ({'checkpoint': ..., 'checkpoint_sha256': ..., 'run_id': '1922830b58b8'}, 0.0)
    """
    path = Path(path)
    source: dict[str, Any] = {"checkpoint": str(path), "checkpoint_sha256": file_sha256(path)}
    record = path.with_suffix(".json")
    rec = read_record(record, "not used for the checkpoint's lambda") if record.exists() else None
    if rec is None or rec.get("checkpoint_sha256") != source["checkpoint_sha256"]:
        return source, None
    for key, value in (expect or {}).items():
        if rec["config"].get(key, value) != value:
            raise ValueError(
                f"{record} says the checkpoint was trained with {key}={rec['config'][key]!r}, "
                f"not {value!r}: give the {key} it was trained with (or move the checkpoint "
                f"away from its record)"
            )
    return {**source, "run_id": rec["run_id"]}, float(rec["config"]["lam"])
