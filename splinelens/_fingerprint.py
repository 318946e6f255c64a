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

import functools
import math
from typing import NamedTuple

import torch
import torch.nn as nn

from splinelens._checks import check_finite
from splinelens._tensors import model_state, version

Tensor = torch.Tensor
_NATIVE_SUM = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_DIVERGED = "the model diverged?"
Groups = list[tuple[torch.dtype, list[Tensor], Tensor]]  # (dtype of the sums, views, weights)


class WeightsFingerprint(NamedTuple):
    """The model's state as ``check_model`` saw it: equal fingerprints mean unchanged weights.

    ``ids`` is (name, id, version counter, data pointer) of every floating tensor of
    ``model_state``. ``sums`` is each tensor's sum in its own dtype (float32 for float32 weights:
    10x cheaper than float64), or in a wider one where that sum overflows; in the wide
    fingerprint (``ModelTensors``) each piece's: a tensor of more than 8192 entries, or the
    smaller ones of a dtype and device joined. ``bits``, in the wide fingerprint, sums of the
    pieces' bit patterns weighted by position (``_bit_parts``): each row of a large tensor, each
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
        self.named = named
        self._key: list[tuple] = []
        self._plan: list[tuple[list[int], list[Tensor]]] = []  # per piece: indices, views

    def fingerprint(self) -> WeightsFingerprint:
        """The wide fingerprint of the tensors now (non-finite entries allowed)."""
        return self._fingerprint(check=False)

    def check(self) -> WeightsFingerprint:
        """``fingerprint()``, refusing NaN or inf as ``check_model`` does, from the same pass."""
        return self._fingerprint(check=True)

    def check_finite(self) -> None:
        """Refuse NaN or inf as ``check_model`` does (the float sums alone: half the pass)."""
        if not all_finite(self.sums()):  # which tensor, or only a sum that overflows?
            _checked_sums(self.named, check=True, fixed=False)

    def sums(self) -> list[Tensor]:
        """Each piece's sum in its own dtype, 0-d, not synchronised: all finite means every
        entry is (``all_finite``); else ``check_finite`` says which, or that a sum overflowed."""
        return _sum_parts(self._pieces())

    def ids(self) -> tuple[tuple[str, int, int, int], ...]:
        """(name, id, version counter, data pointer) of each tensor, as in a fingerprint."""
        return _ids(self.named)

    def _fingerprint(self, check: bool) -> WeightsFingerprint:
        pieces = self._pieces()
        sums = _stacked(_sum_parts(pieces, fixed=True)) if pieces else []
        for i, s in enumerate(sums):
            if not math.isfinite(s):  # NaN or inf entries, or only a sum that overflows?
                if check:
                    for j in self._plan[i][0]:
                        name, t = self.named[j]
                        check_finite(f"model parameter or buffer '{name}'", t.detach(), _DIVERGED)
                sums[i] = _wide_sum(pieces[i])
        bits = tuple(_stacked(_bit_parts(_bit_groups(pieces)))) if pieces else ()
        return WeightsFingerprint(self.ids(), tuple(sums), bits)

    def _pieces(self) -> list[Tensor]:
        """What is summed: each large tensor, and the small ones of a dtype and device joined."""
        key = [(t.data_ptr(), t.shape, t.stride(), t.dtype) for _, t in self.named]
        if key != self._key:
            self._key, self._plan = key, _plan(self.named)
        return [views[0] if len(views) == 1 else torch.cat(views) for _, views in self._plan]


_SMALL = 8192  # entries: a tensor this small is summed with the others of its dtype and device


def _plan(named: list[tuple[str, Tensor]]) -> list[tuple[list[int], list[Tensor]]]:
    """The pieces of ``ModelTensors``: (indices in ``named``, detached views) of each tensor of
    more than ``_SMALL`` entries (or not contiguous), then of the others by dtype and device,
    flattened to be joined."""
    plan: list[tuple[list[int], list[Tensor]]] = []
    small: dict[tuple[torch.dtype, torch.device], tuple[list[int], list[Tensor]]] = {}
    for i, (_, t) in enumerate(named):
        t = t.detach()
        if t.numel() > _SMALL or not t.is_contiguous():
            plan.append(([i], [t]))
        else:
            idx, views = small.setdefault((t.dtype, t.device), ([], []))
            idx.append(i)
            views.append(t.view(-1))
    return plan + list(small.values())


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
    sums = _stacked(_sum_parts(tensors, fixed)) if tensors else []
    if not all(map(math.isfinite, sums)):
        for i, (name, t) in enumerate(named):
            if not math.isfinite(sums[i]):
                if check:  # NaN or inf entries, or only a sum that overflows?
                    check_finite(f"model parameter or buffer '{name}'", t.detach(), _DIVERGED)
                sums[i] = _wide_sum(t.detach())
    return sums


def _ids(named: list[tuple[str, Tensor]]) -> tuple[tuple[str, int, int, int], ...]:
    """(name, id, version counter, data pointer) of each tensor."""
    try:
        return tuple([(name, id(t), t._version, t.data_ptr()) for name, t in named])
    except RuntimeError:  # inference tensors have no version counter
        return tuple([(name, id(t), version(t), t.data_ptr()) for name, t in named])


def _wide_sum(t: Tensor) -> float:
    """The sum of a tensor whose sum overflows its dtype, in a wider one (float64 as a sum of
    ``t * 2**-64``): float32 for 16-bit floats (65504 at most), float64 for float32."""
    if t.dtype == torch.float64:
        return float(fixed_sum(t.mul(2.0**-64)))
    return float(fixed_sum(t, torch.float32 if t.element_size() < 4 else torch.float64))


def _sum_parts(tensors: list[Tensor], fixed: bool = False) -> list[Tensor]:
    """Each tensor's sum in its own dtype (float64 for others), 0-d; ``fixed``: the same for
    any number of threads (``fixed_sum``), for fingerprints compared later."""
    with torch.no_grad():
        parts = []
        for t in tensors:
            dt = None if t.dtype in _NATIVE_SUM else torch.float64
            parts.append(fixed_sum(t, dt) if fixed else t.sum(dtype=dt))
        return parts


_CHUNK = 32768  # ATen's grain size: a reduction of this many entries runs on one thread


def fixed_sum(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """t's sum, 0-d, independent of the number of threads: sums of its rows or of fixed chunks,
    each on one thread, added in order (a plain sum of a million float32 entries differs in its
    last bits between 1 and 2 threads).

    >>> t, threads = torch.randn(1_000_003), torch.get_num_threads()
    >>> torch.set_num_threads(1); one = fixed_sum(t)
    >>> torch.set_num_threads(2); two = fixed_sum(t)
    >>> torch.set_num_threads(threads); bool(one == two)
    True
    """
    t = t.detach()
    if t.numel() <= _CHUNK:
        return t.sum(dtype=dtype)
    if t.dim() > 1 and t.shape[0] <= _CHUNK and t.numel() // t.shape[0] <= _CHUNK:
        return t.reshape(t.shape[0], -1).sum(1, dtype=dtype).sum()  # rows: one thread each
    flat = t.reshape(-1)
    k = flat.numel() // _CHUNK
    head = flat[: k * _CHUNK].view(k, _CHUNK).sum(1, dtype=dtype)  # (k,) one thread each
    return fixed_sum(head) + flat[k * _CHUNK :].sum(dtype=dtype)


def all_finite(parts: list[Tensor]) -> bool:
    """Whether every 0-d tensor in ``parts`` is finite, with one synchronisation per device.

    >>> all_finite([torch.tensor(1.0), torch.tensor(2, dtype=torch.float64)])
    True
    """
    return all(map(math.isfinite, _stacked(parts))) if parts else True


# element size -> (integer dtype of the same width, dtype of its sum)
_BITS = {
    8: (torch.int64, torch.int64),
    4: (torch.int32, torch.int32),
    2: (torch.int16, torch.int32),
    1: (torch.int8, torch.int32),
}


def _int_view(t: Tensor) -> tuple[Tensor, torch.dtype]:
    """``t``'s bit patterns as integers of its width, and the dtype their sum is taken in: the
    sum modulo 2^32 (2^64 for 8-byte floats) changes with any one entry (the difference of two
    patterns is nonzero and smaller than the modulus). (An int64 sum of int32s is 5x slower.)

    >>> a = torch.tensor([1.0, 2.0])
    >>> b = a.nextafter(torch.tensor(3.0))  # one ulp up each
    >>> v, dt = _int_view(a)
    >>> bool(v.sum(dtype=dt) != _int_view(b)[0].sum(dtype=dt))
    True
    """
    ints = _BITS.get(t.element_size()) if t.is_floating_point() else None
    if ints is None:  # (no such floating tensors in PyTorch today)
        return t.detach(), torch.float64
    return t.detach().view(ints[0]), ints[1]


_ROWS = 1 << 22  # the most rows (or entries of a vector) whose order a fingerprint sees


def _bit_groups(tensors: list[Tensor]) -> Groups:
    """The integer views of the tensors' bit patterns (``_int_view``) by dtype of their sum and
    device, each group with fixed odd weights, one per row (``_rows``)."""
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        if t.numel():
            v, dt = _int_view(t)
            groups.setdefault((dt, v.device), []).append(v)
    return [
        (dt, views, _odd_weights(sum(map(_row_count, views)), dt, device))
        for (dt, device), views in groups.items()
    ]


def _bit_parts(groups: Groups) -> list[Tensor]:
    """0-d sums of bit patterns that see a change of any one entry and a permutation of rows:
    per group (``_bit_groups``), the sum of every tensor's row sums (a vector's entries) times
    fixed odd weights by position, in integers that wrap. An odd weight is invertible modulo
    2^32 (2^64): a change of one entry changes the sum; a permutation of rows (units, channels:
    neurons permuted through ``.data``) moves row sums to other weights. Integers add exactly:
    the same for any number of threads.

    >>> w = torch.randn(4, 3)
    >>> perm = w[[1, 0, 2, 3]]  # two rows swapped: a plain sum cannot tell
    >>> _bit_parts(_bit_groups([w]))[0] != _bit_parts(_bit_groups([perm]))[0]
    tensor(True)
    """
    return [(torch.cat([_rows(v, dt) for v in views]) * w).sum(dtype=dt) for dt, views, w in groups]


def _row_count(v: Tensor) -> int:
    """How many entries ``_rows`` returns for v."""
    shape = v.shape
    return 1 if not shape or shape[0] > _ROWS else shape[0]


def _rows(v: Tensor, dt: torch.dtype) -> Tensor:
    """(rows,) sums of v's rows in dt: its entries if a vector, its total past ``_ROWS`` rows."""
    shape = v.shape
    if not shape or shape[0] > _ROWS:
        return v.sum(dtype=dt).reshape(1)
    if len(shape) == 1:
        return v if v.dtype == dt else v.to(dt)
    return v.reshape(shape[0], -1).sum(1, dtype=dt)


