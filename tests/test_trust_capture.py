"""Captures a fuzzing review found wrong or refused without reason (each test fails before its
fix): A and B against jacrev and the model in float64, or a refusal that names the cause."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import splinelens as sl

DT = torch.float64


def _exact(model: nn.Module, x: torch.Tensor) -> None:
    """A equals jacrev and A x + B the model's output, to 1e-12."""
    amap = sl.affine_map(model, x)
    jac = torch.stack([torch.func.jacrev(lambda v: model(v[None])[0])(xi) for xi in x])
    torch.testing.assert_close(amap.A, jac, rtol=0, atol=1e-12)
    pred = torch.einsum("nod,nd->no", amap.A, x) + amap.B
    torch.testing.assert_close(pred, model(x).detach(), rtol=0, atol=1e-12)


class _Net(nn.Module):
    def __init__(self, body) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.body = nn.Linear(6, 6), nn.Linear(6, 3), body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(self.body(self.l1(x), x))


def _net(body) -> nn.Module:
    return _Net(body).to(DT).eval()


class _Leak(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l1(x))  # (N, 6)
        n = x.shape[0]
        g = h.unsqueeze(0).expand(n, n, 6)  # g[i, m] = h[m]: the batch in dims 0 and 1
        return torch.gather(g, 2, torch.zeros(n, 1, 6, dtype=torch.long)).squeeze(1)  # h[0, 0]


def test_a_gather_that_reads_only_some_samples_is_refused() -> None:
    with pytest.raises(sl.UnsupportedOperationError, match="mixed, reordered or dropped"):
        sl.affine_map(_Leak().to(DT).eval(), torch.randn(4, 6, dtype=DT))
    idx = torch.tensor([[5, 0, 2, 2, 1, 3]])  # along the features: exact
    _exact(
        _net(lambda h, x: torch.gather(torch.relu(h), 1, idx.expand(x.shape[0], 6))),
        torch.randn(4, 6, dtype=DT),
    )


def test_a_clamp_whose_min_exceeds_its_max_is_refused() -> None:
    """torch.clamp is then the constant max: captured on saturating inputs, A was 0.46 off."""
    with pytest.raises(sl.UnsupportedOperationError, match=r"min 0\.5 > max -0\.5"):
        sl.SplineView(
            _net(lambda h, x: torch.clamp(h, 0.5, -0.5)), torch.full((2, 6), 30.0, dtype=DT)
        )


@pytest.mark.parametrize("act", ["threshold", "hardtanh", "relu"])
def test_units_exactly_at_a_bound_take_autograds_piece(act: str) -> None:
    fn = {
        "threshold": lambda h: nn.functional.threshold(h, 1.0, 1.0),
        "hardtanh": lambda h: nn.functional.hardtanh(h, 0, 1),
        "relu": torch.relu,
    }[act]
    model = _net(lambda h, x: fn(h))
    with torch.no_grad():
        model.l1.weight.copy_(torch.eye(6))
        model.l1.bias.zero_()
    x = torch.tensor([[0.0, 1.0, 0.5, -1.0, 2.0, 0.0], [1.0, 0.0, 0.0, 1.0, 0.3, 1.0]], dtype=DT)
    _exact(model, x)  # inputs on the bounds 0 and 1


def test_casts_to_less_precision_and_autocast_are_refused() -> None:
    x = torch.randn(4, 6, dtype=DT)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        with pytest.raises(sl.UnsupportedOperationError, match=f"rounds the activations.*{dt}"):
            sl.affine_map(_net(lambda h, x, dt=dt: torch.relu(h.to(dt)).to(DT)), x)
    f32 = _Net(lambda h, x: torch.relu(h.double()).float()).eval()  # widening: exact
    xf = torch.randn(4, 6)
    assert sl.verify(f32, xf).ok
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        pytest.raises(ValueError, match=r"inside torch\.autocast"),
    ):
        sl.affine_map(f32, xf)


