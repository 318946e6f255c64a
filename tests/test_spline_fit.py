"""Certified PWL fits of activations (splinelens.smooth.fit) against dense float64 evaluation."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from splinelens.smooth.activations import Curve, Exact
from splinelens.smooth.fit import (
    ACTIVATIONS,
    MAX_PIECES,
    SplineFit,
    activation_function,
    certify,
    fit_activation,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a small shared CPU, waking a second thread per op dominates."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


EPS = torch.finfo(F64).eps
SMOOTH = [n for n, a in ACTIVATIONS.items() if isinstance(a.spec(), Curve)]
EXACT = [n for n, a in ACTIVATIONS.items() if isinstance(a.spec(), Exact)]
FAR = torch.tensor([-1e6, -1e3, 1e3, 1e6], dtype=F64)
# (name, params): defaults, plus non-default parameters that move knots, asymptotes and bounds
CASES = [(n, {}) for n in ACTIVATIONS] + [
    ("elu", {"alpha": 0.5}),
    ("celu", {"alpha": 2.0}),
    ("softplus", {"beta": 2.0, "threshold": 10.0}),
    ("softshrink", {"lambd": 1.25}),
]
# the K = 64 interpolants on [-8, 8] with error-equidistributed knots
TARGETS = {"sigmoid": 1.9e-4, "tanh": 4.5e-4, "gelu": 4.1e-4, "silu": 4.0e-4}


def dense_points(fit: SplineFit) -> torch.Tensor:
    """(N,) 200k points on [-60, 60], 64 per piece over the knots' span, knots, midpoints, far."""
    k = fit.knots
    lam = torch.linspace(0, 1, 64, dtype=F64)
    span = (k[:-1, None] + lam * k.diff()[:, None]).flatten()
    mid = (k[1:] + k[:-1]) / 2
    wide = torch.linspace(-60, 60, 200_001, dtype=F64)
    return torch.cat([wide, span, k, mid, k[:1] - 1, k[-1:] + 1, FAR])


def dense_error(fit: SplineFit, f, x: torch.Tensor) -> torch.Tensor:
    """|f - p| at x, less the float64 rounding of slope*x beyond |x| = 60 (a few eps*|x|)."""
    err = (f(x) - fit(x)).abs()
    return err - torch.where(x.abs() > 60, 8 * EPS * x.abs(), torch.zeros_like(x))


@pytest.mark.parametrize(("name", "params"), CASES)
@pytest.mark.parametrize("how", [{"pieces": 5}, {"pieces": 64}, {"pieces": 200}, {"tol": 1e-3}])
def test_dense_error_within_certificate(name: str, params: dict, how: dict) -> None:
    fit = fit_activation(name, **how, **params)
    f = activation_function(name, **params)  # PyTorch's own float64 implementation
    spec = ACTIVATIONS[name].spec(**params)
    x = dense_points(fit)
    worst = dense_error(fit, f, x).max().item()
    if name in SMOOTH:  # the certified f (PyTorch's own, but softplus: without the switch)
        worst = max(worst, dense_error(fit, spec.f, x).max().item())
    # hardsigmoid: exact, but its slope 1/6 rounds apart from torch's (x + 3)/6 by an ulp
    assert worst <= fit.sup_error + (EPS if name == "hardsigmoid" else 0.0), (worst, fit.sup_error)
    if name in SMOOTH:  # tight: the grid slack is 1% (softplus: its switch error is added)
        assert fit.sup_error <= 1.5 * worst, (fit.sup_error, worst)
    if "pieces" in how:
        assert fit.pieces == how["pieces"]
    assert fit.knots.dtype == fit.slopes.dtype == fit.intercepts.dtype == F64
    assert fit.knots.shape == (fit.pieces - 1,) and fit.intercepts.shape == (fit.pieces,)
    assert bool((fit.knots.diff() > 0).all())


