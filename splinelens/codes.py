"""Partition codes (Sec. 7, eq. (14)): which affine piece every unit of every layer uses for x.

Per layer, one entry per unit: ReLU-type units store (pre-activation > 0) as one bit, packed;
hardtanh units 0 / 1 / 2 (below, inside, above); max-pooling and channel max the position of the
argmax in the window (ties as PyTorch breaks them). Codes concatenate across batches, index like
a tensor, and save to / load from an ``.npz`` file (no pickle), written atomically.

>>> import torch, torch.nn as nn, splinelens as sl
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
>>> codes = sl.partition_codes(net, torch.randn(10, 4))
>>> len(codes), codes.layers[0].states().shape
(10, torch.Size([10, 8]))
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splinelens._checks import layer_index
from splinelens._io import array_sha256, write_npz

__all__ = ["CodesFileError", "LayerCodes", "PartitionCodes", "pack_bits", "unpack_bits"]

Tensor = torch.Tensor
# /2 adds the row count and a sha256 per array, /3 a sha256 of the metadata itself
_FORMAT = "splinelens.partition_codes/3"
_READABLE = ("splinelens.partition_codes/1", "splinelens.partition_codes/2", _FORMAT)
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class CodesFileError(ValueError):
    """A partition-code file that is not what ``PartitionCodes.save`` wrote (corrupt, truncated,
    edited): names the file and the field."""

    def __init__(self, path: str | Path, field: str, why: str) -> None:
        self.path, self.field = str(path), field
        super().__init__(
            f"{path}: {field}: {why} (not a splinelens partition-code file, or a corrupt one)"
        )


@dataclass(frozen=True)
class LayerCodes:
    """The codes of one layer for N inputs.

    ``data`` is (N, ceil(units / 8)) uint8 packed bits when ``pieces == 2``, else (N, units)
    holding the state index in [0, pieces).
    """

    name: str
    kind: str
    units: int
    pieces: int
    data: Tensor

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise ValueError(f"LayerCodes {self.name!r}: {problem}")

    @classmethod
    def encode(cls, name: str, kind: str, pieces: int, states: Tensor) -> LayerCodes:
        """The codes of every unit's state, (N, units) integers in [0, pieces): one packed bit
        per unit for two pieces, else the smallest integer dtype that holds a state."""
        data = pack_bits(states.bool()) if pieces == 2 else states.to(code_dtype(pieces))
        return cls(name, kind, states.shape[1], pieces, data)

    def _problem(self) -> str:
        """What is inconsistent between the metadata and the data's dtype and shape ("" if ok)."""
        if not isinstance(self.name, str) or not isinstance(self.kind, str):
            return "name and kind must be strings"
        for field, low in (("units", 0), ("pieces", 2)):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                return f"{field} must be an integer >= {low}, got {v!r}"
        if not isinstance(self.data, Tensor) or self.data.dim() != 2:
            return "data must be a 2-D tensor (N, width)"
        width = math.ceil(self.units / 8) if self.binary else self.units
        if self.data.shape[1] != width:
            return f"data has width {self.data.shape[1]}, expected {width} for {self.units} units"
        if self.binary and self.data.dtype != torch.uint8:
            return f"binary codes must be packed uint8 bits, got {self.data.dtype}"
        if self.data.dtype not in _INT_DTYPES:
            return f"codes must be integers, got {self.data.dtype}"
        if not self.binary and self.pieces > _states_held(self.data.dtype):
            return (
                f"{self.pieces} pieces do not fit {self.data.dtype} codes (at most "
                f"{_states_held(self.data.dtype)})"
            )
        return ""

    def check_values(self) -> str:
        """What is out of range in the data ("" if ok): states in [0, pieces), zero padding bits."""
        if self.data.numel() == 0:  # no inputs, or no units
            return ""
        if self.binary:
            pad = 8 * self.data.shape[1] - self.units
            if pad and bool((self.data[:, -1] & ((1 << pad) - 1)).any()):
                return "packed bits beyond the last unit are set"
            return ""
        lo, hi = int(self.data.min()), int(self.data.max())
        if lo < 0 or hi >= self.pieces:
            return f"states must lie in [0, {self.pieces}), found {lo if lo < 0 else hi}"
        return ""

    @property
    def signature(self) -> tuple[str, str, int, int]:
        """(name, kind, units, pieces): what makes codes of two networks comparable."""
        return (self.name, self.kind, self.units, self.pieces)

    @property
    def binary(self) -> bool:
        return self.pieces == 2

    def states(self) -> Tensor:
        """(N, units) state of every unit, as int64."""
        if not self.binary:
            return self.data.long()
        return unpack_bits(self.data, self.units).long()

    def __len__(self) -> int:
        return self.data.shape[0]


