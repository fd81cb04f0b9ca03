"""Bad and unusual input to convert(): every failure is a typed, actionable AmpCompilerError and
leaves the user's model untouched; every unusual-but-valid model converts to something sane.

Each case is one test. Where the core does the wrong thing today the test asserts the right
behaviour and is a strict xfail whose reason names the cause, so fixing the core turns it red
until the mark is removed.

    pytest tests/test_bad_input.py
"""

from __future__ import annotations

import copy
import io
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

import amp_compiler as ac
from amp_compiler.errors import AmpCompilerError, ConfigError, TraceError

from conftest import DTYPES, EPS, assert_unchanged, rel_err, runtime_dtypes, snapshot

X = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))


def _converts_or_fails_cleanly(model: nn.Module, call) -> AmpCompilerError:
    """Run a convert() that must fail; return its error after checking the model is untouched."""
    snap = snapshot(model)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    with pytest.raises(AmpCompilerError) as info:
        call()
    assert_unchanged(model, snap)
    assert {k: v.dtype for k, v in model.state_dict().items()} == dtypes
    return info.value


def _report_text(amp, **kw) -> str:
    console = Console(record=True, width=300, file=io.StringIO())
    console.print(amp.report(print_=False, **kw))
    return console.export_text()


# -- capture failures ---------------------------------------------------------------------------

class _Branchy(nn.Module):
    """Python control flow on a tensor's value: neither fx nor torch.export can capture it."""

    def forward(self, x):
        if x.sum() > 0:  # data-dependent branch
            return x * 2
        return x


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.blocks = nn.Sequential(nn.Linear(8, 8), _Branchy())

    def forward(self, x):
        return self.blocks(self.proj(x))


@pytest.mark.parametrize("training", [False, True])
def test_untraceable_without_inputs_names_module_path_and_line(training):
    model = _Outer().train(training)
    err = _converts_or_fails_cleanly(model, lambda: ac.convert(model))
    assert isinstance(err, TraceError)
    msg = str(err)
    assert "`blocks.1`" in msg                       # the module path
    assert "test_bad_input.py:" in msg and "x.sum() > 0" in msg  # the line that broke it
    assert "example_inputs" in msg                   # what to do


def test_data_dependent_control_flow_with_inputs_is_trace_error():
    """capture='export' pins the front end; the default falls back to dynamo (test_dynamo.py)."""
    model = _Outer().eval()
    err = _converts_or_fails_cleanly(model, lambda: ac.convert(model, (X,), capture="export"))
    assert isinstance(err, TraceError)
    msg = str(err)
    assert "torch.export" in msg and "x.sum() > 0" in msg
    assert "torch.where" in msg or "torch.cond" in msg  # what to do
    assert "capture='dynamo'" in msg