@pytest.mark.parametrize(("name", "params"), CASES)
@pytest.mark.parametrize("k", [5, 64, 200])
def test_continuous_at_every_knot(name: str, params: dict, k: int) -> None:
    fit = fit_activation(name, pieces=k, **params)
    t = fit.knots
    left = fit.slopes[:-1] * t + fit.intercepts[:-1]
    right = fit.slopes[1:] * t + fit.intercepts[1:]
    scale = torch.maximum(left.abs(), right.abs()).clamp(min=1)
    assert ((left - right).abs() / scale).max().item() <= 1e-12


@pytest.mark.parametrize(
    ("name", "tol"),
    [("sigmoid", 1e-2), ("sigmoid", 1e-4), ("gelu", 1e-3), ("silu", 3e-4), ("softsign", 1e-3),
     ("elu", 1e-4), ("hardswish", 1e-3), ("softplus", 1e-3), ("mish", 1e-2)],
)  # fmt: skip
def test_tol_gives_the_fewest_pieces(name: str, tol: float) -> None:
    fit = fit_activation(name, tol=tol)
    assert fit.sup_error <= tol
    assert fit_activation(name, pieces=fit.pieces).sup_error == fit.sup_error  # same construction
    assert fit_activation(name, pieces=fit.pieces - 1).sup_error > tol


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "gelu", "silu"])
def test_error_falls_like_inverse_square(name: str) -> None:
    e32, e64, e128 = (fit_activation(name, pieces=k).sup_error for k in (32, 64, 128))
    assert 3 < e32 / e64 < 5 and 3 < e64 / e128 < 5, (e32, e64, e128)


@pytest.mark.parametrize("name", list(TARGETS))
def test_beats_equidistributed_interpolant_at_64(name: str) -> None:
    # certified on all of R, with 62 inner pieces, against the reference's 64 pieces on [-8, 8]
    assert fit_activation(name, pieces=64).sup_error < TARGETS[name]


@pytest.mark.parametrize(("name", "params"), [c for c in CASES if c[0] in EXACT])
@pytest.mark.parametrize("how", [{"tol": 1e-9}, {"pieces": 3}, {"pieces": 7}])
def test_exact_ones_are_exact(name: str, params: dict, how: dict) -> None:
    fit = fit_activation(name, **how, **params)
    assert fit.sup_error == 0.0
    assert fit.pieces == how.get("pieces", 3)
    x = dense_points(fit)
    ref = activation_function(name, **params)(x)
    if name == "softshrink":  # slopes 0/1, intercepts +-lambd: the same float operations
        assert torch.equal(fit(x), ref)
    else:  # hardsigmoid: x/6 + 1/2 and torch's (x + 3)/6 round apart by at most one ulp
        assert (fit(x) - ref).abs().max().item() <= EPS


def test_hardsigmoid_and_softshrink_pieces() -> None:
    fit = fit_activation("hardsigmoid", tol=1e-3)
    assert fit.knots.tolist() == [-3.0, 3.0] and fit.intercepts.tolist() == [0.0, 0.5, 1.0]
    fit = fit_activation("softshrink", pieces=3, lambd=0.25)
    assert fit.knots.tolist() == [-0.25, 0.25] and fit.slopes.tolist() == [1.0, 0.0, 1.0]


