"""Fixtures shared by the tests."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture
def young_heap() -> Iterator[None]:
    """The collector's objects from earlier tests frozen for this test (``gc.freeze``): its
    ``gc.collect()`` and ``gc.get_objects()`` then cover what the test made, in a time that does
    not grow with the suite (late in the suite each full collection took about a second).
    Freezing only keeps objects alive, so a test that sees an object freed is not fooled by it.
    Used as ``@pytest.mark.usefixtures("young_heap")`` on a test that asserts what is freed.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
