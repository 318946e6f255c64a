"""``OpInfo``: what one ATen operation is to splinelens, and the two helpers that fill a table
of them (``add`` new entries, ``amend`` entries already there). The tables themselves are
``registry`` (the ops read) and ``refused`` (the ops refused, with why and the fix).

>>> table = {}
>>> add(table, "relu abs", "maso", family="sign")
>>> amend(table, "abs", check=None)
>>> table["abs"].kind, table["abs"].family
('maso', 'sign')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from splinelens._capture import arguments, mixing


@dataclass(frozen=True)
class OpInfo:
    """One ATen operation (by packet name) as splinelens sees it.

    ``kind``: "affine", "maso", "shape" (reads only the activation's shape), "g" (the output
    nonlinearity) or "refused". ``operands``: for products, the argument positions of which at most
    one may hold an activation. ``regroups``: a view that may merge or split dims, so it may
    reinterpret the batch (``batch_axis``'s layout must say it does not). Theorem 2:
    ``coefficients`` names the constants that multiply a convex input ("weights": every constant
    operand but the bias at ``bias``; "scalars": the constant factors of mul/div; "bn_weight":
    batchnorm's scale), which must be nonnegative ("kernel": the op's own weights are not, as
    bicubic interpolation's); ``view``: a view or copy through which a parameter keeps its name.
    ``family``: the MASO kind built by ``make_maso``. ``rewrite``: the function run in place of the
    op (canonicalisation). ``why``/``fix``: the refusal. ``vmap_backward``: PyTorch batches its
    backward under ``vmap`` (convolutions and max-pooling loop over the vmapped rows instead).
    ``mixes``: the dims of an operand that one output entry reads several entries along
    (``mixing``), which must not hold the batch; None for ops that keep every dim apart.
    ``check``: the refusal of arguments that make the op something else (``arguments``);
    ``cast``: a dtype cast (refused when it rounds the activations). ``renames``: overloads that
    are another op of the table (``max.other`` is ``maximum``). ``terms``: for sums, (argument
    position, sign, keyword that scales it) of each term. ``slice_start``: where a slice's
    start, end and step arguments begin. ``decompose``: overloads written out before capture.
    ``random``: draws random numbers (refused wherever it is, on activations or not).
    ``identity``: returns its first argument's values (graphs are compared without it).
    ``elementwise``: a MASO acting entry by entry with constant arguments besides its input,
    the same function on any view of it (``unmerge`` writes it batch first on a merged batch).
    """

    name: str
    kind: str
    operands: tuple[int, ...] = ()
    regroups: bool = False
    coefficients: str = ""
    bias: int | None = None
    terms: tuple[tuple[int, float, str], ...] = ()
    view: bool = False
    family: str = ""
    rewrite: Callable[..., Any] | None = None
    vmap_backward: bool = True
    mixes: mixing.Rule | None = None
    check: Callable[[arguments.Call], arguments.Refusal] | None = None
    cast: bool = False
    renames: tuple[tuple[str, str], ...] = ()
    slice_start: int | None = None
    decompose: tuple[tuple[Any, Callable[..., Any]], ...] = ()
    random: bool = False
    identity: bool = False
    elementwise: bool = False
    why: str = ""
    fix: str = ""

    @property
    def signed(self) -> bool:
        """A sum whose terms carry signs (a subtracted convex term breaks convexity)."""
        return bool(self.terms)


def add(table: dict[str, OpInfo], names: str, kind: str, **fields: Any) -> None:
    """Add one entry of this kind to ``table`` for each of the space-separated ``names``."""
    for name in names.split():
        table[name] = OpInfo(name, kind, **fields)


def amend(table: dict[str, OpInfo], names: str, **fields: Any) -> None:
    """Add fields to entries already in ``table``."""
    for name in names.split():
        old = table[name]
        table[name] = OpInfo(**{**old.__dict__, **fields})
