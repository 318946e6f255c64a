"""Partition distance (eq. (15)) and nearest neighbours against brute force."""

from __future__ import annotations

import pytest
import torch

import splinelens as sl
from splinelens import distance
from tests import zoo
from tests.test_codes import pool_zoo


def brute_distance(a: sl.PartitionCodes, b: sl.PartitionCodes, layers: list[int]) -> torch.Tensor:
    """Eq. (15) by explicit comparison of every unit's state."""
    sa = torch.cat([a.layers[i].states() for i in layers], 1)
    sb = torch.cat([b.layers[i].states() for i in layers], 1)
    same = (sa[:, None, :] == sb[None, :, :]).sum(-1).double()
    return 1 - same / sa.shape[1]


@pytest.fixture(scope="module")
def codes() -> tuple[sl.PartitionCodes, sl.PartitionCodes]:
    model = pool_zoo()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(60, 2, 9, 7, generator=g, dtype=torch.float64)
    c = sl.partition_codes(model, x)
    return c[:13], c  # query, database (the queries are in the database)


@pytest.mark.parametrize("layer", [0, 1, 2, 3, 4, "5", [0, 2], [1, 4], None])
def test_distance_matches_brute_force(codes, layer) -> None:
    q, db = codes
    names = [c.name for c in db.layers]
    sel = (
        list(range(len(names)))
        if layer is None
        else [
            names.index(k) if isinstance(k, str) else k
            for k in (layer if isinstance(layer, list) else [layer])
        ]
    )
    d = sl.partition_distance(q, db, layer=layer, chunk_size=7)
    assert d.dtype == torch.float64
    torch.testing.assert_close(d, brute_distance(q, db, sel), atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("layer", [0, 1, 2, None])
def test_neighbors_are_exact(codes, backend, layer) -> None:
    q, db = codes
    k = 9
    dist, idx = sl.nearest_neighbors(q, db, layer=layer, k=k, chunk_size=11, backend=backend)
    full = sl.partition_distance(q, db, layer=layer)
    expected = full.sort(dim=1).values[:, :k]
    torch.testing.assert_close(dist, expected, atol=1e-12, rtol=0)  # the k smallest, in order
    torch.testing.assert_close(full.gather(1, idx), dist, atol=1e-12, rtol=0)  # idx has them
    assert all(len(set(row.tolist())) == k for row in idx)  # no database entry twice
    assert (dist[:, 0] == 0).all()  # every query is in the database


def test_backends_agree_on_large_random_database() -> None:
    torch.manual_seed(0)
    model = zoo.build("mlp", torch.float32)
    x = torch.randn(3000, 6)
    c = sl.partition_codes(model, x)
    d1, _ = sl.nearest_neighbors(c[:50], c, k=20, backend="faiss", chunk_size=1000)
    d2, _ = sl.nearest_neighbors(c[:50], c, k=20, backend="torch", chunk_size=777)
    torch.testing.assert_close(d1, d2, atol=0, rtol=0)


@pytest.mark.parametrize("int_keys", [False, True])
def test_tied_neighbours_are_the_lowest_indices_whatever_the_split(monkeypatch, int_keys) -> None:
    """With many codes at equal distance, each backend returns the k smallest (distance, index)
    pairs, in that order (reference: a stable sort of brute-force distances), the same for any
    chunk size, query batch and shard split (torch's top-k broke ties by the chunk it ran on).
    ``int_keys``: the torch backend's keys in int64, as for databases past 2^53 / bits codes."""
    if int_keys:
        monkeypatch.setattr(distance, "_FLOAT_INTEGERS", 0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 10), torch.nn.ReLU(), torch.nn.Linear(10, 12))
    c = sl.partition_codes(torch.nn.Sequential(*net, torch.nn.ReLU()).eval(), torch.randn(900, 4))
    q, k = c[:70], 20
    full = brute_distance(q, c, [0, 1])
    order = torch.sort(full, dim=1, stable=True).indices[:, :k]  # ties: the lower index first
    expected = (full.gather(1, order), order)
    shards = [c[:333], c[333:700], c[700:]]
    for backend in ("faiss", "torch"):
        for chunk in (None, 1, 97, 500):
            for db in (c, shards):
                got = sl.nearest_neighbors(q, db, k=k, chunk_size=chunk, backend=backend)
                torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
        alone = sl.nearest_neighbors(q[5:6], c, k=k, backend=backend)
        torch.testing.assert_close(alone[1], expected[1][5:6], atol=0, rtol=0)
    assert (full.gather(1, order)[:, k - 1 : k] == full.sort(1).values[:, k : k + 1]).any()


