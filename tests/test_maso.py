"""Every layer against its explicit MASO (Sec. 3): values, pieces, slopes, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import splinelens as sl
import splinelens.geometry.maso as maso_module
import splinelens.geometry.maso_check as maso_check
from tests import zoo


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_each_layer_equals_its_maso(name: str) -> None:
    model, x = zoo.build(name), zoo.inputs(name, n=3)
    check = sl.check_masos(model, x)
    view = sl.SplineView(model, x)
    convex = [la for la in view.layers if la.kind not in _CONCAVE and _convex_spline(view, la)]
    assert [la.name for la in check.layers] == [la.name for la in convex]
    for layer in check.layers:
        assert layer.max_abs_error <= 1e-10, (layer.name, layer.max_abs_error)
        assert layer.codes_agree, layer.name
    assert check.ok, str(check)


def _convex_spline(view: sl.SplineView, layer) -> bool:
    """Spline activations (sl.splinify) are MASOs when their slopes increase; others pass."""
    if layer.kind != "spline":
        return True
    slopes = view.program.leaf(view.program.step(layer.step).args[2].name)
    return bool((slopes.diff() >= 0).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_maso_check_tolerance_is_relative_to_the_layer_values(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU()).to(dtype).eval()
    x = 100 * torch.randn(6, 3, dtype=dtype)
    check = sl.check_masos(net, x)
    with torch.no_grad():  # the outputs, and each ReLU piece's terms |W| |h| + |b| (its z)
        h1 = net[:2](x)
        terms = [
            h.abs() @ lin.weight.abs().T + lin.bias.abs() for h, lin in ((x, net[0]), (h1, net[2]))
        ]
        scale = max(t.abs().max().item() for t in (h1, net(x), *terms))
    rtol = min(1e4 * torch.finfo(dtype).eps, 1e-2)
    assert check.tolerance == pytest.approx(rtol * scale, rel=1e-12)
    assert check.ok and check.max_abs_error <= check.tolerance, str(check)
    assert sl.check_masos(net, x, rtol=1e-3).tolerance == pytest.approx(1e-3 * scale, rel=1e-12)
    with pytest.raises(ValueError, match="rtol must be a finite positive number"):
        sl.check_masos(net, x, rtol=0.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_maso_check_holds_small_layers_to_their_own_size(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layers with values near 1e-4 were checked to a tolerance of rtol * 1: a MASO 1 % off
    passed. A faithful one still passes at that size."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU()).to(dtype).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1e-2)
    x = torch.randn(6, 3, dtype=dtype)
    assert sl.check_masos(net, x).ok
    built = maso_check.layer_maso

    def off(model: nn.Module, x: torch.Tensor, layer: int | str) -> sl.MASO:
        m = built(model, x, layer)
        m.b = m.b + 1e-2 * m.b.abs().max()  # 1 % of the layer's own offsets
        return m

    monkeypatch.setattr(maso_check, "layer_maso", off)
    check = sl.check_masos(net, x)
    assert not check.ok and check.max_abs_error > check.tolerance, str(check)


def test_maso_check_holds_each_layer_to_its_own_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """One tolerance for all layers (the largest layer's) let a MASO 1 % off pass in a layer of
    values near 1e-4 behind a layer of values near 100."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU()).double().eval()
    with torch.no_grad():
        net[0].weight.mul_(100), net[0].bias.mul_(100)
        net[2].weight.mul_(1e-6), net[2].bias.mul_(1e-4)
    x = torch.randn(6, 3, dtype=torch.float64)
    check = sl.check_masos(net, x)
    assert check.ok and check.layers[1].tolerance < 1e-6 * check.layers[0].tolerance
    built = maso_check.layer_maso

    def off(model: nn.Module, x: torch.Tensor, layer: int | str) -> sl.MASO:
        m = built(model, x, layer)
        if m.name == "3":
            m.b = m.b + 1e-2 * m.b.abs().max()
        return m

    monkeypatch.setattr(maso_check, "layer_maso", off)
    check = sl.check_masos(net, x)
    assert not check.ok and "'3': FAILED" in str(check) and "'1': OK" in str(check)


def test_maso_check_verdict_names_the_failing_layer() -> None:
    good = sl.LayerMasoCheck("1", 1e-16, True)
    check = sl.MasoCheck((good, sl.LayerMasoCheck("3", 0.5, True)), tolerance=1e-12)
    assert not check.ok and check.max_abs_error == 0.5
    assert str(check).splitlines() == [
        "FAILED: 2 MASO layers, tolerance 1e-12",
        "  '1': OK, max |MASO(h) - layer(h)| = 1e-16, argmax == code",
        "  '3': FAILED, max |MASO(h) - layer(h)| = 0.5, argmax == code",
    ]
    assert not sl.MasoCheck((sl.LayerMasoCheck("1", 0.0, False),), 1e-12).ok  # codes differ
    assert sl.MasoCheck((), 1e-12).ok  # no MASO layer: nothing to contradict


_CONCAVE = {"hardtanh", "relu6", "clamp", "clip", "minimum", "fmin", "amin", "min", "clamp_max"}


@pytest.mark.parametrize("name", ["mlp", "small_cnn", "maxout", "conv1d"])
def test_chain_masos_hold_at_other_inputs(name: str) -> None:
    """Without skips a layer's MASO is global: built at x, exact at any y, in any region."""
    model, x, y = zoo.build(name), zoo.inputs(name, n=1), zoo.inputs(name, n=6, seed=5)
    view = sl.SplineView(model, x)
    env, _ = view.program.record(y)
    for la in view.layers:
        m = sl.layer_maso(model, x, la.index)
        start = view.program.layers[la.index - 1].node if la.index else view.program.input_name
        h = view.program.per_sample(start, env[start])
        ref = view.program.per_sample(la.node, env[la.node])
        torch.testing.assert_close(m(h), ref.reshape(len(y), *m.output_shape), rtol=0, atol=1e-10)


def test_dense_parameters_are_the_weights() -> None:
    model, x = zoo.build("mlp"), zoo.inputs("mlp", n=1)
    m = sl.layer_maso(model, x, 1)  # Linear(16, 16) then ReLU: pieces [0, W h + b]
    w, b = model[2].weight, model[2].bias
    torch.testing.assert_close(m.slopes[:, 1], w, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.offsets[:, 1], b, rtol=0, atol=1e-12)
    assert (m.slopes[:, 0] == 0).all() and (m.offsets[:, 0] == 0).all()
    h = torch.randn(7, 16, dtype=torch.float64)
    torch.testing.assert_close(m.slots(h), m._pre(h), rtol=0, atol=1e-12)  # dense == operator
    ref = torch.einsum("krd,nd->nkr", m.slopes, h) + m.offsets
    torch.testing.assert_close(m.pieces(h), ref, rtol=0, atol=1e-12)


def test_leaky_and_pool_pieces() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.LeakyReLU(0.2), nn.MaxPool2d(2, padding=1))
    net = net.double().eval()
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64)
    leaky = sl.layer_maso(net, x, 0)
    z = net[0](x).reshape(-1)
    torch.testing.assert_close(leaky.pieces(x)[0], torch.stack([0.2 * z, z], 1))
    pool = sl.layer_maso(net, x, 1)
    assert pool.slopes.shape == (2 * 3 * 3, 4, 2 * 4 * 4)
    assert torch.isinf(pool.offsets).any()  # window positions in the padding
    h = net[1](net[0](x))
    torch.testing.assert_close(pool(h), net[2](h))


