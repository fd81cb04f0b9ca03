"""Range analysis (passes/ranges.py): what collect_ranges records, rules D1-D4, and the plan built
with them: a planted fp16 overflow that plain conversion turns into inf/NaN is pinned fp32 with
its evidence, underflow and cancellation are pinned with theirs, and the reference models raise
no false alarm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import amp_compiler as ac
from amp_compiler.errors import ConfigError
from amp_compiler.capture import build_dataflow, capture
from amp_compiler.models import build
from amp_compiler.passes.insert_casts import insert_casts
from amp_compiler.passes.range_recorder import collect_ranges
from amp_compiler.passes.ranges import (THRESHOLDS, apply_overrides, plan_from_ranges, plan_with_overrides,
                                        range_findings, range_overrides)
from conftest import rel_err, runtime_dtypes

FP16, BF16 = torch.float16, torch.bfloat16


def stages_with_ranges(model, calibration, *, dtype, **overrides):
    """convert()'s range stages on an eval-mode fx capture: capture -> DataflowGraph ->
    collect_ranges -> plan_from_ranges (D1-D4 pins); returns (gm, graph, plan)."""
    gm, _ = capture(model, mode=False)
    graph = build_dataflow(gm)
    ranges = collect_ranges(gm, calibration, graph=graph, low_dtypes=(dtype,))
    return gm, graph, plan_from_ranges(graph, ranges, dtype, "cpu", **overrides)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models: one thread avoids OpenMP barrier stalls on a loaded 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Overflowing(nn.Module):
    """fc2's weights are scaled so its output reaches ~1e5 (> fp16's 65504); LayerNorm brings
    the value back to O(1), so the fp32 model is perfectly well behaved."""

    def __init__(self, scale: float = 3e5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        self.ln = nn.LayerNorm(64)
        for p in self.parameters():
            if p.dim() == 2:
                p.data = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
        self.fc2.weight.data *= scale / 10

    def forward(self, x):
        return self.fc3(self.ln(self.fc2(torch.relu(self.fc1(x)))))


def batches(n: int, seed: int, shape=(16, 32), scale: float = 1.0) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * scale,) for _ in range(n)]


# -- collect_ranges ------------------------------------------------------------------------------

def test_collect_ranges_records_max_reduction_and_accumulator():
    model = Overflowing(scale=10.0).eval()
    cal = batches(3, seed=1)
    gm, _ = capture(model)
    ranges = collect_ranges(gm, cal, graph=build_dataflow(gm))
    with torch.no_grad():
        h = [torch.relu(model.fc1(x)) for (x,) in cal]
        y = [model.fc2(a) for a in h]
    r = ranges["linear_1"]
    assert r.batches == 3
    assert r.max_abs == pytest.approx(max(t.abs().max().item() for t in y), rel=1e-6)
    assert r.batch_max == pytest.approx(tuple(t.abs().max().item() for t in y), rel=1e-6)
    assert r.reduce_len == 64
    # the accumulator bound is max sum|terms| = max(|h| @ |W|^T + |b|), at least the output's max
    acc = max((a.abs() @ model.fc2.weight.abs().T + model.fc2.bias.abs()).max().item() for a in h)
    assert r.acc_bound == pytest.approx(acc, rel=1e-5) and r.acc_bound >= r.max_abs
    # local error of the node computed alone in each low dtype: about one rounding unit
    assert 1e-5 < r.low_error["float16"] < 4e-3
    assert r.low_error["float16"] < r.low_error["bfloat16"] < 3e-2
    assert ranges["relu"].reduce_len is None and ranges["relu"].acc_bound is None


def test_collect_ranges_counts_values_below_smallest_normal():
    class Scale(nn.Module):
        def forward(self, x):
            return x * 1.0

    x = torch.tensor([[1e-6, 2e-5, 1e-4, 0.0, 1.0, -3e-7, 5e-5, 2.0]])
    r = collect_ranges(gm := capture(Scale())[0], [(x,)], graph=build_dataflow(gm))["mul"]
    # 7 non-zero values, 4 of them below fp16's 6.1e-5; none below bf16's 1.2e-38
    assert r.nonzero == 7
    assert r.below_normal["float16"] == pytest.approx(4 / 7)
    assert r.below_normal["bfloat16"] == 0.0


@pytest.mark.parametrize("bad, what", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_calibration_with_nonfinite_values_is_refused(bad, what):
    gm, _ = capture(Overflowing().eval())
    cal = batches(3, seed=1)
    cal[1][0][2, 5] = bad
    with pytest.raises(ConfigError, match=f"calibration batch 1 contains {what} at input 0"):
        collect_ranges(gm, cal, graph=build_dataflow(gm))
    with pytest.raises(ConfigError, match="calibration is empty"):
        collect_ranges(gm, [], graph=build_dataflow(gm))


# -- D1: the planted overflow --------------------------------------------------------------------

def test_planted_overflow_is_pinned_fp32_with_its_evidence():
    model = Overflowing().eval()
    cal, held = batches(4, seed=1), batches(4, seed=2)
    with torch.no_grad():
        observed = max(model.fc2(torch.relu(model.fc1(x))).abs().max().item() for (x,) in cal)
    assert 65504 < observed < 2e5  # the premise: above fp16's range, fine in fp32

    # plain conversion: fc2 computes in fp16 and overflows; LayerNorm turns inf into NaN
    plain = ac.convert(model, dtype="float16")
    assert plain.plan["linear_1"].precision == FP16
    with torch.no_grad():
        out = plain(*held[0])
    assert not torch.isfinite(out).all()

    gm, graph, plan = stages_with_ranges(model, cal, dtype=FP16)
    d = plan["linear_1"]
    assert (d.precision, d.rule) == (torch.float32, "D1:overflow")
    assert f"observed max|x| = {observed:.3g} > data_max 16384 on 4 of 4 calibration batches" in d.reason
    # its consumer would read the big value through an fp16 cast: pinned too, naming the input
    assert plan["layer_norm"].rule == "D1:overflow" and "input 'linear_1'" in plan["layer_norm"].reason
    # the rest keeps the normal rules: range analysis pins only what it must
    assert plan["linear"].precision == FP16 and plan["linear_2"].precision == FP16
    assert [f[:2] for f in plan.meta["range_findings"]][:1] == [["linear_1", "D1:overflow"]]

    insert_casts(gm, graph, plan)
    dtypes = runtime_dtypes(gm, *held[0]).dtypes
    assert dtypes["linear_1"] == torch.float32 and dtypes["linear"] == FP16
    with torch.no_grad():
        for (x,) in held:
            y, ref = gm(x), model(x)
            assert torch.isfinite(y).all()
            assert rel_err(y, ref) < 2e-3


def test_data_max_is_a_knob_and_is_checked():
    model = Overflowing(scale=10.0).eval()  # max|x| around 10: fine at the default
    gm, _ = capture(model)
    graph = build_dataflow(gm)
    ranges = collect_ranges(gm, batches(2, seed=1), graph=graph)
    assert range_overrides(graph, ranges, FP16) == {}
    tight = range_overrides(graph, ranges, FP16, data_max=1.0)
    assert tight["linear_1"][0] == "D1:overflow" and "data_max 1 " in tight["linear_1"][1]
    with pytest.raises(ConfigError, match="data_max"):
        range_overrides(graph, ranges, FP16, data_max=-1.0)
    # bf16 has fp32's range: no overflow rule fires even on the 1e5 model
    big = Overflowing().eval()
    gm, _ = capture(big)
    graph = build_dataflow(gm)
    assert range_overrides(graph, collect_ranges(gm, batches(2, seed=1), graph=graph), BF16) == {}


def test_user_overrides_keep_precedence():
    model = Overflowing().eval()
    cal = batches(2, seed=1)
    _, _, plan = stages_with_ranges(model, cal, dtype=FP16, force_low=("node:linear_1",))
    assert (plan["linear_1"].precision, plan["linear_1"].rule) == (FP16, "R6:force_low")
    _, _, plan = stages_with_ranges(model, cal, dtype=FP16, keep_fp32=("node:linear_1",))
    assert plan["linear_1"].rule == "R6:keep_fp32"


def test_apply_overrides_pins_in_keep_fp32():
    from amp_compiler.passes.classify import Classification

    cls = Classification({"a": "allow", "b": "allow"}, keep_fp32={"a": "user"}, force_low={"c": "u"})
    out = apply_overrides(cls, {"a": ("D1:overflow", "x"), "b": ("D1:overflow", "y"), "c": ("D2:underflow", "z")})
    assert out.keep_fp32 == {"a": "user", "b": "D1:overflow: y"}


# -- D2: underflow -------------------------------------------------------------------------------

class Tiny(nn.Module):
    """Activations scaled down to ~1e-6 before a matmul, then renormalised: in fp16 they are
    subnormal (a few significant bits) and the renormalisation brings the lost digits to O(1)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.fc1, self.fc2 = nn.Linear(32, 32, bias=False), nn.Linear(32, 8)

    def forward(self, x):
        h = self.fc1(x * self.scale)
        return self.fc2(h / h.abs().amax(-1, keepdim=True))


