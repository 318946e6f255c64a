"""Template statistics, bimodality, region statistics and partition neighbours vs brute force."""

from __future__ import annotations

import pytest
import torch

import splinelens as sl
from splinelens.paper.neighbors import neighbor_stats, others, region_ids, region_stats
from splinelens.paper.templates import bimodality, template_responses, template_stats
from tests import zoo


def test_template_responses_are_inner_products() -> None:
    model, x = zoo.build("small_cnn"), zoo.inputs("small_cnn", 11)
    r = template_responses(model, x, batch_size=4)
    a = zoo.jacobian(model, x).flatten(2)  # (N, C, D)
    ref = torch.einsum("ncd,nd->nc", a, x.flatten(1))
    torch.testing.assert_close(r, ref, atol=1e-10, rtol=0)


def test_bimodality_numbers() -> None:
    r = torch.tensor([[3.0, -1.0, -1.0], [-2.0, 4.0, 0.0]], dtype=torch.float64)
    stats = bimodality(r, torch.tensor([0, 1]))
    assert stats["mean_correct"] == 3.5 and stats["mean_wrong"] == -1.0
    assert stats["ratio"] == -1.0 / 3.5 and stats["predicted_ratio"] == -0.5


def test_template_stats_against_explicit_templates() -> None:
    model, x = zoo.build("resnet"), zoo.inputs("resnet", 5)
    st = template_stats(model, x, batch_size=2)
    a = zoo.jacobian(model, x).flatten(2)
    torch.testing.assert_close(st["norm"], a.norm(dim=2), atol=1e-10, rtol=0)
    cos = torch.stack(
        [
            torch.stack(
                [
                    torch.dot(a[n, c], x[n].flatten()) / (a[n, c].norm() * x[n].norm())
                    for c in range(3)
                ]
            )
            for n in range(5)
        ]
    )
    torch.testing.assert_close(st["cos"], cos, atol=1e-10, rtol=0)
    torch.testing.assert_close(st["gram"], a @ a.transpose(1, 2), atol=1e-10, rtol=0)


def test_region_stats_brute_force() -> None:
    torch.manual_seed(0)
    model = zoo.build("mlp")
    x = torch.randn(300, 6, dtype=torch.float64) * 0.05  # small spread: shared regions
    codes = sl.partition_codes(model, x)
    rows = region_stats(codes)
    states = [c.states() for c in codes.layers]
    for i, row in enumerate(rows):
        keys = [tuple(s[n].tolist()) for s in states[i : i + 1] for n in range(300)]
        cum = [tuple(t for s in states[: i + 1] for t in s[n].tolist()) for n in range(300)]
        for ks, suffix in ((keys, ""), (cum, "_cumulative")):
            counts = {k: ks.count(k) for k in set(ks)}
            assert row["regions" + suffix] == len(counts)
            assert row["alone" + suffix] == sum(counts[k] == 1 for k in ks) / 300
            assert row["largest" + suffix] == max(counts.values()) / 300
    assert rows[1]["regions_cumulative"] >= rows[1]["regions"]


def test_region_stats_of_no_inputs_are_refused_by_name() -> None:
    """0 inputs raised torch's reshape error; their region ids are empty."""
    codes = sl.partition_codes(zoo.build("mlp"), torch.randn(3, 6, dtype=torch.float64))[:0]
    with pytest.raises(ValueError, match="the codes hold no inputs"):
        region_stats(codes)
    assert region_ids(codes, 0).shape == (0,)


def test_neighbor_stats_brute_force() -> None:
    model, x = zoo.build("small_cnn"), zoo.inputs("small_cnn", 40)
    y = torch.arange(40) % 3
    codes = sl.partition_codes(model, x)
    rows = neighbor_stats(codes, x, y, k=4)
    for i, row in enumerate(rows):
        d = sl.partition_distance(codes, codes, layer=i)
        idx = others(codes, i, 4)
        assert not (idx == torch.arange(40)[:, None]).any()  # never the input itself
        d.fill_diagonal_(float("inf"))
        kth = d.sort(1).values[:, 3:4]
        assert (d.gather(1, idx) <= kth).all()  # they are the 4 nearest others
        eucl = (x.flatten(1)[:, None] - x.flatten(1)[idx]).norm(dim=2).mean()
        assert row["euclidean"] == float(eucl)
        assert row["same_label"] == float((y[idx] == y[:, None]).float().mean())


def test_figures_for_grey_colour_and_signals(tmp_path, monkeypatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from splinelens.paper import figures

    for shape in [(1, 6, 6), (3, 6, 6), (2, 30)]:
        x = torch.randn(2, *shape)
        t = torch.randn(2, 3, *shape)
        p = figures.plot_templates(
            x,
            t,
            torch.randn(2, 3),
            [[0, 1, 2]] * 2,
            ["a", "b", "c"],
            tmp_path / f"t{len(shape)}{shape[0]}.png",
        )
        assert p.stat().st_size > 0
    shown = []
    imshow = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda ax, a, **kw: shown.append(a) or imshow(ax, a, **kw))
    img = torch.zeros(1, 1, 3, 2, 2)
    img[0, 0, 0, 0, 0] = 1.0
    figures.plot_templates(
        torch.zeros(1, 3, 2, 2), img, torch.ones(1, 1), [[0]], ["a"], tmp_path / "c.png"
    )
    template = shown[1]  # colour templates: 0 is mid-grey, sign is direction
    assert abs(float(template[1, 1, 0]) - 0.5) < 1e-6 and float(template[0, 0, 0]) == 1.0


def test_templates_figure_for_chosen_classes(tmp_path) -> None:
    from splinelens.paper.analyze import templates_figure
    from splinelens.paper.data import Data

    model, x = zoo.build("small_cnn"), zoo.inputs("small_cnn", 6)
    data = Data(
        "zoo",
        x,
        torch.zeros(6, dtype=torch.long),
        x,
        torch.zeros(6, dtype=torch.long),
        [str(c) for c in range(5)],
    )
    stats = templates_figure(model, x, data, tmp_path, classes=[4, 1], n=3)
    import numpy as np

    saved = np.load(tmp_path / "templates.npz")
    ref = zoo.jacobian(model, x[:3])[:, [4, 1]]
    assert np.allclose(saved["templates"], ref.detach().numpy(), atol=1e-10)
    assert saved["classes"].tolist() == [[4, 1]] * 3
    assert 0 <= stats["mean_abs_cos_with_x"] <= 1
