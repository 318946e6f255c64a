"""The capture package: one op registry, a frozen program, two generated executors.

Executors are checked against the model's own forward pass and against torch.func.jacrev
(float64, stated tolerances); the registry against what the compiler and convexity read.
"""

from __future__ import annotations

import ast
import dataclasses
import warnings

import pytest
import torch
import torch.nn as nn

import splinelens as sl
from splinelens._capture import capture, entries, final_ir, info
from tests import zoo

NAMES = sorted(zoo.ZOO)


def test_registry_answers_what_each_op_is() -> None:
    assert info("conv2d").kind == "affine" and info("conv2d").coefficients == "weights"
    assert info("conv2d").bias == 2 and info("addmm").bias == 0 and info("addmm").signed
    assert info("relu").family == "sign" and info("max_pool2d").family == "pool"
    assert info("hardtanh").family == "clip" and info("amax").family == "reduce"
    assert info("softmax").kind == "g" and "final output" in info("softmax").why
    assert info("layer_norm").kind == "refused" and "statistic" in info("layer_norm").why
    assert info("gelu").kind == "refused" and info("no_such_op").kind == "refused"
    assert info("flip").mixes({"dims": [1]}, "self", 0, 2) == {1} and info("relu").mixes is None
    assert info("reshape").regroups and not info("permute").regroups
    assert info("detach").rewrite is torch.ops.aten.alias.default
    assert info("view").view and info("detach").view and not info("linear").view


def test_registry_holds_argument_checks_sums_slices_and_decompositions() -> None:
    from splinelens._capture.registry import decompositions

    assert dict(info("max").renames) == {"other": "maximum"} and info("max").check is not None
    assert info("sub").terms == ((0, 1.0, ""), (1, -1.0, "alpha")) and not info("mul").signed
    assert info("slice").slice_start == 2 and info("slice_scatter").slice_start == 3
    assert info("_to_copy").cast and not info("clone").cast
    assert info("bernoulli").random and info("bernoulli").kind == "refused"
    assert torch.ops.aten.rnn_relu_cell.default in decompositions()


def test_no_module_but_the_registry_decides_by_op_name() -> None:
    """Op facts live in the registry: no other module compares an op's name with a literal
    (``layers`` builds each MASO piece from its op's arguments, by family; ``smooth`` names
    activation functions, not ops)."""
    import pathlib

    names = {e.name for e in entries()}
    root = pathlib.Path(sl.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name in ("registry.py", "layers.py") or path.parent.name == "smooth":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and _names_an_op(node):
                consts = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant)}
                found += [f"{path.name}:{node.lineno} {c}" for c in consts & names]
    assert not found


def _names_an_op(node: ast.Compare) -> bool:
    sides = [node.left, *node.comparators]
    return any(
        (isinstance(s, ast.Name) and s.id in ("name", "op", "target"))
        or (isinstance(s, ast.Attribute) and s.attr in ("op", "target"))
        for s in sides
    )


def test_every_maso_entry_has_a_family_and_every_refusal_says_why() -> None:
    for entry in entries():
        name = entry.name
        assert info(name) is entry
        assert (entry.kind == "maso") == bool(entry.family), name
        if entry.kind in ("g", "refused"):
            assert entry.why, name


def _export(name: str) -> torch.export.ExportedProgram:
    model, x = zoo.build(name), zoo.inputs(name, n=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))


def _ops(ep: torch.export.ExportedProgram) -> list[str]:
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]


