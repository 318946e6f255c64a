"""Canonical forms: the functions the registry runs in place of some ops (``OpInfo.rewrite``)
and the decompositions of ops torch keeps whole (``OpInfo.decompose``).

>>> import torch
>>> reshape_view(torch.arange(6.0).view(2, 3).t(), [6]).tolist()   # any memory layout
[0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._decomp import decomposition_table

Tensor = torch.Tensor


class _EvalBatchNorm(torch.autograd.Function):
    """Batchnorm with running statistics: PyTorch's forward, and a one-multiply backward.

    In eval mode batchnorm is y = z * scale + shift per channel, so its input gradient is
    grad * scale: the same derivative as ``native_batch_norm_backward``, at a third of the cost.
    """

    @staticmethod
    def forward(
        ctx: Any,
        z: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        var: Tensor,
        momentum: float,
        eps: float,
    ) -> Tensor:
        out = torch.ops.aten._native_batch_norm_legit_no_training.default(
            z, weight, bias, mean, var, momentum, eps
        )[0]
        scale = torch.rsqrt(var + eps) * (weight if weight is not None else 1.0)
        ctx.save_for_backward(scale.view(-1, *([1] * (z.dim() - 2))))
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (scale,) = ctx.saved_tensors
        return grad * scale, None, None, None, None, None, None


def eval_batch_norm(*args: Any) -> tuple[Tensor, None, None]:
    """Drop-in for ``aten._native_batch_norm_legit_no_training`` (returns its output tuple).

    Arguments as that op's: (z, weight, bias, running_mean, running_var, momentum, eps).
    """
    if not torch.is_grad_enabled():  # no backward: PyTorch's own op, without Function overhead
        return torch.ops.aten._native_batch_norm_legit_no_training.default(*args)[0], None, None
    return _EvalBatchNorm.apply(*args), None, None


def copy_into(dst: Tensor, src: Tensor, non_blocking: bool = False) -> Tensor:
    """Drop-in for ``aten.copy`` (an in-place ``copy_``, functionalised): src in dst's shape and
    dtype, differentiable in src (``aten.copy`` has no derivative). dst's values are not read."""
    return src.to(dst.dtype).expand(dst.shape).clone()


def reshape_view(t: Tensor, *args: Any) -> Tensor:
    """Drop-in for ``aten.view`` / ``_unsafe_view`` / ``view_copy``: a reshape, which copies where
    t's layout has no view of the new shape (an input or activation in another memory layout than
    the capture's example, channels_last or sliced). The graph is functional: nothing relies on
    the alias. ``view(dtype)`` stays a view."""
    if args and isinstance(args[0], torch.dtype):
        return torch.ops.aten.view.dtype(t, *args)
    return torch.ops.aten.reshape.default(t, *args)


def rnn_relu_cell(
    input: torch.Tensor,  # (the schema's names)
    hx: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None = None,
    b_hh: torch.Tensor | None = None,
) -> torch.Tensor:
    """``nn.RNNCell(nonlinearity="relu")``'s step, which torch does not decompose."""
    return torch.relu(
        torch.nn.functional.linear(input, w_ih, b_ih) + torch.nn.functional.linear(hx, w_hh, b_hh)
    )


def clamp_tensor(x: Tensor, min: Tensor | None = None, max: Tensor | None = None) -> Tensor:
    """``torch.clamp`` / ``torch.clip`` with tensor bounds, as torch defines it: max with
    ``min``, then min with ``max``. Two pairwise MASOs, exact when the bounds cross (min > max
    gives max) or come from the activations, where one three-piece unit would not be."""
    if min is not None:
        x = torch.maximum(x, min)
    return x if max is None else torch.minimum(x, max)


# Linear ops torch keeps whole, by overload: diff (slices and a subtraction), tensordot (permutes,
# views, mm), addcmul / addcdiv (products and a sum), lerp (a selection by its constant weight,
# products and sums), tril / triu (a selection by a constant mask).
_BY_TORCH = {
    "diff": ("default",),
    "tensordot": ("default",),
    "addcmul": ("default",),
    "addcdiv": ("default",),
    "lerp": ("Scalar", "Tensor"),
    "tril": ("default",),
    "triu": ("default",),
    "rot90": ("default",),
    "diag_embed": ("default",),
}


def by_torch() -> dict[str, tuple[tuple[Any, Callable[..., Any]], ...]]:
    """Op name -> (overload, torch's decomposition) of the linear ops written out before capture
    into ops the registry reads, whose rules (products of activations, steps, the batch axis)
    then apply unchanged: torch's decomposition table, or the op's own composite kernel
    (``diff`` and ``tensordot`` have no entry there).

    >>> sorted(by_torch())[:3]
    ['addcdiv', 'addcmul', 'diag_embed']
    """
    out = {}
    for name, overloads in _BY_TORCH.items():
        ops = [getattr(getattr(torch.ops.aten, name), o) for o in overloads]
        out[name] = tuple((op, decomposition_table.get(op) or _composite(op)) for op in ops)
    return out


def _composite(op: Any) -> Callable[..., Any]:
    """The op's composite kernel, called below the dispatcher's Python entry (``op.decompose``
    would run the decomposition registered for it again, without end)."""
    key = torch._C.DispatchKey.CompositeImplicitAutograd

    def run(*args: Any, **kwargs: Any) -> Any:
        return op._op_dk(key, *args, **kwargs)

    return run
