"""Exact 2-D slice partitions against grid samples and the network's own forward pass (float64)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import splinelens as sl
from splinelens.geometry import polygons as poly
from tests import zoo


def _keys(codes: sl.PartitionCodes) -> np.ndarray:
    """One row of bytes per input: all layers' codes side by side."""
    n = len(codes)
    return np.concatenate(
        [la.data.reshape(n, -1).cpu().numpy().view(np.uint8) for la in codes.layers], 1
    )


def _plane(name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = zoo.ZOO[name][1]
    origin = torch.randn(shape, generator=g, dtype=torch.float64)
    return origin, torch.randn(2, *shape, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def anchor_mlp() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)).double().eval()


def test_anchor_mlp_has_14439_regions(anchor_mlp: nn.Module) -> None:
    """The issue's reference count (SplineCam, float64) for MLP 2-64-64-64-2 on [-3, 3]^2."""
    eye = torch.eye(2, dtype=torch.float64)
    part = sl.slice_partition(anchor_mlp, torch.zeros(2, dtype=torch.float64), eye)
    assert len(part) == 14439
    assert [len(la) for la in part.layers][-1] == 14439
    assert abs(part.areas.sum() - 36.0) < 1e-9
    assert len(np.unique(_keys(part.codes), axis=0)) == len(part)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_regions_match_grid_samples(name: str) -> None:
    """Same region if and only if same code, on random plane points, for every zoo network."""
    model = zoo.build(name)
    origin, dirs = _plane(name)
    h = 0.2 if origin.numel() > 50 else 1.0  # a few hundred regions either way
    part = sl.slice_partition(model, origin, dirs, bounds=(-h, h, -h, h))
    assert len(part) > 10
    assert abs(part.areas.sum() - 4 * h * h) < 1e-12
    assert (part.areas > 0).all()
    keys = _keys(part.codes)
    assert len(np.unique(keys, axis=0)) == len(part)  # no two regions share a code
    uv = np.random.default_rng(0).uniform(-h, h, (3000, 2))
    region = part.locate(uv)
    assert (region >= 0).all()
    x = part.to_input(uv)
    assert (_keys(sl.partition_codes(model, x)) == keys[region]).all()
    f = zoo.logits(model, x).reshape(len(uv), -1).detach().numpy()
    pred = np.einsum("pck,pk->pc", part.logits[region], np.c_[uv, np.ones(len(uv))])
    np.testing.assert_allclose(pred, f, rtol=0, atol=1e-9 * max(1.0, np.abs(f).max()))


def test_points_inside_each_region_share_its_code(anchor_mlp: nn.Module) -> None:
    origin = torch.zeros(2, dtype=torch.float64)
    part = sl.slice_partition(anchor_mlp, origin, torch.eye(2, dtype=torch.float64), (0, 1, 0, 1))
    rng = np.random.default_rng(1)
    w = rng.dirichlet(np.ones(part.vertices.shape[1]), len(part))  # convex weights per region
    valid = np.arange(part.vertices.shape[1])[None] < part.counts[:, None]
    w = np.where(valid, w, 0)
    w /= w.sum(1, keepdims=True)
    uv = np.einsum("rw,rwk->rk", w, part.vertices)
    assert (_keys(sl.partition_codes(anchor_mlp, part.to_input(uv))) == _keys(part.codes)).all()


def test_each_layer_subdivides_the_previous(anchor_mlp: nn.Module) -> None:
    origin = torch.zeros(2, dtype=torch.float64)
    part = sl.slice_partition(anchor_mlp, origin, torch.eye(2, dtype=torch.float64), (-1, 1, 0, 2))
    for before, after in zip(part.layers, part.layers[1:]):
        inner = poly.interior(after.vertices, after.counts)
        holder = poly.locate(before.vertices, before.counts, inner)
        assert (holder == after.parent).all()
        sums = np.bincount(after.parent, poly.areas(after.vertices, after.counts), len(before))
        np.testing.assert_allclose(sums, poly.areas(before.vertices, before.counts), atol=1e-12)
    assert len(part.layers[0]) <= len(part.layers[1]) <= len(part.layers[2])


