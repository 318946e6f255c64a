"""Which batch sizes a capture holds for: a forward that branches on x.shape[0] never runs the
wrong graph.

``torch.export`` traces the batch dimension symbolically and records every guard the forward
put on it: a range (``if x.shape[0] > 5`` gives [6, inf)) and other conditions
(``x.shape[0] % 2 == 0``). A batch outside them is refused (``BatchSizeError``); the plain
functions then capture again for it. Export assumes N >= 2 and never traces a batch of 1 (sizes
0 and 1 are specialised), so N = 1 is admitted only when a second, static export at N = 1 builds
the same graph (same ops, parameters and constants; sizes aside) and the model's own output on
one input matches the captured program's; otherwise a batch of 1 is refused. That check runs
once, on the first batch of 1.

>>> import torch, torch.nn as nn, splinelens as sl
>>> class Odd(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.fc = nn.Linear(3, 2)
...     def forward(self, x):
...         return self.fc(x) if x.shape[0] % 2 == 0 else -self.fc(x)
>>> view = sl.SplineView(Odd().eval(), torch.randn(4, 3))
>>> view.program.batch.accepts(6), view.program.batch.accepts(3)
(True, False)
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from splinelens._capture.nodes import op_name
from splinelens._capture.registry import info
from splinelens._lock import held
from splinelens._precision import exact_matmul
from splinelens.errors import BatchSizeError

_BIG = 2**62  # an "until the end" slice bound


class BatchSizes:
    """The batch sizes a captured program holds for, and the refusal for the others."""

    def __init__(self, lo: int, hi: int | None, guards: tuple[_Guard, ...] = ()) -> None:
        self.lo, self.hi, self.guards = lo, hi, guards
        self.note = ""  # why a batch of 1 is refused, once checked
        self._single: Callable[[], str] | None = None  # the check of N = 1, run on first use
        self._accepted: dict[int, bool] = {}

    @staticmethod
    def of(
        ep: torch.export.ExportedProgram,
        static_export: Callable[[nn.Module], torch.export.ExportedProgram],
        model: nn.Module,
        ex: torch.Tensor,
        run: Callable[[torch.Tensor], torch.Tensor],
        within: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> BatchSizes:
        """From a dynamic export: its range and guards; N = 1 checked lazily (see module doc).

        ``run`` is the captured program's output (after g) on a batch of inputs; ``within``
        makes the context the model's forward was captured in."""
        size = _batch_size(ep)
        if not isinstance(size, torch.SymInt):
            return BatchSizes(int(size), int(size))
        sym, env = size.node.expr, size.node.shape_env
        exprs = [g.expr for g in env.guards]
        exprs += [ra.expr for ras in env.deferred_runtime_asserts.values() for ra in ras]
        lo, hi = _range(ep, str(sym))
        # guards without N are on sizes from constants (``repeat_interleave`` by a tensor)
        guards = tuple(_Guard(e, sym) for e in exprs if sym in e.free_symbols)
        sizes = BatchSizes(lo, hi, guards)
        if lo == 2:
            ref = weakref.ref(model)  # the cache must not keep the model alive
            ex1 = ex[:2].detach().clone()
            ops = _ops_of(ep)  # (not ep: it holds the model's tensors, and a hook the model)

            def single() -> str:
                with within():
                    return _single_input_problem(ops, static_export, ref(), ex1, run)

            sizes._single = single
        return sizes

    def accepts(self, n: int) -> bool:
        """Whether the captured graph is the model's graph for a batch of n inputs (a batch of
        1 waits for a check of it that another thread runs)."""
        if n != 1:
            return self._accepts(n)
        with held():
            return self._accepts(n)

    def _accepts(self, n: int) -> bool:
        if n == 1 and self._single is not None:
            check, self._single, lo = self._single, None, self.lo
            self.lo = 1  # the check runs the program on single inputs
            try:
                self.note = check()
            finally:
                self.lo = lo if self.note else 1
                self._accepted.clear()
        known = self._accepted.get(n)
        if known is None:
            if len(self._accepted) >= 1024:  # (batch sizes seen: a bounded memo)
                self._accepted.clear()
            ok = self.lo <= n and (self.hi is None or n <= self.hi)
            known = self._accepted[n] = ok and all(guard(n) for guard in self.guards)
        return known

    def check(self, n: int) -> None:
        """Refuse a batch size outside the range the capture holds for."""
        if self.accepts(n):
            return
        if n == 1 and self.lo == 2:
            raise BatchSizeError(
                f"a batch of 1 is refused for this model: {self.note}. torch.export cannot "
                f"capture a batch of 1 on its own: pass 2 or more inputs (splinelens also "
                f"splits some work into single inputs: region_polytope, layer_maso, ...)"
            )
        raise BatchSizeError(
            f"the model's forward depends on the batch size N: this capture holds for {self}, "
            f"not for a batch of {n} (a batch of yours, or one splinelens made: chunks, single "
            f"inputs, directions). Use batch sizes in that range, or make forward independent "
            f"of x.shape[0]; sl.affine_map and the other plain functions capture again for "
            f"the batch they are given"
        )

    def __str__(self) -> str:
        span = f"N >= {self.lo}" if self.hi is None else f"{self.lo} <= N <= {self.hi}"
        return ", ".join([span, *(str(g) for g in self.guards if not g.is_bound)])