def test_forwards_that_compute_with_the_batch_size_are_refused() -> None:
    pe = torch.randn(16, 6, dtype=DT)
    bodies = {
        "scaled by N": lambda h, x: torch.relu(h * x.shape[0]),
        "positions sliced to N": lambda h, x: torch.relu(h + pe[: x.shape[0]]),
        # the same for every batch the probe tries (2, 3), another from N = 6: found by review
        "scaled by N // 6": lambda h, x: torch.relu(h * (x.shape[0] // 6 + 1)),
    }
    for body in bodies.values():
        for n in (1, 2, 5):
            with pytest.raises(
                sl.UnsupportedOperationError,
                match=r"(another output in another batch|made from the batch size)",
            ):
                sl.partition_codes(_net(body), torch.randn(n, 6, dtype=DT))


def test_a_network_that_returns_its_input_is_the_identity_map() -> None:
    x = torch.randn(3, 4, dtype=DT)
    for model in (nn.Identity(), nn.Sequential(), nn.Flatten()):
        amap = sl.affine_map(model, x)
        assert torch.equal(amap.A, torch.eye(4, dtype=DT).expand(3, 4, 4))
        assert torch.equal(amap.B, torch.zeros(3, 4, dtype=DT))


class _Squeeze(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (N, 1, 6): (6,) at N = 1
        return torch.relu(self.l1(x).squeeze().t()).t()


def test_a_squeeze_that_drops_the_batch_of_one_input_refuses_one_input() -> None:
    model = _Squeeze().to(DT).eval()
    with pytest.raises(sl.BatchSizeError, match="batch of 1 is refused"):
        sl.affine_map(model, torch.randn(1, 1, 6, dtype=DT))
    x = torch.randn(3, 1, 6, dtype=DT)
    amap = sl.affine_map(model, x)
    pred = torch.einsum("nod,nd->no", amap.A.flatten(2), x.flatten(1)) + amap.B
    torch.testing.assert_close(pred, model(x).detach(), rtol=0, atol=1e-12)


FULL = {
    "h[:, :]": lambda h: h[:, :],
    "h[:, 0:]": lambda h: h[:, 0:],
    "h[:, :6]": lambda h: h[:, :6],
    "h[:, ::1]": lambda h: h[:, ::1],
    "h.clone()": lambda h: h.clone().contiguous(),
}


@pytest.mark.parametrize("how", sorted(FULL))
def test_a_slice_of_every_feature_holds_for_one_input(how: str) -> None:
    """``h[:, :]`` slices the batch dim whole: the batch-of-1 export writes it as an alias, which
    is no other graph (a review found one input refused as if forward branched on N)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), _Lambda(FULL[how]), nn.Linear(6, 3))
    model = model.to(DT).eval()
    x = torch.randn(3, 4, dtype=DT)
    for n in (3, 1):
        amap = sl.affine_map(model, x[:n])
        pred = torch.einsum("nod,nd->no", amap.A, x[:n]) + amap.B
        torch.testing.assert_close(pred, model(x[:n]).detach(), rtol=0, atol=1e-12)


class _Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fn(h)


def test_constants_written_into_slices_are_affine() -> None:
    def body(h, x):
        h = h.clone()
        h[:, 0] = 0.5
        h[:, 1:3].zero_()
        return torch.relu(h)

    _exact(_net(body), torch.randn(4, 6, dtype=DT))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # (jacrev through rrelu)
@pytest.mark.parametrize("act", ["threshold0", "threshold", "rrelu", "rnn_cell"])
def test_threshold_rrelu_and_relu_rnn_cells_are_read(act: str) -> None:
    cell = nn.RNNCell(6, 6, nonlinearity="relu")
    bodies = {
        "threshold0": lambda h, x: nn.functional.threshold(h, 0.0, 0.0),
        "threshold": lambda h, x: nn.functional.threshold(h, 0.3, 0.3),
        "rrelu": lambda h, x: nn.functional.rrelu(h, training=False),
        "rnn_cell": lambda h, x: cell(x, cell(h)),
    }
    model = _net(bodies[act])
    cell.to(DT)
    _exact(model, torch.randn(4, 6, dtype=DT))


def test_a_threshold_with_a_jump_and_a_training_rrelu_are_refused() -> None:
    x = torch.randn(4, 6, dtype=DT)
    with pytest.raises(sl.UnsupportedOperationError, match=r"jumps from 0\.0 to 0\.3"):
        sl.affine_map(_net(lambda h, x: nn.functional.threshold(h, 0.3, 0.0)), x)
    with pytest.raises(sl.UnsupportedOperationError, match="random slopes in training mode"):
        sl.affine_map(_net(lambda h, x: nn.functional.rrelu(h, training=True)), x)


class _OneEntryMax(nn.Module):
    """Maxima over one entry (a channel max of one channel, a 1-wide pool, an adaptive pool to
    its own size): the identity, which partition_codes refused with an internal error."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv1d(1, 2, 3, padding=1), nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = torch.relu(F.max_pool1d(F.adaptive_max_pool1d(h, 5), 1)[:, :1].amax(1, keepdim=True))
        return self.fc(torch.cat([h, self.conv(x)[:, 1:]], 1).flatten(1))


def test_a_max_over_one_entry_is_no_layer() -> None:
    torch.manual_seed(0)
    model, x = _OneEntryMax().to(DT).eval(), torch.randn(4, 1, 5, dtype=DT)
    assert [la.kind for la in sl.SplineView(model, x).layers] == ["relu"]
    assert len(sl.partition_codes(model, x).layers) == 1
    jac = torch.stack([torch.func.jacrev(lambda v: model(v[None])[0])(v) for v in x])
    torch.testing.assert_close(sl.affine_map(model, x).A, jac, rtol=0, atol=1e-12)


def test_a_nan_constant_the_output_ignores_holds_for_one_input() -> None:
    """addmm with beta=0 ignores its NaN input; the batch-of-1 graph check compared NaN != NaN
    and refused one input as if forward branched on N (found by a fuzzing review)."""
    torch.manual_seed(0)
    fc, w = nn.Linear(6, 6).to(DT), torch.randn(6, 5, dtype=DT)

    def body(h: torch.Tensor) -> torch.Tensor:
        return torch.addmm(torch.full((5,), float("nan"), dtype=h.dtype), h, w, beta=0)

    model = nn.Sequential(fc, nn.ReLU(), _Lambda(body)).eval()
    x = torch.randn(1, 6, dtype=DT)
    amap = sl.affine_map(model, x)
    torch.testing.assert_close(
        amap.A[0] @ x[0] + amap.B[0], model(x)[0].detach(), rtol=0, atol=1e-12
    )


def test_an_op_export_writes_otherwise_for_one_input_holds_for_a_batch_of_one() -> None:
    """An einsum after a conv is exported with an _unsafe_view for two or more inputs and a view
    for one (the same op): a batch of one is exact (reference: jacrev), not refused as a forward
    that branches on the batch size (found by the audit)."""

    class ChannelMix(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.w = nn.Parameter(torch.randn(2, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("nchw,dc->ndhw", torch.relu(self.conv(x)), self.w).flatten(1)

    torch.manual_seed(0)
    model = ChannelMix().double().eval()
    x = torch.randn(1, 3, 5, 5, dtype=DT)
    jac = torch.func.jacrev(lambda v: model(v[None])[0])(x[0])
    torch.testing.assert_close(sl.affine_map(model, x).A[0], jac, rtol=0, atol=1e-12)