def test_decision_boundary_is_where_the_top_class_changes() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    net = net.double().eval()
    origin = torch.zeros(2, dtype=torch.float64)
    part = sl.slice_partition(net, origin, torch.eye(2, dtype=torch.float64), (-4, 4, -4, 4))
    seg = part.boundary
    assert len(seg) > 0
    mid = seg.mean(1)
    normal = (seg[:, 1] - seg[:, 0])[:, ::-1] * np.array([1.0, -1.0])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    with torch.no_grad():
        f_mid = net(part.to_input(mid)).numpy()
        left = net(part.to_input(mid + 1e-6 * normal)).argmax(1).numpy()
        right = net(part.to_input(mid - 1e-6 * normal)).argmax(1).numpy()
    top2 = np.sort(f_mid, 1)[:, -2:]
    np.testing.assert_allclose(top2[:, 0], top2[:, 1], atol=1e-9)
    assert (left != right).all()
    # a short step that changes the top class crosses one of the segments
    rng = np.random.default_rng(0)
    p = rng.uniform(-4, 4, (4000, 2))
    q = p + rng.normal(0, 0.05, p.shape)
    with torch.no_grad():
        changed = (net(part.to_input(p)).argmax(1) != net(part.to_input(q)).argmax(1)).numpy()
    assert changed.sum() > 10
    assert _crosses(p[changed], q[changed], seg).all()


def _relu_logits(kind: str) -> nn.Module:
    """Logits that end in a ReLU: the top class changes exactly where a unit switches."""
    torch.manual_seed(4)
    if kind == "random":
        net = nn.Sequential(nn.Linear(2, 12), nn.ReLU(), nn.Linear(12, 3), nn.ReLU())
        return net.double().eval()
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.3], [-1.0, -0.3]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.eye(2) if kind == "relu(z), relu(-z)" else torch.ones(2, 2))
        net[2].bias.zero_()
        if kind == "|z| and 0":  # (the top class is 0 on both sides of z = 0)
            net[2].weight[1] = 0.0
    return net


@pytest.mark.parametrize("kind", ["relu(z), relu(-z)", "random", "|z| and 0"])
def test_a_decision_boundary_on_region_edges_is_found(kind: str) -> None:
    """Only changes inside regions were found: [relu(z), relu(-z)] changes class on z = 0, a
    region edge, and had no boundary at all. Reference: the model's classes at both ends of
    short random steps; a step that changes the class crosses a segment, and only then."""
    net = _relu_logits(kind)
    eye, origin = torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    part = sl.slice_partition(net, origin, eye, (-2, 2, -2, 2))
    seg = part.boundary
    rng = np.random.default_rng(0)
    p = rng.uniform(-2, 2, (4000, 2))
    q = p + rng.normal(0, 0.05, p.shape)
    with torch.no_grad():
        changed = (net(part.to_input(p)).argmax(1) != net(part.to_input(q)).argmax(1)).numpy()
    assert (changed.sum() > 10) == (kind != "|z| and 0")
    assert _crosses(p[changed], q[changed], seg).all()
    if kind == "|z| and 0":
        assert len(seg) == 0
    if kind == "relu(z), relu(-z)":  # the one line u + w v = 0 (w = 0.3 in float32), across
        w = float(net[0].weight.detach()[0, 1])
        np.testing.assert_allclose(seg[:, :, 0] + w * seg[:, :, 1], 0.0, atol=1e-12)
        length = np.linalg.norm(seg[:, 1] - seg[:, 0], axis=1).sum()
        assert length == pytest.approx(4 * (1 + w * w) ** 0.5, rel=1e-12)


