"""compare() (amp_compiler/compare.py): node-by-node error against fp32 and the overflow locator.
A planted fp16 overflow is found at the node that overflows (or at the cast that does), also on a
training-mode conversion whose shared fp32 weights drifted; a healthy model shows small errors on
exactly its low-precision nodes."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console
from torch import nn

import amp_compiler as ac
from amp_compiler.compare import compare
from amp_compiler.errors import ConfigError
from conftest import eval_conversion, rel_err

FP16 = torch.float16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models: one thread avoids OpenMP barrier stalls on a loaded 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Net(nn.Module):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        self.ln = nn.LayerNorm(64)
        for p in self.parameters():
            if p.dim() == 2:
                p.data = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
        self.fc2.weight.data *= scale

    def forward(self, x):
        return self.fc3(self.ln(self.fc2(torch.relu(self.fc1(x)))))


def test_planted_overflow_is_located_at_its_node():
    model = Net(scale=3e4).eval()
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    amp = ac.convert(model, dtype="float16")
    with torch.no_grad():
        assert not torch.isfinite(amp(x)).all()
        assert model.fc2(torch.relu(model.fc1(x))).abs().max() > 65504  # the planted overflow

    report = compare(model, amp, (x,))
    assert report.first_nonfinite == "linear_1"
    row = report["linear_1"]
    assert row.precision == "float16" and row.kind == "linear" and row.rel_error == float("inf")
    assert row.nonfinite > 0 and row.max_abs_fp32 > 65504
    # the nodes before it are fine, and it is the first with any non-finite value
    before = [r for r in report.rows[: report.rows.index(row)]]
    assert before and all(r.nonfinite == 0 and r.rel_error < 2e-3 for r in before)
    assert report.first_nan_fp32 is None

    console = Console(record=True, width=200)
    report.print(console=console)
    text = console.export_text()
    assert "first inf/NaN: 'linear_1' (linear, float16)" in text and "keep_fp32=('node:linear_1',)" in text


def test_overflow_in_a_cast_is_located_at_the_cast():
    class ExpThenLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(torch.exp(x))  # exp stays fp32 (deny); fc reads it through an fp16 cast

    model = ExpThenLinear().eval()
    x = torch.linspace(0, 12, 16).reshape(2, 8)  # exp(12) = 1.6e5 > 65504
    amp = ac.convert(model, dtype="float16")
    report = compare(model, amp, x)
    first = report[report.first_nonfinite]
    assert first.cast_of == "exp" and first.precision == "float16" and first.kind == "cast"
    assert report["exp"].rel_error == 0.0 and report["exp"].precision == "float32"
    assert "the cast of 'exp' to float16" in report.overflow_message()


def test_locates_the_overflow_of_a_training_run_gone_nan():
    """Training mode shares the fp32 master weights: when they drift so that fc2 overflows in
    fp16, the converted model goes NaN, and compare() on that batch names the node."""
    model = Net().train()
    amp = ac.convert(model, dtype="float16", training=True)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(amp(x)).all()
    with torch.no_grad():
        model.fc2.weight.mul_(3e4)  # what a diverging optimiser step does to the shared weights
    assert not torch.isfinite(amp(x)).all()
    report = compare(model, amp, (x,))
    assert report.first_nonfinite == "linear_1"


def test_healthy_model_errors_sit_on_low_nodes():
    model, inputs, amp = eval_conversion("gpt", FP16, "export")
    report = compare(model, amp, inputs)
    assert report.first_nonfinite is None and report.first_nan_fp32 is None
    names = {r.node for r in report.rows}
    compute = [n for n, d in amp.plan.items() if d.precision is not None
               and d.category not in ("input", "param", "const", "output") and n in names]
    assert len(compute) > 50
    for n in compute:
        r = report[n]
        assert r.rel_error < 2e-2, (n, r.rel_error)
        if amp.plan[n].precision == torch.float32 and amp.plan[n].category == "deny":
            assert r.precision == "float32"
    low = [report[n].rel_error for n in compute if amp.plan[n].precision == FP16]
    assert low and max(low) > 1e-4  # fp16 rounding is visible where the plan says fp16
    # the output cast's row carries the model's end-to-end error
    out_cast = [r for r in report.rows if r.cast_of and r.precision == "float32"][-1]
    with torch.no_grad():
        assert out_cast.rel_error == pytest.approx(rel_err(amp(*inputs), model(*inputs)), rel=1e-4)
    top = report.top(5)
    assert len(top) == 5 and [r.node for r in top] == [r.node for r in report.rows if r in top]
    assert min(r.rel_error for r in top) >= sorted((r.rel_error for r in report.rows), reverse=True)[4]


def test_compare_refuses_a_module_that_is_not_converted():
    model = Net().eval()
    with pytest.raises(ConfigError, match="AmpModule"):
        compare(model, nn.Linear(2, 2), (torch.randn(1, 32),))
