"""The captured network as a small program, and its interpreter.

A ``Program`` is the exported graph compiled once into a list of ``Step``s. ``run`` executes it in
one of two modes:

* record (``states=None``): the real forward pass; each MASO step also stores the affine piece
  it chose per unit in ``record``;
* frozen (``states=...``): every MASO step applies the piece given in ``states``, so the program
  is the affine network of x's region, ``A[x] z + B[x]`` (Sec. 4, eqs. (5)-(9)).

``inject`` replaces the value of one node (a layer output or the input) to evaluate the network
from there; ``stop`` ends the run at a node.

>>> # Program objects are built by splinelens._capture.capture(model, example_input)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from splinelens._capture.batch import BatchSizes
from splinelens._capture.pieces import MasoOp

Tensor = torch.Tensor


@dataclass(frozen=True)
class Ref:
    """A reference to another node's value inside a step's arguments."""

    name: str


@dataclass
class Step:
    """One graph operation: what to call, on what, and, for MASOs, how to freeze it."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    maso: MasoOp | None = None
    tuple_out: bool = False  # the original op returned (values, indices)


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


@dataclass
class Program:
    """The compiled network: steps, where parameters live, layers, batch dims of the nodes."""

    steps: list[Step]
    input_name: str
    output_name: str
    params: list[tuple[str, torch.nn.Module, str]]  # (placeholder, owner module, attribute)
    constants: dict[str, Tensor]
    layers: list[Layer]
    bdims: dict[str, int]  # node -> position of the batch dimension in its value
    shapes: dict[str, tuple[int, ...]]  # node -> one sample's shape
    output_g: str | None = None  # the excluded output nonlinearity, if any
    param_fqn: dict[str, str] = field(default_factory=dict)  # placeholder -> "fc.weight"
    batch: BatchSizes = field(default_factory=lambda: BatchSizes(1, None))  # sizes it holds for
    position: dict[str, int] = field(init=False, repr=False)  # step name -> index in steps

    def __post_init__(self) -> None:
        self.position = {s.name: i for i, s in enumerate(self.steps)}

    def step(self, name: str) -> Step:
        """The step that computes node ``name``."""
        return self.steps[self.position[name]]

    def run(
        self,
        x: Tensor,
        *,
        states: dict[str, Tensor] | None = None,
        record: dict[str, Tensor] | None = None,
        inject: tuple[str, Tensor] | None = None,
        track: str | None = None,
        stop: str | None = None,
        preset: dict[str, Tensor] | None = None,
        skip: frozenset[str] = frozenset(),
    ) -> dict[str, Any]:
        """Execute the program on input ``x``; return every node's value by name.

        ``track``: a node whose value is replaced by a fresh leaf that requires grad, so that
        gradients of later nodes with respect to it can be taken after the run.
        ``preset``: values given for some nodes (the input included); ``skip``: steps not to
        execute (their values are preset or unused).
        """
        self.batch.check(x.shape[0])
        env: dict[str, Any] = dict(self.constants)
        for name, owner, attr in self.params:
            env[name] = getattr(owner, attr).detach()
        env[self.input_name] = x
        if inject is not None and inject[0] == self.input_name:
            env[self.input_name] = inject[1]
        if track == self.input_name:
            env[track] = x.detach().requires_grad_(True)
        env.update(preset or {})
        for step in self.steps:
            if step.name in skip:
                pass
            elif inject is not None and step.name == inject[0]:
                env[step.name] = inject[1]
            else:
                env[step.name] = self._exec(step, env, states, record)
            if step.name == track:
                env[track] = env[track].detach().requires_grad_(True)
            if step.name == stop:
                break
        return env

    def _exec(
        self,
        step: Step,
        env: dict[str, Any],
        states: dict[str, Tensor] | None,
        record: dict[str, Tensor] | None,
    ) -> Any:
        args = _resolve(step.args, env)
        if step.maso is None:
            return step.fn(*args, **_resolve(step.kwargs, env))
        if states is not None:
            value = step.maso.frozen(args, states[step.name])
        else:
            value, state = step.maso.forward(args)
            if record is not None:
                record[step.name] = state
        return (value, None) if step.tuple_out else value

    def affine_prefix(self) -> tuple[frozenset[str], frozenset[str]]:
        """The batched steps before any MASO (affine in the input), and the nodes read later on.

        The second set may hold the input; it holds the output when no MASO precedes it.
        """
        after: set[str] = set()
        used: set[str] = set()
        for step in self.steps:
            refs = {r.name for r in _refs((step.args, step.kwargs))}
            if step.maso is not None or refs & after:
                after.add(step.name)
                used |= refs - after
        prefix = frozenset(
            s.name for s in self.steps if s.name not in after and s.name in self.bdims
        )
        if self.output_name not in after:
            used.add(self.output_name)
        return prefix, frozenset(n for n in used if n in self.bdims)

    def per_sample(self, node: str, value: Tensor) -> Tensor:
        """Move the batch dimension of a node's value to the front: (N, *shape)."""
        return value.movedim(self.bdims[node], 0)

    def from_sample(self, node: str, value: Tensor) -> Tensor:
        """Inverse of ``per_sample``."""
        return value.movedim(0, self.bdims[node])


def _refs(a: Any) -> list[Ref]:
    if isinstance(a, Ref):
        return [a]
    if isinstance(a, (tuple, list)):
        return [r for v in a for r in _refs(v)]
    if isinstance(a, dict):
        return [r for v in a.values() for r in _refs(v)]
    return []


def _resolve(a: Any, env: dict[str, Any]) -> Any:
    if isinstance(a, Ref):
        return env[a.name]
    if isinstance(a, (tuple, list)):
        return type(a)(_resolve(v, env) for v in a)
    if isinstance(a, dict):
        return {k: _resolve(v, env) for k, v in a.items()}
    return a
