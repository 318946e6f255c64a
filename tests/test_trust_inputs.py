"""Bad or degenerate arguments to codes, distances, penalties and regions: refused by name or
answered exactly (found by a fuzzing review; each test fails before its fix)."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn as nn

import splinelens as sl
from splinelens.codes import LayerCodes, PartitionCodes

Tensor = torch.Tensor


def _binary_codes(bits: np.ndarray) -> PartitionCodes:
    data = torch.from_numpy(np.packbits(bits, axis=1))
    return PartitionCodes((LayerCodes("1", "relu", bits.shape[1], 2, data),))


def test_hamming_distances_are_exact_past_float32_integers(monkeypatch) -> None:
    """Distances count bits in float32 blocks added in float64: exact at any length (the block
    made small here; a float32 product of more than 2^24 bits rounded the counts)."""
    import splinelens.distance as dist

    monkeypatch.setattr(dist, "_BLOCK", 3)  # packed bytes per block
    rng = np.random.default_rng(0)
    bits = rng.random((6, 61)) < 0.5  # 61 units: 8 bytes, three blocks
    codes = _binary_codes(bits)
    ref = (bits[:, None, :] != bits[None, :, :]).sum(-1) / 61  # brute force
    assert torch.equal(sl.partition_distance(codes, codes), torch.from_numpy(ref))
    d, _ = sl.nearest_neighbors(codes[:2], codes, k=6, backend="torch")
    assert torch.equal(d, torch.from_numpy(np.sort(ref[:2], 1)))


def test_hamming_distances_of_more_than_2_to_the_24_units() -> None:
    units = 2**24 + 3
    bits = np.ones((3, units), dtype=bool)
    bits[1, 0] = False  # one unit from row 0
    bits[2, :5] = False  # five units from row 0
    d = sl.partition_distance(_binary_codes(bits), _binary_codes(bits)) * units
    assert d.round().tolist() == [[0, 1, 5], [1, 0, 4], [5, 4, 0]]


def _codes(n: int = 5, width: int = 7) -> PartitionCodes:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, 2)).eval()
    return sl.partition_codes(net, torch.randn(n, 3))


def test_an_empty_query_is_checked_like_any_other() -> None:
    codes, other = _codes(), _codes(width=9)
    with pytest.raises(ValueError, match="database size 5"):
        sl.nearest_neighbors(codes[:0], codes, k=6)
    with pytest.raises(ValueError, match="different networks"):
        sl.nearest_neighbors(other[:0], codes, k=2)
    with pytest.raises(sl.LayerNotFoundError):
        sl.nearest_neighbors(codes[:0], codes, layer=7, k=2)
    with pytest.raises(TypeError, match="shards must be PartitionCodes"):
        sl.nearest_neighbors(codes[:0], [torch.zeros(3)], k=2)
    with pytest.raises(ValueError, match="different networks"):  # an empty shard too
        sl.nearest_neighbors(codes, [codes, other[:0]], k=2)
    d, i = sl.nearest_neighbors(codes[:0], codes, k=2)
    assert d.shape == i.shape == (0, 2)


def test_arguments_of_the_wrong_kind_are_named() -> None:
    codes = _codes()
    with pytest.raises(TypeError, match="must be PartitionCodes"):
        sl.partition_distance(torch.zeros(5, 3), codes)
    with pytest.raises(TypeError, match="must be PartitionCodes"):
        sl.nearest_neighbors(torch.zeros(5, 3), codes, k=1)
    for layer in (torch.tensor([0, 1]), np.array([0, 0])):
        with pytest.raises(TypeError, match=r"one int index or a name.*pass a list"):
            sl.partition_distance(codes, codes, layer=layer)
    assert torch.equal(  # one integer of any kind still works
        sl.partition_distance(codes, codes, layer=np.int64(0)), sl.partition_distance(codes, codes)
    )
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="named 'nope'"):
        sl.template_penalty(net, 0.1, layer="nope")
    for w in (torch.tensor(1.0), torch.zeros(3, 0), torch.zeros(0, 4)):
        for kind in ("eq13", "reference", "row-norm"):
            with pytest.raises(ValueError, match=r"weight must be a \(C, D"):
                sl.orthogonality_penalty(w, kind)


def test_an_affine_network_has_one_region_and_no_codes() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).eval()
    x = torch.randn(1, 4, dtype=torch.float64)
    poly = sl.region_polytope(net.double(), x)
    assert poly.A.shape == (0, 4) and bool(poly.contains(torch.randn(50, 4).double()).all())
    with pytest.raises(ValueError, match="no MASO nonlinearity"):
        sl.partition_codes(net, x)


def test_a_code_file_whose_pieces_do_not_fit_its_codes_is_refused(tmp_path) -> None:
    """Old formats have no metadata checksum: a piece count its codes cannot hold is refused."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 2))
    codes = sl.partition_codes(net.eval(), torch.randn(4, 1, 4, 4))
    path = tmp_path / "codes.npz"
    codes.save(path)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    meta["format"] = "splinelens.partition_codes/1"  # an old format: no checksum
    del meta["sha256"]
    meta["layers"][0]["pieces"] = 10**40  # the max-pool's 4
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    with pytest.raises(sl.CodesFileError, match="pieces do not fit"):
        PartitionCodes.load(path)


