"""Everything that is not a MASO network is refused with a clear error naming what and where."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import splinelens as sl
from tests import zoo


class Wrap(nn.Module):
    """Linear -> fn -> Linear, with fn given as a lambda."""

    def __init__(self, fn, width: int = 6) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fn = nn.Linear(4, width), nn.Linear(width, 3), fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fn(self.fc1(x)))


class Inner(nn.Module):
    def __init__(self, mod: nn.Module) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 6), mod)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


class _LastStep(nn.Module):
    """A recurrent layer run on each input as a sequence of one step: its output."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.rnn(z[:, None])[0][:, 0]


class _Unpooled(nn.Module):
    """Max-pooling with indices, then max_unpool back to the input's size."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h, idx = F.max_pool1d(z[:, None], 2, return_indices=True)
        return F.max_unpool1d(h, idx, 2)[:, 0]


_TO = torch.tensor([[0, 0, 1, 2, 2, 5]])  # scatter_add's places: two pairs added into one


def _written(z: torch.Tensor, how: str) -> torch.Tensor:
    """In-place writes into a copy of z (functionalised by export: copy, slice/select_scatter);
    ``batch``: one sample's values written over another's."""
    z = z.clone()
    if how == "copy_":
        z[:, :2].copy_(torch.relu(z[:, 2:4]))
    elif how == "setitem":
        z[:, 0] = torch.relu(z[:, 1])
    else:
        z[0] = z[1]
    return z


REFUSED = {
    "sigmoid": (Inner(nn.Sigmoid()), r"aten\.sigmoid at module 'block\.1' \(Sigmoid\)"),
    "gelu": (Inner(nn.GELU()), r"aten\.gelu at module 'block\.1'.*not piecewise affine"),
    "tanh": (Wrap(torch.tanh), r"aten\.tanh at the model's forward"),
    "layernorm": (Inner(nn.LayerNorm(6)), r"layer_norm at module 'block\.1'.*statistic"),
    "groupnorm": (Wrap(lambda z: F.group_norm(z[:, :, None], 2)[:, :, 0]), r"group_norm"),
    "product": (Wrap(lambda z: z * z), r"aten\.mul .*multiplies two activation"),
    "gated": (Wrap(lambda z: z * F.relu(z)), r"multiplies two activation"),
    "divide": (Wrap(lambda z: 1.0 / (z.abs() + 1)), r"aten\.(div|reciprocal)"),
    "where": (Wrap(lambda z: torch.where(z > 0, z, 2 * z)), r"aten\.gt .*step function.*relu"),
    "masked_fill": (Wrap(lambda z: z.masked_fill(z < 0, 0.0)), r"aten\.lt .*step function"),
    "round": (Wrap(torch.round), r"aten\.round .*step function"),
    "inner_softmax": (Wrap(lambda z: torch.softmax(z, -1)), r"output nonlinearity g"),
    "batch_mean": (Wrap(lambda z: z - z.mean(0)), r"mixes the samples"),
    "global_max": (Wrap(lambda z: z * 0 + z.max()), r"(every dimension|mixes the samples)"),
    "exp": (Wrap(torch.exp), r"aten\.exp"),
    "unknown_op": (Wrap(lambda z: z.trace() * z), r"aten\.trace .*not in splinelens's table"),
    "sort": (Wrap(lambda z: z.sort(1).values), r"aten\.sort .*orders the activations.*amax"),
    "topk": (
        Wrap(lambda z: z.topk(2, 1).values.repeat(1, 3)),
        r"aten\.topk .*orders the activations",
    ),
    "nan_to_num": (Wrap(torch.nan_to_num), r"aten\.nan_to_num .*hide an overflow.*Remove it"),
    "softshrink": (
        Inner(nn.Softshrink(0.3)),
        r"torch's softshrink \(written out as aten\.gt\) at module 'block\.1'.*splinify.*exactly",
    ),
    "hardshrink": (Wrap(F.hardshrink), r"torch's hardshrink \(written out as aten\.le\) .*a step"),
    "square": (Wrap(torch.square), r"aten\.square .*smooth function.*F\.gelu, \.\.\.\): sl"),
    "argsort": (Wrap(lambda z: z.gather(1, z.argsort(1))), r"aten\.argsort .*indices.*amax"),
    "argmax": (Wrap(lambda z: z + z.argmax(1, keepdim=True)), r"aten\.argmax .*indices"),
    "masked_scatter": (
        Wrap(lambda z: z.masked_scatter(torch.tensor([True, False] * 3), z)),
        r"aten\.masked_scatter .*mask or by flat indices.*index_add",
    ),
    "put": (
        Wrap(lambda z: z.put(torch.tensor([0, 7]), torch.tensor([1.0, 2.0]))),
        r"aten\.put .*flat indices",
    ),
    "index_reduce": (
        Wrap(lambda z: z.index_reduce(1, torch.tensor([0, 1]), z[:, 2:4], "prod")),
        r"aten\.index_reduce .*reduction.*index_add",
    ),
    "scatter_reduce": (
        Wrap(lambda z: z.scatter_reduce(1, _TO.expand(z.shape[0], -1), z, "amax")),
        r"aten\.scatter_reduce .*reduction.*amax",
    ),
    "sqrt": (Wrap(lambda z: z.abs().sqrt()), r"aten\.sqrt"),
    "normalize": (Wrap(lambda z: F.normalize(z, dim=1)), r"linalg_vector_norm .*abs\(\)\.sum"),
    "cdist": (Wrap(lambda z: torch.cdist(z, torch.ones(6, 6))), r"aten\.cdist .*norm, distance"),
    "cosine": (
        Wrap(lambda z: F.cosine_similarity(z, torch.ones(1, 6))[:, None].expand(-1, 6)),
        r"cosine_similarity .*norm, distance or cosine",
    ),
    "logsumexp": (Wrap(lambda z: z - z.logsumexp(1, keepdim=True)), r"logsumexp .*smooth function"),
    "glu": (Wrap(lambda z: F.glu(z, 1).repeat(1, 2)), r"aten\.glu .*smooth function"),
    "rms_norm": (Wrap(lambda z: F.rms_norm(z, (6,))), r"rms_norm .*statistic"),
    "lstm": (
        Inner(_LastStep(nn.LSTM(6, 6, batch_first=True))),
        r"aten\.lstm .*not piecewise affine.*nn\.RNN\(nonlinearity='relu'\)",
    ),
    "scatter_add_of_part": (
        Wrap(lambda z: torch.zeros_like(z).scatter_add(1, _TO[:, :3].expand(z.shape[0], -1), z)),
        r"scatter_add .*reads only part of src.*Slice src",
    ),
    "max_unpool": (
        Inner(_Unpooled()),
        r"max_pool1d_with_indices .*argmax indices as data.*F\.interpolate",
    ),
    "addcmul_of_activations": (
        Wrap(lambda z: torch.addcmul(z, z, torch.relu(z))),
        r"aten\.mul \(from aten\.addcmul\) .*multiplies two activation",
    ),
    "addcdiv_by_activation": (
        Wrap(lambda z: torch.addcdiv(z, z, torch.relu(z) + 1)),
        r"aten\.div \(from aten\.addcdiv\) .*divides by an activation",
    ),
    "tril_over_the_batch": (  # a mask by position in the batch: another function per sample
        Wrap(lambda z: z.t().tril().t()),
        r"(positions in the batch|made from the batch size)",
    ),
    "lerp_by_activation": (
        Wrap(lambda z: torch.lerp(z, 2 * z, torch.relu(z))),
        r"aten\.ge \(from aten\.lerp\) .*step function",
    ),
    "int_cast": (Wrap(lambda z: torch.relu(z + z.to(torch.int64))), r"integers or booleans"),
    "floor_div": (
        Wrap(lambda z: torch.div(z, 0.5, rounding_mode="floor")),
        r"(rounds the quotient|integers)",
    ),
    "index_by_activation": (Wrap(lambda z: z.gather(1, z.long().clamp(0, 5))), r"integers"),
    "flip_batch": (Wrap(lambda z: torch.relu(z).flip(0)), r"along the batch dimension"),
    "roll_batch": (Wrap(lambda z: z + z.roll(1, 0)), r"along the batch dimension"),
    "prelu_on_merged_batch": (  # its weight is read along dim 1: not entry by entry
        Wrap(lambda z: F.prelu(z.reshape(-1, 3), torch.full((3,), 0.1)).reshape(-1, 6)),
        r"prelu .*without a single batch dimension",
    ),
    "max_pool_on_merged_batch": (
        Wrap(
            lambda z: F.max_pool1d(z.reshape(-1, 1, 3), 2, 1).reshape(-1, 4)[:, [0, 1, 2, 3, 0, 1]]
        ),
        r"max_pool.*without a single batch dimension",
    ),
    **{
        f"{name}_batch": (
            Wrap(fn),
            r"(along the batch dimension|mixes the samples|samples are mixed)",
        )
        for name, fn in {
            "index": lambda z: z[torch.arange(z.shape[0] - 1, -1, -1)],
            "centre_mm": lambda z: z - torch.ones(z.shape[0], z.shape[0]) / z.shape[0] @ z,
            "einsum": lambda z: torch.einsum("nd,nm->md", z, torch.ones(z.shape[0], z.shape[0])),
            "linear": lambda z: F.linear(z.t(), torch.ones(z.shape[0], z.shape[0]) / 2).t(),
            "avg_pool": lambda z: F.avg_pool1d(z.t()[None], 3, 1, 1)[0].t(),
            "conv": lambda z: F.conv1d(z.t()[None], torch.ones(6, 6, 3), padding=1)[0].t(),
            "mean_keepdim": lambda z: z - z.mean(0, keepdim=True),
            "merged_flip": lambda z: z.reshape(-1).flip(0).reshape(-1, 6),
            "cat": lambda z: torch.cat([z, z], 0)[: z.shape[0]],
            "reshape": lambda z: z.reshape(6, -1).t(),
            "transpose_reshape": lambda z: torch.relu(z).t().reshape(-1, 6),
            "two_layouts": lambda z: (z.reshape(-1) + z.t().reshape(-1)).reshape(-1, 6),
            "split_over_dims": lambda z: z.reshape(2, -1).flip(0).reshape(-1, 6),
            "repeat_interleave": lambda z: z.repeat_interleave(2, 0)[: z.shape[0]],
            "repeat_interleave_flat": lambda z: z.repeat_interleave(2).reshape(-1, 12)[:, :6],
            "cumsum": lambda z: z.cumsum(0),
            "index_add": lambda z: torch.zeros_like(z).index_add(
                0, torch.zeros(z.shape[0], dtype=torch.long), z
            ),
            "scatter_add": lambda z: torch.zeros_like(z).scatter_add(
                0, torch.zeros_like(z, dtype=torch.long), z
            ),
            "diff": lambda z: torch.diff(z, dim=0, append=z[:1]),
            "setitem": functools.partial(_written, how="batch"),
            "einsum_ellipsis": lambda z: torch.einsum(
                "...d,nd->nd", z, torch.ones(z.shape[0], 6, dtype=z.dtype)
            ),
        }.items()
    },
}


def _resampled(z: torch.Tensor, mode: str, nd: int, antialias: bool) -> torch.Tensor:
    """ReLU, then (N, 6) as an nd-dimensional grid resampled up and back down (N, 6)."""
    shape = {1: (6,), 2: (2, 3), 3: (1, 2, 3)}[nd]
    grid = torch.relu(z).reshape(-1, 1, *shape)
    up = [s + 2 for s in shape]
    kw = {"antialias": True} if antialias else {}
    grid = F.interpolate(grid, size=up, mode=mode, **kw)
    return F.interpolate(grid, size=shape, mode=mode, **kw).flatten(1)


# The same ops, keeping the samples apart: exact (reference: jacrev of each input alone).
KEPT = {
    "maximum_constant_first": lambda z: torch.maximum(torch.full((6,), 0.3, dtype=z.dtype), z),
    "clamp_a_constant": lambda z: torch.clamp(torch.full((6,), 0.3, dtype=z.dtype), min=z),
    "clamp_crossing_bounds": lambda z: torch.clamp(
        z, torch.linspace(-1, 1, 6, dtype=z.dtype), torch.linspace(1, -1, 6, dtype=z.dtype)
    ),
    "clip": lambda z: torch.clip(z, -0.5, 0.5),
    "true_divide": lambda z: torch.true_divide(z, 3.0),
    "einsum": lambda z: torch.einsum("nd,dk->nk", z, torch.ones(6, 6, dtype=z.dtype)),
    "index": lambda z: z[:, torch.tensor([2, 0, 1, 3, 5, 4])],
    "cat": lambda z: torch.cat([z, z], 1)[:, 3:9],
    "avg_pool": lambda z: F.avg_pool1d(z[:, None], 3, 1, 1)[:, 0],
    "mean": lambda z: z - z.mean(1, keepdim=True),
    "mm_transposed": lambda z: (torch.eye(6, dtype=z.dtype) * 2 @ z.t()).t(),
    "flip_roll": lambda z: z.flip(1).roll(2, 1),
    "amax": lambda z: z - z.amax(1, keepdim=True),
    "conv": lambda z: F.conv1d(z[:, None], torch.ones(1, 1, 3, dtype=z.dtype), padding=1)[:, 0],
    "flatten_unflatten": lambda z: (z.reshape(-1) * 2).reshape(-1, 2, 3).flatten(1),
    "mm_on_merged": lambda z: (
        (torch.ones(3, 3, dtype=z.dtype) @ z.reshape(-1, 3).t()).t().reshape(-1, 6)
    ),
    "sum_before_merged": lambda z: torch.stack([z, 2 * z]).reshape(2, -1).sum(0).reshape(-1, 6),
    "slice_before_merged": lambda z: (
        torch.stack([z, 2 * z, 3 * z]).reshape(3, -1)[1:].reshape(2, -1, 6).sum(0)
    ),
    "max_over_stack": lambda z: torch.stack([z, -z]).max(dim=0).values,
    # elementwise MASOs on a merged batch, written batch first (since 2026-11-28)
    "relu_on_merged_batch": lambda z: torch.relu(z.reshape(-1)).reshape(-1, 6),
    "leaky_relu_on_merged_rows": lambda z: F.leaky_relu(z.reshape(-1, 3), 0.2).reshape(-1, 6),
    "clamp_on_a_transposed_merge": lambda z: (
        z.reshape(-1, 2).t().clamp(-0.5, 0.3).t().reshape(-1, 6)
    ),
    "fold_linear": lambda z: (
        F.linear(z.reshape(-1, 3), torch.ones(1, 3, dtype=z.dtype)).reshape(-1, 2).repeat(1, 3)
    ),
    # linear ops read since 2026-11-28 (refused before as not in the table), after a ReLU
    "repeat_interleave": lambda z: torch.relu(z).repeat_interleave(2, 1)[:, 3:9],
    "repeat_interleave_tensor": lambda z: torch.relu(z).repeat_interleave(
        torch.tensor([2, 0, 1, 1, 2, 0]), dim=1
    ),
    "cumsum": lambda z: torch.relu(z).cumsum(1),
    # linear ops torch keeps whole, written out by its own decompositions (since 2026-11-28)
    "diff": lambda z: torch.diff(torch.relu(z), dim=1, prepend=z[:, :1]),
    "tensordot": lambda z: torch.tensordot(
        torch.relu(z), torch.linspace(-1, 1, 36, dtype=z.dtype).reshape(6, 6), dims=([1], [0])
    ),
    "addcmul": lambda z: torch.addcmul(z, torch.relu(z), torch.linspace(-1, 1, 6), value=0.5),
    "addcdiv": lambda z: torch.addcdiv(z, torch.relu(z), torch.linspace(1, 2, 6), value=-2.0),
    "lerp": lambda z: torch.lerp(z, torch.relu(z), 0.3),
    "lerp_past_half": lambda z: torch.lerp(z, torch.relu(z), 0.8),
    "lerp_tensor_weight": lambda z: torch.lerp(
        torch.relu(z), z.flip(1), torch.linspace(-0.5, 1.5, 6, dtype=z.dtype)
    ),
    "tril": lambda z: torch.relu(z).reshape(-1, 2, 3).tril().reshape(-1, 6),
    "triu": lambda z: torch.relu(z).reshape(-1, 3, 2).triu(-1).reshape(-1, 6),
    "scatter_add": lambda z: torch.zeros_like(z).scatter_add(
        1, _TO.expand(z.shape[0], -1), z.relu()
    ),
    "scatter_add_into_activation": lambda z: torch.relu(z).scatter_add(
        1, _TO.expand(z.shape[0], -1), z.flip(1)
    ),
    "scatter_add_of_a_constant_part": lambda z: z.relu().scatter_add(
        1, _TO[:, :3].expand(z.shape[0], -1), torch.ones(1, 6, dtype=z.dtype).expand(z.shape[0], -1)
    ),
    "index_add": lambda z: torch.zeros_like(z).index_add(1, _TO[0], z.relu()),
    "index_add_negative_alpha": lambda z: torch.relu(z).index_add(
        1, _TO[0, :3], z[:, :3], alpha=-2
    ),
    "copy_into_a_slice": functools.partial(_written, how="copy_"),
    "setitem": functools.partial(_written, how="setitem"),
    **{
        f"{mode}_{nd}d{'_aa' * aa}": functools.partial(_resampled, mode=mode, nd=nd, antialias=aa)
        for mode, nd, aa in [
            ("nearest-exact", 1, False),
            ("nearest-exact", 2, False),
            ("nearest-exact", 3, False),
            ("bicubic", 2, False),
            ("bilinear", 2, True),
            ("bicubic", 2, True),
            ("trilinear", 3, False),
        ]
    },
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_non_piecewise_affine_operations_are_refused(name: str) -> None:
    model, pattern = REFUSED[name]
    with pytest.raises(sl.UnsupportedOperationError, match=pattern):
        sl.SplineView(model.eval(), torch.randn(3, 4))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # jacrev's vmap, looping
@pytest.mark.parametrize("name", list(KEPT))
def test_ops_that_keep_the_samples_apart_are_exact(name: str) -> None:
    torch.manual_seed(0)
    model, x = Wrap(KEPT[name]).double().eval(), torch.randn(3, 4, dtype=torch.float64)
    jac = torch.stack([torch.func.jacrev(lambda v: model(v[None])[0])(v) for v in x])
    assert torch.allclose(sl.affine_map(model, x).A, jac, atol=1e-12)


@pytest.mark.parametrize(
    "name",
    ["diff", "tensordot", "addcmul", "lerp_tensor_weight", "tril", "scatter_add", "index_add"],
)
def test_written_out_linear_ops_give_exact_offsets_at_any_batch_size(name: str) -> None:
    """The ops written out by torch's decompositions before capture: one view answers for a
    batch of 1 and of 5, A against jacrev and B against f(x) - A x (float64, 1e-12)."""
    torch.manual_seed(0)
    model = Wrap(KEPT[name]).double().eval()
    view = sl.SplineView(model, torch.randn(3, 4, dtype=torch.float64))
    for n in (1, 5):
        x = torch.randn(n, 4, dtype=torch.float64)
        amap = view.affine_map(x)
        jac = torch.stack([torch.func.jacrev(lambda v: model(v[None])[0])(v) for v in x])
        torch.testing.assert_close(amap.A, jac, rtol=0, atol=1e-12)
        with torch.no_grad():
            offsets = model(x) - torch.einsum("ncd,nd->nc", jac, x)
        torch.testing.assert_close(amap.B, offsets, rtol=0, atol=1e-12)


@pytest.mark.parametrize("how", ["copy_", "setitem"])
def test_in_place_writes_hold_for_a_batch_of_one(how: str) -> None:
    """Export writes back over the whole batch dim (a full slice_scatter) only when N is symbolic:
    the static export at N = 1 builds the same graph without it (it was refused as branching)."""
    torch.manual_seed(0)
    model = Wrap(functools.partial(_written, how=how)).double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    jac = torch.func.jacrev(lambda v: model(v[None])[0])(x[0])
    assert torch.allclose(sl.affine_map(model, x[:1]).A[0], jac, atol=1e-12)


def test_error_names_the_source_line() -> None:
    with pytest.raises(sl.UnsupportedOperationError, match=r"test_refusals\.py"):
        sl.SplineView(Wrap(torch.tanh).eval(), torch.randn(3, 4))


@pytest.mark.parametrize("mod", [nn.BatchNorm1d(6), nn.Dropout(0.3)])
def test_training_mode_is_refused_not_switched(mod: nn.Module) -> None:
    model = Inner(mod).train()
    with pytest.raises(sl.UnsupportedOperationError, match=r"training mode.*model\.eval\(\)"):
        sl.affine_map(model, torch.randn(3, 4))
    assert model.training and mod.training  # nothing was switched


def test_training_mode_after_capture_is_refused() -> None:
    model = zoo.build("small_cnn")
    x = zoo.inputs("small_cnn")
    view = sl.SplineView(model, x)
    model.train()
    with pytest.raises(sl.UnsupportedOperationError, match=r"model\.eval\(\)"):
        view.affine_map(x)
    with pytest.raises(sl.UnsupportedOperationError, match=r"model\.eval\(\)"):
        view.partition_codes(x)


class _HelperReadsMode(nn.Module):
    """A forward whose helper method, not forward itself, reads ``self.training``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def scale(self) -> float:
        return 2.0 if self.training else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)) * self.scale())


