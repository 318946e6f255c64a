"""The per-call checks are cheap and still exact (issue 10): the weights' fingerprint and
finiteness check in one pass of native-dtype sums, and the structure's fast paths.

References: ``named_parameters`` / ``named_buffers`` for the walk, ``Tensor.sum`` in the
tensor's own dtype for the sums (compared exactly), the general image of ``_structure._value``
for its inline fast paths; timings against a forward pass and float64 sums in the same process.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

import splinelens as sl
from splinelens import _fingerprint, _structure, _sums
from splinelens._fingerprint import check_model, check_model_finite, weights_fingerprint
from splinelens._structure import Structure, structure
from splinelens._structure_diff import describe_change
from splinelens._tensors import model_state
from tests import zoo


def mnist_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(256, 10)).eval()


# 1. One pass: finite, and a fingerprint that sees changes ---------------------------------------


def test_the_fingerprint_is_stable_and_sees_every_kind_of_change() -> None:
    model = mnist_mlp()
    before = check_model(model)
    assert check_model(model) == before == weights_fingerprint(model)
    assert hash(before) == hash(check_model(model))
    changes: dict[str, Callable[[], object]] = {
        "through .data": lambda: model[1].weight.data.mul_(-1),  # no version bump
        "in place": lambda: model[3].bias.add_(1.0),
        "replaced": lambda: setattr(model[5], "weight", nn.Parameter(model[5].weight.clone())),
        ".data rebound": lambda: setattr(model[5].bias, "data", model[5].bias.data.clone()),
    }
    for name, change in changes.items():
        now = check_model(model)
        with torch.no_grad():
            change()
        assert check_model(model) != now, name


def test_model_tensors_follow_data_that_moves_to_new_storage() -> None:
    """The cached integer views are made again when a tensor's data is re-bound: a later write
    into the new storage through .data is still seen (reference: a fresh ModelTensors)."""
    model = mnist_mlp()
    tensors = _fingerprint.ModelTensors(list(model_state(model)))
    first = tensors.check()
    model[5].bias.data = model[5].bias.data.clone()  # new storage, no version bump
    moved = tensors.fingerprint()
    assert moved != first
    model[5].bias.data[3] += 1e-3
    now = tensors.fingerprint()
    assert now != moved
    assert now == _fingerprint.ModelTensors(list(model_state(model))).fingerprint()
    model[3].weight.data[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"'3\.weight' holds inf at index \(0, 0\)"):
        tensors.check()


def test_a_fingerprint_taken_while_another_call_plans_is_whole(monkeypatch) -> None:
    """Threads share a view's ModelTensors: a fingerprint taken while another call is still
    planning (here from inside the planning) uses a whole plan, never new pieces with the old
    groups of the bit sums (reference: a fresh ModelTensors; it gave bits=(); found in review)."""
    named = list(model_state(mnist_mlp()))
    tensors, reference = _fingerprint.ModelTensors(named), _fingerprint.ModelTensors(named)
    inner: list = []
    real = _fingerprint._piece_groups

    def planning(plan: list) -> list:
        if not inner:
            inner.append(None)
            inner[0] = tensors.fingerprint()  # another caller, mid-planning
        return real(plan)

    monkeypatch.setattr(_fingerprint, "_piece_groups", planning)
    assert tensors.fingerprint() == inner[0] == reference.fingerprint()


def test_the_fingerprint_of_many_small_tensors_past_4m_entries_is_its_definition() -> None:
    """520 small float32 vectors joined hold more than 4M entries: their bit sum is the total's
    (as a vector past 4M rows), beside a large tensor of the same width (its weights were
    misaligned: other bits, or an error; found in review)."""
    torch.manual_seed(0)
    named = [(f"b{i}", torch.randn(8192)) for i in range(520)] + [("w", torch.randn(300, 200))]
    fp = _fingerprint.ModelTensors(named).check()
    assert (fp.sums, fp.bits) == _reference_fingerprint(named)


_INTS = {2: (torch.int16, torch.int32), 4: (torch.int32, torch.int32), 8: (torch.int64,) * 2}


def _reference_fingerprint(named: list[tuple[str, torch.Tensor]]) -> tuple[tuple, tuple]:
    """The wide fingerprint's sums and bits from their definitions: each tensor of more than
    8192 entries (or not contiguous) alone, the others of a dtype and device joined; the
    thread-independent float sum (``fixed_sum``) of each piece; per width of the bit patterns,
    the sum of the pieces' row sums of bit patterns (a joined piece's entries) times the odd
    weights ((k * 0x9E3779B97F4A7C15, wrapping; its high half for 32 bits) | 1, k = 1, 2, ...),
    in integers that wrap."""
    alone, small = [], {}
    for _, t in named:
        t = t.detach()
        if t.numel() > 8192 or not t.is_contiguous():
            alone.append(t)
        else:
            small.setdefault((t.dtype, t.device), []).append(t.reshape(-1))
    pieces = alone + [torch.cat(v) for v in small.values()]
    sums = tuple(float(_sums.fixed_sum(p)) for p in pieces)
    rows: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in pieces:
        if p.numel():
            ints, acc = _INTS[p.element_size()]
            v = p.view(ints)
            if len(v) > 1 << 22:  # past 4M rows (a vector's entries): its total alone
                r = v.sum(dtype=acc).reshape(1)
            else:
                r = v.to(acc) if v.dim() == 1 else v.reshape(len(v), -1).sum(1, dtype=acc)
            rows.setdefault(acc, []).append(r)
    bits = []
    for acc, parts in rows.items():
        k = torch.arange(1, sum(map(len, parts)) + 1) * -7046029254386353131
        w = ((k >> 32) if acc == torch.int32 else k) | 1
        bits.append(int((torch.cat(parts) * w.to(acc)).sum(dtype=acc)))
    return sums, tuple(bits)


@pytest.mark.parametrize("seed", range(6))
def test_the_planned_fingerprint_is_its_definition(seed: int) -> None:
    """The views made once per layout (rows of large tensors, their bit patterns) give the sums
    and bits of the definition (``_reference_fingerprint``), exactly, for tensors of every
    layout the plan tells apart: 0-d, vectors, matrices with rows or columns past 32768 entries,
    conv weights, transposed (non-contiguous), empty, and the 16- to 64-bit floats; and again
    after writes through .data, which the views follow."""
    torch.manual_seed(seed)
    vectors, matrices = [(), (5,), (9000,)], [(300, 40), (300, 200), (40000, 1), (2, 40000)]
    shapes = [*vectors, *matrices, (8, 3, 5, 5), (0, 3)]
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    named = []
    for i, shape in enumerate(shapes * 2):
        t = torch.randn(shape, dtype=dtypes[(i + seed) % 4])
        named.append((f"t{i}", t.t() if t.dim() == 2 and i % 3 == seed % 3 else t))
    tensors = _fingerprint.ModelTensors(named)
    for _ in range(2):
        fp = tensors.check()
        assert (fp.sums, fp.bits) == _reference_fingerprint(named)
        for _, t in named:
            if t.numel():
                t.data.mul_(-1.5).add_(0.25)  # through .data: no version bump


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_wide_fingerprint_sees_sign_flips_of_an_even_number_of_entries(dtype) -> None:
    """Flipping the sign of 2k entries adds 2k x 2^(bits - 1) to the bit-pattern sum, a multiple
    of its modulus: the float sums must see it (reference: the values themselves changed)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).to(dtype)
    tensors = _fingerprint.ModelTensors(list(model_state(model)))
    before = tensors.check()
    w = model[0].weight.data  # 24 entries, through .data: no version bump
    old = w.clone()
    w.mul_(-1)
    assert (w != old).any() and tensors.fingerprint() != before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_bit_sums_see_a_change_of_every_entry(dtype: torch.dtype) -> None:
    """Each entry of each tensor, one at a time, moved by one ulp or its sign flipped through
    .data (reference: its bit pattern differs; a flip changes the highest bit, which an even
    weight would lose to the modulus) changes the bit-pattern sums alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(12, 700))
    model = model.to(dtype)  # (the 700 x 12 weight is summed alone, the others joined)
    tensors = _fingerprint.ModelTensors(list(model_state(model)))
    before = tensors.check()
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.finfo(dtype).bits // 8]
    for name, t in model_state(model):
        flat = t.data.view(-1)
        for i in range(0, len(flat), 1 if len(flat) < 1000 else 37):
            old, pattern = flat[i].clone(), int(flat.view(ints)[i])
            for new in (old.nextafter(old + 1), -old):
                flat[i] = new
                assert int(flat.view(ints)[i]) != pattern
                assert tensors.fingerprint().bits != before.bits, (name, i)
                flat[i] = old
        assert tensors.fingerprint() == before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_wide_fingerprint_sees_units_permuted_through_data(dtype: torch.dtype) -> None:
    """Permuting hidden units (rows of a weight and entries of its bias, as weight matching does)
    or a conv's output channels keeps the entries (reference: sorted, they are equal), so any
    symmetric sum of them; the bit-pattern sums see it."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 600),
        nn.ReLU(),
        nn.Linear(600, 2),
    ).to(dtype)  # (the 600 x 16 weight is summed alone, the others joined: both ways are seen)
    tensors = _fingerprint.ModelTensors(list(model_state(model)))
    before = tensors.check()
    perms = {
        "conv": (model[0], torch.tensor([1, 0, 3, 2])),
        "linear": (model[3], torch.arange(600).roll(1)),
    }
    for name, (layer, perm) in perms.items():
        old_w, old_b = layer.weight.data.clone(), layer.bias.data.clone()
        layer.weight.data.copy_(old_w[perm])
        assert not torch.equal(layer.weight.data, old_w), name
        same = layer.weight.data.flatten().sort().values == old_w.flatten().sort().values
        assert same.all()  # the same entries: any sum of them, in any order, is unchanged
        assert tensors.fingerprint().bits != before.bits, name
        layer.weight.data.copy_(old_w)
        layer.bias.data.copy_(old_b[perm])
        assert tensors.fingerprint().bits != before.bits, name + " bias"
        layer.bias.data.copy_(old_b)
    assert tensors.fingerprint() == before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_sums_are_taken_in_the_tensors_own_dtype(dtype: torch.dtype) -> None:
    model = zoo.build("small_cnn", dtype=dtype)
    fp = check_model(model)
    named = list(model_state(model))
    assert fp.sums == tuple(float(t.detach().sum()) for _, t in named)
    assert [name for name, *_ in fp.ids] == [name for name, _ in named]