def test_graphs_kept_as_exported_are_what_the_decomposition_pass_gives() -> None:
    """A graph that skips the decomposition pass (``final_ir``) is the graph that pass gives;
    graphs with batchnorm, flatten, ... go through it."""
    kept = []
    for name in NAMES:
        ep = _export(name)
        if final_ir(ep):
            kept.append(name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert _ops(ep) == _ops(ep.run_decompositions({})), name
    assert "mlp" in kept and "small_cnn" not in kept


@pytest.mark.parametrize("name", NAMES)
def test_record_is_the_forward_pass_and_frozen_at_x_reproduces_it(name: str) -> None:
    model, x = zoo.build(name), zoo.inputs(name, n=5)
    prog = capture(model, x)
    with torch.no_grad():
        values, states = prog.record(x)
        frozen = prog.frozen(x, states)
        ref = zoo.logits(model, x)
    out = prog.per_sample(prog.output_name, values[prog.output_name])
    again = prog.per_sample(prog.output_name, frozen[prog.output_name])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(again, ref, rtol=0, atol=1e-12)
    assert set(states) == {la.step for la in prog.layers}


@pytest.mark.parametrize("name", NAMES)
def test_frozen_from_the_input_is_affine_with_jacrev_slopes(name: str) -> None:
    """frozen(x, states, at={input: z}) = A[x] z + B[x], A from torch.func.jacrev."""
    model, x = zoo.build(name), zoo.inputs(name, n=3)
    prog = capture(model, x)
    z = torch.randn_like(x)
    with torch.no_grad():
        _, states = prog.record(x)
        fz = prog.frozen(x, states, at={prog.input_name: z})[prog.output_name]
        f0 = prog.frozen(x, states, at={prog.input_name: torch.zeros_like(x)})[prog.output_name]
    jac = zoo.jacobian(model, x).reshape(len(x), -1, x[0].numel())  # (N, C, D)
    pred = torch.einsum("ncd,nd->nc", jac, z.reshape(len(x), -1))
    got = (prog.per_sample(prog.output_name, fz - f0)).reshape(len(x), -1)
    torch.testing.assert_close(got, pred, rtol=1e-9, atol=1e-9)


def test_executors_are_straight_line_code_without_unneeded_steps() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(2, 4)
    prog = capture(net.eval(), x)
    first = prog.layers[0]
    with torch.no_grad():
        prog.record(x, stop=first.step)
        values, states = prog.record(x)
        prog.frozen(x, states, at={first.node: values[first.node]})
    record = prog._code[("record", frozenset(), first.step)].source
    frozen = prog._code[("frozen", frozenset({first.node}), None)].source
    assert "for " not in record and "while " not in record and "if " not in record
    assert record.count(".forward(") == 1 and "linear_1" not in record  # stops at layer 1
    assert "c0.forward" not in frozen and frozen.count(".frozen(") == 1  # layer 1 is given


def test_the_program_and_its_steps_are_frozen() -> None:
    prog = capture(nn.Sequential(nn.Linear(2, 2), nn.ReLU()).eval(), torch.randn(2, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        prog.steps = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        prog.steps[0].fn = None  # type: ignore[misc]
    assert all(isinstance(s.op, str) and s.op for s in prog.steps)  # ATen names kept


def test_rows_of_a_are_exact_in_vmapped_and_looped_backward() -> None:
    """MLPs take rows in vmapped passes, CNNs one by one: both equal jacrev."""
    for name in ("mlp", "small_cnn"):
        model, x = zoo.build(name), zoo.inputs(name, n=3)
        amap = sl.affine_map(model, x)
        jac = zoo.jacobian(model, x)
        torch.testing.assert_close(amap.A.reshape(jac.shape), jac, rtol=1e-10, atol=1e-10)
    assert capture(zoo.build("mlp"), zoo.inputs("mlp")).batched_rows
    assert not capture(zoo.build("small_cnn"), zoo.inputs("small_cnn")).batched_rows


class _Branches(nn.Module):
    """Two parallel ReLU layers concatenated: neither layer feeds the other."""

    def __init__(self) -> None:
        super().__init__()
        self.f1, self.f2, self.f3 = nn.Linear(3, 5), nn.Linear(3, 4), nn.Linear(9, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f3(torch.cat([torch.relu(self.f1(x)), torch.relu(self.f2(x))], 1))


def _stacked(m: _Branches) -> nn.Module:
    """The same network as one ReLU layer of 9 units."""
    first = nn.Linear(3, 9)
    with torch.no_grad():
        first.weight.copy_(torch.cat([m.f1.weight, m.f2.weight]))
        first.bias.copy_(torch.cat([m.f1.bias, m.f2.bias]))
    return nn.Sequential(first, nn.ReLU(), m.f3).double().eval()


def test_region_geometry_of_parallel_layers_equals_the_stacked_network() -> None:
    torch.manual_seed(0)
    m = _Branches().double().eval()
    s, x = _stacked(m), torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(sl.region_radius(m, x), sl.region_radius(s, x), rtol=1e-12, atol=0)
    lc_m = sl.local_complexity(m, x, [0.3]).counts.sum(1)  # (N, radii): over both layers
    assert torch.equal(lc_m, sl.local_complexity(s, x, [0.3]).counts.sum(1))
    assert len(sl.region_polytope(m, x[:1]).b) == len(sl.region_polytope(s, x[:1]).b)
    assert sl.check_masos(m, x).ok


class _PoolBranch(nn.Module):
    """A max-pool returning its indices in one branch, a ReLU in the other."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 2 * 2 + 2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _ = torch.nn.functional.max_pool2d(self.c1(x), 2, return_indices=True)
        return self.fc(torch.cat([a.flatten(1), torch.relu(self.c2(x)).flatten(1)], 1))


@pytest.mark.parametrize("first", ["A", "B"])
def test_a_map_between_parallel_layers_is_constant(first: str) -> None:
    """Layer 1 (the ReLU branch) does not depend on layer 0 (the pool): A = 0, B = layer 1."""
    torch.manual_seed(0)
    m, x = _PoolBranch().double().eval(), torch.randn(3, 1, 4, 4, dtype=torch.float64)
    amap = sl.affine_map(m, x, start=0, end=1)
    a, b = (amap.A, amap.B) if first == "A" else (amap.B, amap.A)[::-1]
    assert not a.any()
    torch.testing.assert_close(b, torch.relu(m.c2(x)), rtol=0, atol=1e-15)
    assert sl.layer_maso(m, x, 1) is not None


def test_a_map_refuses_after_any_change_of_its_weights_once_states_are_recorded() -> None:
    """Bit-pattern sums see a change of one float32 entry below the float32 sum's rounding."""
    net = nn.Sequential(nn.Linear(4, 2000), nn.ReLU(), nn.Linear(2000, 2)).eval()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    x = torch.randn(3, 4)
    amap = sl.affine_map(net, x)
    _ = amap.B  # states recorded
    net[0].weight.data[0, 0] += 1e-7  # through .data: no version bump; float32 sum unchanged
    with pytest.raises(ValueError, match="changed after this AffineMap was made"):
        _ = amap.A


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_a_recorded_map_refuses_one_ulp_in_any_dtype_even_when_sums_are_kept(dtype) -> None:
    """One entry one ulp up, in float64 too (where a float64 sum rounds the change away), and a
    zero-sum change of two entries (the float sums of any width stay equal): both refused."""
    net = nn.Sequential(nn.Linear(4, 3000), nn.ReLU(), nn.Linear(3000, 2)).to(dtype).eval()
    with torch.no_grad():
        net[0].weight.fill_(1024.0)
    x = torch.randn(3, 4, dtype=dtype)
    for change in ("one ulp", "zero sum"):
        amap = sl.affine_map(net, x)
        _ = amap.B  # states recorded
        w = net[0].weight.data  # through .data: no version bump
        before = w.sum(dtype=torch.float64)
        if change == "one ulp":
            w[0, 0] = w[0, 0].nextafter(torch.tensor(2048.0, dtype=dtype))
        else:
            w[0, 0] += 64.0  # (exact in every dtype here: 1088 and 960)
            w[0, 1] -= 64.0
        assert change == "one ulp" or w.sum(dtype=torch.float64) == before
        assert (w != 1024.0).any()
        with pytest.raises(ValueError, match="changed after this AffineMap was made"):
            _ = amap.A
        net[0].weight.data.fill_(1024.0)


@pytest.mark.parametrize("enabled", [True, False])
def test_capture_pauses_the_garbage_collector_and_restores_it(enabled: bool, monkeypatch) -> None:
    import gc

    seen: list[bool] = []
    export = torch.export.export

    def spy(*args, **kwargs):  # (the state inside the capture)
        seen.append(gc.isenabled())
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", spy)
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        capture(nn.Sequential(nn.Linear(3, 2), nn.ReLU()).eval(), torch.randn(2, 3))
        assert gc.isenabled() is enabled
        with pytest.raises(sl.UnsupportedOperationError):  # a refused capture restores it too
            capture(nn.Sequential(nn.Linear(3, 2), nn.Sigmoid()).eval(), torch.randn(2, 3))
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
    assert seen and not any(seen)