def _spectral_norm() -> nn.Module:
    """A spectral-normalised layer (parametrization): a power iteration in training mode."""
    model = Inner(nn.ReLU())
    nn.utils.parametrizations.spectral_norm(model.head)
    return model


@pytest.mark.parametrize("make", [_HelperReadsMode, _spectral_norm])
def test_training_mode_read_outside_forward_is_refused_after_capture(make) -> None:
    torch.manual_seed(0)
    model, x = make().double().eval(), torch.randn(3, 4, dtype=torch.float64)
    _ = sl.affine_map(model, x).B  # a capture in eval mode, cached
    view = sl.SplineView(model, x)
    model.train()  # the model now computes another function
    for call in (lambda: sl.affine_map(model, x).B, lambda: view.affine_map(x)):
        with pytest.raises(sl.UnsupportedOperationError, match=r"training mode.*model\.eval"):
            call()


class _Exporting(nn.Module):
    """A forward that computes something else while exported: other values, the same in a
    dict, another shape."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.fc, self.how = nn.Linear(4, 3), how

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict:
        h = torch.relu(self.fc(x))
        if not torch.compiler.is_exporting():
            return {"logits": h} if self.how == "dict" else h
        return {"logits": -h} if self.how == "dict" else -h if self.how == "sign" else h[:, :1]


class _ModeInConfig(nn.Module):
    """Says "training" in a docstring and reads cfg["training"], but never its mode."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.fc = nn.Linear(4, int(cfg["training"]["width"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same in training and in eval mode."""
        return torch.relu(self.fc(x))


