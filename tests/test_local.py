"""Region radii, H-representations and local complexity against line searches and explicit sums."""

from __future__ import annotations

import dataclasses
import gc
import threading
import weakref

import pytest
import torch
import torch.nn as nn

import splinelens as sl
from splinelens.geometry.region import unit_distances
from tests import zoo

F64 = torch.float64


def _same_code(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(P,) whether each y (P, ...) has the code of the single input x (1, ...)."""
    cx, cy = sl.partition_codes(model, x), sl.partition_codes(model, y)
    return sl.partition_distance(cy, cx).reshape(-1) == 0


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_radius_is_the_exit_distance(name: str) -> None:
    """Every ball of radius r stays in x's region; the nearest hyperplane is left right after r."""
    model, x = zoo.build(name), zoo.inputs(name, n=3)
    r = sl.region_radius(model, x)
    assert r.shape == (3,) and (r > 0).all()
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        u = torch.randn(64, *x.shape[1:], generator=g, dtype=x.dtype)
        u = u / u.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
        inside = x[i : i + 1] + (1 - 1e-7) * r[i] * u
        assert _same_code(model, x[i : i + 1], inside).all()
        poly = sl.region_polytope(model, x[i : i + 1])
        n = poly.A / poly.A.norm(dim=1, keepdim=True)
        dist = (poly.b - poly.A @ x[i].reshape(-1)) / poly.A.norm(dim=1)
        j = torch.where(poly.A.norm(dim=1) > 0, dist, torch.inf).argmin()
        assert dist[j].item() == pytest.approx(r[i].item(), rel=1e-9)
        step = n[j].view(1, *x.shape[1:])
        assert _same_code(model, x[i : i + 1], x[i : i + 1] + (1 - 1e-6) * r[i] * step).all()
        assert not _same_code(model, x[i : i + 1], x[i : i + 1] + (1 + 1e-6) * r[i] * step).any()


def test_radius_against_explicit_mlp() -> None:
    """min over units of |z_k| / ||grad z_k||, with gradients from torch.func.jacrev."""
    model, x = zoo.build("mlp"), zoo.inputs("mlp", n=5)
    lin = [m for m in model if isinstance(m, nn.Linear)]

    def pre(xi: torch.Tensor) -> torch.Tensor:
        z1 = lin[0](xi)
        return torch.cat([z1, lin[1](torch.relu(z1))])

    ref = []
    for xi in x:
        z, jac = pre(xi), torch.func.jacrev(pre)(xi)
        ref.append((z.abs() / jac.norm(dim=1)).min())
    torch.testing.assert_close(sl.region_radius(model, x), torch.stack(ref), rtol=1e-10, atol=0)


def test_radius_along_random_lines_is_never_shorter() -> None:
    """Bisection for a code change along random lines (all lines in one batch): never closer
    than the radius."""
    model, x = zoo.build("small_cnn"), zoo.inputs("small_cnn", n=1)
    r = sl.region_radius(model, x)[0].item()
    g = torch.Generator().manual_seed(1)
    u = torch.randn(8, *x.shape[1:], generator=g, dtype=x.dtype)
    u = u / u.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))  # (8, *in) unit lines
    lo, hi = torch.zeros(8, dtype=x.dtype), torch.ones(8, dtype=x.dtype)

    def along(t: torch.Tensor) -> torch.Tensor:  # (8,) points x + t u, (8, *in)
        return x + t.view(-1, *[1] * (x.dim() - 1)) * u

    while (same := _same_code(model, x, along(hi))).any():
        hi = torch.where(same, 2 * hi, hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        same = _same_code(model, x, along(mid))
        lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
    assert (hi >= r * (1 - 1e-9)).all()


@pytest.mark.parametrize("name", ["mlp", "small_cnn", "maxout", "mixed_activations"])
def test_polytope_holds_exactly_the_points_with_x_code(name: str) -> None:
    model, x = zoo.build(name), zoo.inputs(name, n=1)
    poly = sl.region_polytope(model, x)
    r = sl.region_radius(model, x)[0]
    g = torch.Generator().manual_seed(2)
    y = x + 3 * r * torch.randn(400, *x.shape[1:], generator=g, dtype=x.dtype)
    inside = poly.contains(y)
    assert 0 < inside.sum() < len(y)  # both kinds of points are tested
    assert (inside == _same_code(model, x, y)).all()
    if x[0].numel() <= 16:
        small = poly.minimal()
        assert len(small.b) <= len(poly.b)
        assert (small.contains(y) == inside).all()


def test_minimal_polytope_keeps_one_of_equal_rows_and_ignores_the_weights_scale() -> None:
    """Of two equal rows both were dropped (each implied by the other), and an absolute slack
    of 1e-9 dropped every row of a network with weights near 1e-9: the "minimal" polytope
    was larger than the region. Reference: membership in the full polytope, on samples."""
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU()).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
        net[0].bias.zero_()
    poly = sl.region_polytope(net, torch.tensor([[0.5, 0.5]], dtype=F64))
    small = poly.minimal()
    assert sorted(small.unit.tolist()) in ([0, 2], [1, 2])  # one of the two equal rows
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 1e-9, 1e6):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(2, 24), nn.ReLU()).double().eval()
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(scale)
        x = torch.full((1, 2), 0.1, dtype=F64)
        poly = sl.region_polytope(net, x)
        small = poly.minimal()
        y = x + 3 * torch.randn(4000, 2, generator=g, dtype=F64)
        assert 0 < len(small.b) < len(poly.b)
        assert torch.equal(small.contains(y), poly.contains(y)), scale
        assert len(dataclasses.replace(poly, point=None).minimal().b) == len(small.b)


