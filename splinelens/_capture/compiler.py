"""Graph capture: export a model with torch.export and compile it into a checked ``Program``.

Every operation that touches the activations is classified (``_ops``); anything that is not an
affine operation or a MASO nonlinearity raises ``UnsupportedOperationError`` naming the operation,
the module path and the source line. Parameters are read from the live model at every run, so a
capture stays valid while the model trains.

>>> import torch.nn as nn
>>> prog = capture(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval(),
...                torch.randn(2, 4))
>>> [layer.name for layer in prog.layers]
['1']
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import io
import logging
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
from torch._decomp import decomposition_table

from splinelens._capture.batch import BatchSizes
from splinelens._capture.batch_axis import BatchAxes, is_tensor
from splinelens._capture.layers import maso_layer, unique_names
from splinelens._capture.pieces import MasoOp
from splinelens._capture.program import Layer, Program, Ref, Step
from splinelens._capture.refusals import check_affine, check_batch_kept, check_kind, error
from splinelens._capture.registry import apply_g, bound_args, final_ir, info, make_maso, op_name
from splinelens._capture.spline_op import splines_as_ops
from splinelens._precision import exact_matmul
from splinelens.errors import UnsupportedOperationError

_RNN_DECOMPS = {
    op: decomposition_table[op]
    for op in (torch.ops.aten.rnn_relu.input, torch.ops.aten.rnn_relu.data)
}
_MODE_DEPENDENT = (
    nn.modules.batchnorm._NormBase,  # batchnorm and instance norm
    nn.modules.dropout._DropoutNd,
    nn.RNNBase,
    nn.RReLU,
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


def check_eval_mode(model: nn.Module) -> None:
    """Refuse a model in training mode: its batchnorm / dropout would not be affine per input.

    Only modules whose forward depends on the mode count (batchnorm, dropout, RNNs, ..., and
    modules of your own that read ``self.training``); a fresh ``nn.Linear`` left in training
    mode computes the same either way.
    """
    names = [n or type(model).__name__ for n, m in mode_modules(model) if m.training]
    if names:
        raise UnsupportedOperationError(
            "training mode",
            ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""),
            "is in training mode (batchnorm would use batch statistics, dropout would be "
            "random), so the network is not a fixed spline of its input",
            "Call model.eval() first; splinelens never switches modes for you",
        )


def mode_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of ``model`` whose forward depends on the training mode: while
    the model's structure holds, ``check_eval_mode`` need only look at these.

    >>> [n for n, _ in mode_modules(nn.Sequential(nn.Linear(2, 2), nn.Dropout()))]
    ['1']
    """
    return [
        (n, m)
        for n, m in model.named_modules()
        if _mode_dependent(type(m)) or isinstance(m, torch.jit.ScriptModule)
    ]


@functools.cache
def _mode_dependent(cls: type) -> bool:
    """Whether a module class behaves differently in training mode: batchnorm, dropout and the
    like, and any class whose code (any method, its bases' too) reads a ``.training``, as
    spectral norm's parametrization does, or a helper method of yours. Own classes whose source
    cannot be read count as dependent; a function outside the class that reads a module's mode
    is not seen."""
    if issubclass(cls, _MODE_DEPENDENT):
        return True
    own = not cls.__module__.startswith("torch.")
    for base in cls.__mro__:
        if base in (nn.Module, object):
            continue
        try:
            source = inspect.getsource(base)
        except (OSError, TypeError):
            if own and not base.__module__.startswith("torch."):
                return True
            continue
        if _READS_MODE.search(source):
            return True
    return False


_READS_MODE = re.compile(r"\.training\b|[\"']training[\"']")


