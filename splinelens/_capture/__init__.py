"""Graph capture: a model exported once, checked op by op, compiled into a frozen ``Program``.

This package is the core's only door to ``torch.export``. Its interface (everything below) is
what the rest of splinelens may import; its modules are, in data-flow order:

* ``registry``: what every ATen operation is (affine, a MASO, the output nonlinearity, refused,
  and why), the single table that capture, convexity and refusals read; its entries are
  ``opinfo.OpInfo``s, and the refused ones are written in ``refused``;
* ``mixing``: the rules the registry gives ops, which dims of its operands an op reads together
  (the batch must not be one);
* ``arguments``: the checks the registry gives ops, arguments that make an op something else;
* ``rewrites``: the canonical forms and decompositions the registry gives ops;
* ``nodes``: a graph node's op name, overload and arguments by schema name;
* ``refusals``: the errors, located at the module and source line, of what the registry refuses;
* ``pieces``: the MASO nonlinearities, how each picks its affine piece and freezes it;
* ``spline_op``: the spline activation op that ``sl.splinify`` puts in place of smooth ones;
* ``mode``: which modules compute differently in training mode, and the refusal of a model in it;
* ``compiler``: export, canonicalisation, the walk that builds the program's steps and layers;
* ``batch_axis``: where the batch dim lies in every value, and the views that must keep it;
* ``unmerge``: an elementwise MASO on a batch merged with other dims, written batch first;
* ``layers``: each MASO step's piece (``make_maso``) and its Definition-1 layer;
* ``agreement``: the checks that the capture computes what the model computes;
* ``program``: the frozen program and its two generated executors, ``record`` and ``frozen``;
* ``batch``: the batch sizes a capture holds for.
"""

from splinelens._capture.compiler import capture, final_ir
from splinelens._capture.mode import check_eval_mode, mode_modules
from splinelens._capture.pieces import Clip, MasoOp, Pairwise, Pool, Reduce, Sign, Spline
from splinelens._capture.program import Layer, Program, Ref, Step, apply_g, refs_in
from splinelens._capture.registry import OpInfo, entries, info
from splinelens._capture.spline_op import (
    CellTables,
    as_op,
    cell_tables,
    evaluate,
    flat_tails,
    is_continuous,
    piece_index,
    spline_activation,
)

__all__ = [
    "CellTables",
    "Clip",
    "Layer",
    "MasoOp",
    "OpInfo",
    "Pairwise",
    "Pool",
    "Program",
    "Reduce",
    "Ref",
    "Sign",
    "Spline",
    "Step",
    "apply_g",
    "as_op",
    "capture",
    "cell_tables",
    "check_eval_mode",
    "entries",
    "evaluate",
    "final_ir",
    "flat_tails",
    "info",
    "is_continuous",
    "mode_modules",
    "piece_index",
    "refs_in",
    "spline_activation",
]
