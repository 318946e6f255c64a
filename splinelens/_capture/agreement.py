"""Checks that a capture computes what the model computes: run before and after the export.

The model runs once on a copy of two inputs (a clear error for inputs it cannot take; a forward
that changes its input in place is refused, and your tensor is left as it was); once compiled,
the program's output on them must be the model's own, to ``verify``'s tolerance, so a forward
that branches on ``torch.compiler.is_exporting()`` is refused. A capture inside
``torch.nn.utils.parametrize.cached()`` is refused before it starts.

>>> import torch, torch.nn as nn
>>> class Shift(nn.Module):
...     def forward(self, x):
...         return x.sub_(1.0)
>>> x = torch.ones(2, 3)
>>> check_runs(Shift(), x)
Traceback (most recent call last):
...
splinelens.errors.UnsupportedOperationError: an in-place change of the input at Shift changes ...
>>> float(x.sum())  # left as it was
6.0
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn as nn

from splinelens._capture.program import Program, apply_g, leaves
from splinelens._checks import map_rtol, term_sizes
from splinelens._precision import exact_matmul
from splinelens.errors import UnsupportedOperationError


def program_output(prog: Program, x: torch.Tensor) -> torch.Tensor:
    """The program's output for x, after the output nonlinearity g (as the model returns it)."""
    with torch.no_grad(), exact_matmul():
        out = prog.per_sample(prog.output_name, prog.record(x)[0][prog.output_name])
    return apply_g(prog.output_g, out)