def test_a_model_that_only_names_training_is_not_mode_dependent() -> None:
    model = _ModeInConfig({"training": {"width": 3}})  # left in training mode, as made
    assert model.training and sl.verify(model, torch.randn(3, 4)).ok


class _ChangesInput(nn.Module):
    """A forward that changes its input in place (``clamp_``: only where x is out of range)."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.fc, self.op = nn.Linear(4, 3), op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.sub_(1.0) if self.op == "sub_" else x.clamp_(-100.0, 100.0)
        return self.fc(torch.relu(x))


@pytest.mark.parametrize("how", ["sign", "dict", "shape"])
def test_a_forward_that_computes_otherwise_when_exported_is_refused(how: str) -> None:
    with pytest.raises(sl.UnsupportedOperationError, match="another function when exported"):
        sl.affine_map(_Exporting(how).eval(), torch.randn(3, 4))


class _Small(nn.Module):
    """Outputs near 1e-4 (float32): while exported twice as large (``how="exporting"``), or
    larger by 1 % per input in the batch (``how="batch"``), or neither."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.fc, self.out, self.how = nn.Linear(4, 5), nn.Linear(5, 3), how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out(torch.relu(self.fc(x))) * 1e-4
        if self.how == "exporting" and torch.compiler.is_exporting():
            return 2 * y
        return y * (1 + 0.01 * x.shape[0]) if self.how == "batch" else y


