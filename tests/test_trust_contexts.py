"""Inputs in other memory layouts and unusual calling contexts (inference tensors, anomaly mode,
torch.func transforms, copies): answered exactly or refused by name (found by a fuzzing review;
each test fails before its fix)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import splinelens as sl


def _jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, *out, *in) reference A by vmap(jacrev), float64."""
    return torch.func.vmap(torch.func.jacrev(lambda xi: model(xi[None])[0]))(x)


def _layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values as x (N, C, H, W) in layouts other than contiguous."""
    return {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "slice of a wider tensor": torch.cat([x, x], -1)[..., : x.shape[-1]],
        "transposed back": x.transpose(2, 3).contiguous().transpose(2, 3),
    }


@pytest.mark.parametrize("conv", [False, True])
def test_inputs_in_other_layouts_than_the_captured_example(conv: bool) -> None:
    """A capture made on a contiguous x replays its views on any layout (a channels_last x, or
    a conv's channels_last output reaching a flatten, raised a raw error inside aten.view)."""
    torch.manual_seed(0)
    first = nn.Conv2d(3, 4, 3, padding=1) if conv else nn.Identity()
    width = 4 * 4 * 4 if conv else 3 * 4 * 4
    model = nn.Sequential(first, nn.ReLU(), nn.Flatten(), nn.Linear(width, 8), nn.ReLU())
    model = nn.Sequential(*model, nn.Linear(8, 3)).double().eval()
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    want_a, want_codes = _jacobian(model, x), sl.partition_codes(model, x)  # captured here
    view = sl.SplineView(model, x)
    for name, other in _layouts(x).items():
        amap = sl.affine_map(model, other)
        torch.testing.assert_close(amap.A, want_a, rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(
            amap.B, model(x) - torch.einsum("nci,ni->nc", want_a.flatten(2), x.flatten(1))
        )
        assert (
            sl.partition_distance(sl.partition_codes(model, other), want_codes).diag().eq(0).all()
        )
        assert sl.verify(model, other).ok
        torch.testing.assert_close(view.affine_map(other).A, want_a, rtol=1e-12, atol=1e-12)


def test_an_inference_tensor_can_be_the_first_example() -> None:
    """x made under torch.inference_mode() is captured like any x (export refused it, and the
    refusal blamed the model's control flow)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double().eval()
    with torch.inference_mode():
        x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(sl.SplineView(model, x).affine_map(x).A, _jacobian(model, x.clone()))
    assert sl.verify(model, x).ok


def test_templates_with_anomaly_detection_on() -> None:
    """Anomaly mode checks every gradient with .item(), which a vmapped backward cannot batch:
    the rows are taken one pass each (a raw error before)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.autograd.set_detect_anomaly(True):
        got = sl.affine_map(model, x).A
        assert sl.verify(model, x).ok
    torch.testing.assert_close(got, _jacobian(model, x))
