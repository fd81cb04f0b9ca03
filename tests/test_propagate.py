"""propagate pass: the painting rules R0-R7, one small hand-built model per rule.

Each test converts a model written to exercise one rule and checks, for the node the rule is
about, the rule named in its Decision, the precision it got, and that its reason sentence names
the thing that decided it. The PrecisionPlan's own contract (immutable, JSON round trip) is at
the end.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import amp_compiler as ac
from amp_compiler.passes.classify import classify
from amp_compiler.passes.graph import DataflowGraph
from amp_compiler.passes.plan import Decision, PrecisionPlan
from amp_compiler.passes.policy import policy_for
from amp_compiler.passes.propagate import propagate

from conftest import DTYPES, cast_nodes, eval_conversion, nodes_of, rel_err

FP32 = torch.float32


def _convert(model: nn.Module, *inputs, dtype=torch.float16, **kw):
    """fx front end unless inputs are given (then torch.export, like convert())."""
    return ac.convert(model.eval(), tuple(inputs) if inputs else None, dtype=dtype, **kw)


def _only(plan, kind: str) -> str:
    names = nodes_of(plan, kind)
    assert len(names) == 1, (kind, names)
    return names[0]


class TwoLinear(nn.Module):
    """fc1 -> body -> fc2, where ``body`` is what each test is about."""

    def __init__(self, body, width: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.body = body

    def forward(self, x):
        return self.fc2(self.body(self.fc1(x), x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_r0_sources_keep_their_dtype(dtype):
    amp = _convert(TwoLinear(lambda h, x: F.relu(h)), dtype=dtype)
    for name, d in amp.plan.items():
        if d.category == "param":
            assert (d.precision, d.rule) == (FP32, "R0:source")
            assert "parameter" in d.reason and "float32" in d.reason
    assert amp.plan["x"].rule == "R0:source" and "input" in amp.plan["x"].reason
    assert amp.plan["output"].rule == "R0:output"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_r1_allow_ops_are_low(dtype):
    amp = _convert(TwoLinear(lambda h, x: F.relu(h)), dtype=dtype)
    for n in nodes_of(amp.plan, "linear"):
        d = amp.plan[n]
        assert (d.category, d.precision, d.rule) == ("allow", dtype, "R1:allow")
        assert "linear" in d.reason and str(dtype).split(".")[1] in d.reason


def test_r2_deny_is_fp32_and_spreads_forward():
    # fc1 -> exp -> mul -> fc2: without R2 the mul would sit "between two linears" and go low
    amp = _convert(TwoLinear(lambda h, x: torch.exp(h) * 3.0))
    exp, mul = _only(amp.plan, "exp"), _only(amp.plan, "mul")
    assert (amp.plan[exp].precision, amp.plan[exp].rule) == (FP32, "R2:deny")
    assert "exp" in amp.plan[exp].reason
    assert (amp.plan[mul].precision, amp.plan[mul].rule) == (FP32, "R2:deny-spread")
    assert f"'{exp}'" in amp.plan[mul].reason
    # the linear after it is still low: the cast sits between mul and fc2
    fc2 = nodes_of(amp.plan, "linear")[-1]
    assert amp.plan[fc2].precision == torch.float16
    assert any(c.meta["amp_cast"]["source"] == mul for c in cast_nodes(amp.graph_module))


def test_r2_spreads_through_clear_ops_too():
    amp = _convert(TwoLinear(lambda h, x: torch.log(h.abs() + 1).view(-1, 16).relu()))
    for kind in ("view", "relu"):
        d = amp.plan[_only(amp.plan, kind)]
        assert (d.precision, d.rule) == (FP32, "R2:deny-spread") and "'log'" in d.reason


def test_r3_infer_between_two_linears_is_low():
    amp = _convert(TwoLinear(lambda h, x: F.gelu(h) * 0.5 + 1.0))
    for kind in ("gelu", "mul", "add"):
        d = amp.plan[_only(amp.plan, kind)]
        assert (d.category, d.precision, d.rule) == ("infer", torch.float16, "R3:between-low")
        assert "between" in d.reason
    # so the only activation casts are the input and the output
    acts = [c for c in cast_nodes(amp.graph_module) if c.meta["amp_cast"]["source"] in ("x", "linear_1")]
    assert len(acts) == 2 and len(cast_nodes(amp.graph_module)) == 2  # weights are folded


class Masked(nn.Module):
    """A residual add of a real fp32 value, and an additive mask built from an integer mask."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x, attention_mask):
        additive = (1.0 - attention_mask.to(x.dtype)) * -1024.0
        h = self.fc1(x) + additive           # mask: exact, must not block
        r = self.fc2(h) + x                  # residual: x is fp32 and not exact
        return self.fc3(r)