@pytest.mark.parametrize("layer", [None, 2, "5", [1, 4]])
def test_distance_is_a_metric_on_codes(codes, layer) -> None:
    """d(a, a) = 0, d(a, b) = d(b, a) and d(a, c) <= d(a, b) + d(b, c) over every triple of 80
    codes: the 60 random inputs and moves of 20 of them by 1e-6 to 1 (equal and close codes)."""
    _, db = codes
    g = torch.Generator().manual_seed(5)
    x = torch.randn(60, 2, 9, 7, generator=g, dtype=torch.float64)  # the fixture's inputs
    step = torch.logspace(-6, 0, 20, dtype=torch.float64).view(20, 1, 1, 1)  # 1e-6 .. 1
    near = x[:20] + step * torch.randn(20, 2, 9, 7, generator=g, dtype=torch.float64)
    model = pool_zoo()
    c = sl.PartitionCodes.cat([db, sl.partition_codes(model, near)])
    d = sl.partition_distance(c, c, layer=layer)  # (80, 80)
    assert torch.all(d.diagonal() == 0)
    torch.testing.assert_close(d, d.T, atol=0, rtol=0)
    assert d.min() >= 0 and d.max() <= 1
    via = d[:, :, None] + d[None, :, :]  # via[a, b, c] = d(a, b) + d(b, c)
    assert torch.all(d[:, None, :] <= via + 1e-12)  # d(a, c) for every middle b
    assert (d[:20, 60:].diagonal() == 0).any() and (d[:20, 60:].diagonal() > 0).any()


def test_k_out_of_range(codes) -> None:
    q, db = codes
    with pytest.raises(ValueError, match="k must be between 1 and the database size 60"):
        sl.nearest_neighbors(q, db, k=61)


def test_codes_of_different_networks_are_refused(codes) -> None:
    q, _ = codes
    other = sl.partition_codes(zoo.build("mlp"), zoo.inputs("mlp", 5))
    with pytest.raises((ValueError, KeyError)):
        sl.partition_distance(q, other)


def test_database_given_as_shards(codes, tmp_path) -> None:
    q, db = codes
    paths = []
    for i, s in enumerate(range(0, len(db), 25)):  # shards of 25, 25 and 10 codes on disk
        paths.append(tmp_path / f"shard{i}.npz")
        db[s : s + 25].save(paths[-1])
    shards = (sl.PartitionCodes.load(p) for p in paths)  # a generator: read one at a time
    dist, idx = sl.nearest_neighbors(q, shards, layer=None, k=7, chunk_size=9)
    ref_dist, _ = sl.nearest_neighbors(q, db, layer=None, k=7)
    torch.testing.assert_close(dist, ref_dist, atol=0, rtol=0)
    full = sl.partition_distance(q, db)
    torch.testing.assert_close(full.gather(1, idx), dist, atol=0, rtol=0)
    with pytest.raises(ValueError, match="database size 60"):
        sl.nearest_neighbors(q, (sl.PartitionCodes.load(p) for p in paths), k=61)


def test_negative_index_and_empty_query(codes) -> None:
    q, db = codes
    assert torch.equal(db[-1].layers[0].data, db.layers[0].data[-1:])
    with pytest.raises(IndexError, match="out of range"):
        db[60]
    dist, idx = sl.nearest_neighbors(q[:0], db, k=3)
    assert dist.shape == idx.shape == (0, 3)


def test_torch_backend_bounds_the_distance_matrix() -> None:
    from splinelens.distance import chunk_sizes

    step, qstep = chunk_sizes(None, 100_000, 2, use_faiss=False)  # tiny codes, many queries
    assert qstep <= 4096 and step * qstep * 24 <= 1 << 28
    # 500k units (62,500 bytes): 4,096 queries unpacked took 8 GB; both chunks stay in budget
    step, qstep = chunk_sizes(None, 100_000, 62_500, use_faiss=False)
    assert max(step, qstep) * 62_500 * 32 <= 1 << 28 and step * qstep * 24 <= 1 << 28


def _two_layers(n: int = 6) -> sl.PartitionCodes:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4))
    net = torch.nn.Sequential(*net, torch.nn.ReLU()).eval()
    return sl.partition_codes(net, torch.randn(n, 3))


