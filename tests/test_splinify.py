"""Splinified networks: spline activations, the conversion, and every spline tool on the result,
against float64 references (bucketize, explicit piece sums, jacrev, forward hooks)."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, resolve_name

import splinelens as sl
from splinelens._capture import cell_tables, piece_index
from splinelens._capture.spline_op import splines_as_ops
from splinelens.geometry.convexity import convexity_gap
from splinelens.smooth import SplineRNN, convert
from splinelens.smooth.convert import functional_splines
from tests import zoo

F64 = torch.float64


def _random_spline(k: int, seed: int, dyadic: bool = True) -> sl.SplineActivation:
    """A random continuous spline with k pieces (knots on a 1/64 grid, or arbitrary floats)."""
    g = torch.Generator().manual_seed(seed)
    knots = torch.sort(torch.randn(k - 1, generator=g, dtype=F64) * 2).values
    if dyadic:
        knots = torch.unique(torch.round(knots * 64) / 64)
    slopes = torch.randn(len(knots) + 1, generator=g, dtype=F64)
    values = torch.cumsum(torch.cat([knots.new_zeros(1), (knots.diff() * slopes[1:-1])]), 0)
    intercepts = torch.cat([values - slopes[:-1] * knots, (values - slopes[1:] * knots)[-1:]])
    return sl.SplineActivation(knots, slopes, intercepts)


def _near_knots(knots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The knots in ``dtype`` and their two neighbouring floats, plus random values."""
    t = knots.to(dtype)
    g = torch.Generator().manual_seed(0)
    noise = (torch.randn(500, generator=g, dtype=F64) * 4).to(dtype)
    up, down = torch.nextafter(t, t + 1), torch.nextafter(t, t - 1)
    return torch.cat([t, up, down, noise, t.new_tensor([0.0, -1e30, 1e30])])


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("dyadic", [True, False])
def test_piece_index_is_bucketize(dtype: torch.dtype, dyadic: bool) -> None:
    """The table lookup finds bucketize's piece against the float64 knots, at the knots and the
    floats beside them too (float32 inputs at float32-rounded knots included: rounding the knots
    to float32 put such an input in the next piece)."""
    act = _random_spline(40, seed=1, dyadic=dyadic)
    assert (len(act.cells) > 0) == dyadic  # the fast path is taken exactly for dyadic knots
    z = _near_knots(act.knots, dtype)
    k = piece_index(z, act.knots, act.cells, act.inv_step, act.first)
    assert torch.equal(k, torch.bucketize(z.double(), act.knots))


def test_a_float32_input_at_a_rounded_knot_takes_the_float64_knots_piece() -> None:
    """softsign with 1000 pieces has knots too spread for a lookup table; a float32 input equal
    to a knot rounded to float32 lies in the piece the float64 knots give it (reference:
    bucketize in float64), in the codes and in A (that piece's slope)."""
    fit = sl.fit_activation("softsign", pieces=1000)
    act = sl.SplineActivation.from_fit(fit)
    assert len(act.cells) == 0
    moved = (fit.knots.float().double() != fit.knots).nonzero().reshape(-1)
    assert len(moved) > 0
    net = nn.Sequential(nn.Linear(1, 1), act).eval()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
    z = fit.knots[moved].float()[:, None]  # (M, 1) float32 inputs at rounded knots
    piece = torch.bucketize(z.double(), fit.knots)[:, 0]
    assert torch.equal(sl.partition_codes(net, z).layers[0].states()[:, 0], piece)
    slopes = sl.affine_map(net, z).A[:, 0, 0]
    torch.testing.assert_close(slopes, fit.slopes[piece].float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dyadic", [True, False])
def test_forward_is_the_explicit_piece(dyadic: bool) -> None:
    act = _random_spline(30, seed=2, dyadic=dyadic)
    z = _near_knots(act.knots, F64)
    k = torch.bucketize(z, act.knots)
    expected = act.slopes[k] * z + act.intercepts[k]
    torch.testing.assert_close(act(z), expected, rtol=1e-15, atol=1e-14)  # addcmul may fuse
    torch.testing.assert_close(act(z.float()), expected.float(), rtol=1e-6, atol=1e-6)


_TORCH_ACTS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "gelu": F.gelu}


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", sorted(_TORCH_ACTS))
def test_a_flat_tail_gives_its_value_at_infinity(name: str, dtype: torch.dtype) -> None:
    """0 * inf is NaN: a flat tail gave NaN at -inf or inf, where the activation is finite
    (sigmoid(-inf) = 0). Reference: the explicit piece at -1e30 / 1e30 (the same tails), the
    activation itself within the certificate; NaN stays NaN, a tail of slope 1 gives inf; in the
    module, as the captured op, and the gradient (the tail's slope)."""
    act = sl.SplineActivation.from_fit(sl.fit_activation(name, tol=1e-3))
    z = torch.tensor([-math.inf, math.inf, math.nan, -1e30, 1e30], dtype=dtype)
    big = z[3:].double()
    k = torch.bucketize(big, act.knots)
    far = (act.slopes[k] * big + act.intercepts[k]).to(dtype)  # (2,) the tails' values
    out = act(z)
    with splines_as_ops():
        torch.testing.assert_close(act(z), out, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(out[2])
    for i in (0, 1):
        if act.slopes[-i].item() == 0:
            assert torch.equal(out[i], far[i])
            limit = _TORCH_ACTS[name](big[i : i + 1])  # (torch's gelu(-inf) is NaN)
            assert abs(out[i].item() - limit.item()) <= act.sup_error + 1e-6
        else:
            assert out[i].item() == z[i].item()  # a tail of slope 1: inf
    zg = z[:2].clone().requires_grad_()
    (grad,) = torch.autograd.grad(act(zg).sum(), zg)
    torch.testing.assert_close(grad, act.slopes[[0, -1]].to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize(("name", "far"), [("sigmoid", [10.0, -10.0]), ("gelu", [-10.0])])
def test_a_pre_activation_that_overflows_onto_a_flat_tail_is_captured_as_the_model_runs(
    name: str, far: list[float]
) -> None:
    """A linear layer whose output overflows to inf or -inf before a sigmoid spline: the model
    gives the tail's value, the capture's frozen pieces multiplied 0 by inf (NaN). Reference:
    the model's output, jacrev for A, bucketize for the codes; a one-piece spline is both its
    tails; the op without the tails' arguments (a graph saved before them) runs as it did."""
    act = sl.SplineActivation.from_fit(sl.fit_activation(name, tol=1e-3))
    net = nn.Sequential(nn.Linear(1, 2), act, nn.Linear(2, 1)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1e308], [1.0]], dtype=F64))
        net[0].bias.zero_()
    x = torch.tensor([[0.5], [-0.25], *([v] for v in far)], dtype=F64)  # unit 0: +-inf below
    out = net(x).detach()
    assert torch.isfinite(out).all()
    amap = sl.affine_map(net, x)
    jac = torch.stack([torch.func.jacrev(net)(xi[None])[0, :, 0] for xi in x])
    torch.testing.assert_close(amap.A, jac, rtol=0, atol=1e-12)
    torch.testing.assert_close(amap.B + amap.A[:, :, 0] * x, out, rtol=1e-12, atol=1e-12)
    z = torch.stack([x[:, 0] * 1e308, x[:, 0]], 1)
    states = sl.partition_codes(net, x).layers[0].states()
    assert torch.equal(states, torch.bucketize(z, act.knots))
    one = sl.SplineActivation(torch.zeros(0), torch.zeros(1), torch.full((1,), 0.5))
    assert one(torch.tensor([-math.inf, math.inf])).tolist() == [0.5, 0.5]
    op = torch.ops.splinelens.spline_activation
    old = op(z[:, 0], act.knots, act.slopes, act.intercepts, act.cells, act.cell_slopes,
             act.cell_intercepts, act.inv_step, act.first)  # fmt: skip
    assert torch.isnan(old[2:]).all() and torch.equal(old[:2], act(z[:2, 0]))  # (flat tails)


