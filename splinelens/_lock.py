"""One process-wide re-entrant lock for what threads cannot do at once in torch.

Held (``held()``) by every capture (``torch.export`` swaps the model's tensors for fake ones
while it traces, and splinelens silences torch's logs and warnings around it, process
settings), a capture through the view cache (one capture per key; cached calls take no lock),
the batch-of-1 check of a capture, the float64 twin (one copy per model), and the forward-mode
passes of the region geometry (``torch.func.jvp``'s dual level is one for the whole process).
Re-entrant: a capture inside a locked lookup takes it again. A thread that waits longer than
``WAIT`` seconds raises instead of hanging: a model's forward that waits for another thread
calling splinelens, during that model's capture, would otherwise wait forever.

>>> with held():
...     pass
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["WAIT", "held"]

WAIT = 300.0  # seconds
_LOCK = threading.RLock()


@contextlib.contextmanager
def held() -> Iterator[None]:
    """The lock for the block; a RuntimeError after waiting ``WAIT`` seconds for it."""
    if not _LOCK.acquire(timeout=WAIT):
        raise RuntimeError(
            "splinelens waited for another thread's capture (or forward-mode pass) for too long. "
            "If a model's forward waits for a thread that calls splinelens (or for a lock held "
            "around a splinelens call), make the model's first calls before that: a capture "
            "runs the forward while it holds splinelens' lock"
        )
    try:
        yield
    finally:
        _LOCK.release()