@pytest.mark.parametrize("scale", [1e160, 1e300])
def test_minimal_polytope_keeps_its_facets_for_rows_whose_norms_overflow(scale: float) -> None:
    """The norm of a row of 1e160 overflowed to inf: the row became 0, "implied", and minimal()
    kept only the one redundant row of {u <= 1, v <= 1, u + v <= 3} (found in review).
    Reference: the same polytope at scale 1, and membership in the full one."""
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU()).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(scale * torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64))
        net[0].bias.copy_(-scale * torch.tensor([1.0, 1.0, 3.0], dtype=F64))
    poly = sl.region_polytope(net, torch.zeros(1, 2, dtype=F64))
    small = poly.minimal()
    assert small.unit.tolist() == [0, 1]
    y = 4 * torch.rand(2000, 2, generator=torch.Generator().manual_seed(0), dtype=F64) - 2
    assert torch.equal(small.contains(y), poly.contains(y))


def test_local_complexity_layer_one_is_an_explicit_count() -> None:
    model, x = zoo.build("mlp"), zoo.inputs("mlp", n=6)
    radii = [0.05, 0.2, 1.0, 5.0]
    lc = sl.local_complexity(model, x, radii)
    w, b = model[0].weight, model[0].bias
    dist = (x @ w.T + b).abs() / w.norm(dim=1)  # (N, 16): exact distances to layer-1 hyperplanes
    ref = torch.stack([(dist <= r).sum(1) for r in radii], 1)
    assert torch.equal(lc.counts[:, 0], ref)
    assert (lc.counts.diff(dim=-1) >= 0).all()  # more hyperplanes within larger balls
    sampled = sl.sampled_local_complexity(model, x, radii, directions=6)
    assert (sampled.counts[:, 0] <= lc.counts[:, 0]).all()  # the polytope lies in the ball
    assert sampled.counts.shape == lc.counts.shape


def test_region_polytope_takes_one_input() -> None:
    model, x = zoo.build("mlp"), zoo.inputs("mlp", n=2)
    with pytest.raises(ValueError, match="one input"):
        sl.region_polytope(model, x)