def capture(model: nn.Module, example: torch.Tensor) -> Program:
    """Export ``model`` on ``example`` (batch first) and compile it into a checked Program.

    The program holds for the batch sizes that ``torch.export`` guarded (``BatchSizes``).
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedOperationError(
            "torch.jit.script",
            type(model).__name__,
            "is a TorchScript module, which torch.export cannot capture",
            "Pass the nn.Module you scripted (splinelens captures eager modules)",
        )
    check_eval_mode(model)
    if example.dim() == 0:
        raise ValueError("example_input must have a batch dimension first, e.g. shape (N, ...)")
    if example.shape[0] == 0:
        raise ValueError("x holds no inputs (batch size 0)")
    _check_not_cached()
    reps = (2, *([1] * (example.dim() - 1)))
    ex = example.detach() if example.shape[0] >= 2 else example.detach().repeat(*reps)
    out = _check_runs(model, ex[:2])
    ep = _export(model, ex)
    if ep.graph_signature.user_inputs_to_mutate:  # (a change that left this x as it was)
        raise _changes_input(model)
    prog = _Compiler(model, ep).compile()
    batch = BatchSizes.of(
        ep,
        lambda m: _export(m, ex[:1], dynamic=False),
        model,
        ex,
        functools.partial(_output, prog),
    )
    prog = dataclasses.replace(prog, batch=batch)
    if batch.accepts(2):  # (else the graph holds for other batch sizes: compare on ex itself)
        _check_same(model, prog, ex[:2], out)
    else:
        _check_same(model, prog, ex, _check_runs(model, ex))
    return prog


def _output(prog: Program, x: torch.Tensor) -> torch.Tensor:
    """The program's output for x, after the output nonlinearity g (as the model returns it)."""
    with torch.no_grad(), exact_matmul():
        out = prog.per_sample(prog.output_name, prog.record(x)[0][prog.output_name])
    return apply_g(prog.output_g, out)


def _check_runs(model: nn.Module, x: torch.Tensor) -> Any:
    """Run the model once on a copy of x and return its output: a clear error when the input
    does not fit it (wrong shape), or when forward changes its input in place (x stays as it
    is: the copy is changed)."""
    copy = x.clone()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model(copy)
    except Exception as e:
        raise ValueError(
            f"the model does not run on inputs of per-sample shape {tuple(x.shape[1:])}: "
            f"{type(e).__name__}: {_first_line(e)}. Pass inputs the model accepts (shape, dtype)"
        ) from e
    if not torch.equal(copy, x):
        raise _changes_input(model)
    return out


def _changes_input(model: nn.Module) -> UnsupportedOperationError:
    return UnsupportedOperationError(
        "an in-place change of the input",
        type(model).__name__,
        "changes its input x in place (x.sub_(...), an in-place activation on x), which "
        "splinelens would have to repeat on your tensors",
        "make forward leave x as it is (x = x - ..., or x = x.clone() first)",
    )


def _check_not_cached() -> None:
    """Refuse to capture inside ``torch.nn.utils.parametrize.cached()``: the export would read the
    cached weights as constants, which later changes of the parametrized originals never reach."""
    if getattr(torch.nn.utils.parametrize, "_cache_enabled", 0):
        raise UnsupportedOperationError(
            "torch.nn.utils.parametrize.cached()",
            "the capture",
            "runs inside parametrize.cached(), whose cached weights the capture would keep as "
            "constants, stale after the next change of the parametrized parameters",
            "capture outside the cached() block (a capture made there may be used inside it)",
        )