@functools.lru_cache(maxsize=4)
def _odd_weights(n: int, dt: torch.dtype, device: torch.device) -> Tensor:
    """(n,) fixed odd integers of dtype dt (int32 or int64), scattered by a Weyl sequence."""
    k = torch.arange(1, n + 1, dtype=torch.int64) * -7046029254386353131  # (2^64 / phi, wraps)
    if dt != torch.int64:
        k = k >> 32  # the high half: in dt's range
    return (k | 1).to(dt).to(device)


def _stacked(parts: list[Tensor]) -> list[float]:
    """The values of 0-d tensors, with one synchronisation per device."""
    try:
        return torch.stack(parts).tolist()  # (promoted to the widest dtype: exact)
    except RuntimeError:  # on several devices
        return _stack_per_device(parts)


def _stack_per_device(parts: list[Tensor]) -> list[float]:
    """The values of 0-d tensors on several devices: one stack and one ``tolist`` per device."""
    by_device: dict[torch.device, list[int]] = {}
    for i, p in enumerate(parts):
        by_device.setdefault(p.device, []).append(i)
    sums = [0.0] * len(parts)
    for idx in by_device.values():
        for i, s in zip(idx, torch.stack([parts[i] for i in idx]).tolist(), strict=True):
            sums[i] = s
    return sums
