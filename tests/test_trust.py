"""Exact or refused, never silently wrong: a model changed after capture, non-finite values,
codes of other networks, batch-size branches, float64 copies, layer keys, k.

References are float64 forward passes and ``torch.func.jacrev`` (tolerance 1e-10).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import itertools
import logging
import types
import typing
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import splinelens as sl
from splinelens.paper.neighbors import others, region_ids
from splinelens.paper.templates import template_responses

F64 = torch.float64
TOL = 1e-10


def mlp(*widths: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        mods += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*mods[:-1]).double().eval()


def assert_exact(model: nn.Module, x: torch.Tensor) -> None:
    """A[x] and B[x] against jacrev and f(x) - A x of the model as it is now."""
    amap = sl.affine_map(model, x)
    jac = torch.stack([torch.func.jacrev(model)(xi[None])[0, :, 0] for xi in x])
    assert torch.allclose(amap.A, jac, atol=TOL)
    with torch.no_grad():
        b = model(x) - torch.einsum("ncd,nd->nc", jac, x)
    assert torch.allclose(amap.B, b, atol=TOL)


# 1. Captures follow the model's structure ------------------------------------------------------


def test_replaced_head_is_recaptured() -> None:
    model, x = mlp(4, 6, 3), torch.randn(5, 4, dtype=F64)
    assert_exact(model, x)
    model[2] = nn.Linear(6, 3).double().eval()
    assert_exact(model, x)


def test_replaced_activation_is_refused_or_recaptured() -> None:
    model, x = mlp(4, 6, 3), torch.randn(5, 4, dtype=F64)
    sl.affine_map(model, x)
    model[1] = nn.Sigmoid()
    with pytest.raises(sl.UnsupportedOperationError, match="sigmoid"):
        sl.affine_map(model, x)
    model[1] = nn.LeakyReLU(0.3)
    assert_exact(model, x)
    model[1].negative_slope = -0.7  # a setting changes the graph
    assert_exact(model, x)


def test_added_and_removed_modules_are_recaptured() -> None:
    model, x = mlp(4, 6, 6, 3), torch.randn(5, 4, dtype=F64)
    assert_exact(model, x)
    model.append(nn.ReLU())
    assert_exact(model, x)
    assert len(sl.partition_codes(model, x).layers) == 3
    del model[-1]
    assert len(sl.partition_codes(model, x).layers) == 2
    assert_exact(model, x)


def test_reregistered_parameters_buffers_and_hooks_are_followed() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    model = model.double().eval()
    x = torch.randn(5, 4, dtype=F64)
    assert_exact(model, x)
    model[0].weight = nn.Parameter(torch.randn(6, 4, dtype=F64))
    model[1].register_buffer("running_var", torch.rand(6, dtype=F64) + 0.5)
    assert_exact(model, x)
    handle = model[2].register_forward_hook(lambda m, i, o: 2 * o)
    try:
        assert_exact(model, x)
    finally:
        handle.remove()
    assert_exact(model, x)


def test_a_held_view_refuses_a_changed_model_and_follows_training() -> None:
    model, x = mlp(4, 6, 3), torch.randn(5, 4, dtype=F64)
    view = sl.SplineView(model, x)
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # training in place keeps the capture valid
    ref = torch.stack([torch.func.jacrev(model)(xi[None])[0, :, 0] for xi in x])
    assert torch.allclose(view.affine_map(x).A, ref, atol=TOL)
    model[0] = nn.Linear(4, 6).double().eval()
    with pytest.raises(sl.StaleCaptureError, match=r"module '0' was replaced.*new sl\.SplineView"):
        view.affine_map(x)


def test_an_affine_map_refuses_weights_changed_after_it_was_made() -> None:
    model, x = mlp(4, 6, 3), torch.randn(5, 4, dtype=F64)
    amap = sl.affine_map(model, x)
    with torch.no_grad():
        model[2].bias.add_(1.0)
    with pytest.raises(ValueError, match="changed after this AffineMap"):
        _ = amap.B


def _reference_B(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """f(x) - A x with A from jacrev, in float64."""
    jac = torch.stack([torch.func.jacrev(model)(xi[None])[0, :, 0] for xi in x])
    with torch.no_grad():
        return model(x) - torch.einsum("ncd,nd->nc", jac, x)


def test_a_held_views_map_checks_its_weights_at_first_use() -> None:
    """SplineView.affine_map checks the weights when the map is first used (one pass): a
    non-finite weight written before then is refused, an in-place change since it was made
    is refused, a write through .data before first use is taken as its weights, exactly."""
    model, x = mlp(4, 6, 3), torch.randn(5, 4, dtype=F64)
    view = sl.SplineView(model, x)
    amap = view.affine_map(x)
    model[2].weight.data[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"'2\.weight' holds nan at index \(1, 1\)"):
        _ = amap.B
    model[2].weight.data[1, 1] = 0.5
    amap = view.affine_map(x)
    with torch.no_grad():
        model[0].bias.add_(1.0)  # in place, after the map was made
    with pytest.raises(ValueError, match="changed after this AffineMap"):
        _ = amap.B
    amap = view.affine_map(x)
    model[0].weight.data.mul_(-1)  # through .data, before first use: the map's weights
    assert torch.allclose(amap.B, _reference_B(model, x), atol=TOL)
    model[0].weight.data.mul_(-1)  # after first use: refused
    with pytest.raises(ValueError, match="changed after this AffineMap"):
        _ = amap.A


def test_a_map_answers_for_the_model_as_it_was_when_made() -> None:
    """A module replaced after the map was made is not read: the map stays the old network's
    (and a new call recaptures)."""
    model, x = mlp(4, 6, 3), torch.randn(5, 4, dtype=F64)
    old = copy.deepcopy(model)
    amap = sl.affine_map(model, x)
    model[2] = nn.Linear(6, 3).double().eval()
    assert torch.allclose(amap.B, _reference_B(old, x), atol=TOL)
    assert torch.allclose(sl.affine_map(model, x).B, _reference_B(model, x), atol=TOL)


# 2. Non-finite values are refused, by name -----------------------------------------------------


def _nan_at(x: torch.Tensor, idx: tuple[int, ...], value: float = float("nan")) -> torch.Tensor:
    x = x.clone()
    x[idx] = value
    return x


ENTRY_POINTS = {
    "affine_map": lambda m, x: sl.affine_map(m, x).A,
    "partition_codes": sl.partition_codes,
    "verify": sl.verify,
    "region_radius": sl.region_radius,
    "region_polytope": lambda m, x: sl.region_polytope(m, x[2:3]),
    "local_complexity": lambda m, x: sl.local_complexity(m, x, [0.1]),
    "sampled_local_complexity": lambda m, x: sl.sampled_local_complexity(m, x, [0.1]),
    "layer_maso": lambda m, x: sl.layer_maso(m, x[2:3], 0),
    "check_masos": sl.check_masos,
    "template_responses": template_responses,
    "convexity": sl.convexity,
    "view": lambda m, x: sl.SplineView(m, x),
}


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_are_refused_by_name(name: str, value: float) -> None:
    model, x = mlp(3, 5, 2), torch.randn(4, 3, dtype=F64)
    bad = _nan_at(x, (2, 1), value)
    index = r"\(0, 1\)" if name in ("region_polytope", "layer_maso") else r"\(2, 1\)"
    with pytest.raises(ValueError, match=rf"x\w* holds -?(nan|inf) at index {index}"):
        ENTRY_POINTS[name](model, bad)


@pytest.mark.parametrize("where", ["weight", "buffer"])
def test_non_finite_parameters_and_buffers_are_refused_by_name(where: str) -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    model = model.double().eval()
    x = torch.randn(4, 3, dtype=F64)
    sl.affine_map(model, x)  # a capture of the finite model
    with torch.no_grad():
        if where == "weight":
            model[3].weight[1, 4] = float("nan")
        else:
            model[1].running_var[2] = float("inf")
    name = r"'3\.weight' holds nan at index \(1, 4\)" if where == "weight" else r"'1\.running_var'"
    with pytest.raises(ValueError, match=name):
        sl.affine_map(model, x)
    with pytest.raises(ValueError, match=name):
        sl.partition_codes(model, x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"origin": torch.tensor([0.0, float("nan")])}, r"origin holds nan at index \(1,\)"),
        ({"directions": torch.tensor([[1.0, 0], [0, float("inf")]])}, r"directions holds inf"),
        ({"bounds": (-1.0, float("inf"), -1.0, 1.0)}, r"bounds holds inf at index 1"),
        ({"bounds": (float("nan"), 1.0, -1.0, 1.0)}, r"bounds holds nan at index 0"),
    ],
)
def test_slices_refuse_non_finite_planes(kwargs: dict, match: str) -> None:
    args = {"origin": torch.zeros(2), "directions": torch.eye(2), "bounds": (-1, 1, -1, 1)}
    with pytest.raises(ValueError, match=match):
        sl.slice_partition(mlp(2, 4, 2), **{**args, **kwargs})
    pts = (torch.zeros(2), torch.tensor([1.0, float("nan")]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"points\[1\] holds nan"):
        sl.slice_partition(mlp(2, 4, 2), points=pts)


def test_non_finite_radii_and_frozen_map_inputs_are_refused() -> None:
    model, x = mlp(3, 5, 2), torch.randn(4, 3, dtype=F64)
    with pytest.raises(ValueError, match="radii holds nan"):
        sl.local_complexity(model, x, [0.1, float("nan")])
    with pytest.raises(ValueError, match="non-negative"):
        sl.local_complexity(model, x, [-1.0])
    with pytest.raises(ValueError, match=r"z holds inf at index \(0, 2\)"):
        sl.affine_map(model, x)(_nan_at(x, (0, 2), float("inf")))


# 3. Codes know where they come from -------------------------------------------------------------


def test_codes_of_different_networks_are_not_compared() -> None:
    x = torch.randn(10, 4, dtype=F64)
    a, b = sl.partition_codes(mlp(4, 6, 3), x), sl.partition_codes(mlp(4, 8, 3), x)
    assert a.signature == (("1", "relu", 6, 2),)
    match = r"different networks: layer 0 is '1' \(relu, 6 units.* '1' \(relu, 8 units"
    with pytest.raises(ValueError, match=match):
        sl.partition_distance(a, b)
    with pytest.raises(ValueError, match="different networks"):
        sl.nearest_neighbors(a, b, k=2)
    with pytest.raises(ValueError, match="different networks"):
        sl.nearest_neighbors(a, [a, b], k=2)
    with pytest.raises(ValueError, match="different networks"):
        sl.PartitionCodes.cat([a, b])


def test_codes_of_two_checkpoints_of_one_architecture_stay_comparable() -> None:
    x = torch.randn(10, 4, dtype=F64)
    a, b = sl.partition_codes(mlp(4, 6, 3, seed=0), x), sl.partition_codes(mlp(4, 6, 3, seed=1), x)
    d = sl.partition_distance(a, b)
    ref = (a.layers[0].states()[:, None] != b.layers[0].states()[None]).double().mean(-1)
    assert torch.equal(d, ref)


def test_layer_codes_refuse_inconsistent_data() -> None:
    with pytest.raises(ValueError, match="width 2, expected 1"):
        sl.LayerCodes("1", "relu", 6, 2, torch.zeros(3, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="integers"):
        sl.LayerCodes("1", "maxpool", 6, 4, torch.zeros(3, 6))
    with pytest.raises(ValueError, match="same inputs"):
        sl.PartitionCodes(
            (
                sl.LayerCodes("1", "relu", 6, 2, torch.zeros(3, 1, dtype=torch.uint8)),
                sl.LayerCodes("3", "relu", 6, 2, torch.zeros(4, 1, dtype=torch.uint8)),
            )
        )


# 5. No shape specialisation leaks ---------------------------------------------------------------


class Branchy(nn.Module):
    """A forward that branches on the batch size: ``rule(n)`` picks the first head."""

    def __init__(self, rule) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.rule = nn.Linear(4, 3), nn.Linear(4, 3), rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rule(x.shape[0]):
            return self.a(torch.relu(x))
        return self.b(x)


RULES = {
    "n>=2": lambda n: n >= 2,
    "n==1": lambda n: n == 1,
    "n>5": lambda n: n > 5,
    "even": lambda n: n % 2 == 0,
}


@pytest.mark.parametrize("rule", list(RULES))
def test_batch_size_branches_never_run_the_wrong_graph(rule: str) -> None:
    model = Branchy(RULES[rule]).double().eval()
    for n in (8, 3, 1, 2, 7, 8):
        x = torch.randn(n, 4, dtype=F64)
        try:
            amap = sl.affine_map(model, x)
        except sl.BatchSizeError as e:  # refused, with the reason and the fix
            assert n == 1 and "pass 2 or more inputs" in str(e)
            continue
        with torch.no_grad():
            assert torch.allclose(torch.einsum("ncd,nd->nc", amap.A, x) + amap.B, model(x))


def test_a_held_view_refuses_batch_sizes_outside_its_range() -> None:
    model = Branchy(RULES["n>5"]).double().eval()
    view = sl.SplineView(model, torch.randn(8, 4, dtype=F64))
    with pytest.raises(sl.BatchSizeError, match=r"holds for N >= 6.*not for a batch of 3"):
        view.affine_map(torch.randn(3, 4, dtype=F64))
    model = Branchy(RULES["n>=2"]).double().eval()
    with pytest.raises(sl.BatchSizeError, match="branches"):
        sl.partition_codes(model, torch.randn(1, 4, dtype=F64))


# 6. float64 copies are complete -----------------------------------------------------------------


class BufferNet(nn.Module):
    """Weights held as buffers (not parameters), e.g. a frozen, exported network."""

    def __init__(self, net: nn.Sequential) -> None:
        super().__init__()
        self.register_buffer("w1", net[0].weight.detach().clone())
        self.register_buffer("b1", net[0].bias.detach().clone())
        self.register_buffer("w2", net[2].weight.detach().clone())
        self.scale = torch.tensor(1.0)  # a plain tensor attribute: a constant of the graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.w1.T + self.b1) @ self.w2.T * self.scale


def test_float64_copies_convert_buffers_and_constants() -> None:
    net = mlp(2, 16, 2).float()
    ref = sl.slice_partition(net, torch.zeros(2), torch.eye(2), (-2, 2, -2, 2))
    part = sl.slice_partition(BufferNet(net).eval(), torch.zeros(2), torch.eye(2), (-2, 2, -2, 2))
    assert len(part) == len(ref) > 1
    assert abs(part.areas.sum() - 16) < 1e-9


def test_buffer_weights_are_checked_for_dtype() -> None:
    model = BufferNet(mlp(2, 16, 2).float()).eval()
    with pytest.raises(ValueError, match=r"x is torch\.float64.*float32"):
        sl.affine_map(model, torch.randn(3, 2, dtype=F64))


# 7. Clear errors for everything a user can get wrong --------------------------------------------


def test_layer_keys_are_checked_everywhere() -> None:
    model, x = mlp(4, 6, 6, 3), torch.randn(6, 4, dtype=F64)
    codes = sl.partition_codes(model, x)
    calls = {
        "affine_map": lambda k: sl.affine_map(model, x, start=k),
        "distance": lambda k: sl.partition_distance(codes, codes, layer=k),
        "neighbours": lambda k: sl.nearest_neighbors(codes, codes, layer=k, k=2),
        "codes.layer": codes.layer,
        "region_ids": lambda k: region_ids(codes, k),
        "others": lambda k: others(codes, k, 2),
        "layer_maso": lambda k: sl.layer_maso(model, x, k),
    }
    for name, call in calls.items():
        for key in (2, -3, 99):
            with pytest.raises(IndexError, match=rf"layer {key} is out of range.*'1', '3'"):
                call(key)
        with pytest.raises(KeyError, match=r"no layer named 'relu'.*'1', '3'"):
            call("relu")
        assert call(-1) is not None, name


def test_slice_plot_layer_keys() -> None:
    from splinelens.paper.figures import plot_slice

    part = sl.slice_partition(mlp(2, 4, 4, 2), torch.zeros(2), torch.eye(2), (-1, 1, -1, 1))
    with pytest.raises(IndexError, match="out of range"):
        plot_slice(part, layer=5)
    plot_slice(part, layer="1")


@pytest.mark.parametrize("k", [0, -1, 11, 2.5])
def test_k_is_checked_in_every_neighbour_path(k) -> None:
    codes = sl.partition_codes(mlp(4, 6, 3), torch.randn(10, 4, dtype=F64))
    paths = {
        "faiss": lambda: sl.nearest_neighbors(codes, codes, k=k, backend="faiss"),
        "torch": lambda: sl.nearest_neighbors(codes, codes, k=k, backend="torch"),
        "shards": lambda: sl.nearest_neighbors(codes, [codes[:5], codes[5:]], k=k),
        "others": lambda: others(codes, 0, k),
    }
    for call in paths.values():
        with pytest.raises(ValueError, match=r"k must be"):
            call()


def test_compiled_models_are_captured_through_the_module_they_wrap() -> None:
    model, x = mlp(4, 6, 3), torch.randn(5, 4, dtype=F64)
    compiled = torch.compile(model)
    amap = sl.affine_map(compiled, x)
    ref = torch.stack([torch.func.jacrev(model)(xi[None])[0, :, 0] for xi in x])
    assert torch.allclose(amap.A, ref, atol=TOL)
    assert sl.verify(compiled, x).ok


def test_a_wrong_input_shape_says_so_plainly() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(ValueError, match=r"per-sample shape \(3, 9, 9\)") as info:
        sl.affine_map(model.double().eval(), torch.randn(2, 3, 9, 9, dtype=F64))
    assert "control flow" not in str(info.value) and len(str(info.value)) < 400


def test_degenerate_planes_and_tolerances_are_refused() -> None:
    net = mlp(2, 4, 2)
    for dirs in (torch.zeros(2, 2), torch.tensor([[1.0, 1.0], [2.0, 2.0]])):
        with pytest.raises(ValueError, match="span a plane"):
            sl.slice_partition(net, torch.zeros(2), dirs, (-1, 1, -1, 1))
    with pytest.raises(ValueError, match="rtol"):
        sl.verify(net, torch.randn(3, 2, dtype=F64), rtol=float("nan"))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_a_failed_capture_prints_nothing_and_says_why(capfd: pytest.CaptureFixture) -> None:
    with pytest.raises(sl.UnsupportedOperationError, match="control flow"):
        sl.affine_map(DataDependent().eval(), torch.randn(3, 4))
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_overflow_is_refused_not_returned() -> None:
    model = mlp(4, 30, 3).float()
    x = torch.randn(3, 4)
    x[1] = 3e38  # finite, but the network overflows float32
    with pytest.raises(ValueError, match=r"overflow.*input 1"):
        _ = sl.affine_map(model, x).A
    with pytest.raises(ValueError, match=r"overflow.*input 1"):
        _ = sl.affine_map(model, x).B


def test_a_division_by_zero_in_float64_is_refused_without_advising_float64() -> None:
    """A constant divisor holding a zero gives inf in float64 too: the error names that cause,
    and does not tell a float64 user to use float64."""

    class Divided(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.scale = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(x) / self.scale)

    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"overflow.*input 0.*division by a constant") as err:
        _ = sl.affine_map(Divided().double().eval(), x).A
    assert "use float64" not in str(err.value)


def test_overflowing_codes_are_refused() -> None:
    x = torch.randn(3, 4)
    x[2] = 3e38
    with pytest.raises(ValueError, match=r"overflow.*input 2"):
        sl.partition_codes(mlp(4, 30, 30, 3).float(), x)


class _Syncs(TorchFunctionMode):
    """Counts the calls that bring a tensor's value to the host (a synchronisation on a GPU)."""

    NAMES = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.NAMES
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batch_size", [1024, 2])
def test_a_held_views_codes_check_values_with_one_synchronisation(batch_size: int) -> None:
    """x, the weights and the last layer's values are checked for NaN, inf and overflow with
    the result, in one transfer to the host; each is still refused by name (reference: the
    plain function's eager checks, same messages)."""
    model, x = mlp(4, 30, 30, 3).float(), torch.randn(5, 4)
    view = sl.SplineView(model, x)
    view.partition_codes(x, batch_size=batch_size)  # (a first batch of 1 checks a static capture)
    with _Syncs() as syncs:
        codes = view.partition_codes(x, batch_size=batch_size)
    assert syncs.count == 1
    ref = sl.partition_codes(model, x)
    assert all(torch.equal(a.data, b.data) for a, b in zip(codes.layers, ref.layers, strict=True))
    cases = {
        r"x holds nan at index \(3, 1\)": lambda: (_nan_at(x, (3, 1)), None),
        r"overflow.*input 2": lambda: (_nan_at(x, (2,), 3e38), None),
        r"'2\.bias' holds inf at index \(4,\)": lambda: (x, model[2].bias),
    }
    for match, case in cases.items():
        bad, tensor = case()
        if tensor is not None:
            tensor.data[4] = float("inf")
        with pytest.raises(ValueError, match=match):
            view.partition_codes(bad, batch_size=batch_size)
        with pytest.raises(ValueError, match=match):
            sl.partition_codes(model, bad, batch_size=batch_size)
        if tensor is not None:
            tensor.data[4] = 0.0


