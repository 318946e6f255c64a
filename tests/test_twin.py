"""The float64 twin of a float32 model: tensors its forward makes are float64 in the twin.

Reference: the same model built in float64 with float64 constants (the float32 constants here
are exact in float64, so the two compute the same function).
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn

import splinelens as sl


class _Made(nn.Module):
    """An MLP whose forward makes tensors (ones, a scalar, full, an arange, an index_put
    value), in the default dtype, or in ``dtype`` where given."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.dtype = dtype
        self.fc1, self.fc2, self.out = nn.Linear(2, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kw = {"dtype": self.dtype} if self.dtype is not None else {}
        h = torch.relu(self.fc1(x))
        h = h @ (torch.ones(6, 6, **kw) / 4) + torch.tensor(0.5, **kw)
        h = torch.relu(self.fc2(h * torch.full((6,), 0.75, **kw)) - torch.arange(6.0, **kw) / 8)
        h[:, torch.tensor([1, 4])] = torch.tensor(0.25, **kw)
        return self.out(h)


def _pair() -> tuple[nn.Module, nn.Module]:
    """The float32 model, and its float64 reference built from the same values."""
    torch.manual_seed(0)
    model = _Made().eval()
    ref = _Made(torch.float64).double().eval()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return model, ref


def test_the_twin_makes_its_forwards_tensors_in_float64() -> None:
    """Region radii and polytopes (N = 1, the other export) and slices of a float32 model whose
    forward makes float32 tensors equal those of its float64 reference (before: 'the model does
    not run on inputs', blaming x)."""
    model, ref = _pair()
    x = torch.randn(5, 2)
    torch.testing.assert_close(
        sl.region_radius(model, x), sl.region_radius(ref, x.double()).float(), rtol=1e-6, atol=0
    )
    poly, poly64 = sl.region_polytope(model, x[:1]), sl.region_polytope(ref, x[:1].double())
    torch.testing.assert_close(poly.A.double(), poly64.A.float().double(), rtol=0, atol=0)
    part = sl.slice_partition(model, torch.zeros(2), torch.eye(2))
    part64 = sl.slice_partition(ref, torch.zeros(2), torch.eye(2))
    assert len(part) == len(part64) > 1
    for a, b in zip(part.layers, part64.layers, strict=True):
        assert (a.counts == b.counts).all()
        torch.testing.assert_close(
            torch.as_tensor(a.vertices), torch.as_tensor(b.vertices), rtol=0, atol=1e-12
        )
    assert torch.ones(2).dtype == torch.float32  # the capture changed nothing outside it


def test_the_twins_capture_changes_no_other_thread() -> None:
    """Tensors made by another thread during the twin's capture keep the default dtype."""
    model, _ = _pair()
    made: list[torch.dtype] = []
    stop = threading.Event()

    def make() -> None:
        while not stop.is_set():
            made.append(torch.ones(1).dtype)

    other = threading.Thread(target=make)
    other.start()
    try:
        sl.region_radius(model, torch.randn(3, 2))
    finally:
        stop.set()
        other.join()
    assert made and set(made) == {torch.float32}


def test_a_fixed_float32_dtype_in_forward_is_named() -> None:
    """A tensor made with dtype=torch.float32 cannot be float64 in the twin: the error says so
    and how to write it; an input that does not fit the model still blames the input."""
    torch.manual_seed(0)
    model = _Made(torch.float32).eval()
    for run in (
        lambda: sl.region_radius(model, torch.randn(2, 2)),
        lambda: sl.slice_partition(model, torch.zeros(2), torch.eye(2)),
    ):
        with pytest.raises(ValueError, match=r"float64 copy.*fixed dtype.*dtype=x\.dtype"):
            run()
    with pytest.raises(ValueError, match="does not run on inputs of per-sample shape"):
        sl.region_radius(model, torch.randn(2, 3))
    with pytest.raises(ValueError, match="does not run on inputs of per-sample shape"):
        sl.slice_partition(model, torch.zeros(3), torch.eye(3)[:2])
