"""splinelens: exact spline views of piecewise-affine PyTorch networks.

Balestriero & Baraniuk, "A Spline Theory of Deep Networks" (ICML 2018): a network built from
max-affine spline operators is, for each input x, the affine map f(x) = A[x] x + B[x].

>>> import torch, torch.nn as nn, splinelens as sl
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
>>> x = torch.randn(5, 4)
>>> sl.verify(net, x).ok
True
"""

from splinelens._checks import LayerNotFoundError
from splinelens.affine import AffineMap
from splinelens.codes import CodesFileError, LayerCodes, PartitionCodes
from splinelens.distance import nearest_neighbors, partition_distance
from splinelens.errors import BatchSizeError, StaleCaptureError, UnsupportedOperationError
from splinelens.geometry.convexity import (
    ConvexityReport,
    convexity,
    convexity_gap,
    make_input_convex,
)
from splinelens.geometry.maso import MASO, NotAMasoError, layer_maso
from splinelens.geometry.maso_check import LayerMasoCheck, MasoCheck, check_masos
from splinelens.geometry.matching import TemplateMatchingGap, template_matching_gap
from splinelens.geometry.region import (
    LocalComplexity,
    RegionPolytope,
    local_complexity,
    region_polytope,
    region_radius,
    sampled_local_complexity,
)
from splinelens.geometry.slices import LayerSlice, SlicePartition, slice_partition
from splinelens.penalty import orthogonality_penalty, template_penalty
from splinelens.smooth import (
    ApproximationError,
    SplineActivation,
    SplineFit,
    approximation_error,
    fit_activation,
    splinify,
)
from splinelens.view import SplineView, Verification, affine_map, partition_codes, verify

__version__ = "0.1.0"

__all__ = [
    "MASO",
    "AffineMap",
    "ApproximationError",
    "BatchSizeError",
    "CodesFileError",
    "ConvexityReport",
    "LayerCodes",
    "LayerMasoCheck",
    "LayerNotFoundError",
    "LayerSlice",
    "LocalComplexity",
    "MasoCheck",
    "NotAMasoError",
    "PartitionCodes",
    "RegionPolytope",
    "SlicePartition",
    "SplineActivation",
    "SplineFit",
    "SplineView",
    "StaleCaptureError",
    "TemplateMatchingGap",
    "UnsupportedOperationError",
    "Verification",
    "affine_map",
    "approximation_error",
    "check_masos",
    "convexity",
    "convexity_gap",
    "fit_activation",
    "layer_maso",
    "local_complexity",
    "make_input_convex",
    "nearest_neighbors",
    "orthogonality_penalty",
    "partition_codes",
    "partition_distance",
    "region_polytope",
    "region_radius",
    "sampled_local_complexity",
    "slice_partition",
    "splinify",
    "template_matching_gap",
    "template_penalty",
    "verify",
]
