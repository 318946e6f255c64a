"""Partition-code files are validated on load: a corrupt file is refused, naming file and field.

The fuzz test truncates files and flips their bytes: every load either returns codes identical
to the original or raises ``CodesFileError``; nothing else escapes, nothing wrong is returned.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import splinelens as sl


def _codes() -> sl.PartitionCodes:
    """A binary layer (10 units: padding bits), a max-pool layer (4 pieces) and a hardtanh."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(6, 10), nn.ReLU(), nn.Unflatten(1, (1, 10)), nn.MaxPool1d(2),
        nn.Flatten(), nn.Linear(5, 3), nn.Hardtanh(),
    ).eval()  # fmt: skip
    return sl.partition_codes(net, torch.randn(7, 6))


CODES = _codes()


def _same(a: sl.PartitionCodes, b: sl.PartitionCodes) -> bool:
    return a.signature == b.signature and all(
        x.data.dtype == y.data.dtype and torch.equal(x.data, y.data)
        for x, y in zip(a.layers, b.layers)
    )


def _rewrite(path: Path, edit) -> None:
    """Rewrite an .npz file with ``edit(arrays, meta)`` applied (a hand-made corruption)."""
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays.pop("meta")))
    edit(arrays, meta)
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)


def test_round_trip_keeps_everything(tmp_path: Path) -> None:
    CODES.save(tmp_path / "c.npz")
    assert _same(sl.PartitionCodes.load(tmp_path / "c.npz"), CODES)
    assert [c.pieces for c in CODES.layers] == [2, 2, 3]
    assert CODES.layers[1].kind != CODES.layers[0].kind


def _no_checksum(m: dict) -> None:
    for layer in m["layers"]:
        layer.pop("sha256", None)


CORRUPTIONS = {
    "float layer": (lambda a, m: a.update(layer1=a["layer1"].astype(np.float32)), "layer1"),
    "wrong width": (lambda a, m: a.update(layer0=np.zeros((7, 3), np.uint8)), "layer0"),
    "wrong units": (lambda a, m: m["layers"][0].update(units=24), "layer0"),
    "state >= pieces": (lambda a, m: a["layer2"].__setitem__((0, 0), 3), "layer2"),
    "padding bits": (lambda a, m: a["layer0"].__setitem__((0, 1), 255), "layer0"),
    "row counts": (lambda a, m: a.update(layer2=a["layer2"][:5]), "layer2|rows"),
    "meta rows": (lambda a, m: m.update(rows=9), "rows"),
    "missing layer": (lambda a, m: a.pop("layer1"), "meta.layers"),
    "bad pieces": (lambda a, m: m["layers"][2].update(pieces="3"), "layer2"),
    "format": (lambda a, m: m.update(format="other/1"), "meta.format"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
@pytest.mark.parametrize("checksums", [True, False])
def test_corrupt_files_are_refused_naming_file_and_field(
    tmp_path: Path, name: str, checksums: bool
) -> None:
    edit, field = CORRUPTIONS[name]
    path = tmp_path / "c.npz"
    CODES.save(path)

    def corrupt(a: dict, m: dict) -> None:
        edit(a, m)
        if not checksums:  # an old (format /1) file, or a forged one: checked field by field
            _no_checksum(m)

    _rewrite(path, corrupt)
    with pytest.raises(sl.CodesFileError, match=rf"c\.npz: ({field})"):
        sl.PartitionCodes.load(path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["layers"][2].update(pieces=4),  # still consistent with the data
        lambda m: m["layers"][0].update(name="renamed"),
    ],
)
def test_metadata_edited_consistently_is_refused(tmp_path: Path, edit) -> None:
    """Format /3 hashes the metadata too: an edit that every field check accepts is seen."""
    path = tmp_path / "c.npz"
    CODES.save(path)
    _rewrite(path, lambda a, m: edit(m))
    with pytest.raises(sl.CodesFileError, match=r"c\.npz: meta: checksum mismatch"):
        sl.PartitionCodes.load(path)


def test_old_files_without_checksums_still_load(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    CODES.save(path)
    _rewrite(path, lambda a, m: (_no_checksum(m), m.update(format="splinelens.partition_codes/1")))
    assert _same(sl.PartitionCodes.load(path), CODES)


def test_not_an_npz_file(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(sl.CodesFileError, match=r"c\.npz: file"):
        sl.PartitionCodes.load(path)
    with pytest.raises(FileNotFoundError):
        sl.PartitionCodes.load(tmp_path / "missing.npz")


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("codes") / "c.npz"
    CODES.save(path)
    data = path.read_bytes()
    assert zipfile.is_zipfile(path)
    return data


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=3),
)
def test_fuzzed_files_load_identically_or_raise(
    tmp_path_factory: pytest.TempPathFactory, valid_file: bytes, cut, flips
) -> None:
    data = bytearray(valid_file)
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    if cut is not None:
        data = data[: cut % len(data)]
    path = tmp_path_factory.mktemp("fuzz") / "f.npz"
    path.write_bytes(bytes(data))
    try:
        loaded = sl.PartitionCodes.load(path)
    except sl.CodesFileError as e:
        assert "f.npz" in str(e)
        return
    assert _same(loaded, CODES)