def _check_same(model: nn.Module, prog: Program, x: torch.Tensor, expected: Any) -> None:
    """Refuse a program whose output on x is not the model's (``expected``, as it returned it):
    a forward that branches on ``torch.compiler.is_exporting()`` or reads state that export
    sees otherwise. Tolerance: as ``verify``'s, 1e4 machine epsilons of max |f(x)|, <= 1e-2."""
    if not isinstance(expected, torch.Tensor) or not expected.is_floating_point():
        return  # (the compiler refuses other outputs)
    got = _output(prog, x)
    want = expected.movedim(prog.bdims[prog.output_name], 0)
    if got.shape != want.shape or not bool(torch.isfinite(want).all()):
        return  # (a non-finite output is refused where it is used)
    err = float((got - want).abs().max()) if got.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    if err > min(1e4 * torch.finfo(want.dtype).eps, 1e-2) * max(scale, 1.0):
        raise UnsupportedOperationError(
            "torch.export",
            type(model).__name__,
            f"computes another function when exported than when run (max difference {err:.3g} "
            f"for outputs up to {scale:.3g}): its forward branches on "
            f"torch.compiler.is_exporting() / is_compiling(), or reads state that the export "
            f"sees otherwise",
            "make forward compute the same whether it is exported or not",
        )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """Silence torch's log records and printed graph dumps (a failed export prints pages) for
    the block; the error splinelens raises says what went wrong."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def _export(
    model: nn.Module, ex: torch.Tensor, dynamic: bool = True
) -> torch.export.ExportedProgram:
    dyn = ({0: torch.export.Dim.AUTO},) if dynamic else None
    try:
        with warnings.catch_warnings(), _quiet_logs():
            warnings.simplefilter("ignore")
            with splines_as_ops():
                ep = torch.export.export(model, (ex,), dynamic_shapes=dyn, strict=False)
            return ep if final_ir(ep) else ep.run_decompositions(_RNN_DECOMPS)
    except UnsupportedOperationError:
        raise
    except Exception as e:  # torch.export raises many types; keep its message
        first = _first_line(e)
        raise UnsupportedOperationError(
            "torch.export",
            type(model).__name__,
            f"could not capture the model's graph ({type(e).__name__}: {first})",
            "splinelens needs a model whose forward takes one batched tensor and has no "
            "data-dependent Python control flow",
        ) from e


class _Compiler:
    """Walks the exported graph once: classifies and checks each op, builds steps and layers."""

    def __init__(self, model: nn.Module, ep: torch.export.ExportedProgram) -> None:
        self.model, self.ep, self.gm = model, ep, ep.graph_module
        sig = ep.graph_signature
        if len(sig.user_inputs) != 1:
            raise ValueError(
                f"the model takes {len(sig.user_inputs)} inputs; splinelens "
                "needs a forward(x) of one tensor"
            )
        self.input_name = sig.user_inputs[0]
        node = next(n for n in self.gm.graph.nodes if n.name == self.input_name)
        self.axes = BatchAxes(node)
        self.act: set[str] = {self.input_name}
        self.steps: list[Step] = []
        self.layers: list[Layer] = []
        if not self.axes.dynamic:
            shape = tuple(node.meta["val"].shape)
            hint = (
                f"; x has shape {shape}: if that is one input, pass x[None]"
                if len(shape) == 1
                else ""
            )
            raise UnsupportedOperationError(
                "torch.export",
                type(model).__name__,
                "specialises on the batch size, so its graph cannot be reused across batches",
                "Avoid code that depends on x.shape[0] being a particular number" + hint,
            )
        mutated = list(sig.buffers_to_mutate.values())
        if mutated:
            raise UnsupportedOperationError(
                "in-place buffer update",
                ", ".join(mutated),
                "is changed by forward itself (a counter, running statistics, a cache), so the "
                "network is not a fixed function of x",
                "keep forward free of state updates (batchnorm: call model.eval())",
            )

    def compile(self) -> Program:
        out, g = self._output(next(n for n in self.gm.graph.nodes if n.op == "output"))
        for node in self.gm.graph.nodes:
            if node.op == "call_function" and (g is None or node is not g):
                self._visit(node)
        if out.name not in self.axes.bdims:
            raise ValueError(
                "the model's output does not depend on its input, or has no single batch dimension"
            )
        sig = self.ep.graph_signature
        return Program(
            canonicalise(tuple(self.steps)),
            self.input_name,
            out.name,
            self._params(),
            dict(self.ep.constants),
            unique_names(self.layers),
            self.axes.bdims,
            self.axes.shapes,
            None if g is None else self._g(g, out),
            {**sig.inputs_to_parameters, **sig.inputs_to_buffers},
        )

    def _g(self, g: torch.fx.Node, out: torch.fx.Node) -> tuple[str, int]:
        """The output nonlinearity as (name, its dim in the per-sample layout (N, *shape)); over
        the batch dimension it mixes the samples and is refused."""
        ndim, b = out.meta["val"].dim(), self.axes.bdims[out.name]
        d = bound_args(g)["dim"] % ndim
        if d == b:
            raise error(
                g,
                op_name(g.target),
                "works along the batch dimension, so samples are mixed",
                "apply it over the class dimension (or return the logits)",
            )
        return op_name(g.target), d + 1 if d < b else d

    def _output(self, node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node | None]:
        """The output node, and the output nonlinearity g's node if the model ends with one."""
        outs = node.args[0]
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        if len(outs) != 1 or not isinstance(outs[0], torch.fx.Node):
            raise ValueError(
                f"the model returns {len(outs)} values; splinelens needs forward(x) "
                "to return one tensor (e.g. the logits)"
            )
        out = outs[0]
        if out.op == "call_function" and info(op_name(out.target)).kind == "g":
            return out.args[0], out
        return out, None

    def _params(self) -> tuple[tuple[str, nn.Module, str], ...]:
        sig = self.ep.graph_signature
        out = []
        for ph, fqn in {**sig.inputs_to_parameters, **sig.inputs_to_buffers}.items():
            owner_path, _, attr = fqn.rpartition(".")
            out.append((ph, self.model.get_submodule(owner_path), attr))
        for ph, cname in sig.inputs_to_lifted_tensor_constants.items():
            self.ep.constants.setdefault(ph, self.ep.constants[cname])
        return tuple(out)

    def _visit(self, node: torch.fx.Node) -> None:
        name = op_name(node.target)
        deps = [a for a in node.all_input_nodes if a.name in self.act]
        maso = None
        if deps and is_tensor(node) and info(name).kind != "shape":
            maso = self._activation(node, name, deps)
        tuple_out = maso is not None and isinstance(node.meta["val"], (tuple, list))
        args, kwargs = _refs(tuple(node.args)), _refs(dict(node.kwargs))
        self.steps.append(Step(node.name, name, node.target, args, kwargs, maso, tuple_out))

    def _activation(
        self, node: torch.fx.Node, name: str, deps: list[torch.fx.Node]
    ) -> MasoOp | None:
        """Check an op on activations; its MASO (and layer) if it is a nonlinearity."""
        kind = check_kind(node, name)
        if kind == "affine":
            check_affine(node, name, self.act)
        if not self.axes.has_batch(node):
            raise error(
                node,
                name,
                "mixes the samples of the batch (its output has no batch dimension)",
                "each input must pass through the network on its own",
            )
        check_batch_kept(node, name, self.act, self.axes.symbol)
        if info(name).regroups and not self.axes.regroup(node, deps[0]):
            raise error(
                node,
                name,
                "reshapes the batch dimension into another one, so samples are mixed",
                "keep the batch dimension whole (reshape the other dimensions)",
            )
        self.act.add(node.name)
        self.axes.record(node, deps)
        if kind != "maso":
            return None
        if name in ("max", "min") and node.target._overloadname == "other":
            name = "maximum" if name == "max" else "minimum"
        maso = make_maso(name, node, tuple(node.args[0].meta["val"].shape))
        self.layers.append(maso_layer(node, name, maso, self.axes, len(self.layers)))
        return maso


def canonicalise(steps: tuple[Step, ...]) -> tuple[Step, ...]:
    """Replace ops by their canonical form (registry ``rewrite``): detach by alias (it would hide
    paths from autograd), eval batchnorm by one with a one-multiply backward."""
    return tuple(
        dataclasses.replace(s, fn=info(s.op).rewrite) if info(s.op).rewrite else s for s in steps
    )


def _refs(a: Any) -> Any:
    """Graph nodes inside arguments as ``Ref``s (the program's references to other values)."""
    if isinstance(a, torch.fx.Node):
        return Ref(a.name)
    if isinstance(a, (tuple, list)):
        return type(a)(_refs(v) for v in a)
    if isinstance(a, dict):
        return {k: _refs(v) for k, v in a.items()}
    return a
