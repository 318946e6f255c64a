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

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ._io import atomic_path

Tensor = torch.Tensor
_FORMAT = "splinelens.partition_codes/1"


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

    def __len__(self) -> int:
        return len(self.layers[0]) if self.layers else 0

    def __getitem__(self, idx: int | slice | Tensor | Sequence[int]) -> PartitionCodes:
        """Codes of a subset of the inputs (a slice, an index tensor or list)."""
        if isinstance(idx, int):
            if not -len(self) <= idx < len(self):
                raise IndexError(f"index {idx} out of range for {len(self)} codes")
            idx = slice(idx % len(self), idx % len(self) + 1)
        return PartitionCodes(tuple(replace(c, data=c.data[idx]) for c in self.layers))

    def layer(self, key: int | str) -> LayerCodes:
        """One layer's codes, by index or name."""
        if isinstance(key, str):
            for c in self.layers:
                if c.name == key:
                    return c
            raise KeyError(f"no layer named {key!r}; layers: {[c.name for c in self.layers]}")
        return self.layers[key]

    def to(self, device: torch.device | str) -> PartitionCodes:
        return PartitionCodes(tuple(replace(c, data=c.data.to(device)) for c in self.layers))

    @staticmethod
    def cat(parts: Sequence[PartitionCodes]) -> PartitionCodes:
        """Concatenate codes of several batches of the same network."""
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        for p in parts[1:]:
            if [(c.name, c.units, c.pieces) for c in p.layers] != [
                (c.name, c.units, c.pieces) for c in first.layers
            ]:
                raise ValueError("codes come from different networks (their layers differ)")
        return PartitionCodes(
            tuple(
                replace(c, data=torch.cat([p.layers[i].data for p in parts]))
                for i, c in enumerate(first.layers)
            )
        )

    def save(self, path: str | Path) -> None:
        """Write to ``path`` (.npz) atomically: a temporary file, then a rename."""
        path = Path(path)
        meta = [
            {"name": c.name, "kind": c.kind, "units": c.units, "pieces": c.pieces}
            for c in self.layers
        ]
        arrays = {f"layer{i}": c.data.cpu().numpy() for i, c in enumerate(self.layers)}
        arrays["meta"] = np.array(json.dumps({"format": _FORMAT, "layers": meta}))
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    @staticmethod
    def load(path: str | Path) -> PartitionCodes:
        """Read codes written by ``save``."""
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path} is not a splinelens partition-code file")
            return PartitionCodes(
                tuple(
                    LayerCodes(
                        m["name"],
                        m["kind"],
                        m["units"],
                        m["pieces"],
                        torch.from_numpy(f[f"layer{i}"].copy()),
                    )
                    for i, m in enumerate(meta["layers"])
                )
            )


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
