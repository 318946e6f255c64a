"""The paper's harness under kills, reruns and other working folders (found by a fuzzing review;
each test fails before its fix)."""

from __future__ import annotations

import json
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import torch

from splinelens.paper import analyze
from splinelens.paper.cli_options import data_dir
from splinelens.paper.report import report
from splinelens.paper.sweep import load_runs, run_sweep
from tests.test_train_sweep import BASE


def test_a_relative_data_dir_is_the_same_data_from_any_folder(tmp_path, monkeypatch) -> None:
    """--data-dir is part of a run's id: made absolute, a resume from another folder with the same
    relative text is another sweep (it trained on other data into the same results)."""
    for where in ("a", "b"):
        (tmp_path / where / "cif").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    first = data_dir("cif")
    monkeypatch.chdir(tmp_path / "b")
    assert first == str(tmp_path / "a" / "cif") and data_dir("cif") != first
    assert data_dir("") == ""


def test_the_report_of_some_lambdas_leaves_out_the_others(tmp_path) -> None:
    """The demo rerun with another lambda into the same folder reported the earlier lambda's
    run in Figure 3 too."""
    run_sweep(BASE, [0.0, 1.0], seeds=1, out=tmp_path)
    run_sweep(BASE, [0.0, 0.5], seeds=1, out=tmp_path)
    assert len(load_runs(tmp_path)) == 3
    rows = report(tmp_path, lambdas=[0.0, 0.5])
    assert [r["lam"] for r in rows] == [0.0, 0.5]
    assert [r["lam"] for r in report(tmp_path)] == [0.0, 0.5, 1.0]


def test_templates_npz_is_written_atomically(tmp_path, monkeypatch) -> None:
    """A write killed half way left a truncated templates.npz over the good one (np.savez wrote
    the final file directly); an interrupted write now keeps the old file whole."""
    old = tmp_path / "templates.npz"
    np.savez(old, kept=np.arange(3))
    calls = {"n": 0}
    real = np.savez

    def dies(f, **arrays):  # writes a part, then the process is gone
        calls["n"] += 1
        f.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", dies)
    monkeypatch.setattr(analyze.figures, "plot_templates", lambda *a, **k: None)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    net = torch.nn.Sequential(*net, torch.nn.ReLU(), torch.nn.Linear(3, 3)).eval()
    data = type("D", (), {"classes": ["a", "b", "c"]})()
    with pytest.raises(KeyboardInterrupt):
        analyze.templates_figure(net, torch.randn(6, 4), data, tmp_path, n=4)
    monkeypatch.setattr(np, "savez", real)
    assert calls["n"] == 1
    with zipfile.ZipFile(old):  # still the old, whole file
        assert list(np.load(old)) == ["kept"]


def test_a_sweep_that_fails_before_its_first_run_binds_no_settings(tmp_path, monkeypatch) -> None:
    """A first attempt that failed on its data (say, torchvision missing) left sweep.json, and
    the folder refused every sweep of other settings though it held no run."""
    from splinelens.paper import sweep as sweep_mod

    def no_data(*args, **kwargs):
        raise ValueError("the dataset needs torchvision")

    monkeypatch.setattr(sweep_mod, "_run_local", no_data)
    with pytest.raises(ValueError, match="torchvision"):
        run_sweep(BASE, [0.0], seeds=1, out=tmp_path)
    assert not (tmp_path / "sweep.json").exists()
    monkeypatch.undo()
    rows = run_sweep(replace(BASE, epochs=2), [0.0], seeds=1, out=tmp_path)  # other settings
    assert [r["status"] for r in rows] == ["finished"]
    monkeypatch.setattr(sweep_mod, "_run_local", no_data)
    with pytest.raises(ValueError, match="torchvision"):  # a sweep with runs keeps its file
        run_sweep(replace(BASE, epochs=2), [0.0, 1.0], seeds=1, out=tmp_path)
    assert (tmp_path / "sweep.json").exists()


def test_analyze_refuses_one_input_before_writing(tmp_path) -> None:
    """analyze --n 1 wrote the templates and bimodality files (with a raw torch warning) and
    refused only at the partition analyses; it refuses before writing anything now."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.ReLU())
    net = torch.nn.Sequential(*net, torch.nn.Linear(3, 3)).eval()
    data = type("D", (), {"test_x": torch.randn(5, 4), "test_y": torch.arange(5) % 3})()
    with pytest.raises(ValueError, match=r"bimodality, neighbors, regions need at least 2"):
        analyze.analyze(net, data, tmp_path / "out", n=1)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_damaged_after_its_run_is_trained_again(tmp_path, monkeypatch) -> None:
    """Only the safetensors header was checked: tensor bytes overwritten after the run were
    trusted (the demo analysed them). The run record keeps the checkpoint's sha256."""
    from splinelens.paper import sweep as sweep_mod

    run_sweep(BASE, [0.0], seeds=1, out=tmp_path, checkpoints=True)
    [ckpt] = (tmp_path / "runs").glob("*.safetensors")
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[:-8] + bytes(8))  # the last weights zeroed, the header intact
    calls = []
    real = sweep_mod.run_one
    monkeypatch.setattr(sweep_mod, "run_one", lambda c, *a: calls.append(c) or real(c, *a))
    with pytest.warns(sweep_mod.RunRecordWarning, match="sha256"):
        run_sweep(BASE, [0.0], seeds=1, out=tmp_path, checkpoints=True)
    assert len(calls) == 1 and ckpt.read_bytes() == good  # trained again, the same bytes
    calls.clear()
    run_sweep(BASE, [0.0], seeds=1, out=tmp_path, checkpoints=True)
    assert calls == []


