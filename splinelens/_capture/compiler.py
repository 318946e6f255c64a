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
import functools
import inspect
import io
import logging
import operator
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
from torch._decomp import decomposition_table

from splinelens._capture import registry as _ops
from splinelens._capture.batch import BatchSizes
from splinelens._capture.pieces import eval_batch_norm
from splinelens._capture.program import Layer, Program, Ref, Step
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
_ACTIVATION_MODULES = {
    "ReLU",
    "LeakyReLU",
    "PReLU",
    "ReLU6",
    "Hardtanh",
    "MaxPool1d",
    "MaxPool2d",
    "MaxPool3d",
    "AdaptiveMaxPool1d",
    "AdaptiveMaxPool2d",
    "AdaptiveMaxPool3d",
}


def check_eval_mode(model: nn.Module) -> None:
    """Refuse a model in training mode: its batchnorm / dropout would not be affine per input.

    Only modules whose forward depends on the mode count (batchnorm, dropout, RNNs, ..., and
    modules of your own that read ``self.training``); a fresh ``nn.Linear`` left in training
    mode computes the same either way.
    """
    names = [
        n or type(model).__name__
        for n, m in model.named_modules()
        if m.training and (_mode_dependent(type(m)) or isinstance(m, torch.jit.ScriptModule))
    ]
    if names:
        raise UnsupportedOperationError(
            "training mode",
            ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""),
            "is in training mode (batchnorm would use batch statistics, dropout would be "
            "random), so the network is not a fixed spline of its input",
            "Call model.eval() first; splinelens never switches modes for you",
        )


@functools.cache
def _mode_dependent(cls: type) -> bool:
    """Whether a module class behaves differently in training mode (own classes: if their
    forward reads ``self.training``; unreadable source counts as dependent)."""
    if issubclass(cls, _MODE_DEPENDENT):
        return True
    if cls.__module__.startswith("torch."):
        return False
    try:
        return "training" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return True


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
    reps = (2, *([1] * (example.dim() - 1)))
    ex = example.detach() if example.shape[0] >= 2 else example.detach().repeat(*reps)
    _check_runs(model, ex[:2])
    ep = _export(model, ex)
    prog = _Compiler(model, ep).compile()
    prog.batch = BatchSizes.of(
        ep,
        lambda m: _export(m, ex[:1], dynamic=False),
        model,
        ex,
        functools.partial(_output, prog),
    )
    return prog


def _output(prog: Program, x: torch.Tensor) -> torch.Tensor:
    """The program's output for x, after the output nonlinearity g (as the model returns it)."""
    with torch.no_grad(), exact_matmul():
        out = prog.per_sample(prog.output_name, prog.run(x)[prog.output_name])
    return _ops.apply_g(prog.output_g, out)


