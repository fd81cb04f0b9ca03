"""Custom ``torch.autograd.Function`` capture (amp_compiler/capture/functions.py): one node that calls
``Fn.apply`` on both capture paths, with the Function's own backward; what export cannot keep is
refused with the fx way out.

    pytest tests/test_functions.py
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import amp_compiler as ac
from amp_compiler.errors import UnsupportedModelError
from amp_compiler.capture import symbolic_capture
from amp_compiler.capture.functions import FunctionCall

from conftest import EPS, assert_unchanged, convert_via, rel_err, snapshot

X = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
FRONTENDS = ["fx", "export"]



class _ScaledClip(torch.autograd.Function):
    """Two outputs, a non-tensor argument, and a backward that is not the forward's derivative."""

    @staticmethod
    def forward(ctx, x, limit):
        return x.clamp(-limit, limit), x.abs().amax(-1, keepdim=True)

    @staticmethod
    def backward(ctx, g, g_peak):
        return 2 * g, None


class _WithTwoOutputFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        y, peak = _ScaledClip.apply(self.fc1(x), 0.5)
        return self.fc2(y) * peak


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_function_with_two_outputs_is_one_call_node_with_its_backward(frontend):
    model = _WithTwoOutputFunction().train()
    model(X).sum().backward()
    ref = model.fc1.weight.grad.clone()
    model.zero_grad()
    amp = convert_via(frontend, model, (X,), dtype="bfloat16")
    (node,) = [n for n in amp.graph_module.graph.nodes if isinstance(n.target, FunctionCall)]
    assert node.target.fn is _ScaledClip and 0.5 in node.args
    assert amp.plan[node.name].rule == "R7:unknown" and amp.plan[node.name].kind == "_ScaledClip"
    assert "clamp" not in {d.kind for d in amp.plan.values()}
    amp.graph_module.recompile()  # the target survives code generation
    copy.deepcopy(amp.graph_module)
    amp(X).float().sum().backward()
    assert rel_err(model.fc1.weight.grad, ref) < 0.05


class _WithPlainOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2, 3  # a non-tensor output: a graph op cannot return it

    @staticmethod
    def backward(ctx, g, _):
        return g


class _FirstRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n):
        return x[:n] * 2

    @staticmethod
    def backward(ctx, g):
        return g, None


class _Awkward(nn.Module):
    def __init__(self, fn: str) -> None:
        super().__init__()
        self.fc, self.fn = nn.Linear(8, 8), fn

    def forward(self, x):
        if self.fn == "plain-output":
            return _WithPlainOutput.apply(self.fc(x))[0]
        return _FirstRows.apply(self.fc(x), x.shape[0])  # a size that varies with the batch


@pytest.mark.parametrize("fn, why", [("plain-output", "non-tensor output"),
                                     ("batch-size-arg", "depends on the input shape")])
def test_function_export_cannot_keep_is_refused_with_the_fx_way_out(fn, why):
    model = _Awkward(fn).train()
    snap = snapshot(model)
    with pytest.raises(UnsupportedModelError) as info:
        ac.convert(model, (X,), dtype="bfloat16")
    assert_unchanged(model, snap)
    assert why in str(info.value) and "without example_inputs" in str(info.value)
    amp = ac.convert(model, dtype="bfloat16")  # fx keeps it as one node
    (node,) = [n for n in amp.graph_module.graph.nodes if isinstance(n.target, FunctionCall)]
    assert amp.plan[node.name].rule == "R7:unknown"
    assert rel_err(amp(X), model(X)) < 16 * EPS[torch.bfloat16]


def test_function_called_outside_capture_is_untouched():
    """The patch lives only while tracing: eager calls afterwards are plain Function calls."""
    symbolic_capture(_WithTwoOutputFunction())
    x = torch.randn(2, 8, requires_grad=True)
    y, _ = _ScaledClip.apply(x, 10.0)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
