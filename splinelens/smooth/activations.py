"""The catalogue behind ``splinelens.smooth.fit``: activations with what their certificates need.

A smooth entry (``Curve``) gives f in float64 as PyTorch computes it, a proven bound ``m2`` of
sup |f''|, its straight-line asymptotes on both sides, a point on each side beyond which the
residual r(x) = f(x) - asymptote(x) is monotone and tends to 0, and the knots where f' jumps.
An exactly piecewise-affine entry (``Exact``) gives its pieces.

>>> sorted(ACTIVATIONS)[:4]
['celu', 'elu', 'gelu', 'gelu_tanh']
>>> activation_function("elu", alpha=2.0)(torch.tensor([-1e9, 3.0]))
tensor([-2., 3.], dtype=torch.float64)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "Activation", "Curve", "Exact", "activation", "activation_function"]

Tensor = torch.Tensor
Fn = Callable[[Tensor], Tensor]

SQRT3 = math.sqrt(3.0)
SELU_ALPHA = 1.6732632423543772848170429916717  # PyTorch's constants (ATen Activation.cpp)
SELU_SCALE = 1.0507009873554804934193349852946


@dataclass(frozen=True)
class Curve:
    """A smooth activation: f is C^1 with |f''| <= m2 away from ``forced`` (where f' may jump)."""

    f: Fn  # float64 -> float64: PyTorch's own (softplus: without its switch, see ``switch``)
    m2: float  # proven upper bound of sup |f''|
    left: tuple[float, float]  # asymptote (slope, intercept) at -inf
    right: tuple[float, float]  # asymptote (slope, intercept) at +inf
    x_left: float  # r = f - left is monotone on (-inf, x_left] and tends to 0
    x_right: float  # r = f - right is monotone on [x_right, inf) and tends to 0
    forced: tuple[float, ...] = ()  # knots every fit has (f' jumps, or asked for)
    switch: float = math.inf  # PyTorch returns the right asymptote itself beyond it (softplus)
    envelope: Fn | None = None  # u -> bound of |f''| on |x| >= u, nonincreasing in u

    def curvature(self, a: Tensor, b: Tensor) -> Tensor:
        """A bound of |f''| on each [a, b] (same shapes): m2, or the envelope where given."""
        if self.envelope is None:
            return torch.full_like(a, self.m2)
        u = torch.where((a <= 0) & (b >= 0), torch.zeros_like(a), torch.minimum(a.abs(), b.abs()))
        return self.envelope(u).clamp(max=self.m2)


@dataclass(frozen=True)
class Exact:
    """An exactly piecewise-affine activation: knots (K-1), slopes (K), intercepts (K)."""

    knots: tuple[float, ...]
    slopes: tuple[float, ...]
    intercepts: tuple[float, ...]


@dataclass(frozen=True)
class Activation:
    """A catalogue entry: PyTorch's function, its parameters' defaults and the spec's builder."""

    name: str
    torch_fn: Callable[..., Tensor]  # (x, **params) -> f(x), PyTorch's own definition
    build: Callable[..., Curve | Exact]  # (**params) -> spec; ValueError on bad params
    defaults: Mapping[str, float] = field(default_factory=dict)

    def spec(self, **params: float) -> Curve | Exact:
        """The spec for these parameters (defaults filled in); ValueError on unknown/bad ones."""
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"{self.name} got unknown parameter(s) {unknown}; "
                f"it takes {sorted(self.defaults) or 'none'}"
            )
        return self.build(**{**self.defaults, **params})


def _positive(name: str, **values: float) -> None:
    for key, v in values.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name}: {key} must be a finite number > 0, got {v!r}")


def _sigmoid() -> Curve:
    # s'' = s(1-s)(1-2s); with s = 1/2 + v: |s''| = 2|v|(1/4 - v^2), largest at v^2 = 1/12,
    # i.e. 1/(6 sqrt 3). Residuals s and s - 1 are monotone on all of R.
    return Curve(torch.sigmoid, 1 / (6 * SQRT3), (0.0, 0.0), (0.0, 1.0), 0.0, 0.0)


def _tanh() -> Curve:
    # tanh'' = -2t(1-t^2), t = tanh x in (-1, 1): largest at t^2 = 1/3, 4/(3 sqrt 3).
    return Curve(torch.tanh, 4 / (3 * SQRT3), (0.0, -1.0), (0.0, 1.0), 0.0, 0.0)