def check_runs(model: nn.Module, x: torch.Tensor) -> Any:
    """Run the model once on a copy of x and return its output: a clear error when the input
    does not fit it (wrong shape), or when forward changes its input in place."""
    copy = x.clone()
    try:
        with torch.no_grad(), exact_matmul(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (TF32 off: compared with the exact program)
            out = model(copy)
    except Exception as e:
        raise ValueError(
            f"the model does not run on inputs of per-sample shape {tuple(x.shape[1:])} "
            f"({x.dtype}): its forward raised {type(e).__name__}: {first_line(e)}. If the input "
            f"is at fault, pass inputs the model accepts (shape, dtype); x's first dimension is "
            f"the batch (x of shape {tuple(x.shape)} is {len(x)} inputs "
            f"of shape {tuple(x.shape[1:])}: one input is x.unsqueeze(0))"
        ) from e
    if not torch.equal(copy, x):
        raise changes_input(model)
    return out


def changes_input(model: nn.Module) -> UnsupportedOperationError:
    """The refusal of a forward that changes its input in place."""
    return UnsupportedOperationError(
        "an in-place change of the input",
        type(model).__name__,
        "changes its input x in place (x.sub_(...), an in-place activation on x), which "
        "splinelens would have to repeat on your tensors",
        "make forward leave x as it is (x = x - ..., or x = x.clone() first)",
    )


def check_not_cached() -> None:
    """Refuse to capture inside ``parametrize.cached()``: the export would read the cached
    weights as constants, which later changes of the parametrized originals never reach."""
    if getattr(torch.nn.utils.parametrize, "_cache_enabled", 0):
        raise UnsupportedOperationError(
            "torch.nn.utils.parametrize.cached()",
            "the capture",
            "runs inside parametrize.cached(), whose cached weights the capture would keep as "
            "constants, stale after the next change of the parametrized parameters",
            "capture outside the cached() block (a capture made there may be used inside it)",
        )


def check_same(model: nn.Module, prog: Program, x: torch.Tensor, returned: Any) -> None:
    """Refuse a program whose output on x is not what the model ``returned`` (one tensor, or
    one inside a tuple, list or dict): another shape, NaN or inf elsewhere, or values further
    apart than ``verify``'s tolerance (``_rounding``)."""
    out = leaves(returned, torch.Tensor)  # (one tensor, maybe in a tuple, list or dict)
    if len(out) != 1 or not out[0].is_floating_point():
        return  # (the compiler refuses other outputs)
    got = program_output(prog, x)
    want = out[0].movedim(prog.bdims[prog.output_name], 0)
    if got.shape != want.shape:
        raise _differs(model, f"of shape {tuple(got.shape)} instead of {tuple(want.shape)}")
    err, scale = _gap(got, want)
    if math.isnan(err):
        raise _differs(model, "with NaN or inf where the model has none, or the reverse")
    if not _rounding(prog, x, err, scale, want.dtype):
        raise _differs(model, f"(max difference {err:.3g} for outputs up to {scale:.3g})")


def check_per_sample(model: nn.Module, prog: Program, x: torch.Tensor, returned: Any) -> None:
    """Refuse a model whose output for an input depends on the rest of its batch (arithmetic
    with the batch size, positions sliced to it: ``relu(h * x.shape[0])``, ``pe[:x.shape[0]]``):
    two inputs in the other order, and with a third after them, must give the same rows as
    ``returned`` (the model's output on x, two inputs), to ``verify``'s tolerance. Batch sizes
    the capture does not hold for (a forward that branches on N) are not compared."""
    out = leaves(returned, torch.Tensor)
    if len(out) != 1 or not out[0].is_floating_point() or len(x) != 2:
        return
    if not prog.batch.accepts(2):  # (the capture holds for other sizes)
        return
    bdim = prog.bdims[prog.output_name]
    want = out[0].movedim(bdim, 0)  # (2, *out)
    pair = x if not torch.equal(x[0], x[1]) else torch.cat([x[:1], x[:1] * 0.5])
    if pair is not x:  # (two equal inputs cannot be told apart when reversed)
        try:
            want = leaves(check_runs(model, pair), torch.Tensor)[0].movedim(bdim, 0)
        except ValueError:
            return
    cases = [(pair.flip(0), [1, 0])]
    if prog.batch.accepts(3):
        cases.append((torch.cat([pair, pair[:1]]), [0, 1]))
    for inputs, rows in cases:
        try:
            got = leaves(check_runs(model, inputs), torch.Tensor)[0].movedim(bdim, 0)[rows]
        except ValueError:  # (the model does not take these inputs: nothing to compare)
            continue
        err, scale = _gap(got, want) if got.shape == want.shape else (math.inf, 0.0)
        if not _rounding(prog, pair, err, scale, want.dtype):  # (NaN: refused too)
            raise UnsupportedOperationError(
                "the batch size",
                type(model).__name__,
                f"gives an input another output in another batch (the same inputs in another "
                f"order, or with one more: max difference {err:.3g} for outputs up to "
                f"{scale:.3g}): forward computes with the batch size or with positions in the "
                f"batch (x.shape[0], a slice or arange to it)",
                "make each input's output depend on that input alone",
            )


def _rounding(prog: Program, x: torch.Tensor, err: float, scale: float, out: torch.dtype) -> bool:
    """Whether outputs up to ``scale`` that differ by ``err`` agree to ``verify``'s tolerance:
    1e4 machine epsilons (at most 1e-2) of the size of the terms rounded, max |f(x)| and
    max |A| |x| + |B| (``_terms``: the program's A at x). Where A is not formed (too large, or
    an output nonlinearity g), outputs are held to a size of at least 1. The epsilons are those
    of x's dtype, or of the output's (``out``) where the model returns less precision."""
    rtol = map_rtol(x.dtype, out)
    if err <= rtol * scale:
        return True
    if not err <= rtol * max(scale, 1.0):  # (NaN: False)
        return False
    terms = _terms(prog, x)  # (only outputs below 1 that differ by more than rounding get here)
    return terms is None or err <= rtol * max(scale, terms)


_TERMS = 1 << 22  # the most entries of A (inputs x outputs x input entries) _terms forms
_ROWS = 256  # the most output entries (one backward pass each) _terms differentiates


def _terms(prog: Program, x: torch.Tensor) -> float | None:
    """max |A| |x| + |B| of the program at x, in float64: the size of the terms whose rounding
    the outputs differ by (A by one backward pass per output entry). None with an output
    nonlinearity g, past ``_ROWS`` output entries or past ``_TERMS`` entries of A."""
    out, n = prog.output_name, len(x)
    rows = math.prod(prog.shapes[out])
    if prog.output_g is not None or rows > _ROWS or n * rows * x[0].numel() > _TERMS:
        return None
    with torch.inference_mode(False), torch.enable_grad(), exact_matmul():  # (also inside them)
        leaf = x.detach().clone().requires_grad_(True)
        y = prog.per_sample(out, prog.record(leaf)[0][out]).reshape(n, -1)  # (N, R)
        grads = [
            torch.autograd.grad(y[:, r].sum(), leaf, retain_graph=True, allow_unused=True)[0]
            if y.requires_grad
            else None
            for r in range(rows)
        ]
    flat = x.detach().reshape(n, -1).double()  # (N, D)
    a = torch.stack(
        [flat.new_zeros(flat.shape) if g is None else g.reshape(n, -1).double() for g in grads], 1
    )  # (N, R, D)
    b = y.detach().double() - torch.einsum("nrd,nd->nr", a, flat)
    terms = term_sizes(a, flat, b)
    return float(terms.max()) if terms.numel() else 0.0


def _gap(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max |got - want| over the finite entries of want, max |want| there); the gap is NaN
    where NaN or inf stand in other places in got than in want."""
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)):
        return math.nan, 0.0
    if not bool(finite.any()):
        return 0.0, 0.0
    return float((got - want)[finite].abs().max()), float(want[finite].abs().max())


def _differs(model: nn.Module, how: str) -> UnsupportedOperationError:
    return UnsupportedOperationError(
        "torch.export",
        type(model).__name__,
        f"computes another function when exported than when run, {how}: its forward branches "
        f"on torch.compiler.is_exporting() / is_compiling(), or reads state that the export "
        f"sees otherwise",
        "make forward compute the same whether it is exported or not",
    )


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