def test_analyses_run_with_a_fixed_thread_count(tmp_path, monkeypatch) -> None:
    """analyze's float32 numbers differed between OMP_NUM_THREADS=1 and 2 (up to 5.7e-6 in
    responses_lam0.csv): its analyses now run with a fixed count, as training does."""
    seen = []
    monkeypatch.setattr(
        analyze, "templates_figure", lambda *a, **k: seen.append(torch.get_num_threads()) or {}
    )
    data = type("D", (), {"test_x": torch.randn(5, 4), "test_y": torch.arange(5) % 3})()
    before, net = torch.get_num_threads(), torch.nn.Linear(4, 3)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        analyze.analyze(net, data, tmp_path, what=("templates",), n=4)  # (one model a folder)
    torch.set_num_threads(before)
    assert seen == [analyze.ANALYSIS_THREADS] * 2


def _tiny_data() -> object:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 2, 2, generator=g), torch.arange(40) % 3
    return type("D", (), {"name": "tiny", "test_x": x, "test_y": y, "classes": list("abc")})()


def _tiny_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 6), torch.nn.ReLU())
    return torch.nn.Sequential(*net, torch.nn.Linear(6, 3)).eval()


def test_an_analysis_folder_holds_one_model(tmp_path) -> None:
    """A second analyze of another model into the same folder mixed its files with the first
    one's, and analysis.json kept only the second call's analyses; Figure 2's files were named
    "lam0" whatever the model was trained with."""
    data, out = _tiny_data(), tmp_path / "an"
    analyze.analyze(_tiny_net(0), data, out, what=("bimodality",), n=30)
    assert (out / "bimodality.png").exists() and (out / "responses.csv").exists()
    assert not list(out.glob("*lam*"))
    analyze.analyze(_tiny_net(0), data, out, what=("regions",), n=30)  # the same model: adds
    facts = json.loads((out / "analysis.json").read_text())
    assert {"bimodality", "regions", "model"} <= set(facts)
    assert facts["model"]["dataset"] == "tiny" and len(facts["model"]["weights_sha256"]) == 64
    for other, n in ((_tiny_net(1), 30), (_tiny_net(0), 20)):
        with pytest.raises(ValueError, match=r"holds the analysis of another model.* --out"):
            analyze.analyze(other, data, out, what=("regions",), n=n)
    elsewhere = _tiny_data()  # (one name, other data: a --data-dir elsewhere; found in review)
    elsewhere.test_x = elsewhere.test_x + 1
    with pytest.raises(ValueError, match=r"another model, dataset, data or n"):
        analyze.analyze(_tiny_net(0), elsewhere, out, what=("regions",), n=30)
    assert json.loads((out / "analysis.json").read_text()) == facts
    analyze.analyze(_tiny_net(0), data, tmp_path / "b", what=("bimodality",), n=30, lam=0.5)
    assert (tmp_path / "b" / "bimodality_lam0.5.png").exists()


def test_an_interrupted_analysis_still_holds_its_folder(tmp_path, monkeypatch) -> None:
    """analysis.json was written last: an analysis interrupted after its first figures left a
    folder that another model's analysis then filled, mixing the two models' files."""
    data, out = _tiny_data(), tmp_path / "an"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(analyze, "partition_figures", interrupted)
    with pytest.raises(KeyboardInterrupt):
        analyze.analyze(_tiny_net(0), data, out, what=("bimodality", "regions"), n=30)
    assert (out / "bimodality.png").exists()
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"holds the analysis of another model"):
        analyze.analyze(_tiny_net(1), data, out, what=("regions",), n=30)
    analyze.analyze(_tiny_net(0), data, out, what=("regions",), n=30)  # the same: goes on
    assert {"model", "regions"} <= set(json.loads((out / "analysis.json").read_text()))