def test_spline_stays_float64_and_survives_saving() -> None:
    act = _random_spline(12, seed=3)
    net = nn.Sequential(nn.Linear(2, 3), act).float()
    assert net[1].knots.dtype == F64 and net[0].weight.dtype == torch.float32
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    other = nn.Sequential(nn.Linear(2, 3), _random_spline(12, seed=4))
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    z = torch.randn(50, dtype=F64)
    assert torch.equal(other[1](z), act(z))  # the lookup tables follow the loaded knots


def test_a_whole_module_pickled_before_sup_error_was_a_property_loads() -> None:
    """A SplineActivation saved whole (torch.save(module)) when sup_error was a plain attribute
    holds it in its __dict__; reading sup_error raised AttributeError after loading."""
    act = sl.splinify(nn.GELU(), tol=1e-3)
    old = act.__dict__.copy()
    old["sup_error"] = old.pop("_sup_error")  # the earlier layout
    del old["tails"]  # (kept since the flat tails' fix)
    restored = sl.SplineActivation.__new__(sl.SplineActivation)
    restored.__setstate__(old)
    assert restored.sup_error == act.sup_error <= 1e-3
    z = torch.linspace(-5, 5, 101, dtype=F64)
    assert torch.equal(restored(z), act(z))
    buf = io.BytesIO()
    torch.save(act, buf)
    assert torch.load(io.BytesIO(buf.getvalue()), weights_only=False).sup_error == act.sup_error


def test_a_loaded_spline_of_other_pieces_is_not_certified() -> None:
    """The state holds the pieces, not the certificate: loading other pieces drops it."""
    gelu = sl.splinify(nn.Sequential(nn.Linear(2, 3), nn.GELU()), pieces=12)[1]
    tanh = sl.splinify(nn.Sequential(nn.Linear(2, 3), nn.Tanh()), pieces=12)[1]
    again = sl.splinify(nn.Sequential(nn.Linear(2, 3), nn.GELU()), pieces=12)[1]
    again.load_state_dict(gelu.state_dict())  # the same pieces: still certified
    assert again.sup_error == gelu.sup_error < 0.1
    gelu.load_state_dict(tanh.state_dict())
    assert math.isinf(gelu.sup_error) and "not certified" in repr(gelu)


@pytest.mark.parametrize("where", ["knots", "pieces"])
def test_pieces_changed_in_place_are_followed_by_the_model_and_every_capture(where: str) -> None:
    """An EMA step or a write through .data changes the spline in place: the module's lookup
    tables follow at its next call, a held capture refuses, a new one is exact (references:
    the explicit piece, and jacrev)."""
    torch.manual_seed(0)
    model = sl.splinify(nn.Sequential(nn.Linear(3, 6), nn.GELU(), nn.Linear(6, 2)), pieces=20)
    model, x = model.double().eval(), torch.randn(16, 3, dtype=F64)
    act = model[1]
    view = sl.SplineView(model, x)
    _ = sl.affine_map(model, x).B  # the plain functions' capture
    with torch.no_grad():
        if where == "knots":  # p(z - 1/64): the knots move, the spline stays continuous
            act.knots.data += 1.0 / 64
            act.intercepts.data -= act.slopes / 64
        else:
            act.slopes.mul_(1.5)
            act.intercepts.mul_(1.5)
    with pytest.raises(sl.StaleCaptureError, match="changed the values of"):
        view.affine_map(x)
    assert math.isinf(act.sup_error)  # at once: the certificate was for the old pieces
    model(x)  # the module's tables follow
    assert math.isinf(act.sup_error) and "not certified" in repr(act)
    with pytest.raises(sl.StaleCaptureError, match="changed the values of"):
        view.affine_map(x)
    amap = sl.affine_map(model, x)
    jac = torch.stack([torch.func.jacrev(model)(xi[None])[0] for xi in x])
    torch.testing.assert_close(amap.A, jac.squeeze(2), rtol=0, atol=1e-12)
    with torch.no_grad():
        h = model[0](x)
        k = torch.bucketize(h, act.knots)
        explicit = model[2](act.slopes[k] * h + act.intercepts[k])
        torch.testing.assert_close(model(x), explicit, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("knots", "slopes", "intercepts", "match"),
    [
        ([0.0, 1.0], [1.0, 2.0], [0.0, 0.0, 0.0], "shapes"),
        ([1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], "increasing"),
        ([0.0], [0.0, 1.0], [0.0, 1.0], "continuous"),
        ([float("nan")], [0.0, 1.0], [0.0, 0.0], "finite"),
    ],
)
def test_bad_splines_are_refused(knots, slopes, intercepts, match: str) -> None:
    t = [torch.tensor(v, dtype=F64) for v in (knots, slopes, intercepts)]
    with pytest.raises(ValueError, match=match):
        sl.SplineActivation(*t)