def second_derivative(f, x: torch.Tensor) -> torch.Tensor:
    """(N,) f'' of an elementwise f by double autograd, float64."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    (g2,) = torch.autograd.grad(g.sum(), x)
    return g2


@pytest.mark.parametrize(("name", "params"), [c for c in CASES if c[0] in SMOOTH])
def test_m2_bounds_f_second_derivative(name: str, params: dict) -> None:
    spec = ACTIVATIONS[name].spec(**params)
    x = torch.cat([torch.linspace(-30, 30, 300_001, dtype=F64), torch.tensor(spec.forced)])
    x = torch.cat([x, x[-len(spec.forced) :] + 1e-9, x[-len(spec.forced) :] - 1e-9])
    d2 = second_derivative(spec.f, x).abs()
    assert d2.max().item() <= spec.m2
    if name != "hardswish":  # m2 is not loose either (hardswish's: 1/3 exactly)
        assert d2.max().item() >= 0.97 * spec.m2
    if spec.envelope is not None:  # softsign: the per-piece bound
        assert bool((d2 <= spec.envelope(x.abs()) * (1 + 1e-12)).all())


@pytest.mark.parametrize(("name", "params"), [c for c in CASES if c[0] in SMOOTH])
def test_residuals_monotone_beyond_thresholds(name: str, params: dict) -> None:
    spec = ACTIVATIONS[name].spec(**params)
    out = torch.cat([torch.linspace(0, 60, 60_001, dtype=F64), torch.tensor([1e3, 1e6])])
    for x0, (slope, icpt), side in [(spec.x_left, spec.left, -1), (spec.x_right, spec.right, 1)]:
        x = x0 + side * out  # (N,) outward from the threshold
        r = spec.f(x) - (slope * x + icpt)
        noise = 8 * EPS * (1 + x.abs())
        assert bool((r.abs().diff() <= noise[1:]).all()), f"{name}: |r| grows outward"
        assert bool((r * r[0] >= -noise * r.abs()).all()), f"{name}: r changes sign"
        assert r[-1].abs().item() <= 1e-5, f"{name}: r does not tend to 0"


def test_forced_knots_are_knots() -> None:
    for name in ("elu", "celu", "selu", "hardswish"):
        fit = fit_activation(name, pieces=9)
        for t in ACTIVATIONS[name].spec().forced:
            assert t in fit.knots.tolist(), (name, t)
    assert 0.0 in fit_activation("elu", pieces=9, alpha=0.5).knots.tolist()


@pytest.mark.parametrize("k", [8, 64])
def test_softplus_tail_starts_at_the_switch(k: int) -> None:
    fit = fit_activation("softplus", pieces=k, beta=2.0, threshold=5.0)
    assert fit.knots[-1].item() <= 2.5  # PyTorch returns x from x = threshold/beta on
    x = torch.cat([torch.linspace(-20, 20, 400_001, dtype=F64), torch.tensor([2.5, 2.5 + 1e-12])])
    smooth = torch.log1p(torch.exp(2 * x)) / 2
    err_torch = (F.softplus(x, 2.0, 5.0) - fit(x)).abs().max().item()
    err_smooth = (smooth - fit(x)).abs().max().item()
    assert max(err_torch, err_smooth) <= fit.sup_error <= 1.02 * max(err_torch, err_smooth)
    gap = torch.log1p(torch.exp(torch.tensor(-5.0, dtype=F64))).item() / 2  # smooth - x at 2.5
    assert fit.sup_error >= gap / 2
    with pytest.raises(ValueError, match="raise threshold"):
        fit_activation("softplus", tol=gap / 2, beta=2.0, threshold=5.0)


def test_call_dtype_device_and_caching() -> None:
    fit = fit_activation("tanh", pieces=32)
    x = torch.linspace(-5, 5, 101)
    y = fit(x)
    assert y.dtype == torch.float32
    assert (y.double() - torch.tanh(x.double())).abs().max().item() <= fit.sup_error + 1e-6
    again = fit_activation("tanh", pieces=32)
    assert again is not fit and torch.equal(again.knots, fit.knots)
    fit.knots.zero_()  # each call has its own tensors: the cache is not touched
    assert torch.equal(fit_activation("tanh", pieces=32).knots, again.knots)
    assert (
        fit_activation("elu", pieces=8, alpha=1).sup_error
        == fit_activation("elu", pieces=8).sup_error
    )


def certify_check(fit: SplineFit) -> float:
    """certify(fit) after checking it bounds, and is within 1.5x of, the dense error."""
    bound = certify(fit)
    worst = dense_error(fit, activation_function(fit.name), dense_points(fit)).max().item()
    assert worst <= bound <= 1.5 * worst, (worst, bound)
    return bound


def test_certify_any_pwl() -> None:
    fit = fit_activation("gelu", pieces=16)
    assert certify(fit) == fit.sup_error
    assert 0 <= certify(fit_activation("hardsigmoid", pieces=5)) <= 1e-13
    # float32-rounded coefficients: continuity lost, still certified
    rounded = replace(
        fit, **{k: getattr(fit, k).float().double() for k in ("slopes", "intercepts")}
    )
    certify_check(rounded)
    # the tail put on the asymptote itself: its error near the end knot is |r(t)|, not |d| = 0
    on_asymptote = replace(
        fit, intercepts=torch.cat([torch.zeros(1, dtype=F64), fit.intercepts[1:]])
    )
    assert certify_check(on_asymptote) > 1.2 * fit.sup_error
    # end knots inside GELU's thresholds (+-0.76): the tails' pieces are checked up to them
    short = SplineFit(
        "gelu",
        torch.tensor([-0.3, 0.3], dtype=F64),
        torch.tensor([0.0, 0.5, 1.0], dtype=F64),
        torch.tensor([0.05, 0.2, 0.05], dtype=F64),  # GELU's dip (-0.17 at -0.75) is the worst
        float("nan"),
    )
    certify_check(short)
    assert certify(replace(short, slopes=torch.tensor([0.0, 0.5, 0.9], dtype=F64))) == float("inf")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: fit_activation("swish", pieces=8), "unknown activation 'swish'; choose one of"),
        (lambda: fit_activation("gelu", pieces=8, alpha=1.0), r"unknown parameter.*takes none"),
        (lambda: fit_activation("elu", pieces=8, beta=1.0), r"takes \['alpha'\]"),
        (lambda: fit_activation("elu", pieces=8, alpha=0.0), "alpha must be a finite number > 0"),
        (lambda: fit_activation("celu", pieces=8, alpha=-1.0), "alpha must be"),
        (lambda: fit_activation("softplus", pieces=8, beta=0.0), "beta must be"),
        (lambda: fit_activation("softshrink", pieces=3, lambd=-0.5), "lambd must be"),
        (lambda: fit_activation("gelu", tol=0.0), "tol must be a finite number > 0"),
        (lambda: fit_activation("gelu", tol=float("nan")), "tol must be"),
        (lambda: fit_activation("gelu"), "exactly one of tol= or pieces="),
        (lambda: fit_activation("gelu", tol=1e-3, pieces=8), "exactly one of"),
        (lambda: fit_activation("gelu", pieces=2), r"pieces must be in \[3, "),
        (lambda: fit_activation("hardsigmoid", pieces=2), r"pieces must be in \[3, "),
        (lambda: fit_activation("gelu", pieces=MAX_PIECES + 1), "pieces must be in"),
        (lambda: fit_activation("gelu", pieces=8.0), "pieces must be an int"),
        (lambda: fit_activation("softplus", tol=1e-3, threshold=2.0), "below 0.0635, half the gap"),
        (lambda: activation_function("tanh", beta=2.0), "unknown parameter"),
    ],
)
def test_bad_input_raises(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("name, params", [("softplus", {"beta": 1e12}), ("celu", {"alpha": 1e-12})])
def test_a_fit_that_breaks_down_is_refused(name: str, params: dict) -> None:
    """Far from the fitter's scale the knots stopped increasing and slopes overflowed, yet the
    fit was returned with a finite sup_error (splinify then failed on non-finite pieces)."""
    with pytest.raises(ValueError, match="the fit breaks down at this scale"):
        fit_activation(name, pieces=200, **params)


_LIMITS = {  # f at -inf and +inf (softsign's as a limit: torch gives nan there)
    "sigmoid": (0.0, 1.0),
    "tanh": (-1.0, 1.0),
    "softsign": (-1.0, 1.0),
    "logsigmoid": (-math.inf, 0.0),
    "softplus": (0.0, math.inf),
    "elu": (-1.0, math.inf),
}


@pytest.mark.parametrize("name", list(_LIMITS))
def test_a_fit_at_infinity_is_its_tail(name: str) -> None:
    """SplineFit(x) was nan at +-inf on a flat tail (0 * inf), where the module gives the tail's
    value (found in review). Reference: f's limits at +-inf, within the certificate where they
    are finite; nan for nan."""
    fit = fit_activation(name, pieces=8)
    got = fit(torch.tensor([-math.inf, math.inf, math.nan], dtype=torch.float64)).tolist()
    for value, limit in zip(got[:2], _LIMITS[name]):
        assert value == limit if math.isinf(limit) else abs(value - limit) <= fit.sup_error
    assert math.isnan(got[2])
