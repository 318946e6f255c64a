"""The structure guard (``_guard``): True on an unchanged model on the common path, and never True
where ``structure(model)`` differs from the stored one, whatever changed (soundness)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.modules import module as torch_module
from torch.nn.utils import parametrize, prune

import splinelens as sl
import splinelens.view as view_module
from splinelens._guard import structure_guard
from splinelens._structure import structure
from tests import zoo


def cnn() -> nn.Sequential:
    """Conv, BatchNorm, pooling, a shared ReLU and a bias-free Linear: torch classes only."""
    relu = nn.ReLU()
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        relu,
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, stride=(1, 1), padding="same"),
        relu,
        nn.Sequential(nn.Flatten(), nn.Linear(64, 3, bias=False), nn.Dropout(0.1)),
    ).eval()


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


class Mine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _hook(*args: object) -> None:
    return None


def _replace_param(m: nn.Module) -> None:
    m[0].weight = nn.Parameter(m[0].weight.detach().clone())


def _set_data(m: nn.Module) -> None:
    m[0].weight.data = torch.zeros(4, 2, 3, 3)[:, :, :2]


def _reorder(m: nn.Module) -> None:
    d = vars(m[0])
    d["in_channels"] = d.pop("in_channels")


def _recreate(m: nn.Module) -> None:
    del m[3]
    gc.collect()
    m.insert(3, nn.MaxPool2d(2))  # (may reuse the freed module's id)


def _global(register: Callable) -> Callable[[nn.Module], None]:
    def mutate(m: nn.Module) -> None:
        register(_hook)

    return mutate


# (name, mutation of a ``cnn()``, whether it changes the structure: None if it may not)
MUTATIONS: list[tuple[str, Callable[[nn.Module], object], bool | None]] = [
    ("nothing", lambda m: None, False),
    ("train in place", lambda m: m[0].weight.data.add_(1.0), False),
    ("train mode", lambda m: m.train(), False),
    ("requires_grad", lambda m: m[0].weight.requires_grad_(False), False),
    ("equal tuple", lambda m: setattr(m[4], "stride", (1.0, True)), False),
    ("equal float", lambda m: setattr(m[1], "momentum", 0.1), False),
    ("int to float", lambda m: setattr(m[0], "groups", 1.0), False),
    ("empty hook dict", lambda m: setattr(m[0], "_forward_hooks", {}), False),
    ("replace submodule", lambda m: m.__setitem__(2, nn.ReLU()), True),
    ("replace by another class", lambda m: m.__setitem__(2, nn.Tanh()), True),
    ("class changed", lambda m: setattr(m[2], "__class__", nn.ReLU6), True),
    ("set attribute", lambda m: setattr(m[2], "inplace", True), True),
    ("add attribute", lambda m: setattr(m[3], "extra", 1), True),
    ("delete attribute", lambda m: delattr(m[3], "ceil_mode"), True),
    ("reorder attributes", _reorder, True),
    ("stride", lambda m: setattr(m[0], "stride", (2, 2)), True),
    ("padding", lambda m: setattr(m[0], "padding", (0, 1)), True),
    ("padding string", lambda m: setattr(m[4], "padding", "valid"), True),
    ("list", lambda m: setattr(m[0], "kernel_size", [3, 3]), True),
    ("nan", lambda m: setattr(m[1], "eps", float("nan")), True),
    ("tensor attribute", lambda m: setattr(m[3], "scale", torch.ones(1)), True),
    ("forward hook", lambda m: m[2].register_forward_hook(_hook), True),
    ("forward pre-hook", lambda m: m[0].register_forward_pre_hook(_hook), True),
    ("hook on the root", lambda m: m.register_forward_hook(_hook), True),
    ("backward hook", lambda m: m[0].register_full_backward_hook(_hook), True),
    ("hook by hand", lambda m: m[1]._forward_hooks.__setitem__(-1, _hook), True),
    ("state dict hook", lambda m: m[1]._state_dict_hooks.__setitem__(-1, _hook), True),
    ("global forward hook", _global(torch_module.register_module_forward_hook), True),
    ("global pre-hook", _global(torch_module.register_module_forward_pre_hook), True),
    ("replace parameter", _replace_param, True),
    ("parameter .data of another shape", _set_data, True),
    ("parameter attribute", lambda m: setattr(m[0].weight, "tag", 1), True),
    ("parameter to None", lambda m: setattr(m[0], "bias", None), True),
    ("buffer replaced", lambda m: setattr(m[1], "running_mean", torch.zeros(4)), True),
    ("buffer added", lambda m: m[3].register_buffer("b", torch.zeros(1)), True),
    ("parameter added", lambda m: m[2].register_parameter("p", None), True),
    ("double", lambda m: m.double(), True),
    ("half of one", lambda m: m[6][1].half(), True),
    ("channels_last", lambda m: m.to(memory_format=torch.channels_last), True),
    ("delete a child", lambda m: m.__delitem__(3), True),
    ("child to None", lambda m: m._modules.__setitem__("3", None), True),
    ("nested child", lambda m: m[6].append(nn.ReLU()), True),
    ("child renamed", lambda m: m.add_module("x", m._modules.pop("6")), True),
    ("recreated module", _recreate, True),
    ("modules dict replaced", lambda m: setattr(m[6], "_modules", dict(m[6]._modules)), False),
    ("default dtype", lambda m: torch.set_default_dtype(torch.float64), True),
    ("pruned", lambda m: prune.l1_unstructured(m[0], "weight", 0.5), True),
    (
        "parametrized",
        lambda m: parametrize.register_parametrization(m[6][1], "weight", nn.Identity()),
        True,
    ),
]


GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks")


def _restore_globals(dtype: torch.dtype, hooks: dict[str, dict]) -> None:
    torch.set_default_dtype(dtype)
    for h, d in hooks.items():
        getattr(torch_module, h).clear()
        getattr(torch_module, h).update(d)


@pytest.fixture(autouse=True)
def _globals_restored():
    dtype = torch.get_default_dtype()
    hooks = {h: dict(getattr(torch_module, h)) for h in GLOBAL_HOOKS}
    yield
    _restore_globals(dtype, hooks)


@pytest.mark.parametrize("name,mutate,changes", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_guard_is_never_true_where_the_structure_changed(name, mutate, changes):
    model = cnn()
    stored = structure(model)
    guard = structure_guard(model, stored)
    assert guard is not None and guard(model)
    mutate(model)
    same = structure(model) == stored
    if changes is not None:
        assert same is not changes  # (the mutation does what it says)
    assert not guard(model) or same
    if changes is False:
        assert guard(model)  # what the capture does not depend on keeps the fast path


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.integers(0, len(MUTATIONS) - 1), min_size=1, max_size=4))
def test_guard_is_sound_after_sequences_of_changes(picks):
    model = cnn()
    stored = structure(model)
    guard = structure_guard(model, stored)
    dtype, hooks = (
        torch.get_default_dtype(),
        {h: dict(getattr(torch_module, h)) for h in GLOBAL_HOOKS},
    )
    try:
        for i in picks:
            try:
                MUTATIONS[i][1](model)
            except Exception:  # (a mutation that no longer applies: a deleted child, ...)
                continue
            assert not guard(model) or structure(model) == stored
    finally:
        _restore_globals(dtype, hooks)


def test_guard_refuses_another_model_and_dead_objects():
    model = mlp()
    guard = structure_guard(model, structure(model))
    assert guard is not None and guard(model)
    assert not guard(mlp())  # (same architecture, other objects)
    stored = structure(model)
    guard = structure_guard(model, stored)
    del model
    gc.collect()
    again = mlp()  # (may reuse the ids of the dead model's objects)
    assert structure(again) != stored and not guard(again)


def test_guard_holds_nothing_alive():
    model = cnn()
    guard = structure_guard(model, structure(model))
    refs = [weakref.ref(model), weakref.ref(model[0]), weakref.ref(model[0].weight)]
    del model
    gc.collect()
    assert guard is not None and all(r() is None for r in refs)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_guard_on_the_zoo(name):
    model = zoo.build(name)
    stored = structure(model)
    guard = structure_guard(model, stored)
    torch_only = all(type(m).__module__.startswith("torch.") for m in model.modules())
    if guard is None:  # (off the common path: a class of your own, a hook, ...)
        assert not torch_only or name == "rnn"
        return
    assert guard(model)
    model.double().float()
    assert not guard(model) or structure(model) == stored


@pytest.mark.parametrize(
    "make,fast",
    [
        (mlp, True),
        (cnn, True),
        (lambda: nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Hardtanh()), True),
        (nn.PReLU, False),  # (sets an attribute before nn.Module.__init__: off the common path)
        (Mine, False),  # a class of your own: its class attributes
        (lambda: nn.Sequential(Mine()), False),
        (lambda: _hooked(mlp()), False),
        (lambda: _tagged(mlp()), False),
        (lambda: nn.Sequential(nn.LazyLinear(3)), False),
    ],
)
def test_guard_fast_path(make, fast):
    model = make()
    guard = structure_guard(model, structure(model))
    assert (guard is not None) is fast
    assert guard is None or guard(model)


def _hooked(m: nn.Module) -> nn.Module:
    m[1].register_forward_hook(_hook)
    return m


def _tagged(m: nn.Module) -> nn.Module:
    m[0].weight.tag = "mine"
    return m


def test_guard_none_where_the_stored_structure_is_stale():
    model = mlp()
    stored = structure(model)
    model[1] = nn.ReLU()
    assert structure_guard(model, stored) is None


def test_the_check_of_a_view_takes_the_guard_and_refuses_changes(monkeypatch):
    model = mlp().eval()
    x = torch.randn(3, 4)
    view = sl.SplineView(model, x)
    sl.partition_codes(model, x)  # (cached)
    walks = []

    def counted(m: nn.Module) -> object:
        walks.append(m)
        return structure(m)

    monkeypatch.setattr(view_module, "structure", counted)
    view.check(x)
    view.partition_codes(x)
    view.affine_map(x)
    sl.partition_codes(model, x)
    assert walks == []  # (the guard told)
    model[1] = nn.ReLU()
    with pytest.raises(sl.StaleCaptureError, match="module '1' was replaced"):
        view.partition_codes(x)
