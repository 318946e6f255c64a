"""Theorem 2 checked on graphs, enforced by parametrisation, and verified numerically."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import splinelens.geometry.convexity as cv
from tests import zoo


def _mlp(act2: nn.Module, act1: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Linear(4, 16),
            act1 or nn.ReLU(),
            nn.Linear(16, 16),
            nn.BatchNorm1d(16),
            act2,
            nn.Linear(16, 3),
        )
        .double()
        .eval()
    )


X = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def test_default_network_is_not_convex_and_the_gap_shows_it() -> None:
    model = _mlp(nn.ReLU())
    report = cv.convexity(model, X)
    assert not report.is_convex
    assert any(r.startswith("2.weight has negative entries") for r in report.reasons)
    assert report.constrained == ["2.weight", "3.weight", "5.weight"]
    assert cv.convexity_gap(model, X) > 1e-3  # some region's plane cuts above f


def test_make_input_convex_gives_a_convex_network() -> None:
    model = _mlp(nn.LeakyReLU(0.2), act1=zoo.Abs())  # abs is fine in layer 1
    names = cv.make_input_convex(model, X)
    assert names == ["2.weight", "3.weight", "5.weight"]
    report = cv.convexity(model, X)
    assert report.is_convex, str(report)
    assert all(ok for _, ok in report.layers)
    assert cv.convexity_gap(model, X) <= 1e-12  # every region's map is a global lower bound
    assert (model[2].weight >= 0).all() and not model.training


def test_convex_cnn_with_max_pooling_and_residual() -> None:
    model = zoo.build("resnet")
    x = zoo.inputs("resnet", 24)
    cv.make_input_convex(model, x)
    assert cv.convexity(model, x).is_convex
    assert cv.convexity_gap(model, x) <= 1e-12


def test_non_convex_or_non_monotone_layers_are_named() -> None:
    report = cv.convexity(_mlp(nn.Hardtanh()), X)
    assert "layer 4 (hardtanh) is not a convex function" in report.reasons
    report = cv.convexity(_mlp(zoo.Abs()), X)
    assert any("(abs) is not non-decreasing" in r for r in report.reasons)
    assert report.layers[0] == ("1", True)
    leaky = cv.convexity(_mlp(nn.LeakyReLU(1.5)), X)
    assert any("leaky_relu) is not a convex function" in r for r in leaky.reasons)


class _Head(nn.Module):
    """ReLU features, then a hand-written head: parameter matmuls and signed sums."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 6)
        self.W = nn.Parameter(torch.randn(6, 3))
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l1(x))
        if self.mode == "matmul":
            return h @ self.W
        if self.mode == "matmul_t":
            return h @ self.W.T.T
        s = h.sum(1, keepdim=True)
        if self.mode == "add_neg":
            return torch.add(x[:, :1], s, alpha=-1)  # concave
        return torch.sub(x[:, :1], s, alpha=-1)  # x - (-s): convex


def test_signed_sums_with_alpha() -> None:
    torch.manual_seed(0)
    concave, convex = _Head("add_neg").double().eval(), _Head("sub_neg").double().eval()
    assert not cv.convexity(concave, X).is_convex and cv.convexity_gap(concave, X) > 1e-3
    assert cv.convexity(convex, X).is_convex and cv.convexity_gap(convex, X) <= 1e-12


@pytest.mark.parametrize(("alpha", "convex"), [(-1.0, False), (0.5, True)])
def test_index_add_of_a_convex_term_keeps_its_sign(alpha: float, convex: bool) -> None:
    """``index_add`` adds its source times alpha: a negative alpha subtracts a convex term
    (reference: the numerical gap, a region's plane above f, or none)."""

    class Added(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = nn.Linear(4, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.l1(x))  # (N, 6), convex
            places = torch.tensor([0, 0, 1, 1, 2, 2])
            return torch.zeros_like(x[:, :3]).index_add(1, places, h, alpha=alpha)

    torch.manual_seed(0)
    model = Added().double().eval()
    report = cv.convexity(model, X)
    assert report.is_convex is convex
    assert convex or any("subtracts a convex term" in r for r in report.reasons)
    gap = cv.convexity_gap(model, X)
    assert gap <= 1e-12 if convex else gap > 1e-3


def test_top_level_and_transposed_parameters_are_constrained() -> None:
    for mode in ("matmul", "matmul_t"):
        torch.manual_seed(0)
        model = _Head(mode).double().eval()
        assert cv.make_input_convex(model, X) == ["W"]
        assert cv.convexity(model, X).is_convex and cv.convexity_gap(model, X) <= 1e-12


def test_transposed_conv_bias_is_not_a_slope() -> None:
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Linear(4, 8), nn.ReLU(), nn.Unflatten(1, (2, 4)), nn.ConvTranspose1d(2, 2, 3)
        )
        .double()
        .eval()
    )
    model[3].weight.data.abs_()
    model[3].bias.data.fill_(-1.0)
    report = cv.convexity(model, X)
    assert report.is_convex and "3.bias" not in report.constrained


class _Upsampled(nn.Module):
    """ReLU features on a 2x3 grid, upsampled to 4x5, then a linear head."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.l1, self.head, self.mode = nn.Linear(4, 6), nn.Linear(20, 3), mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = torch.relu(self.l1(x)).reshape(-1, 1, 2, 3)
        return self.head(F.interpolate(grid, size=(4, 5), mode=self.mode).flatten(1))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_cubic_interpolation_weighs_negatively_and_is_named(mode: str) -> None:
    torch.manual_seed(0)
    model = _Upsampled(mode).double().eval()
    if mode == "bicubic":  # no parameter makes it convex: refused, the model left as it was
        with pytest.raises(ValueError, match=r"upsample_bicubic2d\) weighs some inputs negat"):
            cv.make_input_convex(model, X)
        assert not hasattr(model.head, "parametrizations")
    else:
        assert cv.make_input_convex(model, X) == ["head.weight"]
    report = cv.convexity(model, X)
    cubic = any("(upsample_bicubic2d) weighs some inputs negatively" in r for r in report.reasons)
    assert report.is_convex == (mode == "bilinear") and cubic == (mode == "bicubic")
    if mode == "bilinear":
        assert cv.convexity_gap(model, X) <= 1e-12


def test_make_input_convex_refuses_what_it_cannot_constrain_and_changes_nothing() -> None:
    """A weight_norm'd layer's weight is computed (no parameter to constrain): refused, naming
    it, with the model's parameters and parametrizations as they were (it returned [] before)."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), weight_norm(nn.Linear(6, 2))).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"(?s)left it as it was.*_weight_norm has negative"):
        cv.make_input_convex(model, torch.randn(8, 3))
    assert not hasattr(model[0], "parametrizations")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