@pytest.mark.parametrize(
    "how, match", [("exporting", "another function when exported"), ("batch", "the batch size")]
)
def test_small_outputs_are_held_to_their_own_size_when_captured(how: str, match: str) -> None:
    """Outputs below 1 were compared to a tolerance of rtol * 1 (1.2e-3 in float32): a capture
    computing twice the model's outputs of 1e-4, or 1 % more per input in the batch, passed.
    Rounding is now measured against the terms' size, max |f| and |A| |x| + |B|."""
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    with pytest.raises(sl.UnsupportedOperationError, match=match):
        sl.affine_map(_Small(how).eval(), x)
    model = _Small(how).eval()
    with torch.inference_mode(), pytest.raises(sl.UnsupportedOperationError, match=match):
        sl.affine_map(model, x)  # (|A| |x| + |B| is formed there too)
    assert sl.verify(_Small("neither").eval(), x).ok  # the same size, computed alike: captured


class _LowerG(nn.Module):
    """A float64 network whose softmax returns float32 (``dtype=``, or a cast after it)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.fc, self.how = nn.Linear(5, 3), how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.how == "cast":
            return F.softmax(h, -1).float()
        g = F.log_softmax if self.how == "log_softmax" else F.softmax
        return g(h, -1, dtype=torch.float32)


@pytest.mark.parametrize("how", ["cast", "softmax", "log_softmax"])
def test_a_softmax_that_returns_less_precision_is_compared_in_it(how: str) -> None:
    """It was refused as "computes another function when exported": the float64 g(A x + B) was
    held to float64's tolerance against the model's float32 output. Reference: the logits' own
    A, B (float64 jacrev of the layer) and the model's output, to float32's rounding."""
    torch.manual_seed(0)
    model, x = _LowerG(how).double().eval(), torch.randn(3, 5, dtype=torch.float64)
    amap = sl.affine_map(model, x)
    assert torch.equal(amap.A, model.fc.weight.expand(3, 3, 5))
    assert torch.allclose(amap.B, model.fc.bias.expand(3, 3), rtol=0, atol=1e-15)
    check = sl.verify(model, x)
    assert check.ok and check.tolerance <= 1e4 * torch.finfo(torch.float32).eps * 3


@pytest.mark.parametrize("op", ["sub_", "clamp_"])
def test_a_forward_that_changes_its_input_is_refused_and_the_input_kept(op: str) -> None:
    x = torch.randn(3, 4)
    before = x.clone()
    with pytest.raises(sl.UnsupportedOperationError, match="changes its input x in place"):
        sl.SplineView(_ChangesInput(op).eval(), x)
    assert torch.equal(x, before)


def test_a_capture_inside_parametrize_cached_is_refused() -> None:
    """Export would keep the cached weight as a constant: a later change of the parametrized
    original would not reach the capture. Made outside, a capture is exact inside the block."""
    torch.manual_seed(0)
    model, x = Inner(nn.ReLU()).double().eval(), torch.randn(3, 4, dtype=torch.float64)
    nn.utils.parametrize.register_parametrization(model.head, "weight", _Scaled())
    refused = pytest.raises(sl.UnsupportedOperationError, match=r"parametrize\.cached\(\)")
    with nn.utils.parametrize.cached(), refused:
        sl.affine_map(model, x)
    view = sl.SplineView(model, x)
    sl.affine_map(model, x)  # the plain functions' capture, made outside too
    with torch.no_grad():
        model.head.parametrizations.weight.original.mul_(-1.0)
    with nn.utils.parametrize.cached():
        for amap in (view.affine_map(x), sl.affine_map(model, x)):
            f = torch.einsum("ncd,nd->nc", amap.A, x) + amap.B
            torch.testing.assert_close(f, model(x), rtol=0, atol=1e-12)


class _Scaled(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2.0 * w


def test_batchnorm_without_running_stats_is_refused() -> None:
    model = Inner(nn.BatchNorm1d(6, track_running_stats=False)).eval()
    with pytest.raises(
        sl.UnsupportedOperationError, match=r"batch statistics.*track_running_stats=True"
    ):
        sl.SplineView(model, torch.randn(3, 4))


def _instance_norm_net(track: bool) -> nn.Module:
    torch.manual_seed(0)
    norm = nn.InstanceNorm2d(3, affine=True, track_running_stats=track)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), norm, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    net = nn.Sequential(*net, nn.Linear(12, 4)).double()
    for _ in range(3):  # running statistics of a few batches, and a learned affine part
        net(torch.randn(4, 2, 6, 6, dtype=torch.float64))
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_()
    return net.eval()


def test_instance_norm_on_running_statistics_is_exact() -> None:
    """InstanceNorm2d(track_running_stats=True) in eval mode is affine (running statistics,
    as batchnorm); it was refused as dividing by a statistic of the activations. A against
    jacrev (atol 1e-12), verify and check_masos; the batch of 1 too. Without running
    statistics, or in training mode, it is still refused."""
    net = _instance_norm_net(track=True)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    jac = torch.stack([torch.func.jacrev(lambda v: net(v[None])[0])(v) for v in x])
    torch.testing.assert_close(sl.affine_map(net, x).A, jac, rtol=0, atol=1e-12)
    torch.testing.assert_close(sl.affine_map(net, x[:1]).A, jac[:1], rtol=0, atol=1e-12)
    assert sl.verify(net, x).ok and sl.check_masos(net, x).ok
    with pytest.raises(sl.UnsupportedOperationError, match=r"instance_norm .*own mean.*eval"):
        sl.affine_map(_instance_norm_net(track=False), x)
    with pytest.raises(ValueError, match=r"training mode"):
        sl.affine_map(net.train(), x)


def test_functional_dropout_in_training_is_refused() -> None:
    model = Wrap(lambda z: F.dropout(z, 0.5, training=True)).eval()
    with pytest.raises(sl.UnsupportedOperationError, match=r"eval"):
        sl.SplineView(model, torch.randn(3, 4))


def test_native_dropout_without_a_train_flag_is_training() -> None:
    """ATen's native_dropout reads ``train=None`` as training; it was let through to a misleading
    batch-size refusal (found by a review helper)."""
    model = Wrap(lambda z: torch.ops.aten.native_dropout(z, 0.5, None)[0]).eval()
    with pytest.raises(sl.UnsupportedOperationError, match=r"native_dropout .*training mode"):
        sl.SplineView(model, torch.randn(3, 4))


def test_data_dependent_control_flow_is_refused() -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    with pytest.raises(sl.UnsupportedOperationError, match="could not capture"):
        sl.SplineView(Branchy().eval(), torch.randn(3, 4))


def test_two_outputs_are_refused() -> None:
    class Two(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return F.relu(x), x

    with pytest.raises(ValueError, match="returns 2 values"):
        sl.SplineView(Two().eval(), torch.randn(3, 4))


def test_wrong_input_shape_dtype_and_type() -> None:
    model = zoo.build("mlp")
    view = sl.SplineView(model, zoo.inputs("mlp"))
    with pytest.raises(ValueError, match=r"per-sample shape \(5,\).*\(6,\)"):
        view.affine_map(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"float32.*float64"):
        view.affine_map(torch.randn(2, 6))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        view.partition_codes([[0.0] * 6])  # type: ignore[arg-type]


def test_an_input_without_its_batch_dimension_is_refused_saying_so() -> None:
    """One input passed without the batch dimension: the refusal says that the first dimension
    is the batch and how to pass one input (it said only that shapes could not be multiplied)."""
    model = nn.Sequential(nn.Linear(6, 3), nn.ReLU()).eval()
    with pytest.raises(ValueError, match=r"first dimension is the batch.*x\.unsqueeze\(0\)"):
        sl.affine_map(model, torch.randn(6))


def test_unknown_layer_names_and_indices() -> None:
    model, x = zoo.build("mlp"), zoo.inputs("mlp")
    view = sl.SplineView(model, x)
    with pytest.raises(KeyError, match=r"no layer named 'nope'.*'1', '3'"):
        view.affine_map(x, start="nope")
    with pytest.raises(IndexError, match="2 layers"):
        view.affine_map(x, end=7)
    codes = view.partition_codes(x)
    with pytest.raises(KeyError, match="no layer named"):
        sl.partition_distance(codes, codes, layer="nope")


RANDOM = {
    "alpha_dropout": lambda z: F.alpha_dropout(z, 0.5, training=True),
    "dropout1d": lambda z: F.dropout1d(z.unsqueeze(-1), 0.5, training=True).squeeze(-1),
    "feature_alpha_dropout": lambda z: F.feature_alpha_dropout(
        z.unsqueeze(-1), 0.5, training=True
    ).squeeze(-1),
    "noise": lambda z: z + torch.randn_like(z),
    "rand": lambda z: z * torch.rand(z.shape[1]),
    "normal_": lambda z: z + torch.empty_like(z).normal_(),
}


@pytest.mark.parametrize("how", sorted(RANDOM))
def test_random_draws_are_refused_by_name(how: str) -> None:
    """Dropouts left in training mode, noise: refused where they draw, not as a batch effect."""
    model = Wrap(RANDOM[how]).eval()
    with pytest.raises(sl.UnsupportedOperationError, match="draws random numbers"):
        sl.SplineView(model, torch.randn(3, 4))


class _Last(nn.Module):
    """Linear -> ReLU -> fn, fn's output the network's (no later layer pins its size)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fc, self.fn = nn.Linear(4, 6), fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(torch.relu(self.fc(x)))