def test_cell_tables_are_empty_for_knots_off_any_grid() -> None:
    tables = cell_tables(
        torch.tensor([0.1, 0.3], dtype=F64), torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64)
    )
    assert len(tables.cells) == 0


class _Functional(nn.Module):
    """Functional and method activations of every kind, with parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h = F.gelu(self.b(h), approximate="tanh").sigmoid()
        return self.c(F.elu(h, 0.5) + F.softplus(h, beta=2.0))


class _RNNNet(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, 4, **kwargs)
        self.fc = nn.Linear(4 * (2 if kwargs.get("bidirectional") else 1), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0][:, -1])


_SMOOTH = {
    "gelu_mlp": lambda: nn.Sequential(
        nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 3)
    ),
    "every_module": lambda: nn.Sequential(
        nn.Linear(4, 6),
        *[m for a in _ALL_MODULES for m in (a, nn.Linear(6, 6))],
        nn.Linear(6, 2),
    ),
    "functional": _Functional,
    "rnn": lambda: _RNNNet(num_layers=2, batch_first=True),
}
_ALL_MODULES = [
    nn.Sigmoid(), nn.Tanh(), nn.GELU(), nn.GELU("tanh"), nn.SiLU(), nn.Mish(), nn.ELU(0.7),
    nn.CELU(1.3), nn.SELU(), nn.Softplus(2.0), nn.LogSigmoid(), nn.Softsign(), nn.Hardswish(),
    nn.Hardsigmoid(), nn.Softshrink(0.3), nn.Tanhshrink(),
]  # fmt: skip
_SHAPES = {"gelu_mlp": (4,), "every_module": (4,), "functional": (4,), "rnn": (5, 3)}


def _smooth(name: str) -> nn.Module:
    torch.manual_seed(0)
    return _SMOOTH[name]().double().eval()


@pytest.mark.parametrize("name", list(_SMOOTH))
def test_splinified_network_is_exact_for_every_tool(name: str) -> None:
    """A, B against jacrev and the output; one code entry per unit, the piece of its
    pre-activation; the original model untouched; the error within what the bounds allow."""
    model = _smooth(name)
    before = copy.deepcopy(model.state_dict())
    splined = sl.splinify(model, tol=1e-3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, sl.SplineActivation) for m in model.modules())
    x = torch.randn(5, *_SHAPES[name], dtype=F64)
    amap = sl.affine_map(splined, x)
    jac = torch.stack([torch.func.jacrev(lambda xi: splined(xi[None])[0])(xi) for xi in x])
    torch.testing.assert_close(amap.A, jac, rtol=0, atol=1e-12)
    torch.testing.assert_close(amap.output, splined(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        torch.einsum("ncd,nd->nc", amap.A.flatten(2), x.flatten(1)) + amap.B,
        splined(x),
        rtol=0,
        atol=1e-12,
    )
    err = sl.approximation_error(model, splined, x)
    assert 0 < err.max_abs < 0.05


def _pre_activations(
    splined: nn.Module, x: torch.Tensor
) -> list[tuple[torch.Tensor, sl.SplineActivation]]:
    """Every spline module's input, in call order (forward pre-hooks)."""
    seen: list = []
    mods = [m for m in splined.modules() if isinstance(m, sl.SplineActivation)]
    mods += list(functional_splines(splined).values())
    handles = [m.register_forward_pre_hook(lambda m, a: seen.append((a[0], m))) for m in mods]
    try:
        splined(x)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("name", ["gelu_mlp", "functional", "rnn"])
def test_codes_are_the_pieces_of_the_pre_activations(name: str) -> None:
    splined = sl.splinify(_smooth(name), tol=1e-2)
    x = torch.randn(7, *_SHAPES[name], dtype=F64)
    codes = sl.partition_codes(splined, x)
    calls = _pre_activations(splined, x)
    assert len(codes.layers) == len(calls)
    for layer, (z, act) in zip(codes.layers, calls):
        assert layer.pieces == act.pieces and layer.units == z[0].numel()
        assert torch.equal(layer.data.long(), torch.bucketize(z, act.knots).flatten(1))


def test_one_unit_per_activation_not_one_per_relu() -> None:
    splined = sl.splinify(_smooth("gelu_mlp"), pieces=16)
    view = sl.SplineView(splined, torch.randn(2, 4, dtype=F64))
    assert [(la.units, la.pieces) for la in view.layers] == [(8, 16), (8, 16)]


def test_rnn_unrolled_equals_torch_rnn() -> None:
    for kwargs in (
        {},
        {"batch_first": True, "num_layers": 2},
        {"bidirectional": True},
        {"bias": False},
    ):
        torch.manual_seed(0)
        rnn = nn.RNN(3, 4, **kwargs).double().eval()
        unrolled = SplineRNN.of(rnn, nn.Tanh())
        for x in (torch.randn(2, 5, 3, dtype=F64), torch.randn(5, 3, dtype=F64)):
            layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
            n = x.shape[0 if rnn.batch_first else 1] if x.dim() == 3 else 1
            h0 = torch.randn(layers, n, 4, dtype=F64)
            h0 = h0 if x.dim() == 3 else h0[:, 0]
            for a, b in zip(unrolled(x, h0), rnn(x, h0)):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert dict(unrolled.named_parameters()).keys() == dict(rnn.named_parameters()).keys()


