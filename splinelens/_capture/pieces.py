"""The MASO nonlinearities: how each one picks its affine piece, and how to freeze that choice.

Every nonlinear operator the capture accepts is a max-affine spline operator (Sec. 3): per unit it
selects one of a few affine pieces. For each, this module gives

* ``forward(args) -> (value, state)``: the real output and the piece chosen per unit;
* ``frozen(args, state)``: the same piece applied to other activations (affine in them), so the
  network with every state frozen is the linear network of x's region (Sec. 4);
* ``code(state) -> int tensor``: the partition code of each unit (Sec. 7, eq. (14));
* ``pieces``: the number of affine pieces per unit;
* ``shape(args)``: whether it is non-decreasing and convex in its input (Theorem 2, Prop. 1-4).

>>> op = Sign("relu")
>>> value, state = op.forward((torch.tensor([-1.0, 2.0]),))
>>> op.frozen((torch.tensor([5.0, 5.0]),), state)
tensor([0., 5.])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from splinelens._capture.spline_op import affine_piece, finite_on_flat, piece_index

Tensor = torch.Tensor


@dataclass(frozen=True)
class Sign:
    """ReLU, leaky ReLU, PReLU, abs and one-sided clamps: unit state = (pre-activation > t)."""

    kind: str
    neg_slope: float | None = 0.0  # slope of the piece below t (PReLU: its weight argument)
    threshold: float = 0.0
    pieces: int = 2

    def forward(self, args: Sequence[Any]) -> tuple[Tensor, Tensor]:
        z = args[0]
        state = z > self.threshold  # (at z == t the lower piece, as the geometry's argmax)
        if self.kind == "relu":  # native kernels whose gradient agrees with the state
            return torch.relu(z), state
        if self.kind == "leaky_relu":
            return F.leaky_relu(z, self.neg_slope or 0.0), state
        if self.kind == "prelu":
            return F.prelu(z, args[1]), state
        return self.frozen(args, state), state

    def frozen(self, args: Sequence[Any], state: Tensor) -> Tensor:
        z, t = args[0], self.threshold
        if self.kind == "clamp_min":
            return torch.where(state, z, z.new_tensor(t))
        if self.kind == "clamp_max":  # state True: above the cap, the constant piece
            return torch.where(state, z.new_tensor(t), z)
        return z * self.factor(args, state)  # one multiply: its gradient is one multiply too

    def factor(self, args: Sequence[Any], state: Tensor) -> Tensor:
        """The slope of each unit's piece: 1 above the threshold, the negative slope below."""
        z = args[0]
        if self.kind == "relu":
            return state.to(z.dtype)
        slope = args[1] if self.kind == "prelu" else z.new_tensor(self.neg_slope)
        if slope.numel() > 1 and z.dim() >= 2:
            slope = slope.view(1, -1, *([1] * (z.dim() - 2)))  # PReLU: one slope per channel
        return torch.where(state, z.new_ones(()), slope.to(z.dtype))

    def code(self, state: Tensor) -> Tensor:
        """The unit codes, 0 or 1: the boolean state itself (packed as bits without a copy)."""
        return state

    def shape(self, args: Sequence[Any]) -> tuple[bool, bool]:
        """(non-decreasing, convex) in z, given the op's argument values (PReLU's slopes).

        >>> Sign("relu").shape([]), Sign("abs", -1.0).shape([]), Sign("leaky_relu", 2.0).shape([])
        ((True, True), (False, True), (True, False))
        """
        if self.kind in ("relu", "clamp_min", "clamp_max", "abs"):
            return self.kind != "abs", self.kind != "clamp_max"
        slope = torch.as_tensor(args[1] if self.kind == "prelu" else self.neg_slope)
        return bool((slope >= 0).all()), bool((slope <= 1).all())