def test_underflow_pins_when_most_values_are_subnormal_and_notes_otherwise():
    torch.manual_seed(0)
    tiny, normal = Tiny(1e-6).eval(), Tiny(1e-2).eval()
    cal, held = batches(2, seed=1), batches(2, seed=2)

    _, _, plan = stages_with_ranges(tiny, cal, dtype=FP16)
    d = plan["linear"]
    assert (d.precision, d.rule) == (torch.float32, "D2:underflow")
    assert "100.0% of its non-zero values are below float16's smallest normal" in d.reason
    gm_plain = ac.convert(tiny, dtype="float16")
    gm, graph, plan = stages_with_ranges(tiny, cal, dtype=FP16)
    insert_casts(gm, graph, plan)
    with torch.no_grad():
        plain_err = max(rel_err(gm_plain(x), tiny(x)) for (x,) in held)
        fixed_err = max(rel_err(gm(x), tiny(x)) for (x,) in held)
    assert plain_err > 1e-2 and fixed_err < 2e-3, (plain_err, fixed_err)

    # a few subnormal values among normal ones cost nothing measurable: noted, not pinned
    gm, _ = capture(normal)
    graph = build_dataflow(gm)
    ranges = collect_ranges(gm, cal, graph=graph)
    findings = range_findings(graph, ranges, FP16)
    notes = [f for f in findings if f.rule == "D2:underflow"]
    assert notes and all(f.action == "note" for f in notes)
    assert "D2:underflow" not in {r for r, _ in range_overrides(graph, ranges, FP16).values()}