def test_scripted_models_are_refused_with_the_fix() -> None:
    scripted = torch.jit.script(mlp(4, 6, 3))
    with pytest.raises(sl.UnsupportedOperationError, match=r"TorchScript.*Pass the nn.Module"):
        sl.affine_map(scripted, torch.randn(3, 4, dtype=F64))


@pytest.mark.usefixtures("young_heap")
def test_the_capture_cache_does_not_keep_a_model_with_hooks_alive() -> None:
    import gc
    import weakref

    class Hooked(nn.Sequential):
        def scale(self, module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
            return 2 * out

    model = Hooked(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    model[1].register_forward_hook(model.scale)  # a hook that holds the model
    alive = weakref.ref(model)
    assert_exact(model, torch.randn(3, 4, dtype=F64))
    del model
    gc.collect()
    assert alive() is None


class ClampsOneInput(nn.Module):
    """Branches on a batch of 1 in a way two sample inputs do not reveal (a clamp at +-3)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            x = x.clamp(-3, 3)
        return self.l2(torch.relu(self.l1(x)))


def test_a_batch_of_one_is_checked_on_the_graph_not_on_samples() -> None:
    model = ClampsOneInput().double().eval()
    assert sl.verify(model, torch.randn(4, 3, dtype=F64)).ok
    with pytest.raises(sl.BatchSizeError, match="builds another graph"):
        sl.affine_map(model, torch.full((1, 3), 10.0, dtype=F64))
    plain = mlp(3, 4, 2)
    assert_exact(plain, torch.randn(1, 3, dtype=F64))  # no branch: a batch of 1 is fine


class Configured(nn.Module):
    """A forward that reads settings from places other than submodules and parameters."""

    slope = 0.2  # a class attribute

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 4)
        self.cfg = types.SimpleNamespace(slope=0.1)
        self.nested = [[[0.1]]]
        self.acts = [nn.LeakyReLU(0.1)]  # a module outside _modules
        self.act = functools.partial(F.leaky_relu, negative_slope=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x)
        return (
            F.leaky_relu(z, self.cfg.slope)
            + F.leaky_relu(z, self.nested[0][0][0])
            + self.acts[0](z)
            + self.act(z)
            + F.leaky_relu(z, type(self).slope)
        )


CHANGES = {
    "config object": lambda m: setattr(m.cfg, "slope", 0.9),
    "nested list": lambda m: m.nested[0][0].__setitem__(0, 0.9),
    "module in a list": lambda m: setattr(m.acts[0], "negative_slope", 0.9),
    "partial": lambda m: m.act.keywords.__setitem__("negative_slope", 0.9),
    "class attribute": lambda m: setattr(type(m), "slope", 0.9),
}


@dataclasses.dataclass(slots=True)
class SlotsConfig:
    slope: float


class MoreConfigured(nn.Module):
    """Settings in a class-level tuple, a slots dataclass, a numpy array and a method."""

    scales = (1.0,)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 4)
        self.cfg = SlotsConfig(0.1)
        self.arr = np.array([0.1])

    def act(self, z: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(z, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x)
        return (
            F.leaky_relu(z, self.cfg.slope)
            + F.leaky_relu(z, float(self.arr[0]))
            + self.act(z) * type(self).scales[0]
        )


MORE_CHANGES = {
    "class tuple": lambda m: setattr(type(m), "scales", (3.0,)),
    "slots dataclass": lambda m: setattr(m.cfg, "slope", 0.9),
    "numpy array in place": lambda m: m.arr.__setitem__(0, 0.9),
    "patched method": lambda m: setattr(type(m), "act", lambda self, z: F.leaky_relu(z, 0.9)),
}


class _Slope:
    """A helper object whose bound methods a model holds (an activation, a hook)."""

    def __init__(self, slope: float) -> None:
        self.slope = slope

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(z, self.slope)

    def hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out * (1.0 + self.slope)


def _deep(slope: float) -> types.SimpleNamespace:
    """A config four objects deep: cfg.model.head.act.slope."""
    ns = types.SimpleNamespace
    return ns(model=ns(head=ns(act=ns(slope=slope))))


class DeeplyConfigured(nn.Module):
    """Settings in nested class attributes, a property, a staticmethod, bound methods of a
    helper object (an activation and a hook), a deep config and a hook's nested closure."""

    OPTS: typing.ClassVar[dict] = {"act": {"slope": 0.1}}
    NS = types.SimpleNamespace(slope=0.1)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 4)
        self.act = _Slope(0.1).apply
        self.cfg = _deep(0.1)
        self.fc.register_forward_hook(_Slope(0.1).hook)
        opts = {"head": {"act": {"scale": 1.0}}}
        self.fc.register_forward_hook(lambda m, a, out: out * opts["head"]["act"]["scale"])

    @property
    def gain(self) -> float:
        return 1.0

    @staticmethod
    def shift(z: torch.Tensor) -> torch.Tensor:
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.shift(self.fc(x)) * self.gain
        return (
            self.act(z)
            + F.leaky_relu(z, self.OPTS["act"]["slope"])
            + F.leaky_relu(z, self.NS.slope)
            + F.leaky_relu(z, self.cfg.model.head.act.slope)
        )


def _closure(hook: object) -> dict:
    return hook.__closure__[0].cell_contents  # type: ignore[attr-defined]


DEEP_CHANGES = {
    "class nested dict": lambda m: type(m).OPTS["act"].__setitem__("slope", 0.9),
    "class object": lambda m: setattr(type(m).NS, "slope", 0.9),
    "property": lambda m: setattr(type(m), "gain", property(lambda self: 2.0)),
    "staticmethod": lambda m: setattr(type(m), "shift", staticmethod(lambda z: z + 1.0)),
    "bound method's object": lambda m: setattr(m.act.__self__, "slope", 0.9),
    "bound method hook's object": lambda m: setattr(
        next(iter(m.fc._forward_hooks.values())).__self__, "slope", 0.9
    ),
    "config four objects deep": lambda m: setattr(m.cfg.model.head.act, "slope", 0.9),
    "hook closure three dicts deep": lambda m: _closure(list(m.fc._forward_hooks.values())[1])[
        "head"
    ]["act"].__setitem__("scale", 3.0),
}


@pytest.mark.parametrize("change", [*CHANGES, *MORE_CHANGES, *DEEP_CHANGES])
def test_settings_read_from_objects_lists_partials_and_classes_are_followed(change: str) -> None:
    """Each change is seen: the plain function captures again (reference: jacrev of the model
    as it is now), a held view refuses."""
    bases = {**dict.fromkeys(CHANGES, Configured), **dict.fromkeys(DEEP_CHANGES, DeeplyConfigured)}
    base = bases.get(change, MoreConfigured)
    cls = type(f"{base.__name__}Copy", (base,), {})  # class attributes stay per test
    model, x = cls().double().eval(), torch.randn(5, 3, dtype=F64)
    view = sl.SplineView(model, x)
    assert_exact(model, x)
    {**CHANGES, **MORE_CHANGES, **DEEP_CHANGES}[change](model)
    assert_exact(model, x)
    with pytest.raises(sl.StaleCaptureError, match="changed its"):
        view.affine_map(x)


def test_objects_with_lazy_caches_do_not_invalidate_a_capture() -> None:
    """A pathlib.Path fills slots lazily (str, hash): it is compared by identity, so using it
    leaves a held view valid (only dataclasses are compared by their fields)."""
    import pathlib

    model, x = mlp(3, 4, 2), torch.randn(5, 3, dtype=F64)
    model.where = pathlib.PurePosixPath("runs/a")
    view = sl.SplineView(model, x)
    _ = str(model.where), hash(model.where)
    assert torch.equal(view.affine_map(x).B, sl.affine_map(model, x).B)


def test_changes_through_data_are_seen() -> None:
    model, x = mlp(3, 5, 2), torch.randn(4, 3, dtype=F64)
    amap = sl.affine_map(model, x)
    _ = amap.output
    model[0].weight.data.mul_(-1)  # no version bump
    with pytest.raises(ValueError, match="changed after this AffineMap"):
        _ = amap.A
    model[2].weight.data[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"'2\.weight' holds nan at index \(1, 1\)"):
        sl.affine_map(model, x)


def test_units_permuted_through_data_are_seen_by_a_map() -> None:
    """Weight matching permutes hidden units in place through .data: the network is the same
    function (reference: its outputs), but the map's states, recorded per unit, no longer match
    the weights (reference: A frozen at them on the permuted weights differs from jacrev's A)."""
    model, x = mlp(3, 6, 2), torch.randn(4, 3, dtype=F64)
    amap = sl.affine_map(model, x)
    _ = amap.B
    with torch.no_grad():
        before = model(x)
        perm = torch.arange(6).roll(1)
        model[0].weight.data.copy_(model[0].weight.data[perm])
        model[0].bias.data.copy_(model[0].bias.data[perm])
        model[2].weight.data.copy_(model[2].weight.data[:, perm])
        assert torch.allclose(model(x), before, atol=TOL)
    stale = copy.copy(amap)  # what the map would answer if it did not look
    stale._check_unchanged = lambda: None
    del stale.__dict__["B"]
    jac = torch.stack([torch.func.jacrev(model)(xi[None])[0, :, 0] for xi in x])
    assert not torch.allclose(stale.A, jac, atol=TOL)
    with pytest.raises(ValueError, match="changed after this AffineMap"):
        _ = amap.A


@pytest.mark.parametrize("how", ["in place", "through .data"])
def test_a_map_refuses_a_change_of_a_tensor_a_hook_holds(how: str) -> None:
    """A tensor in a hook's closure is a constant of the captured graph, outside the model's
    parameters and buffers: a map made before it changed refuses, as for a weight."""
    model, x = mlp(3, 5, 5, 2), torch.randn(4, 3, dtype=F64)
    gain = torch.ones(5, dtype=F64)
    model[2].register_forward_hook(lambda m, a, out: out * gain)
    amap = sl.affine_map(model, x)
    _ = amap.B  # states recorded with gain = 1
    with torch.no_grad():
        (gain if how == "in place" else gain.data).mul_(-1.0)
    with pytest.raises(ValueError, match="changed after this AffineMap"):
        _ = amap.A
    assert_exact(model, x)  # a new map answers for the model as it is now


@pytest.mark.parametrize("kind", ["prune", "weight_norm", "spectral_norm"])
def test_weights_rebound_by_pruning_or_old_norm_hooks_keep_a_view_valid(kind: str) -> None:
    """Pruning and the old weight_norm / spectral_norm bind ``weight`` anew in a pre-hook at
    every forward pass (from ``weight_orig`` and a mask, or g and v): the graph computes it, so a
    held view stays valid after ``model(x)`` and is exact; a change of the mask is followed."""
    model, x = mlp(3, 5, 5, 2), torch.randn(4, 3, dtype=F64)
    if kind == "prune":
        nn.utils.prune.l1_unstructured(model[2], "weight", amount=0.4)
    elif kind == "weight_norm":
        nn.utils.weight_norm(model[2])
    else:
        nn.utils.spectral_norm(model[2])
    view = sl.SplineView(model, x)
    with torch.no_grad():
        model(x)  # the pre-hook binds model[2].weight anew
        if kind == "prune":
            model[2].weight_mask[0, 0] = 1 - model[2].weight_mask[0, 0]
    amap = view.affine_map(x)
    jac = torch.stack([torch.func.jacrev(model)(xi[None])[0, :, 0] for xi in x])
    assert torch.allclose(amap.A, jac, atol=TOL)
    assert_exact(model, x)


def test_a_model_moved_to_channels_last_is_captured_again() -> None:
    """Its weights keep their identity but not their layout, and other kernels run: the plain
    functions capture again (exact), a held view refuses."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Flatten(), nn.Linear(8, 3)
    )
    model, x = model.double().eval(), torch.randn(3, 2, 4, 4, dtype=F64)
    view = sl.SplineView(model, x)
    _ = sl.affine_map(model, x).B
    model.to(memory_format=torch.channels_last)
    with pytest.raises(sl.StaleCaptureError, match="memory layout"):
        view.affine_map(x)
    amap = sl.affine_map(model, x)
    jac = torch.stack([torch.func.jacrev(model)(xi[None])[0] for xi in x]).flatten(2)
    assert torch.allclose(amap.A.flatten(2), jac, atol=TOL)


@pytest.mark.parametrize("wrap", ["DataParallel", "AveragedModel"])
def test_wrappers_with_a_varargs_forward_are_read_through(wrap: str) -> None:
    """Their forward(*args) computes the wrapped module's function: captured through it."""
    model, x = mlp(3, 5, 2), torch.randn(4, 3, dtype=F64)
    if wrap == "DataParallel":
        wrapped = nn.DataParallel(model)
    else:
        wrapped = torch.optim.swa_utils.AveragedModel(model).eval()
    jac = torch.stack([torch.func.jacrev(wrapped)(xi[None])[0, :, 0] for xi in x])
    assert torch.allclose(sl.affine_map(wrapped, x).A, jac, atol=TOL)


def test_a_parametrization_added_and_removed_keeps_a_view_valid() -> None:
    """remove_parametrizations(leave_parametrized=True) puts the parametrized value into the
    original parameter and registers it again, after the bias: same tensors, read live."""
    model, x = mlp(3, 5, 2), torch.randn(4, 3, dtype=F64)
    view = sl.SplineView(model, x)
    nn.utils.parametrize.register_parametrization(model[2], "weight", _Negated())
    nn.utils.parametrize.remove_parametrizations(model[2], "weight", leave_parametrized=True)
    jac = torch.stack([torch.func.jacrev(model)(xi[None])[0, :, 0] for xi in x])
    assert torch.allclose(view.affine_map(x).A, jac, atol=TOL)


class _Negated(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return -w


class _MadeConstants(nn.Module):
    """A forward that makes constants in the default dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(3, 5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * torch.tensor(0.5).to(x.dtype) + torch.full((2,), 1 / 3).to(x.dtype)


class _Logged(nn.Module):
    """A module holding loggers, as a class attribute and as an attribute: not settings."""

    log = logging.getLogger("splinelens.tests.class")

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(3, 5, 2)
        self.logger = logging.getLogger("splinelens.tests.instance")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.debug("forward")
        return self.net(x)


def test_loggers_are_not_walked_and_keep_a_view_valid() -> None:
    """A logger's state (its level cache, the manager's every logger) is not a setting: a held
    view stays valid after the model runs and a capture has reset logging's caches."""
    model, x = _Logged().eval(), torch.randn(4, 3, dtype=F64)
    view = sl.SplineView(model, x)
    sl.affine_map(mlp(3, 4, 2), x)  # another capture: it silences torch's logs, then restores
    model(x)
    assert torch.equal(view.affine_map(x).B, sl.affine_map(model, x).B)


def test_a_changed_default_dtype_is_seen() -> None:
    """The graph keeps the dtype of constants made in forward: a held view refuses (it raised
    torch's own dtype-mismatch error), the plain functions capture again, exactly."""
    model, x = _MadeConstants().eval(), torch.randn(4, 3, dtype=F64)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        view = sl.SplineView(model, x)
        torch.set_default_dtype(torch.float32)
        with pytest.raises(sl.StaleCaptureError, match="default dtype changed"):
            view.affine_map(x)
        assert_exact(model, x)
    finally:
        torch.set_default_dtype(before)


class _Full(nn.Module):
    """torch.full without a dtype: the default dtype's, when traced."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(x) + torch.full((6,), 0.1)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_map_keeps_the_dtype_of_its_constants_when_the_default_changes(
    dtype: torch.dtype,
) -> None:
    """The program's torch.full followed the default dtype at every run: a map made before a
    change and used after it gave A x + B 8e-10 from its own output (float64), or raised
    torch's dtype-mismatch error (float32). Reference: its output, recorded before the change."""
    before = torch.get_default_dtype()
    torch.manual_seed(0)
    model, x = _Full().to(dtype).eval(), torch.randn(3, 4, dtype=dtype)
    try:
        torch.set_default_dtype(torch.float32)
        amap = sl.affine_map(model, x)
        out = amap.output
        torch.set_default_dtype(torch.float64)
        assert torch.equal(amap(x), out)
        ax_b = torch.einsum("ncd,nd->nc", amap.A.double(), x.double()) + amap.B.double()
        assert (ax_b - out.double()).abs().max() <= 1e4 * torch.finfo(dtype).eps
    finally:
        torch.set_default_dtype(before)


def test_non_finite_tensor_attributes_are_named() -> None:
    model, x = BufferNet(mlp(2, 16, 2)).eval(), torch.randn(3, 2, dtype=F64)
    model.scale = model.scale.double()
    sl.affine_map(model, x)
    model.scale.fill_(float("inf"))
    with pytest.raises(ValueError, match="'scale' holds inf"):
        sl.affine_map(model, x)


def test_lazy_modules_are_captured_after_their_first_forward() -> None:
    model = nn.Sequential(nn.LazyLinear(5), nn.ReLU(), nn.Linear(5, 2)).double().eval()
    x = torch.randn(4, 3, dtype=F64)
    assert sl.verify(model, x).ok
    assert_exact(model, x)


def test_verify_compares_after_the_output_nonlinearity_and_caps_its_tolerance() -> None:
    model = nn.Sequential(mlp(3, 5, 4), nn.Softmax(-1)).eval()
    x = torch.randn(4, 3, dtype=F64)
    assert sl.verify(model, x).ok
    model[0][1] = nn.LeakyReLU(0.5)
    assert sl.verify(model, x).ok  # recaptured, still exact
    half, xh = mlp(3, 5, 4).to(torch.bfloat16), x.to(torch.bfloat16)
    with torch.no_grad():
        scale = max(1.0, float(half(xh).abs().max()))
    assert sl.verify(half, xh).tolerance <= 1e-2 * scale  # not 1e4 bf16 epsilons (78)


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(x)


class ListConstants(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ws = [torch.randn(4, 2), torch.randn(2, 4)]  # tensors in a plain list

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.ws[0].T) @ self.ws[1].T


def test_more_mistakes_get_plain_errors() -> None:
    with pytest.raises(sl.UnsupportedOperationError, match=r"calls.*changed by forward itself"):
        sl.affine_map(Counter().eval(), torch.randn(3, 3))
    with pytest.raises(sl.UnsupportedOperationError, match=r"pass x\[None\]"):
        sl.affine_map(mlp(2, 4, 2), torch.randn(2, dtype=F64))
    codes = sl.partition_codes(mlp(3, 5, 2), torch.randn(6, 3, dtype=F64))
    assert torch.equal(codes[torch.tensor(2)].layers[0].data, codes[2].layers[0].data)
    assert torch.equal(codes[::-1].layers[0].data, codes.layers[0].data.flip(0))
    with pytest.raises(TypeError, match="layer must be"):
        sl.partition_distance(codes, codes, layer=1.0)
    amap = sl.affine_map(mlp(3, 5, 2), torch.randn(6, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"z is torch\.float32"):
        amap(torch.randn(6, 3))


def test_float64_copies_convert_tensors_in_containers() -> None:
    part = sl.slice_partition(ListConstants().eval(), torch.zeros(2), torch.eye(2), (-2, 2, -2, 2))
    assert len(part) > 1 and abs(part.areas.sum() - 16) < 1e-9


def test_templates_are_exact_inside_inference_mode_and_no_grad() -> None:
    model, x = mlp(4, 8, 3), torch.randn(5, 4, dtype=F64)
    ref = torch.stack([torch.func.jacrev(model)(xi[None])[0, :, 0] for xi in x])
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            amap = sl.affine_map(model, x)
            assert torch.allclose(amap.A, ref, atol=TOL)
            assert torch.allclose(amap.templates(rows=[1]), ref[:, 1:2], atol=TOL)
            assert sl.verify(model, x).ok
            xi = torch.randn(3, 4, dtype=F64)  # an inference tensor, used outside below
    assert sl.affine_map(model, xi).A.shape == (3, 3, 4)
    with torch.inference_mode():
        frozen = mlp(4, 8, 3)
    with pytest.raises(ValueError, match="inference_mode"):
        sl.affine_map(frozen, x)


@pytest.mark.usefixtures("young_heap")
def test_a_map_of_a_temporary_model_keeps_it() -> None:
    x = torch.randn(5, 4, dtype=F64)
    amap = sl.affine_map(mlp(4, 8, 3), x)
    import gc

    gc.collect()
    assert amap.A.shape == (5, 3, 4)


def test_writes_name_the_target(tmp_path) -> None:
    codes = sl.partition_codes(mlp(4, 8, 3), torch.randn(5, 4, dtype=F64))
    with pytest.raises(IsADirectoryError, match="is a directory"):
        codes.save(tmp_path)
    (tmp_path / "afile").write_text("")
    with pytest.raises(NotADirectoryError, match="afile is a file"):
        codes.save(tmp_path / "afile" / "c.npz")
    with pytest.raises(ValueError, match="meta"):
        codes.to("meta")


def test_lazy_modules_weights_are_checked_and_fingerprinted() -> None:
    """A lazy module gets its weights in the capture's forward: they must be in the weight
    checks and in every map's fingerprint (found in review: they were left out)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.LazyLinear(6), nn.ReLU(), nn.LazyLinear(3)).double().eval()
    x = torch.randn(4, 5, dtype=F64)
    amap = sl.affine_map(net, x)
    _ = amap.B
    with torch.no_grad():
        net[0].weight.mul_(-1)
    with pytest.raises(ValueError, match="changed after this AffineMap"):
        _ = amap.A
    net[0].weight.data[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'0\.weight' holds nan at index \(1, 0\)"):
        sl.partition_codes(net, x)


def test_data_rebound_to_another_layout_at_the_same_address_is_seen() -> None:
    """Same data pointer and shape, other strides (found in review): the cached integer views
    are made again, and the map refuses."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -2.0], [-3.0, 2.0]]))
    amap = sl.affine_map(net, torch.randn(3, 2, dtype=F64))
    _ = amap.B
    net[0].weight.data = net[0].weight.data.as_strided((2, 2), (0, 1))  # rows [1, -2] twice
    with pytest.raises(ValueError, match="changed after this AffineMap"):
        _ = amap.A


@pytest.mark.usefixtures("young_heap")
def test_a_cached_view_does_not_keep_a_mode_dependent_model_alive() -> None:
    """The view remembers the modules whose forward depends on the mode weakly (found in
    review: a root module reading self.training kept itself alive in the cache)."""

    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l0, self.l1 = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l1(F.dropout(torch.relu(self.l0(x)), 0.5, self.training))

    net = Root().eval()
    sl.partition_codes(net, torch.randn(5, 3))
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None


class _RootOwned(nn.Module):
    """A network whose root module owns a parameter and a buffer itself, and whose submodule
    has a forward hook that is a method of the root (a reference back to it)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.register_buffer("shift", torch.zeros(3))
        self.l0, self.l1 = nn.Linear(3, 8), nn.Linear(8, 2)
        self.l1.register_forward_hook(self._seen)

    def _seen(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out

    def grad_hook(self, grad: torch.Tensor) -> torch.Tensor:
        return grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l1(torch.relu(self.l0(x * self.scale + self.shift)))


_ENTRY_POINTS = {
    "affine_map": lambda m, x: sl.affine_map(m, x).A,
    "partition_codes": lambda m, x: sl.partition_codes(m, x),
    "verify": lambda m, x: sl.verify(m, x),
    "region_radius": lambda m, x: sl.region_radius(m, x),
    "local_complexity": lambda m, x: sl.local_complexity(m, x, [0.1]),
    "region_polytope": lambda m, x: sl.region_polytope(m, x[:1]),
    "layer_maso": lambda m, x: sl.layer_maso(m, x, 0)(x),
    "check_masos": lambda m, x: sl.check_masos(m, x),
    "slice_partition": lambda m, x: sl.slice_partition(m, points=tuple(x[:3]), margin=0.1),
}


@pytest.mark.usefixtures("young_heap")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("entry", sorted(_ENTRY_POINTS))
def test_the_caches_do_not_keep_a_model_that_owns_parameters_alive(entry, dtype) -> None:
    """A parameter or buffer of the root module, or a submodule whose hook is a method of the
    root, made the program hold the root, and the view
    cache keyed weakly by that root then never let it go, nor the float64 copy that the region
    functions make of a float32 model: every entry point leaves the model and its copies to the
    garbage collector (reference: a weak reference, and every object the collector tracks)."""
    torch.manual_seed(0)
    net = _RootOwned().to(dtype).eval()
    _ENTRY_POINTS[entry](net, torch.randn(4, 3, dtype=dtype))
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None
    gc.collect()  # (the float64 copy is freed once the model's cache entry went, in the first)
    assert not [o for o in gc.get_objects() if type(o) is _RootOwned]


def _assert_same_and_freed(first: object, again: object, ref: weakref.ref) -> None:
    """The same answer at both calls, and the model (dropped by the caller) freed, with the
    copies splinelens made of it."""
    if isinstance(first, torch.Tensor):
        torch.testing.assert_close(again, first, rtol=0, atol=0)
    gc.collect()
    gc.collect()
    assert ref() is None
    assert not [o for o in gc.get_objects() if type(o) is _RootOwned]


@pytest.mark.usefixtures("young_heap")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("entry", ["affine_map", "partition_codes", "region_radius"])
def test_a_config_object_holding_the_model_does_not_keep_it_alive(entry, dtype) -> None:
    """An attribute without weak references (a SimpleNamespace) that holds the model: the
    structure holds such objects to keep their ids, so the cache kept the model (found by a
    lifetime audit); such a capture is not cached, saying so. Reference: a weak reference, the
    objects the collector tracks, and the same answer at a second call."""
    torch.manual_seed(0)
    net, x = _RootOwned().to(dtype).eval(), torch.randn(4, 3, dtype=dtype)
    net.cfg = types.SimpleNamespace(width=8, owner=net)
    with pytest.warns(UserWarning, match="cannot cache its capture and captures it at every call"):
        first = _ENTRY_POINTS[entry](net, x)
    with pytest.warns(UserWarning, match="cannot cache its capture"):
        again = _ENTRY_POINTS[entry](net, x)
    ref = weakref.ref(net)
    del net
    _assert_same_and_freed(first, again, ref)


@pytest.mark.parametrize(
    ("entry", "dtype"),  # (the view cache; the float64 twin of a float32 model; a MASO's slots)
    [
        ("affine_map", torch.float32),
        ("partition_codes", torch.float64),
        ("region_radius", torch.float32),
        ("slice_partition", torch.float64),
        ("layer_maso", torch.float64),
    ],
)
@pytest.mark.usefixtures("young_heap")
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_parameter_hook_that_is_a_method_of_the_model_does_not_keep_it_alive(
    entry, dtype, when
) -> None:
    """A parameter whose gradient hook is a method of the model, registered before or after
    the first call: the view held its tensors (for their checks), so the view cache kept the
    model forever. Reference: a weak reference, the objects the collector tracks, and the same
    answer at a second call, with no warning (the capture is cached)."""
    torch.manual_seed(0)
    net, x = _RootOwned().to(dtype).eval(), torch.randn(4, 3, dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cannot cache its capture")
        if when == "before":
            net.l0.weight.register_hook(net.grad_hook)
        first = _ENTRY_POINTS[entry](net, x)
        if when == "after":
            net.l0.weight.register_hook(net.grad_hook)
        again = _ENTRY_POINTS[entry](net, x)
    ref = weakref.ref(net)
    del net
    _assert_same_and_freed(first, again, ref)


@pytest.mark.usefixtures("young_heap")
@pytest.mark.parametrize("entry", ["affine_map", "partition_codes", "verify"])
def test_a_cached_capture_keeps_neither_the_batch_nor_the_export(entry) -> None:
    """The lazy check of a batch of 1 held the whole example batch and the export (with the
    model's tensors) until a batch of 1 came: a cached capture of 1037 inputs kept them all.
    Reference: the tensors and exported programs the collector tracks."""
    torch.manual_seed(0)
    net, x = _RootOwned().double().eval(), torch.randn(1037, 3, dtype=torch.float64)
    _ENTRY_POINTS[entry](net, x)
    del x
    gc.collect()
    tracked = gc.get_objects()
    # (plain tensors: torch keeps the export's fake ones, which hold no data, in its caches)
    assert not [o for o in tracked if type(o) is torch.Tensor and o.shape[:1] == (1037,)]
    assert not [o for o in tracked if isinstance(o, torch.export.ExportedProgram)]
    assert sl.SplineView(net, torch.randn(2, 3, dtype=torch.float64)).program.batch.accepts(1)


def _tracked(kind: type, shape: tuple, dtype: torch.dtype | None = None) -> int:
    """How many tensors of exactly this type and shape (and dtype) the collector tracks."""
    gc.collect()
    objs = gc.get_objects()
    return sum(type(o) is kind and o.shape == shape and dtype in (None, o.dtype) for o in objs)


@pytest.mark.usefixtures("young_heap")
@pytest.mark.parametrize("entry", ["partition_codes", "region_radius"])
def test_a_model_converted_after_a_call_leaves_no_copy_of_its_old_weights(entry) -> None:
    """model.double() after a call: the cached view of float32 inputs (and the float64 twin the
    region functions make of a float32 model) stayed in the caches for the model's life, each
    with a copy of the weights. Reference: the tensors of the weight's shape the collector
    tracks (the model's own parameter is the one left)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(37, 53), nn.ReLU(), nn.Linear(53, 2)).eval()
    x = torch.randn(4, 37)
    _ENTRY_POINTS[entry](net, x)
    net.double()
    _ENTRY_POINTS[entry](net, x.double())
    assert _tracked(torch.Tensor, (53, 37), torch.float32) == 0  # (views of the old weights)
    assert _tracked(nn.Parameter, (53, 37)) == 1  # net's own: no float64 twin left


@pytest.mark.usefixtures("young_heap")
def test_a_layer_maso_and_a_slice_keep_no_view_of_the_batch() -> None:
    """layer_maso kept x[:1], a view of the whole batch; slice_partition kept origin and
    directions as given, views of their batch. Reference: the tensors of the batch's shape the
    collector tracks, and the results as they were."""
    torch.manual_seed(0)
    net = _RootOwned().double().eval()
    xs = torch.randn(1037, 3, dtype=torch.float64)
    maso = sl.layer_maso(net, xs, 0)
    part = sl.slice_partition(net, xs[0], xs[1:3], bounds=(-1.0, 1.0, -1.0, 1.0))
    graph = torch.randn(1037, 3, dtype=torch.float64, requires_grad=True) * 1  # (with a graph)
    sl.slice_partition(net, graph[0], graph[1:3], bounds=(-1.0, 1.0, -1.0, 1.0))
    del graph
    h, first = torch.randn(5, 3, dtype=torch.float64), xs[0].clone()
    before = maso(h)
    del xs
    assert _tracked(torch.Tensor, (1037, 3)) == 0
    assert maso.W is not None and torch.equal(maso(h), before)  # (dense: W and b)
    assert len(part.codes) >= 1 and torch.equal(part.origin, first)


@pytest.mark.usefixtures("young_heap")
def test_the_mode_table_keeps_no_module_class_alive() -> None:
    """Whether a class reads its training mode was memoised per class forever: a class made in
    a function, with what it closes over, outlived its models (the MRO memo of the structure is
    bounded, 1024 classes: cleared here). Reference: weak references."""
    from splinelens._capture import mode_modules
    from splinelens._structure import user_classes

    def make() -> type:
        big = torch.zeros(1000)

        class Scaled(nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return x * big[0]

        return Scaled

    cls = make()
    assert mode_modules(nn.Sequential(cls())) == []
    ref = weakref.ref(cls)
    del cls
    user_classes.cache_clear()
    gc.collect()
    assert ref() is None


def test_the_batch_sizes_seen_are_a_bounded_memo() -> None:
    """Every batch size asked about was remembered (chunks, tiles, planes: thousands)."""
    torch.manual_seed(0)
    view = sl.SplineView(mlp(3, 4, 2), torch.randn(2, 3, dtype=F64))
    assert all(view.program.batch.accepts(n) for n in range(2, 3000))
    assert len(view.program.batch._accepted) <= 1024


@pytest.mark.usefixtures("young_heap")
@pytest.mark.parametrize("dense", [True, False])
def test_a_layer_maso_outlives_the_models_other_references(monkeypatch, dense) -> None:
    """A MASO whose slots run the capture holds its model: it keeps working once the caller
    dropped the model, and a deep copy of it shares the model rather than copying it
    (reference: its values before, and the parameters' storage)."""
    import splinelens.geometry.maso as maso_module

    if not dense:  # no dense W: the slots come from the capture
        monkeypatch.setattr(maso_module, "_DENSE", 0)
    torch.manual_seed(0)
    net, x = _RootOwned().double().eval(), torch.randn(4, 3, dtype=torch.float64)
    maso, h = sl.layer_maso(net, x, 0), torch.randn(5, 3, dtype=torch.float64)
    before = maso(h)
    twin, shallow = copy.deepcopy(maso), copy.copy(maso)  # (copy.copy: pickled it, refused)
    del net
    gc.collect()
    for m in (maso, twin, shallow):
        torch.testing.assert_close(m(h), before, rtol=0, atol=0)
        assert torch.equal(m.argmax(h), maso.argmax(h))


def test_a_dense_layer_maso_pickles_and_a_large_one_is_refused(monkeypatch, tmp_path) -> None:
    """A dense MASO saves and loads with torch.save / pickle and gives the same values and
    pieces (reference: the original's); one whose slots run the capture refuses by name."""
    import pickle

    import splinelens.geometry.maso as maso_module

    torch.manual_seed(0)
    net, x = _RootOwned().double().eval(), torch.randn(4, 3, dtype=torch.float64)
    maso, h = sl.layer_maso(net, x, 0), torch.randn(5, 3, dtype=torch.float64)
    torch.save(maso, tmp_path / "maso.pt")
    for loaded in (
        pickle.loads(pickle.dumps(maso)),
        torch.load(tmp_path / "maso.pt", weights_only=False),
    ):
        torch.testing.assert_close(loaded(h), maso(h), rtol=0, atol=0)
        assert torch.equal(loaded.argmax(h), maso.argmax(h))
    monkeypatch.setattr(maso_module, "_DENSE", 0)
    with pytest.raises(TypeError, match=r"too large for dense slopes.*sl\.layer_maso"):
        pickle.dumps(sl.layer_maso(net, x, 0))


@pytest.mark.usefixtures("young_heap")
def test_a_map_still_answers_for_its_model_after_a_submodule_was_replaced() -> None:
    """A map answers for the model as it was when made (its owners held strongly): replacing a
    submodule, or dropping the model, leaves it exact for the old one (reference: the values
    computed before the change)."""
    torch.manual_seed(0)
    net, x = _RootOwned().double().eval(), torch.randn(4, 3, dtype=torch.float64)
    amap = sl.affine_map(net, x)
    b = amap.B.clone()
    net.l1 = nn.Linear(8, 2).double()
    torch.testing.assert_close(amap.A @ x.unsqueeze(-1), (amap.output - b).unsqueeze(-1))
    del net
    gc.collect()
    z = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(amap(z), (amap.A @ z.unsqueeze(-1)).squeeze(-1) + b)


def test_a_map_refuses_x_or_an_index_buffer_changed_in_place() -> None:
    """The map holds x and reads integer buffers live: an in-place change of either after it
    was made is refused (found in review: the answer mixed old states with new values)."""

    class Permuted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l0, self.l1 = nn.Linear(3, 4), nn.Linear(4, 2)
            self.register_buffer("order", torch.tensor([3, 2, 1, 0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l1(torch.relu(self.l0(x)).index_select(1, self.order))

    net, x = Permuted().double().eval(), torch.randn(5, 3, dtype=F64)
    amap = sl.affine_map(net, x)
    _ = amap.B
    x.mul_(2.0)
    with pytest.raises(ValueError, match="x changed in place after this AffineMap"):
        _ = amap.A
    amap = sl.affine_map(net, x)
    _ = amap.B
    net.order.copy_(torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="changed after this AffineMap"):
        _ = amap.A