def _check_runs(model: nn.Module, x: torch.Tensor) -> None:
    """Run the model once on x: a clear error when the input does not fit it (wrong shape)."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(x)
    except Exception as e:
        raise ValueError(
            f"the model does not run on inputs of per-sample shape {tuple(x.shape[1:])}: "
            f"{type(e).__name__}: {_first_line(e)}. Pass inputs the model accepts (shape, dtype)"
        ) from e


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
            ep = torch.export.export(model, (ex,), dynamic_shapes=dyn, strict=False)
            return ep.run_decompositions(_RNN_DECOMPS)
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
    """Walks the exported graph once: classifies, checks and builds the Program."""

    def __init__(self, model: nn.Module, ep: torch.export.ExportedProgram) -> None:
        self.model, self.ep, self.gm = model, ep, ep.graph_module
        sig = ep.graph_signature
        if len(sig.user_inputs) != 1:
            raise ValueError(
                f"the model takes {len(sig.user_inputs)} inputs; splinelens "
                "needs a forward(x) of one tensor"
            )
        self.input_name = sig.user_inputs[0]
        nodes = {n.name: n for n in self.gm.graph.nodes}
        self.batch = str(nodes[self.input_name].meta["val"].shape[0])
        self.act: set[str] = {self.input_name}
        self.steps: list[Step] = []
        self.layers: list[Layer] = []
        self.g_node = ""
        self.bdims: dict[str, int] = {self.input_name: 0}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._record_shape(nodes[self.input_name])
        if not self.batch.startswith("s"):
            shape = tuple(nodes[self.input_name].meta["val"].shape)
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
        mutated = list(ep.graph_signature.buffers_to_mutate.values())
        if mutated:
            raise UnsupportedOperationError(
                "in-place buffer update",
                ", ".join(mutated),
                "is changed by forward itself (a counter, running statistics, a cache), so the "
                "network is not a fixed function of x",
                "keep forward free of state updates (batchnorm: call model.eval())",
            )

    def compile(self) -> Program:
        out = self._output(next(n for n in self.gm.graph.nodes if n.op == "output"))
        g = None
        if out.op == "call_function" and _ops.op_name(out.target) in _ops.OUTPUT_G:
            g, self.g_node, out = _ops.op_name(out.target), out.name, out.args[0]
        for node in self.gm.graph.nodes:
            if node.op == "call_function" and node.name != self.g_node:
                self._visit(node)
        if out.name not in self.bdims:
            raise ValueError(
                "the model's output does not depend on its input, or has no single batch dimension"
            )
        return Program(
            self.steps,
            self.input_name,
            out.name,
            self._params(),
            dict(self.ep.constants),
            _unique_names(self.layers),
            self.bdims,
            self.shapes,
            g,
            {
                **self.ep.graph_signature.inputs_to_parameters,
                **self.ep.graph_signature.inputs_to_buffers,
            },
        )

    def _output(self, node: torch.fx.Node) -> torch.fx.Node:
        outs = node.args[0]
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        if len(outs) != 1 or not isinstance(outs[0], torch.fx.Node):
            raise ValueError(
                f"the model returns {len(outs)} values; splinelens needs forward(x) "
                "to return one tensor (e.g. the logits)"
            )
        return outs[0]

    def _params(self) -> list[tuple[str, nn.Module, str]]:
        sig = self.ep.graph_signature
        out = []
        for ph, fqn in {**sig.inputs_to_parameters, **sig.inputs_to_buffers}.items():
            owner_path, _, attr = fqn.rpartition(".")
            out.append((ph, self.model.get_submodule(owner_path), attr))
        for ph, cname in sig.inputs_to_lifted_tensor_constants.items():
            self.ep.constants.setdefault(ph, self.ep.constants[cname])
        return out

    def _visit(self, node: torch.fx.Node) -> None:
        deps = [a for a in node.all_input_nodes if a.name in self.act]
        step = Step(node.name, node.target, _refs(node.args), _refs(node.kwargs))
        name = _ops.op_name(node.target)
        if not deps or not _is_tensor(node) or _ops.classify_name(name) == "shape":
            self.steps.append(step)
            return
        kind = self._classify(node, name, deps)
        self.act.add(node.name)
        self._record_shape(node)
        if kind == "maso":
            self._add_maso(node, name, step)
        elif name == "detach":  # detach would hide paths from autograd; it is the identity
            step.fn = torch.ops.aten.alias.default
        elif name == "_native_batch_norm_legit_no_training":
            step.fn = eval_batch_norm
        self.steps.append(step)

    def _classify(self, node: torch.fx.Node, name: str, deps: list[torch.fx.Node]) -> str:
        kind = _ops.classify_name(name)
        if name == "max" or name == "min":
            kind = self._max_overload(node)
        if kind == "g":
            raise self._error(
                node,
                name,
                "is excluded only as the model's final output "
                "nonlinearity g (Sec. 2); here it is used inside the network",
            )
        if kind == "other":
            raise self._refusal(node, name)
        if not _floating(node):
            raise self._error(
                node,
                name,
                "turns activations into integers or booleans (a step "
                "function), which is not piecewise affine",
            )
        if kind == "affine":
            self._check_affine(node, name, deps)
            self._check_batch_axis(node, name, deps)
        if not self._has_batch(node):
            raise self._error(
                node,
                name,
                "mixes the samples of the batch (its output has no batch dimension)",
                "each input must pass through the network on its own",
            )
        return kind

    def _max_overload(self, node: torch.fx.Node) -> str:
        overload = node.target._overloadname
        if overload == "other":
            return "maso"
        if overload == "dim":
            return "maso"
        raise self._error(
            node,
            _ops.op_name(node.target),
            "reduces over every dimension, the batch included",
            "reduce over the feature dimensions only",
        )

    def _check_affine(self, node: torch.fx.Node, name: str, deps: list[torch.fx.Node]) -> None:
        a = _ops.bound_args(node)
        if name in _ops.PRODUCT_ARGS:
            vals = list(a.values())
            flat = [v for i in _ops.PRODUCT_ARGS[name] if i < len(vals) for v in _flat(vals[i])]
            if sum(isinstance(v, torch.fx.Node) and v.name in self.act for v in flat) > 1:
                raise self._error(
                    node,
                    name,
                    "multiplies two activation-dependent tensors, which is not piecewise affine",
                )
            if name == "div" and _is_act(vals[1], self.act):
                raise self._error(node, name, "divides by an activation, which is not affine")
            if name == "div" and a.get("rounding_mode") is not None:
                raise self._error(node, name, "rounds the quotient (a step function)")
        elif name in ("where", "masked_fill"):
            cond = a.get("condition", a.get("mask"))
            if _is_act(cond, self.act):
                raise self._error(
                    node,
                    name,
                    "selects with a condition computed from the "
                    "activations (a step function), which splinelens cannot split "
                    "into MASO pieces",
                    "use relu / max / clamp instead",
                )
        elif name in ("batch_norm", "dropout", "native_dropout") and a.get(
            "train", a.get("training")
        ):
            raise self._error(node, name, "runs in training mode", "call model.eval()")

    def _check_batch_axis(self, node: torch.fx.Node, name: str, deps: list[torch.fx.Node]) -> None:
        """Refuse ops that move data along the batch axis (flip, roll, gather, partial slices)."""
        a = _ops.bound_args(node)
        src = deps[0]
        b, val = self.bdims.get(src.name), src.meta.get("val")
        if b is None or not isinstance(val, torch.Tensor) or name not in _ops.ALONG_DIM:
            return
        dims = a.get("dims", a.get("dim", a.get("shifts")))
        if name == "roll" and not a.get("dims"):
            dims = list(range(val.dim()))  # roll without dims works on the flattened tensor
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if b not in [d % val.dim() for d in dims if isinstance(d, int)]:
            return
        full = (
            name == "slice"
            and (a.get("start") in (None, 0))
            and (a.get("step") in (None, 1))
            and (a.get("end") is None or (isinstance(a.get("end"), int) and a["end"] >= 2**62))
        )
        if not full:
            raise self._error(
                node,
                name,
                "works along the batch dimension, so samples are mixed, reordered or dropped",
                "each input must pass through the network on its own",
            )

    def _refusal(self, node: torch.fx.Node, name: str) -> UnsupportedOperationError:
        if name in _ops.TRAINING_ONLY:
            return self._error(
                node,
                name,
                "uses batch statistics (training mode, or track_running_stats=False)",
                "call model.eval(); batchnorm needs running statistics to be affine",
            )
        if name in _ops.NORMS:
            return self._error(
                node,
                name,
                "divides by a statistic of the activations, which is not piecewise affine",
            )
        return self._error(node, name, "")

    def _add_maso(self, node: torch.fx.Node, name: str, step: Step) -> None:
        src = node.args[0]
        if name in ("max", "min") and node.target._overloadname == "other":
            name = "maximum" if name == "max" else "minimum"
        maso = _ops.make_maso(name, node, tuple(src.meta["val"].shape))
        step.maso, step.tuple_out = maso, isinstance(node.meta["val"], (tuple, list))
        out = node
        if step.tuple_out:
            out = self._tuple_value(node, name)
        if node.name not in self.bdims:
            raise self._error(
                node,
                name,
                "acts on a tensor without a single batch dimension "
                "(the batch is merged with other dimensions)",
                "keep the batch dimension separate, e.g. reshape to (N, ...) before it",
            )
        bdim = self.bdims[node.name]
        if getattr(maso, "nd", 0) and bdim != 0:
            raise self._error(node, name, "pools a tensor whose first dimension is not the batch")
        if hasattr(maso, "dims") and any(
            d % src.meta["val"].dim() == self.bdims[src.name] for d in maso.dims
        ):
            raise self._error(
                node,
                name,
                "reduces over the batch dimension",
                "reduce over the feature dimensions only",
            )
        state_bdim = bdim - (
            sum(d % src.meta["val"].dim() < bdim for d in maso.dims)
            if getattr(maso, "keepdim", False)
            else 0
        )
        self.layers.append(
            Layer(
                len(self.layers),
                _where(node, maso.kind),
                maso.kind,
                self.shapes[node.name],
                _numel(self.shapes[node.name]),
                maso.pieces,
                out.name,
                node.name,
                state_bdim,
            )
        )

    def _tuple_value(self, node: torch.fx.Node, name: str) -> torch.fx.Node:
        users = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        if 1 in users and users[1].users:
            raise self._error(node, name, "uses the argmax indices as data")
        if 0 not in users:
            raise self._error(node, name, "has no used output")
        return users[0]

    def _record_shape(self, node: torch.fx.Node) -> None:
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            val = val[0]
        if not isinstance(val, torch.Tensor):
            return
        dims = [i for i, s in enumerate(val.shape) if str(s) == self.batch]
        if len(dims) == 1:
            b = dims[0]
            self.bdims[node.name] = b
            self.shapes[node.name] = tuple(int(s) for i, s in enumerate(val.shape) if i != b)

    def _has_batch(self, node: torch.fx.Node) -> bool:
        val = node.meta.get("val")
        vals = val if isinstance(val, (tuple, list)) else (val,)
        return any(
            self.batch in str(s) for v in vals if isinstance(v, torch.Tensor) for s in v.shape
        )

    def _error(
        self, node: torch.fx.Node, name: str, why: str, fix: str = ""
    ) -> UnsupportedOperationError:
        return UnsupportedOperationError(f"aten.{name}", _location(node), why, fix)


def _module(node: torch.fx.Node) -> tuple[str, str]:
    """(module path, class name) of the innermost module the node was traced in."""
    stack = node.meta.get("nn_module_stack") or {}
    path, cls = list(stack.values())[-1] if stack else ("", "")
    cls = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path, cls.rsplit(".", 1)[-1]


def _location(node: torch.fx.Node) -> str:
    path, cls = _module(node)
    where = f"module '{path}' ({cls})" if path else "the model's forward"
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    files = [ln.strip() for ln in trace if ln.strip().startswith("File ")]
    return where + (f", {files[-1]}" if files else "")


def _where(node: torch.fx.Node, kind: str) -> str:
    path, cls = _module(node)
    if path and cls in _ACTIVATION_MODULES:
        return path
    return f"{path}.{kind}" if path else kind


def _unique_names(layers: list[Layer]) -> list[Layer]:
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer.name] = counts.get(layer.name, 0) + 1
    seen: dict[str, int] = {}
    out = []
    for layer in layers:
        name = layer.name
        if counts[name] > 1:
            seen[name] = seen.get(name, -1) + 1
            name = f"{name}[{seen[name]}]"
        out.append(
            Layer(
                layer.index,
                name,
                layer.kind,
                layer.shape,
                layer.units,
                layer.pieces,
                layer.node,
                layer.step,
                layer.state_bdim,
            )
        )
    return out


def _refs(a: Any) -> Any:
    if isinstance(a, torch.fx.Node):
        return Ref(a.name)
    if isinstance(a, (tuple, list)):
        return type(a)(_refs(v) for v in a)
    if isinstance(a, dict):
        return {k: _refs(v) for k, v in a.items()}
    return a


def _flat(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (tuple, list)) else [v]


def _is_act(v: Any, act: set[str]) -> bool:
    return any(isinstance(u, torch.fx.Node) and u.name in act for u in _flat(v))


def _floating(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    tensors = [v for v in vals if isinstance(v, torch.Tensor)]
    return not tensors or tensors[0].dtype.is_floating_point


def _is_tensor(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    return any(isinstance(v, torch.Tensor) for v in vals)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
