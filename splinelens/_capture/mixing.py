"""Which dimensions of an operand an operation mixes: an entry of its output reads several
entries along them (contractions, convolutions, pooling, indexing, reductions, concatenation or
padding along them). The batch dimension must not be among them, or samples would be mixed,
reordered or dropped; the registry gives each operation its rule (``OpInfo.mixes``).

A rule takes the op's arguments by schema name, the operand (its argument's name and its
position in a list argument) and the operand's number of dimensions, and returns the mixed
dimensions, or None for all of them.

>>> mm = contracts({"self": (1,), "mat2": (0,)})   # (a @ b): a's columns, b's rows
>>> mm({}, "self", 0, 2), mm({}, "mat2", 0, 2)
({1}, {0})
>>> einsum({"equation": "nd,md->nm"}, "tensors", 1, 2)   # d is summed over
{1}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Rule = Callable[[dict[str, Any], str, int, int], "set[int] | None"]


def contracts(spec: dict[str, tuple[int, ...]]) -> Rule:
    """The dims each operand is summed over (negative from the end), by argument name."""

    def rule(a: dict[str, Any], which: str, pos: int, ndim: int) -> set[int] | None:
        return {d % ndim for d in spec.get(which, ())}

    return rule


def matmul(a: dict[str, Any], which: str, pos: int, ndim: int) -> set[int] | None:
    """``torch.matmul``: the first operand's last dim, the second's second-to-last (its only
    one if it is a vector)."""
    return {ndim - 1} if which == "self" or ndim == 1 else {ndim - 2}


def conv(a: dict[str, Any], which: str, pos: int, ndim: int) -> set[int] | None:
    """Convolutions: every dim of the input but the batch (channels and positions), every dim
    of the weight and bias. An input without a batch dim (one dim fewer than the weight) mixes
    all."""
    weight = a.get("weight")
    wdim = weight.meta["val"].dim() if isinstance(weight, torch.fx.Node) else ndim
    if which != "input" or ndim == wdim - 1:
        return None
    return set(range(1, ndim))


def spatial(k: int) -> Rule:
    """Pooling, resampling, pixel shuffling and the like over the last k dims."""

    def rule(a: dict[str, Any], which: str, pos: int, ndim: int) -> set[int] | None:
        return set(range(max(ndim - k, 0), ndim))

    return rule


def padded(a: dict[str, Any], which: str, pos: int, ndim: int) -> set[int] | None:
    """Padding (``pad``: two amounts per dim, from the last dim backwards): the padded dims."""
    pad = a.get("pad", a.get("padding")) or []
    return {ndim - 1 - i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1]}


def along(*names: str) -> Rule:
    """Ops along the dims in these arguments (each an int or a list of them)."""

    def rule(a: dict[str, Any], which: str, pos: int, ndim: int) -> set[int] | None:
        dims: list[Any] = []
        for name in names:
            v = a.get(name)
            dims += v if isinstance(v, (list, tuple)) else [v] if v is not None else []
        return {d % ndim for d in dims if isinstance(d, int)} if ndim else set()

    return rule


def gathered(a: dict[str, Any], which: str, pos: int, ndim: int) -> set[int] | None:
    """``gather(self, dim, index)`` (and ``scatter(self, dim, index, src)``): ``dim``, and for
    self every other dim along which index is shorter (gather reads, and scatter writes, only the
    first entries there: of a batch dim, the first samples)."""
    dims = along("dim")(a, which, pos, ndim) or set()
    if which != "self":
        return dims
    shorter = _shorter(a, ndim)
    return None if shorter is None else dims | shorter


def added_into(source: str) -> Rule:
    """``scatter_add(self, dim, index, src)`` / ``index_add(self, dim, index, source)``: the
    added tensor's ``dim`` (its entries land at the index's places, several into one); self's
    ``dim`` (only the places listed get a sum: of a batch dim, some samples) and the dims along
    which scatter_add's index is shorter than self (likewise). (scatter_add's index smaller than
    src: ``arguments.scatter_add``.)"""

    def rule(a: dict[str, Any], which: str, pos: int, ndim: int) -> set[int] | None:
        return gathered(a, which, pos, ndim) if which in (source, "self") else set()

    return rule


def _shorter(a: dict[str, Any], ndim: int) -> set[int] | None:
    """The dims along which ``index`` is shorter than ``self`` (None: their shapes are unknown;
    none for an index that lists places along one dim, as ``index_add``'s)."""
    inp, idx = a.get("self"), a.get("index")
    if not isinstance(inp, torch.fx.Node) or not isinstance(idx, torch.fx.Node):
        return None
    size, kept = inp.meta["val"].shape, idx.meta["val"].shape
    if len(kept) != ndim:
        return set()
    return {d for d in range(ndim) if str(kept[d]) != str(size[d])}


def reduced(a: dict[str, Any], which: str, pos: int, ndim: int) -> set[int] | None:
    """Sums, means and extremes over ``dim`` (none or an empty list: every dim)."""
    dim = a.get("dim")
    return None if dim is None or dim == [] else along("dim")(a, which, pos, ndim)


def extreme(a: dict[str, Any], which: str, pos: int, ndim: int) -> set[int] | None:
    """``max`` / ``min``: over ``dim`` or every dim; the overload with ``other`` is pairwise."""
    return set() if "other" in a else reduced(a, which, pos, ndim)


def indexed(a: dict[str, Any], which: str, pos: int, ndim: int) -> set[int] | None:
    """``x[i]`` with index tensors: the dims they select along (an activation as an index is
    refused elsewhere)."""
    if which != "self":
        return None
    return {d for d, i in enumerate(a.get("indices") or []) if i is not None}


def put(a: dict[str, Any], which: str, pos: int, ndim: int) -> set[int] | None:
    """``index_put(self, indices, values)``: self's dims that the indices select along (a
    boolean mask of k dims covers k), where values are written; values land entry by entry (an
    index sized by the batch is refused by ``arguments.index_put``)."""
    if which == "values":
        return set()
    if which != "self":
        return None
    dims, d = set(), 0
    for i in a.get("indices") or []:
        val = i.meta.get("val") if isinstance(i, torch.fx.Node) else None
        k = val.dim() if val is not None and val.dtype in (torch.bool, torch.uint8) else 1
        if i is not None:
            dims |= set(range(d, d + k))
        d += k
    return dims


def repeated(a: dict[str, Any], which: str, pos: int, ndim: int) -> set[int] | None:
    """``repeat`` / ``tile``: the dims copied more than once (repeats align with the last dims)."""
    reps = list(a.get("repeats", a.get("dims")) or [])[-ndim:] if ndim else []
    return {ndim - len(reps) + i for i, r in enumerate(reps) if r != 1}


def interleaved(a: dict[str, Any], which: str, pos: int, ndim: int) -> set[int] | None:
    """``repeat_interleave``: its dim; without one it repeats the flattened tensor (every dim)."""
    dim = a.get("dim")
    return None if dim is None else {dim % ndim}


def sliced(a: dict[str, Any], which: str, pos: int, ndim: int) -> set[int] | None:
    """``slice``: its dim, unless it keeps every entry (start 0, step 1, no end)."""
    end = a.get("end")
    full = (
        a.get("start") in (None, 0)
        and a.get("step") in (None, 1)
        and (end is None or (isinstance(end, int) and end >= 2**62))
    )
    return set() if full else {a.get("dim", 0) % ndim}


def scattered(a: dict[str, Any], which: str, pos: int, ndim: int) -> set[int] | None:
    """``select_scatter(self, src, dim, index)``: self's dim (src, one dim fewer, has no dim)."""
    return {a.get("dim", 0) % ndim} if which == "self" else set()


def rolled(a: dict[str, Any], which: str, pos: int, ndim: int) -> set[int] | None:
    """``roll``: its dims; without dims it rolls the flattened tensor (every dim)."""
    return along("dims")(a, which, pos, ndim) if a.get("dims") else None


def einsum(a: dict[str, Any], which: str, pos: int, ndim: int) -> set[int] | None:
    """``torch.einsum``: an operand's dims whose letter is summed over (not in the output) or
    repeated in it (a diagonal); ``...`` dims are carried through."""
    eq = str(a.get("equation", "")).replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if pos >= len(terms):
        return None
    if not arrow:  # implicit output: the letters used once, in order, after the ``...`` dims
        letters = lhs.replace(",", "").replace(".", "")
        out = "..." + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    head, dots, tail = terms[pos].partition("...")
    dots_kept = "..." in out  # (an explicit output without them sums over them)
    middle = ["" if dots_kept else "."] * (ndim - len(head) - len(tail) if dots else 0)
    letters = list(head) + middle + list(tail)
    if len(letters) != ndim:
        return None
    return {d for d, c in enumerate(letters) if c and (c not in out or letters.count(c) > 1)}
