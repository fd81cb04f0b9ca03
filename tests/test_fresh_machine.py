"""The tests pass on any x86-64 CPU: kernels a machine lacks are a fact about it, not a failure.

oneDNN's float16 LSTM needs AVX512-FP16 or AMX; on an AMD Zen 4 ``torch.autocast("cpu",
torch.float16)`` around ``nn.LSTM`` raises "could not create a primitive descriptor". Two
defences, each forced here with a monkeypatch so that they run on every machine:

- the reference: where autocast cannot run, the comparison becomes one with fp32 under a stated
  bound, and the autocast part is skipped with the reason (tests), or reported as unavailable
  (CLI, demo) instead of exiting 1;
- the plan: a kind whose low-precision kernel the device lacks is probed at convert time and
  kept fp32 with rule R8 and the probe's error as its reason.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import amp_compiler as ac
from amp_compiler.cli import main
from amp_compiler.demo import compare_outputs
from amp_compiler.models import build
from amp_compiler.passes import kernels
from amp_compiler.reference import ReferenceUnavailable, autocast_run, is_missing_kernel
from conftest import EPS, FP32_BOUND_EPS, autocast_error_or_skip, rel_err

ONEDNN = ("could not create a primitive descriptor for the LSTM forward propagation primitive. "
          "Run workload with environment variable ONEDNN_VERBOSE=all to get additional "
          "diagnostic information.")


@pytest.fixture
def autocast_without_kernels(monkeypatch):
    """torch.autocast as on a CPU whose oneDNN has no float16 LSTM: entering it raises."""
    @contextlib.contextmanager
    def broken(device_type, dtype=None, **kw):
        raise RuntimeError(ONEDNN)
        yield  # pragma: no cover

    monkeypatch.setattr(torch, "autocast", broken)


@pytest.fixture
def lstm_eval():
    model, inputs = build("lstm", "tiny")
    model.eval()
    with torch.no_grad():
        ref = model(*inputs)
    return model, inputs, ref


def test_missing_kernel_errors_are_recognised_and_others_are_not():
    assert is_missing_kernel(RuntimeError(ONEDNN))
    assert is_missing_kernel(RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\''))
    assert not is_missing_kernel(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_missing_kernel(ValueError(ONEDNN))


def test_autocast_run_passes_other_errors_through():
    def bad():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        autocast_run(bad, "cpu", torch.bfloat16)


def test_unavailable_reference_skips_with_reason_after_the_fp32_check(autocast_without_kernels, lstm_eval):
    model, inputs, ref = lstm_eval
    amp = ac.convert(model, inputs, dtype=torch.float16)
    with torch.no_grad():
        ours = rel_err(amp(*inputs), ref)
    with pytest.raises(pytest.skip.Exception) as skipped:
        autocast_error_or_skip(ours, lambda: model(*inputs), torch.float16, ref)
    reason = str(skipped.value)
    assert "could not create a primitive descriptor" in reason
    assert f"{FP32_BOUND_EPS} eps" in reason and f"{ours:.2e}" in reason


def test_unavailable_reference_still_fails_a_bad_error(autocast_without_kernels, lstm_eval):
    model, inputs, ref = lstm_eval
    too_big = 2 * FP32_BOUND_EPS * EPS[torch.float16]
    with pytest.raises(AssertionError, match="primitive descriptor"):
        autocast_error_or_skip(too_big, lambda: model(*inputs), torch.float16, ref)


def test_available_reference_is_compared(lstm_eval):
    model, inputs, ref = lstm_eval
    theirs = autocast_error_or_skip(0.0, lambda: model(*inputs), torch.bfloat16, ref)
    assert 0 < theirs < 8 * EPS[torch.bfloat16]


def test_compare_outputs_reports_the_reference_unavailable(autocast_without_kernels, lstm_eval):
    model, inputs, ref = lstm_eval
    amp = ac.convert(model, inputs, dtype=torch.float16)
    n = compare_outputs(model, amp, inputs, torch.float16)
    assert n["error_autocast"] is None and n["casts_autocast"] is None
    assert "cannot run this model on this machine" in n["autocast_unavailable"]
    assert 0 < n["error_amp"] < FP32_BOUND_EPS * EPS[torch.float16]
    assert n["casts_amp"] == amp.cast_count()


def test_cli_convert_succeeds_without_the_reference(autocast_without_kernels, tmp_path, capsys):
    code = main(["convert", "lstm", "--dtype", "float16", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "no torch.autocast comparison" in " ".join(out.split())
    assert (tmp_path / "out" / "plan.json").exists()


# -- the plan: kernels probed at convert time ------------------------------------------------------

@pytest.fixture
def no_fp16_rnn_kernel(monkeypatch):
    """A device without a float16 RNN kernel: the rnn probe fails as oneDNN does on Zen 4."""
    def probe(dtype, device):
        if dtype == torch.float16:
            raise RuntimeError(ONEDNN)

    monkeypatch.setitem(kernels.PROBES, "rnn", probe)
    kernels.missing_kernel.cache_clear()
    yield
    kernels.missing_kernel.cache_clear()


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_kind_without_kernel_stays_fp32_with_reason(no_fp16_rnn_kernel, lstm_eval, frontend):
    model, inputs, ref = lstm_eval
    amp = ac.convert(model, inputs if frontend == "export" else None, dtype=torch.float16)
    rnn = [n for n, d in amp.plan.items() if d.kind == "rnn"]
    assert rnn
    for n in rnn:
        d = amp.plan[n]
        assert d.precision == torch.float32 and d.rule == "R8:no-kernel"
        assert "no float16 kernel on this cpu" in d.reason and "primitive descriptor" in d.reason
    # the rest of the model is still low precision, and the numbers are fp32-close
    assert any(d.kind == "linear" and d.precision == torch.float16 for d in amp.plan.values())
    with torch.no_grad():
        out = amp(*inputs)
    assert out.dtype == ref.dtype and rel_err(out, ref) < FP32_BOUND_EPS * EPS[torch.float16]


def test_force_low_cannot_override_a_missing_kernel(no_fp16_rnn_kernel, lstm_eval):
    model, inputs, _ = lstm_eval
    amp = ac.convert(model, inputs, dtype=torch.float16, force_low=("rnn",))
    assert {amp.plan[n].rule for n, d in amp.plan.items() if d.kind == "rnn"} == {"R8:no-kernel"}


def test_keep_fp32_keeps_its_own_reason(no_fp16_rnn_kernel, lstm_eval):
    model, inputs, _ = lstm_eval
    amp = ac.convert(model, inputs, dtype=torch.float16, keep_fp32=("rnn",))
    assert {amp.plan[n].rule for n, d in amp.plan.items() if d.kind == "rnn"} == {"R6:keep_fp32"}


def test_other_dtype_unaffected_and_probe_runs_once(no_fp16_rnn_kernel, lstm_eval, monkeypatch):
    model, inputs, _ = lstm_eval
    amp = ac.convert(model, inputs, dtype=torch.bfloat16)
    assert all(d.precision == torch.bfloat16 for d in amp.plan.values() if d.kind == "rnn")
    calls = []
    monkeypatch.setitem(kernels.PROBES, "conv", lambda dt, dev: calls.append((dt, dev)))
    kernels.missing_kernel.cache_clear()
    for _ in range(3):
        assert kernels.missing_kernel("conv", "cpu", torch.float16) is None
    assert calls == [(torch.float16, "cpu")]


def test_every_probe_runs_on_this_cpu_in_bfloat16():
    # bf16 CPU kernels exist on every x86-64 torch build this project supports; a failing probe
    # here would silently move ops to fp32, so it is checked, kind by kind
    kernels.missing_kernel.cache_clear()
    missing = {k: kernels.missing_kernel(k, "cpu", torch.bfloat16) for k in kernels.PROBES}
    assert {k: v for k, v in missing.items() if v is not None} == {}


def test_onnx_plans_are_not_probed(no_fp16_rnn_kernel):
    from amp_compiler.passes.classify import classify
    from amp_compiler.passes.graph import DataflowGraph
    from amp_compiler.passes.policy import policy_for

    g = DataflowGraph()
    g.add_vertex("x", role="input", kind="input", dtype=torch.float32)
    g.add_vertex("lstm", role="compute", kind="rnn", dtype=torch.float32)
    g.add_use("x", "lstm")
    policy = policy_for("cpu", torch.float16)
    assert classify(g, policy).no_kernel == {}
    assert set(classify(g, policy, probe_kernels=True).no_kernel) == {"lstm"}
