"""The spline activation op: a continuous piecewise-affine function of one variable, per unit.

``torch.ops.splinelens.spline_activation`` is the one operation outside ATen that the capture
understands: ``sl.splinify`` puts it where a smooth activation was, and ``torch.export`` keeps
it as one graph node, so the capture sees one unit with K pieces (one entry of the partition
code), not K ReLUs. Piece k covers ``(knots[k-1], knots[k]]``: k = ``torch.bucketize(z, knots)``.

Finding the piece is a table lookup, not a binary search: when every knot is a multiple of a
power of two ``step <= 1`` (``cell_tables``), ``u = ceil(z / step)`` is computed exactly (a
multiplication by a power of two, then ``ceil``), and ``knots[j] < z`` exactly when
``knots[j] / step < u``; so ``cells[u - first]`` is the piece, the same integer as bucketize's,
in float32 and float64 alike. Other knots (or dtypes) fall back to ``torch.bucketize``.

>>> knots = torch.tensor([-1.0, 1.0], dtype=torch.float64)
>>> slopes, intercepts = torch.tensor([0.0, 1.0, 0.0]), torch.tensor([-1.0, 0.0, 1.0])
>>> tables = cell_tables(knots, slopes.double(), intercepts.double())
>>> z = torch.tensor([-3.0, -1.0, 0.5, 1.0, 2.0])
>>> piece_index(z, knots, tables.cells, tables.inv_step, tables.first)
tensor([0, 0, 1, 1, 2])
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch

Tensor = torch.Tensor
MAX_CELLS = 1 << 20  # beyond this a lookup table is not worth its memory: bucketize instead
_EXACT = (torch.float32, torch.float64)  # knot multiples below 2**24 are exact in both


class CellTables(NamedTuple):
    """Lookup tables of a spline: the piece of each cell (empty: bucketize), and its affine map."""

    cells: Tensor  # (M,) int64: piece of the cell (first + c - 1, first + c] * step
    cell_slopes: Tensor  # (M,) float64
    cell_intercepts: Tensor  # (M,) float64
    inv_step: float  # 1 / step, a power of two >= 1
    first: int  # knots[0] / step


def cell_tables(knots: Tensor, slopes: Tensor, intercepts: Tensor) -> CellTables:
    """The lookup tables of knots (K-1,) and pieces (K,), or empty ones if the knots are not
    small multiples of one power of two."""
    step = _common_step(knots)
    if step is None:
        empty = knots.new_zeros(0)
        return CellTables(empty.long(), empty, empty, 1.0, 0)
    m = torch.round(knots / step).long()  # (K-1,) exact integers
    u = torch.arange(int(m[0]), int(m[-1]) + 2, device=knots.device)  # (M,) every cell, and past
    cells = torch.searchsorted(m, u, right=False)  # pieces: number of knots strictly below u
    return CellTables(cells, slopes[cells], intercepts[cells], 1.0 / step, int(m[0]))


def _common_step(knots: Tensor) -> float | None:
    """The largest power of two <= 1 that divides every knot, if the table stays small."""
    if len(knots) == 0 or not bool(torch.isfinite(knots).all()):
        return None
    k = knots.double()
    for e in range(0, 40):
        step = 2.0**-e
        m = k / step
        if bool((m == torch.round(m)).all()):
            span = float(m[-1] - m[0]) + 2
            big = float(m.abs().max()) >= 2**23
            return None if span > MAX_CELLS or big else step
    return None


def piece_index(z: Tensor, knots: Tensor, cells: Tensor, inv_step: float, first: int) -> Tensor:
    """The piece of every entry of z (same shape, int64): ``torch.bucketize(z, knots)``, in the
    wider of the two dtypes (float32 knots rounded from float64 ones move; z widens exactly)."""
    if len(cells) == 0 or z.dtype not in _EXACT:
        dt = torch.promote_types(z.dtype, knots.dtype)
        return torch.bucketize(z.detach().to(dt), knots.to(dt))
    return lookup(cells, _cell(z, cells, inv_step, first))


def lookup(table: Tensor, index: Tensor) -> Tensor:
    """table[index] for a 1-D table (index_select: the fastest gather on CPU, and vmappable)."""
    return table.index_select(0, index.reshape(-1)).view(index.shape)


def _cell(z: Tensor, cells: Tensor, inv_step: float, first: int) -> Tensor:
    u = (z.detach() * inv_step).ceil_().sub_(first).clamp(0, len(cells) - 1)
    return u.nan_to_num_(0.0).long()  # (z.shape) a NaN input gives a NaN output, not a crash


_EXPORTING: contextvars.ContextVar[bool] = contextvars.ContextVar("splines_as_ops", default=False)


@contextlib.contextmanager
def splines_as_ops() -> Iterator[None]:
    """Within the block, spline activations call the ``spline_activation`` op (one graph node
    for ``torch.export``); elsewhere they run its plain torch body (``evaluate``), which
    autograd and ``torch.func`` transforms (vmap, jacrev) differentiate like any module."""
    token = _EXPORTING.set(True)
    try:
        yield
    finally:
        _EXPORTING.reset(token)


def as_op() -> bool:
    """Whether spline activations run as the op now (inside ``splines_as_ops``)."""
    return _EXPORTING.get()


def evaluate(
    z: Tensor,
    knots: Tensor,
    slopes: Tensor,
    intercepts: Tensor,
    cells: Tensor,
    cell_slopes: Tensor,
    cell_intercepts: Tensor,
    inv_step: float,
    first: int,
    flat_left: bool = False,
    flat_right: bool = False,
) -> Tensor:
    """slopes[k] * z + intercepts[k] with k the piece of z (differentiable in z). ``flat_left``,
    ``flat_right``: ``flat_tails``, so that a flat tail gives its intercept at z = -inf or inf
    too (0 * inf is NaN); False by default, as graphs saved before they were read."""
    zf = finite_on_flat(z, flat_left, flat_right)  # (the piece is z's own)
    if len(cells) == 0 or z.dtype not in _EXACT:
        return affine_piece(zf, slopes, intercepts, piece_index(z, knots, cells, inv_step, first))
    return affine_piece(zf, cell_slopes, cell_intercepts, _cell(z, cells, inv_step, first))


def flat_tails(knots: Tensor, slopes: Tensor) -> tuple[bool, bool]:
    """Whether the left and the right tail have slope 0 (a bounded activation's tails; one
    piece is both).

    >>> flat_tails(torch.tensor([-1.0, 1.0]), torch.tensor([0.0, 1.0, 2.0]))
    (True, False)
    """
    return bool(slopes[0] == 0), bool(slopes[-1] == 0)


def finite_on_flat(z: Tensor, left: bool, right: bool) -> Tensor:
    """z, with 0 for -inf (``left``) and inf (``right``): the value of a flat tail is its
    intercept there too, its piece is found from z itself, and ``where`` keeps only the mask
    for backward (an in-place activation overwrites z)."""
    if not (left or right):
        return z
    at = z.isinf() if left and right else z == (-math.inf if left else math.inf)
    return torch.where(at, 0.0, z)


def affine_piece(z: Tensor, slopes: Tensor, intercepts: Tensor, k: Tensor) -> Tensor:
    """slopes[k] * z + intercepts[k], in z's dtype (k: z's shape)."""
    dt = z.dtype
    return torch.addcmul(lookup(intercepts.to(dt), k), lookup(slopes.to(dt), k), z)


# ``evaluate`` as one op, for graph capture (``evaluate`` itself stays a plain function)
spline_activation = torch.library.custom_op("splinelens::spline_activation", mutates_args=())(
    evaluate
)


@spline_activation.register_fake
def _(z: Tensor, *args: object) -> Tensor:
    return torch.empty_like(z)


def _setup(ctx: object, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(inputs[0], inputs[1], inputs[2], inputs[4])  # type: ignore[attr-defined]
    ctx.grid = inputs[7:9]  # type: ignore[attr-defined]


def _backward(ctx: object, grad: Tensor) -> tuple:
    z, knots, slopes, cells = ctx.saved_tensors  # type: ignore[attr-defined]
    k = piece_index(z, knots, cells, *ctx.grid)  # type: ignore[attr-defined]
    return (grad * lookup(slopes.to(grad.dtype), k), *([None] * 10))


spline_activation.register_autograd(_backward, setup_context=_setup)


def is_continuous(knots: Tensor, slopes: Tensor, intercepts: Tensor, rtol: float = 1e-9) -> bool:
    """Whether adjacent pieces meet at every knot (to ``rtol`` of the values there)."""
    left = slopes[:-1] * knots + intercepts[:-1]  # (K-1,)
    right = slopes[1:] * knots + intercepts[1:]
    scale = left.abs() + right.abs() + knots.abs() * (slopes[:-1].abs() + slopes[1:].abs()) + 1
    return bool(((left - right).abs() <= rtol * scale).all()) and math.isfinite(float(scale.sum()))
