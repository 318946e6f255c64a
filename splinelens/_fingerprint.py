"""Whether a model's tensors are finite, and a fingerprint that sees whether they changed.

``check_model`` refuses NaN or inf among the model's floating tensors (``model_state``), naming
the tensor and the index; fingerprints (``WeightsFingerprint``, ``ModelTensors``) see whether
they changed, also through ``.data``, which version counters miss. The wide fingerprint's sums
(``ModelTensors``, what maps compare) do not depend on the number of threads: one taken with one
thread compares equal with one taken with two.

>>> import torch.nn as nn
>>> net = nn.Linear(2, 1)
>>> net.weight.data[0, 1] = float("nan")
>>> ModelTensors(list(model_state(net))).check()
Traceback (most recent call last):
...
ValueError: model parameter or buffer 'weight' holds nan at index (0, 1); ...
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn

from splinelens._checks import check_finite
from splinelens._sums import (
    BITS,
    CHUNK,
    NATIVE_SUM,
    ROWS,
    all_finite,
    fixed_sum,
    int_view,
    odd_weights,
    row_count,
    row_sums,
    stacked,
    sum_parts,
    wide_sum,
)
from splinelens._tensors import model_state, version

Tensor = torch.Tensor
_DIVERGED = "the model diverged?"
Groups = tuple[torch.dtype, list[int], Tensor]  # (dtype of a bit sum, its pieces, odd weights)


class WeightsFingerprint(NamedTuple):
    """The model's state as ``check_model`` saw it: equal fingerprints mean unchanged weights.

    ``ids`` is (name, id, version counter, data pointer) of every floating tensor of
    ``model_state``. ``sums`` is each tensor's sum in its own dtype (float32 for float32 weights:
    10x cheaper than float64), or in a wider one where that sum overflows; in the wide
    fingerprint (``ModelTensors``) each piece's: a tensor of more than 8192 entries, or the
    smaller ones of a dtype and device joined. ``bits``, in the wide fingerprint, sums of the
    pieces' bit patterns weighted by position (``_piece_groups``): each row of a large tensor, each
    entry of the joined small ones. A change is seen if it replaces a tensor, goes through an
    in-place op (the version counter), moves its data, or alters a sum: a write through ``.data``
    is seen by the sums alone. The bit sums see a change of any one entry, a permutation of the
    small tensors' entries (but for swaps of x and -x), and a permutation along a large tensor's
    first axis (the units or
    channels of a linear or conv layer, permuted as weight matching does); the float sums see
    sign flips (unless the flipped entries sum to zero) and scalings. A change that keeps both
    is not seen: a large tensor permuted along another axis alone (a transposed conv's output
    channels, without its bias), or along more than 4M rows.
    """

    ids: tuple[tuple[str, int, int, int], ...]
    sums: tuple[float, ...]
    bits: tuple[int, ...] = ()

    def same_values(self, other: WeightsFingerprint) -> bool:
        """Whether ``other`` saw the same tensors holding the same values, wherever their data
        lie (``share_memory()`` moves it and keeps the values)."""
        return (
            placeless(self.ids) == placeless(other.ids)
            and self.sums == other.sums
            and self.bits == other.bits
        )


def placeless(ids: tuple[tuple[str, int, int, int], ...]) -> tuple[tuple[str, int, int], ...]:
    """(name, id, version) of each tensor: the ids without data pointers."""
    return tuple((name, i, v) for name, i, v, _ in ids)


class ModelTensors:
    """A model's floating tensors (``model_state``, as (name, tensor)) and their wide fingerprint
    (``weights_fingerprint(..., wide=True)``), summed by pieces: each tensor of more than
    ``_SMALL`` entries alone, the smaller ones of each dtype and device from one concatenation
    (the sums of a network's many biases and batchnorm vectors are bound by kernel launches).
    The pieces are planned again whenever a tensor's storage moved or its layout changed
    (``.data`` re-bound, ``set_``, ``as_strided``).

    >>> net = nn.Linear(2, 1)
    >>> tensors = ModelTensors(list(model_state(net)))
    >>> before = tensors.check()
    >>> net.weight.data[0, 0] += 1e-7  # through .data: no version bump
    >>> tensors.fingerprint() == before
    False
    """

    def __init__(self, named: list[tuple[str, Tensor]]) -> None:
        # parameters held weakly (a cached view holds these, and a parameter's gradient hook
        # may be a method of the model; one replaced and freed is a change, as its ids say),
        # other tensors as they are (a recomputed attribute, a pruned ``weight``, is bound anew
        # at each forward: the one captured stays the one checked)
        self._refs = [(name, _ref(t), id(t)) for name, t in named]
        # (layout key, pieces, groups of the bit sums), replaced as one (threads share a view)
        self._planned: tuple[list[tuple], list[_Piece], list[Groups]] = ([], [], [])

    @property
    def named(self) -> list[tuple[str, Tensor]]:
        """(name, tensor) of each tensor that still exists (a parameter may not)."""
        return [(name, t) for name, r, _ in self._refs if (t := r()) is not None]

    def fingerprint(self) -> WeightsFingerprint:
        """The wide fingerprint of the tensors now (non-finite entries allowed)."""
        return self._fingerprint(check=False)

    def check(self) -> WeightsFingerprint:
        """``fingerprint()``, refusing NaN or inf as ``check_model`` does, from the same pass."""
        return self._fingerprint(check=True)

    def check_finite(self) -> None:
        """Refuse NaN or inf as ``check_model`` does (the float sums alone: half the pass)."""
        named = self.named
        if not all_finite(sum_parts(self._pieces(named)[2])):  # which one, or an overflow?
            _checked_sums(named, check=True, fixed=False)

    def sums(self) -> list[Tensor]:
        """Each piece's sum in its own dtype, 0-d, not synchronised: all finite means every
        entry is (``all_finite``); else ``check_finite`` says which, or that a sum overflowed."""
        return sum_parts(self._pieces(self.named)[2])

    def ids(self) -> tuple[tuple[str, int, int, int], ...]:
        """(name, id, version counter, data pointer) of each tensor, as in a fingerprint; (name,
        id, -1, 0) for one that no longer exists."""
        now = [(name, i, r()) for name, r, i in self._refs]
        live = iter(_ids([(name, t) for name, _, t in now if t is not None]))
        return tuple([(n, i, -1, 0) if t is None else next(live) for n, i, t in now])

    def _fingerprint(self, check: bool) -> WeightsFingerprint:
        named = self.named
        plan, groups, joined = self._pieces(named)
        if not joined:
            return WeightsFingerprint(self.ids(), (), ())
        sums = stacked([p.float_sum(t) for p, t in zip(plan, joined, strict=True)])
        for i, s in enumerate(sums):
            if not math.isfinite(s):  # NaN or inf entries, or only a sum that overflows?
                if check:
                    for j in plan[i].idx:
                        name, t = named[j]
                        check_finite(f"model parameter or buffer '{name}'", t.detach(), _DIVERGED)
                sums[i] = wide_sum(joined[i])
        rows = [p.bit_rows(t) for p, t in zip(plan, joined, strict=True)]
        bits = [(torch.cat([rows[i] for i in ix]) * w).sum(dtype=dt) for dt, ix, w in groups]
        return WeightsFingerprint(self.ids(), tuple(sums), tuple(stacked(bits)) if bits else ())

    def _pieces(
        self, named: list[tuple[str, Tensor]]
    ) -> tuple[list[_Piece], list[Groups], list[Tensor]]:
        """The plan of ``named`` (``self.named``), its groups, and what is summed: each large
        tensor, and the small ones of a dtype and device joined (planned again when a tensor's
        layout or storage changed, or one no longer exists)."""
        key = [(t.data_ptr(), t.shape, t.stride(), t.dtype) for _, t in named]
        planned = self._planned
        if key != planned[0]:
            plan = _plan(named)
            planned = self._planned = (key, plan, _piece_groups(plan))
        return planned[1], planned[2], [p.tensor() for p in planned[1]]


def _ref(t: Tensor) -> Callable[[], Tensor | None]:
    """A weak reference to a parameter, a holder of any other tensor (called alike)."""
    return weakref.ref(t) if isinstance(t, nn.Parameter) else lambda: t


_SMALL = 8192  # entries: a tensor this small is summed with the others of its dtype and device


def _plan(named: list[tuple[str, Tensor]]) -> list[_Piece]:
    """The pieces of ``ModelTensors``: each tensor of more than ``_SMALL`` entries (or not
    contiguous) alone, then the others by dtype and device, flattened to be joined."""
    plan: list[_Piece] = []
    small: dict[tuple[torch.dtype, torch.device], _Piece] = {}
    for i, (_, t) in enumerate(named):
        t = t.detach()
        if t.numel() > _SMALL or not t.is_contiguous():
            plan.append(_Piece([i], [t]))
        else:
            piece = small.setdefault((t.dtype, t.device), _Piece([], []))
            piece.idx.append(i)
            piece.views.append(t.view(-1))
    return [piece.prepare() for piece in plan + list(small.values())]


class _Piece:
    """One piece of ``ModelTensors``: its indices in ``named`` and the detached views joined at
    each call (one view: a large tensor alone), with the views of a large contiguous tensor that
    ``fixed_sum`` and ``row_sums`` read made once (views: they follow writes to its data)."""

    def __init__(self, idx: list[int], views: list[Tensor]) -> None:
        self.idx, self.views = idx, views
        self._floats: Tensor | None = None  # (rows, cols): summed by rows (``fixed_sum``)
        self._ints: Tensor | None = None  # (rows, cols) of its bit patterns (``row_sums``)

    def prepare(self) -> _Piece:
        """Make the views of a large contiguous tensor once (the rest is read per call)."""
        t = self.views[0]
        if len(self.views) > 1 or not t.is_contiguous() or t.dim() < 2:
            return self
        rows, cols = t.shape[0], t.numel() // max(t.shape[0], 1)
        if t.numel() > CHUNK and rows <= CHUNK and cols <= CHUNK:
            self._floats = t.view(rows, cols)
        if rows <= ROWS and t.is_floating_point() and t.element_size() in BITS:
            self._ints = int_view(t)[0].view(rows, cols)
        return self

    def tensor(self) -> Tensor:
        """The piece now: the large tensor, or the small ones joined (a copy)."""
        return self.views[0] if len(self.views) == 1 else torch.cat(self.views)

    def float_sum(self, t: Tensor) -> Tensor:
        """``fixed_sum`` of the piece ``t`` (``tensor()``) in its dtype (float64 for others)."""
        dt = None if t.dtype in NATIVE_SUM else torch.float64
        if self._floats is not None:
            return self._floats.sum(1, dtype=dt).sum()
        return fixed_sum(t, dt)

    def bit_rows(self, t: Tensor) -> Tensor:
        """``row_sums`` of the piece's bit patterns (``int_view``)."""
        if self._ints is not None:
            return self._ints.sum(1, dtype=BITS[t.element_size()][1])
        v, dt = int_view(t)
        return row_sums(v, dt)


def _piece_groups(plan: list[_Piece]) -> list[Groups]:
    """The groups of the bit sums, by dtype of the sum and device: (that dtype, the indices of
    the group's non-empty pieces in ``plan``, fixed odd weights, one per row of those pieces).

    A group's bit sum, the sum of its pieces' row sums of bit patterns (``row_sums``; the entries
    of the joined small tensors) times the weights, in integers that wrap, sees a change of any
    one entry and a permutation of rows: an odd weight is invertible modulo 2^32 (2^64), and a
    permutation of rows (units, channels: neurons permuted through ``.data``) moves row sums to
    other weights. Integers add exactly: the same for any number of threads.
    """
    groups: dict[tuple[torch.dtype, torch.device], tuple[list[int], int]] = {}
    for i, piece in enumerate(plan):
        numel = sum(v.numel() for v in piece.views)
        if numel:
            v, dt = int_view(piece.views[0])
            joined_rows = 1 if numel > ROWS else numel  # (row_count of the joined vector)
            rows = row_count(v) if len(piece.views) == 1 else joined_rows
            idx, n = groups.get((dt, v.device), ([], 0))
            groups[(dt, v.device)] = ([*idx, i], n + rows)
    return [(dt, idx, odd_weights(n, dt, dev)) for (dt, dev), (idx, n) in groups.items()]


def check_model(
    model: nn.Module, named: list[tuple[str, Tensor]] | None = None, wide: bool = False
) -> WeightsFingerprint:
    """Refuse NaN or inf anywhere in the model's state, naming the tensor and the index, and
    return its fingerprint, in one pass: one sum per tensor in its own dtype, one synchronisation
    per device, and a search for the bad entry only where a sum is not finite (a sum that
    overflows while every entry is finite is not refused).

    >>> import torch.nn as nn
    >>> net = nn.Linear(2, 1)
    >>> before = check_model(net)
    >>> with torch.no_grad():
    ...     net.weight.data[0, 0] += 1.0  # through .data: no version bump, but the sum moves
    >>> check_model(net) == before
    False
    >>> net.weight.data[0, 1] = float("inf")
    >>> check_model(net)
    Traceback (most recent call last):
    ...
    ValueError: model parameter or buffer 'weight' holds inf at index (0, 1); ...

    ``named``: the model's ``model_state`` if already known (it is while the model's
    ``structure`` is unchanged, which records those tensors by identity). ``wide``: return
    ``weights_fingerprint(..., wide=True)`` instead, from the same pass.
    """
    if not wide:
        return _fingerprint(model, check=True, named=named)
    return ModelTensors(_named(model, named)).check()


def weights_fingerprint(
    model: nn.Module, named: list[tuple[str, Tensor]] | None = None, wide: bool = False
) -> WeightsFingerprint:
    """``check_model``'s fingerprint without the check (a non-finite sum stays in it).

    ``wide``: ``ModelTensors``'s, with sums of the bit patterns (as integers of their width,
    wrapping), which see a change of any one entry of any floating dtype, however small (a
    float64 sum of float32 weights costs 5-10x a float32 sum, and misses changes below its
    rounding in float64 tensors); the float sums see most of what the bit sums miss (a sign flip
    of an even number of entries adds a multiple of the modulus): for maps whose states are
    recorded.
    """
    if wide:
        return ModelTensors(_named(model, named)).fingerprint()
    return _fingerprint(model, check=False, named=named)


def check_model_finite(model: nn.Module) -> None:
    """Refuse NaN or inf anywhere in the model's state (``check_model`` without its result)."""
    _checked_sums(_named(model, None), check=True, fixed=False)


def _named(model: nn.Module, named: list[tuple[str, Tensor]] | None) -> list[tuple[str, Tensor]]:
    """``named`` if given, else the model's ``model_state`` as a list."""
    return named if named is not None else list(model_state(model))


def _fingerprint(
    model: nn.Module | None, check: bool, named: list[tuple[str, Tensor]] | None = None
) -> WeightsFingerprint:
    """Native-dtype sums of each of ``named`` or the model's tensors (``check``: refusing
    non-finite entries)."""
    named = _named(model, named)  # type: ignore[arg-type]
    return WeightsFingerprint(_ids(named), tuple(_checked_sums(named, check, fixed=False)))


def _checked_sums(named: list[tuple[str, Tensor]], check: bool, fixed: bool) -> list[float]:
    """Each tensor's sum in its own dtype (``fixed``: ``fixed_sum``), in a wider one where it
    overflows; ``check``: refusing NaN or inf entries, by name and index."""
    tensors = [t for _, t in named]
    sums = stacked(sum_parts(tensors, fixed)) if tensors else []
    if not all(map(math.isfinite, sums)):
        for i, (name, t) in enumerate(named):
            if not math.isfinite(sums[i]):
                if check:  # NaN or inf entries, or only a sum that overflows?
                    check_finite(f"model parameter or buffer '{name}'", t.detach(), _DIVERGED)
                sums[i] = wide_sum(t.detach())
    return sums


def _ids(named: list[tuple[str, Tensor]]) -> tuple[tuple[str, int, int, int], ...]:
    """(name, id, version counter, data pointer) of each tensor."""
    try:
        return tuple([(name, id(t), t._version, t.data_ptr()) for name, t in named])
    except RuntimeError:  # inference tensors have no version counter
        return tuple([(name, id(t), version(t), t.data_ptr()) for name, t in named])
