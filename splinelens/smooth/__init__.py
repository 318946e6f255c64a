"""Smooth activations as certified splines (the paper's remark in Sec. 4).

* ``activations``: the catalogue of smooth activations, their derivative bounds and asymptotes;
* ``fit``: certified piecewise-affine approximations on all of R (``fit_activation``);
* ``module``: ``SplineActivation``, one unit of K pieces in a network;
* ``rnn``: ``SplineRNN``, ``nn.RNN`` unrolled with a spline activation;
* ``convert``: ``splinify``, a copy of a network with every smooth activation replaced;
* ``compare``: ``approximation_error``, the splinified network against the smooth one.
"""

from splinelens.smooth.compare import ApproximationError, approximation_error
from splinelens.smooth.convert import splinify
from splinelens.smooth.fit import SplineFit, fit_activation
from splinelens.smooth.module import SplineActivation
from splinelens.smooth.rnn import SplineRNN

__all__ = [
    "ApproximationError",
    "SplineActivation",
    "SplineFit",
    "SplineRNN",
    "approximation_error",
    "fit_activation",
    "splinify",
]