class _Guard:
    """One symbolic guard, evaluated at a concrete batch size (False when undecidable)."""

    def __init__(self, expr: Any, sym: Any) -> None:
        self.expr, self.sym = expr, sym

    def __call__(self, n: int) -> bool:
        value = self.expr.xreplace({self.sym: n})
        return bool(value) if value in (True, False) or value.is_Boolean else False

    @property
    def is_bound(self) -> bool:
        """A plain bound such as N <= 70000 (already in the range)."""
        e = self.expr
        sides = (getattr(e, "lhs", None), getattr(e, "rhs", None))
        return (
            bool(e.is_Relational)
            and self.sym in sides
            and any(getattr(v, "is_number", False) for v in sides)
        )

    def __str__(self) -> str:
        return str(self.expr).replace(str(self.sym), "N")


def _batch_size(ep: torch.export.ExportedProgram) -> Any:
    name = ep.graph_signature.user_inputs[0]
    node = next(n for n in ep.graph_module.graph.nodes if n.name == name)
    return node.meta["val"].shape[0]


def _range(ep: torch.export.ExportedProgram, sym: str) -> tuple[int, int | None]:
    """(lo, hi) of the batch size from export's range constraints (hi None: unbounded)."""
    for s, vr in ep.range_constraints.items():
        if str(s) == sym:
            hi = None if str(vr.upper) in ("int_oo", "oo") else int(vr.upper)
            return max(2, int(vr.lower)), hi
    return 2, None


def _single_input_problem(
    ops: list[tuple],
    static_export: Callable[[nn.Module], torch.export.ExportedProgram],
    model: nn.Module | None,
    ex: torch.Tensor,
    run: Callable[[torch.Tensor], torch.Tensor],
) -> str:
    """Why a batch of 1 is not the captured graph, whose ``_ops_of`` are ``ops`` ("" if it
    is)."""
    if model is None:
        return "the model no longer exists"
    try:
        static = static_export(model)
    except Exception as e:
        return f"torch.export fails on one input ({type(e).__name__})"
    single = _ops_of(static)
    if not _same_graph(ops, single):
        return (
            f"for one input the forward builds another graph ({_first_difference(ops, single)}): "
            f"it branches on the batch size, or PyTorch writes an op otherwise for one input"
        )
    return _outputs_differ(model, run, ex)


