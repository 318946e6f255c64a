"""The partition seen through data (Sec. 7): regions as a vector quantiser, and partition
nearest neighbours per layer.

>>> import torch, torch.nn as nn, splinelens as sl
>>> net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()).eval()
>>> codes = sl.partition_codes(net, torch.randn(200, 2))
>>> rows = region_stats(codes)
>>> [r["layer"] for r in rows], rows[1]["regions_cumulative"] >= rows[0]["regions"]
(['1', '3'], True)
"""

from __future__ import annotations

import torch

from splinelens._checks import check_positive_int
from splinelens.codes import PartitionCodes
from splinelens.distance import nearest_neighbors

__all__ = ["neighbor_stats", "others", "region_ids", "region_stats"]

Tensor = torch.Tensor


def region_ids(codes: PartitionCodes, layer: int | str) -> Tensor:
    """(N,) id of each input's region in one layer's partition (equal codes, equal ids)."""
    data = codes.layer(layer).data  # (N, width)
    return torch.unique(data, dim=0, return_inverse=True)[1]


def _describe(ids: Tensor) -> tuple[int, float, float]:
    counts = torch.bincount(ids)
    n = len(ids)
    alone = float((counts[ids] == 1).sum()) / n
    return int((counts > 0).sum()), alone, float(counts.max()) / n


def region_stats(codes: PartitionCodes) -> list[dict[str, float | int | str]]:
    """Per layer, and cumulatively (the intersection of the partitions up to that layer): the
    number of distinct regions among the inputs, the fraction of inputs alone in their region,
    and the largest region's share of the inputs."""
    if not codes.layers:  # an affine network: one region, no layers
        return []
    if len(codes) == 0:
        raise ValueError("the codes hold no inputs: region statistics need at least one")
    rows = []
    cumulative = torch.zeros(len(codes), dtype=torch.long, device=codes.layers[0].data.device)
    for i, layer in enumerate(codes.layers):
        ids = region_ids(codes, i)
        pairs = torch.stack([cumulative, ids], 1)
        cumulative = torch.unique(pairs, dim=0, return_inverse=True)[1]
        n, alone, largest = _describe(ids)
        nc, alone_c, largest_c = _describe(cumulative)
        rows.append(
            {
                "layer": layer.name,
                "regions": n,
                "alone": alone,
                "largest": largest,
                "regions_cumulative": nc,
                "alone_cumulative": alone_c,
                "largest_cumulative": largest_c,
            }
        )
    return rows


def neighbor_stats(
    codes: PartitionCodes, x: Tensor, labels: Tensor, k: int = 5
) -> list[dict[str, float | str]]:
    """Per layer: each input's k nearest other inputs in partition distance (eq. (15)); the
    mean Euclidean distance to them, the fraction sharing the input's label, and the accuracy
    of a k-NN classifier (majority vote) in that distance."""
    k = check_positive_int("k", k)
    if not len(codes) == len(x) == len(labels):
        raise ValueError(
            f"codes, x and labels must describe the same inputs: {len(codes)}, {len(x)} and "
            f"{len(labels)} rows"
        )
    if k >= len(codes):
        raise ValueError(f"k must be below the number of inputs {len(codes)}, got {k}")
    flat = x.reshape(len(x), -1)
    rows = []
    for i, layer in enumerate(codes.layers):
        idx = others(codes, i, k)  # (N, k)
        eucl = (flat[:, None] - flat[idx]).norm(dim=2)  # (N, k)
        same = labels[idx] == labels[:, None]
        vote = torch.mode(labels[idx], dim=1).values
        rows.append(
            {
                "layer": layer.name,
                "euclidean": float(eucl.mean()),
                "same_label": float(same.float().mean()),
                "knn_accuracy": float((vote == labels).float().mean()),
            }
        )
    return rows


def others(codes: PartitionCodes, layer: int | str, k: int) -> Tensor:
    """(N, k) indices of each input's k nearest *other* inputs in partition distance."""
    k = check_positive_int("k", k)
    if k >= len(codes):
        raise ValueError(f"k must be below the number of inputs {len(codes)}, got {k}")
    _, idx = nearest_neighbors(codes, codes, layer=layer, k=min(k + 1, len(codes)))
    own = idx == torch.arange(len(idx), device=idx.device)[:, None]
    first_k = torch.arange(idx.shape[1], device=idx.device) < k
    keep = torch.where(own.any(1, keepdim=True), ~own, first_k)
    return idx[keep].reshape(len(idx), -1)[:, :k]
