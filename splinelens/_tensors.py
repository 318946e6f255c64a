"""The model's tensors: where they are, whether they are finite, and a fingerprint of them.

Every floating parameter, buffer and tensor attribute the model computes with (``model_state``);
``check_model`` refuses NaN or inf among them, naming the tensor and the index; fingerprints
(``WeightsFingerprint``, ``ModelTensors``) see whether they changed, also through ``.data``.

>>> import torch.nn as nn
>>> net = nn.Linear(2, 1)
>>> [name for name, _ in model_state(net)]
['weight', 'bias']
>>> tensors = ModelTensors(list(model_state(net)))
>>> before = tensors.check()
>>> net.weight.data[0, 0] += 1e-7  # through .data: no version bump
>>> tensors.fingerprint() == before
False
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn as nn

from splinelens._checks import check_finite
from splinelens._structure import added_attributes, module_list

Tensor = torch.Tensor
_REGISTERED = ("_parameters", "_buffers", "_modules")  # a module's own bookkeeping
_CONTAINERS = frozenset({list, tuple, dict})  # looked into for tensors (model_state)
_NO_TENSORS = frozenset({int, float, bool, str, bytes, type(None), torch.dtype, torch.device})
_NATIVE_SUM = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_DIVERGED = "the model diverged?"


def model_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Every floating parameter and buffer of ``model``, with its qualified name."""
    params, buffers, _ = _state(model, attributes=False)
    yield from params
    yield from buffers


def model_dtype(model: nn.Module) -> tuple[torch.dtype, torch.device] | None:
    """(dtype, device) of the model's first floating parameter or buffer; None if it has none."""
    t = next((t for _, t in model_tensors(model)), None)
    return None if t is None else (t.dtype, t.device)


