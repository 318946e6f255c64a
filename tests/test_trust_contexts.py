"""Inputs in other memory layouts and unusual calling contexts (inference tensors, anomaly mode,
torch.func transforms, copies): answered exactly or refused by name (found by a fuzzing review;
each test fails before its fix)."""

from __future__ import annotations

import copy
import pickle

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


class _Skip(nn.Module):
    """A skip connection around the layer 'r1': maps from 'r1' read x on the skip path too."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.r1, self.r2, self.out = nn.ReLU(), nn.ReLU(), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc0(x)
        return self.out(self.r2(self.fc2(self.r1(self.fc1(h))) + h))


@pytest.mark.parametrize("write", ["data", "numpy"])
def test_a_map_answers_for_x_as_it_was_made(write: str) -> None:
    """Writes to x that bump no version counter (through .data, or a numpy buffer x shares) do
    not reach a map made before them: A z_start + B is f of x as it was (B mixed the new x's
    skip path with the old x's states: 0.35 off f of either)."""
    torch.manual_seed(0)
    net = _Skip().double().eval()
    buf = torch.randn(3, 4, dtype=torch.float64).numpy()
    x = torch.from_numpy(buf)
    old = x.clone()
    amap = sl.affine_map(net, x, start="r1")
    a = amap.A  # (3, 3, 6)
    if write == "data":
        x.data.copy_(torch.randn(3, 4, dtype=torch.float64))
    else:
        buf[:] = torch.randn(3, 4, dtype=torch.float64).numpy()
    assert not torch.equal(x, old)
    got = torch.einsum("nrd,nd->nr", a, amap.z_start) + amap.B
    torch.testing.assert_close(got, net(old).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(amap.output, net(old).detach())


def test_weights_moved_to_shared_memory_keep_a_map_valid() -> None:
    """share_memory() (or sending the weights to a worker) moves their data with its values
    kept: maps made before keep working (they refused, saying the weights changed); data
    re-bound to other values is still refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    fresh, used = sl.affine_map(model, x), sl.affine_map(model, x)
    _ = used.B
    model.share_memory()
    torch.testing.assert_close(fresh.A, _jacobian(model, x))
    torch.testing.assert_close(used.A, _jacobian(model, x))
    model[2].bias.data = model[2].bias.data + 1.0  # other storage, other values, no version bump
    with pytest.raises(ValueError, match="changed after this AffineMap"):
        _ = used.output


def test_torch_func_transforms_are_refused_not_answered_with_zeros() -> None:
    """The maps are computed outside autograd: under grad/jacrev they came back as constants
    (a zero Jacobian, with no error), under vmap with a raw error. Refused by name now."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    amap = sl.affine_map(model, x)
    calls = {
        "grad of a map": lambda: torch.func.grad(lambda z: amap(z)[:, 0].sum())(x),
        "jacrev of an output": lambda: torch.func.jacrev(lambda x: sl.affine_map(model, x).B)(x),
        "vmap of codes": lambda: torch.func.vmap(lambda r: sl.partition_codes(model, r[None]))(x),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match=r"traced by a torch\.func transform"):
            call()
    torch.testing.assert_close(amap.A, _jacobian(model, x))  # outside: the Jacobian itself


def test_views_and_maps_refuse_pickling_and_deep_copies_by_name() -> None:
    """A view or map holds its model's capture: pickling raised raw errors (weakref, pybind11),
    a deep copy of a view refused as a stale capture and of a map claimed x had changed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = torch.randn(3, 4)
    view, amap = sl.SplineView(model, x), sl.affine_map(model, x)
    for obj, name in ((view, "SplineView"), (amap, "AffineMap")):
        for act in (pickle.dumps, copy.deepcopy):
            with pytest.raises(TypeError, match=f"an? {name} holds its model's capture"):
                act(obj)
        assert copy.copy(obj).__dict__ == obj.__dict__  # a shallow copy shares the capture
    torch.testing.assert_close(copy.copy(view).affine_map(x).A, amap.A)
    codes = view.partition_codes(x)  # results are plain data: they pickle
    again = pickle.loads(pickle.dumps(codes))
    assert sl.partition_distance(again, codes).diag().eq(0).all()
    torch.testing.assert_close(pickle.loads(pickle.dumps(amap.A)), amap.A)