def _outputs_differ(
    model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], ex: torch.Tensor
) -> str:
    """The model's own output on single inputs against the captured program's ("" if equal)."""
    for i in range(len(ex)):
        xi = ex[i : i + 1]
        try:
            with torch.no_grad(), exact_matmul(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref, out = model(xi), run(xi)
        except Exception as e:
            return f"the model does not run on one input ({type(e).__name__})"
        if not isinstance(ref, torch.Tensor) or not isinstance(out, torch.Tensor):
            return "the model does not return one tensor for one input"
        if ref.shape != out.shape:
            return "for one input the forward computes something else (it branches on N)"
        finite = ref.isfinite()  # (an overflow, alike in both, is refused where it is used)
        scale = max(1.0, float(ref[finite].abs().max())) if bool(finite.any()) else 1.0
        tol = 1e3 * torch.finfo(ref.dtype).eps * scale
        same = ((ref - out).abs() <= tol) | (ref == out) | (ref.isnan() & out.isnan())
        if not bool(same.all()):
            return "for one input the forward computes something else (it branches on N)"
    return ""


def _ops_of(ep: torch.export.ExportedProgram) -> list[tuple]:
    """The graph's tensor operations in order, with arguments by role: parameters and buffers
    by name, earlier operations by position, sizes as a wildcard (they differ with N)."""
    sig = ep.graph_signature
    roles = {
        **{k: ("param", v) for k, v in sig.inputs_to_parameters.items()},
        **{k: ("buffer", v) for k, v in sig.inputs_to_buffers.items()},
        **{k: ("constant", v) for k, v in sig.inputs_to_lifted_tensor_constants.items()},
        **{k: ("input",) for k in sig.user_inputs},
    }
    out: list[tuple] = []
    index: dict[str, Any] = {}

    def norm(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return roles.get(a.name) or index.get(a.name, _SIZE)
        if isinstance(a, (list, tuple)):
            return tuple(norm(v) for v in a)
        if isinstance(a, dict):
            return tuple((k, norm(v)) for k, v in sorted(a.items()))
        return _SIZE if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)) else a

    for n in ep.graph.nodes:
        if n.op != "call_function" or not _is_tensor_op(n):
            continue
        args, entry = norm(n.args), info(op_name(n.target))
        kept = args[0] if entry.identity else _full_slice(entry.slice_start, args)
        if kept is not None:  # a no-op one export leaves out (or writes as alias): its value
            index[n.name] = kept
            continue
        index[n.name] = ("node", len(out))
        target = _SAME_OP.get(str(n.target), str(n.target))
        out.append((target, args, norm(n.kwargs), _ranks(n)))
    return out


_SIZE = ("size",)
# overloads export writes for one input where it writes another for more (``reshape`` of a
# non-contiguous tensor: a copy and an _unsafe_view, a plain view when N = 1 keeps it contiguous)
_SAME_OP = {"aten._unsafe_view.default": "aten.view.default"}


def _ranks(n: torch.fx.Node) -> tuple[int, ...]:
    """The number of dims of each tensor a node makes (``x.squeeze()`` drops the batch dim of
    one input: the same op, one dim fewer)."""
    val = n.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    return tuple(v.dim() for v in vals if isinstance(v, torch.Tensor))


def _is_tensor_op(n: torch.fx.Node) -> bool:
    val = n.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    return any(isinstance(v, torch.Tensor) for v in vals) and "_assert" not in str(n.target)


def _full_slice(at: int | None, args: tuple) -> Any:
    """For a slice of a whole dim (its start, end and step from ``at``), its input; for a write
    into such a slice (slice_scatter), the value written; else None."""
    if at is None or len(args) < at:
        return None
    start, end, step = [*args[at : at + 3], None, None, None][:3]
    full_end = end is None or end == _SIZE or (isinstance(end, int) and end >= _BIG)
    full = start in (0, None) and step in (1, None) and full_end
    return args[at - 2] if full else None


def _first_difference(a: list[tuple], b: list[tuple]) -> str:
    """Where two graphs' op lists (``_ops_of``) first differ, in words."""
    for i, (x, y) in enumerate(zip(a, b)):
        if not _same(x, y):
            return f"op {i}: {x[0]} for two or more inputs, {y[0]} for one"
    return f"{len(a)} ops for two or more inputs, {len(b)} for one"


def _same_graph(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _same(a: Any, b: Any) -> bool:
    if a == _SIZE or b == _SIZE:
        return True
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True  # (the same NaN constant in both graphs)
    return a == b and type(a) is type(b)