def test_analyze_names_a_sweep_checkpoint_by_its_lambda(tmp_path) -> None:
    """The lambda = 1 run of a sweep was analysed into bimodality_lam0.*; its run record beside
    the checkpoint gives its lambda (when the record vouches for the checkpoint's bytes)."""
    from splinelens._io import file_sha256
    from splinelens.cli import main

    base = replace(BASE, epochs=1, train_subset=100, test_subset=50)
    run_sweep(base, [1.0], seeds=1, out=tmp_path / "s", checkpoints=True)
    (ckpt,) = (tmp_path / "s" / "runs").glob("*.safetensors")
    args = ["analyze", "--dataset", "digits", "--arch", "mlp", "--checkpoint", str(ckpt)]
    args += ["--what", "bimodality", "--n", "20", "--out"]
    assert main([*args, str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "bimodality_lam1.png").exists()
    facts = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert facts["model"]["checkpoint_sha256"] == file_sha256(ckpt)
    assert facts["model"]["lam"] == 1.0
    from splinelens.paper.records import checkpoint_source  # (what the CLI checks with)

    assert checkpoint_source(ckpt, {"dataset": "digits", "arch": "mlp"})[1] == 1.0
    with pytest.raises(ValueError, match=r"trained with dataset='digits', not 'mnist-5k'"):
        checkpoint_source(ckpt, {"dataset": "mnist-5k", "arch": "mlp"})  # (found in review)
    ckpt.with_suffix(".json").unlink()  # no record: no lambda
    assert main([*args, str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "bimodality.png").exists()


def test_an_atomic_write_syncs_its_bytes_before_the_rename(tmp_path, monkeypatch) -> None:
    """The file was renamed over the old one without fsync: after a power loss the new name could
    point at an empty file, and the old contents were gone."""
    import os

    from splinelens import _io

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    with _io.atomic_path(tmp_path / "f.txt") as tmp:
        tmp.write_text("new")
    assert events == ["fsync", "replace", "fsync"]  # the file, the rename, the folder
    assert (tmp_path / "f.txt").read_text() == "new"


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_an_atomic_write_gives_the_mode_a_write_in_place_gives(tmp_path, mask: int) -> None:
    """Every file was written 0644 whatever the umask (077: readable by all; 002: a shared
    folder's files not group-writable), and an existing file lost its own mode. Reference: the
    mode open() gives a new file under the same umask, and the existing file's mode."""
    import os

    from splinelens import _io

    old = os.umask(mask)
    try:
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        with _io.atomic_path(tmp_path / "new.txt") as tmp:
            tmp.write_text("new")
        with _io.atomic_path(tmp_path / "replaced.txt") as tmp:  # (as safetensors' save_file
            tmp.unlink()  # writes: its own 0600 file renamed over ours; found in review)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))
        (tmp_path / "kept.txt").write_text("old")
        os.chmod(tmp_path / "kept.txt", 0o640)
        with _io.atomic_path(tmp_path / "kept.txt") as tmp:
            tmp.write_text("new")
    finally:
        os.umask(old)
    mode = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    new = 0o666 & ~mask
    assert mode == {"plain.txt": new, "new.txt": new, "replaced.txt": new, "kept.txt": 0o640}
    assert (tmp_path / "kept.txt").read_text() == "new"


def test_an_atomic_write_through_a_symbolic_link_writes_its_target(tmp_path) -> None:
    """A link (results kept elsewhere, linked into a run folder) was replaced by a plain file,
    and its target kept the old contents. Reference: what writing through the link in place
    does (open() follows it), for an existing and for a missing target."""
    from splinelens import _io

    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "a.txt").write_text("old")
    (tmp_path / "a.txt").symlink_to(tmp_path / "store" / "a.txt")
    (tmp_path / "b.txt").symlink_to(tmp_path / "store" / "b.txt")  # (dangling)
    for name in ("a.txt", "b.txt"):
        with _io.atomic_path(tmp_path / name) as tmp:
            tmp.write_text(f"new {name}")
        assert (tmp_path / name).is_symlink()
        assert (tmp_path / "store" / name).read_text() == f"new {name}"
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["a.txt", "b.txt"]


def test_an_atomic_write_refuses_what_a_write_in_place_refuses(tmp_path) -> None:
    """A loop of links raised RuntimeError (not an OSError); a link into a missing folder made
    that folder; a setuid file's bit was kept on the new file (a write in place clears it).
    Reference: what open() does with the same paths."""
    import errno
    import os

    from splinelens import _io

    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "far").symlink_to(tmp_path / "nowhere" / "deep" / "f.txt")
    for name, code in (("a", errno.ELOOP), ("far", errno.ENOENT)):
        with pytest.raises(OSError) as plain:
            open(tmp_path / name, "w").close()
        with pytest.raises(OSError) as ours, _io.atomic_path(tmp_path / name) as tmp:
            tmp.write_text("x")
        assert plain.value.errno == ours.value.errno == code
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "tool").write_text("old")
    os.chmod(tmp_path / "tool", 0o4755)
    with _io.atomic_path(tmp_path / "tool") as tmp:
        tmp.write_text("new")
    assert (tmp_path / "tool").stat().st_mode & 0o7777 == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "far", "tool"]