def _crosses(p: np.ndarray, q: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Whether segment p-q (P, 2) properly intersects any of seg (S, 2, 2): (P,)."""

    def orient(a, b, c):
        return (b[..., 0] - a[..., 0]) * (c[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (
            c[..., 0] - a[..., 0]
        )

    a, b = seg[None, :, 0], seg[None, :, 1]
    P, Q = p[:, None], q[:, None]
    hit = (orient(P, Q, a) * orient(P, Q, b) <= 0) & (orient(a, b, P) * orient(a, b, Q) <= 0)
    return hit.any(1)


def test_plane_through_three_points() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3)).double().eval()
    xs = torch.randn(3, 20, dtype=torch.float64)
    part = sl.slice_partition(net, points=tuple(xs))
    back = part.to_input(part.anchors)
    np.testing.assert_allclose(back.numpy(), xs.numpy(), atol=1e-12)
    u0, u1, v0, v1 = part.bounds
    assert u1 - u0 == pytest.approx(v1 - v0)  # a square
    assert (part.locate(part.anchors) >= 0).all()


def test_float32_model_is_sliced_in_float64() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    part = sl.slice_partition(net, torch.zeros(2), torch.eye(2))
    assert part.origin.dtype == torch.float64
    assert next(net.parameters()).dtype == torch.float32  # the user's model is untouched


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"origin": torch.zeros(2), "directions": torch.zeros(3, 2)}, "directions must have"),
        ({"origin": torch.zeros(2), "directions": torch.eye(2), "bounds": (1, 0, 0, 1)}, "u0 < u1"),
        ({"points": (torch.zeros(2), torch.ones(2), 2 * torch.ones(2))}, "one line"),
        ({}, "needs origin and directions"),
    ],
)
def test_bad_planes_are_refused(kwargs: dict, match: str) -> None:
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with pytest.raises(ValueError, match=match):
        sl.slice_partition(net, **kwargs)


@pytest.mark.parametrize("color", ["random", "class", "slope"])
def test_slice_figure(tmp_path, anchor_mlp: nn.Module, color: str) -> None:
    from splinelens.paper.figures import plot_slice, slice_figure

    eye = torch.eye(2, dtype=torch.float64)
    part = sl.slice_partition(anchor_mlp, torch.zeros(2, dtype=torch.float64), eye, (0, 1, 0, 1))
    out = slice_figure(part, tmp_path / "s.png", color)
    assert out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="color must be"):
        plot_slice(part, color="rainbow")


def test_locate_with_large_weights_finds_each_points_region() -> None:
    """Weights scaled by 1000 (the same layer-1 lines, larger numbers): every grid point is
    located in a region whose code is its own (reference: partition_codes of the point), and
    the padding of the vertex arrays repeats each region's first vertex."""
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(2, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
    m = m.double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1000)
    o, d = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    part = sl.slice_partition(m, o, d, bounds=(-2, 2, -2, 2))
    pad = ~(np.arange(part.vertices.shape[1])[None, :] < part.counts[:, None])
    assert (part.vertices == part.vertices[:, :1])[pad].all()
    g = np.linspace(-2, 2, 62)[1:-1]
    uv = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    loc = torch.as_tensor(part.locate(uv))
    truth = sl.partition_codes(m, part.to_input(uv))
    for mine, ref in zip(part.codes.layers, truth.layers, strict=True):
        assert torch.equal(mine.data[loc], ref.data)


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_a_window_far_from_the_plane_origin_is_as_exact_as_one_at_it(offset: float) -> None:
    """The same 2x2 window as u in [offset - 1, offset + 1]: every random point is located in a
    region whose code is its own, each region's logits are f there (references: partition_codes
    and the model), and a region 1e-7 wide is kept (tolerances once scaled with |bounds|: 3,293
    of 4,000 points were misplaced at 1e6, and the thin region lost)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    m = m.double().eval()
    o, d = torch.tensor([-offset, 0.0], dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    part = sl.slice_partition(m, o, d, bounds=(offset - 1, offset + 1, -1, 1))
    near = sl.slice_partition(m, torch.zeros(2, dtype=torch.float64), d, bounds=(-1, 1, -1, 1))
    assert len(part) == len(near)
    rng = np.random.default_rng(0)
    uv = np.c_[rng.uniform(offset - 1, offset + 1, 2000), rng.uniform(-1, 1, 2000)]
    loc = part.locate(uv)
    truth = sl.partition_codes(m, part.to_input(uv))
    for mine, ref in zip(part.codes.layers, truth.layers, strict=True):
        assert torch.equal(mine.data[torch.as_tensor(loc)], ref.data)
    with torch.no_grad():
        f = m(part.to_input(uv)).numpy()
    pred = np.einsum("pck,pk->pc", part.logits[loc], np.c_[uv, np.ones(len(uv))])
    assert np.abs(pred - f).max() <= 1e-9 * max(1.0, offset)
    thin = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)).double().eval()
    with torch.no_grad():
        thin[0].weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        thin[0].bias.copy_(torch.tensor([-offset, -offset - 1e-7], dtype=torch.float64))
    zero = torch.zeros(2, dtype=torch.float64)
    assert len(sl.slice_partition(thin, zero, d, bounds=(offset - 1, offset + 1, -1, 1))) == 3


@pytest.mark.parametrize("h", [1e-5, 1e-7])
def test_a_small_window_is_located_as_exactly_as_a_unit_one(h: float) -> None:
    """Zooming in: bounds +-h with directions D / h give the same partition as +-1 with D; every
    point is located in a region whose code is its own (reference: partition_codes). An absolute
    edge tolerance placed 2,983 of 4,000 points in the wrong region at h = 1e-7."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
    m = m.double().eval()
    o, d = torch.randn(3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    part = sl.slice_partition(m, o, d / h, (-h, h, -h, h))
    assert len(part) == len(sl.slice_partition(m, o, d, (-1, 1, -1, 1)))
    uv = np.random.default_rng(0).uniform(-h, h, (2000, 2))
    loc = torch.as_tensor(part.locate(uv))
    truth = sl.partition_codes(m, part.to_input(uv))
    for mine, ref in zip(part.codes.layers, truth.layers, strict=True):
        assert torch.equal(mine.data[loc], ref.data)


def _scaled_mlp(scale: float, classes: int = 2) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, classes)).double().eval()
    with torch.no_grad():
        m[2].weight.mul_(scale)
        m[2].bias.mul_(scale)
    return m


