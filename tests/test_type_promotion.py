"""Type promotion as torch has it, in the plan (propagate R3) and in the casts (insert_casts I7,
I8), and fill values that do not fit the low dtype (insert_casts I9).

torch's rule: a 0-dim tensor does not promote a dimensioned operand of the same category
(``fp16[B, T] * fp32[]`` is fp16), a dimensioned one does (``fp16[B, T] + fp32[T]`` is fp32),
and 0-dim operands alone promote each other (``fp16[] * fp32[]`` is fp32). So:

- R3: a 0-dim fp32 input (a scale or temperature, a parameter or a computed tensor) beside a
  dimensioned low operand does not keep an op between two low ops in fp32; a dimensioned fp32
  parameter does;
- I8: such a 0-dim fp32 operand of a low elementwise op is read as it is (no cast);
- I7: an fp32 op reads its low operands uncast only when an fp32 operand would promote them
  (a dimensioned one, or every operand 0-dim); beside a 0-dim fp32 operand the low one is cast;
- I9: a ``masked_fill`` computing in a low dtype whose finite fill value is beyond that dtype's
  range fills with the dtype's finite extreme, and the plan's reason says so.

Every test checks the plan, the casts in the graph and the dtypes the graph really computes in
(``runtime_dtypes``: the plan's precision must be the runtime dtype), and the numbers against
fp32 (and autocast where it can run the model). The DeBERTa-like attention is the real case:
``torch.sqrt(torch.tensor(d))`` as the scale and ``masked_fill(mask, finfo(float32).min)``.

    python -m pytest -q tests/test_type_promotion.py --durations=10
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import amp_compiler as ac
from conftest import (EPS, assert_within_autocast, autocast_error_or_skip, cast_nodes, rel_err,
                      runtime_dtypes)

DTYPES = (torch.float16, torch.bfloat16)
C = 16
BOUND_EPS = 4  # vs fp32 where autocast is not the reference: a few roundings to the low dtype


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(b: int = 2, t: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, C, generator=_g(seed))


def _casts(amp) -> list[tuple[str, torch.dtype]]:
    return [(c.meta["amp_cast"]["source"], c.meta["amp_cast"]["dtype"]) for c in cast_nodes(amp.graph_module)]


def _only(amp, kind: str) -> str:
    (name,) = [n for n, d in amp.plan.items() if d.kind == kind]
    return name


def _plan_is_runtime(amp, *inputs) -> None:
    """Every compute node's planned precision is the dtype it computes in."""
    rec = runtime_dtypes(amp.graph_module, *inputs)
    wrong = {n: (d.precision, rec.dtypes.get(n)) for n, d in amp.plan.items()
             if d.precision is not None and d.category not in ("input", "param", "const")
             and not d.rule.startswith("R0") and isinstance(rec.dtypes.get(n), torch.dtype)
             and rec.dtypes[n].is_floating_point and rec.dtypes[n] != d.precision}
    assert not wrong, wrong


class Temperature(nn.Module):
    """``linear(x) * t`` between two linears; ``t`` a parameter of shape ``shape``."""

    def __init__(self, shape: tuple) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(C, C), nn.Linear(C, C)
        self.t = nn.Parameter(torch.full(shape, 0.7))

    def forward(self, x):
        return self.b(self.a(x) * self.t)


class ComputedScale(nn.Module):
    """A scale computed as a 0-dim fp32 tensor, as DeBERTa writes it, dividing a low value."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x):
        h = self.a(x)
        scale = torch.sqrt(torch.tensor(h.size(-1), dtype=torch.float))
        return self.b(h / scale.to(dtype=h.dtype))


class ZeroDimOnly(nn.Module):
    """An op whose operands are all 0-dim: a low element times an fp32 0-dim buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(C, C)
        self.register_buffer("k", torch.tensor(3.0))

    def forward(self, x):
        return self.a(x)[0, 0, 0] * self.k