def test_r3_fp32_input_blocks_but_an_integer_mask_does_not():
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    mask = torch.tensor([[1] * 16, [1] * 12 + [0] * 4, [1] * 16, [0] + [1] * 15])
    model = Masked().eval()
    amp = _convert(model, x, mask)  # export: the mask's integer dtype is known
    masked, residual = nodes_of(amp.plan, "add")
    d = amp.plan[masked]
    assert (d.precision, d.rule) == (torch.float16, "R3:between-low"), d
    d = amp.plan[residual]
    assert (d.precision, d.rule) == (FP32, "R3:fp32-input"), d
    assert "'x'" in d.reason and "fp32" in d.reason
    # the mask is cast once, after it is built; x is never rounded for the residual
    sources = {c.meta["amp_cast"]["source"]: c.meta["amp_cast"]["dtype"] for c in cast_nodes(amp.graph_module)}
    assert sources.get("mul") == torch.float16 and "x" in sources
    # numbers: the mask values (0 and -1024) are exact in fp16, the residual keeps x exact
    ref, out = model(x, mask), amp(x, mask)
    with torch.autocast("cpu", dtype=torch.float16):
        auto = model(x, mask)
    assert out.dtype == FP32
    assert rel_err(out, ref) <= 1.1 * rel_err(auto, ref) + 1e-7


def test_r3_without_dtypes_a_mask_of_unknown_dtype_blocks():
    # fx records no dtypes: attention_mask.to(x.dtype) may be a real fp32 value, so the add of
    # it is kept fp32 (conservative), and the reason names the value
    amp = _convert(Masked())
    masked = nodes_of(amp.plan, "add")[0]
    d = amp.plan[masked]
    assert (d.precision, d.rule) == (FP32, "R3:fp32-input") and "'mul'" in d.reason


