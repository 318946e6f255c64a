"""The command line speaks like one: a user error is one line on stderr and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from splinelens import cli
from splinelens.cli import main
from splinelens.paper import report as sweep_report
from splinelens.paper import sweep as sweep_mod
from splinelens.paper import train

LAMBDAS = "expected comma-separated non-negative numbers such as 0,0.01,0.1"


@pytest.fixture
def nothing_runs(monkeypatch):
    """Loading data, training or sweeping would be an internal error (exit status 1)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the command line was checked")

    for module, name in [(sweep_mod, "run_sweep"), (train, "load_data"), (train, "train")]:
        monkeypatch.setattr(module, name, forbidden)


def _error(capsys, argv: list[str], status: int = 2) -> str:
    """Run ``splinelens argv``; check the status and that stderr is one error line; return it."""
    assert main(argv) == status
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("splinelens: error: ")
    assert "Traceback" not in captured.err
    return lines[0].removeprefix("splinelens: error: ")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--lambdas", "a"], f"--lambdas: 'a' is not a number; {LAMBDAS}"),
        (["--lambdas", "0,,1"], f"--lambdas: an empty value in '0,,1'; {LAMBDAS}"),
        (["--lambdas", "nan"], "--lambdas: 'nan' is not finite"),
        (["--lambdas", "0,inf"], "--lambdas: 'inf' is not finite"),
        (["--lambdas=-1"], "--lambdas: '-1' is negative"),
        (["--lambdas", ""], f"--lambdas: no values; {LAMBDAS}"),
        (["--lambdas", "0,0.1,0.1"], "--lambdas: '0.1' appears twice in '0,0.1,0.1'"),
        (["--lambdas", "0,0.1,0.10"], "--lambdas: '0.10' equals '0.1' as a number"),
        (["--lambdas", "0,1e-400"], "--lambdas: '1e-400' equals '0' as a number"),
        (["--lambdas", "0,1_0"], "--lambdas: '1_0' is not a number"),
        (["--seeds", "0"], "--seeds: expected an integer >= 1 and <= 2147483647, got '0'"),
        (["--seeds", "two"], "--seeds: expected an integer >= 1 and <= 2147483647, got 'two'"),
        (["--seeds", "1_0"], "--seeds: expected an integer >= 1 and <= 2147483647, got '1_0'"),
        (
            ["--seeds", "1000000000000"],
            "--seeds: expected an integer >= 1 and <= 2147483647, got '1000000000000'",
        ),
        (["--seeds", "250001"], "--seeds/--lambdas: 4 lambdas x 250001 seeds is 1,000,004 runs"),
        (["--epochs", "1_0"], "--epochs: '1_0' is not an integer"),
        (["--lr", "1_0"], "--lr: '1_0' is not a number"),
        (
            ["--batch-size", "100000000000000000000"],
            "--batch-size: expected an integer >= 1 and <= 2147483647, got '1000",
        ),
        (["--threads", "100000"], "--threads: expected an integer >= 1 and <= 1024"),
        (["--data-dir", "/no/such/dir"], "--data-dir: /no/such/dir: not found; expected an"),
        (["--epochs", "0"], "--epochs: expected an integer >= 1 and <= 2147483647, got '0'"),
        (["--epochs", "1.5"], "--epochs: '1.5' is not an integer"),
        (["--batch-size", "-4"], "--batch-size: expected an integer >= 1"),
        (["--lr", "0"], "--lr: expected a finite number > 0, got '0'"),
        (["--lr", "nan"], "--lr: expected a finite number > 0, got 'nan'"),
        (["--lr-decay", "0"], "--lr-decay: expected a number in (0, 1]"),
        (["--lr-decay", "1.2"], "--lr-decay: expected a number in (0, 1]"),
        (["--train-subset", "-1"], "--train-subset: expected an integer >= 0"),
        (["--test-subset", "-1"], "--test-subset: expected an integer >= 0"),
        (["--threads", "0"], "--threads: expected an integer >= 1"),
        (["--dataset", "imagenet"], "--dataset: invalid choice: 'imagenet'"),
        (["--backend", "slurm"], "--backend: invalid choice: 'slurm'"),
    ],
)
def test_sweep_refuses_bad_options_up_front(tmp_path, capsys, nothing_runs, options, message):
    line = _error(capsys, ["sweep", "--out", str(tmp_path / "s"), *options])
    assert line.startswith(message)
    assert not (tmp_path / "s").exists()


def test_out_must_be_a_writable_directory(tmp_path, capsys, monkeypatch, nothing_runs) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    line = _error(capsys, ["sweep", "--out", str(afile)])
    assert line == f"--out: {afile} is a file; expected a directory"
    line = _error(capsys, ["sweep", "--out", str(afile / "sub" / "dir")])
    assert line == f"--out: {afile} is a file, so {afile / 'sub' / 'dir'} cannot be a directory"
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real(p, mode))
    line = _error(capsys, ["demo", "--out", str(locked / "new")])
    assert line.startswith(f"--out: {locked} is not writable")


