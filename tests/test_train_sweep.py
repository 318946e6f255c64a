"""Training runs are repeatable and safe; sweeps resume, never duplicate, record failures."""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from dataclasses import replace

import pytest
import torch

from splinelens.paper import sweep as sweep_mod
from splinelens.paper.config import TrainConfig
from splinelens.paper.records import MixedDevicesWarning
from splinelens.paper.report import report
from splinelens.paper.sweep import load_runs, run_id, run_sweep
from splinelens.paper.train import (
    DivergedError,
    checkpoint_problem,
    load_checkpoint,
    load_data,
    make_model,
    save_checkpoint,
    train,
)
from splinelens.paper.train import batch_indices as _batches

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
    with pytest.raises(ValueError, match="batch_size 3 is smaller than the 4 classes"):
        _batches(y, replace(cfg, batch_size=3), torch.Generator())  # (was 4: found in review)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_roundtrip(tmp_path, suffix) -> None:
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    model = train(replace(BASE, epochs=1)).model
    path = tmp_path / f"model{suffix}"
    save_checkpoint(model, path)
    fresh = make_model(BASE, load_data(BASE))  # untrained
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
    record = load_runs(tmp_path)[0]
    assert record["runtime"]["threads"] == 1 and record["runtime"]["deterministic"] is True
    assert not list(tmp_path.glob("runs/*.lock*"))  # the driver released its claims


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
    assert main(["sweep", "--dataset", "imagenet", "--out", str(out)]) == 2


def test_penalty_kind_is_a_setting_with_a_results_column(tmp_path) -> None:
    """--penalty picks the variant; eq13 keeps old ids; lambda 0 is one run for every kind;
    results.csv says which penalty each row used (older records: eq13)."""
    from splinelens.cli import main

    assert run_id(replace(BASE, lam=0.1, penalty_kind="eq13")) == run_id(replace(BASE, lam=0.1))
    assert run_id(replace(BASE, lam=0.1, penalty_kind="reference")) != run_id(
        replace(BASE, lam=0.1)
    )
    assert run_id(replace(BASE, penalty_kind="row-norm")) == run_id(BASE)  # lam 0
    with pytest.raises(ValueError, match="penalty_kind: expected one of eq13, reference"):
        TrainConfig(penalty_kind="l2")
    out = tmp_path / "ref"
    args = ["sweep", "--dataset", "digits", "--arch", "mlp", "--lambdas", "0,0.5", "--seeds"]
    args += ["1", "--epochs", "1", "--train-subset", "200", "--no-progress", "--out", str(out)]
    assert main([*args, "--penalty", "reference"]) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["penalty_kind"] for r in rows] == ["reference", "reference"]
    assert main([*args[:-2], "--out", str(tmp_path / "x"), "--penalty", "l2"]) == 2


def test_run_id_does_not_depend_on_number_types() -> None:
    assert run_id(replace(BASE, lam=1)) == run_id(replace(BASE, lam=1.0))
    assert TrainConfig(lam=1, lr=1).lam == 1.0 and isinstance(TrainConfig(lr=1).lr, float)


def test_sweep_folder_refuses_other_settings(tmp_path) -> None:
    run_sweep(BASE, [0.0], seeds=1, out=tmp_path)
    with pytest.raises(ValueError, match=r"other settings \(epochs: 2 -> 3\)"):
        run_sweep(replace(BASE, epochs=3), [0.0], seeds=1, out=tmp_path)
    assert len(run_sweep(BASE, [0.0, 0.1], seeds=1, out=tmp_path)) == 2  # more lambdas: fine


def _history(result) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in result.history]


