"""The structure guard (``_guard``): True on an unchanged model on the common path, and never True
where ``structure(model)`` differs from the stored one, whatever changed (soundness)."""

from __future__ import annotations

import copy
import gc
import operator
import weakref
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
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


def _with_class_attribute(value: object) -> nn.Module:
    """A Mine whose class (a new one) has the class attribute ``extra``."""
    return type("WithExtra", (Mine,), {"extra": value})()


def _with_instance_function() -> nn.Module:
    model = Mine()
    model.fn = F.relu
    return model


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


SEQUENCES = settings(  # random sequences of mutations
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@SEQUENCES
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


@pytest.mark.usefixtures("young_heap")
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


@pytest.mark.usefixtures("young_heap")
def test_guard_holds_nothing_alive():
    model = cnn()
    guard = structure_guard(model, structure(model))
    refs = [weakref.ref(model), weakref.ref(model[0]), weakref.ref(model[0].weight)]
    del model
    gc.collect()
    assert guard is not None and all(r() is None for r in refs)


# the zoo models off the guard's path: a PReLU (an attribute set before nn.Module.__init__), an
# RNN (its flat weights), spline activations (tensors by value) and a splinified forward
UNGUARDED = {
    "rnn",
    "splined_gelu_mlp",
    "splined_tanh_cnn",
    "splined_functional",
}


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_guard_on_the_zoo(name):
    model = zoo.build(name)
    stored = structure(model)
    guard = structure_guard(model, stored)
    assert (guard is not None) is (name not in UNGUARDED)
    if guard is None:
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
        (nn.PReLU, True),  # (sets an attribute before nn.Module.__init__)
        (Mine, True),  # a class of your own: its class attributes at every call
        (lambda: nn.Sequential(Mine()), True),
        (lambda: _user_net()[0], True),
        (lambda: _with_class_attribute([1, 2]), False),  # (changed in place)
        (lambda: _with_class_attribute({"a": 1}), False),
        (lambda: _with_class_attribute(nn.ReLU()), False),  # (an object)
        (lambda: _with_class_attribute(nn.ReLU), False),  # (a class)
        (lambda: _with_class_attribute(((1, 2), 3)), False),  # (a nested tuple)
        (lambda: _with_class_attribute(staticmethod(torch.relu)), False),  # (a builtin)
        (lambda: _with_class_attribute(property(operator.attrgetter("x"))), False),
        (lambda: _with_class_attribute(operator.attrgetter("x")), False),
        (lambda: _with_class_attribute((1, "a", None, torch.float32)), True),
        (lambda: _with_class_attribute(classmethod(_hook)), True),
        (_with_instance_function, False),  # (self.fn = F.relu)
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


def _replace_relu(model: nn.Module) -> None:
    model[1] = nn.ReLU()


def _patch_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo.ResBlock, "forward", lambda self, x: x)


@pytest.mark.parametrize(
    "make, shape, change, match",
    [
        (mlp, (3, 4), lambda m, mp: _replace_relu(m), "module '1' was replaced"),  # torch layers
        (zoo.ResNet, (2, 3, 8, 8), lambda m, mp: _patch_block(mp), "changed"),  # classes of yours
    ],
)
def test_the_check_of_a_view_takes_the_guard_and_refuses_changes(
    monkeypatch, make, shape, change, match
):
    model = make().eval()
    x = torch.randn(*shape)
    view = sl.SplineView(model, x)
    sl.partition_codes(model, x)  # (cached)
    walks = []

    def counted(m: nn.Module) -> object:
        walks.append(m)
        return structure(m)

    monkeypatch.setattr(view_module, "structure", counted)
    assert view.guard is not None
    view.check(x)
    view.partition_codes(x)
    view.affine_map(x)
    sl.partition_codes(model, x)
    assert walks == []  # (the guard told)
    change(model, monkeypatch)
    with pytest.raises(sl.StaleCaptureError, match=match):
        view.partition_codes(x)