class PostLN(nn.Module):
    """bert's post-LN residual: ln1 reads an fp32 residual, so ln1 is fp32, and the next
    residual add reads ln1's fp32 output."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (nn.Linear(width, width) for _ in range(3))
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)

    def forward(self, x):
        h = self.ln1(x + self.fc1(x))
        return self.fc3(self.ln2(h + self.fc2(h)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_r3_an_fp32_layer_norm_output_blocks_like_any_fp32_value(dtype):
    torch.manual_seed(0)
    model, x = PostLN().eval(), torch.randn(8, 64) * 3
    amp = _convert(model, dtype=dtype)
    first, second = nodes_of(amp.plan, "add")
    ln1 = nodes_of(amp.plan, "layer_norm")[0]
    assert amp.plan[first].rule == "R3:fp32-input"
    assert (amp.plan[ln1].precision, amp.plan[ln1].rule) == (FP32, "R5:fp32-acc-fp32")
    d = amp.plan[second]
    assert (d.precision, d.rule) == (FP32, "R3:fp32-input") and f"'{ln1}'" in d.reason
    with torch.autocast("cpu", dtype=dtype):
        auto = model(x)
    ref = model(x)
    assert rel_err(amp(x), ref) <= 1.1 * rel_err(auto, ref) + 1e-7


class LayerScale(nn.Module):
    """ConvNeXt's residual block in miniature: conv -> linear, scaled by an fp32 parameter of
    shape (C, 1, 1), added to the stream; ``scalar`` is a 0-dim parameter beside it."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 4, stride=4)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.fc = nn.Linear(width, width)
        self.gamma = nn.Parameter(torch.full((width, 1, 1), 0.1))
        self.scalar = nn.Parameter(torch.tensor(0.5))
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        x = self.stem(x)
        y = self.fc(self.dw(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x + self.gamma * (y * self.scalar)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_r3_an_fp32_parameter_with_a_dimension_blocks_like_type_promotion(dtype):
    torch.manual_seed(0)
    model, x = LayerScale().eval(), torch.randn(4, 3, 32, 32)
    amp = _convert(model, x, dtype=dtype)
    gamma_mul = next((d for n, d in amp.plan.items() if d.kind == "mul" and d.precision == FP32), None)
    assert gamma_mul is not None and gamma_mul.rule == "R3:fp32-input" and "gamma" in gamma_mul.reason
    # the 0-dim parameter does not promote under autocast, so its mul stays low
    low_muls = [d for d in amp.plan.values() if d.kind == "mul" and d.precision == dtype]
    assert len(low_muls) == 1 and low_muls[0].rule == "R3:between-low"
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=dtype):
            auto = model(x)
        assert rel_err(amp(x), ref) <= 1.1 * rel_err(auto, ref) + 1e-7


def test_r3_parameters_do_not_block_without_type_promotion():
    """ONNX graphs (type_promotion=False): the same graph keeps the scaled branch low."""
    from amp_compiler.capture import build_dataflow, capture

    model, x = LayerScale().eval(), torch.randn(2, 3, 32, 32)
    gm, _ = capture(model, (x,))
    graph = build_dataflow(gm)
    policy = policy_for("cpu", torch.bfloat16)
    promoted = propagate(graph, classify(graph, policy), policy)
    typed = propagate(graph, classify(graph, policy), policy, type_promotion=False)
    muls = [n for n in promoted if promoted[n].kind == "mul"]
    assert {promoted[n].precision for n in muls} == {FP32, torch.bfloat16}
    assert {typed[n].precision for n in muls} == {torch.bfloat16}


class NormedStem(nn.Module):
    """ConvNeXt's stem and first block in miniature: conv -> permute -> layer_norm -> permute
    starts the residual stream, which feeds the block's conv (low) and the layer-scaled
    residual add (fp32 by the layer scale's type promotion)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 4, stride=4)
        self.ln = nn.LayerNorm(width)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.fc = nn.Linear(width, width)
        self.gamma = nn.Parameter(torch.full((width, 1, 1), 1e-2))
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        x = self.ln(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = self.fc(self.dw(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x + self.gamma * y
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_r3_a_normalised_value_carried_to_an_fp32_op_stays_fp32(dtype):
    torch.manual_seed(0)
    model, x = NormedStem().eval(), torch.randn(4, 3, 32, 32)
    amp = _convert(model, x, dtype=dtype)
    ln = _only(amp.plan, "layer_norm")
    carriers = [n for n, d in amp.plan.items() if d.rule == "R3:fp32-consumer"]
    assert len(carriers) == 1 and amp.plan[carriers[0]].kind == "permute"
    reason = amp.plan[carriers[0]].reason
    assert f"'{ln}'" in reason and "add" in reason
    assert (amp.plan[ln].precision, amp.plan[ln].rule) == (FP32, "R5:fp32-acc-fp32")
    # the stream reaches the add uncast; the block's conv reads it through one cast down
    casts = {c.meta["amp_cast"]["source"]: c for c in cast_nodes(amp.graph_module)}
    assert carriers[0] in casts and casts[carriers[0]].meta["amp_cast"]["dtype"] == dtype
    # the permute before the norm stays low (it is not carried to an fp32 op)
    first = min((n for n, d in amp.plan.items() if d.kind == "permute"), key=list(amp.plan).index)
    assert amp.plan[first].rule == "R3:between-low"
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=dtype):
            auto = model(x)
        # CPU autocast rounds the normalised stream (its layer_norm runs in the low dtype)
        assert rel_err(amp(x), ref) <= rel_err(auto, ref) + 1e-7


class CopyResidual(nn.Module):
    """An fp32 value (layer_norm of the input) goes through a movement op (a copy: an inert
    dropout would be removed by the hygiene pass, rule H2), then feeds a linear (low) and a
    residual add (fp32: R3:fp32-input)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        h = self.ln(x).clone()
        return self.fc2(h + self.fc1(h))


def test_r4_does_not_round_a_value_an_fp32_consumer_reads():
    amp = _convert(CopyResidual())
    drop, add = _only(amp.plan, "clone"), _only(amp.plan, "add")
    assert amp.plan[add].rule == "R3:fp32-input" and f"'{drop}'" in amp.plan[add].reason
    assert amp.plan[drop].precision == FP32  # what the add's reason says it is
    # one cast of the dropout output for fc1, none before it
    sources = [c.meta["amp_cast"]["source"] for c in cast_nodes(amp.graph_module)]
    assert "layer_norm" not in sources and sources.count(drop) == 1


def _plan_contradictions(amp) -> list[str]:
    """Decisions whose reason contradicts the plan: an R3:fp32-input blocker that is not fp32,
    or an R3:between-low node reading an fp32_acc value the plan keeps fp32."""
    bad = []
    graph = amp._dataflow
    for n, d in amp.plan.items():
        if d.rule == "R3:fp32-input":
            blocker = d.reason.split("'")[1]
            if amp.plan[blocker].precision not in (FP32, torch.float64):
                bad.append(f"{n}: blocker {blocker} is {amp.plan[blocker].precision}")
        if d.rule == "R3:between-low":
            for p in graph.data_inputs(n):
                if amp.plan[p].category == "fp32_acc" and amp.plan[p].precision == FP32:
                    bad.append(f"{n} ({d.precision}) reads fp32 {p}")
    return bad


@pytest.mark.parametrize("name", ["mlp", "resnet", "gpt", "bert", "lstm", "mf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_plans_agree_with_their_reasons(name, dtype):
    amp = eval_conversion(name, dtype, "export")[2]
    assert _plan_contradictions(amp) == []


def test_r3_a_traced_size_is_not_an_fp32_input():
    # gpt: y.transpose(1, 2).contiguous().view(B, T, C) between two matmul-class ops
    plan = eval_conversion("gpt", torch.bfloat16, "export")[2].plan
    for view in ("view_3", "view_7"):
        assert plan[view].precision == torch.bfloat16, plan[view]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_r4_low_spreads_through_clear_chains(dtype):
    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            # the transposes before fc are a clear chain feeding a low op; the relu/view after
            # it feed the graph output: not between two low ops, so R3 does not apply
            h = self.fc(x.transpose(0, 1).transpose(0, 1))
            return F.relu(h).view(-1)

    amp = _convert(Chain(), dtype=dtype)
    for kind in ("transpose", "relu", "view"):
        for n in nodes_of(amp.plan, kind):
            d = amp.plan[n]
            assert (d.precision, d.rule) == (dtype, "R4:clear-chain"), (n, d)
            assert "data movement" in d.reason
    # one cast of x before the chain, one of the result after it
    sources = sorted(c.meta["amp_cast"]["source"] for c in cast_nodes(amp.graph_module))
    assert sources == ["view", "x"]


def test_r4_a_shape_read_does_not_stop_the_backward_spread():
    # the ONNX front end gives a Shape node an ordinary (cast) edge from the value it measures
    # (the lstm file: embedding Gather -> Shape and -> Transpose -> LSTM). Shape reads only
    # metadata, so it must not count as an fp32 consumer that keeps the gather fp32: that would
    # add a Cast onnxconverter-common does not need (2 instead of 1 on lstm).
    g = DataflowGraph()
    g.add_vertex("x", role="input", kind="input", dtype=FP32)
    g.add_vertex("w", role="param", kind="param", dtype=FP32)
    g.add_vertex("gather", role="compute", kind="embedding", is_float=True)
    g.add_vertex("shape", role="compute", kind="shape", is_float=False)
    g.add_vertex("transpose", role="compute", kind="transpose", is_float=True)
    g.add_vertex("fc", role="compute", kind="linear", is_float=True)
    g.add_vertex("output", role="output", kind="output")
    g.add_use("x", "gather")
    g.add_use("w", "gather")
    g.add_use("gather", "shape")
    g.add_use("gather", "transpose")
    g.add_use("transpose", "fc")
    g.add_use("w", "fc")
    g.add_use("shape", "fc", cast=False)
    g.add_use("fc", "output", cast=False)
    policy = policy_for("cpu", torch.float16)
    plan = propagate(g, classify(g, policy), policy)
    assert plan["shape"].rule == "R0:non-float"
    for n in ("transpose", "gather"):
        assert (plan[n].precision, plan[n].rule) == (torch.float16, "R4:clear-chain"), plan[n]


class LNBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 16)

    def forward(self, x):
        return self.fc2(self.ln(self.fc1(x)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_r5_layer_norm_between_two_linears_is_low(dtype):
    amp = _convert(LNBetween(), dtype=dtype)
    d = amp.plan[_only(amp.plan, "layer_norm")]
    assert (d.category, d.precision, d.rule) == ("fp32_acc", dtype, "R5:fp32-acc-low")
    assert "layer_norm" in d.reason and "accumulates in fp32" in d.reason


def test_r5_log_softmax_feeding_nll_loss_is_fp32():
    class Clf(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 5)

        def forward(self, x, y):
            return F.nll_loss(F.log_softmax(self.fc(x), -1), y)

    x, y = torch.randn(6, 16), torch.randint(0, 5, (6,))
    for amp in (_convert(Clf()), _convert(Clf(), x, y)):
        ls = amp.plan[_only(amp.plan, "log_softmax")]
        assert (ls.precision, ls.rule) == (FP32, "R5:fp32-acc-fp32")
        assert "log_softmax" in ls.reason and "consumer is fp32" in ls.reason
        nll = amp.plan[_only(amp.plan, "nll_loss")]
        assert (nll.precision, nll.rule) == (FP32, "R2:deny")
        out = amp(x, y)
        assert out.dtype == FP32 and out.dim() == 0


def test_r5_softmax_feeding_the_graph_output_is_fp32():
    class Probs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            return F.softmax(self.fc(x), -1)

    amp = _convert(Probs())
    d = amp.plan[_only(amp.plan, "softmax")]
    assert (d.precision, d.rule) == (FP32, "R5:fp32-acc-fp32") and "graph output" in d.reason


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.fc2(torch.exp(self.fc1(x)))


def test_r6_keep_fp32_and_force_low_win():
    amp = _convert(Mixed(), keep_fp32=("node:linear",), force_low=("exp",))
    lin, exp = amp.plan["linear"], amp.plan["exp"]
    assert (lin.precision, lin.rule) == (FP32, "R6:keep_fp32") and "node:linear" in lin.reason
    assert (exp.precision, exp.rule) == (torch.float16, "R6:force_low") and "'exp'" in exp.reason
    assert amp.plan["linear_1"].rule == "R1:allow"
    # both given for one node: keep_fp32 wins
    amp = _convert(Mixed(), keep_fp32=("exp",), force_low=("exp",))
    assert (amp.plan["exp"].precision, amp.plan["exp"].rule) == (FP32, "R6:keep_fp32")


def test_r6_overrides_are_pinned_before_painting():
    # forcing exp low removes the deny region: nothing fp32 remains between the linears
    amp = _convert(Mixed(), force_low=("exp",))
    assert not [n for n, d in amp.plan.items() if d.precision == FP32 and d.category not in ("param",)]


def test_r7_unknown_ops_are_fp32():
    amp = _convert(TwoLinear(lambda h, x: torch.lgamma(h)))
    d = amp.plan[_only(amp.plan, "lgamma")]
    assert (d.category, d.precision, d.rule) == ("unknown", FP32, "R7:unknown")
    assert "lgamma" in d.reason and "not in the policy tables" in d.reason
    assert amp.plan.counts()["unknown"] == 1
    # the unknown op stops propagation: both linears low, casts around lgamma
    assert all(amp.plan[n].precision == torch.float16 for n in nodes_of(amp.plan, "linear"))


def test_r7_infer_outside_low_regions_is_fp32():
    class Scale(nn.Module):
        def forward(self, x):
            return x * 2.0 + 1.0

    amp = _convert(Scale())
    for kind in ("mul", "add"):
        d = amp.plan[_only(amp.plan, kind)]
        assert (d.precision, d.rule) == (FP32, "R7:follow-fp32") and "autocast" in d.reason
    assert not [c for c in cast_nodes(amp.graph_module) if c.meta["amp_cast"]["dtype"] != FP32]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_float64_models_are_left_alone(frontend):
    model = LNBetween().double().eval()
    x = torch.randn(4, 16, dtype=torch.float64)
    amp = _convert(model, *((x,) if frontend == "export" else ()))
    for kind in ("linear", "layer_norm"):
        for n in nodes_of(amp.plan, kind):
            d = amp.plan[n]
            assert (d.precision, d.rule) == (torch.float64, "R0:float64")
    out = amp(x)
    assert out.dtype == torch.float64
    assert torch.equal(out, model(x))
    assert {c.meta["amp_cast"]["dtype"] for c in cast_nodes(amp.graph_module)} <= {torch.float64}


# -- PrecisionPlan -------------------------------------------------------------------------

def test_plan_is_immutable():
    plan = _convert(LNBetween()).plan
    with pytest.raises(TypeError):
        plan["linear"] = plan["linear_1"]  # type: ignore[index]
    with pytest.raises(TypeError):
        del plan["linear"]  # type: ignore[attr-defined]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan["linear"].precision = FP32  # type: ignore[misc]
    changed = plan.replace({"linear": plan["linear"].with_(precision=FP32, rule="test")})
    assert changed["linear"].precision == FP32
    assert plan["linear"].precision == torch.float16  # the original is untouched
    assert isinstance(changed, PrecisionPlan) and changed is not plan


@pytest.mark.parametrize("name", [
    "mlp", "mlp_wide", "resnet", "gpt", "bert", "lstm", "mf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plan_json_round_trip(name, dtype):
    plan = eval_conversion(name, dtype, "export")[2].plan
    back = PrecisionPlan.from_json(plan.to_json())
    assert dict(back) == dict(plan)
    assert list(back) == list(plan)  # graph order kept
    assert (back.low_dtype, back.device_type) == (plan.low_dtype, plan.device_type)
    assert all(isinstance(d, Decision) for d in back.values())
    assert back.to_json() == plan.to_json()


def test_a_saved_plan_reapplies_to_the_same_graph():
    model, inputs, amp = eval_conversion("gpt", torch.float16, "export")
    again = ac.convert(model, inputs, plan=amp.plan.to_json(indent=1))
    assert dict(again.plan) == dict(amp.plan) and again.low_dtype == torch.float16
    assert again.graph_module.code == amp.graph_module.code
    with torch.no_grad():
        assert torch.equal(again(*inputs), amp(*inputs))


class _RotaryPhases(nn.Module):
    """Hugging Face's rotary embedding as it reads once captured: the phases are
    ``inv_freq.float() @ position_ids.float()`` (under ``torch.autocast(enabled=False)`` in the
    library, a context the captured graph no longer has)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32)),
                             persistent=False)
        self.proj = nn.Linear(32, 32)

    def forward(self, x, position_ids):
        freqs = (self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
                 @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return self.proj(x) * emb.cos() + emb.sin()


def test_r1_a_matmul_on_the_models_own_fp32_casts_stays_fp32():
    """R1:user-fp32: in bf16 the phases of positions near 1024 are off by radians; the plan
    keeps the matmul the model wrote on ``.float()`` operands in fp32, while the projection
    stays low. Forcing the matmul low (force_low wins) shows what the rule prevents."""
    torch.manual_seed(0)
    model = _RotaryPhases()
    x, pos = torch.randn(2, 1024, 32), torch.arange(1024)[None].expand(2, -1)
    amp = ac.convert(model, (x, pos), dtype=torch.bfloat16)
    rules = {n.name: amp.plan[n.name].rule for n in amp.graph_module.graph.nodes if n.name in amp.plan}
    assert rules["matmul"] == "R1:user-fp32" and amp.plan["matmul"].precision == torch.float32
    assert rules["linear"] == "R1:allow"
    forced = ac.convert(model, (x, pos), dtype=torch.bfloat16, force_low=("matmul",))
    assert forced.plan["matmul"].rule == "R6:force_low"
    with torch.no_grad():
        ref = model(x, pos)
        err = lambda m: float((m(x, pos) - ref).abs().max() / ref.abs().max())  # noqa: E731
        assert err(amp) < 2e-2 < 0.1 < err(forced)
