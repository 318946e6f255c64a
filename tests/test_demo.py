"""The main job: `splinelens demo` writes every figure, the data behind them and report.html,
and the page renders with all its images in headless Chromium (when Chromium is installed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile

import pytest

pytest.importorskip("mlxtend")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    from splinelens.paper.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    run_demo(out, epochs=1, n_test=300)
    return out


def test_demo_writes_figures_data_and_report(demo_dir) -> None:
    for name in (
        "report.html",
        "templates.png",
        "bimodality_lam0.png",
        "bimodality_lam1.png",
        "neighbors.png",
        "neighbors.csv",
        "regions.csv",
        "template_stats.json",
        "results.json",
        "sweep/fig3a.png",
        "sweep/results.csv",
        "neighbors_grid.json",
        "templates.npz",
    ):
        assert (demo_dir / name).stat().st_size > 0, name
    facts = json.loads((demo_dir / "results.json").read_text())
    assert facts["convexity"]["is_convex_after"] is True
    assert facts["convexity"]["gap_after"] <= 1e-5 < facts["convexity"]["gap_before"]
    assert facts["bimodality"]["0"]["mean_correct"] > 0 > facts["bimodality"]["0"]["mean_wrong"]
    assert len(facts["regions"]) == 6 and len(facts["neighbors"]) == 6
    page = (demo_dir / "report.html").read_text()
    assert page.count("<img ") == 4 and "Proposition 5" in page


def test_report_renders_in_headless_chromium(demo_dir) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tempfile.mkdtemp()}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        (demo_dir / "report.html").as_uri(),
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert 'data-images-ok="4/4"' in dom  # every image loaded, with a real size


def test_analyze_command_on_a_checkpoint(demo_dir, tmp_path) -> None:
    from splinelens.cli import main

    ckpt = next((demo_dir / "sweep" / "runs").glob("*.safetensors"))
    out = tmp_path / "an"
    assert (
        main(
            [
                "analyze",
                "--dataset",
                "mnist-5k",
                "--arch",
                "small-cnn",
                "--checkpoint",
                str(ckpt),
                "--out",
                str(out),
                "--what",
                "regions,bimodality",
                "--n",
                "200",
            ]
        )
        == 0
    )
    facts = json.loads((out / "analysis.json").read_text())
    assert set(facts) == {"bimodality", "neighbors", "regions", "test_indices", "model"}
    lam = json.loads(ckpt.with_suffix(".json").read_text())["config"]["lam"]  # the run's
    assert (out / "regions.csv").exists() and (out / f"bimodality_lam{lam:g}.png").exists()