def test_the_walk_matches_named_parameters_buffers_and_attributes() -> None:
    model = zoo.build("small_cnn")
    model.again = model[0]  # a module twice: its parameters once
    model[4].weight = model[0].weight  # a parameter twice: once
    model.consts = [torch.ones(2), (torch.zeros(3), 4), {"k": torch.full((1,), 2.0)}]
    model.stride = (2, 2)
    registered = (*model.named_parameters(), *model.named_buffers())
    reference = [n for n, t in registered if t.is_floating_point()]
    attributes = ["consts[0]", "consts[1][0]", "consts[2]['k']"]
    assert [n for n, _ in model_state(model)] == reference + attributes


# 2. Refusals stay exact -------------------------------------------------------------------------


class Holder(nn.Module):
    def __init__(self, t: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("big", t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize(
    "t",
    [
        torch.ones(300, 300, dtype=torch.float16),  # sums to 90000 > 65504
        torch.full((4,), 3e38),  # float32
        torch.full((4,), 1e308, dtype=torch.float64),
    ],
    ids=["float16", "float32", "float64"],
)
def test_a_finite_tensor_whose_sum_overflows_is_not_refused(t: torch.Tensor) -> None:
    model = Holder(t)
    assert not torch.isfinite(t.sum())
    fp = check_model(model)
    check_model_finite(model)
    assert all(map(math.isfinite, fp.sums))
    model.big.data[1] = 0  # a change that keeps the overflow is still seen
    assert check_model(model) != fp


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_entries_are_named_with_their_index(dtype: torch.dtype, value: float) -> None:
    model = zoo.build("small_cnn", dtype=dtype)
    model[1].running_var[3] = value
    match = r"'1\.running_var' holds -?(nan|inf) at index \(3,\)"
    with pytest.raises(ValueError, match=match):
        check_model(model)
    with pytest.raises(ValueError, match=match):
        check_model_finite(model)
    weights_fingerprint(model)  # no check: no refusal


def test_tensor_attributes_made_in_inference_mode_have_no_version_but_a_fingerprint() -> None:
    model = zoo.build("mlp")
    with torch.inference_mode():
        model.scale = torch.ones(3, dtype=torch.float64)
    fp = check_model(model)
    assert fp.ids[-1][0] == "scale" and fp.ids[-1][2] == -1
    with torch.inference_mode():
        model.scale.mul_(2)
    assert check_model(model) != fp


def test_sums_on_several_devices_come_back_in_order() -> None:
    parts = [torch.tensor(1.5), torch.tensor(2.0, dtype=torch.float64), torch.tensor(-3.0)]
    assert _sums._stack_per_device(parts) == [1.5, 2.0, -3.0]


# 3. The structure's fast paths agree with its general image -------------------------------------

MODULES = {
    "linear": lambda: nn.Linear(3, 4),
    "conv": lambda: nn.Conv2d(3, 4, 3, padding=(1, 2)),
    "batchnorm": lambda: nn.BatchNorm2d(4),
    "maxpool": lambda: nn.MaxPool2d(2, ceil_mode=True),
    "lazy": lambda: nn.LazyLinear(3),
    "attention": lambda: nn.MultiheadAttention(4, 2),
    "transformer": lambda: nn.TransformerEncoderLayer(8, 2),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_fast_attribute_images_equal_the_general_ones(name: str) -> None:
    for m in MODULES[name]().modules():
        objects: dict = {}
        items = [kv for kv in vars(m).items() if kv[0] not in _structure._OWN]
        general = tuple((k, _structure._value(v, objects)) for k, v in items)
        assert _structure._attrs(m, objects)[0] == general
        for d in (m._parameters, m._buffers):
            ref = tuple(  # by name: the order of registration is not the graph's
                sorted(
                    (k, t if t is None else _structure._tensor(t, objects, 0)) for k, t in d.items()
                )
            )
            assert _structure._tensors(d, objects) == ref


class EarlyAttribute(nn.Module):
    def __init__(self) -> None:
        self.slope = 0.1  # set before nn.Module.__init__: first in vars()
        super().__init__()
        self.fc = nn.Linear(2, 2)


def test_changes_outside_the_fast_paths_are_seen() -> None:
    model = EarlyAttribute()
    before = structure(model)
    assert structure(model) == before
    model.slope = 0.2
    assert "attribute(s) slope" in describe_change(before, structure(model))
    model = nn.Conv2d(3, 4, 3)
    before = structure(model)
    model.stride = [1, 1]  # same values, a list
    assert structure(model) != before
    model.stride = (1, 1)
    assert structure(model) == before


def test_hooks_added_and_removed_and_flags_set() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    before = structure(model)
    handle = model[1].register_forward_hook(lambda m, i, o: o)
    assert "_forward_hooks" in describe_change(before, structure(model))
    handle.remove()
    assert structure(model) == before
    model[0].register_full_backward_hook(lambda m, gi, go: None).remove()
    assert "_is_full_backward_hook" in describe_change(before, structure(model))


def test_an_object_that_died_never_matches_even_if_its_id_is_reused() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    now = structure(model)

    class Gone:
        pass

    gone = Gone()
    dead = weakref.ref(gone)
    del gone
    then = Structure(now.tree, {**now.objects, id(model[1]): dead})  # as if model[1] was freed
    assert then != now and not then.alive()
    assert describe_change(then, now) == "module '1' was replaced (another one)"


def test_a_maps_fingerprint_does_not_depend_on_the_thread_count() -> None:
    """A map fingerprinted with 2 threads and used again with 1 is not refused: its float sums
    run in fixed chunks (a plain float32 sum of a million entries differs in its last bits
    between 1 and 2 threads). Reference: the same map's B, computed before the switch."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1000, 1200), nn.ReLU(), nn.Linear(1200, 3)).eval()
    x, threads = torch.randn(2, 1000), torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        amap = sl.affine_map(net, x)
        b = amap.B
        torch.set_num_threads(1)
        torch.testing.assert_close(amap(torch.zeros_like(x)), b, rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)