class _InPlace(nn.Module):
    """Smooth activations applied in place (``tanh_``, ``F.silu(inplace=True)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h.tanh_()
        return self.b(F.silu(h, inplace=True))


def test_in_place_smooth_activations_are_splinified_and_exact() -> None:
    """The redirect writes the spline's value back with copy_: read as the copy it is (it was
    refused as aten.copy, an op not in the table)."""
    torch.manual_seed(0)
    splined = sl.splinify(_InPlace().double().eval(), tol=1e-3)
    x = torch.randn(6, 4, dtype=F64)
    with pytest.raises(RuntimeError, match=r"first time while being captured or transformed"):
        torch.func.jacrev(splined)(x)  # the functional splines are fitted on the first call
    splined(x)
    jac = torch.stack([torch.func.jacrev(lambda v: splined(v[None])[0])(v) for v in x])
    torch.testing.assert_close(sl.affine_map(splined, x).A, jac, rtol=0, atol=1e-12)


class _Spellings(nn.Module):
    """ELU-family activations written with torch's other spellings (torch.selu, F.elu_...)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = torch.selu(h) + torch.celu(h, alpha=0.5)
        h = torch.celu_(torch.selu_(h * 0.5), 2.0)
        return self.b(F.elu_(h, alpha=0.7))


def _spellings_reference(x: torch.Tensor, net: _Spellings) -> torch.Tensor:
    h = net.a(x)
    h = F.selu(h) + F.celu(h, alpha=0.5)
    return net.b(F.elu(F.celu(F.selu(h * 0.5), 2.0), alpha=0.7))


def test_every_spelling_of_the_elu_family_is_splinified() -> None:
    """torch.selu, torch.selu_, torch.celu, torch.celu_ and F.elu_ were not redirected: the
    splinified model was refused with "run sl.splinify"."""
    torch.manual_seed(0)
    net = _Spellings().double().eval()
    x = torch.randn(6, 4, dtype=F64)
    splined = sl.splinify(net, tol=1e-4, example_input=x)
    keys = ["celu_alpha0p5", "celu_alpha2p0", "elu_alpha0p7", "selu"]
    assert sorted(functional_splines(splined)) == keys
    with torch.no_grad():
        gap = (splined(x) - _spellings_reference(x, net)).abs().max()
    assert 0 < gap < 1e-2  # the splines, not the smooth functions
    jac = torch.stack([torch.func.jacrev(lambda v: splined(v[None])[0])(v) for v in x])
    torch.testing.assert_close(sl.affine_map(splined, x).A, jac, rtol=0, atol=1e-12)


def test_a_model_that_is_itself_an_activation_or_rnn_is_replaced() -> None:
    """splinify(nn.RNN(tanh)) and splinify(nn.GELU()) returned the model unchanged."""
    torch.manual_seed(0)
    rnn = nn.RNN(3, 4, batch_first=True).double()
    splined = sl.splinify(rnn, pieces=40)
    x = torch.randn(2, 5, 3, dtype=F64)
    assert isinstance(splined, SplineRNN)
    assert 0 < (splined(x)[0] - rnn(x)[0]).abs().max() < 0.05
    assert isinstance(sl.splinify(nn.GELU(), pieces=12), sl.SplineActivation)


def test_every_activation_module_is_replaced_with_its_parameters() -> None:
    splined = sl.splinify(_smooth("every_module"), tol=1e-2)
    acts = [m for m in splined.modules() if isinstance(m, sl.SplineActivation)]
    assert len(acts) == len(_ALL_MODULES)
    assert [a.activation for a in acts] == [
        "sigmoid", "tanh", "gelu", "gelu_tanh", "silu", "mish", "elu", "celu", "selu",
        "softplus", "logsigmoid", "softsign", "hardswish", "hardsigmoid", "softshrink",
        "tanhshrink",
    ]  # fmt: skip
    z = torch.linspace(-6, 6, 2001, dtype=F64)
    for act, mod in zip(acts, _ALL_MODULES):
        assert (act(z) - mod(z)).abs().max() <= act.sup_error + 1e-15, act
        assert act.sup_error <= 1e-2
        assert f"pieces={act.pieces}" in repr(act) and act.activation in repr(act)
    exact = [a for a in acts if a.activation in ("hardsigmoid", "softshrink")]
    assert all(a.sup_error == 0 for a in exact)


def test_functional_splines_are_kept_and_saved(tmp_path) -> None:
    splined = sl.splinify(
        _smooth("functional"), tol=1e-2, example_input=torch.randn(2, 4, dtype=F64)
    )
    names = sorted(functional_splines(splined))
    assert names == ["elu_alpha0p5", "gelu_tanh", "sigmoid", "softplus_beta2p0", "tanh"]
    path = tmp_path / "splined.pt"
    torch.save(splined, path)
    loaded = torch.load(path, weights_only=False)
    x = torch.randn(4, 4, dtype=F64)
    assert torch.equal(loaded(x), splined(x))
    assert torch.equal(copy.deepcopy(splined)(x), splined(x))


def test_splined_model_moves_in_dtype_and_stays_exact_in_float32() -> None:
    splined = sl.splinify(_smooth("gelu_mlp"), tol=1e-3).float()
    x = torch.randn(6, 4)
    out = splined(x)
    ref = sl.splinify(_smooth("gelu_mlp"), tol=1e-3)(x.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    amap = sl.affine_map(splined, x)
    torch.testing.assert_close(amap.output, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "module",
    [
        nn.GELU(),
        nn.Tanh(),
        nn.Sigmoid(),
        nn.SiLU(),
        nn.Softplus(),
        nn.ELU(),
        nn.Hardswish(),
        nn.Softsign(),
        nn.Hardsigmoid(),
    ],
)
def test_smooth_activations_are_refused_with_the_way_out(module: nn.Module) -> None:
    net = nn.Sequential(nn.Linear(3, 4), module, nn.Linear(4, 2)).eval()
    with pytest.raises(sl.UnsupportedOperationError, match="splinify"):
        sl.SplineView(net, torch.randn(2, 3))


def test_rnn_tanh_is_refused_with_the_way_out() -> None:
    with pytest.raises(sl.UnsupportedOperationError, match="splinify"):
        sl.SplineView(_RNNNet(batch_first=True).eval(), torch.randn(2, 5, 3))


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h * torch.sigmoid(h))  # a gate: a product of two activations


class _Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.n, self.b = nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.gelu(self.n(self.a(x))))