def test_a_run_does_not_depend_on_the_callers_thread_count() -> None:
    """A Ray worker starts with 1 torch thread, a shell with one per core: same numbers."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = train(BASE)
        assert torch.get_num_threads() == 2  # the caller's setting is restored
        torch.set_num_threads(1)
        one = train(BASE)
    finally:
        torch.set_num_threads(before)
    assert _history(one) == _history(two)
    assert one.runtime == two.runtime
    assert one.runtime["threads"] == 1 and one.runtime["deterministic"] is True
    assert not torch.are_deterministic_algorithms_enabled()  # restored too


def test_run_ids_of_existing_sweeps_are_unchanged() -> None:
    """Ids computed before TrainConfig had ``threads``: folders of old sweeps stay valid."""
    assert run_id(TrainConfig(dataset="digits", arch="mlp", epochs=1)) == "1922830b58b8"
    assert run_id(TrainConfig()) == "bc910b3dc32a"
    fmnist = TrainConfig(epochs=12, train_subset=2000, test_subset=2000, progress=False)
    assert run_id(fmnist) == "8b4bb939c8b8"  # results/fmnist-2k, lam 0, seed 0
    assert run_id(replace(BASE, threads=2)) != run_id(BASE)  # a setting that may change results


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("lam", -0.1, "a finite number >= 0"),
        ("lam", math.nan, "a finite number >= 0"),
        ("seed", -1, "an integer >= 0"),
        ("epochs", 0, "an integer >= 1"),
        ("epochs", 1.5, "not an integer"),
        ("batch_size", 0, "an integer >= 1"),
        ("lr", 0.0, "a finite number > 0"),
        ("lr", math.inf, "a finite number > 0"),
        ("lr_decay", 0.0, "a number in (0, 1]"),
        ("lr_decay", 1.01, "a number in (0, 1]"),
        ("train_subset", -1, "an integer >= 0"),
        ("test_subset", -5, "an integer >= 0"),
        ("threads", 0, "an integer >= 1"),
        ("threads", 1025, "an integer >= 1 and <= 1024"),
        ("batch_size", 10**20, "an integer >= 1 and <= 2147483647"),
        ("seed", 2**31, "an integer >= 0 and <= 2147483647"),
        ("train_subset", 2**31, "an integer >= 0 and <= 2147483647 (0: all)"),
        ("epochs", "1_0", "'1_0' is not an integer"),
        ("epochs", "\u0663", "'\u0663' is not an integer"),  # an Arabic-Indic 3
        ("lr", "1_0.5", "'1_0.5' is not a number"),
        ("lr", "fast", "not a number"),
        ("epochs", True, "True is a bool, not an integer"),
        ("seed", False, "False is a bool, not an integer"),
        ("lr", True, "True is a bool, not a number"),
        ("lam", True, "True is a bool, not a number"),
        ("device", "gpu", "'gpu' is not a device"),
        ("device", "meta", "'meta' holds shapes, no data"),
        ("device", 0, "0 is not a device name"),
    ],
)
def test_config_refuses_values_out_of_range(field, value, expected) -> None:
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}: .*{re.escape(expected)}"):
        replace(BASE, **{field: value})


def _corrupt_sweep(tmp_path):
    """A finished 3-run sweep whose records are, in turn: truncated, a list, valid."""
    run_sweep(BASE, [0.0, 1.0, 2.0], seeds=1, out=tmp_path)
    paths = [tmp_path / "runs" / f"{run_id(replace(BASE, lam=x))}.json" for x in (0.0, 1.0)]
    paths[0].write_text(paths[0].read_text()[:100])
    paths[1].write_text("[1, 2]")
    return paths


def test_sweep_reruns_corrupt_records(tmp_path, monkeypatch) -> None:
    truncated, wrong = _corrupt_sweep(tmp_path)
    calls = []
    real = sweep_mod.run_one
    monkeypatch.setattr(sweep_mod, "run_one", lambda c, *a: calls.append(c.lam) or real(c, *a))
    with pytest.warns(sweep_mod.RunRecordWarning) as caught:
        rows = run_sweep(BASE, [0.0, 1.0, 2.0], seeds=1, out=tmp_path)
    said = " ".join(str(w.message) for w in caught)
    assert str(truncated) in said and str(wrong) in said and "re-run" in said
    assert sorted(calls) == [0.0, 1.0]  # the valid run is not trained again
    assert [r["status"] for r in rows] == ["finished"] * 3
    assert json.loads(truncated.read_text())["status"] == "finished"


def test_sweep_with_checkpoints_retrains_runs_whose_checkpoint_is_lost(tmp_path, monkeypatch):
    """With checkpoints, a finished run is done only with a readable checkpoint: a truncated
    one and a deleted one are trained again, with a warning each; the others are not."""
    run_sweep(BASE, [0.0, 1.0, 2.0], seeds=1, out=tmp_path, checkpoints=True)
    ckpts = sorted((tmp_path / "runs").glob("*.safetensors"))
    assert len(ckpts) == 3
    ckpts[0].write_bytes(ckpts[0].read_bytes()[:50])
    ckpts[1].unlink()
    calls = []
    real = sweep_mod.run_one
    monkeypatch.setattr(sweep_mod, "run_one", lambda c, *a: calls.append(c) or real(c, *a))
    with pytest.warns(sweep_mod.RunRecordWarning, match="checkpoint is missing or unreadable"):
        run_sweep(BASE, [0.0, 1.0, 2.0], seeds=1, out=tmp_path, checkpoints=True)
    assert sorted(run_id(c) for c in calls) == sorted(p.stem for p in ckpts[:2])
    assert all(checkpoint_problem(p) == "" for p in ckpts)
    calls.clear()
    run_sweep(BASE, [0.0, 1.0, 2.0], seeds=1, out=tmp_path)  # without: the records suffice
    assert calls == []


def test_plot_sweep_skips_corrupt_records(tmp_path) -> None:
    bad = [*_corrupt_sweep(tmp_path), tmp_path / "runs" / "notes.json"]
    bad[2].write_text('{"run_id": "notes"}')
    with pytest.warns(sweep_mod.RunRecordWarning) as caught:
        rows = report(tmp_path)
    said = [str(w.message) for w in caught]
    assert all(any(str(p) in m and "skipped" in m for m in said) for p in bad)
    assert [r["lam"] for r in rows] == [2.0]
    assert (tmp_path / "fig3a.png").stat().st_size > 0


def test_cuda_is_syntax_at_config_time_and_one_line_at_run_time(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = replace(BASE, device="cuda:1")  # a valid name, wherever it is written
    with pytest.raises(ValueError, match=r"^device 'cuda:1': cuda is not available on this"):
        train(cfg)
    assert replace(BASE, device=torch.device("cpu")).device == "cpu"


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    """The record of a finished run of BASE, to corrupt."""
    out = tmp_path_factory.mktemp("one-run")
    run_sweep(BASE, [0.0], seeds=1, out=out)
    return json.loads((out / "runs" / f"{run_id(BASE)}.json").read_text())


def _set(record: dict, where: str, value) -> dict:
    """A deep copy of ``record`` with ``where`` ("a.b", "history.0.c") set, or deleted (...)."""
    record = json.loads(json.dumps(record))
    keys = [int(k) if k.isdigit() else k for k in where.split(".")]
    obj = record
    for key in keys[:-1]:
        obj = obj[key]
    if value is ...:
        del obj[keys[-1]]
    else:
        obj[keys[-1]] = value
    return record


@pytest.mark.parametrize(
    ("where", "value", "why"),
    [
        ("history.0.test_acc", ..., "no history[0].test_acc"),
        ("history.1.test_acc", "0.9", "history[1].test_acc is '0.9', not a finite number"),
        ("history.0.train_err", math.nan, "history[0].train_err is nan, not a finite number"),
        ("history.0.epoch", None, "history[0].epoch is None, not a finite number"),
        ("history.1", [0.5], "history[1] is [0.5], not an object"),
        ("config.lam", "abc", "config.lam is 'abc', not a finite number >= 0"),
        ("config.lam", -1.0, "config.lam is -1.0, not a finite number >= 0"),
        ("config.lam", math.inf, "config.lam is inf, not a finite number >= 0"),
        ("config.seed", True, "config.seed is True, not an integer"),
        ("config.epochs", 2.5, "config.epochs is 2.5, not an integer"),
        ("config.dataset", 7, "config.dataset is 7, not a name"),
        ("test_acc", True, "test_acc is True, not a finite number"),
        ("test_acc", math.nan, "test_acc is nan, not a finite number"),
        ("best_test_acc", math.inf, "best_test_acc is inf, not a finite number"),
        ("train_err", -math.inf, "train_err is -inf, not a finite number"),
        pytest.param("train_err", 10**400, "train_err is 1000", id="train_err-beyond-float"),
        ("train_err", ..., "no train_err"),
        ("config.lam", 0.5, f"its config is that of run {run_id(replace(BASE, lam=0.5))}, not"),
        ("config.epochs", 3, f"its config is that of run {run_id(replace(BASE, epochs=3))}"),
        ("config.device", "gpu", "config.device: 'gpu' is not a device"),
        ("config.lr", 0, "config.lr: expected a finite number > 0, got 0"),
        ("config.colour", "red", "config.colour is not a setting of a run"),
        ("test_acc", 0.123456, "test_acc is 0.123456, but its history gives"),
        ("best_test_acc", 0.0, "best_test_acc is 0.0, but its history gives"),
        ("train_err", 0.5, "train_err is 0.5, but its history gives"),
        ("penalty", 1e6, "penalty is 1000000.0, but its history gives"),
        ("history.1", ..., "1 epochs of history, but config.epochs is 2"),
        # (found in review: a finished run marked failed was counted diverged, its numbers kept)
        ("status", "failed", "a failed run without its error, or with a history"),
    ],
)
def test_records_that_are_json_but_not_records_are_invalid(one_run, tmp_path, where, value, why):
    """Named in a warning, re-run by the sweep, skipped by plot-sweep; never a crash."""
    (tmp_path / "runs").mkdir()
    path = tmp_path / "runs" / f"{run_id(BASE)}.json"
    path.write_text(json.dumps(_set(one_run, where, value)))  # NaN and Infinity as JSON has them
    with pytest.warns(sweep_mod.RunRecordWarning) as caught:
        assert load_runs(tmp_path) == []
    (said,) = [str(w.message) for w in caught]
    assert said.startswith(f"{path} is not a valid run record ({why}")
    assert "skipped" in said
    with pytest.warns(sweep_mod.RunRecordWarning, match="it will be re-run"):
        assert not sweep_mod._done(tmp_path, BASE)


def test_sweep_reruns_and_plot_skips_a_record_with_nan(tmp_path, monkeypatch, capsys) -> None:
    from splinelens.cli import main

    run_sweep(BASE, [0.0, 1.0], seeds=1, out=tmp_path)
    path = tmp_path / "runs" / f"{run_id(BASE)}.json"
    path.write_text(json.dumps(_set(json.loads(path.read_text()), "test_acc", math.nan)))
    assert main(["plot-sweep", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"{path} is not a valid run record (test_acc is nan" in err
    assert "| 1 | 1 |" in (tmp_path / "table.md").read_text()  # lambda 1 alone
    calls = []
    real = sweep_mod.run_one
    monkeypatch.setattr(sweep_mod, "run_one", lambda c, *a: calls.append(c.lam) or real(c, *a))
    with pytest.warns(sweep_mod.RunRecordWarning, match="re-run"):
        rows = run_sweep(BASE, [0.0, 1.0], seeds=1, out=tmp_path)
    assert calls == [0.0] and [r["status"] for r in rows] == ["finished"] * 2


def test_a_record_edited_under_its_own_name_is_rerun_not_trusted(tmp_path, monkeypatch) -> None:
    """lam 0.5 -> 0 in the record of (0.5, 0): not reported under lambda 0, and re-run."""
    run_sweep(BASE, [0.0, 0.5], seeds=1, out=tmp_path)
    path = tmp_path / "runs" / f"{run_id(replace(BASE, lam=0.5))}.json"
    path.write_text(json.dumps(_set(json.loads(path.read_text()), "config.lam", 0.0)))
    with pytest.warns(
        sweep_mod.RunRecordWarning, match=re.escape(f"{path} is not a valid run record")
    ):
        assert [r["config"]["lam"] for r in load_runs(tmp_path)] == [0.0]
    calls = []
    real = sweep_mod.run_one
    monkeypatch.setattr(sweep_mod, "run_one", lambda c, *a: calls.append(c.lam) or real(c, *a))
    with pytest.warns(sweep_mod.RunRecordWarning, match="it will be re-run"):
        rows = run_sweep(BASE, [0.0, 0.5], seeds=1, out=tmp_path)
    assert calls == [0.5] and [r["lam"] for r in rows] == [0.0, 0.5]


def test_a_folder_without_sweep_json_keeps_its_settings(tmp_path) -> None:
    """sweep --epochs 1, rm sweep.json, sweep --epochs 2: refused, not mixed."""
    one = replace(BASE, epochs=1)
    run_sweep(one, [0.0], seeds=1, out=tmp_path)
    (tmp_path / "sweep.json").unlink()
    record = tmp_path / "runs" / f"{run_id(one)}.json"
    with pytest.raises(
        ValueError, match=re.escape(f"other settings (epochs: 1 -> 2; see {record})")
    ):
        run_sweep(BASE, [0.0], seeds=1, out=tmp_path)
    assert [p.name for p in (tmp_path / "runs").glob("*.json")] == [record.name]
    assert len(run_sweep(one, [0.0, 0.1], seeds=1, out=tmp_path)) == 2  # same settings: fine


@pytest.mark.parametrize("with_sweep_json", [True, False])
def test_runs_of_other_settings_are_not_plotted_together(tmp_path, with_sweep_json) -> None:
    from splinelens.cli import main

    one, two = tmp_path / "one", tmp_path / "two"
    run_sweep(replace(BASE, epochs=1), [0.0], seeds=1, out=one)
    run_sweep(BASE, [0.5], seeds=1, out=two)
    odd = one / "runs" / f"{run_id(replace(BASE, lam=0.5))}.json"
    odd.write_text((two / "runs" / odd.name).read_text())  # copied in from another sweep
    own = one / "runs" / f"{run_id(replace(BASE, epochs=1))}.json"
    epochs = {one / "sweep.json": 1, own: 1, odd: 2}
    pair = [one / "sweep.json", odd] if with_sweep_json else sorted([own, odd])  # file order
    if not with_sweep_json:
        (one / "sweep.json").unlink()
    changes = f"epochs: {epochs[pair[0]]} -> {epochs[pair[1]]}"
    said = re.escape(f"{pair[0]} and {pair[1]} are of different settings ({changes})")
    with pytest.raises(ValueError, match=said):
        load_runs(one)
    with pytest.raises(ValueError, match=said):
        report(one)
    assert main(["plot-sweep", str(one)]) == 2
    assert not (one / "fig3a.png").exists()


def test_a_sweep_of_too_many_runs_is_refused_before_anything_is_built(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(sweep_mod, "configs", lambda *a: pytest.fail("the grid was built"))
    big = "2 lambdas x 600000 seeds is 1,200,000 runs; a sweep holds at most 1,000,000"
    with pytest.raises(ValueError, match=big):
        run_sweep(BASE, [0.0, 0.1], seeds=600_000, out=tmp_path / "a")
    with pytest.raises(ValueError, match=r"seeds: expected an integer >= 1, got 2\.0"):
        run_sweep(BASE, [0.0], seeds=2.0, out=tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_a_folder_that_cannot_hold_a_sweep_is_refused_before_training(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(sweep_mod, "run_one", lambda *a: pytest.fail("trained"))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "runs").write_text("")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'a' / 'runs'} is a file")):
        run_sweep(BASE, [0.0], seeds=1, out=tmp_path / "a")
    (tmp_path / "b" / "results.csv").mkdir(parents=True)
    with pytest.raises(
        ValueError, match=re.escape(f"{tmp_path / 'b' / 'results.csv'} is a directory")
    ):
        run_sweep(BASE, [0.0], seeds=1, out=tmp_path / "b")
    assert not (tmp_path / "b" / "runs").exists()


def test_a_sweep_of_runs_trained_on_two_kinds_of_device_says_so(tmp_path) -> None:
    """Run ids do not name the device, so a sweep resumed on a GPU takes up the CPU's runs; its
    records then hold two kinds of device (runtime.device), whose numbers differ in their last
    digits: loading them warns, naming both (one kind, or a device index, is quiet)."""
    run_sweep(BASE, [0.0, 0.5], seeds=1, out=tmp_path)
    path = tmp_path / "runs" / f"{run_id(replace(BASE, lam=0.5))}.json"
    rec = json.loads(path.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_runs(tmp_path)) == 2  # all on the cpu: no warning
    rec["runtime"]["device"] = "cuda:0"  # as a GPU machine resuming the sweep writes it
    path.write_text(json.dumps(rec))
    with pytest.warns(MixedDevicesWarning, match="trained on cpu and cuda"):
        assert len(load_runs(tmp_path)) == 2


def test_sweeps_of_other_penalty_kinds_are_not_mixed_in_one_folder(tmp_path) -> None:
    """A --penalty reference sweep into an eq13 sweep's folder was accepted: its lambda > 0
    runs were averaged with the eq13 ones in one table row (the kind was compared only where
    lambda > 0, and a sweep's base config has lambda = 0)."""
    base = replace(BASE, epochs=1, train_subset=100, test_subset=50)
    run_sweep(base, [0.0, 0.1], seeds=1, out=tmp_path)
    with pytest.raises(ValueError, match=r"penalty_kind: 'eq13' -> 'reference'"):
        run_sweep(replace(base, penalty_kind="reference"), [0.0, 0.1], seeds=1, out=tmp_path)
    assert len(load_runs(tmp_path)) == 2
    rec = next((tmp_path / "runs").glob("*.json"))  # a record of the other kind (an old folder)
    data = json.loads(rec.read_text())
    data["config"]["penalty_kind"] = "reference"
    rec.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"penalty_kind"):
        report(tmp_path)