# -- R3 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("frontend", ["export", "fx"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_r3_zero_dim_fp32_parameter_does_not_block(dtype, frontend):
    torch.manual_seed(0)
    model = Temperature(()).eval()
    x = _x()
    amp = ac.convert(model, (x,) if frontend == "export" else None, dtype=dtype)
    mul = _only(amp, "mul")
    assert amp.plan[mul].precision == dtype
    assert amp.plan[mul].rule == "R3:between-low"
    _plan_is_runtime(amp, x)
    with torch.no_grad():
        ref, out = model(x), amp(x)
    ours = rel_err(out, ref)
    theirs = autocast_error_or_skip(ours, lambda: model(x), dtype, ref)
    assert ours <= max(1.1 * theirs, 2 * EPS[dtype]), (ours, theirs)


@pytest.mark.parametrize("frontend", ["export", "fx"])
def test_r3_dimensioned_fp32_parameter_still_blocks(frontend):
    torch.manual_seed(0)
    model = Temperature((C,)).eval()
    x = _x()
    amp = ac.convert(model, (x,) if frontend == "export" else None, dtype=torch.float16)
    mul = _only(amp, "mul")
    assert amp.plan[mul].precision == torch.float32
    assert amp.plan[mul].rule == "R3:fp32-input"
    assert "'t'" in amp.plan[mul].reason, amp.plan[mul].reason
    _plan_is_runtime(amp, x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_r3_computed_zero_dim_value_does_not_block(dtype):
    """A scale computed in fp32 (``sqrt`` is fp32-required, then a user cast) is a real fp32
    value, but 0-dim beside the dimensioned linear output: the division stays between-low."""
    torch.manual_seed(0)
    amp = ac.convert(ComputedScale().eval(), (_x(),), dtype=dtype)
    div = _only(amp, "div")
    assert amp.plan[div].rule == "R3:between-low", amp.plan[div]
    assert amp.plan[div].precision == dtype
    assert any(d.kind == "sqrt" and d.precision == torch.float32 for d in amp.plan.values())


# -- I8 and I7 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_i8_zero_dim_fp32_operand_of_a_low_op_read_uncast(dtype):
    """The computed scale stays fp32 (sqrt is fp32-required) and the division reads it as it is:
    no cast of the scale, the division computes in the low dtype, as under autocast."""
    torch.manual_seed(0)
    model = ComputedScale().eval()
    x = _x()
    amp = ac.convert(model, (x,), dtype=dtype)
    div = _only(amp, "div")
    assert amp.plan[div].precision == dtype
    scale = [a for a in amp._dataflow.data_inputs(div) if amp._dataflow.vertex(a).shape == ()]
    assert scale, "the scale should be a 0-dim input of the division"
    assert runtime_dtypes(amp.graph_module, x).dtypes[scale[0]] == torch.float32
    low_casts = [src for src, dt in _casts(amp) if dt == dtype]
    assert low_casts == ["x"], low_casts  # the scale is not cast, the linear outputs need none
    _plan_is_runtime(amp, x)
    assert_within_autocast(model, amp, _x(3, 9, seed=1), dtype=dtype)


def test_i8_zero_dim_parameter_not_cast_in_training():
    """In training the parameter is cast per use; a 0-dim one read by a low op needs none."""
    torch.manual_seed(0)
    model = Temperature(()).train()
    amp = ac.convert(model, (_x(),), dtype=torch.float16, training=True)
    assert "t" not in [src for src, _ in _casts(amp)], _casts(amp)
    x = _x(3, 5, seed=1)
    out = amp(x)
    out.float().pow(2).mean().backward()
    assert model.t.grad is not None and torch.isfinite(model.t.grad).all()
    _plan_is_runtime(amp, x)


def test_i7_not_for_a_zero_dim_operand_beside_a_dimensioned_one():
    """An fp32 op (kept fp32 by the user) reading a low dimensioned value and a 0-dim fp32
    parameter: the 0-dim one would not promote, so the low value is cast up (I7 does not
    apply) and the op really computes in fp32."""
    torch.manual_seed(0)
    model = Temperature(()).eval()
    x = _x()
    amp = ac.convert(model, (x,), dtype=torch.float16, keep_fp32=("mul",))
    mul = _only(amp, "mul")
    assert amp.plan[mul].precision == torch.float32
    linear = amp._dataflow.data_inputs(mul)
    assert any((src, torch.float32) in _casts(amp) for src in linear), _casts(amp)
    rec = runtime_dtypes(amp.graph_module, x)
    assert rec.dtypes[mul] == torch.float32
    _plan_is_runtime(amp, x)


def test_i7_when_every_operand_is_zero_dim():
    """fp16[] * fp32[] is fp32 in torch: the fp32 0-dim operand promotes, the low one is read as
    it is (no cast), and the op computes in fp32."""
    torch.manual_seed(0)
    model = ZeroDimOnly().eval()
    x = _x()
    amp = ac.convert(model, (x,), dtype=torch.float16)
    mul = _only(amp, "mul")
    assert amp.plan[mul].precision == torch.float32
    assert [dt for _, dt in _casts(amp)] == [torch.float16], _casts(amp)  # the input's only
    rec = runtime_dtypes(amp.graph_module, x)
    assert rec.dtypes[mul] == torch.float32
    with torch.no_grad():
        assert rel_err(amp(x), model(x)) <= BOUND_EPS * EPS[torch.float16]


# -- I9 ------------------------------------------------------------------------------------------

class Fill(nn.Module):
    """Scores from two linears, filled where the padding mask says so, softmax, @ v."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.value = value

    def forward(self, x, pad):
        scores = self.q(x) @ self.k(x).transpose(-1, -2)
        scores = scores.masked_fill(pad[:, None, :] == 0, self.value)
        return F.softmax(scores, -1) @ self.v(x)


def _padded(b: int, t: int, seed: int):
    x = _x(b, t, seed)
    pad = (torch.arange(t)[None, :] < (t - torch.arange(b) % 3)[:, None]).long()
    return x, pad


def _fill_value(amp) -> float:
    node = next(n for n in amp.graph_module.graph.nodes if n.name == _only(amp, "masked_fill"))
    return node.args[2] if len(node.args) > 2 else node.kwargs["value"]


F32_MIN = torch.finfo(torch.float32).min


@pytest.mark.parametrize("value, dtype, expected", [
    (F32_MIN, torch.float16, torch.finfo(torch.float16).min),
    (F32_MIN, torch.bfloat16, torch.finfo(torch.bfloat16).min),
    (-1e9, torch.float16, torch.finfo(torch.float16).min),
    (-1e9, torch.bfloat16, -1e9),          # fits bfloat16: left alone
    (-1e4, torch.float16, -1e4),           # fits
    (float("-inf"), torch.float16, float("-inf")),  # not finite: -inf is representable
], ids=["f32min-fp16", "f32min-bf16", "1e9-fp16", "1e9-bf16", "1e4-fp16", "inf-fp16"])
def test_i9_fill_value_saturated_only_when_it_does_not_fit(value, dtype, expected):
    torch.manual_seed(0)
    model = Fill(value).eval()
    x, pad = _padded(2, 6, 0)
    amp = ac.convert(model, (x, pad), dtype=dtype)
    fill = _only(amp, "masked_fill")
    assert amp.plan[fill].precision == dtype
    assert _fill_value(amp) == expected
    saturated = expected != value
    assert ("(I9)" in amp.plan[fill].reason) == saturated, amp.plan[fill].reason
    if saturated:
        assert f"{expected:.6g}" in amp.plan[fill].reason
    _plan_is_runtime(amp, x, pad)
    y, p = _padded(3, 7, 1)
    with torch.no_grad():
        out, ref = amp(y, p), model(y, p)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= BOUND_EPS * EPS[dtype]


def test_i9_not_applied_to_an_fp32_fill():
    """A masked_fill the plan keeps in fp32 keeps its fill value."""
    torch.manual_seed(0)
    model = Fill(F32_MIN).eval()
    x, pad = _padded(2, 6, 0)
    amp = ac.convert(model, (x, pad), dtype=torch.float16, keep_fp32=("masked_fill",))
    fill = _only(amp, "masked_fill")
    assert amp.plan[fill].precision == torch.float32
    assert _fill_value(amp) == F32_MIN
    assert "(I9)" not in amp.plan[fill].reason
    with torch.no_grad():
        assert rel_err(amp(x, pad), model(x, pad)) <= BOUND_EPS * EPS[torch.float16]


# -- the DeBERTa-like attention ----------------------------------------------------------------------

class DebertaLikeAttention(nn.Module):
    """DeBERTa-v2's self-attention in small: a 0-dim ``sqrt(d)`` scale computed as a tensor
    (``cast``: divided after ``.to(q.dtype)``, DeBERTa's own spelling, or as it is) and the
    padding filled with ``finfo(dtype).min`` (float32's at capture) before the softmax."""

    def __init__(self, cast: bool) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.o = nn.Linear(C, C)
        self.cast = cast

    def forward(self, x, pad):
        q, k, v = self.q(x), self.k(x), self.v(x)
        scale = torch.sqrt(torch.tensor(q.size(-1), dtype=torch.float))
        if self.cast:
            scores = torch.matmul(q, k.transpose(-1, -2) / scale.to(dtype=q.dtype))
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / scale
        scores = scores.masked_fill(~pad[:, None, :].bool(), torch.finfo(q.dtype).min)
        return self.o(F.softmax(scores, -1) @ v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deberta_like_attention_scale_uncast_and_fill_saturated(dtype):
    torch.manual_seed(0)
    model = DebertaLikeAttention(cast=True).eval()
    x, pad = _padded(2, 8, 0)
    amp = ac.convert(model, (x, pad), dtype=dtype)
    div, fill = _only(amp, "div"), _only(amp, "masked_fill")
    assert amp.plan[div].precision == dtype        # R3: the 0-dim scale does not block
    assert amp.plan[fill].precision == dtype
    assert _fill_value(amp) == torch.finfo(dtype).min and "(I9)" in amp.plan[fill].reason
    low_casts = [src for src, dt in _casts(amp) if dt == dtype]
    assert low_casts == ["x"], low_casts           # I8: the scale is read as it is
    _plan_is_runtime(amp, x, pad)
    y, p = _padded(3, 11, 1)
    with torch.no_grad():
        ref, out = model(y, p), amp(y, p)
    ours = rel_err(out, ref)
    theirs = autocast_error_or_skip(ours, lambda: model(y, p), dtype, ref)
    assert ours <= max(1.1 * theirs, 2 * EPS[dtype]), (ours, theirs)
    # the padding is masked: what stands at padded positions does not matter
    z = y.clone()
    z[p == 0] = 100.0
    with torch.no_grad():
        kept = p.bool()
        assert torch.allclose(amp(z, p)[kept], out[kept], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deberta_like_attention_without_the_cast_runs_as_planned(dtype):
    """The scale used as it is (no ``.to``): whatever the plan makes of it, the graph computes
    in the planned dtypes, the fill value fits the dtype the fill computes in, and the output
    is fp32's within a few epsilons."""
    torch.manual_seed(0)
    model = DebertaLikeAttention(cast=False).eval()
    x, pad = _padded(2, 8, 0)
    amp = ac.convert(model, (x, pad), dtype=dtype)
    fill = _only(amp, "masked_fill")
    precision = amp.plan[fill].precision
    assert abs(_fill_value(amp)) <= torch.finfo(precision).max
    _plan_is_runtime(amp, x, pad)
    y, p = _padded(3, 11, 1)
    with torch.no_grad():
        ref, out = model(y, p), amp(y, p)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= BOUND_EPS * EPS[dtype]