def _gelu() -> Curve:
    # f = x Phi(x): f' = Phi + x phi, f'' = phi(x)(2 - x^2) <= 2 phi(0) = sqrt(2/pi) (for x^2 > 2,
    # phi(x)(x^2 - 2) peaks at x = 2 with 2 phi(2) = 0.108). Left residual f: f' < 0 iff
    # |x| > Phi(-|x|)/phi(|x|) (Mills ratio, decreasing), true at 0.76 (0.748) hence for all
    # x <= -0.76. Right residual f(x) - x = f(-x): the mirror image.
    return Curve(F.gelu, math.sqrt(2 / math.pi), (0.0, 0.0), (1.0, 0.0), -0.76, 0.76)


def _gelu_tanh() -> Curve:
    # f = x S(x), S = (1 + tanh u)/2, u = c(x + a x^3). |f''| max 0.797885 (at 0) by dense float64
    # autograd evaluation (spacing 1e-4 on [-30, 30], tested); m2 = 0.8 keeps a 2e-3 margin.
    # f' = S (1 + 2x u'(x) (1 - S)): for x < 0, f' < 0 iff 2|x| u'(x) S(|x|) > 1, a product
    # increasing in |x|, equal to 1.0144 at 0.76. f(x) - x = f(-x) on the right.
    def f(x: Tensor) -> Tensor:
        return F.gelu(x, approximate="tanh")

    return Curve(f, 0.8, (0.0, 0.0), (1.0, 0.0), -0.76, 0.76)


def _silu() -> Curve:
    # f'' = s(1-s)(2 - x tanh(x/2)) with s = sigmoid(x): <= 2 s(1-s) <= 1/2 where positive; where
    # negative |f''| <= e^-|x| (|x| - 2) <= e^-3. So m2 = 1/2. f' = s(1 + x(1-s)): for x < 0,
    # f' < 0 iff |x| s(|x|) > 1 (increasing in |x|; 1.0015 at 1.28). f(x) - x = f(-x).
    return Curve(F.silu, 0.5, (0.0, 0.0), (1.0, 0.0), -1.28, 1.28)


def _mish() -> Curve:
    # |f''| max 0.64420 (at x = -0.088) by dense float64 autograd evaluation (tested); m2 = 0.65.
    # f = x T, T = tanh(softplus x), y = e^x: T'/T = 4(1+y)/(4 + 6y + 4y^2 + y^3), decreasing in
    # y, so for x < 0 f' < 0 iff |x| T'/T > 1 (increasing in |x|; 1.0079 at 1.2).
    # Right: f - x = -2x/(1 + (1+y)^2), increasing iff (1+y)(y(2x-1) - 1) > 1 (increasing for
    # x > 1/2; 1.08 at 0.8).
    return Curve(F.mish, 0.65, (0.0, 0.0), (1.0, 0.0), -1.2, 0.8)


def _elu(alpha: float) -> Curve:
    # x <= 0: alpha(e^x - 1), f'' = alpha e^x <= alpha; x > 0: x. f' jumps at 0 unless alpha = 1;
    # the knot at 0 is always forced. Left residual alpha e^x; right residual 0 from 0 on.
    _positive("elu", alpha=alpha)
    return Curve(
        lambda x: F.elu(x, alpha), alpha, (0.0, -alpha), (1.0, 0.0), 0.0, 0.0, forced=(0.0,)
    )


def _celu(alpha: float) -> Curve:
    # x <= 0: alpha(e^(x/alpha) - 1), f'' = e^(x/alpha)/alpha <= 1/alpha; f is C^1 (f'(0) = 1).
    _positive("celu", alpha=alpha)
    return Curve(
        lambda x: F.celu(x, alpha), 1 / alpha, (0.0, -alpha), (1.0, 0.0), 0.0, 0.0, forced=(0.0,)
    )


def _selu() -> Curve:
    # scale * elu(x, alpha) with PyTorch's constants: f'' <= scale*alpha, f' jumps at 0.
    sa = SELU_SCALE * SELU_ALPHA
    return Curve(F.selu, sa, (0.0, -sa), (SELU_SCALE, 0.0), 0.0, 0.0, forced=(0.0,))