# -- D3: reductions whose accumulator would overflow ---------------------------------------------

def test_reduction_accumulator_bound_pins_when_partial_sums_overflow():
    # terms of +-1e3 over 256 positions: the result stays small, sum|terms| is 2.6e5
    class Cancel(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(256, 4, bias=False)
            self.fc.weight.data = torch.ones(4, 256)

        def forward(self, x):
            return self.fc(x) * 1.0

    x = torch.ones(2, 256) * 1e3
    x[:, 1::2] *= -1
    gm, _ = capture(Cancel().eval())
    graph = build_dataflow(gm)
    ranges = collect_ranges(gm, [(x,)], graph=graph)
    assert ranges["linear"].max_abs == 0.0 and ranges["linear"].acc_bound == pytest.approx(256e3)
    rule, reason = range_overrides(graph, ranges, FP16)["linear"]
    assert rule == "D3:reduction"
    assert "reduced length of 256" in reason and "2.56e+05 > 32768" in reason
    assert "linear" not in range_overrides(graph, ranges, BF16)


# -- D4: precision (bf16's rule) -----------------------------------------------------------------

class Cancellation(nn.Module):
    """Adds and removes a large offset between two matmuls: fine in fp32, but bf16's 8-bit
    mantissa cannot hold x + 300 to better than +-1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2((self.fc1(x) + 300.0) - 300.0)


def test_cancellation_is_pinned_in_bf16_by_measured_local_error():
    torch.manual_seed(0)
    model = Cancellation().eval()
    cal, held = batches(2, seed=1, shape=(8, 16)), batches(2, seed=2, shape=(8, 16))
    plain = ac.convert(model, dtype="bfloat16")
    gm, graph, plan = stages_with_ranges(model, cal, dtype=BF16)
    d = plan["sub"]
    assert (d.precision, d.rule) == (torch.float32, "D4:precision")
    assert "computed alone in bfloat16" in d.reason
    local = float(d.reason.split("off by ")[1].split(" ")[0])
    assert local > THRESHOLDS[BF16].local_error
    # the offset add is no longer between two low ops, so propagation moves it along
    assert plan["add"].precision == torch.float32
    insert_casts(gm, graph, plan)
    with torch.no_grad():
        plain_err = max(rel_err(plain(x), model(x)) for (x,) in held)
        fixed_err = max(rel_err(gm(x), model(x)) for (x,) in held)
    assert plain_err > 0.05 and fixed_err < 2e-2, (plain_err, fixed_err)


# -- no false alarms on the reference models -----------------------------------------------------

@pytest.mark.parametrize("name", ["mlp", "mlp_wide", "resnet", "gpt", "lstm"])
def test_reference_models_raise_no_false_alarm(name):
    model, ex = build(name, "tiny")
    model.eval()
    g = torch.Generator().manual_seed(3)
    cal = [tuple(torch.randn(x.shape, generator=g) * x.std() + x.mean() if x.is_floating_point()
                 else torch.randint(int(x.min()), int(x.max()) + 1, x.shape, generator=g) for x in ex)
           for _ in range(2)]
    gm, _ = capture(model, ex if name == "gpt" else None)
    graph = build_dataflow(gm)
    ranges = collect_ranges(gm, cal, graph=graph)
    for dtype in (FP16, BF16):
        plan = plan_from_ranges(graph, ranges, dtype)
        pinned = {n: d.rule for n, d in plan.items() if d.rule.startswith("D")}
        assert pinned == {}, dtype
        # the same graph without calibration data: the plan is unchanged
        assert dict(plan.items()) == dict(plan_with_overrides(graph, dtype).items())