def test_sweep_out_must_hold_runs_and_results(tmp_path, capsys, nothing_runs) -> None:
    """Checked before any work: not after training, as "File exists" or "Is a directory"."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "runs").write_text("")
    line = _error(capsys, ["sweep", "--out", str(tmp_path / "a")])
    runs = tmp_path / "a" / "runs"
    assert line == f"--out: {runs} is a file; a sweep keeps its runs in that directory"
    (tmp_path / "b" / "results.csv").mkdir(parents=True)
    line = _error(capsys, ["sweep", "--out", str(tmp_path / "b")])
    assert line.startswith(f"--out: {tmp_path / 'b' / 'results.csv'} is a directory")
    assert not (tmp_path / "b" / "runs").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--epochs", "0"], "--epochs: expected an integer >= 1"),
        (["demo", "--lam", "-1"], "--lam: expected a finite number >= 0"),
        (["demo", "--lam", "inf"], "--lam: expected a finite number >= 0"),
        (["demo", "--lam", "0"], "--lam: expected a number > 0: the demo compares lambda = 0"),
        (["check", "--batch", "0"], "--batch: expected an integer >= 1"),
        (["check", "--batch", "1_0"], "--batch: expected an integer >= 1"),
        (["demo", "--epochs", "1_0"], "--epochs: '1_0' is not an integer"),
        (["plot-sweep", "/no/such/sweep"], "dir: /no/such/sweep: not found"),
        (["sweep"], "the following arguments are required: --out"),
        (["frobnicate"], "command: invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: command"),
    ],
)
def test_other_commands_refuse_bad_options(capsys, nothing_runs, argv, message) -> None:
    assert _error(capsys, argv).startswith(message)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--checkpoint", "/no/such/w.pt"], "--checkpoint: /no/such/w.pt: not found"),
        (["--n", "0"], "--n: expected an integer >= 1"),
        (["--data-dir", "/no/such/dir"], "--data-dir: /no/such/dir: not found"),
        (["--what", "templates,vibes"], "--what: 'vibes' is not an analysis"),
    ],
)
def test_analyze_refuses_bad_options(tmp_path, capsys, nothing_runs, options, message) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    argv = ["analyze", "--dataset", "digits", "--arch", "mlp", "--checkpoint", str(weights)]
    assert _error(capsys, [*argv, "--out", str(tmp_path / "a"), *options]).startswith(message)


def test_user_errors_while_running_are_one_line(tmp_path, capsys) -> None:
    line = _error(capsys, ["plot-sweep", str(tmp_path)])
    assert line == f"{tmp_path} holds no finished runs (expected {tmp_path}/runs/*.json)"
    (tmp_path / "sweep.json").write_text('{"base": {"epochs": 3')  # truncated
    line = _error(capsys, ["sweep", "--dataset", "digits", "--out", str(tmp_path)])
    assert line.startswith(f"{tmp_path / 'sweep.json'} does not describe a sweep")


@pytest.mark.parametrize(
    ("error", "status", "message"),
    [
        (FileNotFoundError(2, "No such file or directory", "x.idx"), 2, "x.idx: No such file"),
        (PermissionError(13, "Permission denied", "out"), 2, "out: Permission denied"),
        (KeyError("unknown dataset 'x'"), 2, "unknown dataset 'x'"),
        (ImportError("digits needs scikit-learn"), 2, "digits needs scikit-learn"),
        (ZeroDivisionError("division by zero"), 1, "internal error: ZeroDivisionError: division"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
)
def test_errors_map_to_one_line_and_a_status(
    tmp_path, capsys, monkeypatch, error, status, message
) -> None:
    def boom(out):
        raise error

    monkeypatch.setattr(sweep_report, "report", boom)
    line = _error(capsys, ["plot-sweep", str(tmp_path)], status)
    assert line.startswith(message)
    assert ("--debug" in line) == (status == 1)


def test_debug_shows_the_traceback(tmp_path, monkeypatch) -> None:
    def boom(out):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(sweep_report, "report", boom)
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "plot-sweep", str(tmp_path)])
    monkeypatch.setenv("SPLINELENS_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["plot-sweep", str(tmp_path)])


def test_help_and_version_exit_zero(capsys) -> None:
    assert main(["--version"]) == 0
    assert main(["sweep", "--help"]) == 0
    assert "--lambdas" in capsys.readouterr().out


def test_the_installed_command_prints_one_line(tmp_path) -> None:
    """The real process: stderr is one line, no traceback, exit status 2."""
    argv = [sys.executable, "-m", "splinelens.cli", "sweep", "--lambdas", "0,x", "--out", "o"]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == f"splinelens: error: --lambdas: 'x' is not a number; {LAMBDAS}\n"
    assert proc.stdout == "" and not (tmp_path / "o").exists()


def test_warnings_are_one_line_each(tmp_path, capsys) -> None:
    from splinelens.paper.config import TrainConfig
    from splinelens.paper.sweep import run_sweep

    base = TrainConfig(dataset="digits", arch="mlp", epochs=1, train_subset=200, progress=False)
    run_sweep(base, [0.0, 0.1], seeds=1, out=tmp_path)
    broken = sorted((tmp_path / "runs").glob("*.json"))[0]
    broken.write_text("{")
    assert main(["plot-sweep", str(tmp_path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"splinelens: warning: {broken} is not a valid")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["check", "--device", "nonsense"], "--device: 'nonsense' is not a device"),
        (["check", "--device", "meta"], "--device: 'meta' holds shapes, no data"),
        (["check", "--device", "cuda"], "--device: cuda is not available on this machine"),
        (["check", "--device", "cuda:0"], "--device: cuda is not available on this machine"),
        (["check", "--device", "xla"], "--device: splinelens cannot run on xla"),
        (["sweep", "--out", "s", "--device", "gpu"], "--device: 'gpu' is not a device"),
        (["sweep", "--out", "s", "--device", "meta"], "--device: 'meta' holds shapes"),
        (["sweep", "--out", "s", "--device", "cuda"], "--device: cuda is not available"),
    ],
)
def test_device_is_checked_up_front(
    tmp_path, capsys, monkeypatch, nothing_runs, argv, message
) -> None:
    """Also where torch has CUDA: the check asks torch whether this machine has it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _error(capsys, argv).startswith(message)
    assert not (tmp_path / "s").exists()


