"""Errors raised by splinelens.

>>> raise UnsupportedOperationError("aten.sigmoid", "features.3")
Traceback (most recent call last):
...
splinelens.errors.UnsupportedOperationError: aten.sigmoid at features.3 is not ...

Every error is a ``ValueError``: splinelens refuses rather than answer with a plausible number.
"""

from __future__ import annotations

__all__ = ["BatchSizeError", "DataError", "StaleCaptureError", "UnsupportedOperationError"]


class UnsupportedOperationError(ValueError):
    """The model contains an operation that is not a max-affine spline operator.

    Attributes ``op`` (the operation's name) and ``where`` (the module path and, when known, the
    source line) say what and where; the message says how to fix it when a fix exists.
    """

    def __init__(self, op: str, where: str, why: str = "", fix: str = "") -> None:
        self.op, self.where = op, where
        why = why or (
            "is not piecewise affine, so the network is not a max-affine spline operator (MASO)"
        )
        msg = f"{op} at {where or '<top level>'} {why}"
        first = fix[:1] if fix.startswith("sl.") else fix[:1].upper()  # (sl. stays a name)
        super().__init__(msg + (f". {first}{fix[1:]}" if fix else ""))


class StaleCaptureError(ValueError):
    """The model's structure changed after it was captured (a module replaced, added, ...).

    The plain functions (``sl.affine_map`` ...) re-capture by themselves; a ``SplineView`` you
    hold refuses, since its layers may no longer be the model's.
    """


class BatchSizeError(ValueError):
    """The model's forward depends on the batch size, and this batch is outside the range the
    capture holds for (``torch.export``'s range constraints, or a batch of 1 that computes
    something else)."""


class DataError(ValueError):
    """A dataset is missing or malformed; the message says what was expected and where."""
