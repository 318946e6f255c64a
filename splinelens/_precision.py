"""Exact arithmetic on GPUs: TF32 off while splinelens computes, restored afterwards.

>>> with exact_matmul():
...     pass
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def exact_matmul() -> Iterator[None]:
    """Disable TF32 in cuBLAS and cuDNN inside the block; restore the user's settings after."""
    if not torch.cuda.is_available():
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
