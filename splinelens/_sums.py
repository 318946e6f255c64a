"""Exact reductions for checks and fingerprints: sums that do not depend on the number of
threads (``fixed_sum``), sums of bit patterns that see a change of any one entry
(``int_view``, ``row_sums``, ``odd_weights``), and the values of many 0-d sums with one
synchronisation per device (``stacked``).

>>> t = torch.randn(100_000)
>>> bool(fixed_sum(t) == fixed_sum(t.clone()))
True
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "BITS",
    "CHUNK",
    "NATIVE_SUM",
    "ROWS",
    "all_finite",
    "fixed_sum",
    "int_view",
    "odd_weights",
    "row_count",
    "row_sums",
    "stacked",
    "sum_parts",
    "wide_sum",
]

Tensor = torch.Tensor
NATIVE_SUM = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def wide_sum(t: Tensor) -> float:
    """The sum of a tensor whose sum overflows its dtype, in a wider one (float64 as a sum of
    ``t * 2**-64``): float32 for 16-bit floats (65504 at most), float64 for float32."""
    if t.dtype == torch.float64:
        return float(fixed_sum(t.mul(2.0**-64)))
    return float(fixed_sum(t, torch.float32 if t.element_size() < 4 else torch.float64))


def sum_parts(tensors: list[Tensor], fixed: bool = False) -> list[Tensor]:
    """Each tensor's sum in its own dtype (float64 for others), 0-d; ``fixed``: the same for
    any number of threads (``fixed_sum``), for fingerprints compared later."""
    with torch.no_grad():
        parts = []
        for t in tensors:
            dt = None if t.dtype in NATIVE_SUM else torch.float64
            parts.append(fixed_sum(t, dt) if fixed else t.sum(dtype=dt))
        return parts


CHUNK = 32768  # ATen's grain size: a reduction of this many entries runs on one thread


def fixed_sum(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """t's sum, 0-d, independent of the number of threads: sums of its rows or of fixed chunks,
    each on one thread, added in order (a plain sum of a million float32 entries differs in its
    last bits between 1 and 2 threads). Differentiable (a penalty's sum is one).

    >>> t, threads = torch.randn(1_000_003), torch.get_num_threads()
    >>> torch.set_num_threads(1); one = fixed_sum(t)
    >>> torch.set_num_threads(2); two = fixed_sum(t)
    >>> torch.set_num_threads(threads); bool(one == two)
    True
    """
    if t.numel() <= CHUNK:
        return t.sum(dtype=dtype)
    if t.dim() > 1 and t.shape[0] <= CHUNK and t.numel() // t.shape[0] <= CHUNK:
        return t.reshape(t.shape[0], -1).sum(1, dtype=dtype).sum()  # rows: one thread each
    flat = t.reshape(-1)
    k = flat.numel() // CHUNK
    head = flat[: k * CHUNK].view(k, CHUNK).sum(1, dtype=dtype)  # (k,) one thread each
    return fixed_sum(head) + flat[k * CHUNK :].sum(dtype=dtype)


def all_finite(parts: list[Tensor]) -> bool:
    """Whether every 0-d tensor in ``parts`` is finite, with one synchronisation per device.

    >>> all_finite([torch.tensor(1.0), torch.tensor(2, dtype=torch.float64)])
    True
    """
    return all(map(math.isfinite, stacked(parts))) if parts else True


# element size -> (integer dtype of the same width, dtype of its sum)
BITS = {
    8: (torch.int64, torch.int64),
    4: (torch.int32, torch.int32),
    2: (torch.int16, torch.int32),
    1: (torch.int8, torch.int32),
}


def int_view(t: Tensor) -> tuple[Tensor, torch.dtype]:
    """``t``'s bit patterns as integers of its width, and the dtype their sum is taken in: the
    sum modulo 2^32 (2^64 for 8-byte floats) changes with any one entry (the difference of two
    patterns is nonzero and smaller than the modulus). (An int64 sum of int32s is 5x slower.)

    >>> a = torch.tensor([1.0, 2.0])
    >>> b = a.nextafter(torch.tensor(3.0))  # one ulp up each
    >>> v, dt = int_view(a)
    >>> bool(v.sum(dtype=dt) != int_view(b)[0].sum(dtype=dt))
    True
    """
    ints = BITS.get(t.element_size()) if t.is_floating_point() else None
    if ints is None:  # (no such floating tensors in PyTorch today)
        return t.detach(), torch.float64
    return t.detach().view(ints[0]), ints[1]


ROWS = 1 << 22  # the most rows (or entries of a vector) whose order a fingerprint sees


def row_count(v: Tensor) -> int:
    """How many entries ``row_sums`` returns for v."""
    shape = v.shape
    return 1 if not shape or shape[0] > ROWS else shape[0]


def row_sums(v: Tensor, dt: torch.dtype) -> Tensor:
    """(rows,) sums of v's rows in dt: its entries if a vector, its total past ``ROWS`` rows."""
    shape = v.shape
    if not shape or shape[0] > ROWS:
        return v.sum(dtype=dt).reshape(1)
    if len(shape) == 1:
        return v if v.dtype == dt else v.to(dt)
    return v.reshape(shape[0], -1).sum(1, dtype=dt)


@functools.lru_cache(maxsize=4)
def odd_weights(n: int, dt: torch.dtype, device: torch.device) -> Tensor:
    """(n,) fixed odd integers of dtype dt (int32 or int64), scattered by a Weyl sequence."""
    k = torch.arange(1, n + 1, dtype=torch.int64) * -7046029254386353131  # (2^64 / phi, wraps)
    if dt != torch.int64:
        k = k >> 32  # the high half: in dt's range
    return (k | 1).to(dt).to(device)


def stacked(parts: list[Tensor]) -> list[float]:
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
