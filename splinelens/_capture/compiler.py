"""Graph capture: export a model with torch.export and compile it into a checked ``Program``.

Every operation that touches the activations is classified (``_ops``); anything that is not an
affine operation or a MASO nonlinearity raises ``UnsupportedOperationError`` naming the operation,
the module path and the source line. Parameters are read from the live model at every run, so a
capture stays valid while the model trains.

>>> import torch.nn as nn
>>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()  # (held: read live)
>>> prog = capture(net, torch.randn(2, 4))
>>> [layer.name for layer in prog.layers]
['1']
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import io
import logging
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from splinelens._capture.agreement import (
    changes_input,
    check_not_cached,
    check_per_sample,
    check_runs,
    check_same,
    first_line,
    program_output,
)
from splinelens._capture.batch import BatchSizes
from splinelens._capture.batch_axis import BatchAxes, is_tensor
from splinelens._capture.layers import make_maso, maso_layer, unique_names
from splinelens._capture.mode import check_eval_mode
from splinelens._capture.nodes import bound_args, op_name, overload, pinned_kwargs
from splinelens._capture.output import split_output
from splinelens._capture.pieces import MasoOp
from splinelens._capture.program import Layer, Program, Ref, Step
from splinelens._capture.refusals import check_batch_kept, check_op, error
from splinelens._capture.registry import decompositions, info
from splinelens._capture.spline_op import splines_as_ops
from splinelens._capture.unmerge import batch_first, merged_input, restore
from splinelens._lock import held
from splinelens.errors import UnsupportedOperationError


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused for the block, and enabled again after if it was.

    A process's first torch.export imports sympy and torch._dynamo: the 10^5 objects they make
    set off full collections, which took 0.7 s of a 3.3 s first capture (bench_cold.py). The
    cycles the block leaves are collected by the next collection after it.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# Overloads that ``ExportedProgram.run_decompositions`` leaves as they are (no training-IR form,
# no in-place variant, no decomposition in the table splinelens passes): a graph made of these
# only is final as exported, and its decomposition pass (about 0.6 s on first use) is skipped.
_FINAL_IR_NAMES = (
    "linear.default conv1d.default conv2d.default conv3d.default conv_transpose2d.input "
    "relu.default leaky_relu.default hardtanh.default relu6.default clamp.default "
    "prelu.default abs.default add.Tensor sub.Tensor mul.Tensor div.Tensor neg.default "
    "max_pool1d.default max_pool2d.default max_pool3d.default avg_pool2d.default "
    "adaptive_avg_pool2d.default amax.default maximum.default minimum.default cat.default "
    "stack.default pad.default view.default permute.default transpose.int select.int "
    "slice.Tensor unsqueeze.default squeeze.dim sum.dim_IntList mean.dim matmul.default "
    "sym_size.int zeros.default ones.default detach.default softmax.int log_softmax.int"
)
_FINAL_IR = frozenset(f"aten.{name}" for name in _FINAL_IR_NAMES.split()) | {
    "splinelens.spline_activation.default"
}


def final_ir(ep: torch.export.ExportedProgram) -> bool:
    """Whether every op of an exported graph is in its final form (see ``_FINAL_IR``)."""
    return all(str(n.target) in _FINAL_IR for n in ep.graph.nodes if n.op == "call_function")


@_gc_paused()
def capture(
    model: nn.Module,
    example: torch.Tensor,
    within: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> Program:
    """Export ``model`` on ``example`` (batch first) and compile it into a checked Program.

    The program holds for the batch sizes that ``torch.export`` guarded (``BatchSizes``).
    Python's garbage collector is paused meanwhile (``_gc_paused``). ``within`` makes the
    context the model's forward runs in (for a float64 twin, see ``made_in_float64``); it must
    not hold the model.
    """
    with within():
        return _capture(model, example, within)


def _capture(
    model: nn.Module,
    example: torch.Tensor,
    within: Callable[[], contextlib.AbstractContextManager[Any]],
) -> Program:
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
    check_not_cached()
    reps = (2, *([1] * (example.dim() - 1)))
    ex = example.detach() if example.shape[0] >= 2 else example.detach().repeat(*reps)
    if ex.is_inference():  # (made under inference_mode: export saves tensors for backward)
        ex = ex.clone()
    out = check_runs(model, ex[:2])
    ep = _export(model, ex)
    if ep.graph_signature.user_inputs_to_mutate:  # (a change that left this x as it was)
        raise changes_input(model)
    prog = _Compiler(model, ep).compile()
    one = ex[:1].clone()  # (not a view of ex: the cached capture keeps this one input)
    batch = BatchSizes.of(
        ep,
        lambda m: _export(m, one, dynamic=False),
        model,
        ex,
        functools.partial(program_output, prog),
        within,
    )
    prog = dataclasses.replace(prog, batch=batch)
    check_per_sample(model, prog, ex[:2], out)
    if batch.accepts(2):  # (else the graph holds for other batch sizes: compare on ex itself)
        check_same(model, prog, ex[:2], out)
    else:
        check_same(model, prog, ex, check_runs(model, ex))
    return prog


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


def _open_ended(name: str, args: tuple) -> tuple:
    """A slice to the end as ``end=None`` (export writes 2^63 - 1, which functorch's batching
    of slice_scatter overflows: forward-mode derivatives of the frozen program use it)."""
    start = info(name).slice_start
    at = start + 1 if start is not None else len(args)
    if len(args) <= at or not isinstance(args[at], int) or args[at] < 2**62:
        return args
    return (*args[:at], None, *args[at + 1 :])


def _export(
    model: nn.Module, ex: torch.Tensor, dynamic: bool = True
) -> torch.export.ExportedProgram:
    dyn = ({0: torch.export.Dim.AUTO},) if dynamic else None
    try:
        with held(), warnings.catch_warnings(), _quiet_logs():
            warnings.simplefilter("ignore")
            with splines_as_ops():
                ep = torch.export.export(model, (ex,), dynamic_shapes=dyn, strict=False)
            return ep if final_ir(ep) else ep.run_decompositions(decompositions())
    except UnsupportedOperationError:
        raise
    except Exception as e:  # torch.export raises many types; keep its message
        first = first_line(e)
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
        self.model, self.ep = model, ep
        self.graph = ep.graph
        self.written: list[tuple[torch.fx.Node, list[torch.fx.Node]]] = []  # (``unmerge``)
        sig = ep.graph_signature
        if len(sig.user_inputs) != 1:
            raise ValueError(
                f"the model takes {len(sig.user_inputs)} inputs; splinelens "
                "needs a forward(x) of one tensor"
            )
        self.input_name = sig.user_inputs[0]
        node = next(n for n in self.graph.nodes if n.name == self.input_name)
        val = node.meta.get("val")  # x's dtype: casts to less precision than it are refused
        self.precision = val.dtype if isinstance(val, torch.Tensor) else None
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
        out, g, after = split_output(self.graph)
        try:
            for node in self.graph.nodes:  # (nodes written after this one are visited too)
                if node.op == "call_function" and node is not g and node not in after:
                    self._visit(node)
        finally:  # the exported graph as it was (the batch sizes compare it with another)
            for node, new in reversed(self.written):
                restore(self.graph, node, new)
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
            owners=self._owners(),
        )

    def _owners(self) -> tuple[weakref.ref, ...]:
        """Weak references to the modules that own the program's parameters and buffers."""
        sig = self.ep.graph_signature
        paths = {fqn.rpartition(".")[0] for fqn in [*sig.parameters, *sig.buffers]}
        return tuple(weakref.ref(self.model.get_submodule(p)) for p in sorted(paths))

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

    def _params(self) -> tuple[tuple[str, nn.Module, str], ...]:
        """(placeholder, owner module, attribute) of each parameter and buffer, each owner by a
        weak proxy: a program in a cache keyed weakly by its model must not keep that model
        alive (the root owns a parameter; a submodule's hook is a method of the root). Whoever
        runs a program holds its owners (``Program.hold``: a map, a user's view, a MASO), so a
        map made before a submodule was replaced answers for the model it was made for."""
        sig = self.ep.graph_signature
        out = []
        for ph, fqn in {**sig.inputs_to_parameters, **sig.inputs_to_buffers}.items():
            owner_path, _, attr = fqn.rpartition(".")
            out.append((ph, weakref.proxy(self.model.get_submodule(owner_path)), attr))
        for ph, cname in sig.inputs_to_lifted_tensor_constants.items():
            self.ep.constants.setdefault(ph, self.ep.constants[cname])
        return tuple(out)

    def _visit(self, node: torch.fx.Node) -> None:
        merged = merged_input(node, self.axes)
        if merged is not None:  # an elementwise MASO on a merged batch: written batch first
            self.written.append((node, batch_first(self.graph, node, *merged)))
            return
        name = op_name(node.target)
        entry = info(name)
        if entry.random:
            raise error(node, name, entry.why, entry.fix)
        deps = [a for a in node.all_input_nodes if a.name in self.act]
        maso = None
        if deps and is_tensor(node) and entry.kind != "shape":
            maso = self._activation(node, name, deps)
        tuple_out = maso is not None and isinstance(node.meta["val"], (tuple, list))
        args, kwargs = _refs(_open_ended(name, tuple(node.args))), _refs(pinned_kwargs(node))
        self.steps.append(Step(node.name, name, node.target, args, kwargs, maso, tuple_out))

    def _activation(
        self, node: torch.fx.Node, name: str, deps: list[torch.fx.Node]
    ) -> MasoOp | None:
        """Check an op on activations; its MASO (and layer) if it is a nonlinearity."""
        kind = check_op(node, name, self.act, self.precision)
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
        name = dict(info(name).renames).get(overload(node), name)
        maso = make_maso(name, node, tuple(node.args[0].meta["val"].shape))
        if maso.pieces < 2:  # a max over one entry (a 1-wide pool): the identity, no layer
            return None
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
