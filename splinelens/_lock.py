"""One process-wide re-entrant lock for what threads cannot do at once in torch.

Held by: every capture (``torch.export`` swaps the model's tensors for fake ones while it
traces, and splinelens silences torch's logs and warnings around it, process settings), the
lookup-or-capture of a cached view (one capture per key), the batch-of-1 check of a capture,
the float64 twin (one copy per model), and the forward-mode passes of the region geometry
(``torch.func.jvp``'s dual level is one for the whole process). Re-entrant: a capture inside a
locked lookup takes it again.

>>> with splinelens_lock:
...     pass
"""

from __future__ import annotations

import threading

__all__ = ["splinelens_lock"]

splinelens_lock = threading.RLock()