class _Softmaxed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.softmax(torch.tanh(self.a(x)), -1))


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (_Gated, "multiplies two activation"),
        (_Normed, "divides by a statistic"),
        (_Softmaxed, "inside the network"),
    ],
)
def test_what_splinify_cannot_fix_is_still_refused(model, match: str) -> None:
    splined = sl.splinify(model().eval(), tol=1e-2)
    with pytest.raises(sl.UnsupportedOperationError, match=match):
        sl.SplineView(splined, torch.randn(2, 4))


def test_softplus_network_with_nonnegative_weights_is_convex() -> None:
    """Theorem 2: softplus's spline is convex and non-decreasing, so it is a MASO."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(3, 8), nn.Softplus(), nn.Linear(8, 8), nn.Softplus(), nn.Linear(8, 2)
    )
    splined = sl.splinify(net.double().eval(), tol=1e-2)
    x = torch.randn(20, 3, dtype=F64)
    assert not sl.convexity(splined, x).is_convex  # negative weights after layer 1
    sl.make_input_convex(splined, x)
    assert sl.convexity(splined, x).is_convex
    assert convexity_gap(splined, x) <= 1e-12
    check = sl.check_masos(splined, x)
    assert check.ok
    tanh = sl.splinify(
        nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval(), tol=1e-2
    )
    report = sl.convexity(tanh, x)
    assert not report.is_convex
    with pytest.raises(sl.NotAMasoError, match="not convex"):
        sl.layer_maso(tanh, x, 0)


def test_layer_maso_of_a_convex_spline_is_the_layer() -> None:
    splined = sl.splinify(
        nn.Sequential(nn.Linear(3, 5), nn.Softplus(), nn.Linear(5, 2)).double().eval(), pieces=12
    )
    x = torch.randn(1, 3, dtype=F64)
    maso = sl.layer_maso(splined, x, 0)
    h = torch.randn(40, 3, dtype=F64)
    torch.testing.assert_close(maso(h), splined[1](splined[0](h)), rtol=0, atol=1e-12)
    torch.testing.assert_close(maso.argmax(h), torch.bucketize(splined[0](h), splined[1].knots))


def test_approximation_error_is_the_explicit_difference() -> None:
    model = _smooth("gelu_mlp")
    splined = sl.splinify(model, pieces=8)
    x = torch.randn(300, 4, dtype=F64)
    err = sl.approximation_error(model, splined, x, batch_size=64)
    f, g = model(x).detach(), splined(x).detach()
    d = (f - g).abs()
    assert err.max_abs == pytest.approx(float(d.max()), rel=1e-12)
    assert err.mean_abs == pytest.approx(float(d.mean()), rel=1e-12)
    assert err.max_rel == pytest.approx(float((d.amax(1) / f.abs().amax(1)).max()), rel=1e-12)
    assert err.top1_agreement == pytest.approx(float((f.argmax(1) == g.argmax(1)).double().mean()))
    assert err.n == 300
    with pytest.raises(ValueError, match="batch"):
        sl.approximation_error(model, splined, x[:0])


def test_approximation_error_of_an_rnn_and_of_overflowing_outputs() -> None:
    """An RNN returns (output, hidden): compared on its output (it raised AttributeError). An
    output that overflows is refused, naming the input (a NaN max and a plausible agreement
    were returned)."""
    torch.manual_seed(0)
    rnn = nn.RNN(3, 4, batch_first=True).double()
    splined = sl.splinify(rnn, pieces=40)
    x = torch.randn(2, 5, 3, dtype=F64)
    err = sl.approximation_error(rnn, splined, x)
    with torch.no_grad():
        d = (rnn(x)[0] - splined(x)[0]).abs().max()
    assert err.max_abs == pytest.approx(float(d), rel=1e-12)
    model = nn.Sequential(nn.Linear(2, 4), nn.GELU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[2].weight.fill_(1e38)  # finite weights, an output past float32's range
    with pytest.raises(ValueError, match=r"the model's output \(inputs from 0 on\) holds"):
        sl.approximation_error(model, sl.splinify(model, tol=1e-2), torch.full((3, 2), 10.0))


def test_error_falls_with_pieces() -> None:
    """Through a network the output error follows the activations' bounds: about 1/K^2."""
    model = _smooth("gelu_mlp")
    x = torch.randn(500, 4, dtype=F64)
    errs = [
        sl.approximation_error(model, sl.splinify(model, pieces=k), x).max_abs
        for k in (8, 16, 32, 64)
    ]
    ratios = np.array(errs[:-1]) / np.array(errs[1:])
    assert (ratios > 2.5).all() and (ratios < 6.5).all(), errs


def test_splinify_needs_a_budget() -> None:
    with pytest.raises(ValueError, match="tol"):
        sl.splinify(nn.Tanh(), tol=None)