@pytest.mark.parametrize("classes", [1, 2])
def test_a_slice_whose_values_overflow_is_refused(classes: int) -> None:
    """Outputs of 1e316 on the window: the logits were nan and the decision boundary empty,
    with only numpy's overflow warnings (one class: logits of inf, no warning)."""
    o, d = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    m = _scaled_mlp(1e306, classes)
    with pytest.raises(ValueError, match=r"overflow float64 .* narrow the bounds"):
        sl.slice_partition(m, o, d, bounds=(-1e10, 1e10, -1e10, 1e10))


def test_a_slice_whose_hidden_values_overflow_is_refused_without_numpy_warnings() -> None:
    """Weights of 1e150 in three layers: the refusal came after a dozen numpy overflow
    warnings from the cutting (found in review)."""
    torch.manual_seed(1)
    layers = [nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()]
    m = nn.Sequential(*layers, nn.Linear(8, 3)).double().eval()
    with torch.no_grad():
        for i in (0, 2, 4):
            m[i].weight.mul_(1e150)
            m[i].bias.mul_(1e150)
    o, d = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(ValueError, match=r"overflow float64"):
            sl.slice_partition(m, o, d)


def test_large_but_finite_values_give_the_partition_of_the_unscaled_model() -> None:
    """Scaling the last layer by 1e300 changes neither the regions nor the decision boundary
    (reference: the same model at scale 1); the logits scale with it (rtol 1e-12)."""
    o, d = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    big = sl.slice_partition(_scaled_mlp(1e300), o, d, bounds=(-3, 3, -3, 3))
    ref = sl.slice_partition(_scaled_mlp(1.0), o, d, bounds=(-3, 3, -3, 3))
    assert np.array_equal(big.counts, ref.counts)
    np.testing.assert_allclose(big.vertices, ref.vertices, rtol=0, atol=1e-12)
    np.testing.assert_allclose(big.boundary, ref.boundary, rtol=0, atol=1e-12)
    np.testing.assert_allclose(big.logits, ref.logits * 1e300, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "uv, match",
    [
        ([0.1, 0.2], r"\(P, 2\).* \[\[0.1, 0.2\]\]"),
        (np.zeros((3, 3)), r"\(P, 2\).* got shape \(3, 3\)"),
        ([[0.1, float("nan")]], r"uv holds nan at index \(0, 1\)"),
        ([["a", "b"]], r"numbers"),
    ],
)
def test_locate_and_to_input_refuse_points_that_are_not_p_by_2(uv, match: str) -> None:
    """A single point as a 1-D list raised numpy's IndexError; a NaN point was located at -1
    ("outside the bounds") with a numpy warning."""
    o, d = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    part = sl.slice_partition(_scaled_mlp(1.0), o, d, bounds=(-1, 1, -1, 1))
    for method in (part.locate, part.to_input):
        with pytest.raises(ValueError, match=match):
            method(uv)
    assert part.locate([[0.1, 0.2]]).shape == (1,)
    assert part.locate(torch.tensor([[0.1, 0.2], [5.0, 0.0]]))[1] == -1