def test_a_layer_listed_twice_is_refused() -> None:
    """layer=[0, 0, 1] counted layer 0's units twice (0.2083 where eq. (15) over {0, 1} gives
    0.1875); named twice another way too."""
    codes = _two_layers()
    for layer in ([0, 0, 1], [0, -2, "3"], ["1", 0]):
        with pytest.raises(ValueError, match=r"names layer '1' more than once"):
            sl.partition_distance(codes, codes, layer=layer)
        with pytest.raises(ValueError, match=r"more than once"):
            sl.nearest_neighbors(codes, codes, k=1, layer=layer)


def test_hand_built_codes_out_of_range_and_layers_without_units_are_refused(tmp_path) -> None:
    """Padding bits set gave a distance of 1.67; a state of 9 of 4 pieces a raw torch error;
    layers of 0 units NaN distances (faiss) or ZeroDivisionError (torch); a saved (N, 0)
    multi-piece layer was written but could not be read back."""
    from splinelens.codes import LayerCodes, PartitionCodes

    bad_bits = PartitionCodes(
        (LayerCodes("r", "relu", 3, 2, torch.tensor([[0b00011111]], dtype=torch.uint8)),)
    )
    zero = PartitionCodes((LayerCodes("r", "relu", 3, 2, torch.zeros(1, 1, dtype=torch.uint8)),))
    with pytest.raises(ValueError, match=r"LayerCodes 'r': packed bits beyond the last unit"):
        sl.partition_distance(bad_bits, zero)
    nine = PartitionCodes(
        (LayerCodes("p", "max_pool2d", 2, 4, torch.tensor([[9, 0]], dtype=torch.uint8)),)
    )
    ok = PartitionCodes(
        (LayerCodes("p", "max_pool2d", 2, 4, torch.tensor([[1, 0]], dtype=torch.uint8)),)
    )
    with pytest.raises(ValueError, match=r"states must lie in \[0, 4\), found 9"):
        sl.nearest_neighbors(nine, ok, k=1)
    empty = PartitionCodes(
        (LayerCodes.encode("l", "max_pool2d", 5, torch.zeros(3, 0, dtype=torch.long)),)
    )
    for backend in ("torch", "faiss"):
        with pytest.raises(ValueError, match=r"no units"):
            sl.nearest_neighbors(empty, empty, k=1, backend=backend)
    with pytest.raises(ValueError, match=r"no units"):
        sl.partition_distance(empty, empty)
    empty.save(tmp_path / "e.npz")
    assert PartitionCodes.load(tmp_path / "e.npz").layers[0].data.shape == (3, 0)


def test_partition_distance_chunks_both_sides_within_the_budget(monkeypatch) -> None:
    """Rows of a were unpacked all at once (3,000 codes of 64k units: 768 MB of bits): both
    sides are now chunked to the budget, with the same distances (reference: explicit sums)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 40), torch.nn.ReLU()).eval()
    a, b = (sl.partition_codes(net, torch.randn(n, 3)) for n in (37, 23))
    seen: list[tuple[int, int]] = []
    matmul = distance._hamming_matmul

    def spy(qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        seen.append((len(qa), len(qb)))
        return matmul(qa, qb)

    monkeypatch.setattr(distance, "_BUDGET", 32 * 5 * 10)  # 10 codes of 5 bytes per chunk
    monkeypatch.setattr(distance, "_hamming_matmul", spy)
    d = sl.partition_distance(a, b)
    torch.testing.assert_close(d, brute_distance(a, b, [0]), atol=1e-12, rtol=0)
    assert max(r for r, _ in seen) <= 10 and max(c for _, c in seen) <= 10
    seen.clear()
    assert torch.equal(sl.partition_distance(a, b, chunk_size=4), d)  # b in chunks of 4
    assert max(c for _, c in seen) == 4 and max(r for r, _ in seen) <= 10


def test_distances_are_exact_inside_autocast() -> None:
    """The Hamming counts' float32 product ran in bfloat16 inside torch.autocast("cpu"), which
    rounds counts above 256: self-distances of -0.002, neighbours out of order, silently
    (found in review). Reference: the differing states counted one by one."""
    g = torch.Generator().manual_seed(0)
    states = torch.rand(6, 3000, generator=g) < 0.5
    codes = sl.PartitionCodes((sl.LayerCodes.encode("h", "relu", 2, states),))
    counts = (states[:, None, :] != states[None, :, :]).sum(-1).double()  # (6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = sl.partition_distance(codes, codes)
        dist, idx = sl.nearest_neighbors(codes, codes, k=6, backend="torch")
    assert torch.equal(d, counts / 3000)  # (the counts exact: divided as the library does)
    assert torch.equal(dist, d.sort(dim=1, stable=True).values)
    assert torch.equal(idx, counts.sort(dim=1, stable=True).indices)
