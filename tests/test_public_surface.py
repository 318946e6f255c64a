"""One ``layer=`` convention: every public function that picks a layer takes an int index, a
negative index or the layer's name, and the three forms pick the same layer."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

import splinelens as sl
from splinelens.paper.neighbors import others, region_ids

F64 = torch.float64
KEYS = (1, -1, "3")  # the second (and last) layer of the model below, three ways


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)]
    return nn.Sequential(*layers).to(F64).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(12, 2, generator=torch.Generator().manual_seed(1), dtype=F64)


def _plot(net: nn.Module, x: torch.Tensor, key) -> list[torch.Tensor]:
    from splinelens.paper.figures import plot_slice

    part = sl.slice_partition(net, x[0], torch.eye(2, dtype=F64), (-2.0, 2.0, -2.0, 2.0))
    ax = plot_slice(part, color="random", layer=key)
    polys = ax.collections[0]
    out = [torch.tensor(p.vertices) for p in polys.get_paths()]
    ax.figure.clf()
    return [*out, torch.tensor(polys.get_facecolor()), torch.tensor(len(ax.collections))]


CALLS: dict[str, Callable] = {
    "SplineView.layer": lambda m, x, k: sl.SplineView(m, x).layer(k).node,
    "affine_map(start=)": lambda m, x, k: sl.affine_map(m, x, start=k),
    "affine_map(end=)": lambda m, x, k: sl.affine_map(m, x, end=k),
    "SplineView.affine_map": lambda m, x, k: sl.SplineView(m, x).affine_map(x, start=0, end=k),
    "layer_maso": lambda m, x, k: sl.layer_maso(m, x, k).slopes,
    "PartitionCodes.layer": lambda m, x, k: sl.partition_codes(m, x).layer(k).data,
    "partition_distance": lambda m, x, k: sl.partition_distance(
        sl.partition_codes(m, x), sl.partition_codes(m, x), layer=k
    ),
    "partition_distance([layer])": lambda m, x, k: sl.partition_distance(
        sl.partition_codes(m, x), sl.partition_codes(m, x), layer=[0, k]
    ),
    "nearest_neighbors": lambda m, x, k: sl.nearest_neighbors(
        sl.partition_codes(m, x), sl.partition_codes(m, x), layer=k, k=4, backend="torch"
    )[0],
    "paper.neighbors.region_ids": lambda m, x, k: region_ids(sl.partition_codes(m, x), k),
    "paper.neighbors.others": lambda m, x, k: others(sl.partition_codes(m, x), k, 3),
    "paper.figures.plot_slice": _plot,
}


def _as_tensors(result) -> list[torch.Tensor]:
    if isinstance(result, sl.AffineMap):
        return [result.A, result.B]
    if isinstance(result, list):
        return result
    return [result if isinstance(result, torch.Tensor) else torch.tensor(hash(result))]


@pytest.mark.parametrize("name", list(CALLS))
def test_index_negative_index_and_name_pick_the_same_layer(net, x, name: str) -> None:
    results = [_as_tensors(CALLS[name](net, x, key)) for key in KEYS]
    for key, got in zip(KEYS[1:], results[1:]):
        assert len(got) == len(results[0]), (name, key)
        for a, b in zip(results[0], got):
            assert torch.equal(a, b), (name, key)


@pytest.mark.parametrize("name", list(CALLS))
def test_a_missing_layer_is_refused_by_name(net, x, name: str) -> None:
    with pytest.raises(sl.LayerNotFoundError, match=r"named .nope.; valid: indices -2\.\.1"):
        CALLS[name](net, x, "nope")