def _user_net() -> tuple[nn.Module, dict[str, type]]:
    """A model of classes of your own, new classes at every call (the mutations change them):
    Net(Base) holding a Block(Base), and the classes by name."""

    class Base(nn.Module):
        depth = 2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Block(Base):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.fc(x))

    class Net(Base):
        scale = 1
        sizes = (1, 2)
        name = "net"

        def __init__(self) -> None:
            super().__init__()
            self.block = Block()
            self.gain = 2.0

        @property
        def width(self) -> int:
            return 2

        @staticmethod
        def act(x: torch.Tensor) -> torch.Tensor:
            return F.relu(x)

        @classmethod
        def make(cls) -> nn.Module:
            return cls()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.block(x)) * self.scale

    class Other(nn.Module):
        depth = 3

    return Net(), {"Base": Base, "Block": Block, "Net": Net, "Other": Other}


def _other_function(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x


def _del(name: str, attr: str) -> Callable:
    return lambda m, c: delattr(c[name], attr)


def _set(name: str, attr: str, value: object) -> Callable:
    return lambda m, c: setattr(c[name], attr, value)


def _reinit(attr: str, *args: object) -> Callable:
    return lambda m, c: vars(c["Net"])[attr].__init__(*args)


def _forward_freed(m: nn.Module, c: dict[str, type]) -> None:
    c["Net"].forward = None
    gc.collect()  # (the stored forward dies: its weak reference gives None)


# (name, mutation of ``_user_net()``'s model and classes, whether it changes the structure:
# None if it does not, though the guard may not tell, comparing by identity)
USER_MUTATIONS: list[tuple[str, Callable, bool | None]] = [
    ("nothing", lambda m, c: None, False),
    ("deep copy", lambda m, c: copy.deepcopy(m), False),
    (
        "forward set again",
        lambda m, c: setattr(c["Net"], "forward", vars(c["Net"])["forward"]),
        False,
    ),
    ("dunder added", _set("Net", "__call__", nn.Module.__call__), False),
    ("__annotations__ read (made)", lambda m, c: c["Block"].__annotations__, False),
    ("instance attribute", lambda m, c: setattr(m, "gain", 3.0), True),
    ("forward patched", _set("Net", "forward", _other_function), True),
    ("base forward patched", _set("Block", "forward", _other_function), True),
    ("forward to None, freed", _forward_freed, True),
    ("scale 2", _set("Net", "scale", 2), True),
    ("scale 1.0", _set("Net", "scale", 1.0), None),
    ("name", _set("Net", "name", "other"), True),
    ("tuple changed", _set("Net", "sizes", (1, 3)), True),
    ("tuple to list", _set("Net", "sizes", [1, 2]), True),
    ("equal tuple", _set("Net", "sizes", tuple([1, 2])), None),
    ("attribute added", _set("Net", "extra", 1), True),
    ("attribute added to a base", _set("Base", "extra", 1), True),
    ("attribute deleted", _del("Net", "scale"), True),
    ("method deleted", _del("Block", "forward"), True),
    ("base attribute changed", _set("Base", "depth", 3), True),
    ("base attribute shadowed", _set("Block", "depth", 2), True),
    ("property replaced", _set("Net", "width", property(lambda self: 3)), True),
    (
        "property setter",
        lambda m, c: setattr(c["Net"], "width", c["Net"].width.setter(_hook)),
        True,
    ),
    ("property re-initialised", _reinit("width", _other_function), True),
    ("staticmethod replaced", _set("Net", "act", staticmethod(_other_function)), True),
    ("staticmethod re-initialised", _reinit("act", _other_function), True),
    ("staticmethod to classmethod", _set("Net", "act", classmethod(_other_function)), True),
    ("classmethod replaced", _set("Net", "make", classmethod(_other_function)), True),
    ("classmethod re-initialised", _reinit("make", _other_function), True),
    ("bases changed", lambda m, c: setattr(c["Block"], "__bases__", (c["Other"],)), True),
    ("base's bases changed", lambda m, c: setattr(c["Base"], "__bases__", (c["Other"],)), True),
    ("bases to a torch class", lambda m, c: setattr(c["Block"], "__bases__", (nn.Module,)), True),
    ("module class changed", lambda m, c: setattr(m.block, "__class__", c["Other"]), True),
    (
        "module class to a subclass",
        lambda m, c: setattr(m, "__class__", type("Sub", (c["Net"],), {})),
        True,
    ),
]


@pytest.mark.parametrize("name,mutate,changes", USER_MUTATIONS, ids=[m[0] for m in USER_MUTATIONS])
def test_guard_of_classes_of_your_own_is_never_true_where_the_structure_changed(
    name, mutate, changes
):
    model, classes = _user_net()
    stored = structure(model)
    guard = structure_guard(model, stored)
    assert guard is not None and guard(model)
    mutate(model, classes)
    same = structure(model) == stored
    assert same is not changes if changes is not None else same
    assert not guard(model) or same
    if changes is False:
        assert guard(model)  # (what the image leaves out keeps the fast path)


@SEQUENCES
@given(st.lists(st.integers(0, len(USER_MUTATIONS) - 1), min_size=1, max_size=4))
def test_guard_of_classes_of_your_own_is_sound_after_sequences_of_changes(picks):
    model, classes = _user_net()
    stored = structure(model)
    guard = structure_guard(model, stored)
    for i in picks:
        try:
            USER_MUTATIONS[i][1](model, classes)
        except Exception:  # (a mutation that no longer applies: a deleted attribute, ...)
            continue
        assert not guard(model) or structure(model) == stored


def test_attributes_export_copied_keep_the_inline_comparison(monkeypatch):
    """The static export of a first batch of 1 replaces a conv's kernel size, stride and
    padding with equal tuples: the guard still tells inline (no call of ``same_value``)."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU()).eval()
    view = sl.SplineView(model, torch.randn(2, 2, 5, 5))
    padding = model[0].padding
    view.partition_codes(torch.randn(1, 2, 5, 5))  # (the check of a batch of 1)
    assert model[0].padding == padding and model[0].padding is not padding
    calls = []
    same = view.guard.__globals__["same_value"]
    monkeypatch.setitem(
        view.guard.__globals__, "same_value", lambda *a: calls.append(a) or same(*a)
    )
    assert view.guard(model) and calls == []
    model[0].padding = [1, 1]  # (equal entries, another kind: as the images compare, unequal)
    assert not view.guard(model) and calls


def test_guard_of_a_module_with_attributes_set_before_module_init():
    model = nn.Sequential(nn.Linear(2, 2), nn.PReLU(2))
    stored = structure(model)
    guard = structure_guard(model, stored)
    assert guard is not None and guard(model)
    model[1].init = 0.5
    assert not guard(model) and structure(model) != stored
    model[1].init = 0.25
    d = vars(model[1])
    d["num_parameters"] = d.pop("num_parameters")  # (now after nn.Module's own)
    assert not guard(model)


_SHADOW = {"on": False}


class _Shadowed(nn.Module):
    """A class-level property that answers for the instance's ``_modules``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    @property
    def _modules(self) -> dict:
        d = self.__dict__["_modules"]
        return {**d, "extra": nn.Tanh()} if _SHADOW["on"] else d

    @_modules.setter
    def _modules(self, value: dict) -> None:
        self.__dict__["_modules"] = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_guard_and_structure_read_the_same_dicts():
    model = _Shadowed()
    stored = structure(model)
    guard = structure_guard(model, stored)
    try:
        _SHADOW["on"] = True
        assert not guard(model) or structure(model) == stored
    finally:
        _SHADOW["on"] = False


def test_an_attribute_name_of_another_hash_is_not_a_crash():
    """A key equal to an attribute's name but of another hash (a str subclass) made the guard
    raise KeyError; it cannot tell (False), and the walk decides."""

    class Key(str):
        def __hash__(self) -> int:
            return str.__hash__(self) + 1

    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    stored = structure(model)
    guard = structure_guard(model, stored)
    assert guard is not None and guard(model)
    d = vars(model[0])
    items = [(Key(k) if k == "out_features" else k, v) for k, v in d.items()]
    d.clear()
    d.update(items)
    assert guard(model) is False
