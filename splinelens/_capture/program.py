"""The captured network as a frozen program, and its two generated executors.

A ``Program`` is the exported graph compiled once into a tuple of frozen ``Step``s (each keeps its
ATen name). It runs in two ways, each generated once per (nodes given, stop node) as straight-line
Python, as ``torch.fx`` does, rather than interpreted node by node:

* ``record(x)``: the real forward pass; each MASO step also returns the affine piece it chose per
  unit (its *state*: ReLU masks, max-pool argmaxes);
* ``frozen(x, states)``: every MASO step applies the piece given in ``states``, so the program is
  the affine network of x's region, ``A[x] z + B[x]`` (Sec. 4, eqs. (5)-(9)).

Both take ``at={node: value}`` (values given for some nodes: a start node, the input, or the
affine prefix of a 2-D slice) and ``stop`` (the last node needed). Every step up to ``stop``
runs except the given ones and those only given nodes read (a slice's prefix runs once).

>>> import torch, torch.nn as nn
>>> from splinelens._capture import capture
>>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval()  # (the program reads it live)
>>> prog = capture(net, torch.randn(2, 4))
>>> values, states = prog.record(torch.randn(5, 4))
>>> frozen = prog.frozen(torch.zeros(5, 4), states)   # B[x]: the frozen network at zero
>>> frozen[prog.output_name].shape
torch.Size([5, 3])
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from splinelens._capture.batch import BatchSizes
from splinelens._capture.pieces import MasoOp
from splinelens._capture.registry import info

Tensor = torch.Tensor
States = dict[str, Tensor]


@dataclass(frozen=True)
class Ref:
    """A reference to another node's value inside a step's arguments."""

    name: str


@dataclass(frozen=True)
class Step:
    """One graph operation: its ATen name, what to call on what, and for MASOs how to freeze it."""

    name: str
    op: str  # the ATen packet name, e.g. "conv2d"
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    maso: MasoOp | None = None
    tuple_out: bool = False  # the original op returned (values, indices)

    @property
    def refs(self) -> list[str]:
        """Names of the nodes this step reads."""
        return [r.name for r in refs_in((self.args, self.kwargs))]


@dataclass(frozen=True)
class Layer:
    """A layer in the sense of Definition 1: one MASO nonlinearity and the affine ops before it.

    ``node`` names the graph node holding the layer's output; ``shape`` is one sample's output
    shape, ``units`` its number of units (entries of the partition code), ``pieces`` the number of
    affine pieces each unit chooses from.
    """

    index: int
    name: str
    kind: str
    shape: tuple[int, ...]
    units: int
    pieces: int
    node: str = field(repr=False)
    step: str = field(repr=False)
    state_bdim: int = field(repr=False)


@dataclass(frozen=True)
class Program:
    """The compiled network: steps, where parameters live, layers, batch dims of the nodes."""

    steps: tuple[Step, ...]
    input_name: str
    output_name: str
    params: tuple[tuple[str, torch.nn.Module, str], ...]  # (placeholder, owner (weak), attribute)
    constants: Mapping[str, Tensor]
    layers: tuple[Layer, ...]
    bdims: Mapping[str, int]  # node -> position of the batch dimension in its value
    shapes: Mapping[str, tuple[int, ...]]  # node -> one sample's shape
    output_g: tuple[str, int] | None = None  # the excluded output nonlinearity: (op, its dim)
    param_fqn: Mapping[str, str] = field(default_factory=dict)  # placeholder -> "fc.weight"
    batch: BatchSizes = field(default_factory=lambda: BatchSizes(1, None))  # sizes it holds for
    owners: tuple[weakref.ref, ...] = field(default=(), repr=False, compare=False)  # (``hold``)
    position: Mapping[str, int] = field(init=False, repr=False)  # step name -> index in steps
    _code: dict = field(init=False, repr=False, compare=False)  # generated executors

    def __post_init__(self) -> None:
        object.__setattr__(self, "position", {s.name: i for i, s in enumerate(self.steps)})
        object.__setattr__(self, "_code", {})

    def step(self, name: str) -> Step:
        """The step that computes node ``name``."""
        return self.steps[self.position[name]]

    def leaf(self, name: str) -> Tensor:
        """The live value of a parameter, buffer or constant node (detached)."""
        for ph, owner, attr in self.params:
            if ph == name:
                return getattr(owner, attr).detach()
        return self.constants[name]

    @functools.cached_property
    def constant_tensors(self) -> dict[str, Tensor]:
        """The tensors among the constants (a hook's closure tensors too), each once, by name."""
        out: dict[str, Tensor] = {}
        for name, t in self.constants.items():
            if isinstance(t, Tensor) and all(t is not u for u in out.values()):
                out[name] = t
        return out

    def hold(self) -> tuple[torch.nn.Module, ...]:
        """The modules that own the parameters and buffers, held: the program reads them through
        weak proxies (a cache keyed weakly by the model must not keep it alive), so whoever runs
        it later keeps this (a map, a user's view, a MASO)."""
        owners = tuple(r() for r in self.owners)
        if any(m is None for m in owners):
            raise ReferenceError("the model this program was captured from no longer exists")
        return owners

    def live_params(self) -> list[Tensor]:
        """The parameters and buffers the executors read now (from their owner modules)."""
        return [getattr(owner, attr) for _, owner, attr in self.params]

    def record(
        self, x: Tensor, *, at: Mapping[str, Tensor] | None = None, stop: str | None = None
    ) -> tuple[dict[str, Any], States]:
        """The forward pass on x: every computed node's value by name, and each MASO's state."""
        self.batch.check(x.shape[0])
        states: States = {}
        values = self._executor("record", at, stop)(x, at or {}, states)
        return values, states

    def frozen(
        self,
        x: Tensor,
        states: Mapping[str, Tensor],
        *,
        at: Mapping[str, Tensor] | None = None,
        stop: str | None = None,
    ) -> dict[str, Any]:
        """The network with every MASO frozen at ``states``: every computed node's value."""
        self.batch.check(x.shape[0])
        return self._executor("frozen", at, stop)(x, at or {}, states)

    def _executor(self, mode: str, at: Mapping[str, Tensor] | None, stop: str | None) -> Callable:
        key = (mode, frozenset(at or ()), stop)
        fn = self._code.get(key)
        if fn is None:
            fn = self._code[key] = generate(self, mode, key[1], stop)
        return fn

    @functools.cached_property
    def affine_prefix(self) -> tuple[frozenset[str], frozenset[str]]:
        """The batched steps before any MASO (affine in the input), and the nodes read later on.

        The second set may hold the input; it holds the output when no MASO precedes it.
        """
        after: set[str] = set()
        used: set[str] = set()
        for step in self.steps:
            refs = set(step.refs)
            if step.maso is not None or refs & after:
                after.add(step.name)
                used |= refs - after
        prefix = frozenset(
            s.name for s in self.steps if s.name not in after and s.name in self.bdims
        )
        if self.output_name not in after:
            used.add(self.output_name)
        return prefix, frozenset(n for n in used if n in self.bdims)

    def zero_prefix(self, n: int, like: Tensor) -> dict[str, Tensor]:
        """What the rest of the network reads from its affine prefix (``affine_prefix``) for n
        zero inputs: the same for every input, computed for 2 and copied n times, for ``frozen``'s
        ``at`` (B skips the first layers' n-fold work). {} where that gains nothing (n <= 2, no
        prefix) or a batch of 2 lies outside the capture's range. ``like``: x (dtype, device)."""
        if n <= 2:
            return {}
        prefix, needed = self.affine_prefix
        frontier = sorted(needed & prefix, key=self.position.__getitem__)
        if not frontier or not self.batch.accepts(2):
            return {}
        zero = self.from_sample(self.input_name, like.new_zeros(2, *self.shapes[self.input_name]))
        values, _ = self.record(zero, stop=frontier[-1])
        if not all(isinstance(values[k], Tensor) for k in frontier):  # (a tuple: not given)
            return {}
        return {k: _repeat(values[k], self.bdims[k], n) for k in frontier}

    def per_sample(self, node: str, value: Tensor) -> Tensor:
        """Move the batch dimension of a node's value to the front: (N, *shape)."""
        return value.movedim(self.bdims[node], 0)

    def from_sample(self, node: str, value: Tensor) -> Tensor:
        """Inverse of ``per_sample``."""
        return value.movedim(0, self.bdims[node])

    def slice_states(self, states: Mapping[str, Tensor], s: int, e: int) -> States:
        """The states of inputs s:e."""
        bdim = self._state_bdims
        return {k: v.narrow(bdim[k], s, e - s) for k, v in states.items()}

    def cat_states(self, parts: list[Mapping[str, Tensor]]) -> States:
        """States of several batches, concatenated along the batch."""
        bdim = self._state_bdims
        return {k: torch.cat([p[k] for p in parts], bdim[k]) for k in parts[0]}

    def tile_states(self, states: Mapping[str, Tensor], t: int) -> States:
        """The states repeated t times along the batch (t copies of the same inputs)."""
        return self.cat_states([states] * t)

    def unit_codes(self, layer: Layer, states: Mapping[str, Tensor], n: int) -> Tensor:
        """(N, units): each unit's code (Sec. 7, eq. (14)) from its MASO's state for n inputs."""
        maso = self.step(layer.step).maso
        assert maso is not None
        return maso.code(states[layer.step]).movedim(layer.state_bdim, 0).reshape(n, -1)

    @functools.cached_property
    def batched_rows(self) -> bool:
        """Whether rows of A are best differentiated in one vmapped backward pass: every op's
        backward batches under vmap (registry ``vmap_backward``)."""
        return all(info(s.op).vmap_backward for s in self.steps)

    def rows_per_pass(self, n: int, itemsize: int, budget: int = 1 << 28) -> int:
        """Rows of A per vmapped backward pass for n inputs: the rows' gradients of every node
        stay near ``budget`` bytes."""
        return max(1, budget // max(1, n * self._values_per_sample * itemsize))

    def grad_chunk(self, itemsize: int, budget: int = 1 << 30) -> int:
        """Inputs per chunk that keep about ``budget`` bytes of activations alive for autograd."""
        return max(1, budget // max(1, 2 * self._values_per_sample * itemsize))

    @functools.cached_property
    def _values_per_sample(self) -> int:
        """Entries of every node's value for one input."""
        return sum(math.prod(s) for s in self.shapes.values())

    @functools.cached_property
    def _state_bdims(self) -> dict[str, int]:
        return {layer.step: layer.state_bdim for layer in self.layers}


def _repeat(value: Tensor, dim: int, n: int) -> Tensor:
    """The first entry along ``dim`` repeated n times there, in new memory (a value given to an
    executor may be viewed or written by what reads it)."""
    sizes = [n if i == dim else s for i, s in enumerate(value.shape)]
    return value.narrow(dim, 0, 1).expand(sizes).contiguous()


def refs_in(a: Any) -> list[Ref]:
    """Every ``Ref`` inside nested arguments."""
    return leaves(a, Ref)


def leaves(a: Any, kind: type) -> list:
    """Every ``kind`` inside nested tuples, lists and mappings (arguments, a model's output)."""
    if isinstance(a, kind):
        return [a]
    if isinstance(a, (tuple, list)):
        return [r for v in a for r in leaves(v, kind)]
    if isinstance(a, Mapping):
        return [r for v in a.values() for r in leaves(v, kind)]
    return []


def _needed(users: list[str], live: set[str]) -> bool:
    """A step is computed if nothing reads it (callers may) or a computed step reads it."""
    return not users or any(u in live for u in users)


def generate(prog: Program, mode: str, at: frozenset[str], stop: str | None) -> Callable:
    """Straight-line Python for one executor: ``f(x, at, states) -> values``."""
    return _Writer(prog, mode, at, stop).function()


class _Writer:
    """Writes one executor's source: the live steps in order, one line (or two) each."""

    def __init__(self, prog: Program, mode: str, at: frozenset[str], stop: str | None) -> None:
        self.prog, self.mode, self.at = prog, mode, at
        end = len(prog.steps) if stop is None else prog.position.get(stop, -1) + 1  # (input: 0)
        self.steps = prog.steps[:end]
        self.names: dict[str, str] = {}  # node -> local variable
        self.globals: dict[str, Any] = {}
        self.live = self._live(stop)

    def _live(self, stop: str | None) -> set[str]:
        """Nodes to compute: every step up to ``stop`` and what they read, except the given
        nodes (``at``) and steps whose values only given nodes read (nothing else needs them)."""
        users: dict[str, list[str]] = {}
        for s in self.steps:
            for r in s.refs:
                users.setdefault(r, []).append(s.name)
        live: set[str] = set()
        for s in reversed(self.steps):  # a step's users come after it
            if s.name not in self.at and _needed(users.get(s.name, []), live):
                live.add(s.name)
        leaves = [self.prog.input_name, *(p[0] for p in self.prog.params), *self.prog.constants]
        live |= {n for n in leaves if n not in self.at and any(u in live for u in users.get(n, []))}
        return live | ({self.prog.input_name} - self.at)  # the input is always returned

    def function(self) -> Callable:
        lines = [f"    {self._var(n)} = at[{n!r}]" for n in sorted(self.at)]
        lines += self._leaves()
        for step in self.steps:
            if step.name in self.live and step.name not in self.at:
                lines += self._step(step)
        out = ", ".join(f"{n!r}: {v}" for n, v in self.names.items())
        src = "def executor(x, at, states):\n" + "\n".join(lines) + f"\n    return {{{out}}}\n"
        scope: dict[str, Any] = {}
        exec(compile(src, f"<splinelens {self.mode} executor>", "exec"), self.globals, scope)
        fn = scope["executor"]
        fn.source = src  # for reading and debugging
        return fn

    def _leaves(self) -> list[str]:
        """The input, parameters (read live from their modules) and constants that are read."""
        prog, lines = self.prog, []
        if prog.input_name in self.live:
            lines.append(f"    {self._var(prog.input_name)} = x")
        for ph, owner, attr in prog.params:
            if ph in self.live:
                owner_var = self._const(owner)
                lines.append(f"    {self._var(ph)} = getattr({owner_var}, {attr!r}).detach()")
        for name, value in prog.constants.items():
            if name in self.live:
                lines.append(f"    {self._var(name)} = {self._const(value)}")
        return lines

    def _step(self, step: Step) -> list[str]:
        args = self._src(tuple(step.args))
        out = self._var(step.name)
        if step.maso is None:
            call = [self._src(v) for v in step.args]
            call += [f"{k}={self._src(v)}" for k, v in step.kwargs.items()]
            return [f"    {out} = {self._const(step.fn)}({', '.join(call)})"]
        maso = self._const(step.maso)
        value = f"{out}_v" if step.tuple_out else out
        if self.mode == "record":
            lines = [f"    {value}, states[{step.name!r}] = {maso}.forward({args})"]
        else:
            lines = [f"    {value} = {maso}.frozen({args}, states[{step.name!r}])"]
        return lines + ([f"    {out} = ({value}, None)"] if step.tuple_out else [])

    def _var(self, node: str) -> str:
        if node not in self.names:
            self.names[node] = f"v{len(self.names)}"
        return self.names[node]

    def _const(self, value: Any) -> str:
        name = f"c{len(self.globals)}"
        self.globals[name] = value
        return name

    def _src(self, a: Any) -> str:
        """Python source for an argument: node references become locals, objects globals."""
        if isinstance(a, Ref):
            return self._var(a.name)
        if isinstance(a, tuple):
            return "(" + "".join(f"{self._src(v)}, " for v in a) + ")"
        if isinstance(a, list):
            return "[" + ", ".join(self._src(v) for v in a) + "]"
        if type(a) in (int, bool, str, type(None)) or (type(a) is float and math.isfinite(a)):
            return repr(a)
        return self._const(a)


def apply_g(g: tuple[str, int] | None, logits: torch.Tensor) -> torch.Tensor:
    """The excluded output nonlinearity g = (softmax or log-softmax, its dim) on logits
    (N, *shape), or none.

    >>> apply_g(("softmax", 1), torch.zeros(2, 4)).sum(1)
    tensor([1., 1.])
    """
    if g is None:
        return logits
    name, dim = g
    return (torch.log_softmax if name.endswith("log_softmax") else torch.softmax)(logits, dim)