def test_slices_of_a_splinified_network_match_grid_samples() -> None:
    """Regions of a 2-D slice: same region iff same code, one cut per knot crossed."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))
    splined = sl.splinify(net.double().eval(), pieces=6)
    part = sl.slice_partition(splined, torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    keys = np.concatenate([la.data.numpy() for la in part.codes.layers], 1)
    assert len(np.unique(keys, axis=0)) == len(part) > 20
    uv = np.random.default_rng(0).uniform(-3, 3, (3000, 2))
    region = part.locate(uv)
    got = sl.partition_codes(splined, part.to_input(uv))
    sampled = np.concatenate([la.data.numpy() for la in got.layers], 1)
    assert (sampled == keys[region]).all()
    first = part.layers[0]  # layer 1 alone: lines z_k = t, one per unit and knot crossed
    w, b = splined[0].weight.detach(), splined[0].bias.detach()
    assert len(first) == zoo_line_arrangement(w, b, splined[1].knots, 3.0)


def zoo_line_arrangement(w: torch.Tensor, b: torch.Tensor, knots: torch.Tensor, h: float) -> int:
    """Regions of [-h, h]^2 cut by the lines w_k . u + b_k = t: 1 + lines + crossings inside
    (lines in general position), counted explicitly."""
    lines = [(k, w[k].numpy(), float(t - b[k])) for k in range(len(w)) for t in knots.numpy()]
    inside = [ln for ln in lines if _crosses_box(*ln[1:], h)]
    crossings = 0
    for i in range(len(inside)):
        for j in range(i + 1, len(inside)):
            (k1, a1, c1), (k2, a2, c2) = inside[i], inside[j]
            if k1 == k2:  # one unit's lines are parallel
                continue
            p = np.linalg.solve(np.stack([a1, a2]), np.array([c1, c2]))
            crossings += bool((np.abs(p) < h).all())
    return 1 + len(inside) + crossings


def _crosses_box(a: np.ndarray, c: float, h: float) -> bool:
    corners = np.array([[-h, -h], [-h, h], [h, -h], [h, h]]) @ a - c
    return corners.min() < 0 < corners.max()


def test_region_radius_on_a_splinified_network() -> None:
    """The radius is the distance to the nearest knot of any unit; the polytope is x's region."""
    torch.manual_seed(1)
    splined = sl.splinify(
        nn.Sequential(nn.Linear(3, 6), nn.Sigmoid(), nn.Linear(6, 2)).double().eval(), pieces=10
    )
    x = torch.randn(4, 3, dtype=F64)
    r = sl.region_radius(splined, x)
    w, b, knots = splined[0].weight.detach(), splined[0].bias.detach(), splined[1].knots
    z = x @ w.T + b  # (N, 6)
    dist = ((z[:, :, None] - knots).abs() / w.norm(dim=1)[None, :, None]).flatten(1).amin(1)
    torch.testing.assert_close(r, dist, rtol=1e-10, atol=0)
    poly = sl.region_polytope(splined, x[:1])
    y = x[:1] + 3 * r[0] * torch.randn(300, 3, dtype=F64)
    same = (
        sl.partition_distance(
            sl.partition_codes(splined, y), sl.partition_codes(splined, x[:1])
        ).reshape(-1)
        == 0
    )
    assert 0 < same.sum() < len(y)
    assert (poly.contains(y) == same).all()
    per_unit = ((z[:, :, None] - knots).abs() / w.norm(dim=1)[None, :, None]).amin(2)  # (N, 6)
    lc = sl.local_complexity(splined, x, [0.1, 0.5])
    explicit = (per_unit[..., None] <= torch.tensor([0.1, 0.5], dtype=F64)).sum(1)
    assert torch.equal(lc.counts[:, 0], explicit)


def test_zoo_has_splinified_networks() -> None:
    assert {"splined_gelu_mlp", "splined_tanh_cnn", "splined_functional"} <= set(zoo.ZOO)


def test_a_repeated_piece_has_no_maso_form() -> None:
    """Two pieces on one line: the codes see the knot between them, a max of pieces cannot."""
    act = sl.SplineActivation(
        torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.zeros(4)
    )
    net = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 2)).double().eval()
    x = torch.randn(5, 3, dtype=F64)
    with pytest.raises(sl.NotAMasoError, match="pieces 0 and 1 lie on one line"):
        sl.layer_maso(net, x, 0)
    assert sl.check_masos(net, x).layers == ()  # skipped, like other layers without a MASO form


