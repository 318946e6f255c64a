"""Elementwise MASOs on a batch merged with other dims (``h.reshape(-1, C)`` then a ReLU, as a
time-distributed layer is often written): exact maps, codes and slices, float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import splinelens as sl


class TimeDistributed(nn.Module):
    """(N, T, C) -> (N*T, C) -> linear -> ``act`` -> (N, T*H) -> linear: a per-step layer."""

    def __init__(self, act=torch.relu, steps: int = 4, channels: int = 3, hidden: int = 5) -> None:
        super().__init__()
        self.steps, self.act = steps, act
        self.l1, self.l2 = nn.Linear(channels, hidden), nn.Linear(steps * hidden, 2)

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-activations, (N, T, H): the reference for the codes."""
        return self.l1(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], self.steps, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.l1(x.reshape(-1, x.shape[-1])))  # (N*T, H): the batch merged
        return self.l2(h.reshape(x.shape[0], -1))  # (x.shape[0]: len(x) fixes N)


MODELS = {
    "relu": lambda: TimeDistributed(),
    "leaky_relu": lambda: TimeDistributed(lambda h: F.leaky_relu(h, 0.1)),
    "hardtanh": lambda: TimeDistributed(F.hardtanh),
    "abs": lambda: TimeDistributed(torch.abs),
}


def _jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.func.jacrev(lambda v: model(v[None])[0])(v) for v in x])


@pytest.mark.parametrize("name", list(MODELS))
def test_maps_of_a_merged_batch_are_exact_at_any_batch_size(name: str) -> None:
    """One view answers for batches of 1, 2 and 7: A against jacrev, B against f(x) - A x
    (float64, 1e-12); the layer's units are one sample's (T, H) pre-activations."""
    torch.manual_seed(0)
    model = MODELS[name]().double().eval()
    view = sl.SplineView(model, torch.randn(3, 4, 3, dtype=torch.float64))
    assert [(la.kind, la.shape, la.units) for la in view.layers] == [(name, (4, 5), 20)]
    for n in (1, 2, 7):
        x = torch.randn(n, 4, 3, dtype=torch.float64)
        amap, jac = view.affine_map(x), _jacobian(model, x)
        torch.testing.assert_close(amap.A, jac, rtol=0, atol=1e-12)
        with torch.no_grad():
            offsets = model(x) - torch.einsum("ncd,nd->nc", jac.flatten(2), x.flatten(1))
        torch.testing.assert_close(amap.B, offsets, rtol=0, atol=1e-12)


def test_codes_of_a_merged_batch_are_each_samples_own() -> None:
    """Partition codes against the signs of each sample's own pre-activations, in its (T, H)
    order, and the same for a sample alone as in a batch."""
    torch.manual_seed(0)
    model = TimeDistributed().double().eval()
    x = torch.randn(9, 4, 3, dtype=torch.float64)
    states = sl.partition_codes(model, x).layers[0].states()  # (N, T*H)
    with torch.no_grad():
        want = (model.pre(x) > 0).reshape(len(x), -1).long()
    assert torch.equal(states, want)
    assert torch.equal(sl.partition_codes(model, x[4:5]).layers[0].states(), want[4:5])


def test_a_layer_map_starts_at_the_merged_layer() -> None:
    """The map from the merged layer's output to the logits is l2 itself (reference: its
    weight), and from the input to that layer the per-step ReLU's Jacobian."""
    torch.manual_seed(0)
    model = TimeDistributed().double().eval()
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    head = sl.affine_map(model, x, start=0)
    torch.testing.assert_close(
        head.A, model.l2.weight.detach().expand(3, 2, 20).reshape(3, 2, 4, 5)
    )
    layer = sl.affine_map(model, x, end=0)
    jac = torch.stack(
        [torch.func.jacrev(lambda v: torch.relu(model.pre(v[None]))[0])(v) for v in x]
    )
    torch.testing.assert_close(layer.A, jac, rtol=0, atol=1e-12)


def test_slices_through_a_merged_batch_match_grid_samples() -> None:
    """Same region if and only if same code, and each region's affine logits, on random plane
    points (reference: codes and the forward pass)."""
    torch.manual_seed(0)
    model = TimeDistributed().double().eval()
    dirs = torch.randn(2, 4, 3, dtype=torch.float64)
    part = sl.slice_partition(model, torch.zeros(4, 3, dtype=torch.float64), dirs)
    keys = part.codes.layers[0].data.numpy()
    assert len(part) > 5 and len(np.unique(keys, axis=0)) == len(part)
    uv = np.random.default_rng(0).uniform(-3, 3, (2000, 2))
    region = part.locate(uv)
    x = part.to_input(uv)
    assert (sl.partition_codes(model, x).layers[0].data.numpy() == keys[region]).all()
    with torch.no_grad():
        f = model(x).numpy()
    pred = np.einsum("pck,pk->pc", part.logits[region], np.c_[uv, np.ones(len(uv))])
    np.testing.assert_allclose(pred, f, rtol=0, atol=1e-9 * max(1.0, np.abs(f).max()))


def test_region_radius_and_masos_of_a_merged_batch() -> None:
    """The ball of region_radius keeps every code (reference: codes on its sphere, just
    inside), and the layer is a MASO of the input as check_masos sees it."""
    torch.manual_seed(0)
    model = TimeDistributed().double().eval()
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    radius = sl.region_radius(model, x)
    codes = sl.partition_codes(model, x).layers[0].data
    d = F.normalize(torch.randn(64, 3, 12, dtype=torch.float64), dim=-1).reshape(64, 3, 4, 3)
    for k in range(64):
        inside = sl.partition_codes(model, x + 0.999 * radius[:, None, None] * d[k])
        assert torch.equal(inside.layers[0].data, codes)
    assert sl.check_masos(model, x).ok


def test_make_input_convex_reads_through_a_merged_batch() -> None:
    """A ReLU on a merged batch keeps a convex input convex: with l2 made nonnegative the network
    is convex (reference: the numerical gap)."""
    torch.manual_seed(0)
    model = TimeDistributed().double().eval()
    x = torch.randn(16, 4, 3, dtype=torch.float64)
    assert sl.make_input_convex(model, x) == ["l2.weight"]
    assert sl.convexity(model, x).is_convex
    assert sl.convexity_gap(model, x) <= 1e-12