def test_affine_network_has_one_unbounded_region() -> None:
    net = nn.Sequential(nn.Linear(2, 3)).double().eval()
    x = torch.randn(3, 2, dtype=torch.float64)
    assert torch.isinf(sl.region_radius(net, x)).all()
    assert sl.local_complexity(net, x, [1.0]).counts.shape == (3, 0, 1)
    assert sl.sampled_local_complexity(net, x, [1.0]).counts.shape == (3, 0, 1)
    part = sl.slice_partition(net, torch.zeros(2), torch.eye(2))
    assert len(part) == 1 and part.areas.sum() == pytest.approx(36.0)


def test_radius_keeps_its_digits_for_large_inputs_and_offsets() -> None:
    """Slopes come from forward-mode derivatives, not slots(x + e_i) - slots(x): large
    pre-activations or inputs do not cancel their digits (a difference gave 4.4e15 for 2e16)."""
    net = nn.Sequential(nn.Linear(2, 1), nn.ReLU()).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[3.0, 4.0]]))
        net[0].bias.fill_(1e17)
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(sl.region_radius(net, x), torch.tensor([(1e17 + 7) / 5]).double())
    torch.manual_seed(0)
    f32 = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    x = torch.rand(20, 16) + 1e4  # unnormalised inputs, float32
    with torch.no_grad():  # float64 margins of layer 1 over its exact slopes
        w = f32[0].weight.double()
        ref = (x.double() @ w.T + f32[0].bias.double()).abs() / w.norm(dim=1)
    got = sl.region_radius(f32, x).double()  # this network's radius is layer 1's nearest unit
    assert float(((got - ref.min(1).values) / ref.min(1).values).abs().max()) < 1e-5


def test_slopes_fall_back_to_differences_where_forward_mode_fails(monkeypatch) -> None:
    """An op without a forward-mode rule under vmap: the frozen network's differences (exact up
    to rounding at ordinary scales) instead of a raw error."""
    model, x = zoo.build("small_cnn"), zoo.inputs("small_cnn", n=3)
    want = sl.region_radius(model, x)

    def no_rule(*args, **kwargs):
        raise NotImplementedError("no batching rule")

    monkeypatch.setattr(torch.func, "vmap", no_rule)
    torch.testing.assert_close(sl.region_radius(model, x), want, rtol=1e-10, atol=0)


