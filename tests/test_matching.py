"""Greedy template matching (Sec. 5.1, Corollary 1): the gap against explicit affine maps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import splinelens as sl
from splinelens.geometry.matching import greedy_is_optimal
from tests import zoo

F64 = torch.float64


def explicit_gap(model: nn.Module, x: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """max over candidates (and x itself) of A[x'] x + B[x'] - f(x), from explicit A, B."""
    amap = sl.affine_map(model, torch.cat([x, cands]))
    a, b = amap.A.flatten(2).detach(), amap.B.detach()  # (N + M, C, D), (N + M, C)
    vals = torch.einsum("jcd,id->ijc", a, x.flatten(1)) + b  # (N, N + M, C)
    own = vals[torch.arange(len(x)), torch.arange(len(x))]  # (N, C): f(x)
    vals = torch.cat([own[:, None], vals[:, len(x) :]], 1)
    return vals.max(1).values - own


@pytest.mark.parametrize("name", ["mlp", "small_cnn", "resnet", "maxout", "splined_gelu_mlp"])
def test_gap_is_the_explicit_max_over_candidate_regions(name: str) -> None:
    model = zoo.build(name)
    x, cands = zoo.inputs(name, n=4), zoo.inputs(name, n=9, seed=5)
    got = sl.template_matching_gap(model, x, cands, chunk=8)  # several chunks
    torch.testing.assert_close(got.gap, explicit_gap(model, x, cands), rtol=0, atol=1e-10)
    assert (got.gap >= 0).all()
    assert ((got.argbest >= -1) & (got.argbest < len(cands))).all()


def test_gap_is_zero_for_an_input_convex_network() -> None:
    """Theorem 2 / Corollary 1: every region's map is a lower bound, greedy is optimal."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    net = net.double().eval()
    x = torch.randn(30, 4, dtype=F64)
    sl.make_input_convex(net, x)
    gap = sl.template_matching_gap(net, x, torch.randn(200, 4, dtype=F64) * 3)
    assert gap.gap.abs().max() <= 1e-12
    assert greedy_is_optimal(gap) and not gap.changes_class.any()


def test_gap_is_positive_on_a_hand_made_counter_example() -> None:
    """f(x) = (-relu(x), -0.5): at x = 1 the region of x' = -1 gives (0, -0.5) > (-1, -0.5);
    at x = -2 the region of x' = 3 gives (2, -0.5) > (0, -0.5)."""
    net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [0.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[-1.0, 0.0], [0.0, 0.0]]))
        net[2].bias.copy_(torch.tensor([0.0, -0.5]))
    x = torch.tensor([[1.0], [-2.0]], dtype=F64)
    gap = sl.template_matching_gap(net, x, torch.tensor([[-1.0], [3.0]], dtype=F64))
    torch.testing.assert_close(gap.gap, torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=F64))
    assert gap.changes_class.tolist() == [True, False]  # class 1 -> class 0 at x = 1
    assert gap.argbest[:, 0].tolist() == [0, 1] and gap.argbest[:, 1].tolist() == [-1, -1]
    assert not greedy_is_optimal(gap)


def test_a_gap_far_below_one_is_seen_with_its_scale() -> None:
    """The hand-made counter-example scaled by 1e-14: its gaps (1e-14, 2e-14) are below the
    default tolerance (1e4 epsilons of at least 1), and seen with f_scale of the outputs; an
    explicit f_scale was floored at 1 too. Reference: the gaps of the unscaled net, scaled."""
    net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [0.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[-1e-14, 0.0], [0.0, 0.0]], dtype=F64))
        net[2].bias.copy_(torch.tensor([0.0, -0.5e-14], dtype=F64))
    x = torch.tensor([[1.0], [-2.0]], dtype=F64)
    gap = sl.template_matching_gap(net, x, torch.tensor([[-1.0], [3.0]], dtype=F64))
    expected = torch.tensor([[1e-14, 0.0], [2e-14, 0.0]], dtype=F64)
    torch.testing.assert_close(gap.gap, expected, rtol=1e-12, atol=0)
    assert greedy_is_optimal(gap)  # (the default: to rounding of values of order 1)
    assert not greedy_is_optimal(gap, f_scale=2e-14)
    for bad in (-1.0, math.nan, math.inf):  # (a negative scale called a zero gap a gap)
        with pytest.raises(ValueError, match="f_scale must be a finite number >= 0"):
            greedy_is_optimal(gap, f_scale=bad)


def test_bad_candidates_are_refused() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double().eval()
    x = torch.randn(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="candidates must be a batch of inputs like x"):
        sl.template_matching_gap(net, x, torch.randn(4, 5, dtype=F64))
    with pytest.raises(ValueError, match="nan"):
        sl.template_matching_gap(net, x, torch.full((2, 3), float("nan"), dtype=F64))