@dataclass(frozen=True)
class Clip:
    """Hardtanh / ReLU6 / two-sided clamp: three states, 0 below lo, 1 in between, 2 above hi.

    (Clamps with tensor bounds are a maximum and a minimum, ``rewrites.clamp_tensor``.)
    """

    kind: str
    lo: float
    hi: float
    pieces: int = 3

    def _bounds(self, args: Sequence[Any]) -> tuple[Tensor, Tensor]:
        z = args[0]
        return z.new_tensor(self.lo), z.new_tensor(self.hi)  # in z's dtype, not the default

    def forward(self, args: Sequence[Any]) -> tuple[Tensor, Tensor]:
        z = args[0]
        lo, hi = self._bounds(args)
        # (at or above hi: 2 also where lo == hi, a constant: z > lo would say 1, an empty piece)
        state = torch.where(z >= hi, 2, (z > lo).to(torch.uint8))
        if self.kind in ("hardtanh", "relu6"):  # its gradient is 1 exactly on lo < z < hi
            return F.hardtanh(z, self.lo, self.hi), state
        return self.frozen(args, state), state

    def frozen(self, args: Sequence[Any], state: Tensor) -> Tensor:
        z = args[0]
        lo, hi = self._bounds(args)
        return torch.where(state == 1, z, torch.where(state == 0, lo, hi))

    def code(self, state: Tensor) -> Tensor:
        return state

    def shape(self, args: Sequence[Any]) -> tuple[bool, bool]:
        """(non-decreasing, convex) in z, given the op's argument values."""
        return True, False


@dataclass(frozen=True)
class Pairwise:
    """Elementwise max / min of two activations (or an activation and a constant)."""

    kind: str  # "maximum" or "minimum"
    pieces: int = 2

    def forward(self, args: Sequence[Any]) -> tuple[Tensor, Tensor]:
        a, b = torch.broadcast_tensors(args[0], args[1].to(args[0].dtype))
        state = a >= b if self.kind == "maximum" else a <= b  # True: the first argument wins
        return torch.where(state, a, b), state

    def frozen(self, args: Sequence[Any], state: Tensor) -> Tensor:
        return torch.where(state, args[0], args[1].to(args[0].dtype))

    def code(self, state: Tensor) -> Tensor:
        return state.to(torch.uint8)

    def shape(self, args: Sequence[Any]) -> tuple[bool, bool]:
        """(non-decreasing, convex) in z, given the op's argument values."""
        return True, self.kind == "maximum"


@dataclass(frozen=True)
class Reduce:
    """Max / min over dimensions (channel max, maxout): the state is the winner's flat position."""

    kind: str
    dims: tuple[int, ...]
    keepdim: bool
    largest: bool
    pieces: int

    def flat(self, z: Tensor) -> Tensor:
        dims = [d % z.dim() for d in self.dims]
        moved = z.movedim(dims, list(range(z.dim() - len(dims), z.dim())))
        return moved.flatten(z.dim() - len(dims))  # (..., prod(reduced dims))

    def _shape(self, out: Tensor, z: Tensor) -> Tensor:
        if not self.keepdim:
            return out
        for d in sorted(d % z.dim() for d in self.dims):
            out = out.unsqueeze(d)
        return out

    def forward(self, args: Sequence[Any]) -> tuple[Tensor, Tensor]:
        flat = self.flat(args[0])
        value, idx = flat.max(-1) if self.largest else flat.min(-1)
        return self._shape(value, args[0]), idx

    def frozen(self, args: Sequence[Any], state: Tensor) -> Tensor:
        out = self.flat(args[0]).gather(-1, state.unsqueeze(-1)).squeeze(-1)
        return self._shape(out, args[0])

    def code(self, state: Tensor) -> Tensor:
        return state

    def shape(self, args: Sequence[Any]) -> tuple[bool, bool]:
        """(non-decreasing, convex) in z: a max is both, a min non-decreasing and concave."""
        return True, self.largest