class _CrossingClamp(nn.Module):
    """Clamps with tensor bounds that cross (min > max gives max): constant bounds, crossing in
    some units, and bounds taken from other units' activations."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(2, 6), nn.Linear(7, 2)
        self.register_buffer("lo", torch.tensor([0.5, -0.5, 0.2]))
        self.register_buffer("hi", torch.tensor([-0.5, 0.5, 0.1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        fixed = torch.clamp(h[:, :3], self.lo, self.hi)
        moving = torch.clamp(h[:, 4:], min=h[:, 2:3], max=h[:, 3:4])
        return self.c(torch.cat([fixed, h[:, 3:4], moving, h[:, 2:3]], 1))


def test_polytope_of_clamps_whose_tensor_bounds_cross() -> None:
    """torch.clamp with tensor bounds is max with min, then min with max: where the bounds cross,
    one three-piece unit put boundaries where the network has none (found by a fuzzing review:
    most nearby points with x's code fell outside x's polytope)."""
    torch.manual_seed(3)
    model = _CrossingClamp().double().eval()
    g = torch.Generator().manual_seed(4)
    for x in torch.randn(4, 1, 2, generator=g, dtype=torch.float64):
        poly = sl.region_polytope(model, x)
        y = x + torch.randn(400, 2, generator=g, dtype=torch.float64)
        inside = poly.contains(y)
        assert 0 < inside.sum() < len(y)
        assert (inside == _same_code(model, x, y)).all()


def _float32_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
        nn.Dropout(0.5),  # (in eval mode: the identity)
    ).eval()


def test_float32_region_geometry_is_the_float64_models_and_ignores_the_batch() -> None:
    """A float32 model's radii, unit distances, local complexity, sampled complexity and
    polytope are those of its float64 copy (reference: the same functions on
    ``model.double()``, float64 inputs), rounded to float32, and the same whether an input comes
    alone or in a batch (in float32 the margins lost digits: radii 1% off, batch-dependent)."""
    model = _float32_cnn()
    ref = _float32_cnn().double()
    x = torch.randn(4, 3, 8, 8)
    radius = sl.region_radius(model, x)
    assert radius.dtype == torch.float32
    torch.testing.assert_close(radius, sl.region_radius(ref, x.double()).float(), rtol=0, atol=0)
    alone = torch.cat([sl.region_radius(model, x[i : i + 1]) for i in range(4)])
    assert torch.equal(radius, alone)
    for ours, theirs in zip(unit_distances(model, x), unit_distances(ref, x.double())):
        assert torch.equal(ours, theirs.float())
    radii = torch.logspace(-4, 0, 50)
    lc = sl.local_complexity(model, x, radii).counts
    assert torch.equal(lc, sl.local_complexity(ref, x.double(), radii.double()).counts)
    slc = sl.sampled_local_complexity(model, x, [1e-3, 0.1], directions=4)
    assert slc.radii.dtype == torch.float32
    slc64 = sl.sampled_local_complexity(ref, x.double(), [1e-3, 0.1], 4)
    assert torch.equal(slc.counts, slc64.counts)
    poly, poly64 = sl.region_polytope(model, x[:1]), sl.region_polytope(ref, x[:1].double())
    assert poly.A.dtype == torch.float32 and torch.equal(poly.A, poly64.A.float())
    assert torch.equal(poly.b, poly64.b.float())


@pytest.mark.usefixtures("young_heap")
def test_the_float64_twin_follows_the_model() -> None:
    """The float64 copy is kept per model: writes through .data and in place reach it, a
    replaced module makes a new copy, and the model's refusals still name its own tensors and
    dtypes (reference: the float64 model built from the same values)."""
    model, x = _float32_cnn(), torch.randn(2, 3, 8, 8)
    before = sl.region_radius(model, x)
    model[0].weight.data.mul_(0.5)  # through .data: no version bump
    with torch.no_grad():
        model[3].bias.add_(0.1)
    ref = _float32_cnn().double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    now = sl.region_radius(model, x)
    assert not torch.equal(now, before)
    torch.testing.assert_close(now, sl.region_radius(ref, x.double()).float(), rtol=0, atol=0)
    model[6] = nn.Linear(8 * 4 * 4, 3)  # a new module: a new copy
    ref[6] = nn.Linear(8 * 4 * 4, 3).double()
    ref[6].load_state_dict({k: v.double() for k, v in model[6].state_dict().items()})
    torch.testing.assert_close(
        sl.region_radius(model, x), sl.region_radius(ref, x.double()).float(), rtol=0, atol=0
    )
    model[3].weight.data[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'3\.weight' holds nan"):
        sl.region_radius(model, x)
    model[3].weight.data[0, 0, 0, 0] = 0.0
    with pytest.raises(ValueError, match="float64"):
        sl.region_radius(model, x.double())  # x must still match the model's dtype
    model.train()
    with pytest.raises(ValueError, match="train"):
        sl.region_radius(model, x)
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None  # the copy kept per model does not keep the model alive


class _Perm(nn.Module):
    """Permutes its input's features by an int64 buffer, or by an index held in a list."""

    def __init__(self, in_list: bool) -> None:
        super().__init__()
        self.register_buffer("perm", torch.arange(4))
        self.held = [torch.arange(4)] if in_list else []

    def index(self) -> torch.Tensor:
        return self.held[0] if self.held else self.perm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.index()]


class _Permuted(nn.Module):
    """An MLP whose input is permuted (``_Perm``), with an attribute (a function) that closes
    over the module itself, and optionally a lock (an object deepcopy refuses)."""

    def __init__(self, lock: bool = False, in_list: bool = False, closure: bool = True) -> None:
        super().__init__()
        self.p = _Perm(in_list)
        self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)
        if closure:
            self.describe = lambda: f"{sum(p.numel() for p in self.parameters())} parameters"
        if lock:
            self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.p(x))))


