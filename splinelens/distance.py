"""Partition distance (Sec. 7, eq. (15)) and exact nearest neighbours in it.

d(x, y) = 1 - (units in the same state) / (units), per layer or over several layers together.
Codes are encoded as bit strings whose Hamming distance counts the differing units: plain bits
for binary layers; a one-hot of each unit's state (two differing bits per differing unit)
otherwise. Nearest neighbours use FAISS's exact ``IndexBinaryFlat`` on the CPU and matrix
products on a GPU (or without FAISS), streamed over the database in chunks.

>>> import torch, torch.nn as nn, splinelens as sl
>>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
>>> codes = sl.partition_codes(net, torch.randn(100, 4))
>>> d = sl.partition_distance(codes[:3], codes, layer=0)
>>> d.shape, float(d[0, 0])
(torch.Size([3, 100]), 0.0)
>>> dist, idx = sl.nearest_neighbors(codes[:3], codes, layer=0, k=5)
>>> idx[:, 0].tolist()
[0, 1, 2]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from splinelens._checks import check_positive_int
from splinelens._precision import exact_matmul
from splinelens.codes import LayerCodes, PartitionCodes, pack_bits, unpack_bits

__all__ = ["chunk_sizes", "nearest_neighbors", "partition_distance"]

Tensor = torch.Tensor
LayerSel = int | str | Sequence[int | str] | None


@dataclass(frozen=True)
class _Encoding:
    """Packed bit strings whose Hamming distance is ``per_unit`` x (number of differing units)."""

    bits: Tensor  # (N, bytes) uint8
    units: int
    per_unit: int


def partition_distance(
    a: PartitionCodes, b: PartitionCodes, layer: LayerSel = None, chunk_size: int | None = None
) -> Tensor:
    """The (Na, Nb) matrix of partition distances, eq. (15), in float64.

    ``layer``: an index or name, a list of them (their units pooled), or None for every layer.
    Rows of a and of b are taken in chunks (``chunk_size`` codes of b; default, as those of a:
    about 256 MiB of unpacked bits, ``chunk_sizes``): the result does not depend on them.

    >>> import torch, torch.nn as nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    >>> x = torch.randn(5, 3)
    >>> import splinelens as sl
    >>> codes = sl.partition_codes(net, x)
    >>> d = partition_distance(codes, codes)  # (5, 5): fraction of units whose state differs
    >>> d.shape, bool(d.diag().eq(0).all())
    (torch.Size([5, 5]), True)
    """
    if chunk_size is not None:
        chunk_size = check_positive_int("chunk_size", chunk_size)
    ea, eb = _encode(a, layer), _encode(b, layer, like=a)
    out = torch.empty(len(a), len(b), dtype=torch.float64, device=ea.bits.device)
    step, astep = chunk_sizes(chunk_size, len(a), ea.bits.shape[1], use_faiss=False)
    for i in range(0, len(b), step):
        for j in range(0, len(a), astep):
            block = _hamming_matmul(ea.bits[j : j + astep], eb.bits[i : i + step])
            out[j : j + astep, i : i + step] = block
    return out / (ea.per_unit * ea.units)


def nearest_neighbors(
    query: PartitionCodes,
    database: PartitionCodes | Iterable[PartitionCodes],
    layer: LayerSel = None,
    k: int = 16,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Exact k nearest database codes of each query code in partition distance.

    ``database``: codes, or an iterable of code shards (e.g. loaded one file at a time), which
    are indexed consecutively. Returns ``dist`` (Nq, k) float64 ascending and ``idx`` (Nq, k)
    int64 into the database. Ties at equal distance go to the lower database index (the
    same neighbours for either backend, any chunk size, shards and query batches). Each shard is
    streamed in chunks of ``chunk_size`` codes (default: 65,536 for FAISS, about 256 MiB of
    unpacked bits for torch). ``backend``: "faiss" (CPU), "torch" (matrix products; the default
    on GPU or without FAISS) or "auto".

    >>> import torch, torch.nn as nn, splinelens as sl
    >>> net = nn.Sequential(nn.Linear(2, 8), nn.ReLU()).eval()
    >>> codes = sl.partition_codes(net, torch.randn(6, 2))
    >>> dist, idx = nearest_neighbors(codes[:2], codes, k=3)
    >>> dist.shape, idx.shape, bool(dist[:, 0].eq(0).all())  # each query's own code is at 0
    (torch.Size([2, 3]), torch.Size([2, 3]), True)
    """
    k = check_positive_int("k", k)
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
    if chunk_size is not None:
        chunk_size = check_positive_int("chunk_size", chunk_size)
    shards = [database] if isinstance(database, PartitionCodes) else database
    if isinstance(database, PartitionCodes) and k > len(database):
        raise ValueError(f"k must be between 1 and the database size {len(database)}, got {k}")
    eq = _encode(query, layer)  # (an empty query is checked as any other)
    use_faiss = backend == "faiss" or (
        backend == "auto" and eq.bits.device.type == "cpu" and _faiss() is not None
    )
    search = _search_faiss if use_faiss else _search_torch
    best: list[tuple[Tensor, Tensor] | None] = []
    offset = 0
    for shard in shards:
        if not isinstance(shard, PartitionCodes):
            raise TypeError(f"database shards must be PartitionCodes, got {type(shard).__name__}")
        ed = _encode(shard, layer, like=query)
        if len(shard) == 0:
            continue
        step, qstep = chunk_sizes(chunk_size, len(query), ed.bits.shape[1], use_faiss)
        qchunks = range(0, len(query), qstep)
        best += [None] * (len(qchunks) - len(best))
        for s in range(0, len(shard), step):
            db = ed.bits[s : s + step]
            for j, q in enumerate(qchunks):
                d, i = search(eq.bits[q : q + qstep], db, min(k, len(db)))
                best[j] = _merge(best[j], d, i + offset + s, k)
        offset += len(shard)
    if k > offset:
        raise ValueError(f"k must be between 1 and the database size {offset}, got {k}")
    if len(query) == 0:
        empty = torch.empty(0, k, device=eq.bits.device)
        return empty.double(), empty.long()
    dist = torch.cat([b[0] for b in best if b is not None])
    return dist.double() / (eq.per_unit * eq.units), torch.cat(
        [b[1] for b in best if b is not None]
    )