def model_state(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Every floating tensor the model computes with: parameters, buffers and the tensor
    attributes of its modules, also inside lists, tuples and dicts (constants of the graph)."""
    params, buffers, attributes = _state(model)
    yield from params
    yield from buffers
    yield from attributes


def _state(model: nn.Module, attributes: bool = True) -> tuple[list, list, list]:
    """model_state as three lists (parameters, buffers, attributes) from one walk of the tree:
    each parameter and buffer once (as ``named_parameters`` and ``named_buffers``)."""
    params: list[tuple[str, Tensor]] = []
    buffers: list[tuple[str, Tensor]] = []
    attrs: list[tuple[str, Tensor]] = []
    seen_params: set[int] = set()
    seen_buffers: set[int] = set()
    for prefix, m in module_list(model):
        dot = f"{prefix}." if prefix else ""
        _registered(m._parameters, dot, seen_params, params)
        _registered(m._buffers, dot, seen_buffers, buffers)
        if attributes:
            d = vars(m)
            items = added_attributes(d)  # (nn.Module's own hold no tensors)
            for k, v in d.items() if items is None else items:
                if type(v) not in _NO_TENSORS and k not in _REGISTERED:
                    _float_tensors_in(dot + k, v, attrs)
    return params, buffers, attrs


def _registered(d: dict[str, Tensor | None], dot: str, seen: set[int], out: list) -> None:
    """Append the floating tensors of a ``_parameters`` or ``_buffers`` dict not seen before."""
    for k, t in d.items():
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        if t.is_floating_point() and not isinstance(t, nn.parameter.UninitializedTensorMixin):
            out.append((dot + k, t))


def _float_tensors_in(name: str, v: object, out: list, depth: int = 0) -> None:
    """Append the floating tensors in v (also inside lists, tuples and dicts) with their names."""
    if isinstance(v, Tensor):
        if v.is_floating_point():
            out.append((name, v))
    elif depth < 4 and type(v) in _CONTAINERS:
        if type(v) is not dict and _NO_TENSORS.issuperset(map(type, v)):
            return  # kernel sizes, strides, paddings
        items = v.items() if type(v) is dict else enumerate(v)
        for k, u in items:
            if type(u) not in _NO_TENSORS:
                key = repr(k) if type(v) is dict else k
                _float_tensors_in(f"{name}[{key}]", u, out, depth + 1)


class WeightsFingerprint(NamedTuple):
    """The model's state as ``check_model`` saw it: equal fingerprints mean unchanged weights.

    ``ids`` is (name, id, version counter, data pointer) of every floating tensor of
    ``model_state``. ``sums`` is each tensor's sum in its own dtype (float32 for float32 weights:
    10x cheaper than float64), or in a wider one where that sum overflows; ``bits``, in the
    wide fingerprint (``ModelTensors``), the sum of its bit patterns. A change is seen if it
    replaces a tensor, goes through an in-place op (the version counter), moves its data, or
    alters a sum: a write through ``.data`` is seen by the sums alone. The bit sums see a change
    of any one entry, the float sums sign flips (unless the flipped entries sum to zero) and
    scalings; a change that keeps both (a permutation of a tensor's entries) is not seen.
    """

    ids: tuple[tuple[str, int, int, int], ...]
    sums: tuple[float, ...]
    bits: tuple[int, ...] = ()


class ModelTensors:
    """A model's floating tensors (``model_state``, as (name, tensor)) and their wide fingerprint
    (``weights_fingerprint(..., wide=True)``), with the integer views of their bit patterns made
    once: two reductions per tensor per call. The views are made again whenever a tensor's
    storage moved or its layout changed (``.data`` re-bound, ``set_``, ``as_strided``).

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
        self._ints: list[tuple[Tensor, torch.dtype]] = []  # (integer view, dtype of its sum)

    def fingerprint(self) -> WeightsFingerprint:
        """The wide fingerprint of the tensors now (non-finite entries allowed)."""
        return _fingerprint(None, check=False, named=self.named, ints=self._views())

    def check(self) -> WeightsFingerprint:
        """``fingerprint()``, refusing NaN or inf as ``check_model`` does, from the same pass."""
        return _fingerprint(None, check=True, named=self.named, ints=self._views())

    def check_finite(self) -> None:
        """Refuse NaN or inf as ``check_model`` does (its float sums alone: half the pass)."""
        _checked_sums(self.named, check=True, fixed=False)

    def sums(self) -> list[Tensor]:
        """Each tensor's sum in its own dtype, 0-d, not synchronised: all finite means every
        entry is (``all_finite``); else ``check_finite`` says which, or that a sum overflowed."""
        return _sum_parts([t for _, t in self.named])

    def ids(self) -> tuple[tuple[str, int, int, int], ...]:
        """(name, id, version counter, data pointer) of each tensor, as in a fingerprint."""
        return _ids(self.named)

    def _views(self) -> list[tuple[Tensor, torch.dtype]]:
        key = [(t.data_ptr(), t.shape, t.stride(), t.dtype) for _, t in self.named]
        if key != self._key:
            self._key, self._ints = key, [_int_view(t) for _, t in self.named]
        return self._ints


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

    ``wide``: also the sums of each tensor's bit patterns (as integers of its width, wrapping),
    which see a change of any one entry of any floating dtype, however small (a float64 sum of
    float32 weights costs 5-10x a float32 sum, and misses changes below its rounding in float64
    tensors); the float sums see most of what the bit sums miss (a sign flip of an even number of
    entries adds a multiple of the modulus): for maps whose states are recorded.
    """
    if wide:
        return ModelTensors(_named(model, named)).fingerprint()
    return _fingerprint(model, check=False, named=named)


def check_model_finite(model: nn.Module) -> None:
    """Refuse NaN or inf anywhere in the model's state (``check_model`` without its result)."""
    _checked_sums(_named(model, None), check=True, fixed=False)


def _named(model: nn.Module, named: list[tuple[str, Tensor]] | None) -> list[tuple[str, Tensor]]:
    """``named`` if given, else the model's ``model_state`` as a list."""
    if named is not None:
        return named
    params, buffers, attributes = _state(model)
    return params + buffers + attributes


def _fingerprint(
    model: nn.Module | None,
    check: bool,
    named: list[tuple[str, Tensor]] | None = None,
    ints: list[tuple[Tensor, torch.dtype]] | None = None,
) -> WeightsFingerprint:
    """Native-dtype sums (``check``: refusing non-finite entries) of ``named`` or the model's,
    and the bit-pattern sums of ``ints`` (``_int_view`` of each)."""
    named = _named(model, named)  # type: ignore[arg-type]
    sums = _checked_sums(named, check, fixed=ints is not None)  # (kept for later: fixed)
    bits = tuple(_stacked([v.sum(dtype=dt) for v, dt in ints])) if ints else ()
    return WeightsFingerprint(_ids(named), tuple(sums), bits)


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


def version(t: Tensor) -> int:
    """t's version counter (bumped by every in-place op on it); -1 for an inference tensor."""
    return -1 if t.is_inference() else t._version


def _sums(tensors: list[Tensor]) -> list[float]:
    """Each tensor's sum in its own dtype, with one synchronisation per device."""
    return _stacked(_sum_parts(tensors)) if tensors else []


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


def float64_copy(model: nn.Module) -> nn.Module:
    """``model`` itself if every floating tensor in it is float64, else a float64 deep copy.

    Parameters, buffers and plain tensor attributes (constants used by ``forward``) are all
    converted, so a model whose weights are buffers works too.
    """
    if all(t.dtype == torch.float64 for _, t in model_state(model)):
        return model
    model = copy.deepcopy(model).double()
    for m in model.modules():
        for k, v in list(vars(m).items()):
            if k not in _REGISTERED:
                setattr(m, k, _to_float64(v))
    return model


def _to_float64(v: object, depth: int = 0) -> object:
    """Floating tensors in v (also inside lists, tuples and dicts) as float64."""
    if isinstance(v, Tensor):
        return v.double() if v.is_floating_point() else v
    if depth < 4 and type(v) in (list, tuple):
        return type(v)(_to_float64(u, depth + 1) for u in v)
    if depth < 4 and type(v) is dict:
        return {k: _to_float64(u, depth + 1) for k, u in v.items()}
    return v