@dataclass(frozen=True)
class Pool:
    """Max-pooling, fixed or adaptive windows: the state is the flat input index of the argmax."""

    kind: str
    nd: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    ceil_mode: bool = False
    output_size: tuple[int, ...] = ()  # adaptive pooling only
    pieces: int = 0
    in_spatial: tuple[int, ...] = ()

    def forward(self, args: Sequence[Any]) -> tuple[Tensor, Tensor]:
        z = args[0]
        if self.output_size:
            fn = getattr(F, f"adaptive_max_pool{self.nd}d")
            return fn(z, self.output_size, return_indices=True)
        fn = getattr(F, f"max_pool{self.nd}d")
        return fn(
            z,
            self.kernel,
            self.stride,
            self.padding,
            self.dilation,
            ceil_mode=self.ceil_mode,
            return_indices=True,
        )

    def frozen(self, args: Sequence[Any], state: Tensor) -> Tensor:
        z = args[0].flatten(-self.nd)  # (N, C, prod(spatial))
        return z.gather(-1, state.flatten(-self.nd)).view(state.shape)

    def code(self, state: Tensor) -> Tensor:
        """Position of the argmax inside its window (row-major in window coordinates)."""
        if self._tiled():  # each input position lies in one window: a lookup table
            cache = self.__dict__.setdefault("_tables", {})
            if state.device not in cache:
                plane = torch.arange(math.prod(self.in_spatial), device=state.device)
                cache[state.device] = self._positions(plane)
            return cache[state.device].take(state)
        return self._positions(state)

    def shape(self, args: Sequence[Any]) -> tuple[bool, bool]:
        """(non-decreasing, convex) in z: a max over windows is both."""
        return True, True

    def _tiled(self) -> bool:
        """Windows tile the plane: fixed, stride = kernel, no padding, no dilation."""
        return (
            not self.output_size
            and self.stride == self.kernel
            and not any(self.padding)
            and all(d == 1 for d in self.dilation)
        )

    def _positions(self, state: Tensor) -> Tensor:
        """The position of input index ``state`` inside its window, computed axis by axis."""
        idx = state.to(torch.int32)  # flat index into the input plane; int32 halves the traffic
        tiled = not self.output_size and self.stride == self.kernel and not any(self.padding)
        pos = torch.zeros((), dtype=torch.int32, device=state.device)
        mult = 1
        for i in reversed(range(self.nd)):
            size = self.in_spatial[i]
            quot = _div(idx, size)
            coord, idx = idx - quot * size, quot
            if tiled and self.dilation[i] == 1:
                k = self.kernel[i]  # windows tile the plane: no grid needed
                rel = coord - _div(coord, k) * k
            else:
                grid = _axis(
                    torch.arange(state.shape[-self.nd + i], device=state.device, dtype=torch.int32),
                    i,
                    self.nd,
                )
                start, _ = self._window(grid, i)
                rel = (coord - start) // (1 if self.output_size else self.dilation[i])
            pos = pos + rel * mult
            mult *= self._window(torch.zeros(1, dtype=torch.int32), i)[1]
        return pos

    def _window(self, o: Tensor, i: int) -> tuple[Tensor, int]:
        if self.output_size:
            n_in, n_out = self.in_spatial[i], self.output_size[i]
            return (o * n_in) // n_out, adaptive_width(n_in, n_out)
        return o * self.stride[i] - self.padding[i], self.kernel[i]


def _div(a: Tensor, n: int) -> Tensor:
    """a // n for nonnegative integer tensors; a shift when n is a power of two."""
    return a >> (n.bit_length() - 1) if n & (n - 1) == 0 else a // n


def _axis(v: Tensor, i: int, nd: int) -> Tensor:
    return v.view(*([1] * i), -1, *([1] * (nd - i - 1)))


def adaptive_width(n_in: int, n_out: int) -> int:
    return max(math.ceil((o + 1) * n_in / n_out) - (o * n_in) // n_out for o in range(n_out))


@dataclass(frozen=True)
class Spline:
    """A spline activation (``sl.splinify``): K affine pieces split by K-1 knots, one unit each.

    Arguments as ``spline_activation``'s: (z, knots, slopes, intercepts, cells, cell_slopes,
    cell_intercepts, inv_step, first, flat_left, flat_right); the state is the piece,
    k = bucketize(z, knots).
    """

    kind: str
    pieces: int

    def forward(self, args: Sequence[Any]) -> tuple[Tensor, Tensor]:
        z, knots, cells = args[0], args[1], args[4]
        state = piece_index(z, knots, cells, args[7], args[8])
        return self.frozen(args, state), state

    def frozen(self, args: Sequence[Any], state: Tensor) -> Tensor:
        # (flat_left, flat_right: export leaves out one that is its default, False, and a
        # graph saved before them has neither)
        left, right = (bool(args[i]) if len(args) > i else False for i in (9, 10))
        return affine_piece(finite_on_flat(args[0], left, right), args[2], args[3], state)

    def code(self, state: Tensor) -> Tensor:
        return state

    def shape(self, args: Sequence[Any]) -> tuple[bool, bool]:
        """(non-decreasing, convex) in z, given its slopes (the third argument)."""
        slopes = args[2]
        return bool((slopes >= 0).all()), bool((slopes[1:] >= slopes[:-1]).all())


MasoOp = Sign | Clip | Pairwise | Reduce | Pool | Spline
