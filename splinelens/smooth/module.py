"""``SplineActivation``: a continuous piecewise-affine activation module, one unit of K pieces.

It holds its knots (K-1,), slopes (K,) and intercepts (K,) as float64 buffers, which keep
float64 when the model is cast (``model.float()`` moves them, never rounds them), and the
certified sup-norm error of the smooth activation it replaces (``sup_error``; 0 for one built
by hand). Its forward is one ``splinelens.spline_activation`` op, so the capture sees one unit
per entry, and codes store each unit's piece.

>>> act = SplineActivation(torch.tensor([-1.0, 1.0]), torch.tensor([0.0, 1.0, 0.0]),
...                        torch.tensor([-1.0, 0.0, 1.0]), name="hardtanh")
>>> act
SplineActivation(hardtanh, pieces=3, sup_error=0)
>>> act(torch.tensor([-2.0, 0.5, 3.0]))
tensor([-1.0000,  0.5000,  1.0000])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode, _pop_mode, _push_mode

from splinelens._capture import (
    as_op,
    cell_tables,
    evaluate,
    flat_tails,
    is_continuous,
    spline_activation,
)

__all__ = ["ActivationRedirect", "SplineActivation", "write_back"]

Tensor = torch.Tensor
_TABLES = ("cells", "cell_slopes", "cell_intercepts")


class SplineActivation(nn.Module):
    """p(z) = slopes[k] * z + intercepts[k] elementwise, k = bucketize(z, knots) (Sec. 4: an
    affine spline; a MASO only when the slopes increase). ``sup_error``: a certified bound of
    sup over R of |f - p| for the activation f it stands for; ``activation``: f's name."""

    knots: Tensor
    slopes: Tensor
    intercepts: Tensor
    # compared by value at every capture check: the lookup tables follow them (``_follow``)
    __splinelens_values__ = ("knots", "slopes", "intercepts")

    def __init__(
        self,
        knots: Tensor,
        slopes: Tensor,
        intercepts: Tensor,
        *,
        name: str = "spline",
        sup_error: float = 0.0,
    ) -> None:
        super().__init__()
        knots, slopes, intercepts = (
            torch.as_tensor(t).double() for t in (knots, slopes, intercepts)
        )
        _check(knots, slopes, intercepts)
        self.register_buffer("knots", knots.clone())  # (K-1,)
        self.register_buffer("slopes", slopes.clone())  # (K,)
        self.register_buffer("intercepts", intercepts.clone())  # (K,)
        self.activation, self.sup_error = name, float(sup_error)
        self._build_tables()

    @classmethod
    def from_fit(cls, fit: Any) -> SplineActivation:
        """From a ``SplineFit`` (``fit_activation``): its pieces, name and certified error."""
        return cls(fit.knots, fit.slopes, fit.intercepts, name=fit.name, sup_error=fit.sup_error)

    @property
    def pieces(self) -> int:
        """K, the number of affine pieces (the two unbounded tails included)."""
        return len(self.slopes)

    inplace = False  # (the module it replaced wrote its output into its input)

    def forward(self, z: Tensor) -> Tensor:
        if self.inplace:
            return write_back(z, self._apply_to(z))
        return self._apply_to(z)

    def _apply_to(self, z: Tensor) -> Tensor:
        if z.is_complex():  # (z.to below would drop the imaginary part, with a warning only)
            raise TypeError(
                f"a spline activation takes real inputs, got {z.dtype}: its pieces are affine "
                "functions of a real number"
            )
        if not z.is_floating_point():  # (as torch.sigmoid: integers in the default dtype)
            z = z.to(torch.get_default_dtype())
        if as_op():  # one graph node when captured
            return spline_activation(z, *self._op_args())
        return _eager(self, z)

    def _op_args(self) -> tuple:
        """The arguments of ``spline_activation`` (and ``evaluate``) after z."""
        pieces = (self.knots, self.slopes, self.intercepts)
        tables = (self.cells, self.cell_slopes, self.cell_intercepts)
        return (*pieces, *tables, self.inv_step, self.first, *self.tails)

    @property
    def sup_error(self) -> float:
        """The certified bound of |spline - activation|; inf once the pieces differ from those
        it was certified for (changed in place, through ``.data`` too, or loaded)."""
        built = self.__dict__.get("_built")
        if built is not None and not self._unchanged():
            return math.inf
        return self._sup_error

    @sup_error.setter
    def sup_error(self, value: float) -> None:
        bound = float(value)
        if not bound >= 0:  # (NaN too)
            raise ValueError(f"sup_error must be a bound >= 0 (inf: none), got {value!r}")
        self.__dict__["_sup_error"] = bound

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle; a module saved whole before ``sup_error`` was a property holds it as a
        plain attribute (``sup_error``), now kept as ``_sup_error``."""
        state = dict(state)
        if "sup_error" in state:
            state["_sup_error"] = float(state.pop("sup_error"))
        super().__setstate__(state)
        if "tails" not in state:  # (saved before tails were kept)
            self.tails = flat_tails(self.knots, self.slopes)

    def extra_repr(self) -> str:
        note = " (pieces changed or loaded: not certified)" if math.isinf(self.sup_error) else ""
        return f"{self.activation}, pieces={self.pieces}, sup_error={self.sup_error:.3g}{note}"

    def _build_tables(self) -> None:
        tables = cell_tables(self.knots, self.slopes, self.intercepts)
        for name in _TABLES:
            self.register_buffer(name, getattr(tables, name), persistent=False)
        self.inv_step, self.first = tables.inv_step, tables.first
        self.tails = flat_tails(self.knots, self.slopes)  # (their value at -inf / inf)
        self._built = tuple(t.clone() for t in self._pieces())  # what the tables were built from

    def _pieces(self) -> tuple[Tensor, Tensor, Tensor]:
        """The knots, slopes and intercepts: what the spline is."""
        return self.knots, self.slopes, self.intercepts

    def _follow(self) -> None:
        """Rebuild the lookup tables when the knots, slopes or intercepts changed in place since
        they were built (an EMA step's ``copy_``, a write through ``.data``): the tables must
        never answer for other pieces. The spline must still be continuous; its certificate
        was for the old pieces. (Not while torch.export or torch.compile traces the model:
        call it once first.)"""
        if self._unchanged():
            return
        _check(*self._pieces())
        self.sup_error = math.inf
        self._build_tables()

    def _unchanged(self) -> bool:
        """Whether the pieces are those the tables were built from (on a GPU, one
        synchronisation; on the CPU, three comparisons that synchronise nothing)."""
        built, now = self._built, self._pieces()
        if any(a.shape != b.shape or a.device != b.device for a, b in zip(built, now)):
            return False
        if now[0].device.type == "cpu":
            return all(map(torch.equal, built, now))
        return bool(torch.stack([(a == b).all() for a, b in zip(built, now)]).all())

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> SplineActivation:
        """Move buffers where ``fn`` sends tensors (``.to(device)``, ``.cuda()``), never casting
        them: the knots and pieces stay float64 (cast at the call to the input's dtype)."""
        device = fn(torch.zeros((), dtype=torch.float64, device=self.knots.device)).device
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(device)
        self._built = tuple(t.to(device) for t in self._built)
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        _check(self.knots, self.slopes, self.intercepts)
        if not self._unchanged():
            self.sup_error = math.inf  # the certificate was for the old pieces
        self._build_tables()  # the lookup tables follow the loaded knots


def write_back(target: Tensor, y: Tensor) -> Tensor:
    """``target.copy_(y)`` for an in-place or ``out=`` activation, refused as torch refuses it
    where y's dtype does not cast to target's (an integer target would truncate).

    >>> write_back(torch.zeros(2), torch.ones(2))
    tensor([1., 1.])
    """
    if not torch.can_cast(y.dtype, target.dtype):
        raise RuntimeError(
            f"result type {y.dtype} can't be cast to the desired output type {target.dtype} "
            "(an activation written in place, or into out=, of an integer tensor)"
        )
    return target.copy_(y)


class ActivationRedirect(TorchFunctionMode):
    """A torch function mode that redirects activation functions only (``splinify``'s redirect
    of functional calls): a spline activation steps out of it while it evaluates, since none of
    its ops is one it redirects. It is active through a splinified copy's whole forward, and
    seeing each of the ~20 ops of every activation doubled that forward at a batch of 1."""


def _eager(act: SplineActivation, z: Tensor) -> Tensor:
    """``act``'s spline of z outside an export, its tables first made to follow its pieces
    (``_follow``), out of an ``ActivationRedirect`` that is the innermost mode (other modes
    see every op, as for any module)."""
    tracing = _tracing()
    redirect = None if tracing else _get_current_function_mode()
    step_out = isinstance(redirect, ActivationRedirect)
    if step_out:
        _pop_mode()
    try:
        if not tracing:
            _refuse_trained_pieces(act)
            act._follow()
        return evaluate(z, *act._op_args())
    finally:
        if step_out:
            _push_mode(redirect)


def _refuse_trained_pieces(act: SplineActivation) -> None:
    """Refuse pieces that require a gradient (``torch.func.functional_call`` with them, under
    ``torch.func.grad`` too): the spline reads lookup tables built from them, so their gradient
    was zero or missing, silently."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in act._pieces()):
        raise RuntimeError(
            "a spline activation's knots, slopes and intercepts are fixed buffers: gradients "
            "reach its input, not them (it reads lookup tables built from them). To change the "
            "spline, fit another one (sl.fit_activation) or build a SplineActivation"
        )


def _tracing() -> bool:
    """Whether torch.export or torch.compile traces the forward pass now (fake tensors)."""
    return torch.compiler.is_exporting() or torch.compiler.is_compiling()


def _check(knots: Tensor, slopes: Tensor, intercepts: Tensor) -> None:
    """Refuse what is not a continuous piecewise-affine function of one variable."""
    if knots.dim() != 1 or slopes.shape != (len(knots) + 1,) or intercepts.shape != slopes.shape:
        raise ValueError(
            f"a spline needs knots (K-1,), slopes (K,) and intercepts (K,); got shapes "
            f"{tuple(knots.shape)}, {tuple(slopes.shape)}, {tuple(intercepts.shape)}"
        )
    if not all(bool(torch.isfinite(t).all()) for t in (knots, slopes, intercepts)):
        raise ValueError("a spline's knots, slopes and intercepts must be finite")
    if len(knots) and not bool((knots[1:] > knots[:-1]).all()):
        raise ValueError("a spline's knots must be strictly increasing")
    if not is_continuous(knots, slopes, intercepts):
        raise ValueError(
            "a spline activation must be continuous: adjacent pieces must meet at each knot "
            "(slopes[k] * knots[k] + intercepts[k] == slopes[k+1] * knots[k] + intercepts[k+1])"
        )