def _radius64(model: _Permuted, x: torch.Tensor) -> torch.Tensor:
    """The float64 reference: region_radius of an explicit float64 rebuild of the model."""
    ref = _Permuted(in_list=bool(model.p.held)).double().eval()
    state = model.state_dict()
    ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
    ref.p.held = [t.clone() for t in model.p.held]
    return sl.region_radius(ref, x.double())


def test_the_float64_twin_keeps_a_reference_to_the_root_unregistered(monkeypatch) -> None:
    """A reference back to the root held outside ``_modules`` stays so in the float64 copy: it
    was registered there, which made the module tree a cycle (RecursionError). Reference: the
    float64 rebuild's radius (float32 rounding of the inputs); the copy and its capture are
    reused at a second call."""
    torch.manual_seed(0)
    model, x = _Permuted(closure=False).eval(), torch.randn(5, 4)
    object.__setattr__(model.fc1, "held", model)
    first = sl.region_radius(model, x)
    torch.testing.assert_close(first, _radius64(model, x).float(), rtol=1e-6, atol=1e-7)
    exports, export = [], torch.export.export
    monkeypatch.setattr(
        torch.export, "export", lambda *a, **k: exports.append(1) or export(*a, **k)
    )
    torch.testing.assert_close(sl.region_radius(model, x), first, rtol=0, atol=0)
    assert not exports


def test_a_module_held_outside_the_tree_is_measured_in_its_own_dtype_with_a_warning() -> None:
    """A module with weights held outside ``_modules`` is not converted by ``.double()``, and the
    model's state does not list its weights: the float64 copy would run mixed dtypes (it failed
    with a dtype error) or go stale. The region functions say so and run in float32 (reference:
    the float64 rebuild, to float32 precision)."""
    torch.manual_seed(0)
    model, x = _Permuted(closure=False).eval(), torch.randn(5, 4)
    object.__setattr__(model.fc1, "helper", nn.Linear(3, 3))
    with pytest.warns(UserWarning, match="'fc1.helper' holds a module outside the module tree"):
        r = sl.region_radius(model, x)
    torch.testing.assert_close(r, _radius64(model, x).float(), rtol=1e-4, atol=1e-6)


@pytest.mark.usefixtures("young_heap")
@pytest.mark.parametrize("closure", [False, True])
@pytest.mark.parametrize("in_list", [False, True])
def test_the_float64_twin_follows_integer_indices_and_frees_its_model(in_list, closure) -> None:
    """An in-place change of an int64 index, a buffer or a tensor in a list, reaches the float64
    copy, and a model with a function closing over itself is still freed once dropped (its
    copy, which would lead back to it, is not kept). Reference: explicit float64 rebuilds."""
    torch.manual_seed(0)
    model, x = _Permuted(in_list=in_list, closure=closure).eval(), torch.randn(5, 4)
    torch.testing.assert_close(sl.region_radius(model, x), _radius64(model, x).float())
    model.p.index().copy_(torch.tensor([3, 2, 1, 0]))  # in place: no new object or structure
    after = sl.region_radius(model, x)
    torch.testing.assert_close(after, _radius64(model, x).float(), rtol=0, atol=0)
    assert not torch.equal(after, sl.region_radius(_Permuted().eval(), x))  # (it did change)
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