@dataclass(frozen=True)
class PartitionCodes:
    """Partition codes of N inputs, one ``LayerCodes`` per Definition-1 layer, in order."""

    layers: tuple[LayerCodes, ...]

    def __post_init__(self) -> None:
        rows = {len(c) for c in self.layers}
        if len(rows) > 1:
            raise ValueError(f"every layer must hold codes of the same inputs; row counts {rows}")

    def __len__(self) -> int:
        return len(self.layers[0]) if self.layers else 0

    @property
    def signature(self) -> tuple[tuple[str, str, int, int], ...]:
        """The network's layer signature: (name, kind, units, pieces) per layer. Codes of the
        same architecture (e.g. two checkpoints) share it and can be compared."""
        return tuple(c.signature for c in self.layers)

    def check_comparable(self, other: PartitionCodes, what: str = "codes") -> None:
        """Refuse codes of another network, naming the first layer that differs."""
        a, b = self.signature, other.signature
        if a == b:
            return
        for i, (la, lb) in enumerate(zip(a, b)):
            if la != lb:
                raise ValueError(
                    f"{what} come from different networks: layer {i} is {_describe(la)} in one "
                    f"and {_describe(lb)} in the other"
                )
        raise ValueError(f"{what} come from different networks: {len(a)} layers against {len(b)}")

    def __getitem__(self, idx: int | slice | Tensor | Sequence[int]) -> PartitionCodes:
        """Codes of a subset of the inputs (a slice, an index tensor or list)."""
        if isinstance(idx, (Tensor, np.ndarray, np.integer, np.bool_)) and idx.ndim == 0:
            value = idx.item()  # (a bool, also as a tensor or array, is refused below: not row 1)
            idx = value if isinstance(value, bool) else int(value)
        if isinstance(idx, (bool, tuple)) or _dims(idx) > 1:
            raise TypeError(  # (a tuple or a 2-D index would index the units, or fail inside)
                "index codes with an int, a slice, or a 1-D index tensor or list (of inputs)"
            )
        if isinstance(idx, int):
            if not -len(self) <= idx < len(self):
                raise IndexError(f"index {idx} out of range for {len(self)} codes")
            idx = slice(idx % len(self), idx % len(self) + 1)
        if isinstance(idx, slice) and (idx.step or 1) < 0:  # torch slices go forward only
            idx = torch.tensor(range(len(self))[idx], dtype=torch.long)
        return PartitionCodes(tuple(replace(c, data=c.data[idx]) for c in self.layers))

    def layer(self, key: int | str) -> LayerCodes:
        """One layer's codes, by index (negative counts from the end) or name."""
        return self.layers[layer_index(key, [c.name for c in self.layers])]

    def to(self, device: torch.device | str) -> PartitionCodes:
        """The codes on another device (not "meta": codes are data)."""
        if torch.device(device).type == "meta":
            raise ValueError("codes hold data; the meta device holds none: use cpu or cuda")
        return PartitionCodes(tuple(replace(c, data=c.data.to(device)) for c in self.layers))

    @staticmethod
    def cat(parts: Sequence[PartitionCodes]) -> PartitionCodes:
        """Concatenate codes of several batches of the same network (a list or tuple of
        ``PartitionCodes``)."""
        parts = list(parts) if not isinstance(parts, PartitionCodes) else [parts]
        odd = next((p for p in parts if not isinstance(p, PartitionCodes)), None)
        if odd is not None:
            raise TypeError(
                f"PartitionCodes.cat takes a list of PartitionCodes, found a {type(odd).__name__}"
            )
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        for p in parts[1:]:
            first.check_comparable(p, "codes to concatenate")
        return PartitionCodes(
            tuple(
                replace(c, data=torch.cat([p.layers[i].data for p in parts]))
                for i, c in enumerate(first.layers)
            )
        )

    def save(self, path: str | Path) -> None:
        """Write to ``path`` (.npz) atomically: a temporary file, then a rename."""
        arrays = {f"layer{i}": c.data.cpu().numpy() for i, c in enumerate(self.layers)}
        meta = [
            {"name": c.name, "kind": c.kind, "units": c.units, "pieces": c.pieces, "sha256": h}
            for c, h in zip(self.layers, map(array_sha256, arrays.values()))
        ]
        head = {"format": _FORMAT, "rows": len(self), "layers": meta}
        arrays["meta"] = np.array(json.dumps({**head, "sha256": _meta_sha256(head)}))
        write_npz(path, **arrays)

    @staticmethod
    def load(path: str | Path) -> PartitionCodes:
        """Read codes written by ``save``, validated: any corruption raises ``CodesFileError``
        naming the file and the field (dtypes, widths, states, row counts, checksums). Files of
        earlier splinelens versions (formats /1 and /2) have no checksum of their metadata (/1
        none of their arrays): an edit there is seen only where it breaks the file's
        consistency; ``save`` them again to add the checksums."""
        try:
            f = np.load(path, allow_pickle=False)
            if not isinstance(f, np.lib.npyio.NpzFile):  # (a .npy file: one array)
                raise CodesFileError(path, "file", "not an .npz archive, as save writes")
            with f:
                return _read(f, path)
        except (CodesFileError, FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except Exception as e:  # zip, npy-header, JSON and decoding errors of a corrupt file
            raise CodesFileError(path, "file", f"{type(e).__name__}: {e}") from e


def _read(f: Any, path: str | Path) -> PartitionCodes:
    names = set(f.files)
    if "meta" not in names:
        raise CodesFileError(path, "meta", "missing")
    meta = json.loads(str(f["meta"]))
    if not isinstance(meta, dict) or meta.get("format") not in _READABLE:
        raise CodesFileError(path, "meta.format", f"expected one of {_READABLE}")
    digest = meta.pop("sha256", None)  # (checked last: a field's own error says more)
    entries = meta.get("layers")
    if not isinstance(entries, list) or names != {
        "meta",
        *(f"layer{i}" for i in range(len(entries))),
    }:
        raise CodesFileError(path, "meta.layers", f"does not match the arrays {sorted(names)}")
    layers = tuple(_read_layer(f, i, m, path) for i, m in enumerate(entries))
    rows = {len(c) for c in layers}
    if len(rows) > 1 or ("rows" in meta and rows and meta["rows"] not in rows):
        raise CodesFileError(
            path, "rows", f"layers hold {sorted(rows)} rows, meta says {meta.get('rows')}"
        )
    if meta["format"] == _FORMAT and digest != _meta_sha256(meta):
        raise CodesFileError(path, "meta", "checksum mismatch (the metadata was changed)")
    return PartitionCodes(layers)


def _read_layer(f: Any, i: int, m: Any, path: str | Path) -> LayerCodes:
    field = f"layer{i}"
    if not isinstance(m, dict) or not {"name", "kind", "units", "pieces"} <= m.keys():
        raise CodesFileError(path, f"meta.layers[{i}]", "needs name, kind, units and pieces")
    arr = f[field]
    if "sha256" in m and m["sha256"] != array_sha256(arr):
        raise CodesFileError(path, field, "checksum mismatch (the data was changed)")
    if arr.dtype.kind not in "iu" or arr.ndim != 2:
        raise CodesFileError(
            path, field, f"expected 2-D integer codes, got {arr.dtype} {arr.shape}"
        )
    try:
        c = LayerCodes(m["name"], m["kind"], m["units"], m["pieces"], torch.from_numpy(arr.copy()))
    except ValueError as e:
        raise CodesFileError(path, field, str(e)) from e
    problem = c.check_values()
    if problem:
        raise CodesFileError(path, field, problem)
    return c


def _meta_sha256(head: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()


def _describe(sig: tuple[str, str, int, int]) -> str:
    name, kind, units, pieces = sig
    return f"{name!r} ({kind}, {units} units, {pieces} pieces)"


def _states_held(dtype: torch.dtype) -> int:
    """How many states [0, n) an integer dtype holds."""
    return int(torch.iinfo(dtype).max) + 1


def _dims(idx: object) -> int:
    """The dimensions of an index (2 for a ragged list: refused as well)."""
    if isinstance(idx, (list, np.ndarray, Tensor)):
        try:
            return np.ndim(idx) if not isinstance(idx, Tensor) else idx.dim()
        except ValueError:  # (a ragged list)
            return 2
    return 1


def code_dtype(pieces: int) -> torch.dtype:
    """Smallest integer dtype that stores a state in [0, pieces)."""
    return torch.uint8 if pieces <= 256 else torch.int16 if pieces <= 32768 else torch.int32


def pack_bits(bits: Tensor) -> Tensor:
    """(N, U) bool -> (N, ceil(U / 8)) uint8, most significant bit first (as numpy.packbits)."""
    if bits.device.type == "cpu":
        return torch.from_numpy(np.packbits(bits.numpy(), axis=1))
    n, u = bits.shape
    pad = (-u) % 8
    b = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad)).view(n, -1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=bits.device)
    return (b * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, units: int) -> Tensor:
    """Inverse of ``pack_bits``: (N, B) uint8 -> (N, units) uint8 of 0/1."""
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # (N, B, 8)
    return bits.flatten(1)[:, :units]
