"""Sweeps share work safely: processes on one folder split the grid, none trains a run twice,
and the run of a process that died is taken over."""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from splinelens._io import Locks, atomic_path
from splinelens.cli import main
from splinelens.paper import sweep as sweep_mod
from splinelens.paper.config import TrainConfig
from splinelens.paper.data import Data
from splinelens.paper.sweep import configs, run_id, run_sweep

BASE = TrainConfig(
    dataset="digits", arch="mlp", epochs=1, train_subset=200, test_subset=100, progress=False
)
LAMBDAS, SEEDS = [0.0, 0.1, 0.2], 2  # 6 runs
IDS = sorted(run_id(c) for c in configs(BASE, LAMBDAS, SEEDS))


def _tiny_data(cfg: TrainConfig) -> Data:
    """Random 8x8 images of 10 classes: a worker needs no dataset library (fast to start)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 1, 8, 8, generator=g)  # (N, C, H, W)
    y = torch.arange(300) % 10
    return Data("tiny", x[:200], y[:200], x[200:], y[200:], [str(c) for c in range(10)])


def _worker(out: str, logs: str, delay: float, barrier=None, lock_timeout=None) -> None:
    """A sweep process that writes "pid run_id" to its own log each time it starts a run."""
    real = sweep_mod.run_one

    def logged(cfg, *args):
        with open(Path(logs) / f"{os.getpid()}.log", "a") as f:
            f.write(f"{os.getpid()} {run_id(cfg)}\n")
        time.sleep(delay)
        return real(cfg, *args)

    sweep_mod.run_one = logged
    sweep_mod.load_data = _tiny_data
    if barrier is not None:
        barrier.wait(timeout=120)
    run_sweep(BASE, LAMBDAS, SEEDS, out, lock_timeout=lock_timeout)


def _trained(logs: Path) -> list[tuple[int, str]]:
    """(pid, run id) of every training started, by every worker."""
    lines = [line.split() for p in logs.glob("*.log") for line in p.read_text().splitlines()]
    return [(int(pid), rid) for pid, rid in lines]


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "runs").glob("*.lock*"))


def _results(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_three_processes_split_a_sweep_and_train_each_run_once(tmp_path) -> None:
    out, logs = tmp_path / "sweep", tmp_path / "logs"
    logs.mkdir()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)  # start together, once torch is imported
    workers = [
        ctx.Process(target=_worker, args=(str(out), str(logs), 0.5, barrier)) for _ in range(3)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=180)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    trained = _trained(logs)
    assert sorted(rid for _, rid in trained) == IDS  # every run, each exactly once
    assert len({pid for pid, _ in trained}) >= 2  # the work was shared
    rows = _results(out)  # the last writer of results.csv saw every run
    assert sorted(r["run_id"] for r in rows) == IDS
    assert {r["status"] for r in rows} == {"finished"}
    assert _leftovers(out) == []


def test_the_run_of_a_killed_worker_is_taken_over(tmp_path, monkeypatch) -> None:
    out, logs = tmp_path / "sweep", tmp_path / "logs"
    logs.mkdir()
    ctx = mp.get_context("spawn")
    victim = ctx.Process(target=_worker, args=(str(out), str(logs), 600.0))
    victim.start()
    deadline = time.monotonic() + 120
    while not _trained(logs) and time.monotonic() < deadline:
        time.sleep(0.05)
    [(pid, killed)] = _trained(logs)  # it holds its first run and sleeps in it
    assert _leftovers(out) == [f"{killed}.lock"]
    os.kill(pid, signal.SIGKILL)
    victim.join(timeout=30)
    calls = []
    real = sweep_mod.run_one
    monkeypatch.setattr(sweep_mod, "run_one", lambda c, *a: calls.append(run_id(c)) or real(c, *a))
    rows = run_sweep(BASE, LAMBDAS, SEEDS, out, lock_timeout=3600)  # no waiting: the pid is dead
    assert killed in calls and sorted(calls) == IDS
    assert sorted(r["run_id"] for r in rows) == IDS
    assert {r["status"] for r in rows} == {"finished"}
    assert _leftovers(out) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _stale_lock(path: Path, how: str) -> None:
    if how == "garbage":
        path.write_bytes(b"\x00{not json")
    else:
        host = socket.gethostname() if how == "dead pid" else "elsewhere"
        pid = _dead_pid() if how == "dead pid" else 1
        path.write_text(json.dumps({"host": host, "pid": pid, "nonce": "n0", "started": 0}))
    if how != "dead pid":
        os.utime(path, (time.time() - 600, time.time() - 600))  # no heartbeat for 10 minutes


def _race(path: Path, racers: list[Locks]) -> list[bool]:
    """Each racer tries to acquire ``path`` in its own thread, all released at once."""
    start = threading.Barrier(len(racers))
    won = [False] * len(racers)

    def race(i: int) -> None:
        start.wait()
        won[i] = racers[i].acquire(path)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(racers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


@pytest.mark.parametrize("how", ["dead pid", "silent host", "garbage"])
def test_exactly_one_of_three_racers_steals_a_stale_lock(tmp_path, how) -> None:
    for attempt in range(10):
        path = tmp_path / f"{attempt}.lock"
        _stale_lock(path, how)
        racers = [Locks(timeout=120) for _ in range(3)]
        won = _race(path, racers)
        assert sum(won) == 1, (attempt, won)
        winner = racers[won.index(True)]
        assert json.loads(path.read_text())["nonce"] == winner.nonce
        for racer in racers:
            racer.close()
        assert not path.exists() and not list(tmp_path.glob(f"{attempt}.lock.steal-*"))


def test_a_live_owners_lock_is_not_stolen(tmp_path) -> None:
    path = tmp_path / "run.lock"
    with Locks(timeout=1.0, beat=0.05) as owner, Locks(timeout=1.0) as other:
        assert owner.acquire(path)
        time.sleep(1.5)  # longer than the timeout: the heartbeat keeps the lock fresh
        assert not other.acquire(path)
        assert json.loads(path.read_text())["nonce"] == owner.nonce
    elsewhere = {"host": "elsewhere", "pid": 1, "nonce": "n0", "started": time.time()}
    path.write_text(json.dumps(elsewhere))  # a fresh lock from another machine
    with Locks(timeout=120) as other:
        assert not other.acquire(path)
    path.write_bytes(b"")  # a lock being created right now (no owner written yet)
    with Locks(timeout=120) as other:
        assert not other.acquire(path)


def test_runs_held_elsewhere_are_left_and_reported(tmp_path, capsys) -> None:
    out = tmp_path / "sweep"
    held = configs(BASE, LAMBDAS, SEEDS)[1]
    (out / "runs").mkdir(parents=True)
    argv = ["sweep", "--dataset", "digits", "--arch", "mlp", "--epochs", "1", "--no-progress"]
    argv += ["--train-subset", "200", "--test-subset", "100", "--lambdas", "0,0.1,0.2"]
    with Locks() as other:  # another live process holds one run
        assert other.acquire(out / "runs" / f"{run_id(held)}.lock")
        assert main([*argv, "--seeds", "2", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "5 finished, 0 failed, 1 running in other processes" in said
    assert run_id(held) not in {r["run_id"] for r in _results(out)}
    assert main([*argv, "--seeds", "2", "--out", str(out)]) == 0  # once it is free: resumed
    assert "6 finished, 0 failed, 0 running in other processes" in capsys.readouterr().out


def test_lock_timeout_is_checked(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SPLINELENS_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="SPLINELENS_LOCK_TIMEOUT: expected a number of seconds"):
        run_sweep(BASE, [0.0], 1, tmp_path / "a")
    with pytest.raises(ValueError, match="lock_timeout: expected a number of seconds > 0"):
        run_sweep(BASE, [0.0], 1, tmp_path / "b", lock_timeout=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_killed_writes_temporary_file_is_removed_once_abandoned(tmp_path) -> None:
    """A write killed outright (SIGKILL) leaves its temporary file: a later write of the same
    file removes it once an hour old, and leaves a younger one (a write in progress)."""
    target = tmp_path / "results.csv"
    child = (
        "import os, sys, pathlib; from splinelens._io import atomic_path\n"
        "with atomic_path(pathlib.Path(sys.argv[1])) as tmp:\n"
        "    tmp.write_text('partial'); os.kill(os.getpid(), 9)\n"
    )
    subprocess.run([sys.executable, "-c", child, str(target)], check=False)
    left = list(tmp_path.glob(".results.csv.*.tmp"))
    assert len(left) == 1 and not target.exists()
    fresh = tmp_path / ".results.csv.other.tmp"
    fresh.write_text("in progress")
    hour_ago = time.time() - 3700
    os.utime(left[0], (hour_ago, hour_ago))
    with atomic_path(target) as tmp:
        tmp.write_text("done")
    assert target.read_text() == "done" and not left[0].exists() and fresh.exists()


@pytest.mark.parametrize("dead_takers", [1, 2])
def test_a_lock_whose_takers_died_mid_takeover_is_taken_over(tmp_path, dead_takers) -> None:
    """A taker killed between creating its steal marker and replacing the lock left the marker
    behind, and every later taker gave up on that run for good (found by a fuzzing review).
    Its successors now compete one marker further; still exactly one wins."""
    path = tmp_path / "run.lock"
    _stale_lock(path, "dead pid")
    name = f"{path.name}.steal-n0"
    for i in range(dead_takers):  # each died after creating its marker
        nonce = f"dead{i}"
        owner = {"host": socket.gethostname(), "pid": _dead_pid(), "nonce": nonce, "started": 0}
        (tmp_path / name).write_text(json.dumps(owner))
        name = f"{name}-{nonce}"
    racers = [Locks(timeout=120) for _ in range(3)]
    won = _race(path, racers)
    assert sum(won) == 1, won
    assert json.loads(path.read_text())["nonce"] == racers[won.index(True)].nonce
    for racer in racers:
        racer.close()
    assert not path.exists() and not list(tmp_path.glob("run.lock.steal-*"))
    live = {"host": socket.gethostname(), "pid": os.getpid(), "nonce": "live", "started": 0}
    _stale_lock(path, "dead pid")
    (tmp_path / "run.lock.steal-n0").write_text(json.dumps(live))  # a taker at work now
    with Locks(timeout=120) as other:
        assert not other.acquire(path)


def test_two_sweeps_of_other_settings_started_at_once_one_is_refused(tmp_path, monkeypatch) -> None:
    """Both checked sweep.json before either wrote it: each went on, and the folder mixed runs
    of two settings (found by a fuzzing review). The check and the write are now one step."""
    check = sweep_mod._check_same_sweep

    def slow_check(out: Path, base: TrainConfig) -> None:
        check(out, base)
        time.sleep(0.3)  # the window between the check and the write, widened

    started: list[int] = []
    monkeypatch.setattr(sweep_mod, "_check_same_sweep", slow_check)
    monkeypatch.setattr(sweep_mod, "_run_local", lambda out, todo, *a: started.append(len(todo)))
    errors: list[Exception] = []
    start = threading.Barrier(2)

    def sweep(epochs: int) -> None:
        start.wait()
        try:
            run_sweep(replace(BASE, epochs=epochs), [0.0], 1, tmp_path)
        except ValueError as e:
            errors.append(e)

    threads = [threading.Thread(target=sweep, args=(e,)) for e in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1 and "other settings" in str(errors[0]) and len(started) == 1
    assert not (tmp_path / "sweep.json.lock").exists()


def test_a_run_whose_worker_dies_meanwhile_is_taken_over(tmp_path, monkeypatch) -> None:
    """A worker that found a run held by a live worker left it to that one, also once the other
    died while this one trained: the run stayed untrained until a new sweep (found by a fuzzing
    review). The runs others held are looked at again while a pass trains one."""
    first, second = configs(BASE, [0.0, 0.1], 1)
    lock = tmp_path / "runs" / f"{run_id(first)}.lock"  # met first, held
    lock.parent.mkdir(parents=True)
    alive = {"host": socket.gethostname(), "pid": os.getpid(), "nonce": "other", "started": 0}
    lock.write_text(json.dumps(alive))  # held by a live worker
    trained = []
    real = sweep_mod.run_one

    def run_and_let_the_other_die(cfg, *args):
        trained.append(run_id(cfg))
        if cfg == second:  # meanwhile the other worker dies
            lock.write_text(json.dumps({**alive, "pid": _dead_pid()}))
        return real(cfg, *args)

    monkeypatch.setattr(sweep_mod, "run_one", run_and_let_the_other_die)
    rows = run_sweep(BASE, [0.0, 0.1], 1, tmp_path)
    assert trained == [run_id(second), run_id(first)]
    assert [r["status"] for r in rows] == ["finished", "finished"]
