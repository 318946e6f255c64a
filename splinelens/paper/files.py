"""The harness's result files, each written atomically: to a temporary file beside the target,
renamed over it when complete (``splinelens._io.atomic_path``), so a reader never sees half a file.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "table.csv"
>>> write_csv(path, [{"lam": 0.0, "acc": 0.9}, {"lam": 0.1, "acc": 0.91}])
>>> path.read_text().splitlines()
['lam,acc', '0.0,0.9', '0.1,0.91']
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from splinelens._io import atomic_path

__all__ = ["write_csv", "write_json", "write_text"]


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (missing parent folders are created)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON; numbers JSON does not know (numpy, torch) as floats."""
    write_text(path, json.dumps(obj, indent=1, default=float))


def write_csv(
    path: str | Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None
) -> None:
    """Write one CSV row per dict, under a header of ``columns`` (default: the first row's keys;
    keys outside ``columns`` are refused, missing ones left empty)."""
    names = list(columns) if columns is not None else list(rows[0]) if rows else []
    buf = io.StringIO()
    writer = csv.DictWriter(buf, names)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())
