"""Randomly generated piecewise-affine architectures (hypothesis) against float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import splinelens as sl
from tests import zoo


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _activation(draw, width: int, image: bool) -> nn.Module:
    kind = draw(
        st.sampled_from(
            ["relu", "leaky", "prelu", "abs", "hardtanh", "relu6", "none", "spline"]
            + (["maxpool"] if image else [])
        )
    )
    if kind == "leaky":
        return nn.LeakyReLU(draw(st.sampled_from([0.01, 0.2, -0.5])))
    if kind == "prelu":
        return nn.PReLU(draw(st.sampled_from([1, width])), init=0.1)
    if kind == "hardtanh":
        return nn.Hardtanh(-draw(st.sampled_from([0.1, 1.0])), draw(st.sampled_from([0.2, 2.0])))
    if kind == "spline":  # a certified spline of a smooth activation (sl.splinify's unit)
        name = draw(st.sampled_from(["tanh", "gelu", "softplus", "sigmoid", "elu"]))
        fit = sl.fit_activation(name, pieces=draw(st.sampled_from([3, 6, 17])))
        return sl.SplineActivation.from_fit(fit)
    if kind == "maxpool":
        return nn.MaxPool2d(draw(st.sampled_from([2, 3])), 1, padding=1)
    return {"relu": nn.ReLU(), "abs": zoo.Abs(), "relu6": nn.ReLU6(), "none": nn.Identity()}[kind]


@st.composite
def networks(draw) -> tuple[nn.Module, torch.Tensor]:
    image = draw(st.booleans())
    width = draw(st.integers(2, 6))
    layers: list[nn.Module] = []
    shape: tuple[int, ...] = (2, 5, 5) if image else (4,)
    cin = shape[0]
    for _ in range(draw(st.integers(1, 4))):
        if image:
            k = draw(st.sampled_from([1, 3]))
            affine: list[nn.Module] = [
                nn.Conv2d(cin, width, k, padding=k // 2, bias=draw(st.booleans()))
            ]
            if draw(st.booleans()):
                affine.append(nn.BatchNorm2d(width))
        else:
            affine = [nn.Linear(cin, width, bias=draw(st.booleans()))]
        act = _activation(draw, width, image)
        block = nn.Sequential(*affine, act)
        keeps_shape = not isinstance(act, nn.MaxPool2d) or act.kernel_size == 3
        layers.append(
            Residual(block) if cin == width and keeps_shape and draw(st.booleans()) else block
        )
        cin = width
        if isinstance(act, nn.MaxPool2d) and act.kernel_size == 2:
            shape = (width, shape[1] + 1, shape[2] + 1)
        elif image:
            shape = (width, *shape[1:])
    head = [nn.Flatten(), nn.LazyLinear(3)] if image else [nn.Linear(cin, 3)]
    model = nn.Sequential(*layers, *head).double()
    x = torch.randn(3, *((2, 5, 5) if image else (4,)), dtype=torch.float64)
    model(x)  # materialise the lazy layer
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    for p in model.parameters():
        p.data.normal_(0, 0.7)
    return zoo._bn_randomise(model).eval(), x


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks())
def test_random_networks_are_exact(net) -> None:
    model, x = net
    amap = sl.affine_map(model, x)
    ref = zoo.jacobian(model, x)
    torch.testing.assert_close(amap.A, ref, atol=1e-9, rtol=1e-9)
    with torch.no_grad():
        f = model(x)
    ax = torch.einsum("ncd,nd->nc", ref.flatten(2), x.flatten(1))
    torch.testing.assert_close(amap.B, f - ax, atol=1e-9, rtol=1e-9)
    if not sl.SplineView(model, x).layers:  # affine: one region, no codes
        with pytest.raises(ValueError, match="no MASO nonlinearity"):
            sl.partition_codes(model, x)
        return
    codes = sl.partition_codes(model, x)
    if codes.layers:
        d = sl.partition_distance(codes, codes)
        assert torch.all(d.diagonal() == 0)