def _geometry_calls() -> dict[str, tuple]:
    """Bad arguments to the geometry functions, each with the error it must raise (they raised
    raw RuntimeError / TypeError / AttributeError, or took [[0.1, 0.2]] and [True] as radii)."""
    f64 = torch.float64
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)).to(f64).eval()
    x, o, eye = torch.randn(3, 2, dtype=f64), torch.zeros(2, dtype=f64), torch.eye(2, dtype=f64)
    return {
        "seed": (lambda: sl.sampled_local_complexity(net, x, [0.1], seed=0.5), "seed must be"),
        "margin": (lambda: sl.slice_partition(net, points=tuple(x), margin="1"), "margin must"),
        "bounds": (lambda: sl.slice_partition(net, o, eye, None), r"bounds must be \(u0"),
        "function": (lambda: sl.slice_partition(lambda z: z, o, eye), "must be a torch.nn.Module"),
        "radii 2-D": (lambda: sl.local_complexity(net, x, [[0.1, 0.2]]), "radii must be one"),
        "radii bool": (lambda: sl.local_complexity(net, x, [True]), "radii must be one"),
        "maso shape": (lambda: sl.layer_maso(net, x, 0)(x[:, :1]), r"takes h of shape \(N, 2\)"),
        "maso dtype": (lambda: sl.layer_maso(net, x, 0)(x.float()), "h is torch.float32"),
    }


@pytest.mark.parametrize("case", list(_geometry_calls()))
def test_geometry_arguments_are_refused_by_name(case: str) -> None:
    call, match = _geometry_calls()[case]
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def _meta_calls() -> dict[str, Callable[[nn.Module, Tensor], object]]:
    """Entry points that take a model and inputs."""
    f64 = torch.float64
    return {
        "partition_codes": sl.partition_codes,
        "affine_map": lambda net, x: sl.affine_map(net, x).B,
        "verify": sl.verify,
        "SplineView": sl.SplineView,
        "region_radius": sl.region_radius,
        "layer_maso": lambda net, x: sl.layer_maso(net, x, 0),
        "local_complexity": lambda net, x: sl.local_complexity(net, x, [0.1]),
        "slice points": lambda net, x: sl.slice_partition(net, points=tuple(x)),
        "slice plane": lambda net, x: sl.slice_partition(
            net, x[0], torch.eye(2, dtype=f64, device=x.device)
        ),
    }


@pytest.mark.parametrize("case", list(_meta_calls()))
def test_a_model_or_inputs_on_the_meta_device_are_refused_by_name(case: str) -> None:
    """A model on the meta device (built for its shapes) was met with "call x.to(...) to
    match", which cannot help, and meta inputs with torch's own errors (autocast's "unknown
    device type", "Cannot copy out of meta tensor"). Both hold no values: refused, naming
    which. The advice for the model also covers a capture in another thread (test_threads)."""
    call = _meta_calls()[case]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)).double().eval()
    x = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"(x|example_input|points\[0\]|origin) is on the meta device"
    ):
        call(net, x.to("meta"))
    with pytest.raises(ValueError, match=r"parameters are on the meta device.*to_empty"):
        call(net.to("meta"), x)