def _softplus(beta: float, threshold: float) -> Curve:
    # f = log(1 + e^(bx))/b, f'' = b s(bx)(1 - s(bx)) <= b/4; residuals f and f(x) - x = f(-x) are
    # monotone on all of R. PyTorch returns x itself where bx > threshold: ``switch``.
    _positive("softplus", beta=beta)
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise ValueError(f"softplus: threshold must be a finite number, got {threshold!r}")

    def f(x: Tensor) -> Tensor:
        bx = beta * x
        return (bx.clamp(min=0) + torch.log1p(torch.exp(-bx.abs()))) / beta

    s = threshold / beta
    return Curve(f, beta / 4, (0.0, 0.0), (1.0, 0.0), 0.0, min(0.0, s), switch=s)


def _logsigmoid() -> Curve:
    # log s(x) = -softplus(-x): f'' = -s(1-s), |f''| <= 1/4; residuals -softplus(x), -softplus(-x).
    return Curve(F.logsigmoid, 0.25, (1.0, 0.0), (0.0, 0.0), 0.0, 0.0)


def _softsign() -> Curve:
    # x/(1+|x|): f' = 1/(1+|x|)^2 is Lipschitz, |f''| = 2/(1+|x|)^3 <= 2 (the envelope used per
    # piece). Residuals -+1/(1+|x|) are monotone and decay like 1/|x|: the tails are long.
    return Curve(
        F.softsign, 2.0, (0.0, -1.0), (0.0, 1.0), 0.0, 0.0, envelope=lambda u: 2 / (1 + u) ** 3
    )


def _hardswish() -> Curve:
    # 0 for x <= -3, x for x >= 3, x(x+3)/6 between (f'' = 1/3); f' jumps at -3 and 3.
    return Curve(F.hardswish, 1 / 3, (0.0, 0.0), (1.0, 0.0), -3.0, 3.0, forced=(-3.0, 3.0))


def _tanhshrink() -> Curve:
    # x - tanh x: f'' = -tanh'', bounded by 4/(3 sqrt 3); asymptotes x + 1 and x - 1.
    return Curve(F.tanhshrink, 4 / (3 * SQRT3), (1.0, 1.0), (1.0, -1.0), 0.0, 0.0)


def _hardsigmoid() -> Exact:
    return Exact((-3.0, 3.0), (0.0, 1 / 6, 0.0), (0.0, 0.5, 1.0))


def _softshrink(lambd: float) -> Exact:
    _positive("softshrink", lambd=lambd)
    return Exact((-lambd, lambd), (1.0, 0.0, 1.0), (lambd, 0.0, -lambd))


def _entries() -> dict[str, Activation]:
    rows = [
        ("sigmoid", torch.sigmoid, _sigmoid, {}),
        ("tanh", torch.tanh, _tanh, {}),
        ("gelu", F.gelu, _gelu, {}),
        ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), _gelu_tanh, {}),
        ("silu", F.silu, _silu, {}),
        ("mish", F.mish, _mish, {}),
        ("elu", F.elu, _elu, {"alpha": 1.0}),
        ("celu", F.celu, _celu, {"alpha": 1.0}),
        ("selu", F.selu, _selu, {}),
        ("softplus", F.softplus, _softplus, {"beta": 1.0, "threshold": 20.0}),
        ("logsigmoid", F.logsigmoid, _logsigmoid, {}),
        ("softsign", F.softsign, _softsign, {}),
        ("hardswish", F.hardswish, _hardswish, {}),
        ("tanhshrink", F.tanhshrink, _tanhshrink, {}),
        ("hardsigmoid", F.hardsigmoid, _hardsigmoid, {}),
        ("softshrink", F.softshrink, _softshrink, {"lambd": 0.5}),
    ]
    return {n: Activation(n, fn, b, MappingProxyType(d)) for n, fn, b, d in rows}


ACTIVATIONS: dict[str, Activation] = _entries()


def activation(name: str) -> Activation:
    """The catalogue entry ``name``; ValueError naming the valid choices otherwise."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def activation_function(name: str, **params: float) -> Fn:
    """f as PyTorch defines it (its own functional, parameters bound), evaluated in float64."""
    entry = activation(name)
    entry.spec(**params)  # validates the parameters
    full = {**entry.defaults, **params}

    def f(x: Tensor) -> Tensor:
        return entry.torch_fn(x.to(torch.float64), **full)

    return f
