"""Exact affine maps of a network's region: f(x) = A[x] x + B[x] (Sec. 4, eqs. (5)-(9)).

An ``AffineMap`` holds the partition states of a batch of inputs (ReLU masks, max-pool argmaxes).
Frozen at those states, the network is affine; ``B`` is that network evaluated at zero (a couple
of forward passes), ``A`` (the slopes; row c of the end-to-end map is the class-c template, Sec.
5) is materialised lazily by reverse-mode differentiation of the frozen network, in chunks.

>>> import torch, torch.nn as nn, splinelens as sl
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
>>> x = torch.randn(5, 4)
>>> amap = sl.affine_map(net, x)
>>> amap.A.shape, amap.B.shape
(torch.Size([5, 3, 4]), torch.Size([5, 3]))
>>> torch.allclose(torch.einsum("ncd,nd->nc", amap.A, x) + amap.B, net(x), atol=1e-5)
True
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from splinelens._capture import Program
from splinelens._checks import (
    HoldsCapture,
    check_finite,
    check_overflow,
    check_positive_int,
    check_untransformed,
)
from splinelens._fingerprint import ModelTensors, WeightsFingerprint, placeless
from splinelens._precision import exact_matmul
from splinelens._tensors import model_state, version

__all__ = ["AffineMap"]

Tensor = torch.Tensor
_CHANGED = (
    "the model's parameters or buffers (or a tensor its hooks hold) changed after this "
    "AffineMap was made; "
    "compute a new one with sl.affine_map(model, x)"
)


@dataclass
class AffineMap(HoldsCapture):
    """The affine map z_end = A z_start + B of x's region, from node ``start`` to node ``end``.

    ``start``/``end`` are the input, a layer's output, or the network's output (before the
    output nonlinearity g). Nodes that feed ``end`` without passing through ``start`` (skip
    connections around it) are held at their value for x and land in ``B``. Everything is
    computed on first use: asking for ``A`` first costs one forward pass plus one backward pass
    per row; ``B`` first, two forward passes.
    """

    copy_refusal: ClassVar[str] = (
        "an AffineMap holds its model's capture and is neither pickled nor deep-copied: "
        "send or copy its tensors (A, B, output, states), or make a new map with "
        "sl.affine_map(model, x) where you need one"
    )

    program: Program = field(repr=False)
    model: nn.Module = field(repr=False)  # the map keeps its model alive (a cached view may not)
    x: Tensor  # (N, *input_shape)
    start: str
    end: str
    _states: dict[str, Tensor] | None = field(default=None, repr=False)
    _z_start: Tensor | None = field(default=None, repr=False)  # (N, *start_shape)
    _output: Tensor | None = field(default=None, repr=False)  # (N, *end_shape)
    _weights: WeightsFingerprint | None = field(default=None, init=False, repr=False)
    # the model's tensors (a view passes its own: their fingerprint's plan is kept)
    tensors: ModelTensors | None = field(default=None, repr=False)
    _read: tuple = field(init=False, repr=False)  # (id, version) of x and the tensors it reads
    _made: tuple = field(init=False, repr=False)  # the model's tensors' ids when made
    _x: Tensor = field(init=False, repr=False)  # x's values when made: what the map computes with
    _owners: tuple = field(init=False, repr=False)  # the modules its program reads (held)

    def __post_init__(self) -> None:
        self._owners = self.program.hold()  # (the program holds them weakly)
        if self.tensors is None:
            self.tensors = ModelTensors(list(model_state(self.model)))
        self._read = self._params()
        self._x = self.x.detach().clone()  # (a write to x through .data or numpy bumps no version)
        self._made = self.tensors.ids()  # in-place changes and re-bound data, seen cheaply

    def _check_unchanged(self) -> None:
        """Refuse to go on once any tensor the map computes with changed since it was made.

        The program reads its parameters from their modules at every run: they must still be
        the tensors it read when the map was made (a re-registered parameter is not), neither
        they nor x changed in place (version counters: integer buffers too), and the
        model's tensors must hold the same values (sums of bit patterns, which see a change of
        any one entry, through ``.data`` too). So states and weights never mix. A map answers
        for the model as it was when made: a module replaced since then is not read.

        The weights are checked (finite) and fingerprinted at the map's first use, in one pass:
        a change between making the map and its first use is refused if it went through the
        tensors (in place, re-bound; their version counters); a write through ``.data`` in that
        window is taken as the map's weights (it is exact for them). Data that moved with its
        values kept (``share_memory()``, sending the weights to a worker) is unchanged.
        """
        now = self._params()
        if now[-1] != self._read[-1]:
            raise ValueError(
                "x changed in place after this AffineMap was made; compute a new one with "
                "sl.affine_map(model, x), or pass x.clone() to keep using x"
            )
        if now != self._read:
            raise ValueError(_CHANGED)
        if self._weights is None:  # the first use of a map whose weights are not checked yet
            fp = self.tensors.check()
            if placeless(fp.ids) != placeless(self._made):
                raise ValueError(_CHANGED)
            self._weights = fp
        elif not self.tensors.fingerprint().same_values(self._weights):
            raise ValueError(_CHANGED)

    def _params(self) -> tuple:
        """The tensors the program reads (integer buffers and constants too) and x, with version
        counters: a re-registered tensor or an in-place change of an index buffer, of a tensor
        a hook holds or of x is seen."""
        prog = self.program
        tensors = (*prog.live_params(), *prog.constant_tensors.values(), self.x)
        return tuple((id(t), version(t)) for t in tensors)

    @property
    def states(self) -> dict[str, Tensor]:
        """The piece every MASO unit uses for x, by graph node (masks, argmax indices), in the
        captured graph's own layout: the batch where that node holds it, not always first (an
        RNN's (1, N, H)). Per sample and by layer: ``sl.partition_codes(model, x)``, whose
        ``LayerCodes.states()`` are (N, units)."""
        self._check_unchanged()
        return self._recorded()[0]

    @property
    def z_start(self) -> Tensor:
        """The start node's value for x, (N, *start_shape)."""
        self._check_unchanged()
        return self._recorded()[1]

    @property
    def output(self) -> Tensor:
        """The end node's value for x, (N, *end_shape): f(x) end to end."""
        self._check_unchanged()
        return self._recorded()[2]

    @property
    def start_shape(self) -> tuple[int, ...]:
        return self.program.shapes[self.start]

    @property
    def end_shape(self) -> tuple[int, ...]:
        return self.program.shapes[self.end]

    @functools.cached_property
    def B(self) -> Tensor:
        """Offsets, (N, *end_shape): the frozen network with z_start = 0."""
        self._check_unchanged()
        z0 = self._recorded()[1]
        return self._apply(z0.new_zeros(len(self.x), *self.start_shape), zero=True)

    @functools.cached_property
    def A(self) -> Tensor:
        """Slopes, (N, *end_shape, *start_shape); end to end, row c is the class-c template."""
        return self.templates().reshape(len(self.x), *self.end_shape, *self.start_shape)

    def __call__(self, z: Tensor) -> Tensor:
        """Apply the frozen map to other start values z, (N, *start_shape) -> (N, *end_shape)."""
        if not isinstance(z, Tensor) or tuple(z.shape) != (len(self.x), *self.start_shape):
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"z must have shape {(len(self.x), *self.start_shape)}, got {got}")
        if z.dtype != self.x.dtype or z.device != self.x.device:
            raise ValueError(
                f"z is {z.dtype} on {z.device}; the map is {self.x.dtype} on "
                f"{self.x.device}: call z.to(...) to match"
            )
        check_untransformed("z", z)
        check_finite("z", z)
        self._check_unchanged()
        return self._apply(z)

    def _apply(self, z: Tensor, zero: bool = False) -> Tensor:
        """The frozen map at z (``zero``: z is 0 at the input: its affine prefix computed once)."""
        prog, states = self.program, self._recorded()[0]
        with torch.no_grad(), exact_matmul():
            given = prog.zero_prefix(len(z), z) if zero and self.start == prog.input_name else {}
            at = {self.start: self._node(z), **given}
            values = prog.frozen(self._x, states, at=at, stop=self.end)
        return prog.per_sample(self.end, values[self.end])

    def templates(self, rows: Sequence[int] | None = None, chunk_size: int | None = None) -> Tensor:
        """Rows of A (classes, end to end) for every input: (N, len(rows), *start_shape).

        ``rows`` index the flattened end shape (default: all). Inputs are processed in chunks of
        ``chunk_size`` (default: sized to keep about 1 GiB of activations alive).
        """
        total = math.prod(self.end_shape)
        rows = list(range(total)) if rows is None else [_row(r, total) for r in rows]
        if chunk_size is not None:
            chunk_size = check_positive_int("chunk_size", chunk_size)
        self._check_unchanged()
        n, step = len(self.x), chunk_size or self.program.grad_chunk(self.x.element_size())
        fresh = self._states is None
        recorded = []
        # reverse mode needs autograd on, also inside torch.inference_mode() / no_grad()
        with torch.inference_mode(False), exact_matmul():
            out = self.x.new_empty(n, len(rows), *self.start_shape)  # (N, R, *start_shape)
            for s in range(0, n, step):
                e = min(s + step, n)
                recorded.append(self._chunk(s, e, rows, fresh, out[s:e]))
        if fresh:
            self._keep_records(recorded)
        return out

    def _chunk(self, s: int, e: int, rows: list[int], fresh: bool, out: Tensor) -> tuple:
        """Rows of A for inputs s:e into ``out``; without states yet, record them in the pass."""
        prog = self.program
        if rows_by_tiling(prog, self.x):
            per_pass = min(len(rows), prog.grad_chunk(self.x.element_size()) // (e - s))
            if per_pass > 1 and prog.batch.accepts(per_pass * (e - s)):
                return self._tiled_chunk(s, e, rows, fresh, out, per_pass)
        with torch.enable_grad():
            x = _normal(self._x[s:e])
            if fresh:  # one pass: record the states and differentiate the same graph
                x = x.detach().requires_grad_(True)  # d(end)/d(start) only counts paths via start
                values, states = prog.record(x, stop=self.end)
            else:
                all_states, z_start, _ = self._recorded()
                leaf = self._node(z_start[s:e].detach().clone().requires_grad_(True))
                states = {k: _normal(v) for k, v in prog.slice_states(all_states, s, e).items()}
                values = prog.frozen(x, states, at={self.start: leaf}, stop=self.end)
            self._grads(values[self.end], values[self.start], rows, out)
        return (
            states,
            prog.per_sample(self.start, values[self.start].detach()),
            prog.per_sample(self.end, values[self.end].detach()),
        )

    def _tiled_chunk(
        self, s: int, e: int, rows: list[int], fresh: bool, out: Tensor, per_pass: int
    ) -> tuple:
        """``_chunk`` by one backward pass per ``per_pass`` rows: the frozen network runs on that
        many copies of the inputs (states tiled), copy j seeded with row j (for GPUs, where one
        pass per row costs a pass's launches each)."""
        prog = self.program
        x = _normal(self._x[s:e])
        if fresh:
            with torch.no_grad():
                values, states = prog.record(x, stop=self.end)
            z_start = prog.per_sample(self.start, values[self.start])
            output = prog.per_sample(self.end, values[self.end])
        else:
            all_states, z_all, out_all = self._recorded()
            states = prog.slice_states(all_states, s, e)
            z_start, output = z_all[s:e], out_all[s:e]
        states = {k: _normal(v) for k, v in states.items()}
        for i in range(0, len(rows), per_pass):
            chunk = rows[i : i + per_pass]
            out[:, i : i + len(chunk)] = self._tiled_rows(x, states, _normal(z_start), chunk)
        return states, z_start.detach(), output.detach()

    def _tiled_rows(
        self, x: Tensor, states: dict[str, Tensor], z_start: Tensor, chunk: list[int]
    ) -> Tensor | float:
        """d end[:, r] / d start for the rows r in ``chunk``, (n, r, *start_shape), in one pass."""
        prog, n, r = self.program, len(x), len(chunk)
        with torch.enable_grad():
            leaf = z_start.detach().repeat(r, *[1] * (z_start.dim() - 1)).requires_grad_(True)
            tiled = prog.frozen(
                x.repeat(r, *[1] * (x.dim() - 1)),
                prog.tile_states(states, r),
                at={self.start: self._node(leaf)},
                stop=self.end,
            )
            y = prog.per_sample(self.end, tiled[self.end]).reshape(r, n, -1)  # (r, n, R_total)
            if not y.requires_grad:  # end does not depend on start: A = 0
                return 0.0
            (g,) = torch.autograd.grad(y, leaf, _seeds(y[0], chunk), allow_unused=True)
        return 0.0 if g is None else g.view(r, n, *self.start_shape).movedim(0, 1)

    def _grads(self, y: Tensor, leaf: Tensor, rows: list[int], out: Tensor) -> None:
        """Write d y[:, r] / d leaf for each row r into out, (n, R, *start_shape): several rows
        per vmapped backward pass where every op's backward batches, else one row per pass."""
        prog, n = self.program, len(out)
        y = prog.per_sample(self.end, y).reshape(n, -1)  # (n, R_total)
        if not y.requires_grad:  # end does not depend on start: A = 0
            out.zero_()
            return
        # (anomaly mode checks each gradient with .item(), which vmap cannot batch)
        batches = prog.batched_rows and not torch.is_anomaly_enabled()
        step = prog.rows_per_pass(n, out.element_size()) if batches else 1
        for s in range(0, len(rows), step):
            chunk = rows[s : s + step]
            seeds = _seeds(y, chunk)
            last, batched = s + step >= len(rows), step > 1
            (g,) = torch.autograd.grad(
                y,
                leaf,
                seeds if batched else seeds[0],
                retain_graph=not last,
                is_grads_batched=batched,
                allow_unused=True,
            )
            if g is not None and not batched:
                g = g.unsqueeze(0)
            if g is None:
                out[:, s : s + len(chunk)] = 0
            else:  # (r, *leaf.shape) -> (n, r, *start_shape)
                out[:, s : s + len(chunk)] = g.movedim(1 + prog.bdims[self.start], 0)

    def _recorded(self) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """States, z_start and output, recorded on first use (callers check the weights)."""
        if self._states is None:
            prog = self.program
            with torch.no_grad(), exact_matmul():
                values, states = prog.record(self._x, stop=self.end)
            self._z_start = prog.per_sample(self.start, values[self.start])
            self._output = prog.per_sample(self.end, values[self.end])
            check_overflow(self._output)
            self._states = states  # (last: another thread reads them as "recorded")
        assert self._z_start is not None and self._output is not None
        return self._states, self._z_start, self._output

    def _keep_records(self, recorded: list[tuple]) -> None:
        if len(recorded) == 1:  # one chunk: nothing to join
            states, self._z_start, self._output = recorded[0]
        else:
            states = self.program.cat_states([r[0] for r in recorded])
            self._z_start = torch.cat([r[1] for r in recorded])
            self._output = torch.cat([r[2] for r in recorded])
        check_overflow(self._output)
        self._states = states  # (last, as in ``_recorded``)

    def _node(self, z: Tensor) -> Tensor:
        return self.program.from_sample(self.start, z)


def rows_by_tiling(program: Program, x: Tensor) -> bool:
    """Whether rows of A are differentiated by tiling (``AffineMap._tiled_chunk``): on a GPU,
    when the backward passes do not batch under vmap (convolutions, max-pooling). There one
    pass per row is bound by kernel launches; a pass over r copies costs about one pass. On
    the CPU the r-fold forward pass of the tiles costs more than it saves.

    >>> import torch.nn as nn, splinelens as sl
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).eval()
    >>> x = torch.randn(2, 1, 4, 4)
    >>> rows_by_tiling(sl.SplineView(net, x).program, x)  # on the CPU
    False
    """
    return x.is_cuda and not program.batched_rows


def _seeds(y: Tensor, rows: list[int]) -> Tensor:
    """(len(rows), *y.shape) one-hot seeds for y (n, R_total): seed j selects row rows[j]."""
    n, total = y.shape
    if len(rows) == total and rows == list(range(total)):  # every row: an identity, copied
        eye = torch.eye(total, dtype=y.dtype, device=y.device)  # (a batched backward pass is
        return eye.unsqueeze(1).expand(total, n, total).contiguous()  # slower on an expanded one)
    seeds = y.new_zeros(len(rows), *y.shape)
    seeds[torch.arange(len(rows)), :, torch.tensor(rows)] = 1
    return seeds


def _normal(t: Tensor) -> Tensor:
    """An inference-mode tensor as a normal one (autograd cannot save inference tensors)."""
    return t.clone() if t.is_inference() else t


def _row(r: object, total: int) -> int:
    """A row index of the flattened end shape (negative counts from the end)."""
    if isinstance(r, bool) or not hasattr(r, "__index__"):
        raise TypeError(f"rows must be integers, got {type(r).__name__}")
    i = int(r.__index__())
    if not -total <= i < total:
        raise IndexError(f"row {i} is out of range: the map has {total} rows (0..{total - 1})")
    return i % total