def test_a_certificate_is_dropped_as_soon_as_the_pieces_change() -> None:
    """Read before any forward pass, sup_error and the repr of a spline whose pieces changed in
    place (or through .data) are inf, not the old bound (reference: the real error on a grid)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 4), nn.GELU(), nn.Linear(4, 2)).double().eval()
    spline = sl.splinify(net, tol=1e-3)[1]
    z = torch.linspace(-5, 5, 1001, dtype=F64)
    assert (spline(z) - F.gelu(z)).abs().max() <= spline.sup_error <= 1e-3
    spline.intercepts.data.add_(0.1)
    assert spline.sup_error == math.inf and "not certified" in repr(spline)
    assert (spline(z) - F.gelu(z)).abs().max() > 0.09


class _Spelled(nn.Module):
    """An activation spelled in ways splinify used to miss: ``out=``, ``input=``, an in-place
    module, a module with a hook that doubles its output, integers into torch.sigmoid."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.fc, self.how = nn.Linear(3, 3), how
        self.act = nn.SiLU(inplace=True) if how == "inplace module" else nn.GELU()
        if how == "hooked module":
            self.act.register_forward_hook(lambda m, i, o: 2 * o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.how == "out=":
            y = torch.zeros_like(h)
            torch.tanh(h, out=y)
            return y
        if self.how == "input=":
            return torch.sigmoid(input=h)
        if self.how == "integers":
            return h + torch.sigmoid(torch.arange(3))
        if self.how == "inplace module":
            self.act(h)  # (its output is h itself)
            return h
        return self.act(h)


@pytest.mark.parametrize("how", ["out=", "input=", "integers", "inplace module", "hooked module"])
def test_every_spelling_of_an_activation_is_splinified(how: str) -> None:
    """Each of these left the copy 0.4 to 1.0 away from the model, silently (out= written
    nowhere, integer splines truncated to 0, inplace=True and hooks dropped), or left the smooth
    op in place (input=). Reference: the model itself, within the certified error."""
    torch.manual_seed(0)
    model, x = _Spelled(how).double().eval(), torch.randn(6, 3, dtype=F64)
    splined = sl.splinify(model, tol=1e-6, example_input=x)
    assert sl.approximation_error(model, splined, x).max_abs <= 2 * 1e-6 * 2  # (hook: 2x)
    sl.affine_map(splined, x)  # every smooth op replaced: the capture accepts it


class _TorchOnly(TorchFunctionMode):
    """A mode for torch's own functions: anything else is not implemented; reads args[0]."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if resolve_name(func) is None:
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        _ = args[0].dtype if isinstance(args[0], torch.Tensor) else args[0]
        return out


class _TorchOnlyTensor(torch.Tensor):
    """A tensor subclass for torch's own functions only."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if resolve_name(func) is None:
            return NotImplemented
        return super().__torch_function__(func, types, args, kwargs or {})


def _mlp3(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    acts = [nn.GELU(), nn.Tanh(), nn.SiLU()]
    layers = [nn.Flatten(), nn.Linear(6, 8), acts[0], nn.Linear(8, 8), acts[1], nn.Linear(8, 8)]
    return nn.Sequential(*layers, acts[2], nn.Linear(8, 2)).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_splinifys_redirect_sees_each_spline_activation_as_at_most_two_calls(
    dtype, monkeypatch
) -> None:
    """splinify's redirect of functional activations is a torch function mode active through
    the copy's whole forward, and every op and attribute read inside a spline activation went
    through it: 123 more calls than the network's own ops for 3 activations, twice the time of
    a splinified forward at a batch of 1. Reference: the calls the redirect handles, against
    the same network with Identity in place of the activations (splinified too: the redirect
    and no spline), and the same output bit for bit, gradient included."""
    bare = _mlp3(dtype)
    for i, m in enumerate(bare):
        if isinstance(m, (nn.GELU, nn.Tanh, nn.SiLU)):
            bare[i] = nn.Identity()
    plain, splined = sl.splinify(bare, tol=1e-3), sl.splinify(_mlp3(dtype), tol=1e-3)
    x = torch.randn(4, 6, dtype=dtype, requires_grad=True)
    expected = splined(x)
    (grad,) = torch.autograd.grad(expected.sum(), x)
    redirect, handled = convert._Functional, []
    original = redirect.__torch_function__

    def counted(self, *args, **kwargs):
        handled.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(redirect, "__torch_function__", counted)
    counts = []
    for net in (plain, splined):
        handled.clear()
        out = net(x)
        counts.append(len(handled))
    assert counts[0] > 0 and counts[1] <= counts[0] + 2 * 3, counts  # (123 more before)
    assert torch.equal(out, expected)
    assert torch.equal(torch.autograd.grad(out.sum(), x)[0], grad)


def test_other_modes_and_subclasses_see_a_spline_activations_torch_ops() -> None:
    """The first fix of the above (found in review) made the activation one call of a function
    of splinelens' own, taking the module, for every mode and subclass: a mode or subclass that
    implements torch's functions only raised, one reading args[0] as a tensor failed. Only
    splinify's redirect is stepped out of. Reference: the output without them, bit for bit."""
    net = sl.splinify(_mlp3(torch.float32), tol=1e-3)
    x = torch.randn(4, 6)
    expected = net(x)
    with _TorchOnly():
        assert torch.equal(net(x), expected)
        assert torch.equal(net[2](x[:, :1]), net[2](x[:, :1].clone()))
    assert torch.equal(net(x.as_subclass(_TorchOnlyTensor)).as_subclass(torch.Tensor), expected)
    z = torch.randn(5).as_subclass(_TorchOnlyTensor)
    assert isinstance(net[2](z), _TorchOnlyTensor)


class _IntoIntegers(nn.Module):
    """Activations written into an integer tensor: in place, and through out=."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.act = how, nn.ELU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "module":
            return self.act(x)
        if self.how == "in place":
            return torch.tanh_(x)
        out = torch.zeros(len(x), dtype=x.dtype)
        torch.tanh(x.float(), out=out)
        return out


@pytest.mark.parametrize("how", ["module", "in place", "out="])
def test_an_activation_into_an_integer_tensor_is_refused_as_torch_refuses_it(how: str) -> None:
    """The spline's float values were copied into the integer tensor, truncated (ELU of
    [1, -2, 3] gave [0, 0, 2]); complex inputs lost their imaginary part with a warning only
    (found in review). Reference: torch refuses both for the smooth model."""
    model, x = _IntoIntegers(how), torch.tensor([1, -2, 3])
    splined = sl.splinify(model, tol=1e-3, example_input=torch.randn(3))
    with pytest.raises((RuntimeError, NotImplementedError)):
        model(x.clone())
    with pytest.raises(RuntimeError, match="can't be cast to the desired output type"):
        splined(x.clone())
    z = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(NotImplementedError):
        nn.GELU()(z)
    with pytest.raises(TypeError, match=r"takes real inputs, got torch\.complex64"):
        sl.splinify(nn.GELU(), tol=1e-3)(z)


def test_pieces_that_require_a_gradient_are_refused() -> None:
    """functional_call with pieces that require a gradient: the spline reads lookup tables built
    from its pieces, so torch.func.grad gave zeros and autograd no gradient, silently (found in
    review). Reference: the input's gradient still that of the explicit piece (slopes[k])."""
    act = sl.SplineActivation.from_fit(sl.fit_activation("tanh", tol=1e-2))
    z = torch.randn(10, dtype=F64)
    trained = act.intercepts.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="fixed buffers: gradients reach its input"):
        torch.func.functional_call(act, {"intercepts": trained}, (z,))
    with pytest.raises(RuntimeError, match="fixed buffers"):
        torch.func.grad(lambda i: torch.func.functional_call(act, {"intercepts": i}, (z,)).sum())(
            act.intercepts.clone()
        )
    with torch.no_grad():  # (no gradient asked: answered)
        torch.func.functional_call(act, {"intercepts": trained}, (z,))
    k = torch.bucketize(z, act.knots)
    torch.testing.assert_close(torch.func.grad(lambda v: act(v).sum())(z), act.slopes[k])


