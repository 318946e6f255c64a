"""Exact arithmetic on GPUs: TF32 off while splinelens computes, restored afterwards.

>>> with exact_matmul():
...     pass
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_DEPTH = [0, (True, True)]  # (blocks open in any thread, the user's settings when the first opened)
_LOCK = threading.Lock()


@contextlib.contextmanager
def exact_matmul() -> Iterator[None]:
    """Disable TF32 in cuBLAS and cuDNN inside the block; restore the user's settings after the
    last block open in any thread closes (the settings are the process's: a thread that closed
    its block restored them under another one still computing)."""
    if not torch.cuda.is_available():
        yield
        return
    with _LOCK:
        if _DEPTH[0] == 0:
            _DEPTH[1] = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        _DEPTH[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH[0] -= 1
            if _DEPTH[0] == 0:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = _DEPTH[1]