MASK = torch.tensor([True, False, True, True, False, True])
SIZED_BY_VALUES = {
    "bool_mask": lambda h: h[:, MASK],
    "nonzero": lambda h: h[:, torch.where(MASK)[0]],
    "tensor_repeats": lambda h: h.repeat_interleave(torch.tensor([1, 2, 0, 1, 1, 1]), dim=1),
}


@pytest.mark.parametrize("how", sorted(SIZED_BY_VALUES))
def test_sizes_set_by_tensor_values_are_refused_by_name(how: str) -> None:
    """A selection whose size export cannot know (a boolean mask, nonzero, repeats given as a
    tensor) raised a raw GuardOnDataDependentSymNode (found by a fuzzing review)."""
    with pytest.raises(sl.UnsupportedOperationError, match="size depends on the values"):
        sl.affine_map(_Last(SIZED_BY_VALUES[how]).eval(), torch.randn(3, 4))


class _Complex(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(torch.fft.fft(x.to(torch.complex128))).flatten(1)


class _ScatterSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("i", torch.tensor([[1, 1, 4]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.scatter_reduce(1, self.i.expand(x.shape[0], -1), x[:, 1:4], reduce="sum")


@pytest.mark.parametrize(
    "model, match",
    [
        (_Complex(), "into complex numbers"),  # (it said "into integers or booleans")
        (_ScatterSum(), r"reduction at given places \('sum'.*scatter_add"),  # (it named no 'sum')
    ],
)
def test_refusals_name_what_the_op_does(model: nn.Module, match: str) -> None:
    with pytest.raises(sl.UnsupportedOperationError, match=match):
        sl.affine_map(model.eval(), torch.randn(2, 6, dtype=torch.float64))