class _NumpyInForward(nn.Module):
    """Leaves torch for NumPy: export fails, and not because of data-dependent control flow."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(torch.from_numpy(x.numpy() * 2))


def test_other_export_failure_gets_a_generic_hint_not_control_flow_advice():
    model = _NumpyInForward().eval()
    err = _converts_or_fails_cleanly(model, lambda: ac.convert(model, (X,), capture="export"))
    assert isinstance(err, TraceError)
    msg = str(err)
    assert "torch.export" in msg and "x.numpy()" in msg  # the line that broke it
    assert "without example_inputs" in msg  # what to do
    assert "control flow" not in msg and "torch.cond" not in msg


# -- argument errors ----------------------------------------------------------------------------

class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(F.gelu(self.norm(self.fc1(x)))).softmax(-1)


@pytest.mark.parametrize("arg, entry, suggestion", [
    ("keep_fp32", "sofmax", "'softmax'"),
    ("keep_fp32", "layernorm", "'layer_norm'"),
    ("force_low", "fc_1", "'fc1'"),
])
def test_unknown_override_is_config_error_with_did_you_mean(arg, entry, suggestion):
    model = _Small().eval()
    err = _converts_or_fails_cleanly(model, lambda: ac.convert(model, **{arg: (entry,)}))
    assert isinstance(err, ConfigError)
    assert repr(entry) in str(err) and arg in str(err)
    assert "Did you mean" in str(err) and suggestion in str(err)


@pytest.mark.parametrize("dtype", ["float8", torch.float8_e4m3fn, "float32", torch.float64])
def test_non_low_precision_dtype_is_config_error(dtype):
    model = _Small().eval()
    err = _converts_or_fails_cleanly(model, lambda: ac.convert(model, dtype=dtype))
    assert isinstance(err, ConfigError)
    assert "'float16'" in str(err) and "'bfloat16'" in str(err)


@pytest.mark.parametrize("tolerance", [1e-2, 0.0, -1.0])
def test_tolerance_without_calibration_is_config_error(tolerance):
    model = _Small().eval()
    err = _converts_or_fails_cleanly(model, lambda: ac.convert(model, tolerance=tolerance))
    assert isinstance(err, ConfigError) and "calibration" in str(err)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_calibration_batch_with_nan_names_batch_and_input(bad):
    model = _Small().eval()
    poisoned = X.clone()
    poisoned[1, 2] = bad
    cal = [(X,), (X + 1, ), (poisoned,)]
    err = _converts_or_fails_cleanly(
        model, lambda: ac.convert(model, (X,), calibration=cal, dtype="float16"))
    assert isinstance(err, ConfigError)
    msg = str(err)
    assert "batch 2" in msg and "input 0" in msg
    assert ("NaN" in msg) if bad != bad else ("inf" in msg.lower() or "finite" in msg)


# -- models in other dtypes ---------------------------------------------------------------------

@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("model_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_low_precision_model_converts_sanely(dtype, model_dtype, frontend):
    """A model already in fp16/bf16: no crash, finite outputs of the model's own dtype, the
    stored weights untouched, and numbers within the coarser dtype's rounding of the model's."""
    model = _Small().to(model_dtype).eval()
    x = X.to(model_dtype)
    with torch.no_grad():
        ref = model(x)
    snap = snapshot(model)
    amp = ac.convert(model, (x,) if frontend == "export" else None, dtype=dtype)
    assert_unchanged(model, snap)
    with torch.no_grad():
        out = amp(x)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= 16 * max(EPS[dtype], EPS[model_dtype])
    linears = [n for n, d in amp.plan.items() if d.kind == "linear"]
    assert len(linears) == 2 and all(amp.plan[n].precision == dtype for n in linears)
    assert out.dtype == model_dtype, f"output dtype {out.dtype}, model returns {model_dtype}"


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_float64_model_left_in_float64(dtype, frontend):
    """As torch.autocast does: float64 values stay float64, bit for bit, with no casts."""
    model = _Small().double().eval()
    x = X.double()
    with torch.no_grad():
        ref = model(x)
    amp = ac.convert(model, (x,) if frontend == "export" else None, dtype=dtype)
    compute = {n: d for n, d in amp.plan.items() if d.kind in ("linear", "layer_norm", "gelu", "softmax")}
    assert len(compute) == 5
    assert {n: d.precision for n, d in compute.items()} == {n: torch.float64 for n in compute}
    assert all(d.rule == "R0:float64" for d in compute.values())
    with torch.no_grad():
        out = amp(x)
    assert out.dtype == torch.float64 and torch.equal(out, ref)
    assert amp.cast_count() == 0


class _IntOnly(nn.Module):
    def forward(self, ids):
        return (ids * 3 + 1).cumsum(-1) // 2


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_integer_only_model_has_no_casts_and_exact_output(frontend):
    ids = torch.arange(12).view(3, 4)
    model = _IntOnly()
    amp = ac.convert(model, (ids,) if frontend == "export" else None, dtype="float16")
    assert amp.cast_count() == 0
    assert not [n for n, d in amp.plan.items() if d.precision in DTYPES]
    out = amp(ids)
    assert out.dtype == torch.int64 and torch.equal(out, model(ids))


# -- non-finite weights -------------------------------------------------------------------------

@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_weights_propagate_like_fp32(dtype, frontend):
    """Chosen behaviour: conversion succeeds and NaN/inf flow exactly where fp32's do (the
    plan is about precision, not about cleaning the model)."""
    model = _Small().eval()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")   # poisons fc1 output column 0 -> norm row-wise
        model.fc2.bias[1] = float("inf")
    snap = snapshot(model)
    with torch.no_grad():
        ref = model(X)
        amp = ac.convert(model, (X,) if frontend == "export" else None, dtype=dtype)
        out = amp(X)
    # assert_unchanged compares with torch.equal, which treats NaN != NaN: compare bit patterns
    for k, v in snap["state"].items():
        assert torch.equal(model.state_dict()[k].view(torch.int32), v.view(torch.int32)), k
    assert out.dtype == ref.dtype
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))


def test_nan_row_in_clean_model_stays_in_its_row():
    """One NaN input row must not leak into the other rows (no batch-wide reductions added)."""
    model = _Small().eval()
    x = X.clone()
    x[0, 3] = float("nan")
    amp = ac.convert(model, dtype="float16")
    with torch.no_grad():
        out, ref = amp(x), model(x)
    assert torch.isnan(out[0]).all() and torch.isnan(ref[0]).all()
    assert torch.isfinite(out[1:]).all()
    assert rel_err(out[1:], ref[1:]) < 16 * EPS[torch.float16]


# -- custom ops ---------------------------------------------------------------------------------

@torch.library.custom_op("amp_compiler_tests::wobble", mutates_args=())
def wobble(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(3 * x) + x


@wobble.register_fake
def _(x):
    return torch.empty_like(x)


class _WithCustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(wobble(self.fc1(x)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_library_custom_op_left_fp32_as_unknown_and_listed(frontend):
    model = _WithCustomOp().eval()
    amp = ac.convert(model, (X,) if frontend == "export" else None, dtype="bfloat16")
    custom = [n for n, d in amp.plan.items() if d.kind == "wobble"]
    assert len(custom) == 1
    d = amp.plan[custom[0]]
    assert (d.category, d.precision, d.rule) == ("unknown", torch.float32, "R7:unknown")
    assert "keep_fp32/force_low" in d.reason
    assert custom[0] in _report_text(amp, only="unknown")
    assert amp.plan.counts()["unknown"] == 1
    with torch.no_grad():
        rec = runtime_dtypes(amp.graph_module, X)
    assert rec.dtypes[custom[0]] == torch.float32
    with torch.no_grad():
        assert rel_err(amp(X), model(X)) < 16 * EPS[torch.bfloat16]


class _StraightThrough(torch.autograd.Function):
    """Quantiser with a straight-through gradient: its backward is NOT the forward's derivative."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, grad):
        return grad