def test_concave_layers_are_refused_by_name() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Hardtanh(), nn.Linear(4, 2)).double().eval()
    with pytest.raises(sl.NotAMasoError, match=r"'1' \(hardtanh\).*not convex"):
        sl.layer_maso(net, torch.randn(1, 3, dtype=torch.float64), 0)


def test_a_leaky_relu_of_slope_one_has_no_maso_form_and_is_skipped() -> None:
    """Its two pieces lie on one line: the max cannot tell them apart while codes do (as a
    spline's repeated piece). check_masos said FAILED (argmax != code) at an error of 1e-16."""
    net = nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(1.0), nn.Linear(4, 2)).double().eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(sl.NotAMasoError, match=r"'1' \(leaky_relu\).*one line"):
        sl.layer_maso(net, x, 0)
    assert sl.check_masos(net, x).ok


def test_ties_of_max_pooling_after_max_pooling_agree_to_the_tolerance() -> None:
    """Max-pooling copies maxima to neighbours, so the next pool's windows hold exact ties,
    which the MASO recomputes in another order, an ulp apart: check_masos said FAILED
    (argmax != code) at an error of 1e-16 on most seeds (found by a review helper)."""
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, 1, 1),
        nn.Conv2d(5, 5, 1),
        nn.MaxPool2d(3, 1, 1),
        nn.Flatten(),
        nn.Linear(125, 3),
    )
    net = net.double().eval()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    check = sl.check_masos(net, x)
    assert check.ok and check.max_abs_error <= 1e-14, str(check)
    strict = sl.check_masos(net, x, rtol=1e-300)  # ties count only if exact: some are not
    assert not all(layer.codes_agree for layer in strict.layers)


def test_check_masos_names_the_layers_it_skipped() -> None:
    """With no MASO layer (a leaky slope of 2, a hardtanh) check_masos said "OK: 0 MASO layers"
    and nothing else; the skipped layers and why are listed now."""
    net = nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(2.0), nn.Linear(4, 2), nn.Hardtanh())
    check = sl.check_masos(net.double().eval(), torch.randn(4, 3, dtype=torch.float64))
    assert check.layers == () and check.ok
    assert [s.split(" (")[0] for s in check.skipped] == ["layer '1'", "layer '3'"]
    assert "skipped, no MASO: layer '1' (leaky_relu) is piecewise affine but not convex" in str(
        check
    )


def test_a_large_maso_refuses_weights_changed_after_it_was_made() -> None:
    """A MASO too large for dense slopes reads its pre-activations through the capture, with
    the weights of the moment, while its pieces (PReLU's slopes) are those it was made with:
    after a change it matched neither the old model (2.06 off) nor the new one (0.94)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.PReLU(init=0.25)).double().eval()
    x = torch.randn(2, 1, 65, 65, dtype=torch.float64)
    m = sl.layer_maso(net, x, 0)
    assert m.W is None  # (the operator form)
    with torch.no_grad():
        assert torch.equal(m(x), net(x))
        net[1].weight.data.fill_(0.5)  # through .data: no version counter moves
        with pytest.raises(ValueError, match="changed after layer '1''s MASO was made"):
            m(x)


def test_an_operator_form_maso_checks_dtype_and_takes_no_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without dense slopes a float32 h raised torch's raw dtype error, and 0 rows a reshape
    error (in both forms)."""
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU()).double().eval()
    x = torch.randn(2, 3, dtype=torch.float64)
    dense = sl.layer_maso(net, x, 0)
    monkeypatch.setattr(maso_module, "_DENSE", 0)
    operator = sl.layer_maso(net, x, 0)
    assert dense.W is not None and operator.W is None
    for m in (dense, operator):
        with pytest.raises(ValueError, match=r"h is torch\.float32, the MASO torch\.float64"):
            m(x.float())
        assert m(x[:0]).shape == (0, 4) and m.argmax(x[:0]).shape == (0, 4)
        assert torch.equal(m(x), dense(x))
