"""Partition codes against forward-hook references; storage, batching, save and load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import splinelens as sl
from tests import zoo

_HOOKED = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Hardtanh,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)


def hooked_states(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Reference codes: each activation module's input, turned into states by brute force."""
    states: list[torch.Tensor] = []

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        states.append(_reference_state(mod, inp[0].detach()).reshape(len(x), -1))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _HOOKED)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return states


def _reference_state(mod: nn.Module, z: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, nn.Hardtanh):  # ReLU6 is a Hardtanh
        return (z > mod.min_val).long() + (z >= mod.max_val).long()
    if isinstance(mod, (nn.ReLU, nn.LeakyReLU, nn.PReLU)):
        return (z > 0).long()
    return _window_argmax(mod, z)


def _window_argmax(mod: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Position of the max inside each pooling window, by explicit loops over the windows."""
    nd = z.dim() - 2
    spatial = z.shape[2:]
    if isinstance(mod, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)):
        osz = mod.output_size if isinstance(mod.output_size, tuple) else (mod.output_size,) * nd
        ranges = [
            [(o * s // n, math.ceil((o + 1) * s / n)) for o in range(n)]
            for s, n in zip(spatial, osz)
        ]
    else:
        k, st, p = (_tup(v, nd) for v in (mod.kernel_size, mod.stride, mod.padding))
        outs = [(s + 2 * pp - kk) // ss + 1 for s, kk, ss, pp in zip(spatial, k, st, p)]
        ranges = [
            [(o * ss - pp, o * ss - pp + kk) for o in range(n)]
            for n, kk, ss, pp in zip(outs, k, st, p)
        ]
    widths = [max(b - a for a, b in r) for r in ranges]
    out = torch.empty(*z.shape[:2], *[len(r) for r in ranges], dtype=torch.long)
    for pos in _product(*[range(len(r)) for r in ranges]):
        best = None
        for off in _product(*[range(a, b) for a, b in (ranges[d][pos[d]] for d in range(nd))]):
            if all(0 <= o < s for o, s in zip(off, spatial)):
                v = z[(slice(None), slice(None), *off)]
                rel = [o - ranges[d][pos[d]][0] for d, o in enumerate(off)]
                flat = 0
                for r_, w in zip(rel, widths):
                    flat = flat * w + r_
                if best is None:
                    best_v, best = v.clone(), torch.full_like(v, flat, dtype=torch.long)
                else:
                    better = v > best_v  # the first maximum wins, as in PyTorch
                    best = torch.where(better, flat, best)
                    best_v = torch.where(better, v, best_v)
        out[(slice(None), slice(None), *pos)] = best
    return out


def _tup(v: int | tuple[int, ...], nd: int) -> tuple[int, ...]:
    return v if isinstance(v, tuple) else (v,) * nd


def _product(*ranges: range) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for r in ranges:
        out = [(*o, i) for o in out for i in r]
    return out


def pool_zoo() -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.Hardtanh(-0.3, 0.4),
            nn.MaxPool2d(3, 2, 1),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.PReLU(4),
            nn.AdaptiveMaxPool2d((3, 2)),
            nn.Flatten(),
            nn.Linear(24, 8),
            nn.ReLU6(),
            nn.Linear(8, 3),
        )
        .double()
        .eval()
    )


HOOK_MODELS = {
    "mlp": lambda: (zoo.build("mlp"), zoo.inputs("mlp", 9)),
    "small_cnn": lambda: (zoo.build("small_cnn"), zoo.inputs("small_cnn", 9)),
    "conv1d": lambda: (zoo.build("conv1d"), zoo.inputs("conv1d", 9)),
    "conv3d": lambda: (zoo.build("conv3d"), zoo.inputs("conv3d", 9)),
    "pools": lambda: (pool_zoo(), torch.randn(9, 2, 9, 7, dtype=torch.float64)),
}


@pytest.mark.parametrize("name", list(HOOK_MODELS))
def test_codes_match_forward_hooks(name: str) -> None:
    model, x = HOOK_MODELS[name]()
    codes = sl.partition_codes(model, x)
    ref = hooked_states(model, x)
    assert len(codes.layers) == len(ref)
    for layer, r in zip(codes.layers, ref):
        assert layer.units == r.shape[1]
        assert torch.equal(layer.states(), r), layer.name


def test_layer_metadata() -> None:
    model, x = HOOK_MODELS["pools"]()
    view = sl.SplineView(model, x)
    got = [(la.name, la.kind, la.shape, la.pieces) for la in view.layers]
    assert got == [
        ("1", "hardtanh", (4, 9, 7), 3),
        ("2", "max_pool2d", (4, 5, 4), 9),
        ("4", "prelu", (4, 5, 4), 2),
        ("5", "adaptive_max_pool2d", (4, 3, 2), 6),
        ("8", "hardtanh", (8,), 3),
    ]


def test_layer_names_for_reused_modules_and_functional_ops() -> None:
    view = sl.SplineView(zoo.build("resnet"), zoo.inputs("resnet"))
    assert [la.name for la in view.layers] == [
        "relu",
        "block1.relu[0]",
        "block1.relu[1]",
        "block2.relu[0]",
        "block2.relu[1]",
    ]
    view = sl.SplineView(zoo.build("rnn"), zoo.inputs("rnn"))
    assert len(view.layers) == 2 * 5  # two layers, five time steps, unrolled
    assert all(la.units == 8 and la.kind == "relu" for la in view.layers)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_codes_do_not_depend_on_batching(name: str) -> None:
    model, x = zoo.build(name), zoo.inputs(name, n=10)
    whole = sl.partition_codes(model, x)
    parts = sl.PartitionCodes.cat(
        [sl.partition_codes(model, x[i : i + 3]) for i in range(0, 10, 3)]
    )
    small = sl.partition_codes(model, x, batch_size=4)
    for a, b, c in zip(whole.layers, parts.layers, small.layers):
        assert torch.equal(a.data, b.data) and torch.equal(a.data, c.data)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_codes_fix_the_affine_map(name: str) -> None:
    """Same codes <=> same frozen network: a tiny move keeps the codes and the map."""
    model, x = zoo.build(name), zoo.inputs(name, n=3)
    near = x + 1e-10 * torch.randn_like(x)
    ca, cb = sl.partition_codes(model, x), sl.partition_codes(model, near)
    assert all(torch.equal(a.data, b.data) for a, b in zip(ca.layers, cb.layers))
    torch.testing.assert_close(
        sl.affine_map(model, x).A, sl.affine_map(model, near).A, atol=1e-12, rtol=0
    )


def test_binary_layers_pack_one_bit_per_unit() -> None:
    model, x = zoo.build("mlp"), zoo.inputs("mlp", 5)
    layer = sl.partition_codes(model, x).layers[0]
    assert layer.data.dtype == torch.uint8 and layer.data.shape == (5, 2)  # 16 units, 2 bytes
    assert torch.equal(layer.states(), (model[0](x) > 0).long())


def test_save_load_roundtrip_and_indexing(tmp_path) -> None:
    model, x = HOOK_MODELS["pools"]()
    codes = sl.partition_codes(model, x)
    path = tmp_path / "codes.npz"
    codes.save(path)
    back = sl.PartitionCodes.load(path)
    assert [(c.name, c.kind, c.units, c.pieces) for c in back.layers] == [
        (c.name, c.kind, c.units, c.pieces) for c in codes.layers
    ]
    assert all(torch.equal(a.data, b.data) for a, b in zip(codes.layers, back.layers))
    sub = codes[torch.tensor([4, 1])]
    assert torch.equal(sub.layers[1].states(), codes.layers[1].states()[[4, 1]])
    assert len(codes[2]) == 1 and len(codes[2:5]) == 3
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_a_boolean_index_of_no_dimension_is_refused() -> None:
    """codes[torch.tensor(True)] was row 1 and codes[torch.tensor(False)] row 0 (int() of the
    flag), where torch reads a mask: all rows, none (found in review). Refused as a Python bool
    is, and so are indices of two dimensions (they failed with "data must be a 2-D tensor");
    an integer of no dimension still picks its row (reference: the states indexed)."""
    model, x = HOOK_MODELS["pools"]()
    codes = sl.partition_codes(model, x)
    for flag in (torch.tensor(True), torch.tensor(False), np.bool_(True), True):
        with pytest.raises(TypeError, match="index codes with an int"):
            codes[flag]
    for units in ((0, 1), torch.tensor([[0, 1]]), np.array([[1]]), [[0, 1]], [[0], [1, 2]]):
        with pytest.raises(TypeError, match="1-D index tensor or list"):
            codes[units]
    with pytest.raises(TypeError, match="index codes with an int"):
        codes[np.array(True)]
    for i in (torch.tensor(2), np.int64(-1), np.array(2)):
        assert torch.equal(codes[i].layers[1].states(), codes.layers[1].states()[[int(i)]])


def test_load_rejects_foreign_file(tmp_path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, meta=np.array('{"format": "something else"}'))
    with pytest.raises(ValueError, match="not a splinelens partition-code file"):
        sl.PartitionCodes.load(path)
    np.save(tmp_path / "array.npy", np.zeros(3))  # (said: "does not support the context manager")
    with pytest.raises(sl.CodesFileError, match=r"not an \.npz archive"):
        sl.PartitionCodes.load(tmp_path / "array.npy")


def test_cat_refuses_codes_of_different_networks() -> None:
    a = sl.partition_codes(zoo.build("mlp"), zoo.inputs("mlp", 2))
    b = sl.partition_codes(zoo.build("shared_module"), zoo.inputs("shared_module", 2))
    with pytest.raises(ValueError, match="different networks"):
        sl.PartitionCodes.cat([a, b])


def test_channel_max_codes_are_the_argmax() -> None:
    model, x = zoo.build("maxout"), zoo.inputs("maxout", 6)
    codes = sl.partition_codes(model, x)
    with torch.no_grad():
        z = model.conv(x)
    ref = z.view(6, 4, 2, 6, 6).argmax(2).reshape(6, -1)
    assert torch.equal(codes.layers[0].states(), ref)
    assert codes.layers[0].pieces == 2 and codes.layers[2].kind == "max"
    h = F.pad(F.max_pool2d(z.view(6, 4, 2, 6, 6).amax(2), 3, 2, 1), (0, 1, 0, 1))
    ref_maxout = model.fc1(h.flatten(1)).view(6, 4, 3).argmax(2)
    assert torch.equal(codes.layers[2].states(), ref_maxout)


def test_cat_takes_any_iterable_of_codes_and_names_what_is_not() -> None:
    """cat([codes, "x"]) raised AttributeError ('str' object has no attribute 'signature') and
    cat(iter([...])) TypeError (not subscriptable)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU()).eval()
    a, b = sl.partition_codes(net, torch.randn(2, 3)), sl.partition_codes(net, torch.randn(3, 3))
    whole = sl.PartitionCodes.cat(iter([a, b]))
    assert len(whole) == 5 and torch.equal(whole.layers[0].data[2:], b.layers[0].data)
    with pytest.raises(TypeError, match=r"takes a list of PartitionCodes, found a str"):
        sl.PartitionCodes.cat([a, "x"])


def test_the_check_command_leaves_the_callers_random_state() -> None:
    """splinelens check (main(["check"]) from Python) reset the global RNG to seed 0."""
    from splinelens.cli import main

    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    assert main(["check", "--batch", "2"]) == 0
    assert torch.equal(torch.rand(3), want)