class _Interrupted(nn.Module):
    """A forward with a functional GELU, stopped by a KeyboardInterrupt once asked to."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.stop = nn.Linear(3, 4), False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.a(x))
        if self.stop:
            raise KeyboardInterrupt
        return h


def test_a_forward_stopped_by_a_keyboard_interrupt_leaves_no_redirect_behind() -> None:
    """splinify's forward hooks close the redirect on an Exception only: after a
    KeyboardInterrupt (Ctrl-C in a notebook), F.gelu anywhere in the thread was computed as the
    spline, silently (found in review). Reference: F.gelu itself, bit for bit, and the copy
    still redirecting its own forward."""
    torch.manual_seed(0)
    model, z = _Interrupted().double().eval(), torch.randn(7, dtype=F64)
    x, gelu = torch.randn(2, 3, dtype=F64), F.gelu(z)  # (no redirect open yet)
    splined = sl.splinify(model, tol=1e-2, example_input=x)
    expected = splined(x)
    splined.stop = True
    with pytest.raises(KeyboardInterrupt):
        splined(x)
    assert torch.equal(F.gelu(z), gelu)
    splined.stop = False
    assert torch.equal(splined(x), expected)
    assert not torch.equal(model(x), expected)  # (the copy's GELU is the spline)
    assert torch.overrides._get_current_function_mode() is None  # (the stale one closed)


def test_a_splinified_copy_runs_under_torch_compile() -> None:
    """Keeping the redirect's open modes per thread in a threading.local's own __dict__ made
    torch.compile fail (dynamo: "Expected str key"; found while fixing the interrupt above).
    Reference: the copy run eagerly, bit for bit (dynamo's eager backend)."""
    torch.manual_seed(0)
    model, x = _Interrupted().double().eval(), torch.randn(4, 3, dtype=F64)
    splined = sl.splinify(model, tol=1e-2, example_input=x)
    assert torch.equal(torch.compile(splined, backend="eager")(x), splined(x))


def test_approximation_error_refuses_training_mode_and_bad_arguments() -> None:
    """In training mode it compared two dropout draws and moved the model's batchnorm
    statistics; bad batch sizes and non-tensors raised raw errors."""
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    splined, x = sl.splinify(net, tol=1e-4), torch.randn(5, 3, dtype=F64)
    stats = net[1].running_mean.clone()
    with pytest.raises(ValueError, match="training mode"):
        sl.approximation_error(net, splined, x)
    assert torch.equal(net[1].running_mean, stats)
    rnn = nn.RNN(3, 4, num_layers=2, dropout=0.5, batch_first=True).double()  # dropout: refused
    with pytest.raises(ValueError, match="training mode"):
        sl.approximation_error(rnn, sl.splinify(rnn, pieces=9), torch.randn(2, 5, 3, dtype=F64))
    net.eval(), splined.eval()
    for bad in (0, -1, 2.5):
        with pytest.raises((TypeError, ValueError), match="batch_size"):
            sl.approximation_error(net, splined, x, batch_size=bad)
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        sl.approximation_error(net, splined, x.tolist())
    with pytest.raises(ValueError, match=r"x is torch.float32.*call x.to"):
        sl.approximation_error(net, splined, x.float())


@pytest.mark.parametrize("bound", [-1.0, float("nan")])
def test_a_spline_activation_refuses_a_bound_that_is_no_bound(bound: float) -> None:
    with pytest.raises(ValueError, match="sup_error must be a bound >= 0"):
        sl.SplineActivation(
            torch.zeros(1), torch.tensor([0.0, 1.0]), torch.zeros(2), sup_error=bound
        )


def test_a_first_call_in_inference_mode_leaves_the_copy_capturable() -> None:
    """Splines for functional calls are made at the copy's first call: made under
    torch.inference_mode(), their tables were inference tensors, and the capture failed on
    them ("Inference tensors cannot be saved for backward")."""
    torch.manual_seed(0)
    model, x = _Spelled("input=").double().eval(), torch.randn(4, 3, dtype=F64)
    splined = sl.splinify(model, tol=1e-6)
    with torch.inference_mode():
        splined(x)
    assert sl.verify(splined, x).ok


def test_spline_rnn_refuses_what_nn_rnn_refuses() -> None:
    """A 2-D hx with a batched input was broadcast over the batch (nn.RNN refuses it); a packed
    sequence raised AttributeError ('.dim')."""
    rnn = nn.RNN(3, 4, batch_first=True).double().eval()
    unrolled, x = SplineRNN.of(rnn, nn.Tanh()), torch.randn(2, 5, 3, dtype=F64)
    with pytest.raises(ValueError, match="hx must be 3-D"):
        unrolled(x, torch.zeros(1, 4, dtype=F64))
    with pytest.raises(RuntimeError):
        rnn(x, torch.zeros(1, 4, dtype=F64))  # (the reference refuses it too)
    packed = nn.utils.rnn.pack_padded_sequence(x, [5, 3], batch_first=True)
    with pytest.raises(TypeError, match="packed sequences are not supported"):
        unrolled(packed)
    assert all(torch.allclose(a, b) for a, b in zip(unrolled(x), rnn(x), strict=True))


class _Hooked(nn.Module):
    """A GELU with a forward hook that takes kwargs and doubles the output, and a full backward
    hook that counts its calls; or ``torch.tanh(h, out=torch.empty(0))``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.fc, self.act, self.how, self.calls = nn.Linear(3, 3), nn.GELU(), how, []
        self.act.register_forward_hook(lambda m, a, kw, o: 2 * o, with_kwargs=True)
        self.act.register_full_backward_hook(lambda m, gi, go: self.calls.append(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "out= empty":
            y = x.new_empty(0)
            torch.tanh(self.fc(x), out=y)
            return y
        return self.act(self.fc(x))


def test_hooks_of_every_kind_and_empty_out_buffers_are_kept() -> None:
    """Hooks registered with kwargs were called with the wrong signature (TypeError), full
    backward hooks were never called, and an empty out= buffer raised: torch resizes it."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=F64)
    for how in ("hooks", "out= empty"):
        model = _Hooked(how).double().eval()
        splined = sl.splinify(model, tol=1e-6, example_input=x)
        assert sl.approximation_error(model, splined, x).max_abs <= 4e-6
    original = _Hooked("hooks").double().eval()  # (its hook's closure holds the original)
    sl.splinify(original, tol=1e-6)(x.requires_grad_()).sum().backward()
    assert original.calls == [1]


def test_approximation_error_takes_token_ids() -> None:
    """Integer inputs (token ids into an embedding) were refused as "not a floating tensor"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 3), nn.Tanh(), nn.Flatten(), nn.Linear(15, 2))
    model = model.double().eval()
    ids = torch.randint(0, 10, (4, 5))
    assert sl.approximation_error(model, sl.splinify(model, tol=1e-6), ids).max_abs <= 1e-5


class _BadGelu(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="Tanh")


@pytest.mark.parametrize("model", [_BadGelu(), nn.Sequential(nn.GELU(approximate="Tanh"))])
def test_a_gelu_torch_refuses_is_refused(model: nn.Module) -> None:
    """approximate="Tanh" (torch refuses all but "none" and "tanh") was splinified as the exact
    GELU: the copy ran where the model cannot (found in review)."""
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="approximate"):
        model(x)
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'Tanh'"):
        sl.splinify(model, tol=1e-3, example_input=x)
