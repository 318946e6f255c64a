"""Exact affine maps A[x], B[x] against float64 references (torch.func.jacrev, f(x) - A x)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import splinelens as sl
from splinelens import affine
from tests import zoo

TOL = 1e-10  # float64: slopes and offsets agree with the references to this absolute error


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_slopes_match_jacrev(name: str) -> None:
    model, x = zoo.build(name), zoo.inputs(name)
    amap = sl.affine_map(model, x)
    ref = zoo.jacobian(model, x)
    assert amap.A.shape == ref.shape
    torch.testing.assert_close(amap.A, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_offsets_are_f_minus_ax(name: str) -> None:
    model, x = zoo.build(name), zoo.inputs(name)
    amap = sl.affine_map(model, x)
    with torch.no_grad():
        f = zoo.logits(model, x)
    ax = torch.einsum("ncd,nd->nc", zoo.jacobian(model, x).flatten(2), x.flatten(1))
    torch.testing.assert_close(amap.B, f - ax, atol=TOL, rtol=0)
    torch.testing.assert_close(amap.output, f, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_verify_reports_exact(name: str) -> None:
    model, x = zoo.build(name), zoo.inputs(name)
    report = sl.verify(model, x)
    assert report.ok, str(report)
    assert report.max_abs_error < 1e-12


def test_frozen_map_applies_to_other_inputs() -> None:
    model, x = zoo.build("small_cnn"), zoo.inputs("small_cnn")
    amap = sl.affine_map(model, x)
    x2 = torch.randn_like(x)
    expected = torch.einsum("ncd,nd->nc", amap.A.flatten(2), x2.flatten(1)) + amap.B
    torch.testing.assert_close(amap(x2), expected, atol=TOL, rtol=0)
    # inside x's region (a tiny step), the frozen map is the network itself
    x3 = x + 1e-9 * torch.randn_like(x)
    torch.testing.assert_close(amap(x3), model(x3), atol=TOL, rtol=0)


def test_template_subset_and_chunks() -> None:
    model, x = zoo.build("resnet"), zoo.inputs("resnet", n=7)
    amap = sl.affine_map(model, x)
    sub = amap.templates(rows=[2, 0], chunk_size=3)
    torch.testing.assert_close(sub, amap.A[:, [2, 0]], atol=0, rtol=0)


def test_float32_keeps_dtype_and_is_exact_within_precision() -> None:
    model, x = zoo.build("small_cnn", torch.float32), zoo.inputs("small_cnn", 8, torch.float32)
    amap = sl.affine_map(model, x)
    assert amap.A.dtype == amap.B.dtype == torch.float32
    ref = zoo.jacobian(model.double(), x.double())
    torch.testing.assert_close(amap.A.double(), ref, atol=1e-5, rtol=1e-4)
    model.float()
    assert sl.verify(model, x).ok


def _seq() -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(3)
    model = (
        nn.Sequential(
            nn.Linear(5, 7),
            nn.ReLU(),
            nn.Linear(7, 6),
            nn.LeakyReLU(0.1),
            nn.Linear(6, 4),
            nn.ReLU(),
            nn.Linear(4, 3),
        )
        .double()
        .eval()
    )
    return model, torch.randn(6, 5, dtype=torch.float64)


@pytest.mark.parametrize(
    ("start", "end", "lo", "hi"),
    [(None, 0, 0, 2), (0, 1, 2, 4), (1, 2, 4, 6), (0, None, 2, 7), (None, 2, 0, 6)],
)
def test_between_layers_matches_submodule_jacobian(start, end, lo, hi) -> None:
    """z at `end` as an affine function of z at `start`: the per-layer MASO (Sec. 4)."""
    model, x = _seq()
    amap = sl.affine_map(model, x, start=start, end=end)
    with torch.no_grad():
        z = model[:lo](x)
    sub = model[lo:hi]
    ref = torch.stack([torch.func.jacrev(lambda zi: sub(zi[None])[0])(zi) for zi in z])
    torch.testing.assert_close(amap.A, ref, atol=TOL, rtol=0)
    torch.testing.assert_close(
        amap.B, sub(z) - torch.einsum("nij,nj->ni", ref, z), atol=TOL, rtol=0
    )


def test_layer_maps_compose_to_end_to_end() -> None:
    model, x = _seq()
    view = sl.SplineView(model, x)
    a = [view.affine_map(x, s, e).A for s, e in [(None, 0), (0, 1), (1, 2), (2, None)]]
    chain = a[3] @ a[2] @ a[1] @ a[0]
    torch.testing.assert_close(chain, view.affine_map(x).A, atol=TOL, rtol=0)


def test_between_layers_with_skip_connection_by_name() -> None:
    """A skip around `start` lands in B: z_end = A z_start + B still holds at x."""
    model, x = zoo.build("resnet"), zoo.inputs("resnet")
    view = sl.SplineView(model, x)
    names = [layer.name for layer in view.layers]
    amap = view.affine_map(x, start=names[1], end=names[2])
    z_start, z_end = amap.z_start, amap.output
    pred = torch.einsum("nij,nj->ni", amap.A.flatten(1, 3).flatten(2), z_start.flatten(1))
    torch.testing.assert_close(pred + amap.B.flatten(1), z_end.flatten(1), atol=TOL, rtol=0)


def test_intermediate_map_on_time_major_rnn() -> None:
    model, x = zoo.build("hand_rnn"), zoo.inputs("hand_rnn")
    view = sl.SplineView(model, x)
    amap = view.affine_map(x, start=0, end=3)
    assert amap.A.shape == (4, 6, 6)
    pred = torch.einsum("nij,nj->ni", amap.A, amap.z_start) + amap.B
    torch.testing.assert_close(pred, amap.output, atol=TOL, rtol=0)


def test_end_before_start_is_refused() -> None:
    model, x = _seq()
    with pytest.raises(ValueError, match="before"):
        sl.affine_map(model, x, start=2, end=1)


class TensorClamp(nn.Module):
    """Clamps with tensor bounds (maximum / minimum / both), and a flip along features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)
        self.register_buffer("lo", torch.linspace(-0.5, 0.0, 6))
        self.register_buffer("hi", torch.linspace(0.2, 0.8, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x).flip(1)
        h = torch.clamp(h, min=self.lo) + torch.clamp(h, max=self.hi)
        return self.fc2(torch.clamp(h, self.lo, self.hi) + torch.clamp_min(h, self.hi))


def test_tensor_bound_clamps_are_exact() -> None:
    torch.manual_seed(0)
    model = TensorClamp().double().eval()
    x = torch.randn(9, 5, dtype=torch.float64)
    torch.testing.assert_close(sl.affine_map(model, x).A, zoo.jacobian(model, x), atol=TOL, rtol=0)
    assert sl.verify(model, x).max_abs_error < 1e-12
    kinds = [layer.kind for layer in sl.SplineView(model, x).layers]
    # (a clamp with two tensor bounds is max with min, then min with max, as torch defines it)
    assert kinds == ["maximum", "minimum", "maximum", "minimum", "maximum"]


class ConstantClip(nn.Module):
    """A hardtanh and a clamp whose bounds are equal (torch allows it): constants. ``constant``:
    the same network with the constants written as such (the reference)."""

    def __init__(self, constant: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2, self.constant = nn.Linear(2, 4), nn.Linear(8, 3), constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.constant:
            return self.fc2(torch.cat([h * 0 + 0.5, h * 0 - 0.25], 1))
        return self.fc2(torch.cat([F.hardtanh(h, 0.5, 0.5), torch.clamp(h, -0.25, -0.25)], 1))


def test_a_clip_with_equal_bounds_is_a_constant_also_at_its_bound() -> None:
    """At z == lo == hi the state was 1, the identity piece, whose region is empty: hardtanh's
    B then came from that piece and its A from torch's gradient (0), and A x + B missed f(x) by
    0.29 with no error; a clamp's A was 1 for a constant function (found in review). Reference:
    the network with the constants written as constants (jacrev), inputs whose units sit
    exactly on the bounds."""
    torch.manual_seed(0)
    model = ConstantClip().double().eval()
    reference = ConstantClip(constant=True).double().eval()
    with torch.no_grad():  # (unit 0 of each input exactly at 0.5, unit 1 at -0.25)
        model.fc1.weight[:2] = torch.eye(2, dtype=torch.float64)
        model.fc1.bias[:2] = 0
    reference.load_state_dict(model.state_dict())
    x = torch.tensor([[0.5, -0.25], [0.5, 1.0], [2.0, -0.25]], dtype=torch.float64)
    amap = sl.affine_map(model, x)
    torch.testing.assert_close(amap.A, zoo.jacobian(reference, x), atol=TOL, rtol=0)
    torch.testing.assert_close(amap.B, reference(x), atol=TOL, rtol=0)
    assert sl.verify(model, x).max_abs_error < 1e-12
    clip, clamp = (la.states() for la in sl.partition_codes(model, x).layers)
    assert clip[[0, 1], 0].tolist() == clamp[[0, 2], 1].tolist() == [2, 2]  # (a constant piece)


def test_empty_batch_is_refused() -> None:
    model = zoo.build("mlp")
    with pytest.raises(ValueError, match="no inputs"):
        sl.affine_map(model, zoo.inputs("mlp", 0))


@pytest.fixture
def tiled_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of A by tiling the inputs (the GPU path for convolutions), here on the CPU."""
    monkeypatch.setattr(affine, "rows_by_tiling", lambda program, x: True)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_tiled_rows_match_jacrev(name: str, tiled_rows: None) -> None:
    """A by one backward pass over copies of the inputs, one copy per row, against jacrev;
    asked first (states recorded on the way) and after B (states recorded before)."""
    model, x = zoo.build(name), zoo.inputs(name)
    ref = zoo.jacobian(model, x)
    torch.testing.assert_close(sl.affine_map(model, x).A, ref, atol=TOL, rtol=0)
    amap = sl.affine_map(model, x)
    _ = amap.B
    torch.testing.assert_close(amap.A, ref, atol=TOL, rtol=0)


def test_tiled_rows_in_chunks_and_between_layers(tiled_rows: None) -> None:
    """Row subsets, input chunks and a map between layers around a skip connection: the same
    as one row per pass (reference), to float64 rounding."""
    model, x = zoo.build("resnet"), zoo.inputs("resnet", n=7)
    view = sl.SplineView(model, x)
    names = [layer.name for layer in view.layers]
    tiled = [
        view.affine_map(x).templates(rows=[2, 0], chunk_size=3),
        view.affine_map(x, start=names[1], end=names[2]).A,
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(affine, "rows_by_tiling", lambda program, x: False)
        rows = [
            view.affine_map(x).templates(rows=[2, 0], chunk_size=3),
            view.affine_map(x, start=names[1], end=names[2]).A,
        ]
    for a, b in zip(tiled, rows, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_offsets_computed_once_for_the_affine_prefix_are_the_frozen_pass_at_zero(name: str) -> None:
    """B takes the first layers' values at the zero input once (for 2 inputs, copied N times)
    instead of N times: the same offsets, bit for bit in float64, as the frozen network run on N
    zero inputs (reference: the program's frozen pass, the prefix not given)."""
    model, x = zoo.build(name), zoo.inputs(name, n=5)
    view = sl.SplineView(model, x)
    amap = view.affine_map(x)
    prog, states = view.program, amap.states
    zero = prog.from_sample(prog.input_name, torch.zeros_like(x))
    with torch.no_grad():
        ref = prog.frozen(x, states, at={prog.input_name: zero})[prog.output_name]
    assert torch.equal(amap.B, prog.per_sample(prog.output_name, ref))
    given = prog.zero_prefix(5, x)
    if name in ("mlp", "small_cnn", "resnet", "conv3d", "maxout"):  # (a layer before any MASO)
        assert given  # (the path is taken)
    assert all(v.shape[prog.bdims[k]] == 5 for k, v in given.items())


def test_offsets_without_the_prefix_where_a_batch_of_two_is_refused() -> None:
    """A forward that branches on the batch size (odd sizes only): no batch of 2 to compute the
    prefix with, B as before (reference: f(x) - A x through jacrev)."""

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.b(torch.relu(self.a(x)))
            return h if x.shape[0] % 2 == 1 else -h

    torch.manual_seed(0)
    model, x = Odd().double().eval(), torch.randn(5, 3, dtype=torch.float64)
    view = sl.SplineView(model, x)
    assert not view.program.batch.accepts(2) and view.program.zero_prefix(5, x) == {}
    jac = torch.stack([torch.func.jacrev(model)(xi[None].repeat(3, 1))[0, :, 0] for xi in x])
    with torch.no_grad():
        b = model(x) - torch.einsum("ncd,nd->nc", jac, x)
    torch.testing.assert_close(view.affine_map(x).B, b, atol=1e-12, rtol=0)
