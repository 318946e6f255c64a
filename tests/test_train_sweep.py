"""Training runs are repeatable and safe; sweeps resume, never duplicate, record failures."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest
import torch

from splinelens import sweep as sweep_mod
from splinelens.sweep import load_runs, run_id, run_sweep
from splinelens.sweep_report import report
from splinelens.train import (
    DivergedError,
    TrainConfig,
    _batches,
    load_checkpoint,
    save_checkpoint,
    train,
)

BASE = TrainConfig(
    dataset="digits",
    arch="mlp",
    epochs=2,
    batch_size=50,
    progress=False,
    train_subset=400,
    test_subset=200,
)


def test_same_seed_same_run_and_penalty_changes_training() -> None:
    a, b = train(BASE), train(BASE)
    assert a.history == [dict(h, seconds=h2["seconds"]) for h, h2 in zip(b.history, a.history)]
    c = train(replace(BASE, lam=1.0))
    assert c.history[-1]["penalty"] < a.history[-1]["penalty"]  # the penalty does its job
    assert c.history[-1]["train_loss"] != a.history[-1]["train_loss"]


def test_class_balanced_batches() -> None:
    y = torch.arange(100) % 4
    cfg = replace(BASE, balanced=True, batch_size=8)
    batches = _batches(y, cfg, torch.Generator().manual_seed(0))
    assert len(batches) == 100 // 8
    for b in batches:
        assert torch.bincount(y[b], minlength=4).tolist() == [2, 2, 2, 2]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_roundtrip(tmp_path, suffix) -> None:
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    model = train(replace(BASE, epochs=1)).model
    path = tmp_path / f"model{suffix}"
    save_checkpoint(model, path)
    fresh = train(replace(BASE, epochs=0, seed=9)).model
    load_checkpoint(fresh, path)
    for (k, v), v2 in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(v.cpu(), v2), k
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_divergence_is_detected() -> None:
    with pytest.raises(DivergedError, match="loss became"):
        train(replace(BASE, lr=1e20))


def test_sweep_resumes_without_duplicates(tmp_path, monkeypatch) -> None:
    rows = run_sweep(BASE, [0.0, 0.5], seeds=2, out=tmp_path)
    assert [(r["lam"], r["seed"], r["status"]) for r in rows] == [
        (0.0, 0, "finished"),
        (0.0, 1, "finished"),
        (0.5, 0, "finished"),
        (0.5, 1, "finished"),
    ]
    calls = []
    real = sweep_mod.run_one
    monkeypatch.setattr(sweep_mod, "run_one", lambda c, *a: calls.append(c) or real(c, *a))
    rows = run_sweep(BASE, [0.0, 0.5, 1.0], seeds=2, out=tmp_path)  # only lam=1 is new
    assert [c.lam for c in calls] == [1.0, 1.0]
    with open(tmp_path / "results.csv") as f:
        ids = [r["run_id"] for r in csv.DictReader(f)]
    assert len(ids) == len(set(ids)) == 6
    assert not list(tmp_path.rglob("*.tmp"))
    rec = json.loads((tmp_path / "runs" / f"{run_id(replace(BASE, lam=1.0))}.json").read_text())
    assert len(rec["history"]) == 2 and rec["config"]["lam"] == 1.0


def test_interrupted_run_restarts_cleanly(tmp_path, monkeypatch) -> None:
    def crash(cfg, *args):
        if cfg.seed == 1:
            raise KeyboardInterrupt
        return real(cfg, *args)

    real = sweep_mod.run_one
    monkeypatch.setattr(sweep_mod, "run_one", crash)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(BASE, [0.0], seeds=3, out=tmp_path)
    assert len(load_runs(tmp_path)) == 1  # seed 0 finished, seed 1 left no file
    monkeypatch.setattr(sweep_mod, "run_one", real)
    rows = run_sweep(BASE, [0.0], seeds=3, out=tmp_path)
    assert [r["seed"] for r in rows] == [0, 1, 2]


def test_diverged_run_is_recorded_and_the_sweep_goes_on(tmp_path) -> None:
    bad = replace(BASE, lr=1e20)
    rows = run_sweep(bad, [0.0], seeds=1, out=tmp_path / "a")
    assert rows[0]["status"] == "failed" and "loss became" in rows[0]["error"]
    rows = run_sweep(BASE, [0.0, 0.1], seeds=1, out=tmp_path / "b")
    assert all(r["status"] == "finished" for r in rows)


def test_run_ids_are_stable_and_distinct() -> None:
    assert run_id(BASE) == run_id(replace(BASE, progress=True, device="cpu"))
    assert len({run_id(replace(BASE, lam=x)) for x in (0.0, 0.1, 1.0)}) == 3


def test_report_writes_figures_and_welch_table(tmp_path) -> None:
    from scipy import stats

    run_sweep(BASE, [0.0, 1.0], seeds=3, out=tmp_path)
    rows = report(tmp_path)
    for name in ("fig3a.png", "fig3b.png", "table.md", "table.csv"):
        assert (tmp_path / name).stat().st_size > 0
    runs = load_runs(tmp_path)
    acc = {lam: [r["test_acc"] for r in runs if r["config"]["lam"] == lam] for lam in (0.0, 1.0)}
    ref = stats.ttest_ind(acc[1.0], acc[0.0], equal_var=False)
    assert rows[1]["lam"] == 1.0 and rows[1]["runs"] == 3
    assert rows[1]["welch_t"] == pytest.approx(ref.statistic, nan_ok=True)
    assert rows[1]["mean"] == pytest.approx(sum(acc[1.0]) / 3)


def test_ray_backend(tmp_path) -> None:
    ray = pytest.importorskip("ray")
    try:
        rows = run_sweep(BASE, [0.0, 0.1], seeds=1, out=tmp_path, backend="ray")
    finally:
        ray.shutdown()
    assert [(r["lam"], r["status"]) for r in rows] == [(0.0, "finished"), (0.1, "finished")]
    local = run_sweep(BASE, [0.0, 0.1], seeds=1, out=tmp_path / "local")
    assert [r["test_acc"] for r in rows] == [r["test_acc"] for r in local]  # same runs


def test_cli_sweep_and_plot(tmp_path) -> None:
    from splinelens.cli import main

    out = tmp_path / "s"
    assert (
        main(
            [
                "sweep",
                "--dataset",
                "digits",
                "--arch",
                "mlp",
                "--lambdas",
                "0,0.1",
                "--seeds",
                "2",
                "--epochs",
                "1",
                "--train-subset",
                "300",
                "--no-progress",
                "--checkpoints",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert main(["plot-sweep", str(out)]) == 0
    assert len(list((out / "runs").glob("*.safetensors"))) == 4
    assert (out / "fig3a.png").exists()
    with pytest.raises(SystemExit):
        main(["sweep", "--dataset", "imagenet", "--out", str(out)])


def test_run_id_does_not_depend_on_number_types() -> None:
    assert run_id(replace(BASE, lam=1)) == run_id(replace(BASE, lam=1.0))
    assert TrainConfig(lam=1, lr=1).lam == 1.0 and isinstance(TrainConfig(lr=1).lr, float)


def test_sweep_folder_refuses_other_settings(tmp_path) -> None:
    run_sweep(BASE, [0.0], seeds=1, out=tmp_path)
    with pytest.raises(ValueError, match=r"other settings \(epochs: 2 -> 3\)"):
        run_sweep(replace(BASE, epochs=3), [0.0], seeds=1, out=tmp_path)
    assert len(run_sweep(BASE, [0.0, 0.1], seeds=1, out=tmp_path)) == 2  # more lambdas: fine
