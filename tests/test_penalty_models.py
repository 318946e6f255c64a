"""The eq. (13) penalty against explicit sums; the paper's models are exact MASO networks."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn as nn

import splinelens as sl
from splinelens.paper.models import MODELS, build_model
from splinelens.penalty import PENALTY_KINDS, classifier, orthogonality_penalty, template_penalty


def explicit_penalty(w: torch.Tensor) -> torch.Tensor:
    """sum over c1 != c2 of <W_c1, W_c2>^2, by two loops."""
    total = w.new_zeros(())
    for c1 in range(w.shape[0]):
        for c2 in range(w.shape[0]):
            if c1 != c2:
                total = total + torch.dot(w[c1], w[c2]) ** 2
    return total


@pytest.mark.parametrize("shape", [(2, 3), (10, 64), (7, 1), (1, 5)])
def test_penalty_is_eq13(shape) -> None:
    w = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(
        orthogonality_penalty(w), explicit_penalty(w), rtol=1e-12, atol=1e-12
    )


def test_penalty_gradient() -> None:
    w = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(orthogonality_penalty, (w,))
    (g,) = torch.autograd.grad(orthogonality_penalty(w), w)
    (ref,) = torch.autograd.grad(explicit_penalty(w), w)
    torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)


def test_penalty_zero_for_orthogonal_rows_and_not_the_2018_variant() -> None:
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    assert orthogonality_penalty(q[:5] * 3.0).abs() < 1e-10  # norms do not matter
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert float(orthogonality_penalty(w)) == 2.0


def test_classifier_lookup() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert classifier(net) is net[2]
    assert classifier(net, "0") is net[0]
    with pytest.raises(ValueError, match="no classifier layer"):
        classifier(nn.Sequential(nn.ReLU()))
    pen = template_penalty(net, 0.5)
    torch.testing.assert_close(pen, 0.5 * explicit_penalty(net[2].weight))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_models_are_exact_maso_networks(name, channels, size) -> None:
    opts = {"depth": 1, "width": 1} if name == "resnet" else {}
    torch.manual_seed(0)
    model = build_model(name, channels, size, 7, **opts).double().eval()
    x = torch.randn(2, channels, size, size, dtype=torch.float64)
    assert model(x).shape == (2, 7)
    assert model.classifier.out_features == 7
    assert sl.verify(model, x).max_abs_error < 1e-11


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batchnorm_and_bias_switch_off(name) -> None:
    opts = {"depth": 1, "width": 1} if name == "resnet" else {}
    model = build_model(name, 1, 28, 10, batchnorm=False, bias=False, **opts)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert all(
        getattr(m, "bias", None) is None
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    )


def test_paper_shapes() -> None:
    small = build_model("small-cnn", 3, 32, 10)
    assert small.classifier.in_features == 128 * 4 * 4
    large = build_model("large-cnn", 3, 32, 10)
    convs = [m for m in large.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [96, 96, 96, 192, 192, 192, 192, 192]
    assert [c.padding[0] for c in convs] == [1, 2, 2, 0, 2, 0, 0, 0]
    wide = build_model("resnet", 3, 32, 10)  # ResNet4-4: 4 blocks per stage, width 4
    assert wide.classifier.in_features == 256
    with pytest.raises(KeyError, match="unknown architecture"):
        build_model("vgg", 3, 32, 10)


def test_penalty_float32_has_no_cancellation() -> None:
    """Large row norms must not swamp small off-diagonal products (float32)."""
    w = torch.randn(10, 2048) * 30
    exact = explicit_penalty(w.double())
    torch.testing.assert_close(orthogonality_penalty(w).double(), exact, rtol=1e-5, atol=0)


def test_penalties_and_input_convexity_are_at_top_level() -> None:
    import splinelens as sl
    from splinelens import penalty
    from splinelens.geometry import convexity as convex

    assert sl.orthogonality_penalty is penalty.orthogonality_penalty
    assert sl.template_penalty is penalty.template_penalty
    assert sl.make_input_convex is convex.make_input_convex
    w = torch.randn(4, 6, dtype=torch.float64)
    ref = sum((w[a] @ w[b]) ** 2 for a in range(4) for b in range(4) if a != b)
    assert torch.allclose(sl.orthogonality_penalty(w), ref)


def explicit_reference(w: torch.Tensor) -> torch.Tensor:
    """ortho_loss2 of the paper's code on W = w^T (D, C), by explicit sums: the mean over the
    C x C entries of (sum_d W[d, i] W[d, j] - [i == j] (1/D) sum_d W[d, i]^2)^2."""
    big_w = w.T
    d, c = big_w.shape
    total = w.new_zeros(())
    for i in range(c):
        for j in range(c):
            entry = sum(big_w[k, i] * big_w[k, j] for k in range(d))
            if i == j:
                entry = entry - sum(big_w[k, i] ** 2 for k in range(d)) / d
            total = total + entry**2
    return total / (c * c)


def explicit_row_norm(w: torch.Tensor) -> torch.Tensor:
    """Only the diagonal term of the reference code: sum_c ((1 - 1/D) ||w_c||^2)^2 / C^2."""
    c, d = w.shape
    return sum(((1 - 1 / d) * torch.dot(w[i], w[i])) ** 2 for i in range(c)) / (c * c)


@pytest.mark.parametrize("shape", [(2, 3), (10, 16), (7, 1), (1, 5)])
def test_reference_and_row_norm_penalties_are_the_explicit_sums(shape) -> None:
    w = torch.randn(*shape, dtype=torch.float64)
    got = orthogonality_penalty(w, "reference")
    torch.testing.assert_close(got, explicit_reference(w), rtol=1e-12, atol=1e-12)
    got = orthogonality_penalty(w, "row-norm")
    torch.testing.assert_close(got, explicit_row_norm(w), rtol=1e-12, atol=1e-12)
    c = w.shape[0]  # reference = eq13 / C^2 + the row-norm term
    torch.testing.assert_close(
        orthogonality_penalty(w, "reference"),
        orthogonality_penalty(w) / c**2 + orthogonality_penalty(w, "row-norm"),
        rtol=1e-12,
        atol=1e-12,
    )


def test_penalty_kinds_differ_where_they_should() -> None:
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    rows = q[:5] * 3.0  # orthogonal rows of norm 3
    assert orthogonality_penalty(rows, "eq13") < 1e-10  # eq. (13) ignores the norms
    assert orthogonality_penalty(rows, "reference") == pytest.approx((1 - 1 / 8) ** 2 * 81 / 5)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    for kind in ("eq13", "reference", "row-norm"):
        expected = 0.5 * orthogonality_penalty(net[2].weight, kind)
        torch.testing.assert_close(template_penalty(net, 0.5, kind=kind), expected)
    with pytest.raises(ValueError, match="eq13, reference, row-norm"):
        orthogonality_penalty(rows, "l2")


def test_penalties_do_not_depend_on_the_thread_count() -> None:
    """With 1000 classes the C x C sums pass ATen's one-thread grain (32768 entries): every
    kind is the same with 1 and 2 threads, bit for bit, and is the float64 sum of the float32
    Gram matrix's terms (reference: the explicit formula in float64, to float32 rounding)."""
    torch.manual_seed(1)
    w = torch.randn(1000, 64)
    threads = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2):
            torch.set_num_threads(n)
            got.append([orthogonality_penalty(w, kind) for kind in PENALTY_KINDS])
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*got, strict=True):
        assert torch.equal(one, two)
    gram = (w @ w.T).double()
    off = gram - torch.diag_embed(gram.diagonal())
    torch.testing.assert_close(got[0][0].double(), off.pow(2).sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", PENALTY_KINDS)
def test_a_16_bit_weight_is_penalised_in_float32(dtype: torch.dtype, kind: str) -> None:
    """A float16 weight's penalty was computed in float16: inf above 65504 (here about 1e5),
    and bfloat16's was 0.4 % off. Reference: the explicit sums in float64 of the same
    16-bit values (rtol 1e-5, float32 rounding); the gradient reaches the weight in its dtype."""
    torch.manual_seed(0)
    w = torch.randn(10, 1152).to(dtype).requires_grad_()
    got = orthogonality_penalty(w, kind)
    w64 = w.detach().double()
    ref = {"eq13": explicit_penalty, "reference": explicit_reference}.get(kind, explicit_row_norm)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref(w64), rtol=1e-5, atol=0)
    got.backward()
    assert w.grad.dtype == dtype and bool(torch.isfinite(w.grad).all())


@pytest.mark.parametrize(
    "lam",
    [
        *(float("nan"), -1.0, float("inf"), "0.1", True, None),
        *(torch.tensor([0.1]), torch.tensor(True), Fraction(1, 10)),
    ],
)
def test_template_penalty_refuses_a_lambda_that_is_not_a_number_at_least_0(lam) -> None:
    """lam = nan gave nan, -1 a penalty that rewards aligned templates, '0.1' a TypeError
    that did not name lam; a (1,) tensor gave a (1,) penalty, a boolean tensor was taken as 1,
    a Fraction raised a raw TypeError."""
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"lam must be a finite number >= 0, got"):
        template_penalty(net, lam)
    assert template_penalty(net, 0) == 0 and template_penalty(net, torch.tensor(0.5)) > 0


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64])
def test_orthogonality_penalty_refuses_weights_that_are_not_real_floats(dtype) -> None:
    """A complex weight gave a complex "penalty" (its products not conjugated), an integer one
    an integer."""
    with pytest.raises(TypeError, match="weight must be a real floating tensor"):
        sl.orthogonality_penalty(torch.ones(3, 4, dtype=dtype))