def test_a_model_that_cannot_be_copied_is_measured_in_its_own_dtype_with_a_warning() -> None:
    """A float32 model holding a lock cannot be deep-copied to float64: the region geometry
    says so and runs in float32, as it did before (reference: the float64 rebuild, to float32
    precision)."""
    torch.manual_seed(0)
    model, x = _Permuted(lock=True).eval(), torch.randn(5, 4)
    with pytest.warns(UserWarning, match="cannot be copied to float64.*computing in torch.float32"):
        r = sl.region_radius(model, x)
    torch.testing.assert_close(r, _radius64(model, x).float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("entry", ["region_radius", "region_polytope", "local_complexity"])
def test_the_float32_fallback_warning_names_the_callers_line(entry) -> None:
    """The warning points at the user's call, however deep inside splinelens it is raised
    (it pointed inside region.py for region_radius; reference: this file)."""
    model, x = _Permuted(lock=True).eval(), torch.randn(1, 4)
    args = ([0.5],) if entry == "local_complexity" else ()
    with pytest.warns(UserWarning, match="computing in torch.float32") as seen:
        getattr(sl, entry)(model, x, *args)
    assert {w.filename for w in seen} == {__file__}


@pytest.mark.parametrize("scale", [1e155, 1e-160, 1e-200])
def test_radius_holds_at_extreme_weight_scales(scale: float) -> None:
    """Scaling a layer moves none of its hyperplanes: the radius and local complexity stay those
    at scale 1 (before: the squared gradients overflowed to a radius of 0, or vanished to inf)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double().eval()
    x = torch.randn(3, 3, dtype=torch.float64)
    ref, counts = sl.region_radius(model, x), sl.local_complexity(model, x, [0.3]).counts
    with torch.no_grad():
        model[0].weight.mul_(scale)
        model[0].bias.mul_(scale)
    torch.testing.assert_close(sl.region_radius(model, x), ref, rtol=1e-12, atol=0)
    assert torch.equal(sl.local_complexity(model, x, [0.3]).counts, counts)


_OVERFLOWING = {
    "region_radius": lambda net, x: sl.region_radius(net, x),
    "local_complexity": lambda net, x: sl.local_complexity(net, x, [1.0]),
    "sampled_local_complexity": lambda net, x: sl.sampled_local_complexity(net, x, [0.1]),
    "region_polytope": lambda net, x: sl.region_polytope(net, x[2:3]),
    "layer_maso": lambda net, x: sl.layer_maso(net, x[2:], 2),  # (x's first input is used)
}


@pytest.mark.parametrize("entry", list(_OVERFLOWING))
def test_region_geometry_refuses_a_slot_that_overflows_to_inf(entry: str) -> None:
    """A pre-activation of inf (1e200 * 1e200) with a finite slope passed the first overflow
    check (nan only): region_polytope gave no rows (all of space), local_complexity 0 where
    the boundary is 1e200 away (found in review of that check). Reference: partition_codes,
    which refuses the input."""
    net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1e200], [1.0]], dtype=F64))
        net[0].bias.copy_(torch.tensor([0.0, -5e200], dtype=F64))
    x = torch.tensor([[1.0], [2.0], [1e200]], dtype=F64)  # (input 2 overflows)
    with pytest.raises(ValueError, match="overflow to inf / nan for input 2"):
        sl.partition_codes(net, x)
    at = "input 0" if entry in ("region_polytope", "layer_maso") else "input 2"  # (x[2:])
    call = _OVERFLOWING[entry] if entry != "layer_maso" else lambda n, x: sl.layer_maso(n, x[2:], 0)
    with pytest.raises(ValueError, match=f"overflow to inf / nan for {at}"):
        call(net, x)


@pytest.mark.parametrize("entry", list(_OVERFLOWING))
def test_region_geometry_refuses_values_that_overflow(entry: str) -> None:
    """Finite weights whose products overflow made a layer's pre-activations nan: its margins
    became inf, so region_radius answered from the other layers (0.038 and the like) and
    the local complexities counted 0 there, plausibly; a single input was refused as "branches
    on N" (found in review). Reference: partition_codes, which refuses the same input."""
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()
    )
    net = nn.Sequential(*net, nn.Linear(8, 3)).double().eval()
    with torch.no_grad():
        for i in (0, 2, 4):
            net[i].weight.mul_(1e100)
            net[i].bias.mul_(1e100)
    x = torch.randn(4, 3, dtype=F64)
    x[2] *= 1e10  # (only input 2 overflows, in layer 3)
    assert torch.isfinite(net(x[[0, 1, 3]])).all()
    with pytest.raises(ValueError, match="overflow to inf / nan for input 2"):
        sl.partition_codes(net, x)
    at = "input 0" if entry in ("region_polytope", "layer_maso") else "input 2"
    with pytest.raises(ValueError, match=f"overflow to inf / nan for {at}"):
        _OVERFLOWING[entry](net, x)