class _WithAutogradFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(_StraightThrough.apply(self.fc1(x)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_custom_autograd_function_is_one_unknown_fp32_op(frontend):
    model = _WithAutogradFunction().eval()
    amp = ac.convert(model, (X,) if frontend == "export" else None, dtype="bfloat16")
    unknown = [n for n, d in amp.plan.items() if d.rule == "R7:unknown"]
    assert len(unknown) == 1 and amp.plan[unknown[0]].precision == torch.float32
    assert not [n for n, d in amp.plan.items() if d.kind == "round"]


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("make, kind", [(lambda: _WithCustomOp(), "wobble"),
                                        (lambda: _WithAutogradFunction(), "_StraightThrough")],
                         ids=["library-custom-op", "autograd-function"])
def test_force_low_overrides_unknown_op(make, kind, frontend):
    model = make().eval()
    amp = ac.convert(model, (X,) if frontend == "export" else None, dtype="bfloat16",
                     force_low=(kind,))
    (name,) = [n for n, d in amp.plan.items() if d.kind == kind]
    assert (amp.plan[name].precision, amp.plan[name].rule) == (torch.bfloat16, "R6:force_low")
    with torch.no_grad():
        rec = runtime_dtypes(amp.graph_module, X)
    assert rec.dtypes[name] == torch.bfloat16
    assert f"force_low={kind!r}" in amp.plan[name].reason


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_custom_autograd_function_backward_is_kept_in_training(frontend):
    model = _WithAutogradFunction().train()
    model(X).sum().backward()
    ref = model.fc1.weight.grad.clone()
    model.zero_grad()
    amp = ac.convert(model, (X,) if frontend == "export" else None, dtype="bfloat16")
    amp(X).float().sum().backward()
    got = model.fc1.weight.grad
    assert got is not None and got.abs().max() > 0
    assert rel_err(got, ref) < 0.05


# -- in-place ops and out= ----------------------------------------------------------------------

class _InPlace(nn.Module):
    def __init__(self, use_out: bool) -> None:
        super().__init__()
        self.use_out = use_out
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        if self.use_out:
            z = torch.empty_like(x)
            torch.mul(x, 2, out=z)
            x = z
        y = self.fc1(x)
        y.add_(1)
        y = F.relu_(y)
        y.mul_(0.5)
        return self.fc2(y)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("use_out", [False, True], ids=["inplace", "inplace+out"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place_and_out_ops_match_fp32_like_autocast(dtype, use_out, frontend):
    model = _InPlace(use_out).eval()
    with torch.no_grad():
        ref = model(X)
        with torch.autocast("cpu", dtype=dtype):
            theirs = rel_err(model(X), ref)
    snap = snapshot(model)
    amp = ac.convert(model, (X,) if frontend == "export" else None, dtype=dtype)
    with torch.no_grad():
        out = amp(X)
    assert_unchanged(model, snap)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) <= 1.1 * theirs + 4 * EPS[dtype]


# -- structured outputs -------------------------------------------------------------------------

@dataclasses.dataclass
class _Pair:
    logits: torch.Tensor
    probs: torch.Tensor


torch.utils._pytree.register_dataclass(_Pair)


class _Structured(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.fc(x)
        p, i = y.softmax(-1), y.argmax(-1)
        if self.form == "dict":
            return {"logits": y, "probs": p, "index": i}
        if self.form == "tuple":
            return y, (p, i)
        return _Pair(y, p)


def _leaves(o):
    if dataclasses.is_dataclass(o):
        o = dataclasses.asdict(o)
    if isinstance(o, dict):
        return {k: _leaves(v) for k, v in o.items()}
    if isinstance(o, (tuple, list)):
        return type(o)(_leaves(v) for v in o)
    return o


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("form", ["dict", "tuple", "dataclass"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_structured_outputs_keep_structure_and_dtypes(dtype, form, frontend):
    model = _Structured(form).eval()
    amp = ac.convert(model, (X,) if frontend == "export" else None, dtype=dtype)
    with torch.no_grad():
        out, ref = amp(X), model(X)
    assert type(out) is type(ref)
    flat_out, spec_out = torch.utils._pytree.tree_flatten(out)
    flat_ref, spec_ref = torch.utils._pytree.tree_flatten(ref)
    assert spec_out == spec_ref
    for o, r in zip(flat_out, flat_ref):
        assert o.dtype == r.dtype and o.shape == r.shape
        if r.is_floating_point():
            assert rel_err(o, r) < 8 * EPS[dtype]
        else:
            # argmax of the low-precision logits may flip only between near-ties
            assert (o == r).float().mean() >= 0.5


def test_unregistered_dataclass_output_under_export_is_trace_error():
    @dataclasses.dataclass
    class Loose:
        y: torch.Tensor

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return Loose(self.fc(x))

    model = M().eval()
    err = _converts_or_fails_cleanly(model, lambda: ac.convert(model, (X,), capture="export"))
    assert isinstance(err, TraceError) and "pytree" in str(err)


# -- buffers updated in forward -----------------------------------------------------------------

class _ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batchnorm_running_stats_stay_fp32_and_update_like_fp32(dtype, frontend):
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 3, 10, 10, generator=g) + 0.5 for _ in range(3)]
    model = _ConvBN().train()
    twin = copy.deepcopy(model)
    auto = copy.deepcopy(model)
    amp = ac.convert(model, (batches[0],) if frontend == "export" else None, dtype=dtype)
    for b in batches:
        amp(b)
        twin(b)
        with torch.autocast("cpu", dtype=dtype):
            auto(b)
    bn, ref, ac_bn = model.bn, twin.bn, auto.bn
    assert bn.running_mean.dtype == bn.running_var.dtype == torch.float32
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == len(batches)
    for stat in ("running_mean", "running_var"):
        ours = rel_err(getattr(bn, stat), getattr(ref, stat))
        theirs = rel_err(getattr(ac_bn, stat), getattr(ref, stat))
        assert ours <= 2 * theirs + 1e-6, f"{stat}: {ours:.2e} vs autocast {theirs:.2e}"
    # the running statistics really moved (the update is not swallowed by a cast copy)
    assert not torch.allclose(bn.running_mean, torch.zeros(6))


class _Variadic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, *args):
        return self.fc(args[0]) + args[1]


def test_variadic_forward_converts_with_example_inputs():
    model = _Variadic().eval()
    y = torch.randn(3, 8)
    amp = ac.convert(model, (X, y), dtype="bfloat16")
    with torch.no_grad():
        assert rel_err(amp(X, y), model(X, y)) < 8 * EPS[torch.bfloat16]