def test_failed_runs_are_counted_in_the_table(tmp_path, monkeypatch) -> None:
    """3 of 4 runs at lambda = 1 diverged: the table showed 1 run and its mean, with nothing
    saying the others failed; a lambda whose runs all failed was left out of the table."""
    base = replace(BASE, epochs=1, train_subset=100, test_subset=50)
    real = sweep_mod.train

    def diverge(cfg, *args):
        if cfg.lam > 0 and (cfg.seed >= 1 or cfg.lam == 2.0):
            raise DivergedError("loss became nan")
        return real(cfg, *args)

    monkeypatch.setattr(sweep_mod, "train", diverge)
    run_sweep(base, [0.0, 1.0, 2.0], seeds=4, out=tmp_path)
    with pytest.warns(UserWarning, match=r"7 of 12 runs failed \(lambda 1: 3 of 4, 2: 4 of 4\)"):
        rows = report(tmp_path)
    assert [(r["lam"], r["runs"], r["failed"]) for r in rows] == [(0, 4, 0), (1, 1, 3), (2, 0, 4)]
    assert math.isnan(rows[2]["mean"])
    md = (tmp_path / "table.md").read_text()
    assert "| failed |" in md and "| 1 | 1 | 3 |" in md


@pytest.mark.parametrize("field", ["dataset", "arch"])
def test_an_unknown_dataset_or_architecture_is_refused_by_the_config(field: str) -> None:
    """TrainConfig(dataset="nope") was accepted, and a sweep failed later with a KeyError."""
    with pytest.raises(ValueError, match=rf"TrainConfig.{field}: expected one of .*got 'nope'"):
        replace(BASE, **{field: "nope"})


def test_a_gpu_run_records_that_determinism_only_warns(monkeypatch) -> None:
    """A GPU run's record said "deterministic": True, but torch only warns for the CUDA ops
    without a deterministic kernel (max-pool's backward): two runs may differ (found in
    review). Reference: the record of a run on a device other than the CPU, faked."""
    import splinelens.paper.train as train_mod

    monkeypatch.setattr(train_mod, "resolve_device", lambda device: torch.device("cuda"))
    assert train_mod.runtime(BASE)["deterministic"] == "warn_only"


def test_an_optimizer_state_that_overflows_is_a_divergence() -> None:
    """With lam = 1e36 the penalty's gradient squared overflowed Adam's float32 state to inf:
    every step was 0, and the run "finished" with its classifier as initialised, its numbers
    plausible (found in review). Reference: the loss stays finite, so only the state tells."""
    with pytest.raises(DivergedError, match="optimizer's state overflowed"):
        train(replace(BASE, lam=1e36, epochs=1))