def _small_triangle(eps: float) -> nn.Module:
    """Lines u = 0, v = 0 and u + v = eps: seven regions, one a triangle of side eps."""
    m = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).double().eval()
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        m[0].bias.copy_(torch.tensor([0.0, 0.0, -eps]))
    return m


@pytest.mark.parametrize("eps", [1e-3, 1e-6, 1e-8])
def test_points_near_a_small_region_are_located_in_their_own(eps: float) -> None:
    """locate's edge test took a tolerance on the cross product, not on the distance: it grew as
    1 / |edge|, and a 1e-6 triangle held points 6e-7 outside it (5,582 of 100,000 around it
    misplaced; found in review). Reference: partition_codes of each point, points within 1e-11
    of a line left out."""
    m = _small_triangle(eps)
    d = torch.eye(2, dtype=torch.float64)
    part = sl.slice_partition(m, torch.zeros(2, dtype=torch.float64), d, (-1, 1, -1, 1))
    assert len(part) == 7
    uv = np.random.default_rng(0).uniform(-3 * eps, 3 * eps, (20000, 2))
    uv = uv[np.abs(np.c_[uv, uv.sum(1) - eps]).min(1) > 1e-11]
    loc = torch.as_tensor(part.locate(uv))
    truth = sl.partition_codes(m, part.to_input(uv))
    assert torch.equal(part.codes.layers[0].data[loc], truth.layers[0].data)


def test_a_slice_with_regions_below_its_resolution_is_refused() -> None:
    """Boundaries that pass within 1e-10 of the window of each other's crossings are cut
    there as one: 132 regions came out where points find 146 codes, 7 codes twice, silently
    (found in review). Two regions sharing a code are refused; the same slice with the
    biases unscaled is computed (the reference: every code distinct)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    m = m.double().eval()
    o, d = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    part = sl.slice_partition(m, o, d, (-2, 2, -2, 2))
    rows = np.concatenate([la.data.numpy() for la in part.codes.layers], 1)
    assert len(np.unique(rows, axis=0)) == len(part)
    with torch.no_grad():
        m[0].bias.mul_(1e-9)
        m[2].bias.mul_(1e-9)
    with pytest.raises(ValueError, match="narrower than its resolution"):
        sl.slice_partition(m, o, d, (-2, 2, -2, 2))