def test_check_resolves_auto(capsys, monkeypatch) -> None:
    """``--device auto`` is cpu on a machine without CUDA (the view itself is not built here)."""
    seen = []
    fake = SimpleNamespace(layers=[], ok=True)
    monkeypatch.setattr(cli, "SplineView", lambda model, x: seen.append(x.device) or fake)
    monkeypatch.setattr(cli, "verify", lambda model, x: fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["check", "--device", "auto", "--batch", "2"]) == 0
    assert seen == [torch.device("cpu")]
    assert ", cpu, float64" in capsys.readouterr().out


def _state() -> dict[str, torch.Tensor]:
    """The state dict of a freshly built digits MLP (what ``analyze`` loads into)."""
    cfg = train.TrainConfig(dataset="digits", arch="mlp")
    return train.make_model(cfg, train.load_data(cfg)).state_dict()


def _bad_checkpoints(tmp_path: Path) -> list[tuple[Path, str]]:
    """Checkpoints that are not what the digits MLP needs, and the start of what is said."""
    good = _state()
    keys = list(good)
    first, last = keys[0], keys[-1]
    files = {
        "garbage.pt": (b"\x80\x02garbage" * 20, "not a PyTorch checkpoint, or one holding"),
        "empty.pt": (b"", "not a valid checkpoint (EOFError)"),
        "truncated.pt": (None, "not a valid checkpoint (PytorchStreamReader"),
        "garbage.safetensors": (b"garbage" * 20, "not a valid checkpoint (Error while"),
        "list.pt": ([torch.zeros(2)], "holds a list, not a state dict"),
        "numbers.pt": ({"a": 1}, "holds 'a': int, not a state dict (names to tensors)"),
        "missing.pt": (dict(list(good.items())[1:]), f"missing keys {first};"),
        "extra.pt": ({**good, "x.weight": torch.zeros(1)}, "unexpected keys x.weight;"),
        "shape.pt": (
            {**good, last: torch.zeros(3, 7)},
            f"shape mismatch for key {last}: checkpoint (3, 7) vs model {tuple(good[last].shape)}",
        ),
    }
    out = []
    for name, (content, message) in files.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is None:
            torch.save(good, path)
            path.write_bytes(path.read_bytes()[:200])
        else:
            torch.save(content, path)
        out.append((path, message))
    return out


def test_analyze_refuses_bad_checkpoints_in_one_line(tmp_path, capsys) -> None:
    pytest.importorskip("safetensors")
    argv = ["analyze", "--dataset", "digits", "--arch", "mlp", "--out", str(tmp_path / "a")]
    for path, message in _bad_checkpoints(tmp_path):
        line = _error(capsys, [*argv, "--checkpoint", str(path)])
        assert line.startswith(f"{path}: {message}"), line
    assert not (tmp_path / "a").exists()


def test_a_checkpoint_never_unpickles_objects(tmp_path) -> None:
    """``weights_only``: a pickle that would call a function is refused, and nothing runs."""
    marker = tmp_path / "made-by-the-pickle"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pt"
    torch.save({"0.weight": Payload()}, path)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="only tensors are loaded"):
        train.load_checkpoint(model, path)
    assert not marker.exists()
