"""convert()'s optional stages through the public API: calibration ranges (D rules), tolerance
mode (T1), the attention rewrite (A rules) and its survival through ONNX export."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import amp_compiler as ac
from amp_compiler.models import build
from conftest import rel_err


class Hot(nn.Module):
    """A linear whose outputs reach ~1e5 (fp16 max is 65504), then a layer norm brings it back."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 64)
        self.ln = nn.LayerNorm(64)
        self.head = nn.Linear(64, 4)
        with torch.no_grad():
            self.fc2.weight.mul_(60000.0)

    def forward(self, x):
        return self.head(self.ln(self.fc2(torch.relu(self.fc1(x)))))


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=g) * 4,) for _ in range(n)]


def test_calibration_pins_the_overflowing_matmul_and_fixes_the_output():
    model = Hot().eval()
    x = _batches(1, seed=5)[0]
    ref = model(*x)
    plain = ac.convert(model, x, dtype="float16")
    with torch.no_grad():
        assert not torch.isfinite(plain(*x)).all(), "the fixture must overflow fp16 without data"
    safe = ac.convert(model, x, dtype="float16", calibration=_batches(4))
    d = safe.plan["linear_1"]
    assert d.precision == torch.float32 and d.rule.startswith("D1"), d
    assert "observed max|x|" in d.reason
    with torch.no_grad():
        out = safe(*x)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-2


def test_tolerance_mode_meets_eps_on_calibration_data():
    model, ex = build("gpt", "tiny", seed=0)
    model.eval()
    cal = [build("gpt", "tiny", seed=s)[1] for s in range(1, 4)]
    eps = 1e-4
    amp = ac.convert(model, ex, dtype="float16", calibration=cal, tolerance=eps)
    info = amp.plan.meta["tolerance"]
    print("gpt tolerance 1e-4:", info)
    with torch.no_grad():
        worst = max(rel_err(amp(*b), model(*b)) for b in cal)
    assert worst <= eps
    moved = [n for n, d in amp.plan.items() if d.rule == "T1:tolerance"]
    assert moved and all("contribution" in amp.plan[n].reason or "tolerance" in amp.plan[n].reason for n in moved)
    assert info["evaluations"] <= 2 * 7 + 2  # log2(#candidates)-bounded search


def test_tolerance_needs_calibration():
    model, ex = build("mlp", "tiny")
    with pytest.raises(ac.ConfigError, match="calibration"):
        ac.convert(model.eval(), ex, tolerance=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_attention_rewrite_through_convert(dtype):
    model, ex = build("gpt", "tiny", seed=0)
    model.eval()
    amp = ac.convert(model, ex, dtype=dtype, rewrite_attention=True)
    sdpa = [n for n, d in amp.plan.items() if d.kind == "sdpa"]
    assert len(sdpa) == model.config.n_layer
    assert all(amp.plan[n].precision == dtype for n in sdpa)
    assert "scaled_dot_product_attention" in amp.graph_module.code
    assert not any(d.kind == "softmax" for d in amp.plan.values())
    with torch.no_grad():
        ref = model(*ex)
        with torch.autocast("cpu", dtype=dtype):
            auto = model(*ex)
        err = rel_err(amp(*ex), ref)
    # the fused kernel rounds differently from the explicit chain: allow 1.5x autocast's error
    assert err <= 1.5 * rel_err(auto, ref) + 1e-7, err
    assert amp.plan.meta["rewrite_attention"] is True


def test_attention_rewrite_is_off_on_cpu_by_default_and_when_softmax_is_pinned():
    model, ex = build("gpt", "tiny", seed=0)
    model.eval()
    assert not any(d.kind == "sdpa" for d in ac.convert(model, ex, dtype="bfloat16").plan.values())
    pinned = ac.convert(model, ex, dtype="bfloat16", rewrite_attention=True, keep_fp32=("softmax",))
    assert all(d.precision == torch.float32 for d in pinned.plan.values() if d.kind == "softmax")


def test_attention_rewrite_trains_and_saved_plan_reapplies():
    model, ex = build("gpt", "tiny", seed=0, with_targets=True)
    model.train()
    ref = copy.deepcopy(model)
    amp = ac.convert(model, ex, dtype="bfloat16", rewrite_attention=True)
    amp(*ex).backward()
    ref(*ex).backward()
    g, g_ref = model.transformer.h[0].attn.c_attn.weight.grad, ref.transformer.h[0].attn.c_attn.weight.grad
    assert rel_err(g, g_ref) < 5e-2
    again = ac.convert(model, ex, plan=amp.plan.to_json())
    assert again.plan.meta["rewrite_attention"] is True
    assert {n for n, d in again.plan.items() if d.kind == "sdpa"} == {n for n, d in amp.plan.items() if d.kind == "sdpa"}


def test_rewritten_attention_survives_onnx_export(tmp_path, ort_no_crash):
    model, ex = build("gpt", "tiny", seed=0)
    model.eval()
    amp = ac.convert(model, ex, dtype="float16", rewrite_attention=True)
    path = ac.export_onnx(amp, ex, str(tmp_path / "gpt_sdpa.onnx"))
    ort_no_crash(path, ex)  # before verify_onnx opens it in this process
    result = ac.verify_onnx(path, amp, ex)
    print("onnx vs amp (sdpa):", result)
    assert result["max_rel"] < 4 * 2 ** -11