def chunk_sizes(
    chunk_size: int | None, n_query: int, nbytes: int, use_faiss: bool
) -> tuple[int, int]:
    """Database and query chunk sizes. FAISS: 65,536 codes against all queries. Torch: the
    unpacked bits (4 bytes each) of either chunk and the (queries, codes) distances stay near
    256 MiB."""
    if use_faiss:
        return chunk_size or 1 << 16, max(1, n_query)
    budget = _BUDGET
    qstep = max(1, min(n_query, 4096, budget // (32 * nbytes)))  # (its bits unpacked too)
    step = chunk_size or max(1, min(budget // (32 * nbytes), budget // (24 * qstep)))
    return step, qstep


def _merge(
    best: tuple[Tensor, Tensor] | None, d: Tensor, i: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    if best is None:
        return d, i
    d, i = torch.cat([best[0], d], 1), torch.cat([best[1], i], 1)
    order = torch.argsort(d, dim=1, stable=True)[:, :k]
    return d.gather(1, order), i.gather(1, order)


def _search_faiss(q: Tensor, db: Tensor, k: int) -> tuple[Tensor, Tensor]:
    faiss = _faiss()
    if faiss is None:
        raise ImportError("backend='faiss' needs the faiss-cpu package: pip install faiss-cpu")
    index = faiss.IndexBinaryFlat(db.shape[1] * 8)
    index.add(np.ascontiguousarray(db.cpu().numpy()))
    d, i = index.search(np.ascontiguousarray(q.cpu().numpy()), k)
    d, i = torch.from_numpy(d).long(), torch.from_numpy(i).long()
    order = torch.argsort(d * len(db) + i, dim=1)  # ties by index, as the torch backend's
    return d.gather(1, order), i.gather(1, order)


_FLOAT_INTEGERS = 1 << 53  # float64 holds every integer below this exactly


def _search_torch(q: Tensor, db: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k smallest (distance, index) pairs of each query: one integer key per pair, so that
    ties go to the lower index whatever the chunks (``torch.topk`` breaks ties arbitrarily)."""
    n = len(db)
    key = _hamming_matmul(q, db)  # (Nq, Ndb) counts, exact in float64
    if (db.shape[1] * 8 + 1) * n >= _FLOAT_INTEGERS:  # keys past float64's integers: int64
        key = key.long()
    key.mul_(n).add_(torch.arange(n, device=key.device, dtype=key.dtype))  # exact integers
    key = torch.topk(key, k, dim=1, largest=False, sorted=True).values.long()  # (Nq, k)
    return key // n, key % n


_BUDGET = 1 << 28  # bytes of unpacked bits (and distances) per chunk, about 256 MiB
_BLOCK = 1 << 20  # packed bytes: 2^23 bits, whose counts and sums float32 holds exactly


def _hamming_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Hamming distances between packed bit strings, (Na, Nb) float64: |a| + |b| - 2 a.b over
    blocks of 2^23 bits in float32 (integers up to 2^24 are exact there), added in float64
    (exact up to 2^53 bits; one float32 product of more than 2^24 bits rounds the counts)."""
    out = torch.zeros(len(a), len(b), dtype=torch.float64, device=a.device)
    for s in range(0, a.shape[1], _BLOCK):
        block_a, block_b = a[:, s : s + _BLOCK], b[:, s : s + _BLOCK]
        bits_a = unpack_bits(block_a, block_a.shape[1] * 8).float()  # (Na, bits)
        bits_b = unpack_bits(block_b, block_b.shape[1] * 8).float()  # (Nb, bits)
        with _float32_exactly(a.device.type):
            dot = (bits_a @ bits_b.T).double()
        out += bits_a.sum(1, keepdim=True).double() + bits_b.sum(1).double() - 2 * dot
    return out


@contextlib.contextmanager
def _float32_exactly(device_type: str) -> Iterator[None]:
    """Float32 products in float32: autocast (bfloat16 rounds counts above 256) and TF32 (2048)
    off inside the block."""
    off = torch.is_autocast_enabled(device_type)
    with (
        exact_matmul(),
        torch.autocast(device_type, enabled=False) if off else contextlib.nullcontext(),
    ):
        yield


def _encode(
    codes: PartitionCodes, layer: LayerSel, like: PartitionCodes | None = None
) -> _Encoding:
    if not isinstance(codes, PartitionCodes):
        raise TypeError(
            f"codes must be PartitionCodes (from sl.partition_codes or PartitionCodes.load), "
            f"got {type(codes).__name__}"
        )
    if like is not None:
        like.check_comparable(codes, "query and database codes")
    picked = _select(codes, layer)
    if not picked:
        raise ValueError("no layers selected")
    for c in picked:  # (hand-built codes: a state out of range would count as a difference)
        why = c.check_values()
        if why:
            raise ValueError(f"LayerCodes {c.name!r}: {why}")
    units = sum(c.units for c in picked)
    if units == 0:
        raise ValueError("the selected layers have no units, so their codes have no distance")
    if all(c.binary for c in picked):
        bits = (
            picked[0].data
            if len(picked) == 1
            else pack_bits(torch.cat([unpack_bits(c.data, c.units) for c in picked], 1).bool())
        )
        return _Encoding(bits, units, 1)
    onehots = [_one_hot(c) for c in picked]
    return _Encoding(pack_bits(torch.cat(onehots, 1)), units, 2)


def _one_hot(c: LayerCodes) -> Tensor:
    states = c.states()  # (N, units)
    return F.one_hot(states, c.pieces).flatten(1).bool()  # (N, units * pieces)


def _select(codes: PartitionCodes, layer: LayerSel) -> list[LayerCodes]:
    if layer is None:
        return list(codes.layers)
    if isinstance(layer, (int, str)) or hasattr(layer, "__index__"):
        keys = [layer]
    elif isinstance(layer, (list, tuple)):
        keys = list(layer)
    else:
        raise TypeError(
            f"layer must be an index, a name, a list of them or None, got {type(layer).__name__}"
        )
    picked = [codes.layer(key) for key in keys]
    names = [c.name for c in picked]
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise ValueError(
            f"layer={layer!r} names layer {twice!r} more than once (its units would count "
            "twice in the distance); list each layer once"
        )
    return picked


def _faiss():  # the faiss module, or None when it is not installed
    try:
        import faiss
    except ImportError:
        return None
    return faiss
